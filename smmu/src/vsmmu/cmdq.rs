//! Command queue emulation (IHI 0070 4, 7.1): the guest's commands are consumed inside the
//! trap of its CMDQ_PROD write. Invalidations are forwarded scoped to the VM into a merge
//! window ([`Batch`]); a trap's CMD_SYNCs are completed after one physical sync, by the MSI
//! writes the guest asked for. What waits for the physical sync (CONS moving past a CMD_SYNC,
//! its MSI, a command error that follows it) is kept as a `Completion` until the trap, no
//! longer holding the model, has waited (`Vsmmu::complete`).

use super::completion::{Cover, Effect};
use super::progress::Pause;
use super::regfile::CONS_ERR;
use super::{GuestMemory, PhysicalSmmu, Vsmmu, CMDQS};
use crate::bits;
use crate::cmd::{Command, SyncCs, TlbiAddr};
use crate::queue::Queue;
use crate::regs::{Cerror, Cr0, Gerror};
use alloc::vec::Vec;

/// Physical commands forwarded and not yet handed to the SMMU: the merge window. Merging only
/// here, never with commands already queued, keeps every invalidation taking effect no earlier
/// than the guest asked (a command already queued may have run before the guest's later
/// memory writes).
///
/// Within it: a command equal to one already in it is dropped; a TLBI_NH_ALL of the VM's VMID
/// (what the guest's TLBI_NH_ALL and TLBI_NSNH_ALL become) replaces every other TLBI and
/// subsumes those after it; past `limit` distinct TLBIs they all collapse into one TLBI_NH_ALL;
/// a CMD_CFGI_CD_ALL subsumes the stream's CMD_CFGI_CDs, and a non-leaf CMD_CFGI_STE or
/// CMD_CFGI_CD its leaf form. (A TLBI_NH_ASID does not subsume a TLBI_NH_VA: the latter also
/// drops global entries.)
#[derive(Debug, Default)]
pub(super) struct Batch {
    cmds: Vec<Command>,
    /// A fingerprint of each TLBI in it ([`tlbi_key`]): duplicates are looked for among these
    /// before whole commands are compared (the trap path's one loop over the window).
    keys: Vec<u64>,
    /// A TLBI_NH_ALL is in it: every other TLBI is redundant.
    all: bool,
    /// TLBIs in it.
    tlbis: usize,
    /// Commands in it forwarded for the guest (the rest are CFGI_STEs of physical STE writes).
    guest: usize,
}

/// A fingerprint of a TLBI: equal commands have equal ones (different ones mostly not).
fn tlbi_key(c: &Command) -> u64 {
    let a = |a: &TlbiAddr| {
        a.addr
            ^ u64::from(a.leaf)
            ^ (u64::from(a.ttl) | u64::from(a.tg) << 2 | u64::from(a.num) << 4) << 1
            ^ u64::from(a.scale) << 56
    };
    match c {
        Command::TlbiNhAsid { asid, .. } => 1 << 63 | u64::from(*asid),
        Command::TlbiNhVa { asid, addr, .. } => a(addr) ^ u64::from(*asid) << 40,
        Command::TlbiNhVaa { addr, .. } => a(addr) ^ 1 << 62,
        _ => 0,
    }
}

fn is_tlbi(c: &Command) -> bool {
    matches!(
        c,
        Command::TlbiNhAll { .. }
            | Command::TlbiNhAsid { .. }
            | Command::TlbiNhVa { .. }
            | Command::TlbiNhVaa { .. }
    )
}

impl Batch {
    pub(super) fn with_capacity(n: usize) -> Self {
        Self {
            cmds: Vec::with_capacity(n),
            keys: Vec::with_capacity(n),
            ..Self::default()
        }
    }

    pub(super) fn len(&self) -> usize {
        self.cmds.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.cmds.is_empty()
    }

    pub(super) fn commands(&self) -> &[Command] {
        &self.cmds
    }

    /// Commands in it forwarded for the guest.
    pub(super) fn guest(&self) -> usize {
        self.guest
    }

    pub(super) fn clear(&mut self) {
        self.cmds.clear();
        self.keys.clear();
        self.all = false;
        self.tlbis = 0;
        self.guest = 0;
    }

    /// Adds a TLBI of the VM's (keeping at most `limit` distinct ones). Returns how many guest
    /// TLBIs this made redundant: the command itself when a duplicate or subsumed, those it
    /// replaced when a TLBI_NH_ALL.
    pub(super) fn push_tlbi(&mut self, c: Command, limit: usize) -> u64 {
        if self.all {
            return 1;
        }
        let key = tlbi_key(&c);
        let c = match c {
            Command::TlbiNhAll { .. } => c,
            _ if self.keys.contains(&key) && self.cmds.contains(&c) => return 1,
            Command::TlbiNhAsid { vmid, .. }
            | Command::TlbiNhVa { vmid, .. }
            | Command::TlbiNhVaa { vmid, .. }
                if self.tlbis >= limit =>
            {
                // One more than the trap keeps: it and those kept become one TLBI_NH_ALL.
                Command::TlbiNhAll { vmid }
            }
            _ => {
                self.cmds.push(c);
                self.keys.push(key);
                self.tlbis += 1;
                self.guest += 1;
                return 0;
            }
        };
        let before = self.cmds.len();
        self.cmds.retain(|x| !is_tlbi(x));
        self.keys.clear();
        let replaced = before - self.cmds.len();
        self.guest -= replaced;
        self.cmds.push(c);
        self.guest += 1;
        self.all = true;
        self.tlbis = 1;
        replaced as u64
    }

