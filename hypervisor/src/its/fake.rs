//! A recording fake ITS for host tests: registers that behave as QEMU's (IHI 0069H 12.19 as
//! `hw/intc/arm_gicv3_its.c` implements it), memory with allocation tracking, and a command
//! processor that decodes what the driver wrote into the queue and keeps the resulting Device,
//! Collection and translation state, so tests assert on what the ITS was told rather than on
//! the driver's own bookkeeping.

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use super::cmd::{AnyCommand, Command, VCommand, CMD_SIZE};
use super::regs::*;
use super::{ItsMemory, ItsRegs};

/// GITS_TYPER of QEMU 10.0.2 virt with gic-version=3 (shared notes, read on the machine).
pub const QEMU_TYPER: u64 = 0x0000_001F_0001_EFB1;
/// GITS_TYPER with gic-version=4 (GICv4.0: Virtual, VMOVP).
pub const QEMU_TYPER_V4: u64 = 0x0000_003F_0001_EFB3;

/// Everything the fake ITS and its memory hold, shared by [`FakeRegs`] and [`FakeMem`].
#[derive(Debug)]
pub struct State {
    /// GITS_TYPER.
    pub typer: u64,
    /// GITS_CTLR.Enabled.
    pub enabled: bool,
    /// GITS_BASER<n> as read.
    pub baser: [u64; 8],
    /// GITS_CBASER.
    pub cbaser: u64,
    /// GITS_CWRITER.
    pub cwriter: u64,
    /// GITS_CREADR.
    pub creadr: u64,
    /// Every register write, in order: (offset, value).
    pub writes: Vec<(u64, u64)>,
    /// Every GICv3 command processed, in order.
    pub commands: Vec<Command>,
    /// Every command processed, GICv3 and GICv4 ones, in order.
    pub log: Vec<AnyCommand>,
    /// Mapped vPEs (VMAPP V=1): vPEID -> (RDbase, VPT_addr, VPT_size).
    pub vpes: BTreeMap<u16, (u64, u64, u8)>,
    /// Virtual translations (VMAPTI): (DeviceID, EventID) -> (vPEID, vINTID, doorbell).
    pub vites: BTreeMap<(u32, u32), (u16, u32, u32)>,
    /// vLPIs made pending (INT on a virtual ITE): (vPEID, vINTID).
    pub vlpis_raised: Vec<(u16, u32)>,
    /// Mapped devices: DeviceID -> (ITT PA, MAPD Size).
    pub devices: BTreeMap<u32, (u64, u8)>,
    /// Mapped collections: ICID -> RDbase.
    pub collections: BTreeMap<u16, u64>,
    /// Translations: (DeviceID, EventID) -> (pINTID, ICID).
    pub ites: BTreeMap<(u32, u32), (u32, u16)>,
    /// Commands the fake refused as the real ITS would ignore them (bad ITT alignment, ...).
    pub refused: Vec<Command>,
    /// Page sizes the fake accepts: [64 KiB, 16 KiB, 4 KiB]; another reads back as the
    /// smallest accepted.
    pub page_sizes: [bool; 3],
    /// Reads Shareability back as 0 (Non-shareable) whatever is written.
    pub downgrade_shareability: bool,
    /// GITS_BASER Valid does not stick.
    pub baser_drops_valid: bool,
    /// GITS_CTLR.Quiescent never sets.
    pub never_quiescent: bool,
    /// The queue never advances (CREADR stays).
    pub hang: bool,
    /// Stall on the first command with this number.
    pub stall_on: Option<u8>,
    /// Allocations: PA -> bytes.
    pub memory: BTreeMap<u64, Vec<u8>>,
    /// Allocation requests: (PA, size, align).
    pub allocs: Vec<(u64, usize, usize)>,
    /// Frees: (PA, size, align).
    pub frees: Vec<(u64, usize, usize)>,
    /// Ranges cleaned to the PoC.
    pub cleans: Vec<(u64, usize)>,
    /// Bytes the allocator may still hand out.
    pub memory_left: usize,
    next: u64,
}

