//! Command queue emulation (IHI 0070 4, 7.1): the guest's commands are consumed inside the
//! trap of its CMDQ_PROD write. Invalidations are forwarded scoped to the VM, in batches; a
//! CMD_SYNC is completed after a physical sync, by the MSI write the guest asked for. What
//! waits for the physical sync (CONS moving past the CMD_SYNC, the MSI, a command error that
//! follows it) is kept as a [`Completion`] until the trap, no longer holding the model, has
//! waited (`Vsmmu::complete`).

use super::{Completion, GuestMemory, Irqs, PhysicalSmmu, Vsmmu, BATCH, CONS_ERR};
use crate::cmd::{Command, SyncCs, TlbiAddr};
use crate::regs::{Cerror, Cr0, Gerror};

impl Vsmmu {
    pub(super) fn cmdq_error_active(&self) -> bool {
        (self.r.gerror ^ self.r.gerrorn) & Gerror::CMDQ_ERR.bits() != 0
    }

    /// Consumes the guest's commands from CONS to PROD (at most one queue's worth, so a trap's
    /// work is bounded). Stops at the first bad command with CMDQ_CONS.ERR and GERROR.CMDQ_ERR,
    /// CONS left pointing at it (IHI 0070 7.1).
    pub(super) fn process_cmdq(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Irqs {
        if !self.cr0().contains(Cr0::CMDQEN) || self.cmdq_error_active() || self.stopped {
            return Irqs::empty();
        }
        let start = self.fetched;
        let (base, mut q) = self.cmdq();
        let mut irqs = Irqs::empty();
        let mut error = None;
        for _ in 0..q.entries() {
            if q.is_empty() {
                break;
            }
            let mut b = [0u8; 16];
            if mem
                .read(base + u64::from(q.cons_index()) * 16, &mut b)
                .is_err()
            {
                error = Some(Cerror::Abort);
                break;
            }
            let cmd = match Command::decode(Command::words_from_bytes(&b)) {
                Ok(c) => c,
                Err(_) => {
                    error = Some(Cerror::Illegal);
                    break;
                }
            };
            self.stats.commands += 1;
            match self.execute(cmd, mem, phys) {
                Ok(i) => irqs |= i,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            q.inc_cons();
            if let Command::Sync(s) = cmd {
                // SIG_SEV (SEV not implemented) and SIG_NONE: completion is CONS moving past it.
                let msi = (s.cs == SyncCs::Irq && s.msiaddr != 0).then_some((s.msiaddr, s.msidata));
                self.completion(q.cons(), msi, false);
            }
        }
        // Invalidations not followed by a CMD_SYNC in this batch still take effect now.
        self.reshadow_dirty(mem, phys);
        self.flush(phys);
        self.fetched = q.cons();
        if let Some(e) = error {
            self.stats.command_errors += 1;
            log::warn!(
                "vsmmu: {}: command at CMDQ index {} refused ({e:?}): queue stopped (CERROR)",
                self.cfg.name,
                q.cons_index()
            );
            self.stopped = true;
            let cons = q.cons() | (u32::from(e.code()) << 24 & CONS_ERR);
            self.completion(cons, None, true);
        } else if self.fetched != start
            && self.inflight.back().is_none_or(|c| c.cons != self.fetched)
        {
            self.completion(self.fetched, None, false);
        }
        irqs
    }

    /// Records what the guest sees once every physical command queued so far has completed.
    fn completion(&mut self, cons: u32, msi: Option<(u64, u32)>, error: bool) {
        self.inflight.push_back(Completion {
            id: self.next_id,
            cons,
            msi,
            error,
        });
        self.next_id += 1;
    }

    pub(super) fn execute(
        &mut self,
        cmd: Command,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<Irqs, Cerror> {
        let vmid = self.vmid();
        match cmd {
            Command::PrefetchConfig { .. } | Command::PrefetchAddr { .. } => {}
            Command::CfgiSte { sid, .. } => self.invalidate(Some((sid, 1)), true),
            Command::CfgiSteRange { sid, range } => {
                let n = 2u64 << range;
                let start = u64::from(sid) & !(n - 1);
                self.invalidate(Some((start as u32, n)), true);
            }
            Command::CfgiAll => self.invalidate(None, false),
            Command::CfgiCd { sid, ssid, leaf } => {
                // SSIDSIZE is 0: only SubstreamID 0 exists.
                if ssid != 0 {
                    return Err(Cerror::Illegal);
                }
                if let Some(psid) = self.psid(sid) {
                    self.push(
                        Command::CfgiCd {
                            sid: psid,
                            ssid,
                            leaf,
                        },
                        phys,
                    );
                }
            }
            Command::CfgiCdAll { sid } => {
                if let Some(psid) = self.psid(sid) {
                    self.push(Command::CfgiCdAll { sid: psid }, phys);
                }
            }
            // The guest's SMMU has no stage 2, so its VMID fields mean nothing: every stage-1
            // invalidation is scoped to the VM's VMID.
            Command::TlbiNhAll { .. } | Command::TlbiNsnhAll => {
                self.push(Command::TlbiNhAll { vmid }, phys)
            }
            Command::TlbiNhAsid { asid, .. } => self.push(Command::TlbiNhAsid { vmid, asid }, phys),
            Command::TlbiNhVa { asid, addr, .. } => {
                let addr = self.tlbi_addr(addr)?;
                self.push(Command::TlbiNhVa { vmid, asid, addr }, phys)
            }
            Command::TlbiNhVaa { addr, .. } => {
                let addr = self.tlbi_addr(addr)?;
                self.push(Command::TlbiNhVaa { vmid, addr }, phys)
            }
            Command::Sync(_) => self.complete_sync(mem, phys),
            // EL2/EL3 and stage-2 invalidations need IDR0.HYP/S2P; ATS, PRI and stalls are not
            // implemented: all illegal on this SMMU (IHI 0070 4.1).
            Command::TlbiEl3All
            | Command::TlbiEl3Va { .. }
            | Command::TlbiEl2All
            | Command::TlbiEl2Asid { .. }
            | Command::TlbiEl2Va { .. }
            | Command::TlbiEl2Vaa { .. }
            | Command::TlbiS12Vmall { .. }
            | Command::TlbiS2Ipa { .. }
            | Command::AtcInv { .. }
            | Command::PriResp { .. }
            | Command::Resume { .. }
            | Command::StallTerm { .. } => return Err(Cerror::Illegal),
        }
        Ok(Irqs::empty())
    }

    /// A guest TLBI's address as the physical SMMU may take it. Without IDR3.RIL the range
    /// fields (NUM, SCALE) make the command illegal, and the TG/TTL hints are RES0 there: they
    /// are dropped rather than handed to an SMMU that does not know them.
    pub(super) fn tlbi_addr(&self, mut addr: TlbiAddr) -> Result<TlbiAddr, Cerror> {
        if self.cfg.phys_ril {
            return Ok(addr);
        }
        if addr.num | addr.scale != 0 {
            return Err(Cerror::Illegal);
        }
        addr.tg = 0;
        addr.ttl = 0;
        Ok(addr)
    }

    pub(super) fn psid(&self, vsid: u32) -> Option<u32> {
        self.streams
            .iter()
            .find(|s| s.map.vsid == vsid)
            .map(|s| s.map.psid)
    }

    pub(super) fn push(&mut self, cmd: Command, phys: &mut impl PhysicalSmmu) {
        self.batch.push(cmd);
        if self.batch.len() >= BATCH {
            self.flush(phys);
        }
    }

    /// Queues the gathered commands without a sync; they are published after the trap.
    pub(super) fn flush(&mut self, phys: &mut impl PhysicalSmmu) {
        if self.batch.is_empty() {
            return;
        }
        self.stats.phys_commands += self.batch.len() as u64;
        if let Err(e) = phys.submit(&self.batch) {
            log::error!("vsmmu: {}: physical command submission: {e}", self.cfg.name);
        }
        self.batch.clear();
        self.unsynced = true;
        self.unpublished = true;
    }

    /// Queues the gathered commands with a CMD_SYNC, if anything was submitted since the last
    /// one; the trap waits for it after letting go of the model.
    pub(super) fn flush_sync(&mut self, phys: &mut impl PhysicalSmmu) {
        if self.batch.is_empty() && !self.unsynced {
            return;
        }
        self.stats.phys_commands += self.batch.len() as u64;
        self.stats.phys_syncs += 1;
        match phys.submit_sync(&self.batch) {
            Ok(t) => self.last_sync = Some(t),
            Err(e) => log::error!("vsmmu: {}: physical CMD_SYNC: {e}", self.cfg.name),
        }
        self.batch.clear();
        self.unsynced = false;
        self.unpublished = true;
    }

    /// CMD_SYNC: every earlier command has completed once the physical SMMU completed what they
    /// were forwarded as (and the guest's STE changes are in force); the completion signal the
    /// guest asked for follows that ([`Completion`]).
    pub(super) fn complete_sync(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) {
        self.stats.syncs += 1;
        self.reshadow_dirty(mem, phys);
        self.flush_sync(phys);
    }
}
