//! The physical GICv3 ITS (IHI 0069H chapter 5 and 12.19): the hypervisor owns every ITS of the
//! machine and the physical LPIs, so that an assigned PCI function's MSI (its DeviceID, an
//! EventID written to GITS_TRANSLATER) becomes a physical LPI taken at EL2 on the CPU the
//! hypervisor chose.
//!
//! The driver is generic over its registers ([`ItsRegs`]) and memory ([`ItsMemory`]), so it is
//! tested on the host against a recording fake ITS (`fake`). It keeps:
//! - flat Device and Collection tables (GITS_BASER<n>), sized for the DeviceIDs the caller
//!   says it needs rather than for Devbits (2^16 × 8 B would be 512 KiB of a 16 MiB heap);
//! - one 64 KiB command queue, every batch of commands waited for with a bounded GITS_CREADR
//!   poll (a stalled or hung ITS is an error, never a hang);
//! - the LPI property table (one, shared by every redistributor) and one pending table per
//!   CPU, which `arch::gic` programs into GICR_PROPBASER/GICR_PENDBASER;
//! - one collection per CPU (ICID = CPU index);
//! - per device an ITT, and per mapped event a physical LPI from a bitmap allocator, with its
//!   owner (VM, DeviceID, EventID);
//! - with GICv4.0 (GITS_TYPER.Virtual and [`ItsConfig::vpes`]): a flat vPE table, per VM a
//!   vLPI property table of its own (never guest memory) and per vCPU a vPE with a zeroed
//!   pending table (vPT), and events mapped straight to a vPE's vLPI (VMAPTI) instead of a
//!   physical LPI. Such an event still takes an index of the LPI allocator as its handle (the
//!   vITS model keys its translations by it), whose physical LPI stays disabled and unmapped.

pub mod cmd;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fake;
mod lpi;
pub mod regs;
#[cfg(test)]
mod tests;

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use cmd::{AnyCommand, Command, VCommand, CMD_SIZE, NO_DOORBELL};
use regs::*;

/// The first LPI INTID (IHI 0069H 1.2.1): property table entry 0 is LPI 8192.
pub const FIRST_LPI: u32 = 8192;
/// The command queue: 64 KiB, 2048 commands (as Linux's ITS_CMD_QUEUE_SZ).
pub const CMDQ_SIZE: usize = 0x1_0000;
/// Property byte bit 1 is RES1 (IHI 0069H 5.1.1, "LPI Configuration tables").
const PROP_RES1: u8 = 1 << 1;
/// Property byte bit 0: the LPI is enabled.
const PROP_ENABLE: u8 = 1;
/// Most DeviceID bits the Device table is ever sized for (2^16 × 8 B = 512 KiB flat).
pub const MAX_DEVICE_BITS: u32 = 16;
/// LPI INTID bits the driver uses at most: 2^16 - 8192 LPIs.
pub const MAX_LPI_BITS: u32 = 16;
/// Fewest LPI INTID bits: 14 bits still give 8192 LPIs.
pub const MIN_LPI_BITS: u32 = 14;

/// The LPI INTID bits to drive a distributor with `gic_bits` (GICD_TYPER.IDbits + 1) for a
/// machine of `cpus` CPUs: the fewest, from [`MIN_LPI_BITS`], whose LPIs cover `per_vm` events
/// for as many VMs as there are CPUs (each VM has at least one), so a VM can never take the
/// LPIs another needs; as many as the GIC has if even that is short.
///
/// Fewer bits mean smaller tables (the property table is 2^bits − 8192 bytes, each CPU's pending
/// table 2^bits / 8), and, under QEMU, cheaper LPIs: QEMU's redistributor rescans the whole
/// pending table, a byte at a time, whenever the pending LPI it had chosen is taken
/// (`update_for_all_lpis` in hw/intc/arm_gicv3_redist.c), so with 16 bits every LPI taken at
/// EL2 cost about 100 µs there.
pub fn lpi_bits_for(cpus: usize, gic_bits: u32, per_vm: usize) -> u32 {
    let top = gic_bits.min(MAX_LPI_BITS);
    let need = cpus.max(1) as u64 * per_vm as u64;
    (MIN_LPI_BITS..=top)
        .find(|&b| (1u64 << b) - u64::from(FIRST_LPI) >= need)
        .unwrap_or(top)
}
/// A VM's vLPI property table: 64 KiB, entries for vINTIDs 8192..65535 (the guest's vGIC has
/// 16 INTID bits), as Linux's LPI_PROPBASE_SZ. GICR_VPROPBASER holds PA[51:12]: 4 KiB aligned.
pub const VPROP_SIZE: usize = 0x1_0000;
/// vINTID bits of every vPE (the vGIC's GICD_TYPER.IDbits + 1): VPROPBASER.IDbits and VMAPP
/// VPT_size are this - 1.
pub const VLPI_BITS: u32 = 16;
/// A vPE's pending table: 64 KiB, 64 KiB aligned (VMAPP VPT_addr and GICR_VPENDBASER hold
/// PA[51:16]), as Linux's its_allocate_pending_table.
pub const VPT_SIZE: usize = 0x1_0000;

/// The ITS control frame's registers, by offset from ITS_base (`regs`).
pub trait ItsRegs {
    /// A 32-bit register (GITS_CTLR).
    fn read32(&self, offset: u64) -> u32;
    /// Writes a 32-bit register.
    fn write32(&mut self, offset: u64, value: u32);
    /// A 64-bit register (GITS_TYPER, GITS_CBASER, GITS_CWRITER, GITS_CREADR, GITS_BASER<n>).
    fn read64(&self, offset: u64) -> u64;
    /// Writes a 64-bit register. On hardware it must be ordered after every earlier memory
    /// write (a `dsb` first), since a GITS_CWRITER write publishes the queue's contents.
    fn write64(&mut self, offset: u64, value: u64);
}

/// The memory the ITS and the redistributors read: tables, ITTs, the command queue.
///
/// Not the SMMU driver's `DmaMemory`: that has no way to free (SMMU tables live forever) and
/// a queue type for lock-free multi-CPU writes, while ITTs are freed with their device and
/// the ITS queue is written under one lock.
pub trait ItsMemory {
    /// `size` zeroed, physically contiguous bytes aligned to `align` (a power of two), by PA.
    fn alloc_zeroed(&mut self, size: usize, align: usize) -> Option<u64>;
    /// Gives back an allocation made with the same `size` and `align`.
    fn free(&mut self, pa: u64, size: usize, align: usize);
    /// Writes `data` at `pa`.
    fn write(&mut self, pa: u64, data: &[u8]);
    /// Reads `buf.len()` bytes at `pa`.
    fn read(&self, pa: u64, buf: &mut [u8]);
    /// Cleans `[pa, pa + len)` to the point of coherency, for an observer that does not snoop
    /// the CPU's caches (a non-cacheable table, the redistributors' property table).
    fn clean(&mut self, pa: u64, len: usize);
}