impl State {
    fn new(typer: u64) -> Self {
        // QEMU's reset (`gicv3_its_reset_hold`): BASER0 Device, BASER1 Collection, both 8-byte
        // entries and 64 KiB pages; the rest RAZ/WI.
        let mut baser = [0; 8];
        baser[0] = TYPE_DEVICE << BASER_TYPE_SHIFT | 7 << BASER_ESZ_SHIFT | 2 << BASER_PSZ_SHIFT;
        baser[1] =
            TYPE_COLLECTION << BASER_TYPE_SHIFT | 7 << BASER_ESZ_SHIFT | 2 << BASER_PSZ_SHIFT;
        // With Virtual, BASER2 is the vPE table (8-byte entries).
        if typer & 2 != 0 {
            baser[2] = TYPE_VPE << BASER_TYPE_SHIFT | 7 << BASER_ESZ_SHIFT | 2 << BASER_PSZ_SHIFT;
        }
        Self {
            typer,
            enabled: false,
            baser,
            cbaser: 0,
            cwriter: 0,
            creadr: 0,
            writes: Vec::new(),
            commands: Vec::new(),
            log: Vec::new(),
            vpes: BTreeMap::new(),
            vites: BTreeMap::new(),
            vlpis_raised: Vec::new(),
            devices: BTreeMap::new(),
            collections: BTreeMap::new(),
            ites: BTreeMap::new(),
            refused: Vec::new(),
            page_sizes: [true; 3],
            downgrade_shareability: false,
            baser_drops_valid: false,
            never_quiescent: false,
            hang: false,
            stall_on: None,
            memory: BTreeMap::new(),
            allocs: Vec::new(),
            frees: Vec::new(),
            cleans: Vec::new(),
            memory_left: 16 << 20,
            next: 0x4000_0000,
        }
    }

    fn find(&self, pa: u64, len: usize) -> Option<(u64, usize)> {
        let (&base, bytes) = self.memory.range(..=pa).next_back()?;
        let off = (pa - base) as usize;
        (off + len <= bytes.len()).then_some((base, off))
    }

    /// `len` bytes at `pa`; panics (failing the test) outside every allocation: the driver
    /// must never point the ITS at memory it does not own.
    pub fn read_mem(&self, pa: u64, len: usize) -> Vec<u8> {
        let (base, off) = self
            .find(pa, len)
            .unwrap_or_else(|| panic!("read of {pa:#x}+{len:#x} outside every allocation"));
        self.memory[&base][off..off + len].to_vec()
    }

    fn queue_size(&self) -> u64 {
        ((self.cbaser & 0xFF) + 1) * 0x1000
    }

    fn run_queue(&mut self) {
        if self.hang || !self.enabled || self.cbaser & CBASER_VALID == 0 {
            return;
        }
        let size = self.queue_size();
        while self.creadr & CREADR_STALLED == 0 && self.creadr != self.cwriter {
            let pa = (self.cbaser & CBASER_PA_MASK) + self.creadr;
            let Some((base, off)) = self.find(pa, CMD_SIZE) else {
                self.creadr |= CREADR_STALLED;
                return;
            };
            let mut raw = [0u8; CMD_SIZE];
            raw.copy_from_slice(&self.memory[&base][off..off + CMD_SIZE]);
            if Some(raw[0]) == self.stall_on {
                self.creadr |= CREADR_STALLED;
                return;
            }
            match AnyCommand::decode(&raw) {
                // The V commands exist only with GITS_TYPER.Virtual; otherwise unknown ones,
                // which QEMU skips.
                AnyCommand::V(v) if self.typer & 2 != 0 => self.apply_v(v),
                AnyCommand::V(_) => self.refused.push(Command::Unknown(raw[0])),
                AnyCommand::P(c) => {
                    self.apply(c);
                    self.commands.push(c);
                }
            }
            self.log.push(AnyCommand::decode(&raw));
            self.creadr = (self.creadr + CMD_SIZE as u64) % size;
        }
    }

