//! Per-VM trap and work counters.

use crate::regs;

/// Trap and work counters of one vSMMU since its last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Register reads, by register ([`reg_index`]).
    pub reads: [u64; REG_SLOTS],
    /// Register writes, by register ([`reg_index`]).
    pub writes: [u64; REG_SLOTS],
    /// Guest commands consumed.
    pub commands: u64,
    /// Guest CMD_SYNCs completed.
    pub syncs: u64,
    /// Physical commands submitted on the guest's behalf, after merging (not counting the
    /// CMD_CFGI_STEs of physical STE writes).
    pub phys_commands: u64,
    /// Physical CMD_SYNCs issued on the guest's behalf (not counting a break-before-make's).
    pub phys_syncs: u64,
    /// Physical STEs written (rewrites; at most one per stream per trap).
    pub ste_writes: u64,
    /// Events written into the guest's event queue.
    pub guest_events: u64,
    /// Events for the guest dropped (queue disabled or full).
    pub dropped_events: u64,
    /// Stage-2 (hypervisor-owned) faults of the VM's streams.
    pub s2_faults: u64,
    /// Guest commands refused with CERROR_ILL or CERROR_ABT.
    pub command_errors: u64,
    /// Guest TLBIs not forwarded as a physical command of their own: duplicates in a trap,
    /// subsumed by a TLBI_NH_ALL of the VM's VMID, or collapsed into one past the per-trap cap.
    pub tlbi_merged: u64,
    /// Guest CMD_SYNCs completed without a physical CMD_SYNC of their own (another one in the
    /// same trap, or an earlier one still in flight, covered them; or none was needed).
    pub syncs_merged: u64,
    /// Times a trap waited for the VM's budget: over its outstanding physical entries, or out
    /// of STE operations or CMD_SYNCs for the moment.
    pub budget_waits: u64,
    /// Times a trap waited for an STE or CD change to take effect before an invalidation the
    /// guest ordered after it.
    pub order_waits: u64,
    /// GBPA updates that waited for the STE budget (UPDATE read 1 meanwhile).
    pub gbpa_deferred: u64,
    /// Reshadowed streams whose physical STE needed no write (unchanged physical configuration).
    pub ste_skipped: u64,
    /// Physical STE writes that were a break-before-make (a CMD_SYNC waited for between).
    pub ste_breaks: u64,
    /// Times one of the VM's streams was quarantined for faulting beyond its event budget.
    pub evt_quarantined: u64,
    /// Event records of the VM's streams dropped by the event budget.
    pub evt_suppressed: u64,
    /// Physical CMD_SYNCs that failed or could not be queued (each reported to the guest as
    /// CERROR_ABT at its first CMD_SYNC not completed).
    pub phys_sync_errors: u64,
}

/// Counter slots: page 0 registers 0x00-0xfc, page 1 registers 0x00-0xfc, one for the rest.
pub const REG_SLOTS: usize = 129;

/// The counter slot of register offset `off`.
pub fn reg_index(off: u64) -> usize {
    let page = (off >> 16) & 1;
    let o = off & 0xffff;
    if o < 0x100 && off < regs::MMIO_SIZE {
        (page * 64 + o / 4) as usize
    } else {
        REG_SLOTS - 1
    }
}

/// The spec name of the register at counter slot `slot` (64-bit registers by their low word).
pub fn reg_name(slot: usize) -> &'static str {
    const NAMES: &[(u64, &str)] = &[
        (regs::SMMU_IDR0, "IDR0"),
        (regs::SMMU_IDR1, "IDR1"),
        (regs::SMMU_IDR2, "IDR2"),
        (regs::SMMU_IDR3, "IDR3"),
        (regs::SMMU_IDR4, "IDR4"),
        (regs::SMMU_IDR5, "IDR5"),
        (regs::SMMU_IIDR, "IIDR"),
        (regs::SMMU_AIDR, "AIDR"),
        (regs::SMMU_CR0, "CR0"),
        (regs::SMMU_CR0ACK, "CR0ACK"),
        (regs::SMMU_CR1, "CR1"),
        (regs::SMMU_CR2, "CR2"),
        (regs::SMMU_STATUSR, "STATUSR"),
        (regs::SMMU_GBPA, "GBPA"),
        (regs::SMMU_IRQ_CTRL, "IRQ_CTRL"),
        (regs::SMMU_IRQ_CTRLACK, "IRQ_CTRLACK"),
        (regs::SMMU_GERROR, "GERROR"),
        (regs::SMMU_GERRORN, "GERRORN"),
        (regs::SMMU_GERROR_IRQ_CFG0, "GERROR_IRQ_CFG0"),
        (regs::SMMU_GERROR_IRQ_CFG1, "GERROR_IRQ_CFG1"),
        (regs::SMMU_GERROR_IRQ_CFG2, "GERROR_IRQ_CFG2"),
        (regs::SMMU_STRTAB_BASE, "STRTAB_BASE"),
        (regs::SMMU_STRTAB_BASE_CFG, "STRTAB_BASE_CFG"),
        (regs::SMMU_CMDQ_BASE, "CMDQ_BASE"),
        (regs::SMMU_CMDQ_PROD, "CMDQ_PROD"),
        (regs::SMMU_CMDQ_CONS, "CMDQ_CONS"),
        (regs::SMMU_EVENTQ_BASE, "EVENTQ_BASE"),
        (regs::SMMU_EVENTQ_IRQ_CFG0, "EVENTQ_IRQ_CFG0"),
        (regs::SMMU_EVENTQ_IRQ_CFG1, "EVENTQ_IRQ_CFG1"),
        (regs::SMMU_EVENTQ_IRQ_CFG2, "EVENTQ_IRQ_CFG2"),
        (regs::SMMU_EVENTQ_PROD, "EVENTQ_PROD"),
        (regs::SMMU_EVENTQ_CONS, "EVENTQ_CONS"),
    ];
    NAMES
        .iter()
        .find(|(o, _)| reg_index(*o) == slot || reg_index(*o + 4) == slot && is_reg64(*o))
        .map_or("other", |(_, n)| n)
}

/// The 64-bit registers (their high word has no name of its own).
fn is_reg64(off: u64) -> bool {
    matches!(
        off,
        regs::SMMU_GERROR_IRQ_CFG0
            | regs::SMMU_STRTAB_BASE
            | regs::SMMU_CMDQ_BASE
            | regs::SMMU_EVENTQ_BASE
            | regs::SMMU_EVENTQ_IRQ_CFG0
    )
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            reads: [0; REG_SLOTS],
            writes: [0; REG_SLOTS],
            commands: 0,
            syncs: 0,
            phys_commands: 0,
            phys_syncs: 0,
            ste_writes: 0,
            guest_events: 0,
            dropped_events: 0,
            s2_faults: 0,
            command_errors: 0,
            tlbi_merged: 0,
            syncs_merged: 0,
            budget_waits: 0,
            order_waits: 0,
            gbpa_deferred: 0,
            ste_skipped: 0,
            ste_breaks: 0,
            evt_quarantined: 0,
            evt_suppressed: 0,
            phys_sync_errors: 0,
        }
    }
}

impl Stats {
    /// Every trapped register access.
    pub fn traps(&self) -> u64 {
        self.reads.iter().chain(self.writes.iter()).sum()
    }

    /// Register reads.
    pub fn reg_reads(&self) -> u64 {
        self.reads.iter().sum()
    }

    /// Register writes.
    pub fn reg_writes(&self) -> u64 {
        self.writes.iter().sum()
    }
}