/// What the caller knows that the ITS does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItsConfig {
    /// The largest DeviceID that will be mapped: the Device table is sized for it (rounded up
    /// to whole pages), not for GITS_TYPER.Devbits.
    pub max_device_id: u32,
    /// Physical CPUs: one collection and one pending table each.
    pub cpus: usize,
    /// LPI INTID bits the distributor supports (GICD_TYPER.IDbits + 1); clamped to
    /// [`MAX_LPI_BITS`].
    pub lpi_bits: u32,
    /// Priority of every LPI (the property byte's [7:2]), the hypervisor's interrupt priority.
    pub priority: u8,
    /// Register reads a poll (Quiescent, CREADR) makes before giving up.
    pub poll_limit: u32,
    /// vPEs (vCPUs of VMs with direct injection) the vPE table is sized for; 0 means no
    /// GICv4 use even on an ITS with GITS_TYPER.Virtual.
    pub vpes: usize,
}

/// What failed, on which ITS.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ITS at {base:#x}: {kind}")]
pub struct ItsError {
    /// ITS_base.
    pub base: u64,
    /// What went wrong.
    pub kind: ItsErrorKind,
}

/// The ways the driver fails.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ItsErrorKind {
    /// GITS_TYPER.Physical = 0.
    #[error("GITS_TYPER.Physical is 0: no physical LPIs")]
    NotPhysical,
    /// The distributor has too few INTID bits for LPIs.
    #[error("the distributor has {0} INTID bits, fewer than the {MIN_LPI_BITS} LPIs need")]
    TooFewLpiBits(u32),
    /// GITS_CTLR.Quiescent did not become 1 after clearing Enabled.
    #[error("GITS_CTLR.Quiescent never set after disabling")]
    NotQuiescent,
    /// A wanted table (Device, Collection) has no GITS_BASER<n>.
    #[error("no GITS_BASER<n> of type {0}")]
    NoTable(&'static str),
    /// No page size (64K, 16K, 4K) reads back from GITS_BASER<n>.
    #[error("GITS_BASER{0} accepts no page size")]
    NoPageSize(usize),
    /// A flat table would need more than 256 pages.
    #[error("GITS_BASER{0}: {1} bytes need more than 256 pages (flat)")]
    TableTooLarge(usize, usize),
    /// A register did not read back as written (beyond a shareability downgrade).
    #[error("{reg} doesn't stick: wrote {wrote:#x}, read {read:#x}")]
    DoesNotStick {
        /// Which register.
        reg: &'static str,
        /// What was written.
        wrote: u64,
        /// What was read back.
        read: u64,
    },
    /// The memory allocator refused.
    #[error("out of memory for {0}")]
    OutOfMemory(&'static str),
    /// More CPUs than collections (2^CIDbits).
    #[error("{cpus} CPUs but {cid_bits} collection ID bits")]
    TooManyCpus {
        /// CPUs asked for.
        cpus: usize,
        /// GITS_TYPER.CIDbits + 1.
        cid_bits: u32,
    },
    /// The DeviceID is beyond what the Device table or Devbits covers.
    #[error("DeviceID {0:#x} beyond the Device table")]
    DeviceOutOfRange(u32),
    /// An event count of 0 or beyond 2^IDbits.
    #[error("DeviceID {device:#x}: {events} events (1..=2^IDbits)")]
    BadEventCount {
        /// DeviceID.
        device: u32,
        /// Events asked for.
        events: u32,
    },
    /// The DeviceID is mapped already.
    #[error("DeviceID {0:#x} already mapped")]
    DeviceMapped(u32),
    /// The DeviceID is not mapped, or not by this VM.
    #[error("DeviceID {device:#x} is not mapped for VM {vm}")]
    NotOwner {
        /// DeviceID.
        device: u32,
        /// The VM that asked.
        vm: usize,
    },
    /// The EventID is at or beyond the device's event count.
    #[error("DeviceID {device:#x}: EventID {event} beyond its ITT")]
    EventOutOfRange {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// The event is mapped already.
    #[error("DeviceID {device:#x} EventID {event} already mapped")]
    EventMapped {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// The event is not mapped.
    #[error("DeviceID {device:#x} EventID {event} not mapped")]
    EventUnmapped {
        /// DeviceID.
        device: u32,
        /// EventID.
        event: u32,
    },
    /// An INTID that is not an LPI the driver handed out.
    #[error("LPI {0} is not mapped")]
    UnknownLpi(u32),
    /// Every LPI is in use.
    #[error("no free LPI")]
    NoFreeLpi,
    /// The CPU's collection is not mapped (its per-CPU init did not run or failed).
    #[error("CPU {0} has no collection")]
    NoCollection(usize),
    /// GITS_CREADR did not reach GITS_CWRITER within the poll limit.
    #[error("command queue timeout: GITS_CREADR {creadr:#x}, GITS_CWRITER {cwriter:#x}")]
    Timeout {
        /// Last GITS_CREADR read.
        creadr: u64,
        /// GITS_CWRITER written.
        cwriter: u64,
    },
    /// GITS_CREADR.Stalled: the ITS stopped on a command (a memory error).
    #[error("command queue stalled at offset {offset:#x} on {command:?}")]
    Stalled {
        /// GITS_CREADR.Offset of the stalled command.
        offset: u64,
        /// That command as the driver wrote it.
        command: AnyCommand,
    },
    /// Direct injection asked of an ITS without a vPE table.
    #[error("no GICv4 direct injection (GITS_TYPER.Virtual or the vPE table missing)")]
    NoVirtual,
    /// The vPE table has no free vPEID left.
    #[error("no free vPEID")]
    NoFreeVpe,
    /// The VM has vPEs already, or has none, or no vPE with that index.
    #[error("VM {vm}: vPE state does not allow this ({what})")]
    VpeState {
        /// The VM.
        vm: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// The queue has not room for the commands (earlier ones never completed).
    #[error("command queue full")]
    QueueFull,
    /// An earlier stall: the driver issues no more commands to this ITS.
    #[error("the command queue stalled earlier; the ITS is no longer used")]
    Broken,
}

#[derive(Clone, Copy, Debug)]
struct DeviceState {
    owner: usize,
    /// EventIDs the ITT holds (a power of two).
    events: u32,
    itt: u64,
    itt_size: usize,
}

/// Who a physical LPI belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapping {
    owner: usize,
    device: u32,
    event: u32,
    cpu: usize,
    /// Mapped to a vLPI (VMAPTI) of the VM's vPE with this index, rather than to the pLPI.
    vpe: Option<usize>,
}

/// One vCPU's vPE (GICv4.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vpe {
    /// Its vPEID.
    pub id: u16,
    /// The CPU (collection index) its vCPU is pinned to.
    pub cpu: usize,
    /// That CPU's redistributor as VMAPP names it (GITS_TYPER.PTA: processor number or PA).
    pub rdbase: u64,
    /// Its pending table's PA (64 KiB aligned, [`VPT_SIZE`]).
    pub vpt: u64,
    /// Whether the ITS has it mapped (VMAPP V=1).
    pub mapped: bool,
}

/// One VM's GICv4.0 state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct VmVpes {
    /// Its vLPI property table's PA ([`VPROP_SIZE`]).
    vprop: u64,
    /// One per vCPU, by vCPU index.
    vpes: Vec<Vpe>,
}

/// A table the ITS was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Its GITS_BASER<n>.
    pub index: usize,
    /// Its physical address.
    pub pa: u64,
    /// Its page size.
    pub page: usize,
    /// Its pages.
    pub pages: usize,
    /// Bytes per entry.
    pub entry_size: usize,
}

