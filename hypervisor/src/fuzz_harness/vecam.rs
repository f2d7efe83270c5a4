//! Hostile-guest driver of the virtual ECAM ([`VirtualEcam`]) over a recording fake
//! configuration space.
//!
//! [`run`] builds one of several fake PCI topologies ([`FakeConfigSpace::qemu_flat`], the
//! multifunction and switch ones, and a richer one with Power Management, Advanced Features,
//! Enhanced Allocation and 64-bit MSI capabilities, sub-page BARs and a bridge), enumerates it and
//! places its BARs as the hypervisor does, and gives a subset of its functions to a
//! [`VirtualEcam`]. Every hardware access the model makes goes through [`Recorder`], which checks
//! it on the spot. The guest's reads are compared with what the model's documented filtering
//! table says they return, computed by the harness from the hardware's current state and a
//! reference of the virtual BARs. Invariants, each a panic naming it:
//!
//! - **(a) no panic, bounded work**: a guest dword access makes at most `CAP_TTL + 8` hardware
//!   reads and one hardware write (twice that for a 64-bit access); hardware is only reached at
//!   dword-aligned offsets below 4 KiB;
//! - **(b) only the VM's functions**: hardware is read and written only for the BDFs of Type 0
//!   functions the VM was given, and read (never written) for the bridges above them that the
//!   VM is shown; a read of any other function (absent, not owned, a bridge not on the path to
//!   an owned one, past the last bus, misaligned) returns all ones and touches nothing; a guest
//!   read never writes;
//! - **(c) never a BAR, the ROM BAR, extended space or a header register**: a hardware write is
//!   only at the dword the guest addressed, never at 0x10-0x27, 0x30, 0x00-0x3f except Command,
//!   or 0x100 and above;
//! - **(d) hidden capabilities stay hidden**: no hardware write touches a byte of an MSI or MSI-X
//!   capability (nor Enhanced Allocation with [`Checks::ea_hidden`], nor a virtio function's
//!   VIRTIO_PCI_CAP_PCI_CFG with [`Checks::virtio_cfg_hidden`]), the guest reads them as 0
//!   and never finds them walking the list;
//! - **(e) Command and FLR**: a hardware Command write changes no bit outside Bus Master,
//!   Parity Error Response, SERR# and INTx Disable (nor I/O and Memory Space Enable, virtual
//!   with [`Checks::decode_virtual`]); no write sets PCIe Device Control's Initiate FLR;
//! - **(f) RW1C**: no RW1C bit (Status, Device/Link/Slot Status, PMCSR.PME_Status) is written as 1
//!   unless the guest wrote it as 1;
//! - **(g) no side effects**: a narrow guest write changes no hardware byte it did not address;
//! - **(h) BAR moves**: every reported `BarMove` is for an owned function's memory BAR, with its
//!   enumerated size and physical address and the bus address the guest just gave it; one is
//!   reported exactly when a memory BAR's guest address changes;
//! - **(i) reads as documented**: every guest read equals the filtering table of
//!   `devices/vecam.rs` (IDs, class, Status, Header Type with the multi-function bit, virtual BARs and
//!   sizing, no ROM, the visible capability chain, the virtual Interrupt Line and PowerState,
//!   hardware elsewhere; for a shown bridge, its IDs, bus numbers and windows from hardware, a
//!   virtual Command and Interrupt Line, its PCIe capability alone and read-only with slot,
//!   root, ASPM, bandwidth-notification and ARI-forwarding bits hidden, 0 elsewhere);
//! - **(j) forwarded accesses**: `VirtualEcam::resolve` answers only inside a decoding, D0 BAR
//!   of the VM's as the guest placed it, at the same offset of its physical range;
//! - **(k) MSI with a virtual ITS** (`VirtualEcam::with_msi`, bit 3 of the topology byte; bits
//!   7:4 mark owned functions MSI-only, `with_msi_only`): MSI and MSI-X are in the chain and
//!   read from hardware instead of (d); a hardware write to MSI-X Message Control changes only
//!   Enable and Function Mask, none reaches the Table or PBA Offset/BIR; one to MSI Message
//!   Control changes only Enable and Multiple Message Enable, never above Multiple Message
//!   Capable; an MSI-only function's Command.INTxDisable is set from the start and no write
//!   clears it, reads show it set and its Interrupt Pin reads 0.
//!
//! The rules of the PCI isolation work are checks that [`Checks`] switches (all on by default):
//! [`Checks::pm_power_state`], [`Checks::af_flr`], [`Checks::ea_hidden`],
//! [`Checks::bar_page_slots`], [`Checks::decode_virtual`], [`Checks::virtio_cfg_hidden`].

use alloc::vec::Vec;
use core::cell::Cell;

use super::{Input, MAX_OPS};
use crate::devices::vecam::{BarMove, VirtualEcam};
use crate::mmio::AccessWidth::{self, Byte, Double, Half, Word};
use crate::pci::enumerate::{enumerate, PortType};
use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};
use crate::pci::regs::{cap_id, CAP_TTL};
use crate::pci::{assign_resources, BarKind, Bdf, ConfigSpace, HeaderType, PciDevice};

/// Checks of the vECAM rules added after the first filtering table (PCI isolation: page slots,
/// PowerState, AF FLR, EA), each switchable so the harness also runs against code without them.
/// All on by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// PMCSR PowerState is virtual: the guest's D-state writes never reach hardware, so
    /// D3hot -> D0 never resets a function without No_Soft_Reset and no function stops
    /// decoding; `resolve` forwards nothing while the guest's state is not D0.
    pub pm_power_state: bool,
    /// Advanced Features (capability 0x13) Initiate FLR is dropped.
    pub af_flr: bool,
    /// Enhanced Allocation (capability 0x14) is hidden like MSI and MSI-X.
    pub ea_hidden: bool,
    /// BARs are in page-sized slots: each owned memory BAR's physical address is page aligned
    /// and shares its pages with no other memory BAR of the topology.
    pub bar_page_slots: bool,
    /// Command's I/O and Memory Space Enable are virtual: no hardware write changes them, the
    /// guest reads what it wrote, and `resolve` follows the guest's bits.
    pub decode_virtual: bool,
    /// A virtio function's VIRTIO_PCI_CAP_PCI_CFG (vendor capability, cfg_type 5) is hidden
    /// like MSI.
    pub virtio_cfg_hidden: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Checks::ALL
    }
}

impl Checks {
    /// Every rule on.
    pub const ALL: Checks = Checks {
        pm_power_state: true,
        af_flr: true,
        ea_hidden: true,
        bar_page_slots: true,
        decode_virtual: true,
        virtio_cfg_hidden: true,
    };

    /// None of them.
    pub const NONE: Checks = Checks {
        pm_power_state: false,
        af_flr: false,
        ea_hidden: false,
        bar_page_slots: false,
        decode_virtual: false,
        virtio_cfg_hidden: false,
    };

    /// From a comma-separated list of `pm`, `af`, `ea`, `bar`, `decode`, `pcicfg`, `all` or
    /// `none` (for the fuzz target's `VECAM_CHECKS` variable).
    pub fn parse(s: &str) -> Checks {
        let mut c = Checks::NONE;
        for w in s.split(',').map(str::trim) {
            match w {
                "all" => c = Checks::ALL,
                "none" => c = Checks::NONE,
                "pm" => c.pm_power_state = true,
                "af" => c.af_flr = true,
                "ea" => c.ea_hidden = true,
                "bar" => c.bar_page_slots = true,
                "decode" => c.decode_virtual = true,
                "pcicfg" => c.virtio_cfg_hidden = true,
                _ => {}
            }
        }
        c
    }
}

const CAP_PM: u8 = 0x01;
const CAP_AF: u8 = 0x13;
const CAP_EA: u8 = 0x14;
/// Command bits a guest may change (PCIe Base spec 7.5.1.1.3).
const GUEST_COMMAND: u32 = 1 | 1 << 1 | 1 << 2 | 1 << 6 | 1 << 8 | 1 << 10;
const PAGE: u64 = 4096;

/// A PCIe capability whose Device Control is writable, with FLR capability.
fn pcie_cap(f: FakeFn) -> FakeFn {
    // Header: version 2, Endpoint. Device Capabilities: Function Level Reset Capability (28).
    f.raw_cap(cap_id::PCIE, 2, &[(1 << 28, 0), (0, 0xffff), (0, 0)])
}

/// Power Management: PMC version 3; PMCSR with PowerState, PME_En, PME_Status writable and
/// No_Soft_Reset (bit 3) as given.
fn pm_cap(f: FakeFn, no_soft_reset: bool) -> FakeFn {
    f.raw_cap(CAP_PM, 3, &[(u32::from(no_soft_reset) << 3, 0x8103)])
}

