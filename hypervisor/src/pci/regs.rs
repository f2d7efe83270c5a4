//! Configuration space layout (PCI Express Base spec 7.5 "PCI and PCIe capabilities required by
//! the base spec"), as dword offsets and field accessors, so that the rest of the module never
//! shifts bare numbers around. Everything is read and written a dword at a time (see
//! [`super::ConfigSpace`]).

/// Vendor ID (15:0) and Device ID (31:16). Vendor 0xffff means "no function here".
pub const ID: u16 = 0x00;
/// Command (15:0) and Status (31:16). Status bits are RW1C: write zeros there.
pub const COMMAND: u16 = 0x04;
/// Revision ID (7:0) and Class Code (31:8).
pub const CLASS_REV: u16 = 0x08;
/// Cache line size, latency timer, Header Type (23:16), BIST.
pub const HEADER: u16 = 0x0c;
/// First Base Address Register; BAR n is at `BAR0 + 4 * n`.
pub const BAR0: u16 = 0x10;
/// Capabilities Pointer (7:0), valid when Status.Capabilities List is set.
pub const CAP_PTR: u16 = 0x34;
/// Interrupt Line (7:0) and Interrupt Pin (15:8).
pub const INTERRUPT: u16 = 0x3c;

/// Type 1 (bridge): Primary (7:0), Secondary (15:8), Subordinate (23:16) bus numbers and the
/// secondary latency timer (31:24). PCI-to-PCI Bridge spec 3.2.5.
pub const BRIDGE_BUSES: u16 = 0x18;
/// Type 1: I/O Base (7:0), I/O Limit (15:8), Secondary Status (31:16, RW1C).
pub const BRIDGE_IO: u16 = 0x1c;
/// Type 1: Memory Base (15:0) and Limit (31:16): address bits 31:20 in bits 15:4 of each.
pub const BRIDGE_MEM: u16 = 0x20;
/// Type 1: Prefetchable Memory Base (15:0) and Limit (31:16), same format plus a 64-bit flag.
pub const BRIDGE_PREF: u16 = 0x24;
/// Type 1: Prefetchable Base Upper 32 bits.
pub const BRIDGE_PREF_BASE_UPPER: u16 = 0x28;
/// Type 1: Prefetchable Limit Upper 32 bits.
pub const BRIDGE_PREF_LIMIT_UPPER: u16 = 0x2c;
/// Type 1: I/O Base Upper 16 bits (15:0) and I/O Limit Upper 16 bits (31:16).
pub const BRIDGE_IO_UPPER: u16 = 0x30;

/// Command register bits (PCIe Base spec 7.5.1.1.3).
pub mod command {
    /// I/O Space Enable.
    pub const IO: u32 = 1 << 0;
    /// Memory Space Enable.
    pub const MEMORY: u32 = 1 << 1;
    /// Bus Master Enable.
    pub const BUS_MASTER: u32 = 1 << 2;
    /// Interrupt Disable: the function does not assert INTx.
    pub const INTX_DISABLE: u32 = 1 << 10;
}

/// Status register bit 4 (in the upper half of the `COMMAND` dword): a capability list exists.
pub const STATUS_CAP_LIST: u32 = 1 << (16 + 4);

/// Header Type field values (PCIe Base spec 7.5.1.1.9), bits 6:0 of the Header Type byte.
pub const HEADER_TYPE_ENDPOINT: u8 = 0;
/// Type 1: PCI-to-PCI bridge.
pub const HEADER_TYPE_BRIDGE: u8 = 1;
/// Bit 7 of the Header Type byte: the device has more than one function.
pub const HEADER_MULTIFUNCTION: u8 = 0x80;

/// BAR low-dword fields (PCIe Base spec 7.5.1.2.1).
pub mod bar {
    /// Bit 0: 1 for an I/O BAR.
    pub const IO_SPACE: u32 = 1 << 0;
    /// Memory BAR type, bits 2:1: 0b10 is a 64-bit BAR.
    pub const MEM_TYPE_64: u32 = 0b10 << 1;
    /// Memory BAR type mask.
    pub const MEM_TYPE_MASK: u32 = 0b11 << 1;
    /// Memory BAR bit 3: prefetchable.
    pub const PREFETCHABLE: u32 = 1 << 3;
    /// Address bits of a memory BAR.
    pub const MEM_ADDR_MASK: u32 = !0xf;
    /// Address bits of an I/O BAR.
    pub const IO_ADDR_MASK: u32 = !0x3;
}

/// Capability IDs in the conventional list (PCI Code and ID Assignment spec, chapter 2).
pub mod cap_id {
    /// PCI Power Management.
    pub const PM: u8 = 0x01;
    /// MSI.
    pub const MSI: u8 = 0x05;
    /// Vendor specific (virtio's configuration structures, virtio 1.2 4.1.4).
    pub const VENDOR: u8 = 0x09;
    /// PCI Express.
    pub const PCIE: u8 = 0x10;
    /// MSI-X.
    pub const MSIX: u8 = 0x11;
    /// Advanced Features (conventional PCI's FLR, PCI Advanced Features ECN).
    pub const AF: u8 = 0x13;
    /// Enhanced Allocation (PCIe Base spec 7.8.5): fixed BAR placement.
    pub const EA: u8 = 0x14;
}

/// Extended capability IDs (PCI Code and ID Assignment spec, chapter 3).
pub mod ext_cap_id {
    /// Access Control Services.
    pub const ACS: u16 = 0x000d;
}

/// Where the extended capability list starts (PCIe Base spec 7.6.3).
pub const EXT_CAP_START: u16 = 0x100;

/// ACS Capability register bits (PCIe Base spec 7.7.8.2), the same positions in ACS Control.
pub mod acs {
    /// Source Validation.
    pub const SV: u16 = 1 << 0;
    /// Translation Blocking.
    pub const TB: u16 = 1 << 1;
    /// P2P Request Redirect.
    pub const RR: u16 = 1 << 2;
    /// P2P Completion Redirect.
    pub const CR: u16 = 1 << 3;
    /// Upstream Forwarding.
    pub const UF: u16 = 1 << 4;
    /// P2P Egress Control.
    pub const EC: u16 = 1 << 5;
    /// Direct Translated P2P.
    pub const DT: u16 = 1 << 6;
}

/// Granularity of a bridge memory window: its base and limit registers hold address bits 31:20.
pub const BRIDGE_MEM_GRANULE: u64 = 1 << 20;
/// Granularity of a bridge I/O window: its base and limit registers hold address bits 15:12.
pub const BRIDGE_IO_GRANULE: u64 = 1 << 12;

/// The Header Type byte of a `HEADER` dword.
pub const fn header_type(header: u32) -> u8 {
    (header >> 16) as u8
}

/// Next-pointer bound for the conventional capability list: 48 capabilities of 4 bytes fill
/// the 192 bytes after the header, so a longer walk is a loop (Linux `PCI_FIND_CAP_TTL`).
pub const CAP_TTL: usize = 48;
/// The same bound for the extended list: (4096 - 256) / 8 (Linux `pci_find_next_ext_capability`).
pub const EXT_CAP_TTL: usize = (4096 - 256) / 8;