/// One physical ITS.
pub struct Its<R: ItsRegs, M: ItsMemory> {
    base: u64,
    regs: R,
    mem: M,
    typer: Typer,
    cfg: ItsConfig,
    /// False when the ITS downgraded shareability: its tables and queue are then
    /// non-cacheable and cleaned after every write.
    cacheable: bool,
    device_table: TableInfo,
    collection_table: Option<TableInfo>,
    cmdq: u64,
    cwriter: u64,
    lpi_bits: u32,
    prop: u64,
    pending: Vec<u64>,
    /// RDbase of each CPU's collection, once mapped.
    collections: Vec<Option<u64>>,
    devices: BTreeMap<u32, DeviceState>,
    mappings: BTreeMap<u32, Mapping>,
    events: BTreeMap<(u32, u32), u32>,
    lpis: lpi::Lpis,
    broken: bool,
    /// The vPE table (GICv4.0), when the ITS has Virtual and the caller wants vPEs.
    vpe_table: Option<TableInfo>,
    /// vPEIDs in use.
    vpe_ids: lpi::Lpis,
    vms: BTreeMap<usize, VmVpes>,
}

impl<R: ItsRegs, M: ItsMemory> core::fmt::Debug for Its<R, M> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Its")
            .field("base", &self.base)
            .field("typer", &self.typer)
            .field("devices", &self.devices.len())
            .field("lpis", &self.mappings.len())
            .finish()
    }
}

impl<R: ItsRegs, M: ItsMemory> Its<R, M> {
    fn err(&self, kind: ItsErrorKind) -> ItsError {
        ItsError {
            base: self.base,
            kind,
        }
    }

    /// Takes over the ITS at `base`: quiesces it, gives it its tables and command queue,
    /// allocates the LPI property and pending tables, and enables it. Nothing is mapped yet;
    /// each CPU then calls [`Its::init_cpu`].
    pub fn probe(base: u64, mut regs: R, mut mem: M, cfg: ItsConfig) -> Result<Self, ItsError> {
        let err = |kind| ItsError { base, kind };
        let typer = Typer::decode(regs.read64(GITS_TYPER));
        if !typer.physical {
            return Err(err(ItsErrorKind::NotPhysical));
        }
        let lpi_bits = cfg.lpi_bits.min(MAX_LPI_BITS);
        if lpi_bits < MIN_LPI_BITS {
            return Err(err(ItsErrorKind::TooFewLpiBits(cfg.lpi_bits)));
        }
        if cfg.cpus as u64 > 1u64 << typer.cid_bits.min(16) {
            return Err(err(ItsErrorKind::TooManyCpus {
                cpus: cfg.cpus,
                cid_bits: typer.cid_bits,
            }));
        }
        let dev_bits = typer.dev_bits.min(MAX_DEVICE_BITS);
        if u64::from(cfg.max_device_id) >= 1u64 << dev_bits {
            return Err(err(ItsErrorKind::DeviceOutOfRange(cfg.max_device_id)));
        }

        // Quiesce (IHI 0069H 12.19.4, GITS_CTLR): tables and queue may only be changed with
        // Enabled = 0 and Quiescent = 1, as after a previous owner (firmware, a kexec).
        let ctlr = regs.read32(GITS_CTLR);
        if ctlr & CTLR_ENABLED != 0 || ctlr & CTLR_QUIESCENT == 0 {
            regs.write32(GITS_CTLR, ctlr & !CTLR_ENABLED);
            let mut quiet = false;
            for _ in 0..cfg.poll_limit {
                if regs.read32(GITS_CTLR) & CTLR_QUIESCENT != 0 {
                    quiet = true;
                    break;
                }
            }
            if !quiet {
                return Err(err(ItsErrorKind::NotQuiescent));
            }
        }

        let mut cacheable = true;
        let mut device_table = None;
        let mut collection_table = None;
        let mut vpe_table = None;
        let want_vpes = typer.virtual_ && cfg.vpes > 0;
        for n in 0..GITS_BASER_COUNT as usize {
            let off = GITS_BASER + 8 * n as u64;
            let v = regs.read64(off);
            let ty = (v >> BASER_TYPE_SHIFT) & 7;
            let esz = (((v >> BASER_ESZ_SHIFT) & 0x1F) + 1) as usize;
            let (entries, what) = match ty {
                TYPE_DEVICE if device_table.is_none() => {
                    (cfg.max_device_id as usize + 1, "the Device table")
                }
                TYPE_COLLECTION if collection_table.is_none() => {
                    (cfg.cpus.max(1), "the Collection table")
                }
                TYPE_VPE if want_vpes && vpe_table.is_none() => (cfg.vpes, "the vPE table"),
                _ => {
                    // Unwanted vPE tables and unknown types: not used; zero is "not valid".
                    if v & BASER_VALID != 0 {
                        regs.write64(off, v & !BASER_VALID);
                    }
                    continue;
                }
            };
            let t = Self::table(
                &mut regs,
                &mut mem,
                base,
                n,
                v,
                esz,
                entries,
                what,
                &mut cacheable,
            )?;
            match ty {
                TYPE_DEVICE => device_table = Some(t),
                TYPE_VPE => vpe_table = Some(t),
                _ => collection_table = Some(t),
            }
        }
        let device_table = device_table.ok_or_else(|| err(ItsErrorKind::NoTable("Device")))?;
        // GITS_TYPER.HCC collections live in the ITS; more CPUs than that need the table.
        let hcc = ((regs.read64(GITS_TYPER) >> 24) & 0xFF) as usize;
        if collection_table.is_none() && cfg.cpus > hcc {
            return Err(err(ItsErrorKind::NoTable("Collection")));
        }

        // The command queue (IHI 0069H 12.19.2, GITS_CBASER): Size [7:0] is 4 KiB pages - 1.
        let cmdq = mem
            .alloc_zeroed(CMDQ_SIZE, 0x1_0000)
            .ok_or_else(|| err(ItsErrorKind::OutOfMemory("the command queue")))?;
        let share = if cacheable { SHARE_INNER } else { 0 };
        let cache = if cacheable { CACHE_RAWAWB } else { CACHE_NC };
        let mut cbaser = CBASER_VALID
            | cache
            | (cmdq & CBASER_PA_MASK)
            | share
            | (CMDQ_SIZE / 0x1000 - 1) as u64;
        regs.write64(GITS_CBASER, cbaser);
        let mut read = regs.read64(GITS_CBASER);
        if read & SHARE_MASK != cbaser & SHARE_MASK {
            cacheable = false;
            cbaser = (cbaser & !(SHARE_MASK | CACHE_MASK)) | (read & SHARE_MASK) | CACHE_NC;
            regs.write64(GITS_CBASER, cbaser);
            read = regs.read64(GITS_CBASER);
        }
        if read != cbaser {
            return Err(err(ItsErrorKind::DoesNotStick {
                reg: "GITS_CBASER",
                wrote: cbaser,
                read,
            }));
        }
        regs.write64(GITS_CWRITER, 0);

        // The LPI tables (IHI 0069H 5.1.1, 5.1.2): property entries from LPI 8192; the
        // pending table covers every INTID below 2^bits, 64 KiB aligned (GICR_PENDBASER
        // holds PA[51:16]).
        let prop_size = (1usize << lpi_bits) - FIRST_LPI as usize;
        let prop = mem
            .alloc_zeroed(prop_size, 0x1_0000)
            .ok_or_else(|| err(ItsErrorKind::OutOfMemory("the LPI property table")))?;
        let disabled = alloc::vec![(cfg.priority & 0xFC) | PROP_RES1; prop_size];
        mem.write(prop, &disabled);
        mem.clean(prop, prop_size);
        let pend_size = (1usize << lpi_bits) / 8;
        let mut pending = Vec::with_capacity(cfg.cpus);
        for _ in 0..cfg.cpus {
            let p = mem
                .alloc_zeroed(pend_size, 0x1_0000)
                .ok_or_else(|| err(ItsErrorKind::OutOfMemory("an LPI pending table")))?;
            mem.clean(p, pend_size);
            pending.push(p);
        }

        regs.write32(GITS_CTLR, regs.read32(GITS_CTLR) | CTLR_ENABLED);
        Ok(Self {
            base,
            regs,
            mem,
            typer,
            cfg,
            cacheable,
            device_table,
            collection_table,
            cmdq,
            cwriter: 0,
            lpi_bits,
            prop,
            pending,
            collections: alloc::vec![None; cfg.cpus],
            devices: BTreeMap::new(),
            mappings: BTreeMap::new(),
            events: BTreeMap::new(),
            lpis: lpi::Lpis::new((1u32 << lpi_bits) - FIRST_LPI),
            broken: false,
            vpe_ids: lpi::Lpis::new(vpe_table.map_or(0, |t: TableInfo| {
                ((t.pages * t.page / t.entry_size).min(cfg.vpes).min(1 << 16)) as u32
            })),
            vpe_table,
            vms: BTreeMap::new(),
        })
    }