    /// Adds a configuration invalidation (CMD_CFGI_STE, CMD_CFGI_CD, CMD_CFGI_CD_ALL);
    /// `guest`: forwarded for the guest rather than for a physical STE write.
    pub(super) fn push_config(&mut self, c: Command, guest: bool) {
        let stronger = |old: &Command| match (*old, c) {
            (Command::CfgiSte { sid: a, leaf: la }, Command::CfgiSte { sid: b, leaf: lb }) => {
                (a == b).then_some(la && !lb)
            }
            (Command::CfgiCdAll { sid: a }, Command::CfgiCd { sid: b, .. }) => {
                (a == b).then_some(false)
            }
            (Command::CfgiCd { sid: a, .. }, Command::CfgiCdAll { sid: b }) => {
                (a == b).then_some(true)
            }
            (
                Command::CfgiCd {
                    sid: a,
                    ssid: sa,
                    leaf: la,
                },
                Command::CfgiCd {
                    sid: b,
                    ssid: sb,
                    leaf: lb,
                },
            ) => (a == b && sa == sb).then_some(la && !lb),
            (Command::CfgiCdAll { sid: a }, Command::CfgiCdAll { sid: b }) => {
                (a == b).then_some(false)
            }
            _ => None,
        };
        // Some(true): the new one covers the old one (replace it); Some(false): the old covers
        // the new (drop it).
        if let Some(i) = self.cmds.iter().position(|o| stronger(o).is_some()) {
            if stronger(&self.cmds[i]) == Some(true) {
                self.cmds[i] = c;
                // Any other the new one covers (a CMD_CFGI_CD_ALL over several CFGI_CDs).
                let mut j = i + 1;
                while j < self.cmds.len() {
                    if stronger(&self.cmds[j]) == Some(true) {
                        self.cmds.remove(j);
                    } else {
                        j += 1;
                    }
                }
                self.guest = self.guest.min(self.cmds.len());
            }
            return;
        }
        self.cmds.push(c);
        self.guest += usize::from(guest);
    }
}

impl Vsmmu {
    pub(super) fn cmdq(&self) -> (u64, Queue) {
        let log2 = ((self.r.cmdq_base & 0x1f) as u8).min(CMDQS);
        let mut q = Queue::new(log2);
        q.set_prod(self.r.cmdq_prod);
        q.set_cons(self.fetched);
        (self.r.cmdq_base & bits::mask(51, 5), q)
    }

    /// This write wants the guest's queue consumed up to its PROD: `target` is the count
    /// [`Vsmmu::consumed`] reaches then (at most one queue's worth on).
    pub(super) fn request_consumption(&self, target: &mut Option<u64>) {
        if !self.can_consume() {
            return;
        }
        let (_, q) = self.cmdq();
        let ahead = u64::from(q.prod().wrapping_sub(q.cons()) & ((2 << q.log2size()) - 1))
            .min(u64::from(q.entries()));
        if ahead > 0 {
            let t = self.consumed + ahead;
            *target = Some(target.map_or(t, |x| x.max(t)));
        }
    }

    /// Whether guest commands can be consumed now (CMDQEN, no error standing).
    pub(super) fn can_consume(&self) -> bool {
        self.cr0().contains(Cr0::CMDQEN) && !self.cmdq_error_active() && !self.stopped
    }

    pub(super) fn cmdq_error_active(&self) -> bool {
        (self.r.gerror ^ self.r.gerrorn) & Gerror::CMDQ_ERR.bits() != 0
    }

