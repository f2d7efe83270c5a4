//! A VM's virtual GICv3 ITS (issue 15): the register file of its control frame, its command
//! queue in guest RAM, and the mappings its commands make, kept by the hypervisor.
//!
//! The guest sees an ITS with physical LPIs only (`regs::ITS_TYPER`). Its commands are read
//! from its queue when it writes GITS_CWRITER (or enables the ITS) and processed there and
//! then, as QEMU's ITS does, so GITS_CREADR equals GITS_CWRITER when the write returns and
//! GITS_CTLR.Quiescent is simply "not Enabled".
//!
//! The guest's Device and Collection tables (GITS_BASER0/1) and its ITTs are allocated by the
//! guest but never read: their formats are IMPLEMENTATION DEFINED (IHI 0069H 5.2), and the model
//! keeps the mappings itself, as KVM's vgic-its does between saves, in bounded state: devices
//! only for the DeviceIDs the VM owns ([`VitsConfig::devices`]), 2^[`regs::COLLECTION_BITS`]
//! collections in an array, and at most [`VitsConfig::max_events`] translations.
//!
//! What a command changes in hardware goes through [`PhysicalIts`], the port to the
//! hypervisor's physical ITS (implemented in `arch/` when this is wired): only DeviceIDs the VM
//! owns ever reach it, each guest event becomes a physical LPI the port chooses, and the model
//! keeps pLPI -> (DeviceID, EventID, vINTID) so that [`Vits::virtual_of`] can turn a physical
//! LPI taken at EL2 into the virtual one to inject.
//!
//! Not wired into a VM yet (issue 15): nothing on the machine builds one, traps to it or
//! implements [`PhysicalIts`]; its items are public, so the aarch64 build has no dead code.

mod cmd;
#[cfg(any(test, feature = "fuzzing"))]
pub mod fake;
pub mod regs;
#[cfg(test)]
mod tests;

use crate::hw::{GuestRam, Ipa};
use crate::mmio::AccessWidth;
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec;
use alloc::vec::Vec;
use regs::*;

pub use cmd::{Command, CMD_SIZE};

/// Translations (mapped events) a VM may hold by default, each one physical LPI: a VM's few
/// functions use far fewer (virtio-net 3-9, NVMe one per CPU + 1), and the physical LPI space is
/// sized so that every VM the machine could hold gets this many
/// ([`crate::its::lpi_bits_for`]): no VM can use up another's LPIs.
pub const DEFAULT_MAX_EVENTS: usize = 1024;

/// The fixed shape of a VM's vITS.
#[derive(Clone, Debug)]
pub struct VitsConfig {
    /// The DeviceIDs the VM owns: its assigned functions' Requester IDs (its `msi-map` is the
    /// identity). Ones beyond [`regs::DEVICE_BITS`] could never be named and are dropped.
    pub devices: Vec<u32>,
    /// vCPUs of the VM: with PTA = 0 a MAPC, SYNC or MOVALL target is a vCPU index
    /// (GICR_TYPER.Processor_Number of its virtual redistributor) below this.
    pub vcpus: usize,
    /// Cap on translations held at once, so that a guest cannot grow the hypervisor's memory.
    pub max_events: usize,
}

/// The physical side of one guest event, as handed to [`PhysicalIts`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysEvent {
    /// The DeviceID: always one the VM owns (physical = virtual, the `msi-map` identity).
    pub device: u32,
    /// The EventID, the guest's own: with the MSI-X table passed through, the function writes
    /// the guest's EventID, so the physical ITT maps the same ones.
    pub event: u32,
    /// The physical LPI the port chose for it.
    pub plpi: u32,
}

/// The physical ITS refused (no ITT memory, no free LPI, a command that failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhysItsError;