    /// Gives GITS_BASER`n` a flat table of `entries` entries (IHI 0069H 12.19.1): the largest
    /// page size it accepts, Valid|PA|Size|Type|cache, read back whole (a downgraded
    /// shareability makes every table and the queue non-cacheable, as Linux does).
    #[allow(clippy::too_many_arguments)]
    fn table(
        regs: &mut R,
        mem: &mut M,
        base: u64,
        n: usize,
        reset: u64,
        esz: usize,
        entries: usize,
        what: &'static str,
        cacheable: &mut bool,
    ) -> Result<TableInfo, ItsError> {
        let err = |kind| ItsError { base, kind };
        let off = GITS_BASER + 8 * n as u64;
        let keep = reset & ((7 << BASER_TYPE_SHIFT) | (0x1F << BASER_ESZ_SHIFT));
        let mut page = None;
        for (enc, size) in PAGE_SIZES {
            regs.write64(off, keep | enc << BASER_PSZ_SHIFT);
            if (regs.read64(off) >> BASER_PSZ_SHIFT) & 3 == enc {
                page = Some((enc, size));
                break;
            }
        }
        let (enc, psz) = page.ok_or_else(|| err(ItsErrorKind::NoPageSize(n)))?;
        let bytes = entries * esz;
        let pages = bytes.div_ceil(psz).max(1);
        if pages > 256 {
            return Err(err(ItsErrorKind::TableTooLarge(n, bytes)));
        }
        let pa = mem
            .alloc_zeroed(pages * psz, psz)
            .ok_or_else(|| err(ItsErrorKind::OutOfMemory(what)))?;
        let (share, cache) = if *cacheable {
            (SHARE_INNER, CACHE_RAWAWB)
        } else {
            (0, CACHE_NC)
        };
        let mut val = BASER_VALID
            | cache
            | keep
            | baser_pa(pa, psz)
            | share
            | enc << BASER_PSZ_SHIFT
            | (pages - 1) as u64;
        regs.write64(off, val);
        let mut read = regs.read64(off);
        if read & SHARE_MASK != val & SHARE_MASK {
            *cacheable = false;
            val = (val & !(SHARE_MASK | CACHE_MASK)) | (read & SHARE_MASK) | CACHE_NC;
            regs.write64(off, val);
            read = regs.read64(off);
        }
        if read != val {
            mem.free(pa, pages * psz, psz);
            return Err(err(ItsErrorKind::DoesNotStick {
                reg: "GITS_BASER",
                wrote: val,
                read,
            }));
        }
        mem.clean(pa, pages * psz);
        Ok(TableInfo {
            index: n,
            pa,
            page: psz,
            pages,
            entry_size: esz,
        })
    }

    /// ITS_base.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// The physical address of GITS_TRANSLATER, the MSI doorbell.
    pub fn translater(&self) -> u64 {
        self.base + GITS_TRANSLATER
    }

    /// GITS_TYPER as read at probe.
    pub fn typer(&self) -> Typer {
        self.typer
    }

    /// LPIs the property table covers.
    pub fn lpi_count(&self) -> u32 {
        (1 << self.lpi_bits) - FIRST_LPI
    }

    /// LPIs mapped now.
    pub fn lpis_in_use(&self) -> u32 {
        self.lpis.in_use()
    }

    /// The Device table.
    pub fn device_table(&self) -> TableInfo {
        self.device_table
    }

    /// The Collection table, if the ITS has one.
    pub fn collection_table(&self) -> Option<TableInfo> {
        self.collection_table
    }

    /// Whether the tables and queue are cacheable (the ITS kept Inner Shareable).
    pub fn cacheable(&self) -> bool {
        self.cacheable
    }

    /// GICR_PROPBASER and GICR_PENDBASER for CPU `cpu`'s redistributor: the shared property
    /// table and its own pending table, with the INTID bits the driver uses.
    pub fn redistributor_tables(&self, cpu: usize) -> Option<(u64, u64)> {
        let pend = *self.pending.get(cpu)?;
        Some((propbaser(self.prop, self.lpi_bits), pendbaser(pend)))
    }

    /// Maps CPU `cpu`'s collection (ICID = `cpu`) to its redistributor, after the CPU's
    /// redistributor has LPIs enabled: MAPC, INVALL (it may have held stale configuration),
    /// SYNC. The target is GICR_TYPER.Processor_Number (`processor_number`) or, with
    /// GITS_TYPER.PTA, the redistributor's PA (`rd_pa`).
    pub fn init_cpu(
        &mut self,
        cpu: usize,
        processor_number: u16,
        rd_pa: u64,
    ) -> Result<(), ItsError> {
        if cpu >= self.collections.len() {
            return Err(self.err(ItsErrorKind::NoCollection(cpu)));
        }
        let rdbase = cmd::rdbase(self.typer.pta, processor_number, rd_pa);
        let icid = cpu as u16;
        self.send(&[
            Command::Mapc {
                icid,
                rdbase,
                valid: true,
            },
            Command::Invall { icid },
            Command::Sync { rdbase },
        ])?;
        self.collections[cpu] = Some(rdbase);
        Ok(())
    }

