//! How a vSMMU's work moves against the physical SMMU: completions that wait for physical
//! CMD_SYNCs, pauses (a break-before-make, an STE change an invalidation must follow, a
//! budget), the merge window handed to the physical queue, and a failed physical CMD_SYNC
//! reported to the guest.
//!
//! Nothing here waits. A write that cannot go on stops with a [`Pause`]; its [`Outstanding`]
//! names what to wait for, the caller waits without the model's lock and calls
//! [`Vsmmu::complete`], which resumes from where the model stands (the guest's queue position
//! is the state, so any vCPU's trap may be the one that goes on).

use super::completion::{Completion, Cover, Effect};
use super::regfile::CONS_ERR;
use super::{GuestMemory, Irqs, Outstanding, PhysicalSmmu, Vsmmu, MAX_ROUNDS};

/// CMDQ_PROD/CONS: WR [19] and RD/WR [18:0], the part that names a queue position.
const CONS_PTR: u32 = 0x000f_ffff;
use crate::cmd::Command;
use crate::driver::{DriverError, SyncTicket};
use crate::regs::{Cerror, Gerror};
use crate::ste::StreamConfig;

/// Why the processing is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pause {
    /// Until this physical CMD_SYNC of the VM's has completed: the break of a break-before-make,
    /// the STE or CD change an invalidation must follow, or the VM's own earlier work when it
    /// is over its outstanding budget.
    Sync(SyncTicket),
    /// Until the clock reads this: a budget by time ran out.
    Until(u64),
}

impl Vsmmu {
    /// Moves everything along as far as it goes without waiting: breaks whose CMD_SYNC
    /// completed are made, registers' STE work is done, the guest's commands are consumed, the
    /// merge window is handed to the physical queue with a CMD_SYNC for the completions that
    /// wait for one; then what is complete is made visible. Sets [`Vsmmu::pause`] if it had to
    /// stop. Returns the interrupts to raise.
    pub(super) fn advance(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        self.pause = self.progress(mem, phys).err();
        let irqs = core::mem::take(&mut self.raised);
        irqs | self.apply(mem)
    }