/// What the model asks of the physical ITS when a guest command takes effect. Every call names
/// a DeviceID the VM owns. vCPUs are indices; the port routes to the physical CPU each is
/// pinned on. The port issues its own physical SYNCs as its commands need them.
pub trait PhysicalIts {
    /// MAPD V=1: give `device` a physical ITT (the hypervisor's memory) for `events` EventIDs,
    /// a power of two.
    fn map_device(&mut self, device: u32, events: u32) -> Result<(), PhysItsError>;
    /// MAPD V=0: unmap `device`. Every event of it was unmapped before.
    fn unmap_device(&mut self, device: u32);
    /// MAPTI/MAPI: choose a free physical LPI, map (`device`, `event`) to it and route it to
    /// the physical CPU of `vcpu`; returns the LPI, which is the model's until
    /// [`PhysicalIts::unmap_event`] gives it back. `vintid` is the guest's LPI, for a port that
    /// maps the event straight to it (GICv4 direct injection: VMAPTI to `vcpu`'s vPE; the
    /// returned number is then only the model's handle for the translation).
    fn map_event(
        &mut self,
        device: u32,
        event: u32,
        vcpu: usize,
        vintid: u32,
    ) -> Result<u32, PhysItsError>;
    /// DISCARD (or the event's device unmapped, a MAPTI replacing it, a reset): unmap the event
    /// and free its physical LPI.
    fn unmap_event(&mut self, ev: PhysEvent);
    /// MOVI (or MAPC retargeting its collection): route the event to the physical CPU of
    /// `vcpu`.
    fn move_event(&mut self, ev: PhysEvent, vcpu: usize);
    /// INV/INVALL: the guest's configuration of `vintid` (its LPI property table) may have
    /// changed; the physical LPI's enable and priority follow it.
    fn invalidate(&mut self, ev: PhysEvent, vintid: u32);
    /// INT: make the event's physical LPI pending.
    fn raise(&mut self, ev: PhysEvent);
    /// CLEAR: clear the event's physical LPI's pending state, and the guest's LPI `vintid` at
    /// vCPU `vcpu` (the collection's), where a physical LPI already taken left it pending.
    fn clear(&mut self, ev: PhysEvent, vintid: u32, vcpu: usize);
    /// MOVALL: the VM's LPIs pending at vCPU `from` become pending at vCPU `to` (both pinned
    /// CPUs run only this VM).
    fn move_all(&mut self, from: usize, to: usize);
    /// SYNC for `vcpu`: every earlier physical effect for it is visible.
    fn sync(&mut self, vcpu: usize);
}

/// Why a guest command was ignored. With GITS_TYPER.SEIS = 0 the guest is not told (see
/// `cmd.rs`); the names follow the error encodings of IHI 0069H 5.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum CmdError {
    /// A DeviceID beyond Devbits (DEVICE_OOR).
    DeviceOor,
    /// A DeviceID the VM does not own (to the guest as if its Device table lacked it:
    /// DEVICE_OOR on MAPD, UNMAPPED_DEVICE otherwise). Never reaches the physical ITS.
    ForeignDevice,
    /// MAPD Size beyond IDbits (ITTSIZE_OOR).
    IttSizeOor,
    /// MAPD with an ITT not wholly in guest RAM (IMPLEMENTATION DEFINED: refused rather than
    /// mapped to memory the ITS could not reach).
    IttOutsideRam,
    /// An ICID beyond CIDbits (COLLECTION_OOR).
    CollectionOor,
    /// A target (RDbase, PTA = 0) that is not a vCPU (PROCNUM_OOR).
    ProcnumOor,
    /// A command for a DeviceID not mapped (UNMAPPED_DEVICE).
    UnmappedDevice,
    /// An EventID beyond the device's 2^(Size+1) (ID_OOR).
    IdOor,
    /// A pINTID that is not an LPI of the VM (PHYSICALID_OOR).
    PhysicalIdOor,
    /// No translation for (DeviceID, EventID) (UNMAPPED_INTERRUPT).
    UnmappedInterrupt,
    /// The collection the command needs is not mapped (UNMAPPED_COLLECTION).
    UnmappedCollection,
    /// The VM's cap on translations is reached (IMPLEMENTATION DEFINED, as an ITS out of
    /// memory).
    EventCap,
    /// The physical ITS refused.
    Physical,
    /// A command number this ITS does not implement (the GICv4 ones among them: Virtual = 0).
    UnknownCommand,
}

impl CmdError {
    /// Number of kinds.
    pub const COUNT: usize = 14;
    /// Every kind, in [`CmdError`] order.
    pub const ALL: [CmdError; Self::COUNT] = [
        Self::DeviceOor,
        Self::ForeignDevice,
        Self::IttSizeOor,
        Self::IttOutsideRam,
        Self::CollectionOor,
        Self::ProcnumOor,
        Self::UnmappedDevice,
        Self::IdOor,
        Self::PhysicalIdOor,
        Self::UnmappedInterrupt,
        Self::UnmappedCollection,
        Self::EventCap,
        Self::Physical,
        Self::UnknownCommand,
    ];
}

