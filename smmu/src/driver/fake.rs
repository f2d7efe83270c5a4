//! A fake SMMU for host tests: a register model plus an in-memory physical address space, shared
//! by the [`SmmuRegs`] and [`DmaMemory`] sides so that "hardware" sees what the driver writes.
//!
//! Modelled: CR0 -> CR0ACK, IRQ_CTRL -> IRQ_CTRLACK, the GBPA UPDATE handshake, command
//! consumption (on PROD writes and, optionally, on CONS reads) with CERROR_ILL for undecodable
//! commands or chosen opcodes, GERROR/GERRORN, and event production with the overflow flag.

use super::{DmaMemory, DriverError, QueueMemory, SmmuRegs};
use crate::cmd::Command;
use crate::event::Event;
use crate::queue::{Queue, OVERFLOW_FLAG};
use crate::regs::{self, Cr0, Gbpa, Gerror};
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

/// Base PA of the fake's RAM.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Size of the fake's RAM.
pub const RAM_SIZE: usize = 4 << 20;

#[derive(Debug)]
pub struct FakeState {
    pub idr0: u32,
    pub idr1: u32,
    pub idr5: u32,
    pub regs32: BTreeMap<u64, u32>,
    pub regs64: BTreeMap<u64, u64>,
    pub ram: Vec<u8>,
    pub next_alloc: u64,
    /// Every command consumed, in order.
    pub commands: Vec<Command>,
    /// Opcodes answered with CERROR_ILL.
    pub illegal_opcodes: Vec<u8>,
    /// Never acknowledge CR0.
    pub cr0ack_stuck: bool,
    /// Never clear GBPA.UPDATE.
    pub gbpa_stuck: bool,
    /// Consume commands when PROD is written (QEMU's behaviour); otherwise only on CONS reads.
    pub consume_on_prod: bool,
    /// Commands consumed per CONS read when not consuming on PROD writes.
    pub consume_per_cons_read: usize,
    /// Number of CMDQ_PROD writes.
    pub prod_writes: usize,
    /// Number of CMDQ_CONS reads.
    pub cons_reads: usize,
}

/// Both halves of the fake, cheaply clonable.
#[derive(Debug, Clone)]
pub struct FakeSmmu(pub Rc<RefCell<FakeState>>);

/// QEMU 10.0 `virt` values (`hw/arm/smmuv3.c`, `smmuv3_init_regs`).
pub const QEMU_IDR0: u32 = 0x0d44_101b;
pub const QEMU_IDR1: u32 = 19 << 21 | 19 << 16 | 16;
pub const QEMU_IDR5: u32 = 0x70 | 4;

impl FakeSmmu {
    pub fn new(idr0: u32, idr1: u32, idr5: u32) -> Self {
        let mut regs32 = BTreeMap::new();
        // GBPA reset value in QEMU: SHCFG = use incoming, no abort.
        regs32.insert(regs::SMMU_GBPA, 0x1000);
        Self(Rc::new(RefCell::new(FakeState {
            idr0,
            idr1,
            idr5,
            regs32,
            regs64: BTreeMap::new(),
            ram: vec![0; RAM_SIZE],
            next_alloc: RAM_BASE,
            commands: Vec::new(),
            illegal_opcodes: Vec::new(),
            cr0ack_stuck: false,
            gbpa_stuck: false,
            consume_on_prod: true,
            consume_per_cons_read: 1,
            prod_writes: 0,
            cons_reads: 0,
        })))
    }

    pub fn qemu() -> Self {
        Self::new(QEMU_IDR0, QEMU_IDR1, QEMU_IDR5)
    }