/// Advanced Features: length 6, TP and FLR capable; AF Control's Initiate FLR writable.
fn af_cap(f: FakeFn) -> FakeFn {
    f.raw_cap(CAP_AF, 0x0306, &[(0, 0x1)])
}

/// Enhanced Allocation with one memory entry (header, base, max offset), Enable writable.
fn ea_cap(f: FakeFn) -> FakeFn {
    f.raw_cap(
        CAP_EA,
        1,
        &[(1 << 31 | 2, 1 << 31), (0x2000_0000, 0), (0xfff, 0)],
    )
}

/// MSI with a 64-bit address (16 bytes), everything writable.
fn msi64_cap(f: FakeFn) -> FakeFn {
    f.raw_cap(
        cap_id::MSI,
        1 << 7,
        &[(0, u32::MAX), (0, u32::MAX), (0, 0xffff)],
    )
}

/// The richer topology: see the module documentation. Returns the fake and the slot handle of
/// each function, by BDF.
pub(crate) fn rich() -> (FakeConfigSpace, Vec<(Bdf, usize)>) {
    let mut f = FakeConfigSpace::new();
    let mut h = Vec::new();
    let f0 = FakeFn::endpoint(0x8086, 0x1234).multifunction();
    let f0 = msi64_cap(af_cap(pm_cap(pcie_cap(f0), false)))
        .bar64(0, 0x4000, true)
        .bar32(2, 0x100, false)
        .bar_io(3, 0x20)
        .bar32(4, 0x1000, false)
        .pin(1)
        .full_acs();
    h.push((Bdf::new(0, 1, 0), f.add(None, 1, 0, f0)));
    let f1 = FakeFn::endpoint(0x8086, 0x1235).multifunction();
    let f1 = ea_cap(pm_cap(pcie_cap(f1), true))
        .msix()
        .bar32(0, 0x2000, false)
        .pin(2);
    h.push((Bdf::new(0, 1, 1), f.add(None, 1, 1, f1)));
    let rp = f.add(None, 2, 0, FakeFn::root_port());
    h.push((Bdf::new(0, 2, 0), rp));
    let behind = FakeFn::endpoint(0x1af4, 0x1042)
        .pcie(PortType::Endpoint)
        .bar32(0, 0x1000, false);
    h.push((Bdf::new(1, 0, 0), f.add(Some(rp), 0, 0, behind)));
    let conv = FakeFn::endpoint(0x10ec, 0x8139)
        .msi()
        .bar32(1, 0x800, false)
        .bar_io(0, 0x100)
        .pin(1);
    h.push((Bdf::new(0, 3, 0), f.add(None, 3, 0, conv)));
    let virtio = FakeFn::endpoint(0x1af4, 0x1042)
        .virtio_pci_cfg()
        .virtio_modern(1 << 32 | 1)
        .bar32(4, 0x4000, false)
        .pin(1);
    h.push((Bdf::new(0, 4, 0), f.add(None, 4, 0, virtio)));
    (f, h)
}

/// What the harness knows of one owned function, from hardware at setup.
#[derive(Clone, Debug)]
struct Func {
    dev: PciDevice,
    /// Another owned function on the same device: Header Type bit 7 stays.
    keep_multifunction: bool,
    /// Byte ranges the guest must never see or write.
    hidden: Vec<(u16, u16)>,
    /// Visible capabilities: (offset, id, next visible offset).
    visible: Vec<(u16, u8, u16)>,
    /// The MSI and MSI-X capabilities, when shown (in MSI mode).
    msi: Option<u16>,
    msix: Option<u16>,
    /// Assigned MSI-only: INTx Disable held set, no pin.
    msi_only: bool,
    pcie: Option<u16>,
    pm: Option<u16>,
    no_soft_reset: bool,
    af: Option<u16>,
    /// PMCSR.PowerState as the guest set it (virtual with [`Checks::pm_power_state`]).
    power_state: u32,
    /// Command's I/O and Memory Space Enable as the guest set them (with
    /// [`Checks::decode_virtual`]).
    decode: u32,
    /// Reference virtual BARs and sizing latches.
    vbar: [u32; 6],
    sizing: [bool; 6],
    interrupt_line: u8,
}

/// Hardware access counts of one guest access.
#[derive(Debug, Default)]
struct Counts {
    reads: Cell<usize>,
    writes: usize,
}

/// The guest write being served: its dword, its byte enables, its value in position.
#[derive(Clone, Copy, Debug)]
struct GuestWrite {
    reg: u16,
    enable: u32,
    value: u32,
}

/// The fake configuration space as the model sees it: every access checked on the spot.
#[derive(Debug)]
pub(crate) struct Recorder<'a> {
    hw: &'a mut FakeConfigSpace,
    funcs: &'a [Func],
    /// The bridges the VM is shown: readable, never writable.
    bridges: &'a [ShownBridge],
    checks: Checks,
    counts: &'a mut Counts,
    /// The dwords the guest's write addresses (two for a 64-bit one).
    guest: &'a [GuestWrite],
}

impl Recorder<'_> {
    fn func(&self, bdf: Bdf, what: &str) -> &Func {
        self.funcs
            .iter()
            .find(|f| f.dev.bdf == bdf)
            .unwrap_or_else(|| panic!("(b) hardware {what} of {bdf}, which the VM does not own"))
    }
}

/// RW1C bits of the dword at `off` of `f` (PCIe Base spec 7.5.1.1.4, 7.5.3; PM 1.2 3.2.4).
fn rw1c(f: &Func, off: u16) -> u32 {
    let rel = |base: Option<u16>| base.map(|b| off.wrapping_sub(b));
    match (off, rel(f.pcie), rel(f.pm)) {
        (4, _, _) => 0xf900 << 16,
        (_, Some(8), _) => 0xf << 16,
        (_, Some(0x10), _) => 0xc000 << 16,
        (_, Some(0x18), _) => 0x011f << 16,
        (_, _, Some(4)) => 1 << 15,
        _ => 0,
    }
}

impl ConfigSpace for Recorder<'_> {
    fn read32(&self, bdf: Bdf, off: u16) -> u32 {
        if !self.bridges.iter().any(|b| b.bdf == bdf) {
            self.func(bdf, "read");
        }
        assert!(
            off.is_multiple_of(4) && off < 0x1000,
            "(a) hardware read of {bdf} at {off:#x}"
        );
        self.counts.reads.set(self.counts.reads.get() + 1);
        self.hw.read32(bdf, off)
    }

    fn write32(&mut self, bdf: Bdf, off: u16, value: u32) {
        assert!(
            !self.bridges.iter().any(|b| b.bdf == bdf),
            "(b) hardware write of {value:#x} at {off:#x} of the shown bridge {bdf}"
        );
        let f = self.func(bdf, "write");
        assert!(
            off.is_multiple_of(4) && off < 0x1000,
            "(a) hardware write of {bdf} at {off:#x}"
        );
        if self.guest.is_empty() {
            panic!("(b) a guest read wrote {value:#x} to {bdf} at {off:#x}");
        }
        let Some(&g) = self.guest.iter().find(|g| g.reg == off) else {
            panic!(
                "(c) a guest write of {bdf} at {:#x} wrote hardware at {off:#x}",
                self.guest[0].reg
            );
        };
        assert!(
            !(0x10..0x28).contains(&off),
            "(c) {bdf}: hardware BAR at {off:#x} written"
        );
        assert!(off != 0x30, "(c) {bdf}: the ROM BAR written");
        assert!(
            off < 0x100,
            "(c) {bdf}: extended configuration space at {off:#x} written"
        );
        assert!(
            off >= 0x40 || off == 4,
            "(c) {bdf}: header register {off:#x} written"
        );
        if let Some(&(s, e)) = f.hidden.iter().find(|&&(s, e)| s < off + 4 && off < e) {
            panic!(
                "(d) {bdf}: hardware write at {off:#x} into the hidden capability {s:#x}..{e:#x}"
            );
        }
        let hw = self.hw.read32(bdf, off);
        if let Some(m) = f.msix {
            assert!(
                off != m + 4 && off != m + 8,
                "(k) {bdf}: MSI-X Table or PBA Offset/BIR at {off:#x} written"
            );
            let changed = (value ^ hw) & !0xc000_0000;
            assert!(
                off != m || changed == 0,
                "(k) {bdf}: MSI-X Message Control bits {changed:#x} changed"
            );
        }
        if f.msi == Some(off) {
            let changed = (value ^ hw) & !(1 << 16 | 0x7 << 20);
            assert!(
                changed == 0,
                "(k) {bdf}: MSI Message Control bits {changed:#x} changed"
            );
            let (mme, mmc) = (value >> 20 & 7, hw >> 17 & 7);
            assert!(
                mme <= mmc,
                "(k) {bdf}: Multiple Message Enable {mme} above Capable {mmc}"
            );
        }
        if f.msi_only && off == 4 {
            assert!(
                value & 1 << 10 != 0,
                "(k) {bdf}: INTx Disable of an MSI-only function cleared"
            );
        }
        let rw1c = rw1c(f, off);
        // Status holds only read-only and RW1C bits: what a write puts there is moot but for
        // the RW1C ones.
        let writable = if off == 4 { 0xffff } else { u32::MAX };
        let unaddressed = !g.enable & !rw1c & writable;
        assert!(
            (value ^ hw) & unaddressed == 0,
            "(g) {bdf}: a write of bytes {:#x} at {off:#x} changed others: {hw:#x} -> {value:#x}",
            g.enable
        );
        let stray = value & rw1c & !(g.value & g.enable);
        assert!(
            stray == 0,
            "(f) {bdf}: RW1C bits {stray:#x} at {off:#x} written back as read"
        );
        if off == 4 {
            let guest = if self.checks.decode_virtual {
                GUEST_COMMAND & !3
            } else {
                GUEST_COMMAND
            };
            let changed = (value ^ hw) & 0xffff & !guest;
            assert!(changed == 0, "(e) {bdf}: Command bits {changed:#x} changed");
        }
        if f.pcie.is_some_and(|p| off == p + 8) {
            assert!(
                value & 1 << 15 == 0,
                "(e) {bdf}: PCIe Initiate Function Level Reset written"
            );
        }
        if self.checks.af_flr && f.af.is_some_and(|a| off == a + 4) {
            assert!(
                value & 1 == 0,
                "(i) {bdf}: Advanced Features Initiate FLR written"
            );
        }
        if self.checks.pm_power_state && f.pm.is_some_and(|p| off == p + 4) {
            assert!(
                (value ^ hw) & 3 == 0,
                "(i) {bdf}: PowerState {} -> {} written (No_Soft_Reset={})",
                hw & 3,
                value & 3,
                u8::from(f.no_soft_reset)
            );
        }
        self.counts.writes += 1;
        self.hw.write32(bdf, off, value);
    }
}