/// What the vITS did since construction or its last reset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Commands read from the queue and processed (ignored ones included).
    pub commands: u64,
    /// Commands ignored, by [`CmdError`] (index `kind as usize`).
    pub errors: [u64; CmdError::COUNT],
    /// Times processing stalled (GITS_CREADR.Stalled set).
    pub stalls: u64,
}

impl Stats {
    /// Commands ignored for `kind`.
    pub fn error(&self, kind: CmdError) -> u64 {
        self.errors[kind as usize]
    }

    /// Commands ignored, all kinds.
    pub fn total_errors(&self) -> u64 {
        self.errors.iter().sum()
    }
}

/// A mapped device (MAPD V=1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Device {
    /// log2 of its EventIDs: MAPD Size + 1.
    event_bits: u32,
    /// Its ITT, checked to lie in guest RAM (never read).
    itt: Ipa,
}

/// An interrupt translation entry (MAPTI/MAPI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Ite {
    /// The guest's pINTID, the LPI the guest gets.
    vintid: u32,
    /// Its collection.
    icid: u16,
    /// The physical LPI the port chose.
    plpi: u32,
    /// The vCPU whose physical CPU the physical LPI is routed to now (its collection's
    /// target when mapped; vCPU 0 while it never was).
    routed: usize,
}

/// A VM's virtual ITS.
#[derive(Debug)]
pub struct Vits {
    owned: BTreeSet<u32>,
    vcpus: usize,
    max_events: usize,
    enabled: bool,
    cbaser: u64,
    /// GITS_CWRITER as written (Offset only; Retry is not stored).
    cwriter: u64,
    /// GITS_CREADR.Offset.
    creadr: u64,
    stalled: bool,
    /// GITS_BASER0 (Device) and GITS_BASER1 (Collection).
    baser: [u64; 2],
    devices: BTreeMap<u32, Device>,
    /// ICID -> target vCPU.
    collections: Vec<Option<usize>>,
    ites: BTreeMap<(u32, u32), Ite>,
    /// pLPI -> (DeviceID, EventID).
    by_plpi: BTreeMap<u32, (u32, u32)>,
    stats: Stats,
}

impl Vits {
    /// A vITS at reset for a VM owning `cfg.devices`.
    pub fn new(cfg: &VitsConfig) -> Self {
        Self {
            owned: cfg
                .devices
                .iter()
                .copied()
                .filter(|&d| d < 1 << DEVICE_BITS)
                .collect(),
            vcpus: cfg.vcpus,
            max_events: cfg.max_events,
            enabled: false,
            cbaser: 0,
            cwriter: 0,
            creadr: 0,
            stalled: false,
            baser: BASER_RESET,
            devices: BTreeMap::new(),
            collections: vec![None; 1 << COLLECTION_BITS],
            ites: BTreeMap::new(),
            by_plpi: BTreeMap::new(),
            stats: Stats::default(),
        }
    }

    /// What it did since construction or its last reset.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Translations held.
    pub fn mapped_events(&self) -> usize {
        self.ites.len()
    }

    /// Devices mapped.
    pub fn mapped_devices(&self) -> usize {
        self.devices.len()
    }