    fn progress(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<(), Pause> {
        if !self.has_work() {
            // The common second round of a trap: its CMD_SYNC completed, nothing else to do.
            return Ok(());
        }
        if self.stream_work {
            self.finish_breaks(phys)?;
            // STE work the registers asked for (SMMUEN, GBPA) goes before the commands after
            // it.
            self.reshadow_dirty(mem, phys)?;
        }
        self.process_cmdq(mem, phys)?;
        if self.stream_work {
            // Streams the guest invalidated: read once, at the end of what was consumed.
            self.reshadow_dirty(mem, phys)?;
        }
        let with_sync = self.pending_tail > 0;
        self.flush_window(mem, phys, with_sync)
    }

    /// Whether [`Vsmmu::progress`] has anything to do: a break to make, a stream to
    /// reshadow, guest commands to consume, a merge window or completions waiting for it.
    fn has_work(&self) -> bool {
        self.pending_tail > 0
            || !self.batch.is_empty()
            || self.recover_full
            || self.stream_work
            || (self.can_consume() && self.fetched != self.r.cmdq_prod & CONS_PTR)
    }

    /// The ticket of the VM's physical CMD_SYNC number `seq`, while not known complete.
    pub(super) fn ticket(&self, seq: u64) -> Option<SyncTicket> {
        self.syncs
            .iter()
            .find(|(t, _)| t.seq() == seq)
            .map(|&(t, _)| t)
    }

    fn known_complete(&self, c: Cover) -> bool {
        match c {
            Cover::Now => true,
            Cover::Seq(s) => s <= self.done_seq,
            Cover::Pending => false,
        }
    }

    /// Records what the guest sees once `cover` allows it (in queue order: behind a
    /// completion that waits for a CMD_SYNC not queued yet, it waits for that one too).
    pub(super) fn completion(&mut self, cover: Cover, what: Effect) {
        let cover = if self.pending_tail > 0 {
            Cover::Pending
        } else {
            cover
        };
        self.inflight.push_back(Completion { cover, what });
        self.next_id += 1;
        if cover == Cover::Pending {
            self.pending_tail += 1;
        }
    }

    /// The physical CMD_SYNC `seq` of the VM's completed, and so every one before it.
    pub(super) fn synced(&mut self, seq: u64) {
        self.done_seq = self.done_seq.max(seq);
        while let Some(&(t, queued)) = self.syncs.front() {
            if t.seq() > self.done_seq {
                break;
            }
            self.done_queued = self.done_queued.max(queued);
            self.syncs.pop_front();
        }
    }

    /// Records a physical CMD_SYNC just queued after `entries` physical entries.
    pub(super) fn queued_sync(&mut self, t: SyncTicket, entries: u64) {
        self.queued += entries;
        self.syncs.push_back((t, self.queued));
        self.unpublished = true;
    }

    /// Hands the merge window to the physical queue with a CMD_SYNC after it and empties it.
    fn send_window(&mut self, phys: &mut impl PhysicalSmmu) -> Result<SyncTicket, DriverError> {
        let n = self.batch.len() as u64;
        let r = phys.submit_sync(self.batch.commands());
        self.batch.clear();
        self.unpublished = true;
        match r {
            Ok(t) => {
                self.queued_sync(t, n + 1);
                Ok(t)
            }
            Err(e) => {
                // Some of it may be queued, with no ticket to wait for: given up on, like a
                // failed CMD_SYNC, for the outstanding budget.
                self.queued += n + 1;
                self.done_queued = self.queued;
                Err(e)
            }
        }
    }

    /// [`Vsmmu::send_window`] on the guest's behalf: its ticket, or `None` with the error
    /// reported to the guest as a failed CMD_SYNC.
    fn send_window_for_guest(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Option<SyncTicket> {
        match self.send_window(phys) {
            Ok(t) => Some(t),
            Err(e) => {
                let irqs = self.phys_failed(e, mem);
                self.raised |= irqs;
                None
            }
        }
    }

    /// Physical entries of the VM's queued and not known complete.
    fn outstanding_entries(&self) -> u64 {
        self.queued - self.done_queued
    }

    /// Hands the merge window to the physical queue, with a CMD_SYNC when `with_sync` (some
    /// completions wait for one) and anything is queued that no CMD_SYNC covers yet;
    /// otherwise those completions take the VM's last physical CMD_SYNC, or none. Stops when
    /// the VM is over its outstanding budget (it waits for its own oldest CMD_SYNC) or out of
    /// CMD_SYNCs for now.
    pub(super) fn flush_window(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
        with_sync: bool,
    ) -> Result<(), Pause> {
        if self.recover_full && with_sync {
            // After a failed physical CMD_SYNC: what was lost, and more (see `recover_full`).
            let vmid = self.vmid();
            self.batch
                .push_tlbi(Command::TlbiNhAll { vmid }, usize::MAX);
            for i in 0..self.streams.len() {
                let sid = self.streams[i].map.psid;
                self.batch
                    .push_config(Command::CfgiSte { sid, leaf: false }, true);
            }
            self.recover_full = false;
        }
        let n = self.batch.len() as u64;
        if n == 0 && !with_sync {
            return Ok(());
        }
        let need_sync = with_sync && (n > 0 || self.unsynced);
        if with_sync && !need_sync {
            // Nothing new: the guest's CMD_SYNCs wait for the VM's last physical one, if any.
            let cover = self
                .syncs
                .back()
                .map_or(Cover::Now, |(t, _)| Cover::Seq(t.seq()));
            let m = self.cover_pending(cover);
            self.stats.syncs_merged += m;
            return Ok(());
        }
        let entries = n + u64::from(need_sync);
        let outstanding = self.outstanding_entries();
        if outstanding > 0 && outstanding + entries > u64::from(self.cfg.budget.outstanding) {
            self.stats.budget_waits += 1;
            if let Some(&(t, _)) = self.syncs.front() {
                return Err(Pause::Sync(t));
            }
            // Outstanding entries with no CMD_SYNC after them: one to wait for (the window
            // stays for later).
            let window = core::mem::take(&mut self.batch);
            let t = self.send_window_for_guest(mem, phys);
            self.batch = window;
            self.stats.phys_syncs += 1;
            return match t {
                Some(t) => {
                    self.unsynced = false;
                    Err(Pause::Sync(t))
                }
                None => Ok(()),
            };
        }
        if need_sync {
            if let Err(t) = self.sync_budget.take(1, phys.now()) {
                self.stats.budget_waits += 1;
                return Err(Pause::Until(t));
            }
        }
        self.stats.phys_commands += self.batch.guest() as u64;
        if need_sync {
            self.stats.phys_syncs += 1;
            self.unsynced = false;
            if let Some(t) = self.send_window_for_guest(mem, phys) {
                let m = self.cover_pending(Cover::Seq(t.seq()));
                self.stats.syncs_merged += m.saturating_sub(1);
                if self.config_cover == Cover::Pending {
                    self.config_cover = Cover::Seq(t.seq());
                }
            }
        } else {
            if let Err(e) = phys.submit(self.batch.commands()) {
                let irqs = self.phys_failed(e, mem);
                self.raised |= irqs;
            }
            self.queued += n;
            self.batch.clear();
            self.unsynced = true;
            self.unpublished = true;
        }
        Ok(())
    }

    /// Gives every completion waiting for a CMD_SYNC not queued yet `cover`. Returns how many
    /// guest CMD_SYNCs that was.
    fn cover_pending(&mut self, cover: Cover) -> u64 {
        let n = core::mem::take(&mut self.pending_tail);
        let mut syncs = 0;
        for c in self.inflight.last_mut(n) {
            c.cover = cover;
            syncs += u64::from(matches!(c.what, Effect::Cons { sync: true, .. }));
        }
        syncs
    }

    /// An invalidation the guest ordered after STE or CD changes (a CMD_SYNC between them)
    /// comes next: those changes must have taken effect first. Ok when they have; otherwise
    /// they are queued with a CMD_SYNC to wait for.
    pub(super) fn config_complete(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<(), Pause> {
        self.reshadow_dirty(mem, phys)?;
        if self.config_cover == Cover::Pending {
            self.flush_window(mem, phys, true)?;
            if self.config_cover == Cover::Pending {
                // Its CMD_SYNC could not be queued (reported): nothing to wait for.
                self.config_cover = Cover::Now;
            }
        }
        if self.known_complete(self.config_cover) {
            self.config_cover = Cover::Now;
            self.barrier = false;
            return Ok(());
        }
        let Cover::Seq(s) = self.config_cover else {
            return Ok(());
        };
        match self.ticket(s) {
            Some(t) => {
                self.stats.order_waits += 1;
                Err(Pause::Sync(t))
            }
            None => {
                self.config_cover = Cover::Now;
                self.barrier = false;
                Ok(())
            }
        }
    }

    /// Takes the first completion off (a Pending one only when forced, after a failure).
    fn pop_completion(&mut self) {
        if let Some(c) = self.inflight.pop_front() {
            if c.cover == Cover::Pending {
                self.pending_tail = self.pending_tail.saturating_sub(1);
            }
        }
    }

    /// Makes visible, in order, every completion whose physical CMD_SYNC is known complete.
    pub(super) fn apply(&mut self, mem: &mut impl GuestMemory) -> Irqs {
        let mut irqs = Irqs::empty();
        while let Some(c) = self.inflight.front().copied() {
            if !self.known_complete(c.cover) {
                break;
            }
            self.inflight.pop_front();
            #[cfg(any(test, feature = "fuzzing"))]
            if matches!(c.what, Effect::Cons { sync: true, .. }) {
                self.visible_syncs.push(c.cover);
            }
            irqs |= self.effect(c.what, mem);
        }
        irqs
    }

    fn effect(&mut self, what: Effect, mem: &mut impl GuestMemory) -> Irqs {
        match what {
            Effect::Cons { cons, msi, .. } => {
                self.r.cmdq_cons = cons;
                if let Some((addr, data)) = msi {
                    // The MSI is a 32-bit write of MSIData to MSIAddr (IHI 0070 4.7.3). Linux
                    // points it at the CMD_SYNC's own slot and polls that word in RAM.
                    if mem.write(addr, &data.to_le_bytes()).is_err() {
                        return self.raise_gerror(Gerror::MSI_CMDQ_ABT_ERR, mem);
                    }
                }
                Irqs::empty()
            }
            Effect::Error { cons } => {
                self.r.cmdq_cons = cons;
                self.raise_gerror(Gerror::CMDQ_ERR, mem)
            }
            Effect::Gbpa => {
                self.gbpa_updates = self.gbpa_updates.saturating_sub(1);
                Irqs::empty()
            }
            Effect::Cr0Ack(v) => {
                self.r.cr0ack = v;
                Irqs::empty()
            }
        }
    }

    /// Stops counting the VM's physical CMD_SYNCs up to `t` as outstanding, without taking
    /// them as complete.
    fn give_up(&mut self, t: SyncTicket) {
        while let Some(&(s, queued)) = self.syncs.front() {
            if s.seq() > t.seq() {
                break;
            }
            self.done_queued = self.done_queued.max(queued);
            self.syncs.pop_front();
        }
    }

    /// The VM's physical CMD_SYNC `t` failed (timed out, or a command before it did).
    pub(super) fn sync_failed(
        &mut self,
        t: SyncTicket,
        e: DriverError,
        mem: &mut impl GuestMemory,
    ) -> Irqs {
        // What it was to complete is unknown: stop counting it as outstanding (the budget
        // would wait for it forever), without calling it complete.
        self.give_up(t);
        self.phys_failed(e, mem)
    }

    /// A physical CMD_SYNC failed or could not be queued: the guest's first CMD_SYNC that
    /// waits for the physical SMMU gets CERROR_ABT (CMDQ_CONS.ERR, GERROR.CMDQ_ERR, no MSI;
    /// IHI 0070 7.1). Acknowledged, the queue restarts at that CMD_SYNC, whose retry gets a
    /// physical CMD_SYNC of its own with a full invalidation before it. What came before it
    /// in queue order is made visible: only CONS movements and register acknowledgements.
    /// Breaks in progress are made again after a new CMD_SYNC of their own.
    pub(super) fn phys_failed(&mut self, e: DriverError, mem: &mut impl GuestMemory) -> Irqs {
        self.stats.phys_sync_errors += 1;
        log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
        self.unsynced = true;
        self.recover_full = true;
        if self.config_cover != Cover::Now {
            self.config_cover = Cover::Pending;
        }
        for s in self.streams.iter_mut() {
            if let Some((_, seq)) = s.making.as_mut() {
                if *seq > self.done_seq && !self.syncs.iter().any(|(t, _)| t.seq() == *seq) {
                    // Break again: its CMD_CFGI_STE and a CMD_SYNC of its own
                    // (`finish_breaks`).
                    *seq = u64::MAX;
                }
            }
        }
        let mut irqs = Irqs::empty();
        while let Some(c) = self.inflight.front().copied() {
            let Effect::Cons {
                cons, sync: true, ..
            } = c.what
            else {
                self.pop_completion();
                irqs |= self.effect(c.what, mem);
                continue;
            };
            if self.known_complete(c.cover) {
                self.pop_completion();
                irqs |= self.effect(c.what, mem);
                continue;
            }
            // The CMD_SYNC itself is one entry before the CONS its completion gives.
            let (_, q) = self.cmdq();
            let at = cons.wrapping_sub(1) & ((2 << q.log2size()) - 1);
            log::warn!(
                "vsmmu: {}: CMD_SYNC at CMDQ index {} not completed: CERROR_ABT",
                self.cfg.name,
                q.index(at)
            );
            self.inflight.clear();
            self.pending_tail = 0;
            self.r.cmdq_cons = at | (u32::from(Cerror::Abort.code()) << 24 & CONS_ERR);
            self.fetched = at;
            self.stopped = true;
            irqs |= self.raise_gerror(Gerror::CMDQ_ERR, mem);
            break;
        }
        irqs
    }

    /// Breaks whose CMD_SYNC completed are made (their CMD_CFGI_STE joins the merge window);
    /// stops while one is still waiting. A break whose CMD_SYNC failed is made again after a
    /// new one.
    fn finish_breaks(&mut self, phys: &mut impl PhysicalSmmu) -> Result<(), Pause> {
        if !self.stream_work {
            return Ok(());
        }
        let mut wait = None;
        let mut rebreak = false;
        for i in 0..self.streams.len() {
            let Some((b, seq)) = self.streams[i].making else {
                continue;
            };
            if seq == u64::MAX {
                rebreak = true;
                continue;
            }
            if seq > self.done_seq {
                wait = Some(wait.map_or(seq, |w: u64| w.min(seq)));
                continue;
            }
            self.streams[i].making = None;
            match phys.make_ste(b) {
                Ok(cfgi) => {
                    self.batch.push_config(cfgi, false);
                    self.config_cover = Cover::Pending;
                }
                Err(e) => log::error!(
                    "vsmmu: {}: physical STE {}: {e}",
                    self.cfg.name,
                    self.streams[i].map.psid
                ),
            }
        }
        self.note_stream_work();
        if rebreak {
            return self.rebreak(phys);
        }
        match wait.and_then(|s| self.ticket(s)) {
            Some(t) => Err(Pause::Sync(t)),
            None => Ok(()),
        }
    }

    /// What `o`'s write still has to wait for, after this round.
    pub(super) fn outstanding(
        &mut self,
        irqs: Irqs,
        upto: Option<u64>,
        target: Option<u64>,
    ) -> Outstanding {
        let first_id = self.next_id - self.inflight.len() as u64;
        let upto = upto.filter(|&u| !self.inflight.is_empty() && first_id <= u);
        let target =
            target.filter(|&t| self.consumed < t && self.can_consume() && self.pause.is_some());
        let mut o = Outstanding {
            irqs,
            upto,
            target,
            ticket: None,
            until: None,
            publish: core::mem::take(&mut self.unpublished),
        };
        if o.upto.is_none() && o.target.is_none() {
            return o;
        }
        // The physical CMD_SYNC of the write's last completion: once it has completed, so have
        // all before it (they complete in order). Unless one waits for a CMD_SYNC not queued
        // yet: then whatever stopped the processing.
        // Covers only grow along the queue (CMD_SYNCs not queued yet last), so the last of
        // the write's completions that waits for anything tells.
        let last = o.upto.and_then(|u| {
            // The write's last completion, and those before it.
            let mine = (u - first_id + 1).min(self.inflight.len() as u64) as usize;
            self.inflight
                .first(mine)
                .iter()
                .rev()
                .find_map(|c| match c.cover {
                    Cover::Now => None,
                    cover => Some(cover),
                })
        });
        let last = match last {
            Some(Cover::Seq(s)) => Some(s),
            _ => None,
        };
        match (last, self.pause) {
            (Some(s), _) if s > self.done_seq => o.ticket = self.ticket(s),
            (_, Some(Pause::Sync(t))) => o.ticket = Some(t),
            (_, Some(Pause::Until(t))) => o.until = Some(t),
            _ => {}
        }
        o
    }

    /// Waits, holding the model, until nothing the VM queued is outstanding: breaks made,
    /// the merge window sent with a CMD_SYNC and that waited for. For the control path (a
    /// reset); bounded by [`MAX_ROUNDS`] waits.
    pub(super) fn settle(&mut self, phys: &mut impl PhysicalSmmu) {
        for _ in 0..MAX_ROUNDS {
            let p = match self.finish_breaks(phys) {
                Err(p) => Some(p),
                Ok(()) => {
                    if !self.batch.is_empty() || self.unsynced {
                        self.unsynced = false;
                        if let Err(e) = self.send_window(phys) {
                            self.stats.phys_sync_errors += 1;
                            log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
                        }
                    }
                    self.syncs.back().map(|&(t, _)| Pause::Sync(t))
                }
            };
            match p {
                None => break,
                Some(Pause::Until(t)) => phys.wait_until(t),
                Some(Pause::Sync(t)) => match phys.wait(t) {
                    Ok(()) => self.synced(t.seq()),
                    Err(e) => {
                        self.stats.phys_sync_errors += 1;
                        log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
                        // Given up on, and not taken as complete: a break behind it is not made
                        // (the reset rewrites its stream from the aborting STE, no break needed).
                        self.give_up(t);
                        break;
                    }
                },
            }
        }
        if core::mem::take(&mut self.unpublished) {
            phys.publish();
        }
    }

    /// Whether a stream's STE or CD work is not known to have taken effect: a guest CMD_SYNC
    /// now orders what comes after it behind that work.
    pub(super) fn config_unsettled(&self) -> bool {
        !self.known_complete(self.config_cover) || self.stream_work
    }

    /// Whether a stream's physical STE is nested (its guest CD reachable).
    pub(super) fn nested(ste: &crate::ste::Ste) -> bool {
        ste.v() && ste.config() == StreamConfig::Nested
    }
}