/// The harness's model of a bridge the VM is shown (`VmDevices::bridges`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ShownBridge {
    bdf: Bdf,
    /// Another function of its device is shown too: Header Type bit 7 stays.
    multifunction: bool,
    /// The guest's Command, once read or written (hardware's until then).
    command: Option<u32>,
    interrupt_line: u8,
    /// Where its PCIe capability is (shown read-only as its only capability), if it has one.
    pcie: Option<u16>,
}

/// Counters of what an input reached, for the tests' depth checks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Guest reads of owned functions compared.
    pub owned_reads: u64,
    /// Hardware writes checked.
    pub hw_writes: u64,
    /// BAR moves reported.
    pub moves: u64,
    /// BAR sizing reads.
    pub sizings: u64,
    /// Capability walks.
    pub walks: u64,
    /// `resolve` calls that found a BAR.
    pub resolved: u64,
    /// Guest reads of shown bridges compared.
    pub bridge_reads: u64,
}

/// The harness.
#[derive(Debug)]
pub struct Harness {
    hw: FakeConfigSpace,
    handles: Vec<(Bdf, usize)>,
    /// Every function of the topology, placed.
    all: Vec<PciDevice>,
    /// What the VM was given (`VirtualEcam::new`'s first argument).
    given: Vec<PciDevice>,
    /// The bridges above its Type 0 functions (the second).
    shown: Vec<PciDevice>,
    bridges: Vec<ShownBridge>,
    funcs: Vec<Func>,
    /// The model under test.
    pub vecam: VirtualEcam,
    /// Switched-on checks.
    pub checks: Checks,
    /// MSI and MSI-X shown (`VirtualEcam::with_msi`).
    msi: bool,
    /// The owned functions assigned MSI-only (`VirtualEcam::with_msi_only`).
    msi_only: Vec<Bdf>,
    /// Counters.
    pub tally: Tally,
}

/// Offset of `reg` of `bdf` in the ECAM window.
fn ecam(bdf: Bdf, reg: u16) -> u64 {
    u64::from(bdf.bus) << 20 | u64::from(bdf.dev) << 15 | u64::from(bdf.func) << 12 | u64::from(reg)
}

impl Harness {
    /// Topology `sel` (bits 2:0), the functions whose bit is set in `owned` (bit 15: also a
    /// bridge); with `sel` bit 3, MSI and MSI-X shown and the first four owned Type 0
    /// functions whose bit is set in `sel` bits 7:4 assigned MSI-only.
    pub fn new(sel: u8, owned: u16, checks: Checks) -> Self {
        let (mut hw, handles) = match sel & 7 {
            0 => (FakeConfigSpace::qemu_flat(), Vec::new()),
            1 => (FakeConfigSpace::multifunction(false), Vec::new()),
            2 => (FakeConfigSpace::multifunction(true), Vec::new()),
            4 => (FakeConfigSpace::switch_topology(true), Vec::new()),
            5 => (FakeConfigSpace::pci_bridge_topology(), Vec::new()),
            _ => rich(),
        };
        let mut topo = enumerate(&mut hw, 0, 0xff).expect("the fake topologies enumerate");
        assign_resources(&mut hw, &mut topo, &qemu_host_bridge()).expect("and fit the windows");
        let given: Vec<PciDevice> = topo
            .devices
            .iter()
            .enumerate()
            .filter(|(i, d)| {
                let bit = owned >> (i % 15) & 1 != 0;
                if d.header_type == HeaderType::Endpoint {
                    bit
                } else {
                    bit && owned & 1 << 15 != 0
                }
            })
            .map(|(_, d)| d.clone())
            .collect();
        // As `pci::resolve` lists them: every bridge above a given Type 0 function.
        let mut shown: Vec<PciDevice> = given
            .iter()
            .filter(|d| d.header_type == HeaderType::Endpoint)
            .flat_map(|d| topo.bridges_above(d.bdf))
            .cloned()
            .collect();
        shown.sort_by_key(|d| d.bdf);
        shown.dedup_by_key(|d| d.bdf);
        let all = topo.devices;
        let msi = sel & 8 != 0;
        let msi_only: Vec<Bdf> = given
            .iter()
            .filter(|d| d.header_type == HeaderType::Endpoint)
            .take(4)
            .enumerate()
            .filter(|&(j, _)| msi && sel >> (4 + j) & 1 != 0)
            .map(|(_, d)| d.bdf)
            .collect();
        let vecam = VirtualEcam::new(given.clone(), shown.clone())
            .with_msi(msi)
            .with_msi_only(&mut hw, &msi_only);
        let mut h = Self {
            hw,
            handles,
            all,
            given: given.clone(),
            shown: shown.clone(),
            bridges: Vec::new(),
            funcs: Vec::new(),
            vecam,
            checks,
            msi,
            msi_only,
            tally: Tally::default(),
        };
        h.funcs = h.make_funcs();
        h.bridges = h.make_bridges();
        if checks.bar_page_slots {
            h.check_page_slots();
        }
        h
    }

    /// The harness's view of the shown bridges, as the VM starts.
    fn make_bridges(&self) -> Vec<ShownBridge> {
        let owned = self
            .given
            .iter()
            .filter(|d| d.header_type == HeaderType::Endpoint);
        let seen: Vec<Bdf> = owned.chain(self.shown.iter()).map(|d| d.bdf).collect();
        self.shown
            .iter()
            .map(|d| ShownBridge {
                bdf: d.bdf,
                multifunction: seen
                    .iter()
                    .any(|&b| b != d.bdf && b.bus == d.bdf.bus && b.dev == d.bdf.dev),
                command: None,
                interrupt_line: 0,
                pcie: d.pcie.map(|p| u16::from(p.offset) & !3),
            })
            .collect()
    }

    /// The dword at `reg` of shown bridge `i` as the filtering table documents it.
    fn expected_bridge_dword(&mut self, i: usize, reg: u16) -> u32 {
        let bdf = self.bridges[i].bdf;
        let hw = self.hw.read32(bdf, reg);
        let pcie = self.bridges[i].pcie;
        if let Some(at) = pcie.filter(|&at| reg >= at && reg < at + 0x3c) {
            // The PCIe capability, alone in the chain: no Slot Implemented, no ASPM or
            // bandwidth notification, no slot or root registers, no ARI forwarding.
            return match reg - at {
                0x00 => hw & 0xfeff_0000 | 0x10,
                0x0c => hw & !0x0020_0c00,
                0x14 | 0x18 | 0x1c | 0x20 | 0x34 | 0x38 => 0,
                0x24 => hw & !0x20,
                _ => hw,
            };
        }
        match reg {
            0x00 | 0x08 | 0x18..=0x33 => hw,
            0x04 => {
                let cmd = *self.bridges[i]
                    .command
                    .get_or_insert(self.hw.read32(bdf, 4) & 0xffff);
                let cap_list = if pcie.is_some() { 0x0010_0000 } else { 0 };
                hw & 0xffef_0000 | cap_list | cmd
            }
            0x34 => pcie.map_or(0, u32::from),
            0x0c if self.bridges[i].multifunction => hw & 0x00ff_0000,
            0x0c => hw & 0x007f_0000,
            0x3c => hw & 0xff00 | u32::from(self.bridges[i].interrupt_line),
            _ => 0,
        }
    }