    fn apply(&mut self, c: Command) {
        match c {
            Command::Mapd {
                device,
                size,
                itt,
                valid: true,
            } => {
                let ite = (((self.typer >> 4) & 0xF) + 1) as usize;
                let bytes = (2usize << size) * ite;
                if !itt.is_multiple_of(256) || self.find(itt, bytes).is_none() {
                    self.refused.push(c);
                    return;
                }
                self.devices.insert(device, (itt, size));
            }
            Command::Mapd { device, .. } => {
                self.devices.remove(&device);
                self.ites.retain(|&(d, _), _| d != device);
                self.vites.retain(|&(d, _), _| d != device);
            }
            Command::Mapc {
                icid,
                rdbase,
                valid,
            } => {
                if valid {
                    self.collections.insert(icid, rdbase);
                } else {
                    self.collections.remove(&icid);
                }
            }
            Command::Mapti {
                device,
                event,
                intid,
                icid,
            } => match self.devices.get(&device) {
                Some(&(_, size)) if u64::from(event) < 2u64 << size && intid >= 8192 => {
                    self.ites.insert((device, event), (intid, icid));
                }
                _ => self.refused.push(c),
            },
            // The guard itself removes the translation; only a missing one is refused.
            Command::Discard { device, event }
                if self.ites.remove(&(device, event)).is_none()
                    && self.vites.remove(&(device, event)).is_none() =>
            {
                self.refused.push(c);
            }
            // MOVI on a virtual ITE is rejected (QEMU: VMOVI moves those).
            Command::Movi { device, event, .. } if self.vites.contains_key(&(device, event)) => {
                self.refused.push(c);
            }
            Command::Int { device, event } if self.vites.contains_key(&(device, event)) => {
                let (vpe, vintid, _) = self.vites[&(device, event)];
                self.vlpis_raised.push((vpe, vintid));
            }
            Command::Movi {
                device,
                event,
                icid,
            } => match self.ites.get_mut(&(device, event)) {
                Some(e) => e.1 = icid,
                None => self.refused.push(c),
            },
            Command::Inv { device, event }
            | Command::Int { device, event }
            | Command::Clear { device, event }
                if !self.ites.contains_key(&(device, event))
                    && !self.vites.contains_key(&(device, event)) =>
            {
                self.refused.push(c);
            }
            _ => {}
        }
    }
}

impl State {
    /// A GICv4.0 command, checked as QEMU checks it (`arm_gicv3_its.c`: process_vmapp,
    /// process_vmapti, process_vmovi, process_vmovp), stricter where noted.
    fn apply_v(&mut self, c: VCommand) {
        let vpe_entries = {
            let b = self.baser[2];
            if b & BASER_VALID == 0 {
                0
            } else {
                ((b & BASER_SIZE_MASK) + 1) * 0x1_0000 / 8
            }
        };
        let refuse = |s: &mut Self| s.refused.push(Command::Unknown(c.encode()[0]));
        match c {
            VCommand::Vmapp {
                vpe,
                rdbase,
                vpt,
                vpt_size,
                valid,
            } => {
                if u64::from(vpe) >= vpe_entries
                    || u32::from(vpt_size) > ((self.typer >> 8) & 0x1F) as u32
                {
                    return refuse(self);
                }
                if valid {
                    // Stricter than QEMU: the vPT must be 64 KiB aligned memory the driver owns.
                    if !vpt.is_multiple_of(0x1_0000) || self.find(vpt, 0x2000).is_none() {
                        return refuse(self);
                    }
                    self.vpes.insert(vpe, (rdbase, vpt, vpt_size));
                } else {
                    self.vpes.remove(&vpe);
                }
            }
            VCommand::Vmapti {
                device,
                event,
                vpe,
                vintid,
                doorbell,
            } => match self.devices.get(&device) {
                // Stricter than QEMU: the vPE must be mapped.
                Some(&(_, size))
                    if u64::from(event) < 2u64 << size
                        && self.vpes.contains_key(&vpe)
                        && vintid >= 8192
                        && (doorbell == 1023 || doorbell >= 8192) =>
                {
                    self.ites.remove(&(device, event));
                    self.vites.insert((device, event), (vpe, vintid, doorbell));
                }
                _ => refuse(self),
            },
            VCommand::Vmovi {
                device,
                event,
                vpe,
                doorbell,
            } => {
                let mapped = self.vpes.contains_key(&vpe);
                match self.vites.get_mut(&(device, event)) {
                    Some(e) if mapped => {
                        e.0 = vpe;
                        if let Some(d) = doorbell {
                            e.2 = d;
                        }
                    }
                    _ => refuse(self),
                }
            }
            VCommand::Vmovp { vpe, rdbase } => match self.vpes.get_mut(&vpe) {
                Some(e) => e.0 = rdbase,
                None => refuse(self),
            },
            VCommand::Vsync { vpe } | VCommand::Vinvall { vpe } => {
                if !self.vpes.contains_key(&vpe) {
                    refuse(self);
                }
            }
        }
    }
}

/// The register port of the fake.
#[derive(Debug, Clone)]
pub struct FakeRegs(pub Rc<RefCell<State>>);
/// The memory port of the fake.
#[derive(Debug, Clone)]
pub struct FakeMem(pub Rc<RefCell<State>>);

/// A fake ITS with GITS_TYPER `typer`: its two ports and the shared state.
pub fn new(typer: u64) -> (FakeRegs, FakeMem, Rc<RefCell<State>>) {
    let s = Rc::new(RefCell::new(State::new(typer)));
    (FakeRegs(s.clone()), FakeMem(s.clone()), s)
}

