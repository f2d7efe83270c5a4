//! List-register scheduling (Arm IHI 0069, 11.2 and 12.5): which of a vCPU's pending virtual
//! interrupts go into this CPU's ICH_LR<n>_EL2 before it enters the guest, in what order, and
//! when to ask for an underflow maintenance interrupt to come back for the rest.
//!
//! [`Lrs`] also remembers what the list registers and ICH_HCR_EL2 hold, so an exit reads only the
//! list registers that can be in use and writes ICH_HCR_EL2 only when it changes. On hardware that
//! saves a few system-register accesses per exit; under QEMU's TCG every ICH_* access takes its
//! global lock (ARM_CP_IO), which all vCPUs of all VMs share.

use crate::devices::vgic::lr::{ListRegister, LrState};
use crate::devices::vgic::{is_lpi, VGic};
use crate::hw::{Hw, IntId};
use aarch64_cpu::registers::ICH_HCR_EL2;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// ICH_HCR_EL2.En: the virtual CPU interface is on.
pub const ICH_HCR_EN: u64 = ICH_HCR_EL2::En::SET.value;
/// ICH_HCR_EL2.UIE: maintenance interrupt when at most one list register is valid.
pub const ICH_HCR_UIE: u64 = ICH_HCR_EL2::UIE::SET.value;
/// List registers the architecture allows (ICH_VTR_EL2.ListRegs is 4 bits).
pub const MAX_LRS: usize = 16;

/// One physical CPU's list registers as last written. Only that CPU touches its own (so
/// `Relaxed` suffices; atomics only make it a `static`).
#[derive(Debug)]
pub struct Lrs {
    /// Implemented list registers, 0 until read.
    n: AtomicUsize,
    /// List registers that may hold a non-zero value (the others hold 0).
    used: AtomicU32,
    /// ICH_HCR_EL2 as last written; `u64::MAX` when unknown.
    hcr: AtomicU64,
}

impl Default for Lrs {
    fn default() -> Self {
        Self::new()
    }
}

impl Lrs {
    /// Nothing known yet: the first use reads the hardware.
    pub const fn new() -> Self {
        Self {
            n: AtomicUsize::new(0),
            used: AtomicU32::new(u32::MAX),
            hcr: AtomicU64::new(u64::MAX),
        }
    }

    /// Implemented list registers.
    pub fn count(&self, hw: &impl Hw) -> usize {
        match self.n.load(Ordering::Relaxed) {
            0 => {
                let n = hw.lr_count().min(MAX_LRS);
                self.n.store(n, Ordering::Relaxed);
                n
            }
            n => n,
        }
    }

    /// List register `i`: 0 without reading it when it is known to be.
    pub fn read(&self, hw: &impl Hw, i: usize) -> ListRegister {
        if self.used.load(Ordering::Relaxed) & (1 << i) == 0 {
            ListRegister(0)
        } else {
            ListRegister(hw.read_lr(i))
        }
    }

    /// Writes list register `i`.
    pub fn write(&self, hw: &impl Hw, i: usize, v: ListRegister) {
        hw.write_lr(i, v.0);
        if v.0 == 0 {
            self.used.fetch_and(!(1 << i), Ordering::Relaxed);
        } else {
            self.used.fetch_or(1 << i, Ordering::Relaxed);
        }
    }

    /// Empties every list register.
    pub fn clear_all(&self, hw: &impl Hw) {
        for i in 0..self.count(hw) {
            hw.write_lr(i, 0);
        }
        self.used.store(0, Ordering::Relaxed);
    }

    /// Writes ICH_HCR_EL2 unless it already holds `v` (the hardware changes only its EOIcount,
    /// which nothing here enables a maintenance interrupt for).
    pub fn set_hcr(&self, hw: &impl Hw, v: u64) {
        if self.hcr.swap(v, Ordering::Relaxed) != v {
            hw.write_ich_hcr(v);
        }
    }

    /// ICH_HCR_EL2.
    pub fn hcr(&self, hw: &impl Hw) -> u64 {
        match self.hcr.load(Ordering::Relaxed) {
            u64::MAX => hw.read_ich_hcr(),
            v => v,
        }
    }
}

/// Forwarded interrupts one CPU can hold at once: each stays active until its guest deactivates
/// it, so one per forwarded source (timer + a few devices' lines) suffices.
/// A VM's vGIC behind its lock, with a generation that every change moves on: each
/// [`VgicLock::lock`] guard moves it when it is dropped, that is after whatever its holder did.
/// A vCPU's exit that finds the generation where its last [`fill`] left it (and nothing else
/// new, [`FillState`]) knows the vGIC has nothing new for it and skips the list-register work.
#[derive(Debug)]
pub struct VgicLock {
    inner: spin::Mutex<VGic>,
    generation: AtomicU64,
}

/// A held [`VgicLock`]; dropping it moves the generation on.
#[derive(Debug)]
pub struct VgicGuard<'a> {
    guard: spin::MutexGuard<'a, VGic>,
    generation: &'a AtomicU64,
}