    /// The shown bridge (index into `bridges`) at an ECAM offset, and the register.
    fn decode_bridge(&self, off: u64) -> Option<(usize, u16)> {
        let bus = u8::try_from(off >> 20).ok()?;
        let bdf = Bdf::new(bus, (off >> 15 & 0x1f) as u8, (off >> 12 & 7) as u8);
        let i = self.bridges.iter().position(|b| b.bdf == bdf)?;
        Some((i, (off & 0xfff) as u16))
    }

    /// The harness's view of the owned functions, read from hardware as the spec describes the
    /// capability list (Linux's walk: pointers below 0x40 end it, at most 48 steps).
    fn make_funcs(&self) -> Vec<Func> {
        let owned: Vec<&PciDevice> = self
            .given
            .iter()
            .filter(|d| d.header_type == HeaderType::Endpoint)
            .collect();
        owned
            .iter()
            .map(|d| {
                let bdf = d.bdf;
                let mut f = Func {
                    dev: (*d).clone(),
                    keep_multifunction: owned
                        .iter()
                        .any(|o| o.bdf != bdf && o.bdf.bus == bdf.bus && o.bdf.dev == bdf.dev),
                    hidden: Vec::new(),
                    visible: Vec::new(),
                    msi: None,
                    msix: None,
                    msi_only: self.msi_only.contains(&bdf),
                    pcie: None,
                    pm: None,
                    no_soft_reset: false,
                    af: None,
                    power_state: 0,
                    decode: self.hw.read32(bdf, 4) & 3,
                    vbar: [0; 6],
                    sizing: [false; 6],
                    interrupt_line: 0,
                };
                let hw = &self.hw;
                if hw.read32(bdf, 4) & 1 << 20 != 0 {
                    let mut ptr = (hw.read32(bdf, 0x34) & 0xfc) as u16;
                    let mut shown: Vec<(u16, u8)> = Vec::new();
                    for _ in 0..CAP_TTL {
                        if ptr < 0x40 {
                            break;
                        }
                        let hdr = hw.read32(bdf, ptr);
                        let id = hdr as u8;
                        if id == 0xff {
                            break;
                        }
                        let control = hdr >> 16;
                        match id {
                            cap_id::MSI if self.msi => {
                                f.msi = f.msi.or(Some(ptr));
                                shown.push((ptr, id));
                            }
                            cap_id::MSIX if self.msi => {
                                f.msix = f.msix.or(Some(ptr));
                                shown.push((ptr, id));
                            }
                            // PCI Local Bus 3.0 6.8.1: 10, 14, 20 or 24 bytes, in whole dwords.
                            cap_id::MSI => {
                                let len = 12
                                    + 4 * u16::from(control & 1 << 7 != 0)
                                    + 8 * u16::from(control & 1 << 8 != 0);
                                f.hidden.push((ptr, ptr + len));
                            }
                            cap_id::MSIX => f.hidden.push((ptr, ptr + 12)),
                            // virtio 1.2 4.1.4.9: at least the 20 bytes of virtio_pci_cfg_cap.
                            cap_id::VENDOR
                                if self.checks.virtio_cfg_hidden
                                    && hw.read32(bdf, 0) as u16 == 0x1af4
                                    && hdr >> 24 == 5 =>
                            {
                                let len = (control & 0xff).max(20).next_multiple_of(4) as u16;
                                f.hidden.push((ptr, (ptr + len).min(0x100)));
                            }
                            CAP_EA if self.checks.ea_hidden => {
                                // PCIe Base spec 7.8.5: header (+ a dword for a Type 1), then
                                // entries of 1 + Entry Size dwords.
                                let mut len = 4;
                                for _ in 0..(control & 0x3f) {
                                    let e = hw.read32(bdf, (ptr + len) & 0xffc);
                                    len += 4 + 4 * (e & 7) as u16;
                                }
                                f.hidden.push((ptr, ptr + len));
                            }
                            _ => {
                                match id {
                                    cap_id::PCIE => f.pcie = f.pcie.or(Some(ptr)),
                                    CAP_PM => {
                                        f.pm = f.pm.or(Some(ptr));
                                        f.no_soft_reset = hw.read32(bdf, ptr + 4) & 1 << 3 != 0;
                                    }
                                    CAP_AF => f.af = f.af.or(Some(ptr)),
                                    _ => {}
                                }
                                shown.push((ptr, id));
                            }
                        }
                        ptr = ((hdr >> 8) & 0xfc) as u16;
                    }
                    f.visible = shown
                        .iter()
                        .enumerate()
                        .map(|(i, &(at, id))| (at, id, shown.get(i + 1).map_or(0, |n| n.0)))
                        .collect();
                }
                for b in &f.dev.bars.clone() {
                    let i = usize::from(b.index);
                    let pci = b.addr.map_or(0, |a| a.pci);
                    f.vbar[i] = pci as u32 | self.type_bits(&f, b.index);
                    if b.kind == BarKind::Mem64 && i + 1 < 6 {
                        f.vbar[i + 1] = (pci >> 32) as u32;
                    }
                }
                f
            })
            .collect()
    }

    /// [`Checks::bar_page_slots`] on the placement.
    fn check_page_slots(&self) {
        let pages = |a: u64, s: u64| (a / PAGE, (a + s.max(1) - 1) / PAGE);
        for f in &self.funcs {
            for b in f.dev.bars.iter().filter(|b| b.kind != BarKind::Io) {
                let Some(a) = b.addr else { continue };
                assert!(
                    a.cpu % PAGE == 0,
                    "(i) {} BAR {}: at {:#x}, not page aligned",
                    f.dev.bdf,
                    b.index,
                    a.cpu
                );
                let (p0, p1) = pages(a.cpu, b.size);
                for o in &self.all {
                    for ob in o.bars.iter().filter(|ob| ob.kind != BarKind::Io) {
                        if o.bdf == f.dev.bdf && ob.index == b.index {
                            continue;
                        }
                        let Some(oa) = ob.addr else { continue };
                        let (q0, q1) = pages(oa.cpu, ob.size);
                        assert!(
                            q1 < p0 || p1 < q0,
                            "(i) {} BAR {} shares a page with {} BAR {}",
                            f.dev.bdf,
                            b.index,
                            o.bdf,
                            ob.index
                        );
                    }
                }
            }
        }
    }

    fn bar_of(f: &Func, slot: u8) -> Option<(crate::pci::Bar, bool)> {
        f.dev.bars.iter().find_map(|b| {
            if b.index == slot {
                Some((*b, false))
            } else if b.kind == BarKind::Mem64 && b.index + 1 == slot {
                Some((*b, true))
            } else {
                None
            }
        })
    }

    /// PCI Local Bus 3.0 6.2.5.1: what a BAR slot reads after all ones were written.
    fn size_mask(&self, f: &Func, slot: u8) -> u32 {
        match Self::bar_of(f, slot) {
            None => 0,
            Some((b, true)) => (!(b.size - 1) >> 32) as u32,
            Some((b, false)) => {
                let addr = !(b.size - 1) as u32;
                match b.kind {
                    BarKind::Io => addr & !3 | 1,
                    _ => {
                        addr & !0xf
                            | if b.kind == BarKind::Mem64 { 4 } else { 0 }
                            | if b.prefetchable { 8 } else { 0 }
                    }
                }
            }
        }
    }

    fn type_bits(&self, f: &Func, slot: u8) -> u32 {
        match Self::bar_of(f, slot) {
            Some((b, false)) if b.kind == BarKind::Io => 1,
            Some((b, false)) => {
                (if b.kind == BarKind::Mem64 { 4 } else { 0 }) | if b.prefetchable { 8 } else { 0 }
            }
            _ => 0,
        }
    }

