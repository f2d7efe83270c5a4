//! The VM's streams and their physical STEs: each guest StreamID's state ([`Stream`]), which
//! streams need reshadowing, and the STE work that follows, bounded per trap and per unit of
//! time ([module docs](super), STE work).

use super::completion::Cover;
use super::progress::Pause;
use super::{shadow_ste, GuestMemory, PhysicalSmmu, StreamMap, StreamTableCfg, Vsmmu};
use crate::cmd::Command;
use crate::driver::{SteBreak, SteWrite};
use crate::event::EventKind;
use crate::regs::{Cr0, Gbpa};
use crate::ste::Ste;

/// State of one guest StreamID.
#[derive(Debug, Clone, Copy)]
pub(super) struct Stream {
    pub(super) map: StreamMap,
    /// The physical STE last written (asked for); `None`: not known, as after a reset.
    pub(super) phys: Option<Ste>,
    /// When the guest's configuration for the stream is invalid, the event its SMMU would record
    /// for each transaction (the physical STE is then invalid and reports C_BAD_STE).
    pub(super) bad: Option<EventKind>,
    /// Marked for reshadowing; `Some(true)` when a targeted CFGI_STE(_RANGE) asked for it,
    /// `Some(false)` for SMMUEN, GBPA and CFGI_ALL.
    pub(super) dirty: Option<bool>,
    /// A guest CMD_CFGI_STE(_RANGE)/CFGI_ALL named the stream: a nested one gets a physical
    /// CMD_CFGI_STE even when its STE is unchanged (the SMMU may cache the guest's CD with it).
    pub(super) named: bool,
    /// The current `bad` configuration was logged.
    pub(super) bad_logged: bool,
    /// A break-before-make in progress: the make, and the physical CMD_SYNC after the break.
    pub(super) making: Option<(SteBreak, u64)>,
}

impl Vsmmu {
    /// Marks the VM's streams whose guest StreamID is in `[start, start + n)` (all of them for
    /// `None`) for reshadowing. `targeted`: the guest invalidated them one by one, so it means
    /// them to be usable (at SMMUEN or CFGI_ALL a driver has not set up every stream yet).
    /// `named`: a guest CMD_CFGI_* asked for it (not SMMUEN or GBPA).
    pub(super) fn invalidate(&mut self, range: Option<(u32, u64)>, targeted: bool, named: bool) {
        for s in &mut self.streams {
            if let Some((start, n)) = range {
                let v = u64::from(s.map.vsid);
                if v < u64::from(start) || v >= u64::from(start) + n {
                    continue;
                }
            }
            s.dirty = Some(targeted || s.dirty == Some(true));
            s.named |= named;
            self.stream_work = true;
        }
    }

    /// Recomputes [`Vsmmu::stream_work`] after a pass over the streams.
    pub(super) fn note_stream_work(&mut self) {
        self.stream_work = self
            .streams
            .iter()
            .any(|s| s.dirty.is_some() || s.making.is_some());
    }

    /// The physical STE the guest's state gives stream `i`, and the event its own SMMU would
    /// record for the stream's transactions if that state is invalid.
    fn shadow(&self, i: usize, mem: &impl GuestMemory) -> (Ste, Option<crate::event::EventKind>) {
        let s = &self.streams[i];
        if self.cr0().contains(Cr0::SMMUEN) {
            let table = StreamTableCfg {
                base: self.r.strtab_base,
                cfg: self.r.strtab_base_cfg,
                sid_bits: self.cfg.sid_bits,
            };
            match table.fetch(s.map.vsid, mem) {
                Ok(g) => shadow_ste(&g, &self.cfg),
                Err(kind) => (Ste::default(), Some(kind)),
            }
        } else if self.r.gbpa & Gbpa::ABORT.bits() != 0 {
            (Ste::abort(), None)
        } else {
            (Ste::stage2(self.cfg.s2), None)
        }
    }

