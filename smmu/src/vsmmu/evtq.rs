//! Event forwarding and global errors: physical events of the VM's streams that its stage 1
//! caused are recorded in the guest's event queue (IHI 0070 7.3, 7.4); global errors are raised
//! in GERROR and signalled by wire or MSI (IHI 0070 7.5, 6.3.18).

use super::regfile::MSI_ADDR;
use super::{EventFate, Forward, GuestMemory, Irqs, Vsmmu, EVENTQS};
use crate::bits;
use crate::event::{Event, EventClass, EventKind};
use crate::queue::{overflow_pending, Queue, OVERFLOW_FLAG};
use crate::regs::{Cr0, Gerror, IrqCtrl};

impl Vsmmu {
    pub(super) fn eventq(&self) -> (u64, Queue) {
        let log2 = ((self.r.eventq_base & 0x1f) as u8).min(EVENTQS);
        let mut q = Queue::new(log2);
        q.set_prod(self.r.eventq_prod);
        q.set_cons(self.r.eventq_cons);
        (self.r.eventq_base & bits::mask(51, 5), q)
    }

    /// Activates a global error (GERROR bit made to differ from GERRORN) and signals it.
    pub(super) fn raise_gerror(&mut self, bit: Gerror, mem: &mut impl GuestMemory) -> Irqs {
        if (self.r.gerror ^ self.r.gerrorn) & bit.bits() != 0 {
            // Already active: not raised again until acknowledged.
            return Irqs::empty();
        }
        self.r.gerror ^= bit.bits();
        if self.r.irq_ctrl & IrqCtrl::GERROR_IRQEN.bits() == 0 {
            return Irqs::empty();
        }
        if self.r.gerror_irq_cfg0 & MSI_ADDR != 0 {
            let (addr, data) = (self.r.gerror_irq_cfg0, self.r.gerror_irq_cfg1);
            if mem.write(addr, &data.to_le_bytes()).is_err() {
                // Recorded, but not signalled again through the MSI that failed.
                if (self.r.gerror ^ self.r.gerrorn) & Gerror::MSI_GERROR_ABT_ERR.bits() == 0 {
                    self.r.gerror ^= Gerror::MSI_GERROR_ABT_ERR.bits();
                }
            }
            return Irqs::empty();
        }
        Irqs::GERROR
    }

    /// Offers a physical event to the guest: events of the VM's streams that its stage-1
    /// configuration caused are written into its event queue with the virtual StreamID; stage-2
    /// faults on the data address are the hypervisor's. A fault of the stage-2 walk while
    /// fetching the guest's CD or stage-1 tables is, for a stage-1-only SMMU, an external abort
    /// on that fetch: F_CD_FETCH or F_WALK_EABT.
    ///
    /// `fate` is what the physical event queue's per-stream budget made of the record
    /// ([`crate::driver::Smmu::poll_events`]): a suppressed one is only counted; the one that
    /// put its stream in quarantine is forwarded like any, and stands for the records the
    /// cool-down suppresses (the device's DMA meanwhile aborts without a record, as through an
    /// aborting STE). The guest's SMMU has no stalls (its IDR0.STALL_MODEL is 0b01), so what
    /// it gets has Stall = 0 and no STAG; the physical driver terminated the stall.
    pub fn forward_event(
        &mut self,
        e: &Event,
        fate: EventFate,
        mem: &mut impl GuestMemory,
    ) -> (Forward, Irqs) {
        let Some(s) = self.streams.iter().find(|s| s.map.psid == e.stream_id) else {
            return (Forward::Hypervisor, Irqs::empty());
        };
        match fate {
            EventFate::Deliver => {}
            EventFate::Quarantined => self.stats.evt_quarantined += 1,
            EventFate::Suppressed => {
                self.stats.evt_suppressed += 1;
                return (Forward::Suppressed, Irqs::empty());
            }
        }
        let vsid = s.map.vsid;
        let guest = match e.kind {
            EventKind::CBadSte => s.bad.map(|kind| Event::new(kind, vsid)),
            EventKind::FTranslation
            | EventKind::FAddrSize
            | EventKind::FAccess
            | EventKind::FPermission
            | EventKind::FWalkEabt
            | EventKind::FCdFetch
            | EventKind::CBadCd
            | EventKind::CBadSubstreamid
            | EventKind::FTlbConflict => {
                if e.s2 {
                    match e.class {
                        EventClass::Cd => {
                            let mut g = Event::new(EventKind::FCdFetch, vsid);
                            g.addr2 = e.addr2;
                            Some(g)
                        }
                        EventClass::Tt => {
                            let mut g = Event::new(EventKind::FWalkEabt, vsid);
                            g.input_addr = e.input_addr;
                            g.rnw = e.rnw;
                            g.pnu = e.pnu;
                            g.ind = e.ind;
                            Some(g)
                        }
                        _ => None,
                    }
                } else {
                    let mut g = *e;
                    g.stream_id = vsid;
                    g.s2 = false;
                    g.nsipa = false;
                    g.addr2 = 0;
                    g.stall = false;
                    g.stag = 0;
                    Some(g)
                }
            }
            _ => None,
        };
        let Some(g) = guest else {
            if e.s2 {
                self.stats.s2_faults += 1;
            }
            return (Forward::Hypervisor, Irqs::empty());
        };
        match self.push_event(&g, mem) {
            (true, irqs) => (Forward::Guest(g), irqs),
            (false, irqs) => (Forward::Dropped(g), irqs),
        }
    }

    /// Records an event in the guest's event queue (IHI 0070 7.4): not at all while it is
    /// disabled; when it is full, the event is lost and EVENTQ_PROD.OVFLG toggled (once until
    /// the guest acknowledges). Returns whether the event was recorded, and the interrupts to
    /// raise (the event queue's, or GERROR's when writing the record or its MSI aborted).
    pub(super) fn push_event(&mut self, e: &Event, mem: &mut impl GuestMemory) -> (bool, Irqs) {
        if !self.cr0().contains(Cr0::EVTQEN) {
            self.stats.dropped_events += 1;
            return (false, Irqs::empty());
        }
        let (base, mut q) = self.eventq();
        if q.is_full() {
            self.stats.dropped_events += 1;
            if !overflow_pending(self.r.eventq_prod, self.r.eventq_cons) {
                self.r.eventq_prod ^= OVERFLOW_FLAG;
            }
            return (false, Irqs::empty());
        }
        let at = base + u64::from(q.prod_index()) * Event::SIZE as u64;
        if mem.write(at, &e.to_bytes()).is_err() {
            self.stats.dropped_events += 1;
            return (false, self.raise_gerror(Gerror::EVENTQ_ABT_ERR, mem));
        }
        q.inc_prod();
        self.r.eventq_prod = q.prod() | (self.r.eventq_prod & OVERFLOW_FLAG);
        self.stats.guest_events += 1;
        if self.r.irq_ctrl & IrqCtrl::EVENTQ_IRQEN.bits() == 0 {
            return (true, Irqs::empty());
        }
        if self.r.eventq_irq_cfg0 & MSI_ADDR != 0 {
            let (addr, data) = (self.r.eventq_irq_cfg0, self.r.eventq_irq_cfg1);
            if mem.write(addr, &data.to_le_bytes()).is_err() {
                return (true, self.raise_gerror(Gerror::MSI_EVENTQ_ABT_ERR, mem));
            }
            return (true, Irqs::empty());
        }
        (true, Irqs::EVENTQ)
    }
}