    fn bar_addr(&self, f: &Func, b: &crate::pci::Bar) -> u64 {
        let i = usize::from(b.index);
        let low = f.vbar[i] & !self.type_bits(f, b.index);
        let high = if b.kind == BarKind::Mem64 {
            f.vbar.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        u64::from(low) | u64::from(high) << 32
    }

    /// The dword at `reg` of owned function `i` as the filtering table says the guest sees it.
    fn expected_dword(&self, i: usize, reg: u16) -> u32 {
        let f = &self.funcs[i];
        let hw = self.hw.read32(f.dev.bdf, reg);
        match reg {
            0x04 => {
                let hw = if self.checks.decode_virtual {
                    hw & !3 | f.decode
                } else {
                    hw
                };
                let hw = if f.msi_only { hw | 1 << 10 } else { hw };
                if f.visible.is_empty() {
                    hw & !(1 << 20)
                } else {
                    hw
                }
            }
            0x0c if !f.keep_multifunction => hw & !(0x80 << 16),
            0x10..=0x27 => {
                let slot = ((reg - 0x10) / 4) as u8;
                if f.sizing[usize::from(slot)] {
                    self.size_mask(f, slot)
                } else if Self::bar_of(f, slot).is_none() {
                    0
                } else {
                    f.vbar[usize::from(slot)]
                }
            }
            0x30 => 0,
            0x34 => hw & !0xff | u32::from(f.visible.first().map_or(0, |v| v.0 as u8)),
            0x3c if f.msi_only => hw & !0xffff | u32::from(f.interrupt_line),
            0x3c => hw & !0xff | u32::from(f.interrupt_line),
            0x40..=0xff => {
                if let Some(&(_, _, next)) = f.visible.iter().find(|v| v.0 == reg) {
                    hw & !0xff00 | u32::from(next) << 8
                } else if f.hidden.iter().any(|&(s, e)| (s..e).contains(&reg)) {
                    0
                } else if self.virtual_power(f) && f.pm.map(|p| p + 4) == Some(reg) {
                    hw & !3 | f.power_state
                } else {
                    hw
                }
            }
            _ => hw,
        }
    }

    /// Whether `f`'s PowerState is the guest's alone (PCI Bus PM 1.2 5.4.1: without
    /// No_Soft_Reset, D3hot -> D0 resets the function; with it, the function out of D0 stops
    /// decoding).
    fn virtual_power(&self, f: &Func) -> bool {
        self.checks.pm_power_state && f.pm.is_some()
    }

    /// The owned function (index into `funcs`) at an ECAM offset, and the register.
    fn decode(&self, off: u64) -> Option<(usize, u16)> {
        let bus = u8::try_from(off >> 20).ok()?;
        let bdf = Bdf::new(bus, (off >> 15 & 0x1f) as u8, (off >> 12 & 7) as u8);
        let i = self.funcs.iter().position(|f| f.dev.bdf == bdf)?;
        Some((i, (off & 0xfff) as u16))
    }

    /// (i) a guest read, checked; (a), (b) through the recorder.
    pub fn read(&mut self, off: u64, w: AccessWidth) -> u64 {
        let mut counts = Counts::default();
        let got = {
            let rec = Recorder {
                hw: &mut self.hw,
                funcs: &self.funcs,
                bridges: &self.bridges,
                checks: self.checks,
                counts: &mut counts,
                guest: &[],
            };
            self.vecam.read(&rec, off, w)
        };
        let dwords = if w == Double { 2 } else { 1 };
        assert!(
            counts.reads.get() <= dwords * (CAP_TTL + 8),
            "(a) a read at {off:#x} made {} hardware reads",
            counts.reads.get()
        );
        let want = self.expected_read(off, w);
        if let Some((i, reg)) = self.decode(off).filter(|_| got != want) {
            let f = &self.funcs[i];
            if let Some(&(s, e)) = f
                .hidden
                .iter()
                .find(|&&(s, e)| (s..e).contains(&(reg & !3)))
            {
                panic!(
                    "(d) {}: the guest reads {got:#x} at {reg:#x} in the hidden capability {s:#x}..{e:#x}",
                    f.dev.bdf
                );
            }
            if f.visible.iter().any(|v| v.0 == reg & !3) {
                panic!(
                    "(d) {}: the capability at {:#x} reads {got:#x} at {reg:#x}, documented {want:#x}: \
                     its next pointer must skip the hidden ones",
                    f.dev.bdf,
                    reg & !3
                );
            }
        }
        assert_eq!(
            got, want,
            "(i) guest read at {off:#x} ({w:?}): model {got:#x}, documented {want:#x}"
        );
        got
    }

    fn expected_read(&mut self, off: u64, w: AccessWidth) -> u64 {
        if w == Double {
            if !off.is_multiple_of(8) {
                return u64::MAX;
            }
            let lo = self.expected_read(off, Word);
            let hi = self.expected_read(off.wrapping_add(4), Word);
            return hi << 32 | lo;
        }
        if !off.is_multiple_of(w.bytes()) {
            return w.mask();
        }
        if let Some((i, reg)) = self.decode_bridge(off) {
            self.tally.bridge_reads += 1;
            let dword = self.expected_bridge_dword(i, reg & !3);
            return u64::from(dword) >> ((reg & 3) * 8) & w.mask();
        }
        let Some((i, reg)) = self.decode(off) else {
            return w.mask();
        };
        self.tally.owned_reads += 1;
        let dword = self.expected_dword(i, reg & !3);
        u64::from(dword) >> ((reg & 3) * 8) & w.mask()
    }

    /// A guest write, with every hardware write checked and the BAR moves compared.
    pub fn write(&mut self, off: u64, w: AccessWidth, value: u64) {
        let mut guest: Vec<GuestWrite> = Vec::new();
        let mut target = None;
        let aligned = off.is_multiple_of(w.bytes());
        if let Some((i, reg)) = aligned.then(|| self.decode(off)).flatten() {
            target = Some(i);
            if w == Double {
                guest.push(GuestWrite {
                    reg,
                    enable: u32::MAX,
                    value: value as u32,
                });
                guest.push(GuestWrite {
                    reg: reg + 4,
                    enable: u32::MAX,
                    value: (value >> 32) as u32,
                });
            } else {
                let shift = (reg & 3) * 8;
                guest.push(GuestWrite {
                    reg: reg & !3,
                    enable: (w.mask() << shift) as u32,
                    value: ((value & w.mask()) << shift) as u32,
                });
            }
        }
        // A shown bridge's Command and Interrupt Line are the guest's (in the model, before
        // the write, so that a Command read from hardware on first use is the old value).
        if let Some((i, reg)) = aligned.then(|| self.decode_bridge(off)).flatten() {
            let words: Vec<(u16, u32, u32)> = if w == Double {
                alloc::vec![
                    (reg, u32::MAX, value as u32),
                    (reg + 4, u32::MAX, (value >> 32) as u32)
                ]
            } else {
                let shift = (reg & 3) * 8;
                alloc::vec![(
                    reg & !3,
                    (w.mask() << shift) as u32,
                    ((value & w.mask()) << shift) as u32
                )]
            };
            for (reg, enable, v) in words {
                let b = self.bdf_hw_command(i);
                match reg {
                    0x04 if enable & 0xffff != 0 => {
                        let guest = GUEST_COMMAND & enable;
                        self.bridges[i].command = Some(b & !guest | v & guest);
                    }
                    0x3c if enable & 0xff != 0 => self.bridges[i].interrupt_line = v as u8,
                    _ => {}
                }
            }
        }
        let mut counts = Counts::default();
        {
            let mut rec = Recorder {
                hw: &mut self.hw,
                funcs: &self.funcs,
                bridges: &self.bridges,
                checks: self.checks,
                counts: &mut counts,
                guest: &guest,
            };
            self.vecam.write(&mut rec, off, w, value);
        }
        if target.is_none() {
            // A shown bridge's registers are read (its guest Command starts as hardware's).
            let bridge = aligned && self.decode_bridge(off).is_some();
            assert!(
                counts.writes == 0 && (bridge || counts.reads.get() == 0),
                "(b) a write at {off:#x} reached hardware"
            );
        }
        let n = guest.len().max(1);
        assert!(
            counts.writes <= n,
            "(a) a write at {off:#x} made {} hardware writes",
            counts.writes
        );
        assert!(
            counts.reads.get() <= n * (CAP_TTL + 8),
            "(a) a write at {off:#x} made {} hardware reads",
            counts.reads.get()
        );
        self.tally.hw_writes += counts.writes as u64;
        let mut want: Vec<BarMove> = Vec::new();
        if let Some(i) = target {
            for &g in &guest {
                match g.reg {
                    0x10..=0x27 => want.extend(self.bar_write(i, g)),
                    0x3c if g.enable & 0xff != 0 => self.funcs[i].interrupt_line = g.value as u8,
                    0x04 if g.enable & 0xff != 0 => {
                        self.funcs[i].decode = g.value & 3;
                    }
                    r if g.enable & 3 != 0
                        && self.virtual_power(&self.funcs[i])
                        && self.funcs[i].pm.map(|p| p + 4) == Some(r) =>
                    {
                        self.funcs[i].power_state = g.value & 3;
                    }
                    _ => {}
                }
            }
        }
        let got = self.vecam.take_bar_moves();
        for m in &got {
            let owned = self.funcs.iter().find(|f| f.dev.bdf == m.bdf);
            let bar = owned.and_then(|f| f.dev.bars.iter().find(|b| b.index == m.index));
            let Some(b) = bar else {
                panic!(
                    "(h) a BarMove for {} BAR {}, not an owned function's BAR: {m:?}",
                    m.bdf, m.index
                );
            };
            assert!(b.kind != BarKind::Io, "(h) a BarMove for an I/O BAR: {m:?}");
            let phys = b.addr.map(|a| a.cpu);
            assert!(
                m.size == b.size && Some(m.phys) == phys,
                "(h) {m:?}: the BAR is {b:?}"
            );
        }
        assert_eq!(
            got, want,
            "(h) BAR moves after a write of {value:#x} at {off:#x} ({w:?})"
        );
        self.tally.moves += got.len() as u64;
    }

    /// Shown bridge `i`'s guest Command, hardware's until the guest first reads or writes it.
    fn bdf_hw_command(&mut self, i: usize) -> u32 {
        let bdf = self.bridges[i].bdf;
        *self.bridges[i]
            .command
            .get_or_insert(self.hw.read32(bdf, 4) & 0xffff)
    }

    /// The reference BAR emulation (the sizing protocol of PCI Local Bus 3.0 6.2.5.1 per slot,
    /// type bits read-only); returns the move to expect.
    fn bar_write(&mut self, i: usize, g: GuestWrite) -> Option<BarMove> {
        let slot = ((g.reg - 0x10) / 4) as u8;
        let s = usize::from(slot);
        let probe = g.enable == u32::MAX && g.value == u32::MAX;
        self.funcs[i].sizing[s] = probe;
        let (b, _) = Self::bar_of(&self.funcs[i], slot)?;
        if probe {
            return None;
        }
        let before = self.bar_addr(&self.funcs[i], &b);
        let (mask, ty) = (
            self.size_mask(&self.funcs[i], slot),
            self.type_bits(&self.funcs[i], slot),
        );
        let f = &mut self.funcs[i];
        let merged = (f.vbar[s] & !g.enable) | (g.value & g.enable);
        f.vbar[s] = (merged & mask & !ty) | ty;
        let after = self.bar_addr(&self.funcs[i], &b);
        let f = &self.funcs[i];
        (after != before && b.kind != BarKind::Io)
            .then_some(())
            .and(b.addr)
            .map(|a| BarMove {
                bdf: f.dev.bdf,
                index: b.index,
                size: b.size,
                phys: a.cpu,
                pci: after,
            })
    }

    /// (j) `VirtualEcam::resolve`, the forwarding of I/O BAR accesses and of memory BAR accesses
    /// stage 2 cannot map: an answer must be inside an owned function's BAR of that space, as the
    /// guest placed it, translated to the same offset of the BAR's physical range, with the
    /// function decoding that space and in D0; and an access that is all that must be answered.
    pub fn resolve(&mut self, io: bool, pci: u64, len: u64) -> Option<u64> {
        let mut counts = Counts::default();
        let got = {
            let rec = Recorder {
                hw: &mut self.hw,
                funcs: &self.funcs,
                bridges: &self.bridges,
                checks: self.checks,
                counts: &mut counts,
                guest: &[],
            };
            self.vecam.resolve(&rec, io, pci, len)
        };
        assert!(
            counts.reads.get() <= CAP_TTL + 8,
            "(a) resolve made {} hardware reads",
            counts.reads.get()
        );
        self.tally.resolved += u64::from(got.is_some());
        // Every BAR the access lies wholly in, and where it would land.
        let mut fits = Vec::new();
        for f in &self.funcs {
            let cmd = if self.checks.decode_virtual {
                f.decode
            } else {
                self.hw.read32(f.dev.bdf, 4)
            };
            let decodes = cmd & if io { 1 } else { 2 } != 0;
            let d0 = f.pm.is_none_or(|p| {
                self.hw.read32(f.dev.bdf, p + 4) & 3 == 0
                    && !(self.virtual_power(f) && f.power_state != 0)
            });
            for b in f.dev.bars.iter().filter(|b| (b.kind == BarKind::Io) == io) {
                let Some(a) = b.addr else { continue };
                let base = self.bar_addr(f, b);
                let inside = pci >= base
                    && pci
                        .checked_add(len)
                        .is_some_and(|e| base.checked_add(b.size).is_some_and(|end| e <= end));
                if inside {
                    fits.push((f.dev.bdf, b.index, a.cpu + (pci - base), decodes && d0));
                }
            }
        }
        match got {
            Some(p) => {
                let ok = fits.iter().any(|&(_, _, at, on)| on && at == p);
                assert!(
                    ok,
                    "(j) resolve({io}, {pci:#x}, {len}) = {p:#x}: not in a decoding BAR of the VM's as placed ({fits:x?})"
                );
            }
            None => {
                let on = fits.iter().find(|f| f.3);
                assert!(
                    on.is_none() || fits.iter().any(|f| !f.3),
                    "(j) resolve({io}, {pci:#x}, {len}): nothing, yet it is in {on:x?}"
                );
            }
        }
        got
    }

    /// (d) Linux's capability walk through the guest's view.
    pub fn walk(&mut self, bdf: Bdf) {
        self.tally.walks += 1;
        // Nothing there (or not the VM's): Linux stops at the all-ones Vendor ID.
        if self.read(ecam(bdf, 0), Word) == 0xffff_ffff {
            return;
        }
        if self.read(ecam(bdf, 0x06), Half) & 0x10 == 0 {
            return;
        }
        let mut ptr = (self.read(ecam(bdf, 0x34), Byte) & 0xfc) as u16;
        let hidden: &[u8] = if self.msi {
            &[]
        } else {
            &[cap_id::MSI, cap_id::MSIX]
        };
        for step in 0.. {
            if ptr < 0x40 {
                break;
            }
            assert!(
                step < CAP_TTL,
                "(d) {bdf}: the guest's capability list does not end"
            );
            let id = self.read(ecam(bdf, ptr), Byte) as u8;
            let ea = self.checks.ea_hidden && id == CAP_EA;
            assert!(
                !hidden.contains(&id) && !ea,
                "(d) {bdf}: the guest finds capability {id:#x} at {ptr:#x}"
            );
            ptr = (self.read(ecam(bdf, ptr + 1), Byte) & 0xfc) as u16;
        }
    }

    /// A BDF: mostly an owned function, else a shown bridge, another of the topology, an
    /// absent one or any.
    fn bdf(&self, inp: &mut Input) -> Bdf {
        let sel = inp.u8();
        match sel & 7 {
            0..=3 if !self.funcs.is_empty() => self.funcs[inp.below(self.funcs.len())].dev.bdf,
            4 if !self.bridges.is_empty() => self.bridges[inp.below(self.bridges.len())].bdf,
            0..=5 => self.all[inp.below(self.all.len())].bdf,
            6 => Bdf::new(0, inp.u8() & 7, inp.u8() & 7),
            _ => Bdf::new(inp.u8(), inp.u8(), inp.u8()),
        }
    }

    fn reg(inp: &mut Input) -> u16 {
        const REGS: [u16; 16] = [
            0, 4, 6, 8, 0xc, 0xe, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x30, 0x34, 0x3c, 0x3d,
        ];
        let sel = inp.u8();
        match sel >> 5 {
            0..=2 => REGS[usize::from(sel & 15)],
            3..=5 => 0x40 + u16::from(inp.u8() & 0xbf),
            6 => 0x100 + (inp.u16() & 0xeff),
            _ => inp.u16() & 0xfff,
        }
    }

    /// A width that fits `reg`'s alignment, mostly.
    fn width_for(inp: &mut Input, reg: u16) -> AccessWidth {
        let w = inp.width();
        if inp.u8() & 7 == 0 || reg.is_multiple_of(w.bytes() as u16) {
            w
        } else if reg.is_multiple_of(2) {
            Half
        } else {
            Byte
        }
    }

    /// A capability of an owned function (hidden ones included) and an offset in it.
    fn cap_reg(&self, inp: &mut Input) -> Option<(Bdf, u16)> {
        let f = self.funcs.get(inp.below(self.funcs.len()))?;
        let mut caps: Vec<u16> = f.visible.iter().map(|v| v.0).collect();
        caps.extend(f.hidden.iter().map(|h| h.0));
        let base = *caps.get(inp.below(caps.len()))?;
        Some((f.dev.bdf, base + u16::from(inp.u8() & 0xf)))
    }

    fn cap_value(inp: &mut Input) -> u64 {
        match inp.u8() & 7 {
            // Initiate FLR (PCIe Device Control 15, AF Control 0), D3hot, D0, PME_Status.
            0 => 1 << 15,
            1 => 1,
            2 => 3,
            3 => 0,
            4 => 0x8000_8000,
            5 => u64::MAX,
            _ => inp.u32().into(),
        }
    }

    /// One operation from the input.
    pub(crate) fn step(&mut self, inp: &mut Input) {
        match inp.u8() & 15 {
            0..=2 => {
                let (bdf, reg) = (self.bdf(inp), Self::reg(inp));
                let w = Self::width_for(inp, reg);
                self.read(ecam(bdf, reg), w);
            }
            3..=5 => {
                let (bdf, reg) = (self.bdf(inp), Self::reg(inp));
                let w = Self::width_for(inp, reg);
                let v = inp.u64();
                self.write(ecam(bdf, reg), w, v);
            }
            6 => {
                // Linux's __pci_read_base: save, all ones, read the mask, restore (or move).
                let (bdf, slot) = (self.bdf(inp), u16::from(inp.u8()) % 6);
                let at = ecam(bdf, 0x10 + 4 * slot);
                let old = self.read(at, Word);
                self.write(at, Word, u32::MAX.into());
                self.read(at, Word);
                self.tally.sizings += 1;
                let back = if inp.u8() & 3 == 0 {
                    inp.u32().into()
                } else {
                    old
                };
                self.write(at, Word, back);
            }
            7 => {
                let (bdf, slot) = (self.bdf(inp), u16::from(inp.u8()) % 6);
                let at = ecam(bdf, 0x10 + 4 * slot);
                let addr = match inp.u8() & 3 {
                    0 => 0x1000_0000 + (u64::from(inp.u16()) << 12),
                    1 => 0x80_0000_0000 + (u64::from(inp.u16()) << 14),
                    2 => u64::MAX - u64::from(inp.u8()),
                    _ => inp.u64(),
                };
                if inp.bool() && at.is_multiple_of(8) {
                    self.write(at, Double, addr);
                } else {
                    self.write(at, Word, addr & 0xffff_ffff);
                    self.write(at + 4, Word, addr >> 32);
                }
            }
            8 => {
                let bdf = self.bdf(inp);
                let v = u64::from(inp.u16());
                let w = [Half, Word, Byte][inp.below(3)];
                self.write(ecam(bdf, 4), w, v);
            }
            9 => {
                // The device latches status bits; the guest clears some.
                if let Some(&(bdf, handle)) = self.handles.get(inp.below(self.handles.len())) {
                    let cmd = self.hw.read32(bdf, 4);
                    self.hw
                        .set(handle, 4, cmd | u32::from(inp.u16() & 0xf900) << 16);
                }
                let bdf = self.bdf(inp);
                self.write(ecam(bdf, 6), Half, u64::from(inp.u16()));
            }
            10 => {
                if let Some((bdf, reg)) = self.cap_reg(inp) {
                    let w = Self::width_for(inp, reg);
                    let v = Self::cap_value(inp);
                    if inp.u8() & 3 == 0 {
                        self.read(ecam(bdf, reg), w);
                    } else {
                        self.write(ecam(bdf, reg), w, v);
                    }
                }
            }
            11 => {
                let bdf = self.bdf(inp);
                self.walk(bdf);
            }
            12 => {
                let (bdf, reg) = (self.bdf(inp), Self::reg(inp) & !3);
                if inp.bool() {
                    self.read(ecam(bdf, reg), Double);
                } else {
                    let v = inp.u64();
                    self.write(ecam(bdf, reg), Double, v);
                }
            }
            13 if inp.bool() => {
                // An access stage 2 does not map: mostly inside or at the edges of an owned BAR
                // as the guest placed it.
                let io = inp.u8() & 1 == 0;
                let len = [1, 2, 4, 8][inp.below(4)];
                let pci = match self.funcs.get(inp.below(self.funcs.len())) {
                    Some(f) if !f.dev.bars.is_empty() && inp.u8() & 3 != 0 => {
                        let b = f.dev.bars[inp.below(f.dev.bars.len())];
                        let base = self.bar_addr(f, &b);
                        let delta = u64::from(inp.u16()) % (b.size + 16);
                        if inp.bool() {
                            base.wrapping_add(delta)
                        } else {
                            base.wrapping_sub(delta & 0xf)
                        }
                    }
                    _ => inp.u64(),
                };
                self.resolve(io, pci, len);
            }
            13 => {
                let off = match inp.u8() & 3 {
                    0 => inp.u64(),
                    1 => 0x1000_0000 - 4 + u64::from(inp.u8() & 7),
                    _ => u64::from(inp.u32()) & 0x0fff_ffff,
                };
                let w = inp.width();
                if inp.bool() {
                    self.read(off, w);
                } else {
                    let v = inp.u64();
                    self.write(off, w, v);
                }
            }
            14 => {
                let bdf = self.bdf(inp);
                let v = u64::from(inp.u8());
                self.write(ecam(bdf, 0x3c), Byte, v);
                self.read(ecam(bdf, 0x3c), Word);
            }
            _ => {
                // The VM's reset: a new bridge over the same functions (`Vm::load`).
                self.vecam = VirtualEcam::new(self.given.clone(), self.shown.clone())
                    .with_msi(self.msi)
                    .with_msi_only(&mut self.hw, &self.msi_only);
                self.funcs = self.make_funcs();
                self.bridges = self.make_bridges();
            }
        }
    }
}

/// Interprets `data` as a hostile guest's program against the vECAM (docs/fuzzing.md).
pub fn run(data: &[u8]) {
    run_with(data, Checks::default());
}

/// [`run`] with switched-on checks, returning the harness at the end.
pub fn run_with(data: &[u8], checks: Checks) -> Harness {
    let mut inp = Input::new(data);
    let (sel, owned) = (inp.u8(), inp.u16());
    let mut h = Harness::new(sel, owned, checks);
    for _ in 0..MAX_OPS {
        if inp.is_empty() {
            break;
        }
        h.step(&mut inp);
    }
    let bdfs: Vec<Bdf> = h.funcs.iter().map(|f| f.dev.bdf).collect();
    for bdf in bdfs {
        h.walk(bdf);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::super::Rng;
    use super::*;

    fn random(checks: Checks, n: usize) -> Tally {
        let mut rng = Rng(0xa409_3822_299f_31d0);
        let mut t = Tally::default();
        for _ in 0..n {
            let data = rng.input(300);
            let a = run_with(&data, checks).tally;
            t.owned_reads += a.owned_reads;
            t.hw_writes += a.hw_writes;
            t.moves += a.moves;
            t.sizings += a.sizings;
            t.walks += a.walks;
            t.resolved += a.resolved;
            t.bridge_reads += a.bridge_reads;
        }
        t
    }

    #[test]
    fn random_inputs_keep_the_invariants() {
        let t = random(Checks::default(), 1500);
        assert!(
            t.owned_reads > 5000
                && t.hw_writes > 500
                && t.moves > 100
                && t.sizings > 100
                && t.resolved > 50
                && t.bridge_reads > 300,
            "shallow: {t:?}"
        );
    }

    // The checks are themselves tested: each test makes one hardware access a broken model
    // would make, through the recorder, and expects the invariant's panic.

    /// The rich topology with every endpoint owned, the PM and AF rules on.
    fn rich_all() -> Harness {
        Harness::new(3, 0x7fff, Checks::parse("pm,af,ea"))
    }

    /// A hardware write as the model would make it while serving a guest write of `g`.
    fn hw_write(h: &mut Harness, bdf: Bdf, off: u16, value: u32, g: GuestWrite) {
        let mut counts = Counts::default();
        let mut rec = Recorder {
            hw: &mut h.hw,
            funcs: &h.funcs,
            bridges: &h.bridges,
            checks: h.checks,
            counts: &mut counts,
            guest: &[g],
        };
        rec.write32(bdf, off, value);
    }

    fn full(reg: u16, value: u32) -> GuestWrite {
        GuestWrite {
            reg,
            enable: u32::MAX,
            value,
        }
    }

    const F0: Bdf = Bdf::new(0, 1, 0);

    #[test]
    #[should_panic(expected = "(b) hardware write of 0x6 at 0x4 of the shown bridge 00:02.0")]
    fn a_write_to_a_bridge_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, Bdf::new(0, 2, 0), 4, 6, full(4, 6));
    }