    /// Logs a bad configuration once, when the guest invalidates the stream by name (at SMMUEN
    /// or CFGI_ALL a driver has not set up every stream yet).
    fn note_bad(&mut self, i: usize, bad: Option<crate::event::EventKind>, targeted: bool) {
        let s = self.streams[i];
        let logged = if s.bad == bad { s.bad_logged } else { false };
        let log_now = targeted && !logged;
        if let (Some(kind), true) = (bad, log_now) {
            log::warn!(
                "vsmmu: {}: StreamID {}: guest configuration is invalid ({}): its transactions abort",
                self.cfg.name,
                s.map.vsid,
                kind.name()
            );
        }
        let st = &mut self.streams[i];
        st.bad_logged = logged || (log_now && bad.is_some());
        st.bad = bad;
    }

    /// Recomputes the physical STE of every stream marked by [`Vsmmu::invalidate`] and does
    /// the STE work, each taking a token of the VM's STE budget:
    ///
    /// - unchanged: nothing, or for a nested stream the guest named, a physical CMD_CFGI_STE
    ///   (the SMMU may cache the guest's CD along with the STE);
    /// - changed: the driver writes what it can at once; its CMD_CFGI_STE joins the merge
    ///   window and completes with the next physical CMD_SYNC; a break-before-make stops here
    ///   until the break's CMD_SYNC has completed (`finish_breaks` makes it).
    ///
    /// Deferring the work to the end of what a trap consumed (or to an invalidation that must
    /// follow it) is what the spec allows: a CMD_CFGI_* has completed only once a later
    /// CMD_SYNC has, and the guest sees that only once the trap is done. So a flood of
    /// invalidations costs at most one STE write per stream and trap.
    pub(super) fn reshadow_dirty(
        &mut self,
        mem: &impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<(), Pause> {
        if !self.stream_work {
            // Every trap comes here: keep the common case out of the loop below.
            return Ok(());
        }
        let mut broke = false;
        let mut result = Ok(());
        for i in 0..self.streams.len() {
            let s = self.streams[i];
            let Some(targeted) = s.dirty else { continue };
            let (ste, bad) = self.shadow(i, mem);
            if let Some((b, seq)) = s.making {
                // Between break and make: the make takes the newest STE.
                let mut b = b;
                b.ste = ste;
                let st = &mut self.streams[i];
                st.making = Some((b, seq));
                st.phys = Some(ste);
                st.dirty = None;
                st.named = false;
                self.note_bad(i, bad, targeted);
                continue;
            }
            let unchanged = s.phys == Some(ste);
            let cfgi_only = unchanged && s.named && Self::nested(&ste);
            if unchanged && !cfgi_only {
                self.stats.ste_skipped += 1;
            } else {
                if let Err(t) = self.ste_budget.take(1, phys.now()) {
                    self.stats.budget_waits += 1;
                    if self.gbpa_updates > 0 {
                        self.stats.gbpa_deferred += 1;
                    }
                    result = Err(Pause::Until(t));
                    break;
                }
                if cfgi_only {
                    let cfgi = Command::CfgiSte {
                        sid: s.map.psid,
                        leaf: true,
                    };
                    self.batch.push_config(cfgi, true);
                    self.config_cover = Cover::Pending;
                } else {
                    match phys.write_ste(s.map.psid, ste) {
                        Ok(SteWrite::Unchanged) => {
                            // The table held it already (not known to the model, as after a
                            // reset).
                            self.stats.ste_skipped += 1;
                            if s.named && Self::nested(&ste) {
                                let cfgi = Command::CfgiSte {
                                    sid: s.map.psid,
                                    leaf: true,
                                };
                                self.batch.push_config(cfgi, true);
                                self.config_cover = Cover::Pending;
                            }
                        }
                        Ok(SteWrite::Written(cfgi)) => {
                            self.stats.ste_writes += 1;
                            self.batch.push_config(cfgi, false);
                            self.config_cover = Cover::Pending;
                        }
                        Ok(SteWrite::Broken(b)) => {
                            self.stats.ste_writes += 1;
                            self.stats.ste_breaks += 1;
                            self.streams[i].making = Some((b, u64::MAX));
                            broke = true;
                        }
                        Err(e) => {
                            log::error!(
                                "vsmmu: {}: physical STE {}: {e}",
                                self.cfg.name,
                                s.map.psid
                            );
                        }
                    }
                }
            }
            self.note_bad(i, bad, targeted);
            let st = &mut self.streams[i];
            st.phys = Some(ste);
            st.dirty = None;
            st.named = false;
        }
        self.note_stream_work();
        if broke {
            // The breaks' CMD_CFGI_STEs go out at once with a CMD_SYNC of their own; the make
            // waits for it (`finish_breaks`, [`Pause::Sync`]). `u64::MAX` marks them.
            self.rebreak(phys)?;
        }
        result
    }

    /// Sends the CMD_CFGI_STE of every break marked `u64::MAX` with a CMD_SYNC and stops until
    /// it has completed.
    pub(super) fn rebreak(&mut self, phys: &mut impl PhysicalSmmu) -> Result<(), Pause> {
        for i in 0..self.streams.len() {
            if let Some((b, u64::MAX)) = self.streams[i].making {
                if let Err(e) = phys.submit(&[b.cfgi]) {
                    log::error!("vsmmu: {}: physical CMD_CFGI_STE: {e}", self.cfg.name);
                }
                self.queued += 1;
            }
        }
        match phys.submit_sync(&[]) {
            Ok(t) => {
                self.queued_sync(t, 1);
                for s in self.streams.iter_mut() {
                    if let Some((_, seq)) = s.making.as_mut() {
                        if *seq == u64::MAX {
                            *seq = t.seq();
                        }
                    }
                }
                Err(Pause::Sync(t))
            }
            Err(e) => {
                // Left marked: tried again by the next trap.
                log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name);
                self.stats.phys_sync_errors += 1;
                self.unpublished = true;
                Ok(())
            }
        }
    }