impl VgicLock {
    pub fn new(vgic: VGic) -> Self {
        Self {
            inner: spin::Mutex::new(vgic),
            generation: AtomicU64::new(0),
        }
    }

    /// The vGIC, for any use: the generation moves on when the guard goes.
    pub fn lock(&self) -> VgicGuard<'_> {
        VgicGuard {
            guard: self.inner.lock(),
            generation: &self.generation,
        }
    }

    /// The vGIC for a vCPU's own [`fill`] or a look at its own state: what that changes is the
    /// caller's vCPU's alone, which no other vCPU needs to notice.
    pub fn lock_own(&self) -> spin::MutexGuard<'_, VGic> {
        self.inner.lock()
    }

    /// The generation now.
    pub fn generation(&self) -> u64 {
        // Acquire (pairs with the guard's Release): what a holder did before its bump is seen
        // by a vCPU that sees the bump.
        self.generation.load(Ordering::Acquire)
    }
}

impl core::ops::Deref for VgicGuard<'_> {
    type Target = VGic;
    fn deref(&self) -> &VGic {
        &self.guard
    }
}

impl core::ops::DerefMut for VgicGuard<'_> {
    fn deref_mut(&mut self) -> &mut VGic {
        &mut self.guard
    }
}

impl Drop for VgicGuard<'_> {
    fn drop(&mut self) {
        // Release, while still holding the lock: the changes before the bump.
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// What this CPU's last [`fill`] for its vCPU saw, to skip the next one when nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillState {
    /// The vGIC's generation the fill read before it ran; `None`: none since the vCPU's entry.
    generation: Option<u64>,
    /// The UART level it saw.
    uart: Option<IntId>,
    /// It left interrupts behind for want of a list register (underflow maintenance asked).
    left_some: bool,
}

impl Default for FillState {
    fn default() -> Self {
        Self::new()
    }
}

impl FillState {
    /// No fill yet (a vCPU entry, a reset): the next one must run.
    pub const fn new() -> Self {
        Self {
            generation: None,
            uart: None,
            left_some: false,
        }
    }

    /// Whether a synchronous exit (an interrupt exit always fills: a maintenance interrupt or a
    /// completed level interrupt needs it) must fill the list registers: the vGIC moved on since
    /// the last fill, a hardware interrupt waits, the UART's line is or was high (the filler
    /// re-latches it on every fill while it is, whatever trigger the guest gave it), or the last
    /// fill left interrupts waiting for a free list register.
    pub fn needed(&self, generation: u64, pending: &HwPending, uart: Option<IntId>) -> bool {
        self.generation != Some(generation)
            || pending.any()
            || uart.is_some()
            || self.uart.is_some()
            || self.left_some
    }

    /// Records a fill that started at `generation` and saw `uart`.
    pub fn filled(&mut self, generation: u64, uart: Option<IntId>, left_some: bool) {
        *self = Self {
            generation: Some(generation),
            uart,
            left_some,
        };
    }
}

pub const MAX_HW_PENDING: usize = 8;

/// Hardware interrupts (the virtual timer, assigned devices' INTx) taken at EL2 for the vCPU on
/// this CPU, priority dropped but still active, not yet in a list register.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HwPending {
    slots: [Option<IntId>; MAX_HW_PENDING],
}

impl HwPending {
    /// None held.
    pub const fn new() -> Self {
        Self {
            slots: [None; MAX_HW_PENDING],
        }
    }

    /// Holds `intid` until it gets a list register; `false` when there is no room (the caller
    /// deactivates it: its source raises it again). An LPI is always refused: it has no active
    /// state to link, and a HW list register's pINTID cannot name one (QEMU keeps 10 bits of
    /// it, `icv_deactivate_irq` deactivates only pINTIDs below 1020).
    pub fn push(&mut self, intid: IntId) -> bool {
        if is_lpi(intid) {
            return false;
        }
        if self.slots.contains(&Some(intid)) {
            return true;
        }
        match self.slots.iter_mut().find(|s| s.is_none()) {
            Some(slot) => {
                *slot = Some(intid);
                true
            }
            None => false,
        }
    }

    /// Whether any is held.
    pub fn any(&self) -> bool {
        self.slots.iter().any(Option::is_some)
    }

    /// Takes every one held.
    pub fn take_all(&mut self) -> impl Iterator<Item = IntId> {
        core::mem::take(&mut self.slots).into_iter().flatten()
    }
}