    #[test]
    #[should_panic(expected = "(b) hardware read of 00:05.0")]
    fn a_read_of_an_absent_function_is_caught() {
        let mut h = rich_all();
        let mut counts = Counts::default();
        let rec = Recorder {
            hw: &mut h.hw,
            funcs: &h.funcs,
            bridges: &h.bridges,
            checks: h.checks,
            counts: &mut counts,
            guest: &[],
        };
        rec.read32(Bdf::new(0, 5, 0), 0);
    }

    #[test]
    #[should_panic(expected = "(c) 00:01.0: hardware BAR at 0x10 written")]
    fn a_physical_bar_write_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 0x10, 0, full(0x10, 0));
    }

    #[test]
    #[should_panic(expected = "into the hidden capability 0x70..0x80")]
    fn a_write_into_msi_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 0x74, 0xfee0_0000, full(0x74, 0xfee0_0000));
    }

    #[test]
    #[should_panic(
        expected = "(d) 00:04.0: hardware write at 0x50 into the hidden capability 0x40..0x54"
    )]
    fn a_write_into_virtio_pci_cfg_is_caught() {
        let mut h = Harness::new(3, 0x7fff, Checks::default());
        let virtio = Bdf::new(0, 4, 0);
        hw_write(&mut h, virtio, 0x50, 1, full(0x50, 1));
    }

    /// The rich topology, every endpoint owned, MSI shown, 00:01.0 (the first) MSI-only.
    fn rich_msi() -> Harness {
        Harness::new(3 | 8 | 0x10, 0x7fff, Checks::default())
    }

    const F1: Bdf = Bdf::new(0, 1, 1);

    fn func(h: &Harness, bdf: Bdf) -> &Func {
        h.funcs.iter().find(|f| f.dev.bdf == bdf).unwrap()
    }

    #[test]
    fn msi_mode_shows_and_passes_msi_through_the_model() {
        let mut h = rich_msi();
        let msi = func(&h, F0).msi.expect("00:01.0 has MSI");
        let msix = func(&h, F1).msix.expect("00:01.1 has MSI-X");
        assert!(func(&h, F0).msi_only && !func(&h, F1).msi_only);
        assert!(func(&h, F0).hidden.is_empty());
        // Set before the guest ran.
        assert_ne!(h.hw.read32(F0, 4) & 1 << 10, 0);
        // The walk finds both (it would panic on them without MSI).
        h.walk(F0);
        h.walk(F1);
        // Enable with 128 vectors asked of a 1-vector function; address and data through.
        // (The fake's Message Control is read-only: the write is seen by the recorder only.)
        let before = h.tally.hw_writes;
        h.write(ecam(F0, msi + 2), Half, 0x0071);
        assert_eq!(h.tally.hw_writes, before + 1);
        h.write(ecam(F0, msi + 4), Word, 0x0809_0040);
        h.write(ecam(F0, msi + 12), Half, 0x2a);
        assert_eq!(h.hw.read32(F0, msi + 4), 0x0809_0040);
        assert_eq!(h.hw.read32(F0, msi + 12) & 0xffff, 0x2a);
        assert_eq!(h.read(ecam(F0, msi + 4), Word), 0x0809_0040);
        h.write(ecam(F1, msix + 2), Half, 0xc7ff);
        h.write(ecam(F1, msix + 4), Word, 0x1234_5678);
        // The MSI-only function: INTx Disable stays, no pin.
        h.write(ecam(F0, 4), Half, 0x0007);
        assert_ne!(h.hw.read32(F0, 4) & 1 << 10, 0);
        assert_eq!(h.read(ecam(F0, 4), Half) & 1 << 10, 1 << 10);
        assert_eq!(h.read(ecam(F0, 0x3d), Byte), 0);
        assert_eq!(h.read(ecam(F1, 0x3d), Byte), 2);
        // The VM's reset keeps both.
        let mut inp = Input::new(&[0xff]);
        h.step(&mut inp);
        h.walk(F0);
        assert_eq!(h.read(ecam(F0, 0x3d), Byte), 0);
    }

    #[test]
    #[should_panic(expected = "(k) 00:01.1: MSI-X Table or PBA Offset/BIR")]
    fn an_msix_bir_write_is_caught() {
        let mut h = rich_msi();
        let m = func(&h, F1).msix.unwrap();
        hw_write(&mut h, F1, m + 4, 0x1001, full(m + 4, 0x1001));
    }

    #[test]
    #[should_panic(expected = "(k) 00:01.1: MSI-X Message Control bits 0x7ff0000 changed")]
    fn an_msix_table_size_write_is_caught() {
        let mut h = rich_msi();
        let m = func(&h, F1).msix.unwrap();
        let hw = h.hw.read32(F1, m);
        let v = hw | 0x07ff_0000;
        hw_write(&mut h, F1, m, v, full(m, v));
    }

    #[test]
    #[should_panic(expected = "(k) 00:01.0: Multiple Message Enable 7 above Capable 0")]
    fn an_msi_mme_above_capable_is_caught() {
        let mut h = rich_msi();
        let m = func(&h, F0).msi.unwrap();
        let v = h.hw.read32(F0, m) | 0x71 << 16;
        hw_write(&mut h, F0, m, v, full(m, v));
    }

    #[test]
    #[should_panic(expected = "(k) 00:01.0: INTx Disable of an MSI-only function cleared")]
    fn an_msi_only_intx_enable_is_caught() {
        let mut h = rich_msi();
        let v = h.hw.read32(F0, 4) & 0xffff & !(1 << 10);
        hw_write(&mut h, F0, 4, v, full(4, v));
    }

    #[test]
    #[should_panic(expected = "(e) 00:01.0: Command bits 0x10 changed")]
    fn memory_write_and_invalidate_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 4, 0x16, full(4, 0x16));
    }

    #[test]
    #[should_panic(expected = "(e) 00:01.0: Command bits 0x2 changed")]
    fn a_decode_write_through_is_caught() {
        let mut h = Harness::new(3, 0x7fff, Checks::parse("decode"));
        let hw = h.hw.read32(F0, 4) & 0xffff;
        assert_eq!(hw & 3, 3, "the hypervisor's placement enables decoding");
        hw_write(&mut h, F0, 4, hw & !2, full(4, hw & !2));
    }

    #[test]
    #[should_panic(expected = "(e) 00:01.0: PCIe Initiate Function Level Reset written")]
    fn a_pcie_flr_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 0x48, 1 << 15, full(0x48, 1 << 15));
    }

    #[test]
    #[should_panic(expected = "(f) 00:01.0: RW1C bits 0x80000000 at 0x4 written back as read")]
    fn a_status_write_back_is_caught() {
        let mut h = rich_all();
        let handle = h.handles[0].1;
        h.hw.set(handle, 4, 0x8010_0006);
        // The guest wrote the Command half only; the model wrote the dword back as read.
        let g = GuestWrite {
            reg: 4,
            enable: 0xffff,
            value: 6,
        };
        hw_write(&mut h, F0, 4, 0x8010_0006, g);
    }

    #[test]
    #[should_panic(expected = "(g) 00:01.0: a write of bytes 0xff00 at 0x54 changed others")]
    fn a_narrow_write_that_clobbers_its_neighbours_is_caught() {
        let mut h = rich_all();
        let g = GuestWrite {
            reg: 0x54,
            enable: 0xff00,
            value: 0x100,
        };
        hw_write(&mut h, F0, 0x54, 0x103, g);
    }

    #[test]
    #[should_panic(expected = "(i) 00:01.0: PowerState 0 -> 3 written (No_Soft_Reset=0)")]
    fn a_d3hot_write_through_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 0x54, 3, full(0x54, 3));
    }

    #[test]
    #[should_panic(expected = "(i) 00:01.1: PowerState 0 -> 3 written (No_Soft_Reset=1)")]
    fn a_d3hot_write_through_is_caught_with_no_soft_reset() {
        let mut h = rich_all();
        let f1 = Bdf::new(0, 1, 1);
        hw_write(&mut h, f1, 0x54, 3 | 1 << 3, full(0x54, 3));
    }

    #[test]
    #[should_panic(expected = "(i) 00:01.0: Advanced Features Initiate FLR written")]
    fn an_af_flr_is_caught() {
        let mut h = rich_all();
        hw_write(&mut h, F0, 0x64, 1, full(0x64, 1));
    }

    #[test]
    #[should_panic(expected = "(h) BAR moves")]
    fn a_missing_bar_move_is_caught() {
        let mut h = Harness::new(0, 0x7fff, Checks::default());
        // A reference that believes the BAR is elsewhere stands for a model that reports
        // nothing, or the wrong address.
        let i = h
            .funcs
            .iter()
            .position(|f| f.dev.bdf == Bdf::new(0, 1, 0))
            .unwrap();
        h.funcs[i].vbar[1] ^= 0x1000;
        h.write(ecam(Bdf::new(0, 1, 0), 0x14), Word, 0x1000_0000);
    }

    #[test]
    #[should_panic(
        expected = "(j) resolve(false, 0x10000000, 4) = 0x10000000: not in a decoding BAR"
    )]
    fn a_forwarded_access_outside_the_guests_bars_is_caught() {
        let mut h = Harness::new(0, 0x7fff, Checks::ALL);
        // A reference that believes BAR 1 moved stands for a model resolving at the old place.
        let i = h
            .funcs
            .iter()
            .position(|f| f.dev.bdf == Bdf::new(0, 1, 0))
            .unwrap();
        h.funcs[i].vbar[1] ^= 0x0100_0000;
        h.resolve(false, 0x1000_0000, 4);
    }

    #[test]
    fn empty_and_tiny_inputs() {
        run(&[]);
        for b in 0..=255u8 {
            run(&[b, b, !b]);
            run(&[b, 0xff, 0xff, 11, 0, 6, 0, 0, 10, 0, 0, 0]);
        }
    }
}