    pub fn st(&self) -> core::cell::RefMut<'_, FakeState> {
        self.0.borrow_mut()
    }

    pub fn reg32(&self, off: u64) -> u32 {
        self.0.borrow().r32(off)
    }

    pub fn reg64(&self, off: u64) -> u64 {
        self.0.borrow().regs64.get(&off).copied().unwrap_or(0)
    }

    pub fn commands(&self) -> Vec<Command> {
        self.0.borrow().commands.clone()
    }

    pub fn take_commands(&self) -> Vec<Command> {
        core::mem::take(&mut self.0.borrow_mut().commands)
    }

    pub fn read_u64(&self, pa: u64) -> u64 {
        let mut b = [0u8; 8];
        self.0.borrow().read_ram(pa, &mut b);
        u64::from_le_bytes(b)
    }

    /// Produces an event as the SMMU would: into the slot at EVENTQ_PROD, or, when the queue is
    /// full, dropped with EVENTQ_PROD.OVFLG made to differ from EVENTQ_CONS.OVACKFLG, so that
    /// software sees an unacknowledged overflow (IHI 0070 7.4).
    pub fn push_event(&self, e: Event) {
        let mut st = self.0.borrow_mut();
        if st.r32(regs::SMMU_CR0ACK) & Cr0::EVTQEN.bits() == 0 {
            return;
        }
        let base = st.regs64.get(&regs::SMMU_EVENTQ_BASE).copied().unwrap_or(0);
        let mut q = Queue::new((base & 0x1f) as u8);
        let prod_raw = st.r32(regs::SMMU_EVENTQ_PROD);
        q.set_prod(prod_raw);
        let cons_raw = st.r32(regs::SMMU_EVENTQ_CONS);
        q.set_cons(cons_raw);
        if q.is_full() {
            let ovflg = !cons_raw & OVERFLOW_FLAG;
            st.regs32
                .insert(regs::SMMU_EVENTQ_PROD, (prod_raw & !OVERFLOW_FLAG) | ovflg);
            return;
        }
        let pa = (base & crate::bits::mask(51, 5)) + u64::from(q.prod_index()) * 32;
        st.write_ram(pa, &e.to_bytes());
        q.inc_prod();
        st.regs32.insert(
            regs::SMMU_EVENTQ_PROD,
            q.prod() | (prod_raw & OVERFLOW_FLAG),
        );
    }
}

impl FakeState {
    fn r32(&self, off: u64) -> u32 {
        match off {
            regs::SMMU_IDR0 => self.idr0,
            regs::SMMU_IDR1 => self.idr1,
            regs::SMMU_IDR5 => self.idr5,
            _ => self.regs32.get(&off).copied().unwrap_or(0),
        }
    }

    fn ram_range(&self, pa: u64, len: usize) -> core::ops::Range<usize> {
        let start =
            pa.checked_sub(RAM_BASE)
                .unwrap_or_else(|| panic!("fake SMMU: PA {pa:#x} below RAM")) as usize;
        assert!(
            start + len <= self.ram.len(),
            "fake SMMU: PA {pa:#x}+{len} beyond RAM"
        );
        start..start + len
    }

    pub fn read_ram(&self, pa: u64, buf: &mut [u8]) {
        let r = self.ram_range(pa, buf.len());
        buf.copy_from_slice(&self.ram[r]);
    }

    pub fn write_ram(&mut self, pa: u64, data: &[u8]) {
        let r = self.ram_range(pa, data.len());
        self.ram[r].copy_from_slice(data);
    }

    fn cmdq_error_active(&self) -> bool {
        (self.r32(regs::SMMU_GERROR) ^ self.r32(regs::SMMU_GERRORN)) & Gerror::CMDQ_ERR.bits() != 0
    }