/// Fills this CPU's free list registers for `vcpu`: first the forwarded hardware interrupts it
/// holds (`pending`; SPIs of assigned devices go to the vCPU on this CPU whatever the guest's
/// routing says, since the physical SPI is routed here), then `uart_level` (the emulated UART's
/// INTID while its line is high), then the vGIC's latched interrupts by priority. Asks for an
/// underflow maintenance interrupt when some remain. Returns whether some remain (in the vGIC
/// or `pending`) for want of a free list register, or latched behind their own entry: the next
/// exit must not skip its fill ([`FillState`]).
pub fn fill(
    hw: &impl Hw,
    lrs: &Lrs,
    pending: &mut HwPending,
    vgic: &mut VGic,
    vcpu: usize,
    uart_level: Option<IntId>,
) -> bool {
    let n = lrs.count(hw);
    let mut in_flight = [IntId(u32::MAX); MAX_LRS];
    let mut free = [0usize; MAX_LRS];
    let mut nfree = 0;
    for (i, slot) in in_flight.iter_mut().enumerate().take(n) {
        let lr = lrs.read(hw, i);
        if lr.state() == LrState::Invalid {
            free[nfree] = i;
            nfree += 1;
            if lr.0 != 0 {
                // A completed entry that asked for an EOI maintenance interrupt keeps
                // ICH_EISR_EL2 (and so the maintenance interrupt) asserted until it is cleared.
                lrs.write(hw, i, ListRegister(0));
            }
        } else {
            *slot = IntId(lr.vintid());
            if lr.state() == LrState::Pending && is_lpi(*slot) {
                // The guest has not taken it yet: an LPI raised again meanwhile merges with it,
                // as a second MSI merges into a pending LPI on real hardware.
                vgic.clear_pending(vcpu, *slot);
            }
        }
    }
    let mut free = free[..nfree].iter().copied();

    for slot in pending.slots.iter_mut() {
        let Some(pintid) = *slot else { continue };
        if vgic.is_enabled(vcpu, pintid) {
            if let Some(i) = free.next() {
                let lr = ListRegister::hardware(
                    pintid.0,
                    pintid.0,
                    vgic.priority(vcpu, pintid),
                    vgic.group1(vcpu, pintid),
                );
                lrs.write(hw, i, lr);
                in_flight[i] = pintid;
                *slot = None;
            }
        } else {
            // The guest disabled it meanwhile: give the physical interrupt back.
            hw.deactivate(pintid);
            *slot = None;
        }
    }

    if let Some(uart) = uart_level {
        if vgic.spi_target(uart) == vcpu && !in_flight.contains(&uart) {
            vgic.set_pending(vcpu, uart);
        }
    }

    let mut more = false;
    while let Some((intid, prio)) = vgic.pop_deliverable(vcpu, &in_flight[..n]) {
        let Some(i) = free.next() else {
            vgic.set_pending(vcpu, intid);
            more = true;
            break;
        };
        // A level line asks for EOI maintenance to be re-sampled. An LPI never does: it is
        // edge-like with no active state to track (IHI 0069H chapter 5), so once the guest EOIs
        // it the entry reads invalid and the next `fill` frees it like any other.
        let level = !is_lpi(intid) && !vgic.is_edge(vcpu, intid);
        let lr = ListRegister::software(intid.0, prio, vgic.group1(vcpu, intid), level);
        lrs.write(hw, i, lr);
        in_flight[i] = intid;
    }
    lrs.set_hcr(
        hw,
        if more {
            ICH_HCR_EN | ICH_HCR_UIE
        } else {
            ICH_HCR_EN
        },
    );
    // Latched again while in a list register (an edge raised while active): deliverable once
    // the guest deactivates it, which it does without an exit, so the next exit must look.
    let latched = !more
        && match vgic.pop_deliverable(vcpu, &[]) {
            Some((intid, _)) => {
                vgic.set_pending(vcpu, intid);
                true
            }
            None => false,
        };
    more || latched || pending.any()
}

/// Clears the conditions of the GIC maintenance interrupt (IHI 0069, 12.5.9 ICH_MISR_EL2):
/// completed entries that asked for EOI maintenance, and the underflow request. The list
/// registers are refilled by [`fill`] before the guest runs again.
pub fn service_maintenance(hw: &impl Hw, lrs: &Lrs) {
    for i in 0..lrs.count(hw) {
        let lr = lrs.read(hw, i);
        if lr.state() == LrState::Invalid && lr.0 != 0 {
            lrs.write(hw, i, ListRegister(0));
        }
    }
    lrs.set_hcr(hw, lrs.hcr(hw) & !ICH_HCR_UIE);
}

/// Whether a virtual interrupt waits for `vcpu` (in a list register, held, or deliverable by
/// its vGIC): a WFI or CPU_SUSPEND must not sleep then. A deliverable one stays pending.
pub fn has_pending(
    hw: &impl Hw,
    lrs: &Lrs,
    pending: &HwPending,
    vgic: &mut VGic,
    vcpu: usize,
) -> bool {
    for i in 0..lrs.count(hw) {
        if matches!(
            lrs.read(hw, i).state(),
            LrState::Pending | LrState::PendingActive
        ) {
            return true;
        }
    }
    if pending.any() {
        return true;
    }
    if let Some((intid, _)) = vgic.pop_deliverable(vcpu, &[]) {
        vgic.set_pending(vcpu, intid);
        return true;
    }
    false
}

#[cfg(test)]
mod tests;