    /// [`Vsmmu::reshadow_dirty`] for the control path (a reset): no budget, and a
    /// break-before-make waited for at once, holding the model.
    pub(super) fn reshadow_now(&mut self, mem: &impl GuestMemory, phys: &mut impl PhysicalSmmu) {
        for i in 0..self.streams.len() {
            if self.streams[i].dirty.is_none() {
                continue;
            }
            let (ste, bad) = self.shadow(i, mem);
            self.write_now(i, ste, phys);
            self.note_bad(i, bad, false);
        }
        self.note_stream_work();
    }

    /// Writes stream `i`'s physical STE on the control path: no budget, a break-before-make
    /// waited for at once; its CFGI_STE joins the batch for the caller's sync.
    pub(super) fn write_now(&mut self, i: usize, ste: Ste, phys: &mut impl PhysicalSmmu) {
        let psid = self.streams[i].map.psid;
        match phys.write_ste(psid, ste) {
            Ok(SteWrite::Unchanged) => self.stats.ste_skipped += 1,
            Ok(SteWrite::Written(cfgi)) => {
                self.stats.ste_writes += 1;
                self.batch.push_config(cfgi, false);
            }
            Ok(SteWrite::Broken(b)) => {
                self.stats.ste_writes += 1;
                self.stats.ste_breaks += 1;
                let made = phys
                    .submit_sync(&[b.cfgi])
                    .and_then(|t| phys.wait(t))
                    .and_then(|()| phys.make_ste(b));
                match made {
                    Ok(cfgi) => self.batch.push_config(cfgi, false),
                    Err(e) => {
                        self.stats.phys_sync_errors += 1;
                        log::error!("vsmmu: {}: physical STE {psid}: {e}", self.cfg.name);
                    }
                }
            }
            Err(e) => log::error!("vsmmu: {}: physical STE {psid}: {e}", self.cfg.name),
        }
        let st = &mut self.streams[i];
        st.phys = Some(ste);
        st.dirty = None;
        st.named = false;
        st.making = None;
    }
}
