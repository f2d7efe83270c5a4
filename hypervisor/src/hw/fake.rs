//! A fake machine for host tests of the control plane: list registers and ICH_HCR_EL2 as plain
//! values, a counter that advances by a fixed step on every read (so a bounded wait ends), and a
//! log of every other operation in the order it was asked for.

use super::{Hw, IntId, Ipa};
use alloc::vec::Vec;
use spin::Mutex;

/// One recorded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HwOp {
    /// [`Hw::enable_spi`].
    EnableSpi(IntId, usize),
    /// [`Hw::disable_spi`].
    DisableSpi(IntId),
    /// [`Hw::set_ppi_enabled`].
    SetPpi(usize, IntId, bool),
    /// [`Hw::clear_ppi_active`].
    ClearPpiActive(usize, IntId),
    /// [`Hw::deactivate`].
    Deactivate(IntId),
    /// [`Hw::kick`].
    Kick(usize),
    /// [`Hw::wake_all`].
    WakeAll,
    /// [`Hw::tlbi_vm`].
    TlbiVm(u64),
    /// [`Hw::smmu_tlbi_vmid`].
    SmmuTlbi(u16),
    /// [`Hw::stage2_published`].
    Stage2Published,
}

#[derive(Debug)]
struct State {
    cpu: usize,
    lrs: Vec<u64>,
    lr_reads: usize,
    lr_writes: usize,
    hcr: u64,
    hcr_writes: usize,
    counter: u64,
    log_vm: Option<usize>,
    ops: Vec<HwOp>,
}

/// The fake machine.
#[derive(Debug)]
pub struct FakeHw {
    state: Mutex<State>,
    /// Counter ticks added by each [`Hw::counter`] read.
    pub tick: u64,
    /// [`Hw::counter_freq`].
    pub freq: u64,
}

impl FakeHw {
    /// A CPU `cpu` with `lrs` list registers, all zero.
    pub fn new(cpu: usize, lrs: usize) -> Self {
        Self {
            state: Mutex::new(State {
                cpu,
                lrs: alloc::vec![0; lrs],
                lr_reads: 0,
                lr_writes: 0,
                hcr: 0,
                hcr_writes: 0,
                counter: 0,
                log_vm: None,
                ops: Vec::new(),
            }),
            tick: 1,
            freq: 1_000_000,
        }
    }

    /// The list registers as they are.
    pub fn lrs(&self) -> Vec<u64> {
        self.state.lock().lrs.clone()
    }

    /// Sets list register `i` as the hardware would (the guest's EOI changes its state).
    pub fn set_lr(&self, i: usize, v: u64) {
        self.state.lock().lrs[i] = v;
    }

    /// ICH_HCR_EL2 as last written.
    pub fn hcr(&self) -> u64 {
        self.state.lock().hcr
    }

    /// (list-register reads, list-register writes, ICH_HCR_EL2 writes) so far.
    pub fn sysreg_accesses(&self) -> (usize, usize, usize) {
        let s = self.state.lock();
        (s.lr_reads, s.lr_writes, s.hcr_writes)
    }

    /// Every other operation so far, and forgets them.
    pub fn take_ops(&self) -> Vec<HwOp> {
        core::mem::take(&mut self.state.lock().ops)
    }

    /// Makes the calling CPU `cpu`.
    pub fn set_cpu(&self, cpu: usize) {
        self.state.lock().cpu = cpu;
    }

    fn op(&self, op: HwOp) {
        self.state.lock().ops.push(op);
    }
}

impl Hw for FakeHw {
    fn this_cpu(&self) -> usize {
        self.state.lock().cpu
    }
    fn enable_spi(&self, intid: IntId, pcpu: usize) {
        self.op(HwOp::EnableSpi(intid, pcpu));
    }
    fn disable_spi(&self, intid: IntId) {
        self.op(HwOp::DisableSpi(intid));
    }
    fn set_ppi_enabled(&self, pcpu: usize, intid: IntId, enabled: bool) {
        self.op(HwOp::SetPpi(pcpu, intid, enabled));
    }
    fn clear_ppi_active(&self, pcpu: usize, intid: IntId) {
        self.op(HwOp::ClearPpiActive(pcpu, intid));
    }
    fn deactivate(&self, intid: IntId) {
        self.op(HwOp::Deactivate(intid));
    }
    fn kick(&self, pcpu: usize) {
        self.op(HwOp::Kick(pcpu));
    }
    fn wake_all(&self) {
        self.op(HwOp::WakeAll);
    }
    fn lr_count(&self) -> usize {
        self.state.lock().lrs.len()
    }
    fn read_lr(&self, i: usize) -> u64 {
        let mut s = self.state.lock();
        s.lr_reads += 1;
        s.lrs[i]
    }
    fn write_lr(&self, i: usize, value: u64) {
        let mut s = self.state.lock();
        s.lr_writes += 1;
        s.lrs[i] = value;
    }
    fn read_ich_hcr(&self) -> u64 {
        self.state.lock().hcr
    }
    fn write_ich_hcr(&self, value: u64) {
        let mut s = self.state.lock();
        s.hcr_writes += 1;
        s.hcr = value;
    }
    fn tlbi_vm(&self, vttbr: u64) {
        self.op(HwOp::TlbiVm(vttbr));
    }
    fn smmu_tlbi_vmid(&self, vmid: u16) {
        self.op(HwOp::SmmuTlbi(vmid));
    }
    fn stage2_published(&self) {
        self.op(HwOp::Stage2Published);
    }
    fn log_context(&self, vm: Option<usize>) -> Option<usize> {
        core::mem::replace(&mut self.state.lock().log_vm, vm)
    }
    fn counter(&self) -> u64 {
        let mut s = self.state.lock();
        s.counter += self.tick;
        s.counter
    }
    fn counter_freq(&self) -> u64 {
        self.freq
    }
}