    fn rdbase(&self, cpu: usize) -> Result<u64, ItsError> {
        self.collections
            .get(cpu)
            .copied()
            .flatten()
            .ok_or_else(|| self.err(ItsErrorKind::NoCollection(cpu)))
    }

    fn device(&self, owner: usize, device: u32) -> Result<DeviceState, ItsError> {
        self.devices
            .get(&device)
            .filter(|d| d.owner == owner)
            .copied()
            .ok_or_else(|| self.err(ItsErrorKind::NotOwner { device, vm: owner }))
    }

    fn mapping(&self, owner: usize, device: u32, event: u32) -> Result<(u32, Mapping), ItsError> {
        self.device(owner, device)?;
        self.events
            .get(&(device, event))
            .and_then(|&plpi| Some((plpi, *self.mappings.get(&plpi)?)))
            .ok_or_else(|| self.err(ItsErrorKind::EventUnmapped { device, event }))
    }

    /// MAPD V=1: gives `device` (for VM `owner`) an ITT for `events` EventIDs (rounded up to a
    /// power of two; IHI 0069H 5.3.8: ITT_addr is 256-byte aligned).
    pub fn map_device(&mut self, owner: usize, device: u32, events: u32) -> Result<(), ItsError> {
        if device > self.cfg.max_device_id {
            return Err(self.err(ItsErrorKind::DeviceOutOfRange(device)));
        }
        if self.devices.contains_key(&device) {
            return Err(self.err(ItsErrorKind::DeviceMapped(device)));
        }
        if events == 0 || u64::from(events) > 1u64 << self.typer.id_bits.min(32) {
            return Err(self.err(ItsErrorKind::BadEventCount { device, events }));
        }
        let n = events.max(2).next_power_of_two();
        let itt_size = (n as usize * self.typer.itt_entry_size as usize).max(256);
        let itt = self
            .mem
            .alloc_zeroed(itt_size, 256)
            .ok_or_else(|| self.err(ItsErrorKind::OutOfMemory("an ITT")))?;
        self.mem.clean(itt, itt_size);
        // On failure whether the ITS took the ITT is unknown: it is leaked rather than reused.
        self.send(&[Command::Mapd {
            device,
            size: cmd::mapd_size(n),
            itt,
            valid: true,
        }])?;
        self.devices.insert(
            device,
            DeviceState {
                owner,
                events: n,
                itt,
                itt_size,
            },
        );
        Ok(())
    }

    /// Discards every event of `device`, then MAPD V=0, and frees its ITT and LPIs.
    pub fn unmap_device(&mut self, owner: usize, device: u32) -> Result<(), ItsError> {
        let dev = self.device(owner, device)?;
        let mine: Vec<(u32, u32)> = self
            .events
            .range((device, 0)..=(device, u32::MAX))
            .map(|(&(_, e), &p)| (e, p))
            .collect();
        let mut cmds: Vec<Command> = mine
            .iter()
            .map(|&(event, _)| Command::Discard { device, event })
            .collect();
        cmds.push(Command::Mapd {
            device,
            size: 0,
            itt: 0,
            valid: false,
        });
        let mut targets: Vec<AnyCommand> = Vec::new();
        for m in mine.iter().filter_map(|&(_, p)| self.mappings.get(&p)) {
            if let Ok(c) = self.sync_of(m) {
                if !targets.contains(&c) {
                    targets.push(c);
                }
            }
        }
        let mut cmds: Vec<AnyCommand> = cmds.into_iter().map(AnyCommand::from).collect();
        cmds.extend(targets);
        self.send(&cmds)?;
        for (event, plpi) in mine {
            self.release(device, event, plpi);
        }
        self.devices.remove(&device);
        self.mem.free(dev.itt, dev.itt_size, 256);
        Ok(())
    }

    fn set_prop(&mut self, plpi: u32, enabled: bool) {
        let at = self.prop + u64::from(plpi - FIRST_LPI);
        let byte = (self.cfg.priority & 0xFC) | PROP_RES1 | if enabled { PROP_ENABLE } else { 0 };
        self.mem.write(at, &[byte]);
        self.mem.clean(at, 1);
    }

    /// Records the mapping of (`m.device`, `m.event`) to `plpi` (what [`Its::release`] undoes).
    fn record(&mut self, plpi: u32, m: Mapping) {
        self.events.insert((m.device, m.event), plpi);
        self.mappings.insert(plpi, m);
    }

    fn release(&mut self, device: u32, event: u32, plpi: u32) {
        self.set_prop(plpi, false);
        self.events.remove(&(device, event));
        self.mappings.remove(&plpi);
        self.lpis.free(plpi - FIRST_LPI);
    }

    /// Checks that (`device`, `event`) can be mapped: `device` is `owner`'s, `event` within its
    /// ITT, and not mapped already.
    fn free_event(&self, owner: usize, device: u32, event: u32) -> Result<(), ItsError> {
        let dev = self.device(owner, device)?;
        if event >= dev.events {
            return Err(self.err(ItsErrorKind::EventOutOfRange { device, event }));
        }
        if self.events.contains_key(&(device, event)) {
            return Err(self.err(ItsErrorKind::EventMapped { device, event }));
        }
        Ok(())
    }

    /// Maps (`device`, `event`) to a free physical LPI, enabled, routed to CPU `cpu`: MAPTI,
    /// INV (the property byte was just written), SYNC. Returns the LPI.
    pub fn map_event(
        &mut self,
        owner: usize,
        device: u32,
        event: u32,
        cpu: usize,
    ) -> Result<u32, ItsError> {
        self.free_event(owner, device, event)?;
        let rdbase = self.rdbase(cpu)?;
        let plpi = FIRST_LPI
            + self
                .lpis
                .alloc()
                .ok_or_else(|| self.err(ItsErrorKind::NoFreeLpi))?;
        self.set_prop(plpi, true);
        let sent = self.send(&[
            Command::Mapti {
                device,
                event,
                intid: plpi,
                icid: cpu as u16,
            },
            Command::Inv { device, event },
            Command::Sync { rdbase },
        ]);
        if let Err(e) = sent {
            self.set_prop(plpi, false);
            self.lpis.free(plpi - FIRST_LPI);
            return Err(e);
        }
        self.record(
            plpi,
            Mapping {
                owner,
                device,
                event,
                cpu,
                vpe: None,
            },
        );
        Ok(plpi)
    }

    /// DISCARD + SYNC, and frees the event's LPI.
    pub fn unmap_event(&mut self, owner: usize, device: u32, event: u32) -> Result<(), ItsError> {
        let (plpi, m) = self.mapping(owner, device, event)?;
        let sync = self.sync_of(&m)?;
        self.send(&[Command::Discard { device, event }.into(), sync])?;
        self.release(device, event, plpi);
        Ok(())
    }