impl ItsRegs for FakeRegs {
    fn read32(&self, offset: u64) -> u32 {
        let s = self.0.borrow();
        match offset {
            GITS_CTLR => {
                let quiescent = !s.enabled && !s.never_quiescent;
                u32::from(s.enabled) | if quiescent { CTLR_QUIESCENT } else { 0 }
            }
            _ => 0,
        }
    }

    fn write32(&mut self, offset: u64, value: u32) {
        let mut s = self.0.borrow_mut();
        s.writes.push((offset, u64::from(value)));
        if offset == GITS_CTLR {
            s.enabled = value & CTLR_ENABLED != 0;
            s.run_queue();
        }
    }

    fn read64(&self, offset: u64) -> u64 {
        let s = self.0.borrow();
        match offset {
            GITS_TYPER => s.typer,
            GITS_CBASER => s.cbaser,
            GITS_CWRITER => s.cwriter,
            GITS_CREADR => s.creadr,
            o if (GITS_BASER..GITS_BASER + 64).contains(&o) => {
                s.baser[((o - GITS_BASER) / 8) as usize]
            }
            _ => 0,
        }
    }

    fn write64(&mut self, offset: u64, value: u64) {
        let mut s = self.0.borrow_mut();
        s.writes.push((offset, value));
        match offset {
            GITS_CBASER if !s.enabled => {
                let mut v = value;
                if s.downgrade_shareability {
                    v &= !SHARE_MASK;
                }
                s.cbaser = v;
                s.creadr = 0;
            }
            GITS_CWRITER => {
                s.cwriter = value & QUEUE_OFFSET_MASK;
                s.run_queue();
            }
            o if (GITS_BASER..GITS_BASER + 64).contains(&o) && !s.enabled => {
                let n = ((o - GITS_BASER) / 8) as usize;
                let old = s.baser[n];
                if old == 0 {
                    return; // RAZ/WI
                }
                let ro = (7 << BASER_TYPE_SHIFT) | (0x1F << BASER_ESZ_SHIFT);
                let mut v = (value & !ro) | (old & ro);
                let psz = (v >> BASER_PSZ_SHIFT) & 3;
                if psz > 2 || !s.page_sizes[2 - psz as usize] {
                    // An unsupported page size reads back as another (IHI 0069H 12.19.1).
                    let other = (0..3u64)
                        .find(|&e| s.page_sizes[2 - e as usize])
                        .unwrap_or(0);
                    v = (v & !(3 << BASER_PSZ_SHIFT)) | other << BASER_PSZ_SHIFT;
                }
                if s.downgrade_shareability {
                    v &= !SHARE_MASK;
                }
                if s.baser_drops_valid {
                    v &= !BASER_VALID;
                }
                s.baser[n] = v;
            }
            _ => {}
        }
    }
}

impl ItsMemory for FakeMem {
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Option<u64> {
        let mut s = self.0.borrow_mut();
        assert!(align.is_power_of_two() && size > 0);
        if size > s.memory_left {
            return None;
        }
        s.memory_left -= size;
        let pa = s.next.next_multiple_of(align as u64);
        s.next = pa + size as u64;
        s.memory.insert(pa, vec![0; size]);
        s.allocs.push((pa, size, align));
        Some(pa)
    }

    fn free(&mut self, pa: u64, size: usize, align: usize) {
        let mut s = self.0.borrow_mut();
        let bytes = s
            .memory
            .remove(&pa)
            .unwrap_or_else(|| panic!("free of {pa:#x}, not an allocation"));
        assert_eq!(bytes.len(), size, "free of {pa:#x} with another size");
        s.memory_left += size;
        s.frees.push((pa, size, align));
    }

    fn write(&mut self, pa: u64, data: &[u8]) {
        let mut s = self.0.borrow_mut();
        let (base, off) = s.find(pa, data.len()).unwrap_or_else(|| {
            panic!(
                "write of {pa:#x}+{:#x} outside every allocation",
                data.len()
            )
        });
        if let Some(m) = s.memory.get_mut(&base) {
            m[off..off + data.len()].copy_from_slice(data);
        }
    }

    fn read(&self, pa: u64, buf: &mut [u8]) {
        let v = self.0.borrow().read_mem(pa, buf.len());
        buf.copy_from_slice(&v);
    }

    fn clean(&mut self, pa: u64, len: usize) {
        self.0.borrow_mut().cleans.push((pa, len));
    }
}