/// Guest RAM backed by a buffer.
#[derive(Debug)]
pub struct FakeRam {
    base: u64,
    bytes: Mutex<Vec<u8>>,
    scrub: super::scrub::Scrub,
    zeroes: Mutex<Vec<(u64, u64)>>,
}

impl FakeRam {
    /// `size` zeroed bytes seen at IPA `base` (every block counts as zeroed).
    pub fn new(base: u64, size: usize) -> Self {
        Self::with(base, alloc::vec![0; size], true)
    }

    /// `size` bytes of `byte` at IPA `base`, every block stale: RAM as firmware or an earlier
    /// user left it.
    pub fn stale(base: u64, size: usize, byte: u8) -> Self {
        Self::with(base, alloc::vec![byte; size], false)
    }

    fn with(base: u64, bytes: Vec<u8>, zeroed: bool) -> Self {
        let ram = crate::platform::MemRange {
            base,
            size: bytes.len() as u64,
        };
        Self {
            base,
            bytes: Mutex::new(bytes),
            scrub: super::scrub::Scrub::new(ram, zeroed),
            zeroes: Mutex::new(Vec::new()),
        }
    }

    /// Fills it with `byte` (to see what zeroing clears).
    pub fn fill(&self, byte: u8) {
        self.bytes.lock().fill(byte);
    }

    /// The bytes at `ipa`, whatever the blocks' state (what the machine holds, not what the
    /// accessor would let through).
    pub fn peek(&self, ipa: Ipa, len: usize) -> Vec<u8> {
        let r = self.span(ipa, len).expect("inside the fake RAM");
        self.bytes.lock()[r].to_vec()
    }

    /// Every range [`super::GuestRam::zero`] zeroed, (IPA, length), in order.
    pub fn zeroed_ranges(&self) -> Vec<(u64, u64)> {
        self.zeroes.lock().clone()
    }

    fn span(&self, ipa: Ipa, len: usize) -> Result<core::ops::Range<usize>, super::OutOfRam> {
        let size = self.bytes.lock().len() as u64;
        let err = super::OutOfRam {
            ipa,
            len: len as u64,
        };
        let off = ipa.offset_from(Ipa(self.base)).ok_or(err)?;
        let end = off.checked_add(len as u64).ok_or(err)?;
        if end > size {
            return Err(err);
        }
        Ok(off as usize..end as usize)
    }
}

impl super::GuestRam for FakeRam {
    fn ipa_range(&self) -> crate::platform::MemRange {
        crate::platform::MemRange {
            base: self.base,
            size: self.bytes.lock().len() as u64,
        }
    }
    fn read(&self, ipa: Ipa, buf: &mut [u8]) -> Result<(), super::OutOfRam> {
        let r = self.span(ipa, buf.len())?;
        self.ensure_zeroed(ipa, buf.len() as u64, super::scrub::By::Access)?;
        buf.copy_from_slice(&self.bytes.lock()[r]);
        Ok(())
    }
    fn write(&self, ipa: Ipa, data: &[u8]) -> Result<(), super::OutOfRam> {
        let r = self.span(ipa, data.len())?;
        self.ensure_zeroed(ipa, data.len() as u64, super::scrub::By::Access)?;
        self.bytes.lock()[r].copy_from_slice(data);
        Ok(())
    }
    fn scrub(&self) -> &super::scrub::Scrub {
        &self.scrub
    }
    fn zero(&self, ipa: Ipa, len: u64) -> Result<super::ZeroTime, super::OutOfRam> {
        let r = self.span(ipa, len as usize)?;
        self.bytes.lock()[r].fill(0);
        self.zeroes.lock().push((ipa.get(), len));
        Ok(super::ZeroTime {
            zero: len / 4096,
            clean: 1,
            zva_block: Some(64),
        })
    }
}

/// A shared [`FakeRam`]: the test keeps a handle to look at what the machine holds.
impl super::GuestRam for alloc::sync::Arc<FakeRam> {
    fn ipa_range(&self) -> crate::platform::MemRange {
        (**self).ipa_range()
    }
    fn read(&self, ipa: Ipa, buf: &mut [u8]) -> Result<(), super::OutOfRam> {
        (**self).read(ipa, buf)
    }
    fn write(&self, ipa: Ipa, data: &[u8]) -> Result<(), super::OutOfRam> {
        (**self).write(ipa, data)
    }
    fn scrub(&self) -> &super::scrub::Scrub {
        (**self).scrub()
    }
    fn zero(&self, ipa: Ipa, len: u64) -> Result<super::ZeroTime, super::OutOfRam> {
        (**self).zero(ipa, len)
    }
}