    /// Consumes up to `limit` commands between CONS and PROD.
    fn consume(&mut self, limit: usize) {
        if self.r32(regs::SMMU_CR0ACK) & Cr0::CMDQEN.bits() == 0 || self.cmdq_error_active() {
            return;
        }
        let base = self.regs64.get(&regs::SMMU_CMDQ_BASE).copied().unwrap_or(0);
        let mut q = Queue::new((base & 0x1f) as u8);
        q.set_prod(self.r32(regs::SMMU_CMDQ_PROD));
        q.set_cons(self.r32(regs::SMMU_CMDQ_CONS));
        let addr = base & crate::bits::mask(51, 5);
        let mut n = 0;
        while n < limit && !q.is_empty() {
            let mut b = [0u8; 16];
            self.read_ram(addr + u64::from(q.cons_index()) * 16, &mut b);
            let words = Command::words_from_bytes(&b);
            match Command::decode(words) {
                Ok(c) if !self.illegal_opcodes.contains(&c.opcode()) => {
                    if let Command::Sync(s) = c {
                        // CS = SIG_IRQ on an SMMU with IDR0.MSI: the completion's MSI write.
                        if s.cs == crate::cmd::SyncCs::Irq && self.idr0 & (1 << 13) != 0 {
                            self.write_ram(s.msiaddr, &s.msidata.to_le_bytes());
                        }
                    }
                    self.commands.push(c);
                    q.inc_cons();
                    n += 1;
                }
                _ => {
                    // CERROR_ILL; CONS stays on the command (IHI 0070 7.1).
                    self.regs32.insert(regs::SMMU_CMDQ_CONS, q.cons() | 1 << 24);
                    let g = self.r32(regs::SMMU_GERROR) ^ Gerror::CMDQ_ERR.bits();
                    self.regs32.insert(regs::SMMU_GERROR, g);
                    return;
                }
            }
        }
        self.regs32.insert(regs::SMMU_CMDQ_CONS, q.cons());
    }
}

impl SmmuRegs for FakeSmmu {
    fn read32(&self, off: u64) -> u32 {
        let mut st = self.0.borrow_mut();
        if off == regs::SMMU_CMDQ_CONS {
            st.cons_reads += 1;
        }
        if off == regs::SMMU_CMDQ_CONS && !st.consume_on_prod {
            let n = st.consume_per_cons_read;
            st.consume(n);
        }
        st.r32(off)
    }

    fn write32(&self, off: u64, v: u32) {
        let mut st = self.0.borrow_mut();
        match off {
            regs::SMMU_CR0 => {
                st.regs32.insert(off, v);
                if !st.cr0ack_stuck {
                    st.regs32.insert(regs::SMMU_CR0ACK, v);
                }
            }
            regs::SMMU_IRQ_CTRL => {
                st.regs32.insert(off, v);
                st.regs32.insert(regs::SMMU_IRQ_CTRLACK, v);
            }
            regs::SMMU_GBPA => {
                let v = if st.gbpa_stuck {
                    v
                } else {
                    v & !Gbpa::UPDATE.bits()
                };
                st.regs32.insert(off, v);
            }
            regs::SMMU_CMDQ_PROD => {
                st.regs32.insert(off, v);
                st.prod_writes += 1;
                if st.consume_on_prod {
                    st.consume(usize::MAX);
                }
            }
            regs::SMMU_GERRORN => {
                st.regs32.insert(off, v);
                if st.consume_on_prod {
                    st.consume(usize::MAX);
                }
            }
            _ => {
                st.regs32.insert(off, v);
            }
        }
    }

    fn read64(&self, off: u64) -> u64 {
        self.reg64(off)
    }

    fn write64(&self, off: u64, v: u64) {
        self.0.borrow_mut().regs64.insert(off, v);
    }
}

impl DmaMemory for FakeSmmu {
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Result<u64, DriverError> {
        let mut st = self.0.borrow_mut();
        let align = align as u64;
        let pa = st.next_alloc.div_ceil(align) * align;
        let end = pa + size as u64;
        if end > RAM_BASE + RAM_SIZE as u64 {
            return Err(DriverError::OutOfMemory);
        }
        st.next_alloc = end;
        let r = st.ram_range(pa, size);
        st.ram[r].fill(0);
        Ok(pa)
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        self.0.borrow_mut().write_ram(pa, data);
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        self.0.borrow().read_ram(pa, buf);
    }

    type Queue = FakeSmmu;

    fn queue_memory(&self, _pa: u64, _size: usize) -> FakeSmmu {
        self.clone()
    }
}

impl QueueMemory for FakeSmmu {
    fn write_entry(&self, pa: u64, words: [u64; 2]) {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&words[0].to_le_bytes());
        b[8..].copy_from_slice(&words[1].to_le_bytes());
        self.0.borrow_mut().write_ram(pa, &b);
    }

    fn read_entry(&self, pa: u64) -> [u64; 2] {
        let mut b = [0u8; 16];
        self.0.borrow().read_ram(pa, &mut b);
        Command::words_from_bytes(&b)
    }

    fn entry_barrier(&self) {}
}