    /// MOVI to CPU `cpu`'s collection, then SYNC of the old target (its pending state has
    /// moved once the old redistributor has seen the MOVI: IHI 0069H 5.3.14). Not for an event
    /// mapped to a vLPI ([`Its::move_vevent`]): MOVI works on physical ITEs only.
    pub fn move_event(
        &mut self,
        owner: usize,
        device: u32,
        event: u32,
        cpu: usize,
    ) -> Result<(), ItsError> {
        let (plpi, m) = self.mapping(owner, device, event)?;
        if m.vpe.is_some() {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "MOVI of a virtual ITE",
            }));
        }
        let old = self.rdbase(m.cpu)?;
        self.rdbase(cpu)?;
        self.send(&[
            Command::Movi {
                device,
                event,
                icid: cpu as u16,
            },
            Command::Sync { rdbase: old },
        ])?;
        if let Some(m) = self.mappings.get_mut(&plpi) {
            m.cpu = cpu;
        }
        Ok(())
    }

    /// Moves every LPI of VM `owner` routed to CPU `from` to CPU `to` (a MOVI each, then a
    /// SYNC of `from`): the guest's MOVALL, with only the VM's own events moved, which a
    /// physical MOVALL (every LPI of the redistributor) would not promise.
    pub fn move_all(&mut self, owner: usize, from: usize, to: usize) -> Result<(), ItsError> {
        let old = self.rdbase(from)?;
        self.rdbase(to)?;
        let moving: Vec<u32> = self
            .mappings
            .iter()
            .filter(|(_, m)| m.owner == owner && m.cpu == from && m.vpe.is_none())
            .map(|(&p, _)| p)
            .collect();
        if moving.is_empty() {
            return Ok(());
        }
        let mut cmds: Vec<Command> = moving
            .iter()
            .filter_map(|p| self.mappings.get(p))
            .map(|m| Command::Movi {
                device: m.device,
                event: m.event,
                icid: to as u16,
            })
            .collect();
        cmds.push(Command::Sync { rdbase: old });
        // In chunks the queue can hold (it is empty between batches).
        for chunk in cmds.chunks(CMDQ_SIZE / CMD_SIZE / 2) {
            self.send(chunk)?;
        }
        for p in moving {
            if let Some(m) = self.mappings.get_mut(&p) {
                m.cpu = to;
            }
        }
        Ok(())
    }

    /// SYNC of CPU `cpu`'s redistributor: every earlier command's effect on it is visible.
    pub fn sync(&mut self, cpu: usize) -> Result<(), ItsError> {
        let rdbase = self.rdbase(cpu)?;
        self.send(&[Command::Sync { rdbase }])
    }

    /// INT + SYNC: makes the event's LPI pending.
    pub fn raise(&mut self, owner: usize, device: u32, event: u32) -> Result<(), ItsError> {
        let (_, m) = self.mapping(owner, device, event)?;
        let sync = self.sync_of(&m)?;
        self.send(&[Command::Int { device, event }.into(), sync])
    }

    /// CLEAR + SYNC: clears the event's LPI's pending state.
    pub fn clear(&mut self, owner: usize, device: u32, event: u32) -> Result<(), ItsError> {
        let (_, m) = self.mapping(owner, device, event)?;
        let sync = self.sync_of(&m)?;
        self.send(&[Command::Clear { device, event }.into(), sync])
    }

    /// The synchronisation an event's commands need: SYNC of its collection's redistributor,
    /// or VSYNC of its vPE (IHI 0069H 5.3, VSYNC) for a virtual ITE.
    fn sync_of(&self, m: &Mapping) -> Result<AnyCommand, ItsError> {
        match m.vpe {
            Some(i) => Ok(VCommand::Vsync {
                vpe: self.vpe_of(m.owner, i)?.id,
            }
            .into()),
            None => Ok(Command::Sync {
                rdbase: self.rdbase(m.cpu)?,
            }
            .into()),
        }
    }

    fn vpe_of(&self, owner: usize, index: usize) -> Result<Vpe, ItsError> {
        self.vms
            .get(&owner)
            .and_then(|v| v.vpes.get(index))
            .copied()
            .ok_or_else(|| {
                self.err(ItsErrorKind::VpeState {
                    vm: owner,
                    what: "no such vPE",
                })
            })
    }

    /// Whether GICv4.0 direct injection is available: GITS_TYPER.Virtual and a vPE table.
    pub fn has_vpes(&self) -> bool {
        self.vpe_table.is_some()
    }

    /// The vPE table, if there is one.
    pub fn vpe_table(&self) -> Option<TableInfo> {
        self.vpe_table
    }

    /// Gives VM `owner` direct injection: a zeroed vLPI property table of its own and, per
    /// vCPU (`cpus[i]` the CPU vCPU i is pinned to and the RDbase of its redistributor, see
    /// [`cmd::rdbase`]: known before that CPU maps its collection), a vPEID and a zeroed vPT,
    /// mapped ([`Its::map_vpes`]). Returns the vPEs.
    pub fn create_vm(&mut self, owner: usize, cpus: &[(usize, u64)]) -> Result<Vec<Vpe>, ItsError> {
        if self.vpe_table.is_none() {
            return Err(self.err(ItsErrorKind::NoVirtual));
        }
        if self.vms.contains_key(&owner) || cpus.is_empty() {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "vPEs exist already or no vCPU",
            }));
        }
        if let Some(&(cpu, _)) = cpus.iter().find(|&&(c, _)| c >= self.collections.len()) {
            return Err(self.err(ItsErrorKind::NoCollection(cpu)));
        }
        let vprop = self
            .mem
            .alloc_zeroed(VPROP_SIZE, 0x1000)
            .ok_or_else(|| self.err(ItsErrorKind::OutOfMemory("a vLPI property table")))?;
        self.mem.clean(vprop, VPROP_SIZE);
        let mut vpes = Vec::with_capacity(cpus.len());
        for &(cpu, rdbase) in cpus {
            let Some(id) = self.vpe_ids.alloc() else {
                self.drop_vpes(vprop, &vpes);
                return Err(self.err(ItsErrorKind::NoFreeVpe));
            };
            let Some(vpt) = self.mem.alloc_zeroed(VPT_SIZE, 0x1_0000) else {
                self.vpe_ids.free(id);
                self.drop_vpes(vprop, &vpes);
                return Err(self.err(ItsErrorKind::OutOfMemory("a vPE pending table")));
            };
            self.mem.clean(vpt, VPT_SIZE);
            vpes.push(Vpe {
                id: id as u16,
                cpu,
                rdbase,
                vpt,
                mapped: false,
            });
        }
        self.vms.insert(owner, VmVpes { vprop, vpes });
        self.map_vpes(owner)?;
        Ok(self.vpes(owner).to_vec())
    }

    fn drop_vpes(&mut self, vprop: u64, vpes: &[Vpe]) {
        for v in vpes {
            self.vpe_ids.free(u32::from(v.id));
            self.mem.free(v.vpt, VPT_SIZE, 0x1_0000);
        }
        self.mem.free(vprop, VPROP_SIZE, 0x1000);
    }

    /// VM `owner`'s vPEs, by vCPU index (empty without direct injection).
    pub fn vpes(&self, owner: usize) -> &[Vpe] {
        self.vms.get(&owner).map_or(&[], |v| &v.vpes)
    }

    /// GICR_VPROPBASER for VM `owner`'s vPEs (IHI 0069H 9.11.36, GICv4.0 layout): the vLPI
    /// property table's PA[51:12], IDbits [4:0] = [`VLPI_BITS`] - 1, cacheable and Inner
    /// Shareable as the physical PROPBASER.
    pub fn vpropbaser(&self, owner: usize) -> Option<u64> {
        let v = self.vms.get(&owner)?;
        Some(propbaser(v.vprop, VLPI_BITS))
    }

    /// VMAPP V=1 (vPEID, the RDbase of its vCPU's CPU, vPT, VPT_size = [`VLPI_BITS`] - 1),
    /// then VINVALL and VSYNC (as Linux's its_map_vm), for each of VM `owner`'s vPEs not
    /// mapped. A vPE table entry with V=1 must not name a vPT another vPE uses, so the vPTs are
    /// the VM's own.
    pub fn map_vpes(&mut self, owner: usize) -> Result<(), ItsError> {
        let vpes = self.vpes(owner).to_vec();
        let mut cmds: Vec<AnyCommand> = Vec::new();
        for v in vpes.iter().filter(|v| !v.mapped) {
            cmds.push(
                VCommand::Vmapp {
                    vpe: v.id,
                    rdbase: v.rdbase,
                    vpt: v.vpt,
                    vpt_size: (VLPI_BITS - 1) as u8,
                    valid: true,
                }
                .into(),
            );
            cmds.push(VCommand::Vinvall { vpe: v.id }.into());
            cmds.push(VCommand::Vsync { vpe: v.id }.into());
        }
        if cmds.is_empty() {
            return Ok(());
        }
        self.send(&cmds)?;
        if let Some(vm) = self.vms.get_mut(&owner) {
            for v in &mut vm.vpes {
                v.mapped = true;
            }
        }
        Ok(())
    }

    /// A VM's stop or reset, after every vCPU of it made its vPE non-resident
    /// (GICR_VPENDBASER.Valid = 0) and every event of it was unmapped: VMAPP V=0 and a SYNC of
    /// its redistributor for each vPE, then the vPTs and the property table zeroed for the
    /// next boot (which maps them again with [`Its::map_vpes`]).
    pub fn unmap_vpes(&mut self, owner: usize) -> Result<(), ItsError> {
        if self
            .mappings
            .values()
            .any(|m| m.owner == owner && m.vpe.is_some())
        {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "events still mapped to its vPEs",
            }));
        }
        let vpes = self.vpes(owner).to_vec();
        let mut cmds: Vec<AnyCommand> = Vec::new();
        for v in vpes.iter().filter(|v| v.mapped) {
            let rdbase = v.rdbase;
            cmds.push(
                VCommand::Vmapp {
                    vpe: v.id,
                    rdbase,
                    vpt: v.vpt,
                    vpt_size: (VLPI_BITS - 1) as u8,
                    valid: false,
                }
                .into(),
            );
            cmds.push(Command::Sync { rdbase }.into());
        }
        if !cmds.is_empty() {
            self.send(&cmds)?;
        }
        let zero = alloc::vec![0u8; VPT_SIZE.max(VPROP_SIZE)];
        let Some(vm) = self.vms.get_mut(&owner) else {
            return Ok(());
        };
        for v in &mut vm.vpes {
            v.mapped = false;
        }
        let (vprop, vpts): (u64, Vec<u64>) = (vm.vprop, vm.vpes.iter().map(|v| v.vpt).collect());
        for vpt in vpts {
            self.mem.write(vpt, &zero[..VPT_SIZE]);
            self.mem.clean(vpt, VPT_SIZE);
        }
        self.mem.write(vprop, &zero[..VPROP_SIZE]);
        self.mem.clean(vprop, VPROP_SIZE);
        Ok(())
    }

    /// Maps (`device`, `event`) of VM `owner` straight to vLPI `vintid` of its vPE `vpe`
    /// (a vCPU index): VMAPTI with no doorbell, then VSYNC. The vLPI stays disabled until its
    /// configuration is copied in ([`Its::set_vlpi_config`]). Returns the handle the vITS
    /// model keys the translation by (an LPI allocator index, never enabled physically).
    pub fn map_vevent(
        &mut self,
        owner: usize,
        device: u32,
        event: u32,
        vpe: usize,
        vintid: u32,
    ) -> Result<u32, ItsError> {
        self.free_event(owner, device, event)?;
        if !(FIRST_LPI..1 << VLPI_BITS).contains(&vintid) {
            return Err(self.err(ItsErrorKind::UnknownLpi(vintid)));
        }
        let v = self.vpe_of(owner, vpe)?;
        if !v.mapped {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "vPE not mapped",
            }));
        }
        let handle = FIRST_LPI
            + self
                .lpis
                .alloc()
                .ok_or_else(|| self.err(ItsErrorKind::NoFreeLpi))?;
        let sent = self.send(&[
            VCommand::Vmapti {
                device,
                event,
                vpe: v.id,
                vintid,
                doorbell: NO_DOORBELL,
            },
            VCommand::Vsync { vpe: v.id },
        ]);
        if let Err(e) = sent {
            self.lpis.free(handle - FIRST_LPI);
            return Err(e);
        }
        self.record(
            handle,
            Mapping {
                owner,
                device,
                event,
                cpu: v.cpu,
                vpe: Some(vpe),
            },
        );
        Ok(handle)
    }

    /// VMOVI of a virtual ITE to VM `owner`'s vPE `vpe` (no doorbell), then VSYNC of the old
    /// vPE (its pending state has moved once that vPE saw the VMOVI: IHI 0069H 5.3, VMOVI).
    pub fn move_vevent(
        &mut self,
        owner: usize,
        device: u32,
        event: u32,
        vpe: usize,
    ) -> Result<(), ItsError> {
        let (handle, m) = self.mapping(owner, device, event)?;
        let Some(old) = m.vpe else {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "VMOVI of a physical ITE",
            }));
        };
        let (old, new) = (self.vpe_of(owner, old)?, self.vpe_of(owner, vpe)?);
        self.send(&[
            VCommand::Vmovi {
                device,
                event,
                vpe: new.id,
                doorbell: None,
            },
            VCommand::Vsync { vpe: old.id },
        ])?;
        if let Some(m) = self.mappings.get_mut(&handle) {
            m.vpe = Some(vpe);
            m.cpu = new.cpu;
        }
        Ok(())
    }

    /// VMOVP of VM `owner`'s vPE `vpe` to CPU `cpu`'s redistributor, then VSYNC (GITS_TYPER.VMOVP
    /// = 1 is required: no ITSList or sequence number; IHI 0069H 5.3, VMOVP). The caller makes
    /// the vPE non-resident on the old CPU first and resident on the new one after.
    pub fn move_vpe(&mut self, owner: usize, vpe: usize, cpu: usize) -> Result<(), ItsError> {
        let v = self.vpe_of(owner, vpe)?;
        if !self.typer.vmovp {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "VMOVP needs GITS_TYPER.VMOVP = 1",
            }));
        }
        let rdbase = self.rdbase(cpu)?;
        self.send(&[
            VCommand::Vmovp { vpe: v.id, rdbase },
            VCommand::Vsync { vpe: v.id },
        ])?;
        if let Some(vm) = self.vms.get_mut(&owner) {
            vm.vpes[vpe].cpu = cpu;
            vm.vpes[vpe].rdbase = rdbase;
        }
        Ok(())
    }

    /// The guest's configuration byte `config` (priority, enable) of the vLPI a virtual ITE of
    /// VM `owner` maps to, copied into the VM's vLPI property table, then INV and VSYNC: the
    /// redistributor re-reads it (QEMU: GICR_INVLPIR is not implemented, DirectLPI = 0, so INV
    /// goes through the ITS, which accepts it on a virtual ITE).
    pub fn set_vlpi_config(
        &mut self,
        owner: usize,
        device: u32,
        event: u32,
        vintid: u32,
        config: u8,
    ) -> Result<(), ItsError> {
        let (_, m) = self.mapping(owner, device, event)?;
        let Some(vpe) = m.vpe else {
            return Err(self.err(ItsErrorKind::VpeState {
                vm: owner,
                what: "a vLPI configuration for a physical ITE",
            }));
        };
        let vpe = self.vpe_of(owner, vpe)?;
        let Some(vprop) = self.vms.get(&owner).map(|v| v.vprop) else {
            return Err(self.err(ItsErrorKind::NoVirtual));
        };
        if !(FIRST_LPI..1 << VLPI_BITS).contains(&vintid) {
            return Err(self.err(ItsErrorKind::UnknownLpi(vintid)));
        }
        let at = vprop + u64::from(vintid - FIRST_LPI);
        self.mem.write(at, &[config]);
        self.mem.clean(at, 1);
        self.send(&[
            Command::Inv { device, event }.into(),
            AnyCommand::from(VCommand::Vsync { vpe: vpe.id }),
        ])
    }

    /// Whether (`device`, `event`) of VM `owner` is mapped to a vLPI.
    pub fn is_virtual(&self, owner: usize, device: u32, event: u32) -> bool {
        self.mapping(owner, device, event)
            .is_ok_and(|(_, m)| m.vpe.is_some())
    }

    /// Enables or disables LPI `plpi`: its property byte, then INV + SYNC.
    pub fn set_enabled(&mut self, plpi: u32, enabled: bool) -> Result<(), ItsError> {
        let m = *self
            .mappings
            .get(&plpi)
            .ok_or_else(|| self.err(ItsErrorKind::UnknownLpi(plpi)))?;
        let rdbase = self.rdbase(m.cpu)?;
        self.set_prop(plpi, enabled);
        self.send(&[
            Command::Inv {
                device: m.device,
                event: m.event,
            },
            Command::Sync { rdbase },
        ])
    }

    /// Who LPI `plpi` belongs to: (VM, DeviceID, EventID).
    pub fn owner(&self, plpi: u32) -> Option<(usize, u32, u32)> {
        self.mappings
            .get(&plpi)
            .map(|m| (m.owner, m.device, m.event))
    }

    /// The LPI of (`device`, `event`) of VM `owner`, if mapped.
    pub fn lpi_of(&self, owner: usize, device: u32, event: u32) -> Option<u32> {
        self.mapping(owner, device, event).ok().map(|(p, _)| p)
    }

    /// The CPU LPI `plpi` is routed to.
    pub fn cpu_of(&self, plpi: u32) -> Option<usize> {
        self.mappings.get(&plpi).map(|m| m.cpu)
    }

    /// Unmaps every device of VM `owner` (a VM reset); the first error is returned after
    /// trying every device.
    pub fn unmap_all(&mut self, owner: usize) -> Result<(), ItsError> {
        let mine: Vec<u32> = self
            .devices
            .iter()
            .filter(|(_, d)| d.owner == owner)
            .map(|(&id, _)| id)
            .collect();
        let mut first = Ok(());
        for device in mine {
            let r = self.unmap_device(owner, device);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Writes `cmds` to the queue, advances GITS_CWRITER and waits (bounded) for GITS_CREADR
    /// to reach it.
    ///
    /// A stall (GITS_CREADR.Stalled, IHI 0069H 12.19.3) is a memory error on a table or the
    /// queue. Recovery would mean writing GITS_CREADR past the command, which QEMU allows
    /// (GICD_CTLR.DS = 1) but the architecture does not promise, and the ITS's view of its
    /// tables is then unknown anyway; so the ITS is marked broken and refuses further commands.
    fn send<C: Copy + Into<AnyCommand>>(&mut self, cmds: &[C]) -> Result<(), ItsError> {
        if self.broken {
            return Err(self.err(ItsErrorKind::Broken));
        }
        let size = CMDQ_SIZE as u64;
        let creadr = self.regs.read64(GITS_CREADR);
        if creadr & CREADR_STALLED != 0 {
            return Err(self.stalled(creadr));
        }
        let used = (self.cwriter + size - (creadr & QUEUE_OFFSET_MASK)) % size;
        // One slot stays empty: CWRITER == CREADR means empty (IHI 0069H 5.2).
        if used + ((cmds.len() + 1) * CMD_SIZE) as u64 > size {
            return Err(self.err(ItsErrorKind::QueueFull));
        }
        for c in cmds {
            let at = self.cmdq + self.cwriter;
            self.mem.write(at, &(*c).into().encode());
            if !self.cacheable {
                self.mem.clean(at, CMD_SIZE);
            }
            self.cwriter = (self.cwriter + CMD_SIZE as u64) % size;
        }
        self.regs.write64(GITS_CWRITER, self.cwriter);
        let mut last = creadr;
        for _ in 0..self.cfg.poll_limit {
            last = self.regs.read64(GITS_CREADR);
            if last & CREADR_STALLED != 0 {
                return Err(self.stalled(last));
            }
            if last & QUEUE_OFFSET_MASK == self.cwriter {
                return Ok(());
            }
        }
        Err(self.err(ItsErrorKind::Timeout {
            creadr: last,
            cwriter: self.cwriter,
        }))
    }

    fn stalled(&mut self, creadr: u64) -> ItsError {
        self.broken = true;
        let offset = creadr & QUEUE_OFFSET_MASK;
        let mut raw = [0u8; CMD_SIZE];
        self.mem.read(self.cmdq + offset, &mut raw);
        self.err(ItsErrorKind::Stalled {
            offset,
            command: AnyCommand::decode(&raw),
        })
    }

    /// The register and memory ports (for the fake's assertions and the arch glue).
    pub fn ports(&self) -> (&R, &M) {
        (&self.regs, &self.mem)
    }
}