    /// The physical LPIs held, each with its (DeviceID, EventID).
    pub fn physical_lpis(&self) -> impl Iterator<Item = PhysEvent> + '_ {
        self.by_plpi
            .iter()
            .map(|(&plpi, &(device, event))| PhysEvent {
                device,
                event,
                plpi,
            })
    }

    /// The mapping of `device`, if mapped: its number of EventIDs and its ITT.
    pub fn device_mapping(&self, device: u32) -> Option<(u32, Ipa)> {
        self.devices
            .get(&device)
            .map(|d| (1 << d.event_bits, d.itt))
    }

    /// The target vCPU of collection `icid`, if mapped.
    pub fn collection(&self, icid: u16) -> Option<usize> {
        self.collections.get(usize::from(icid)).copied().flatten()
    }

    /// The guest's translation of (`device`, `event`): (vINTID, ICID, pLPI).
    pub fn translation(&self, device: u32, event: u32) -> Option<(u32, u16, u32)> {
        self.ites
            .get(&(device, event))
            .map(|i| (i.vintid, i.icid, i.plpi))
    }

    /// The virtual LPI a physical LPI taken at EL2 stands for, and the vCPU to inject it into:
    /// `None` when the model holds no such pLPI, its collection is unmapped (IHI 0069H 5.3:
    /// an interrupt to an unmapped collection is dropped) or the guest has its ITS disabled
    /// (GITS_CTLR.Enabled = 0: it translates nothing).
    pub fn virtual_of(&self, plpi: u32) -> Option<(u32, usize)> {
        if !self.enabled {
            return None;
        }
        let key = self.by_plpi.get(&plpi)?;
        let ite = self.ites.get(key)?;
        Some((ite.vintid, self.collection(ite.icid)?))
    }

    /// A VM reset: every translation and device unmapped physically, the registers at their
    /// reset values (the ITS disabled, no queue, the tables' bases cleared), the stats zeroed.
    pub fn reset(&mut self, phys: &mut dyn PhysicalIts) {
        let devices: Vec<u32> = self.devices.keys().copied().collect();
        for d in devices {
            self.unmap_device(d, phys);
        }
        debug_assert!(self.ites.is_empty() && self.by_plpi.is_empty());
        self.enabled = false;
        self.cbaser = 0;
        self.cwriter = 0;
        self.creadr = 0;
        self.stalled = false;
        self.baser = BASER_RESET;
        self.collections.fill(None);
        self.stats = Stats::default();
    }

    /// A guest read of `off` in the control frame. 32-bit accesses to any register (64-bit ones
    /// by halves) and 64-bit accesses to the 64-bit registers (IHI 0069H 12.1.3); anything else,
    /// and every register not modelled, reads as zero.
    pub fn read(&self, off: u64, width: AccessWidth) -> u64 {
        if off >= GITS_FRAME_SIZE {
            return 0;
        }
        match width {
            AccessWidth::Double if is_64bit(off) => self.read64(off),
            AccessWidth::Word if off.is_multiple_of(4) => {
                let reg = off & !7;
                if is_64bit(reg) {
                    let v = self.read64(reg);
                    if off & 4 == 0 {
                        v & 0xFFFF_FFFF
                    } else {
                        v >> 32
                    }
                } else {
                    u64::from(self.read32(off))
                }
            }
            _ => 0,
        }
    }

    fn read32(&self, off: u64) -> u32 {
        match off {
            // Quiescent: commands are processed within the trap, nothing is ever in flight, so
            // a disabled ITS is quiescent (what Linux's its_force_quiescent polls for).
            GITS_CTLR if self.enabled => CTLR_ENABLED,
            GITS_CTLR => CTLR_QUIESCENT,
            GITS_IIDR => ITS_IIDR,
            GITS_PIDR2 => ITS_PIDR2,
            _ => 0,
        }
    }

    fn read64(&self, off: u64) -> u64 {
        match off {
            GITS_TYPER => ITS_TYPER,
            GITS_CBASER => self.cbaser,
            GITS_CWRITER => self.cwriter,
            GITS_CREADR => self.creadr | if self.stalled { CREADR_STALLED } else { 0 },
            o if o == GITS_BASER || o == GITS_BASER + 8 => {
                self.baser[((o - GITS_BASER) / 8) as usize]
            }
            // GITS_BASER2-7: Type 0, unimplemented (RAZ/WI).
            _ => 0,
        }
    }

    /// A guest write of `value` to `off` in the control frame (accesses as for [`Vits::read`];
    /// others are ignored). A GITS_CWRITER write, or one enabling the ITS, processes the queue
    /// up to GITS_CWRITER before it returns.
    pub fn write(
        &mut self,
        off: u64,
        width: AccessWidth,
        value: u64,
        ram: &dyn GuestRam,
        phys: &mut dyn PhysicalIts,
    ) {
        if off >= GITS_FRAME_SIZE {
            return;
        }
        let (reg, value, mask) = match width {
            AccessWidth::Double if is_64bit(off) => (off, value, u64::MAX),
            AccessWidth::Word if off.is_multiple_of(4) => {
                let reg = off & !7;
                if is_64bit(reg) {
                    let shift = (off & 4) * 8;
                    (reg, (value & 0xFFFF_FFFF) << shift, 0xFFFF_FFFF << shift)
                } else {
                    (off, value & 0xFFFF_FFFF, 0xFFFF_FFFF)
                }
            }
            _ => return,
        };
        let merge = |old: u64, fields: u64| (old & !(mask & fields)) | (value & mask & fields);
        match reg {
            GITS_CTLR => {
                let was = self.enabled;
                self.enabled = value as u32 & CTLR_ENABLED != 0;
                if self.enabled && !was {
                    self.process(ram, phys);
                }
            }
            // IMPLEMENTATION DEFINED choice, as QEMU's: GITS_CBASER and GITS_BASER<n> are
            // read-only while the ITS is enabled (writing them then is UNPREDICTABLE,
            // IHI 0069H 12.19), so the queue never moves under commands being processed.
            GITS_CBASER if !self.enabled => {
                self.cbaser = merge(self.cbaser, CBASER_FIELDS);
                // "GITS_CREADR is reset to 0 when GITS_CBASER is written" (12.19, CREADR); a
                // stall ends with it.
                self.creadr = 0;
                self.stalled = false;
            }
            GITS_CWRITER => {
                // Offset [19:5] only; the upper half is RES0. A write to it alone changes
                // nothing and starts nothing.
                if mask & 0xFFFF_FFFF == 0 {
                    return;
                }
                self.cwriter = value & QUEUE_OFFSET;
                if value & CWRITER_RETRY != 0 {
                    // Retry: processing restarts at GITS_CREADR after a stall.
                    self.stalled = false;
                }
                self.process(ram, phys);
            }
            o if !self.enabled && (o == GITS_BASER || o == GITS_BASER + 8) => {
                let i = ((o - GITS_BASER) / 8) as usize;
                self.baser[i] = merge(self.baser[i], !BASER_RO);
            }
            // GITS_TYPER, GITS_CREADR, GITS_IIDR, GITS_PIDR2 are read-only; BASER2-7 and the
            // rest are WI.
            _ => {}
        }
    }

    /// The queue's base and size in bytes, if GITS_CBASER is valid.
    fn queue(&self) -> Option<(u64, u64)> {
        if self.cbaser & CBASER_VALID == 0 {
            return None;
        }
        Some((self.cbaser & CBASER_PA, ((self.cbaser & 0xFF) + 1) * 4096))
    }

    fn stall(&mut self) {
        self.stalled = true;
        self.stats.stalls += 1;
    }

    /// Processes commands from GITS_CREADR up to GITS_CWRITER, while the ITS is enabled with a
    /// valid queue and not stalled. A queue not wholly in guest RAM, GITS_CWRITER beyond the
    /// queue, or a command that cannot be read stalls it (GITS_CREADR.Stalled; with SEIS = 0 no
    /// error is reported otherwise) with GITS_CREADR at the command not processed, and nothing
    /// else happens. At most one pass over the queue: bounded by its size (1 MiB, 32768
    /// commands).
    fn process(&mut self, ram: &dyn GuestRam, phys: &mut dyn PhysicalIts) {
        if !self.enabled || self.stalled {
            return;
        }
        let Some((base, size)) = self.queue() else {
            return;
        };
        let r = ram.ipa_range();
        let in_ram = base >= r.base && base.checked_add(size).is_some_and(|e| e <= r.end());
        if !in_ram || self.cwriter >= size || self.creadr >= size {
            self.stall();
            return;
        }
        while self.creadr != self.cwriter {
            let mut raw = [0u8; CMD_SIZE];
            if ram.read(Ipa(base + self.creadr), &mut raw).is_err() {
                self.stall();
                return;
            }
            self.stats.commands += 1;
            if let Err(e) = self.execute(Command::decode(&raw), ram, phys) {
                self.stats.errors[e as usize] += 1;
            }
            self.creadr = (self.creadr + CMD_SIZE as u64) % size;
        }
    }

    /// Every translation of `device`, then the device, unmapped physically and forgotten.
    fn unmap_device(&mut self, device: u32, phys: &mut dyn PhysicalIts) {
        if self.devices.remove(&device).is_none() {
            return;
        }
        let events: Vec<u32> = self
            .ites
            .range((device, 0)..=(device, u32::MAX))
            .map(|(&(_, e), _)| e)
            .collect();
        for e in events {
            self.unmap_event(device, e, phys);
        }
        phys.unmap_device(device);
    }

    /// The translation of (`device`, `event`) unmapped physically and forgotten.
    fn unmap_event(&mut self, device: u32, event: u32, phys: &mut dyn PhysicalIts) {
        if let Some(ite) = self.ites.remove(&(device, event)) {
            self.by_plpi.remove(&ite.plpi);
            phys.unmap_event(PhysEvent {
                device,
                event,
                plpi: ite.plpi,
            });
        }
    }
}
