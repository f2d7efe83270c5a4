//! The physical PCIe hierarchy behind the host's ECAM root complex.
//!
//! Without firmware nobody configures PCI on QEMU's `virt`, so the hypervisor does what a
//! firmware or Linux's PCI core would do, in this order:
//!
//! 1. [`host`]: describe the host bridge from its `pci-host-ecam-generic` DT node (ECAM window,
//!    bus range, address windows, `iommu-map`, `interrupt-map`);
//! 2. [`enumerate`]: walk the buses depth first, number bridges, size BARs, read capabilities;
//! 3. [`resources`]: place every BAR and bridge window in the host bridge's windows and turn on
//!    decoding;
//! 4. [`groups`]: compute IOMMU groups exactly as Linux's `pci_device_group` would, with the
//!    StreamIDs each group emits;
//! 5. [`virtio`]: find virtio functions whose DMA would bypass the IOMMU;
//! 6. [`assign`] and [`isolation`]: refuse VM configurations that split a group, share a device
//!    or an INTx line, assign a function whose DMA is not translated, or would map a page that
//!    holds registers of a function the VM does not own.
//!
//! Hardware is reached only through [`ConfigSpace`], so all of it runs on the host against a
//! fake configuration space.

use core::fmt;

use thiserror::Error;

use crate::platform::PlatformError;

pub mod assign;
pub mod enumerate;
pub mod groups;
pub mod host;
pub mod isolation;
pub mod regs;
pub mod resources;
pub mod segments;
pub mod virtio;

// The fake configuration space, also the ground of the vECAM fuzz harness (docs/fuzzing.md).
#[cfg(any(test, feature = "fuzzing"))]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) mod fake;

pub use assign::{
    check_assignment, check_intx, resolve, resolve_msi, AssignError, IommuDirectory, IommuEntry,
    UnitStreams, VmDevices,
};
pub use enumerate::{
    enumerate, Bar, BarAddr, BarKind, BridgeInfo, HeaderType, PciDevice, PcieInfo, PortType,
    Topology,
};
pub use groups::{iommu_groups, GroupIommu, IommuGroup};
pub use host::{
    host_bridges, BridgeNode, HostBridge, InterruptMap, InterruptMapEntry, IntxPin, IntxRoute,
    IommuMapEntry, MsiMapEntry, PciSpace, PciWindow,
};
pub use isolation::{DeviceSlot, IsolationError};
pub use resources::{assign_resources, ResourceName, DEVICE_PAGE};
pub use segments::{resolve_all, resolve_all_msi, Segment, SegmentDevices, VmPciDevices};

/// A PCI function's address on its segment: bus, device (slot) and function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device (slot) number, 0-31.
    pub dev: u8,
    /// Function number, 0-7.
    pub func: u8,
}

impl Bdf {
    /// A BDF; `dev` and `func` are truncated to their 5 and 3 bits.
    pub const fn new(bus: u8, dev: u8, func: u8) -> Self {
        Bdf {
            bus,
            dev: dev & 0x1f,
            func: func & 0x7,
        }
    }

    /// The Requester ID this function puts in its TLPs (PCIe Base spec 2.2.6.2): bus in 15:8,
    /// device in 7:3, function in 2:0. It is what `iommu-map` translates into a StreamID.
    pub const fn rid(self) -> u16 {
        ((self.bus as u16) << 8) | ((self.dev as u16 & 0x1f) << 3) | (self.func as u16 & 0x7)
    }

    /// Parses `BB:DD.F` (hex bus and device, function 0-7), as Linux prints and the VM
    /// configuration names functions.
    pub fn parse(s: &str) -> Option<Self> {
        let (bus, rest) = s.split_once(':')?;
        let (dev, func) = rest.split_once('.')?;
        let bus = u8::from_str_radix(bus, 16).ok()?;
        let dev = u8::from_str_radix(dev, 16).ok().filter(|&d| d < 32)?;
        let func = func.parse::<u8>().ok().filter(|&f| f < 8)?;
        (bus_ok(s)).then_some(Bdf { bus, dev, func })
    }

    /// The BDF a Requester ID names.
    pub const fn from_rid(rid: u16) -> Self {
        Bdf {
            bus: (rid >> 8) as u8,
            dev: ((rid >> 3) & 0x1f) as u8,
            func: (rid & 0x7) as u8,
        }
    }
}

/// Exactly two hex digits, a colon, two hex digits, a dot and one digit.
fn bus_ok(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 7
        && b[2] == b':'
        && b[5] == b'.'
        && [0, 1, 3, 4].iter().all(|&i| b[i].is_ascii_hexdigit())
        && b[6].is_ascii_digit()
}

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:02x}:{:02x}.{:x}", self.bus, self.dev, self.func)
    }
}

/// A PCI function's address on the machine: its host bridge's PCI domain (segment) and its BDF
/// there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddr {
    /// The domain (`linux,pci-domain` of its host bridge).
    pub domain: u16,
    /// Bus, device and function on that bridge.
    pub bdf: Bdf,
}