    /// Consumes the guest's commands from CONS to PROD (at most one queue's worth, so a trap's
    /// work is bounded). Stops at the first bad command with CMDQ_CONS.ERR and GERROR.CMDQ_ERR,
    /// CONS left pointing at it (IHI 0070 7.1); pauses before an invalidation whose ordering
    /// behind earlier STE or CD work needs that work complete first.
    pub(super) fn process_cmdq(
        &mut self,
        mem: &mut impl GuestMemory,
        phys: &mut impl PhysicalSmmu,
    ) -> Result<(), Pause> {
        if !self.can_consume() {
            return Ok(());
        }
        let start = self.fetched;
        let (base, mut q) = self.cmdq();
        let mut error = None;
        let mut result = Ok(());
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
            if self.barrier && orders_after_config(&cmd) {
                if let Err(p) = self.config_complete(mem, phys) {
                    // Not consumed: the trap that goes on after the wait takes it from here.
                    result = Err(p);
                    break;
                }
            }
            if let Err(e) = self.execute(cmd) {
                self.stats.commands += 1;
                error = Some(e);
                break;
            }
            self.stats.commands += 1;
            q.inc_cons();
            self.fetched = q.cons();
            self.consumed += 1;
            if let Command::Sync(s) = cmd {
                // SIG_SEV (SEV not implemented) and SIG_NONE: completion is CONS moving past it.
                self.stats.syncs += 1;
                let msi = (s.cs == SyncCs::Irq && s.msiaddr != 0).then_some((s.msiaddr, s.msidata));
                if self.config_unsettled() {
                    // Invalidations after this CMD_SYNC follow the STE and CD work before it.
                    self.barrier = true;
                }
                self.completion(
                    Cover::Pending,
                    Effect::Cons {
                        cons: q.cons(),
                        sync: true,
                        msi,
                    },
                );
            }
        }
        if let Some(e) = error {
            self.stats.command_errors += 1;
            log::warn!(
                "vsmmu: {}: command at CMDQ index {} refused ({e:?}): queue stopped (CERROR)",
                self.cfg.name,
                q.cons_index()
            );
            self.stopped = true;
            let cons = q.cons() | (u32::from(e.code()) << 24 & CONS_ERR);
            self.completion(Cover::Now, Effect::Error { cons });
        } else if self.fetched != start
            && !self.inflight.back().is_some_and(
                |c| matches!(c.what, Effect::Cons { cons, .. } if cons == self.fetched),
            )
        {
            self.completion(
                Cover::Now,
                Effect::Cons {
                    cons: self.fetched,
                    sync: false,
                    msi: None,
                },
            );
        }
        result
    }

    pub(super) fn execute(&mut self, cmd: Command) -> Result<(), Cerror> {
        let vmid = self.vmid();
        let tlbi = match cmd {
            Command::PrefetchConfig { .. } | Command::PrefetchAddr { .. } | Command::Sync(_) => {
                return Ok(());
            }
            Command::CfgiSte { sid, .. } => {
                self.invalidate(Some((sid, 1)), true, true);
                return Ok(());
            }
            Command::CfgiSteRange { sid, range } => {
                let n = 2u64 << range;
                let start = u64::from(sid) & !(n - 1);
                self.invalidate(Some((start as u32, n)), true, true);
                return Ok(());
            }
            Command::CfgiAll => {
                self.invalidate(None, false, true);
                return Ok(());
            }
            Command::CfgiCd { sid, ssid, leaf } => {
                // SSIDSIZE is 0: only SubstreamID 0 exists.
                if ssid != 0 {
                    return Err(Cerror::Illegal);
                }
                if let Some(psid) = self.psid(sid) {
                    let c = Command::CfgiCd {
                        sid: psid,
                        ssid,
                        leaf,
                    };
                    self.batch.push_config(c, true);
                    self.config_cover = Cover::Pending;
                }
                return Ok(());
            }
            Command::CfgiCdAll { sid } => {
                if let Some(psid) = self.psid(sid) {
                    self.batch
                        .push_config(Command::CfgiCdAll { sid: psid }, true);
                    self.config_cover = Cover::Pending;
                }
                return Ok(());
            }
            // The guest's SMMU has no stage 2, so its VMID fields mean nothing: every stage-1
            // invalidation is scoped to the VM's VMID.
            Command::TlbiNhAll { .. } | Command::TlbiNsnhAll => Command::TlbiNhAll { vmid },
            Command::TlbiNhAsid { asid, .. } => Command::TlbiNhAsid { vmid, asid },
            Command::TlbiNhVa { asid, addr, .. } => {
                let addr = self.tlbi_addr(addr)?;
                Command::TlbiNhVa { vmid, asid, addr }
            }
            Command::TlbiNhVaa { addr, .. } => {
                let addr = self.tlbi_addr(addr)?;
                Command::TlbiNhVaa { vmid, addr }
            }
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
        };
        let limit = usize::from(self.cfg.budget.tlbi_per_trap);
        self.stats.tlbi_merged += self.batch.push_tlbi(tlbi, limit);
        Ok(())
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
}

/// Invalidations the guest may order behind its STE and CD changes with a CMD_SYNC: TLBIs
/// and CD invalidations (an STE invalidation is itself such a change).
fn orders_after_config(c: &Command) -> bool {
    matches!(
        c,
        Command::TlbiNhAll { .. }
            | Command::TlbiNsnhAll
            | Command::TlbiNhAsid { .. }
            | Command::TlbiNhVa { .. }
            | Command::TlbiNhVaa { .. }
            | Command::CfgiCd { .. }
            | Command::CfgiCdAll { .. }
    )
}