impl PciAddr {
    /// Function `bdf` of domain `domain`.
    pub const fn new(domain: u16, bdf: Bdf) -> Self {
        Self { domain, bdf }
    }

    /// Parses `DDDD:BB:DD.F` (four hex digits of domain) or `BB:DD.F` (domain 0), as Linux
    /// prints functions and the VM configuration names them.
    pub fn parse(s: &str) -> Option<Self> {
        match s.len() {
            7 => Bdf::parse(s).map(|bdf| Self::new(0, bdf)),
            12 if s.as_bytes()[4] == b':' => {
                let (d, rest) = s.split_at(4);
                if !d.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return None;
                }
                let domain = u16::from_str_radix(d, 16).ok()?;
                Bdf::parse(&rest[1..]).map(|bdf| Self::new(domain, bdf))
            }
            _ => None,
        }
    }
}

impl From<Bdf> for PciAddr {
    fn from(bdf: Bdf) -> Self {
        Self::new(0, bdf)
    }
}

/// `BB:DD.F` in domain 0 (how the one-bridge machines every earlier log and configuration
/// named functions), `DDDD:BB:DD.F` elsewhere.
impl fmt::Display for PciAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.domain != 0 {
            write!(f, "{:04x}:", self.domain)?;
        }
        write!(f, "{}", self.bdf)
    }
}

/// How a virtio function's DMA reaches memory, as `virtio::probe` found it (here, beside the
/// other facts enumeration records, because [`PciDevice`] holds it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioDma {
    /// It offers VIRTIO_F_ACCESS_PLATFORM: its DMA is translated by the IOMMU.
    Translated,
    /// A modern interface without VIRTIO_F_ACCESS_PLATFORM: its DMA bypasses the IOMMU.
    NoAccessPlatform,
    /// Only the legacy interface (no modern capabilities): it cannot offer the feature.
    LegacyOnly,
    /// The common configuration is not inside a placed memory BAR, so the feature bits could
    /// not be read.
    Unknown,
}

impl VirtioDma {
    /// Whether the function may be assigned to a VM.
    pub const fn translated(self) -> bool {
        matches!(self, VirtioDma::Translated)
    }
}

/// 32-bit access to the configuration space of any function under the host bridge.
///
/// Only dword accesses: ECAM allows narrower ones, but dwords are all every register we touch
/// needs, and a single width keeps fakes simple. Reads of an absent function must return all
/// ones, as a real root complex does for an Unsupported Request on a configuration read (PCIe
/// Base spec 2.3.2); enumeration relies on that.
pub trait ConfigSpace {
    /// Reads the dword at `offset` (a multiple of 4, below 4096).
    fn read32(&self, bdf: Bdf, offset: u16) -> u32;
    /// Writes the dword at `offset` (a multiple of 4, below 4096).
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32);
}

impl<C: ConfigSpace + ?Sized> ConfigSpace for &mut C {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        (**self).read32(bdf, offset)
    }

    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        (**self).write32(bdf, offset, value)
    }
}

/// Why the PCI hierarchy could not be described, enumerated or configured.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum PciError {
    /// The host DT is malformed, or its host bridge node has a missing or unusable property.
    #[error("host bridge DT: {0}")]
    Dt(#[from] PlatformError),
    /// A bridge was found but no bus number in the host bridge's bus range is left for it.
    #[error(
        "no bus number left in {first:#04x}-{last:#04x} for the secondary bus of bridge {bridge}"
    )]
    BusNumbersExhausted {
        /// The bridge that needed a bus number.
        bridge: Bdf,
        /// First bus of the host bridge's range.
        first: u8,
        /// Last bus of the host bridge's range.
        last: u8,
    },
    /// A 64-bit BAR occupies the last BAR slot, so its upper half does not exist.
    #[error("{bdf}: BAR {bar} is 64-bit but is the last BAR of its header")]
    TruncatedBar64 {
        /// The function.
        bdf: Bdf,
        /// The BAR's index.
        bar: u8,
    },
    /// A resource needs a kind of host bridge window that the DT does not describe.
    #[error("{bdf}: {what} needs a host bridge {window} window, and the DT has none")]
    NoWindow {
        /// The function owning the resource.
        bdf: Bdf,
        /// Which resource.
        what: ResourceName,
        /// The kind of window ("I/O", "32-bit memory", "64-bit prefetchable memory").
        window: &'static str,
    },
    /// A host bridge window is full: the named resource does not fit in what is left.
    #[error(
        "{bdf}: {what} ({size:#x} bytes) does not fit in the host bridge {window} window \
         {base:#x}-{end:#x}"
    )]
    WindowExhausted {
        /// The function owning the resource.
        bdf: Bdf,
        /// Which resource.
        what: ResourceName,
        /// Its size in bytes.
        size: u64,
        /// The kind of window.
        window: &'static str,
        /// First PCI address of the window.
        base: u64,
        /// One past the window's last PCI address.
        end: u64,
    },
}
