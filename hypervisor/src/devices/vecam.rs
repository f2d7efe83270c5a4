//! A VM's view of PCI configuration space: a virtual generic ECAM host bridge that shows only
//! the functions assigned to the VM and, read-only, the bridges on the path from the root bus
//! to them, filtering every access before it reaches hardware.
//!
//! The guest boots with `linux,pci-probe-only` (see [`crate::guest_dt::GuestPci`]), so Linux's
//! `pci-host-generic` takes the BARs as the hypervisor placed them and only reads, sizes and
//! enables them. Everything a guest could use to reach beyond its own functions is filtered:
//!
//! | registers | reads | writes |
//! | --- | --- | --- |
//! | functions not assigned to the VM | all ones | dropped |
//! | IDs, class, revision (0x00, 0x08) | hardware | dropped |
//! | Header Type (0x0e) | hardware, multi-function bit cleared when the VM owns no other function of the device | dropped |
//! | Command (0x04) | hardware; I/O and Memory Space Enable virtual (as the hypervisor set them until the guest writes them); INTx Disable set on an MSI-only function | Bus Master, Parity Error Response, SERR#, INTx Disable to hardware (held set on an MSI-only function); I/O and Memory Space Enable kept virtual (the physical address map never changes after boot) |
//! | Status (0x06) | hardware (Capabilities List cleared if every capability is hidden) | RW1C error bits |
//! | BARs (0x10-0x24) | the guest's (virtual) BARs, or the size mask after an all-ones write | never reach hardware; a memory BAR move is reported for the hypervisor to remap ([`VirtualEcam::take_bar_moves`]) |
//! | subsystem IDs, CardBus CIS, reserved (0x28, 0x2c, 0x38) | hardware | dropped |
//! | Expansion ROM BAR (0x30) | 0 (no ROM) | dropped |
//! | Capabilities Pointer (0x34) and every next pointer | Enhanced Allocation and virtio's PCI_CFG unlinked; MSI and MSI-X too unless [`VirtualEcam::with_msi`] | dropped |
//! | Interrupt Line (0x3c) | a virtual byte per function | kept in that byte |
//! | Interrupt Pin, Min_Gnt, Max_Lat (0x3d-0x3f) | hardware (the pin 0 on an MSI-only function) | dropped |
//! | Enhanced Allocation capability, virtio's VIRTIO_PCI_CAP_PCI_CFG; MSI and MSI-X without [`VirtualEcam::with_msi`] | 0 | dropped |
//! | with [`VirtualEcam::with_msi`]: MSI-X Message Control | hardware | MSI-X Enable and Function Mask to hardware; Table Size read-only |
//! | with [`VirtualEcam::with_msi`]: MSI-X Table Offset/BIR, PBA Offset/BIR | hardware | dropped (read-only) |
//! | with [`VirtualEcam::with_msi`]: MSI Message Control | hardware | MSI Enable and Multiple Message Enable (at most Multiple Message Capable) to hardware; the capable bits read-only |
//! | with [`VirtualEcam::with_msi`]: MSI Message Address, Upper Address, Data, Mask Bits, Pending Bits | hardware | hardware |
//! | Power Management PMCSR | hardware; PowerState virtual | hardware, PowerState kept D0 |
//! | PCIe Device Control, AF Control | hardware | hardware, without Initiate FLR |
//! | the rest of 0x40-0xff (capabilities, device-specific registers) | hardware | hardware |
//! | extended configuration space (0x100-0xfff) | hardware | dropped |
//!
//! A bridge above one of the VM's functions (`pci::VmDevices::bridges`) is shown as a
//! PCI-to-PCI bridge (Type 1 header: PCI-to-PCI Bridge spec 1.2 chapter 3, PCIe Base spec
//! 7.5.1.3) with its PCIe capability as its only one; nothing the guest writes reaches it:
//!
//! | bridge registers | reads | writes |
//! | --- | --- | --- |
//! | IDs, class, revision (0x00, 0x08) | hardware | dropped |
//! | Command (0x04) | the guest's (hardware's until it writes) | kept virtual |
//! | Status (0x06) | hardware, Capabilities List set only with the PCIe capability shown | dropped (RW1C too) |
//! | Cache Line Size, Latency Timer, BIST (0x0c, 0x0d, 0x0f) | 0 | dropped |
//! | Header Type (0x0e) | hardware, multi-function bit cleared when the VM sees no other function of the device | dropped |
//! | BAR0-1 (0x10, 0x14) | 0 (no BAR) | dropped |
//! | bus numbers, Secondary Latency Timer (0x18), I/O, memory and prefetchable windows with their upper halves, Secondary Status (0x1c-0x33) | hardware | dropped |
//! | Capabilities Pointer (0x34) | the PCIe capability's offset (0 without one) | dropped |
//! | Expansion ROM (0x38) | 0 | dropped |
//! | Interrupt Line (0x3c) | a virtual byte per bridge | kept in that byte |
//! | Interrupt Pin (0x3d) | hardware | dropped |
//! | Bridge Control (0x3e) | 0 | dropped |
//! | PCIe capability (7.5.3), next pointer 0 | hardware, except: Slot Implemented cleared; Slot Capabilities/Control/Status (and their 2 versions), Root Control/Capabilities/Status read 0; Link Capabilities without ASPM Support and Link Bandwidth Notification; Device Capabilities 2 without ARI Forwarding Supported | dropped |
//! | the rest of 0x40-0xfff (other capabilities, device-specific, extended space) | 0 | dropped |
//!
//! Why a bridge is shown at all: guest BDFs equal physical ones and Linux finds a function
//! only by scanning from the root bus through each bridge's secondary bus
//! (`pci_scan_bridge_extend`); on real boards nearly every endpoint is behind a root port. With
//! `linux,pci-probe-only` (no `PCI_REASSIGN_ALL_BUS`), Linux 6.12 takes bus numbers that pass
//! its sanity check (primary is the bus the bridge is on, secondary above it, subordinate not
//! below secondary) in its first pass without writing them, reads the windows
//! (`pci_read_bridge_windows`, `pci_read_bridge_bases`) and claims each BAR inside them
//! (`pci_bus_claim_resources`); its writes (window probes, Bridge Control's Master Abort Mode,
//! Secondary Status clears, `pci_setup_bridge`) may all be dropped. Why Command is virtual: the
//! physical bridge must keep Memory Space, I/O Space and Bus Master Enable as the hypervisor set
//! them, or the MMIO and DMA of every function below stop, other VMs' ones below a shared switch
//! too; Linux toggles decode around BAR sizing and enables the bridge before its functions.
//! Why the PCIe capability, and only it, read-only: without it the guest takes the bridge for a
//! conventional PCI bridge, and Linux's `pci_for_each_dma_alias` gives every function below it
//! the bridge's Requester ID as a DMA alias, so the guest's arm-smmu-v3 driver refuses the
//! function ("stream ... already in tree", seen on QEMU); a Root, Upstream or Downstream Port
//! adds no alias, as the hypervisor's IOMMU groups assume. Read-only, there is no Link Control
//! (Link Disable, Retrain), Device Control 2 (ARI forwarding), Slot Control (power,
//! indicators) or Root Control for a guest to write; what it could act on and not undo is
//! hidden (see `bridge_pcie_read`). No AER or ACS (extended space reads 0): the guest cannot
//! weaken the isolation the IOMMU groups were computed with. Functions below read their own
//! extended space (read-only, as in the first table).
//! Why 0 rather than all ones past the header: all ones reads as an absent
//! function or an error response (`PCI_POSSIBLE_ERROR`); a 0 Extended Capability header at
//! 0x100 says there are none (PCIe Base spec 7.6.3). Bridges have no BAR the guest could move
//! and are never in [`VirtualEcam::resolve`].
//!
//! Why MSI and MSI-X are hidden without [`VirtualEcam::with_msi`] (the default): the VM has no
//! virtual ITS, so a message the device sent would reach the physical ITS (or nothing) with a
//! doorbell address the guest chose and an EventID no one mapped for it. Linux finds neither
//! capability and falls back to INTx, which the hypervisor routes.
//!
//! MSI and MSI-X with a virtual ITS ([`VirtualEcam::with_msi`]`(true)`): both capabilities are
//! linked and the guest's Message Address and Data go to hardware unchanged. That is safe, and
//! needs no translation, because of where a message lands:
//! - the address is the guest's IOVA of its vITS doorbell (GITS_TRANSLATER, the translation
//!   frame at offset 0x1_0040 of the `arm,gic-v3-its` node's `reg`) in its own
//!   stage 1 when it drives a vSMMU, or that IPA itself without one. The function's write is
//!   DMA: the physical SMMU translates it through the guest's stage 1 (if any) nested over the
//!   VM's stage 2, which maps the vITS doorbell's IPA page onto the physical GITS_TRANSLATER
//!   page. An address anywhere else is an ordinary DMA write, confined to the VM's memory by
//!   stage 2 like any other, or a translation fault;
//! - the physical ITS takes the DeviceID from the transaction, not the guest: the Requester
//!   ID, through the host bridge's `msi-map`, which the guest cannot change. The data is the
//!   guest's EventID, which only the hypervisor's physical ITT for that DeviceID maps (the
//!   guest's MAPTI becomes a physical MAPTI of an LPI the hypervisor chose for that VM, for a
//!   DeviceID the VM owns: `devices::vits`). An EventID the guest did not map hits no ITE
//!   and is dropped (a translation error, IHI 0069).
//!
//! So a function can raise only its own DeviceID's events, which the hypervisor routes to its
//! own VM, whatever its guest writes into Message Address and Data. Only Message Control is
//! filtered (the capable bits and Table Size read-only, Multiple Message Enable clamped to
//! what the function supports) and the MSI-X BIR dwords are read-only, as in the spec.
//!
//! The MSI-X Table and PBA (PCI Local Bus 3.0 6.8.2) are in one of the function's memory BARs
//! and are passed through with it: nothing to emulate. Every memory BAR has whole pages of its
//! own (`pci::assign_resources`, checked again by `pci::isolation::device_slots` against every
//! BAR of every function), so the page holding a Table or PBA holds no other function's
//! registers, and the VM's stage 2 maps it only as that function's BAR. A guest's table entries
//! are Message Address/Data pairs, safe for the same reason as MSI's.
//!
//! A function assigned MSI-only (`pci::VmDevices::msi_only`, [`VirtualEcam::with_msi_only`])
//! shares its INTx line with another VM's function: the hypervisor sets its Command.INTxDisable
//! and holds it set (a guest write cannot clear it, reads show it set), and its Interrupt Pin
//! reads 0, so the guest uses MSI or MSI-X and never asserts the other VM's line.
//!
//! Why Initiate Function Level Reset is dropped: an FLR resets the function's configuration
//! space (PCIe Base spec 6.6.2), physical BARs included, and the guest cannot put them back
//! because its BAR writes never reach hardware; the function would then decode at address 0
//! once the guest sets Memory Space Enable again. Linux falls back to other reset methods or
//! none.
//!
//! The same holds for every other path that resets a function or re-places its BARs behind the
//! hypervisor's back: Advanced Features' Initiate FLR is dropped too; a D3hot to D0 transition
//! of a function without No_Soft_Reset resets it (PCI Bus PM 1.2, 5.4.1), so its PowerState is
//! kept virtual and it stays in D0 (every function's is: see `VirtualEcam::power_write`);
//! Enhanced Allocation (fixed BAR addresses with writable Enable bits) is hidden; Resizable
//! BAR, SR-IOV and the other extended capabilities are in read-only extended space; the Expansion ROM BAR reads 0; BIST is not writable; and a
//! shown bridge's Bridge Control, which holds Secondary Bus Reset, reads 0 and drops writes.
//!
//! Why a virtio function's VIRTIO_PCI_CAP_PCI_CFG capability (virtio 1.2 4.1.4.9) is hidden:
//! it is a window from configuration space into the function's BARs, which no driver uses
//! (Linux and Windows map the BARs), and which on QEMU 10.0 aborts the whole machine on a BAR
//! access through it (an assertion in `virtio_address_space_lookup`, QEMU issue 2576; see
//! `pci/virtio.rs`): one VM could take every VM down with a few configuration writes.
//!
//! Why extended configuration space is read-only: nothing Linux needs there for a virtio or
//! simple endpoint is writable-only (AER masks, ACS, LTR are host policy), and ACS or ATS
//! controls written by a guest could weaken the isolation the IOMMU groups were computed with.
//!
//! Guest BDFs equal physical ones, bridges included: a function behind a root port (physical
//! 01:00.0 below 00:01.0) is 01:00.0 in the guest too, reached through the shown 00:01.0. Other
//! functions below a shown bridge (another VM's behind the same switch, the switch's other
//! downstream ports) read all ones like any function the VM does not own. The guest DT has no
//! node below the host bridge, so Linux swizzles each INTx pin at every bridge and looks the
//! host bridge's `interrupt-map` up with the root-bus slot it reaches (`of_irq_parse_pci`): the
//! guest's map is keyed so (`guest_dt::GuestPci::intx`).

use alloc::vec::Vec;

use crate::mmio::AccessWidth;
use crate::pci::enumerate::{Bar, BarKind, HeaderType, PciDevice};
use crate::pci::regs::{self, bar, cap_id};
use crate::pci::{Bdf, ConfigSpace};

/// Command register bits a guest may change (PCIe Base spec 7.5.1.1.3): I/O Space Enable (0),
/// Memory Space Enable (1), Bus Master Enable (2), Parity Error Response (6), SERR# Enable
/// (8), Interrupt Disable (10). The rest (Special Cycles, Memory Write and Invalidate, VGA
/// Palette Snoop, Fast Back-to-Back) are legacy knobs with effects beyond the function.
const COMMAND_GUEST_BITS: u32 = 1 << 0 | 1 << 1 | 1 << 2 | 1 << 6 | 1 << 8 | 1 << 10;

/// The guest's I/O and Memory Space Enable, kept virtual: the function decodes its BARs where
/// the hypervisor placed them from boot to power-off, whatever its guest writes. A guest
/// toggling decode (Linux does around every BAR sizing, `__pci_read_base`) would otherwise
/// change the physical address map while the other VMs run: nothing a partition should be able
/// to do, and on QEMU it is the trigger of a TCG race (a vCPU's stale TLB entry looked up in
/// the new memory map, `iotlb_to_section: Assertion 'section_index < d->map.sections_nb'`
/// after QEMU's fix for its issue 3040) that aborted a CI run. What the guest's bits gate is
/// its own view: reads return them and [`VirtualEcam::resolve`] forwards nothing while the
/// matching one is clear. Stage 2 keeps mapping the memory BARs, so a guest that clears Memory
/// Space Enable and still touches a BAR reaches its own function's registers, never another's.
const COMMAND_DECODE: u32 = regs::command::IO | regs::command::MEMORY;

/// Status register bits that are RW1C (PCIe Base spec 7.5.1.1.4): Master Data Parity Error
/// (8), Signaled Target Abort (11), Received Target Abort (12), Received Master Abort (13),
/// Signaled System Error (14), Detected Parity Error (15); in the upper half of the dword.
const STATUS_RW1C: u32 = (1 << 8 | 0xf8 << 8) << 16;

/// Expansion ROM Base Address of a Type 0 header (PCI Local Bus 3.0 6.2.5.2).
const EXPANSION_ROM: u16 = 0x30;

/// The last BAR of a Type 0 header (BAR5).
const BAR_END: u16 = regs::BAR0 + 6 * 4;

/// Where capabilities may live: after the 64-byte header, before extended space.
const DEVICE_SPECIFIC: u16 = 0x40;

/// Offsets inside the PCI Express capability (PCIe Base spec 7.5.3).
mod pcie_cap {
    /// Device Control (15:0) and Device Status (31:16).
    pub const DEVICE: u16 = 0x08;
    /// Link Control (15:0) and Link Status (31:16).
    pub const LINK: u16 = 0x10;
    /// Slot Control (15:0) and Slot Status (31:16).
    pub const SLOT: u16 = 0x18;
    /// Device Control bit 15: Initiate Function Level Reset (7.5.3.4).
    pub const INITIATE_FLR: u32 = 1 << 15;
    /// Device Status bits 3:0 (Correctable, Non-Fatal, Fatal, Unsupported Request Detected)
    /// are RW1C (7.5.3.5).
    pub const DEVICE_STATUS_RW1C: u32 = 0xf << 16;
    /// Link Status bits 15:14 (Link Bandwidth Management, Link Autonomous Bandwidth) are RW1C
    /// (7.5.3.8).
    pub const LINK_STATUS_RW1C: u32 = 0xc000 << 16;
    /// Slot Status bits 4:0 and 8 are RW1C (7.5.3.11).
    pub const SLOT_STATUS_RW1C: u32 = 0x011f << 16;
}

/// PMCSR bit 15, PME_Status, is RW1C (PCI Bus Power Management Interface spec 1.2, 3.2.4);
/// PMCSR is at offset 4 of the PM capability.
const PMCSR_PME_STATUS: u32 = 1 << 15;
/// AF Control bit 0, Initiate FLR (PCI Advanced Features ECN), in the dword at offset 4.
const AF_INITIATE_FLR: u32 = 1 << 0;
/// virtio's `cfg_type` of the PCI configuration access capability, and its length: the 16-byte
/// `virtio_pci_cap` and the 4-byte `pci_cfg_data` (virtio 1.2 4.1.4.9).
const VIRTIO_PCI_CAP_PCI_CFG: u8 = 5;
const VIRTIO_PCI_CFG_CAP_LEN: u16 = 20;
/// PMCSR bits 1:0, PowerState: D0-D3hot.
const PMCSR_POWER_STATE: u32 = 0x3;

/// Interrupt Pin, byte 1 of the dword at 0x3c.
const INTERRUPT_PIN: u32 = 0xff00;

/// MSI-X Message Control bits a guest may write, in the upper half of the capability's first
/// dword (PCI Local Bus 3.0 6.8.2.3): MSI-X Enable (15) and Function Mask (14). Table Size
/// (10:0) is read-only.
const MSIX_CONTROL_GUEST: u32 = 0xc000 << 16;
/// MSI Message Control bits a guest may write (6.8.1.3): MSI Enable (0) and Multiple Message
/// Enable (6:4). Multiple Message Capable (3:1), 64-bit Address Capable (7) and Per-Vector
/// Masking Capable (8) are read-only.
const MSI_CONTROL_ENABLE: u32 = 1 << 16;
const MSI_CONTROL_MME_SHIFT: u32 = 20;
const MSI_CONTROL_MME: u32 = 0x7 << MSI_CONTROL_MME_SHIFT;
const MSI_CONTROL_MMC_SHIFT: u32 = 17;

/// A guest write to a shown MSI or MSI-X capability's Message Control dword or MSI-X's
/// Table/PBA Offset/BIR: `None` if `reg` is none of those (the write takes the generic path,
/// which passes MSI's Message Address, Data and Mask/Pending Bits through), else
/// `Some(None)` to drop it or `Some(Some(dword))` to write `dword` to hardware.
///
/// Only the guest-writable Message Control bits change; the capability header (ID, next
/// pointer) and the capable bits keep hardware's values. MSI's Multiple Message Enable is
/// clamped to Multiple Message Capable: more is undefined (6.8.1.3) and nothing Linux writes.
/// Table and PBA Offset/BIR are read-only in the spec; dropping the write says so.
fn msi_control_write(
    chain: &CapChain,
    cfg: &dyn ConfigSpace,
    bdf: Bdf,
    reg: u16,
    value: u32,
    enable: u32,
) -> Option<Option<u32>> {
    let merge = |guest: u32| {
        let hw = cfg.read32(bdf, reg);
        let guest = guest & enable;
        (guest != 0).then_some((hw & !guest) | (value & guest))
    };
    if let Some(at) = chain.msix.map(u16::from) {
        if reg == at {
            return Some(merge(MSIX_CONTROL_GUEST));
        }
        if reg == at + 4 || reg == at + 8 {
            return Some(None);
        }
    }
    if chain.msi.map(u16::from) == Some(reg) {
        return Some(merge(MSI_CONTROL_ENABLE | MSI_CONTROL_MME).map(|v| {
            let capable = (v >> MSI_CONTROL_MMC_SHIFT) & 0x7;
            let wanted = (v & MSI_CONTROL_MME) >> MSI_CONTROL_MME_SHIFT;
            (v & !MSI_CONTROL_MME) | wanted.min(capable) << MSI_CONTROL_MME_SHIFT
        }));
    }
    None
}

/// ECAM places a function's 4 KiB at bus << 20 | device << 15 | function << 12 (PCIe Base
/// spec 7.2.2).
const ECAM_BUS_SHIFT: u32 = 20;

/// The capability list of one function, as the guest sees it.
#[derive(Clone, Debug, Default)]
struct CapChain {
    /// First visible capability, or 0.
    first: u8,
    /// Visible capabilities in list order: (offset, next visible offset or 0).
    visible: Vec<(u8, u8)>,
    /// Byte ranges of hidden capabilities, `start..end`.
    hidden: Vec<(u16, u16)>,
    /// The Power Management capability, for its RW1C bit and PowerState.
    pm: Option<u8>,
    /// The Advanced Features capability, for its Initiate FLR bit.
    af: Option<u8>,
    /// The MSI capability, when shown, for its Message Control.
    msi: Option<u8>,
    /// The MSI-X capability, when shown, for its Message Control and read-only BIR dwords.
    msix: Option<u8>,
}

/// The bytes of the Enhanced Allocation capability at `ptr` (PCIe Base spec 7.8.5): its header,
/// one more dword in a Type 1 header, then each entry's header and the dwords its Entry Size
/// says follow; clipped to the end of conventional configuration space.
fn ea_len(cfg: &dyn ConfigSpace, bdf: Bdf, ptr: u8) -> u16 {
    let hdr = cfg.read32(bdf, u16::from(ptr));
    let entries = (hdr >> 16) & 0x3f;
    let type1 = regs::header_type(cfg.read32(bdf, regs::HEADER)) & 0x7f == regs::HEADER_TYPE_BRIDGE;
    let mut at = u16::from(ptr) + if type1 { 8 } else { 4 };
    for _ in 0..entries {
        if at >= regs::EXT_CAP_START {
            break;
        }
        let size = (cfg.read32(bdf, at) & 0x7) as u16;
        at = at.saturating_add(4 + 4 * size);
    }
    at.min(regs::EXT_CAP_START) - u16::from(ptr)
}

impl CapChain {
    /// Walks the conventional list the way Linux's `__pci_find_next_cap_ttl` does (pointers
    /// into the header end it, bounded by [`regs::CAP_TTL`], low two pointer bits reserved:
    /// PCI Local Bus 3.0 6.7), and decides what the guest sees.
    /// With `msi`, MSI and MSI-X stay linked (see [`VirtualEcam::with_msi`]).
    fn read(cfg: &dyn ConfigSpace, bdf: Bdf, msi: bool) -> CapChain {
        let mut chain = CapChain::default();
        if cfg.read32(bdf, regs::COMMAND) & regs::STATUS_CAP_LIST == 0 {
            return chain;
        }
        let mut visible: Vec<u8> = Vec::new();
        let virtio = cfg.read32(bdf, regs::ID) as u16 == crate::pci::virtio::VENDOR_ID;
        let mut ptr = (cfg.read32(bdf, regs::CAP_PTR) & 0xfc) as u8;
        for _ in 0..regs::CAP_TTL {
            if u16::from(ptr) < DEVICE_SPECIFIC {
                break;
            }
            let hdr = cfg.read32(bdf, u16::from(ptr));
            match hdr as u8 {
                0xff => break,
                // Shown and passed through (the module doc's "MSI and MSI-X with a virtual
                // ITS"); only their Message Control and, for MSI-X, the BIR/offset dwords
                // are filtered (`msi_control_write`).
                cap_id::MSI if msi => {
                    chain.msi = Some(ptr);
                    visible.push(ptr);
                }
                cap_id::MSIX if msi => {
                    chain.msix = Some(ptr);
                    visible.push(ptr);
                }
                cap_id::MSI => {
                    // Message Control (PCI Local Bus 3.0 6.8.1.3): bit 7 64-bit address, bit 8
                    // per-vector masking; the capability is 10, 14, 20 or 24 bytes long
                    // (rounded up to whole dwords here).
                    let control = hdr >> 16;
                    let len = match (control & 1 << 7 != 0, control & 1 << 8 != 0) {
                        (false, false) => 12,
                        (true, false) => 16,
                        (false, true) => 20,
                        (true, true) => 24,
                    };
                    chain.hidden.push((u16::from(ptr), u16::from(ptr) + len));
                }
                // MSI-X: header, Table Offset/BIR, PBA Offset/BIR (PCI Local Bus 3.0 6.8.2).
                cap_id::MSIX => chain.hidden.push((u16::from(ptr), u16::from(ptr) + 12)),
                // Enhanced Allocation fixes where BARs decode and has writable Enable bits:
                // the hypervisor placed the BARs, the guest must not see or move them.
                cap_id::EA => {
                    let len = ea_len(cfg, bdf, ptr);
                    chain.hidden.push((u16::from(ptr), u16::from(ptr) + len));
                }
                // virtio 1.2 4.1.4: cap_len in byte 2, cfg_type in byte 3.
                cap_id::VENDOR if virtio && (hdr >> 24) as u8 == VIRTIO_PCI_CAP_PCI_CFG => {
                    // In u16: a cap_len near 255 would overflow u8 rounding up.
                    let len = u16::from((hdr >> 16) as u8)
                        .max(VIRTIO_PCI_CFG_CAP_LEN)
                        .next_multiple_of(4);
                    let end = (u16::from(ptr) + len).min(regs::EXT_CAP_START);
                    chain.hidden.push((u16::from(ptr), end));
                }
                id => {
                    match id {
                        cap_id::PM => chain.pm = Some(ptr),
                        cap_id::AF => chain.af = Some(ptr),
                        _ => {}
                    }
                    visible.push(ptr);
                }
            }
            ptr = ((hdr >> 8) & 0xfc) as u8;
        }
        chain.first = visible.first().copied().unwrap_or(0);
        chain.visible = visible
            .iter()
            .enumerate()
            .map(|(i, &at)| (at, visible.get(i + 1).copied().unwrap_or(0)))
            .collect();
        chain
    }

    fn is_hidden(&self, offset: u16) -> bool {
        self.hidden.iter().any(|&(s, e)| (s..e).contains(&offset))
    }

    /// The next pointer to show in the header of the visible capability at `offset`.
    fn next_of(&self, offset: u16) -> Option<u8> {
        self.visible
            .iter()
            .find(|&&(at, _)| u16::from(at) == offset)
            .map(|&(_, next)| next)
    }
}

/// One assigned function.
#[derive(Debug)]
struct VFunction {
    dev: PciDevice,
    /// The VM owns another function of the same device: keep Header Type bit 7.
    keep_multifunction: bool,
    /// Per BAR slot: an all-ones write latched, the next read returns the size mask.
    sizing: [bool; 6],
    /// The Interrupt Line register the guest sees.
    interrupt_line: u8,
    /// The capability list, read from hardware on first use (it is read-only there).
    chain: Option<CapChain>,
    /// The BAR registers as the guest programmed them (the physical ones never change).
    vbar: [u32; 6],
    /// PMCSR.PowerState as the guest set it: the function itself stays in D0.
    power_state: u32,
    /// The guest's I/O and Memory Space Enable ([`COMMAND_DECODE`]), read from hardware (as
    /// the hypervisor set them) on first use.
    decode: Option<u32>,
    /// Assigned MSI-only ([`VirtualEcam::with_msi_only`]): Command.INTxDisable held set,
    /// Interrupt Pin read as 0.
    msi_only: bool,
    /// MSI and MSI-X hidden for it even with [`VirtualEcam::with_msi`]: the VM's ITS cannot
    /// serve its DeviceID ([`VirtualEcam::without_msi_for`]).
    no_msi: bool,
    /// The guest set Bus Master Enable while the DMA gate was closed: held clear in hardware,
    /// shown set to the guest, let through by [`VirtualEcam::open_dma`].
    bus_master_held: bool,
}

/// A bridge on the path to one of the VM's functions, shown read-only (see the module doc).
#[derive(Debug)]
struct VBridge {
    dev: PciDevice,
    /// The VM sees another function of the same device: keep Header Type bit 7.
    keep_multifunction: bool,
    /// The guest's Command register (bits 15:0), read from hardware on first use; its writes
    /// land here only.
    command: Option<u32>,
    /// The Interrupt Line register the guest sees.
    interrupt_line: u8,
}

/// What an ECAM offset addresses.
#[derive(Clone, Copy, Debug)]
enum Shown {
    /// One of the VM's functions, by index.
    Function(usize),
    /// One of the bridges above them, by index.
    Bridge(usize),
}

/// Which half of which BAR a BAR slot holds.
enum BarSlot<'a> {
    /// No BAR there: hard-wired to zero (PCI Local Bus 3.0 6.2.5.1).
    None,
    /// The BAR's low dword (an I/O, 32-bit or the low half of a 64-bit BAR).
    Low(&'a Bar),
    /// The upper dword of a 64-bit BAR.
    High(&'a Bar),
}

impl VFunction {
    fn bar_slot(&self, slot: u8) -> BarSlot<'_> {
        for b in &self.dev.bars {
            if b.index == slot {
                return BarSlot::Low(b);
            }
            if b.kind == BarKind::Mem64 && b.index.checked_add(1) == Some(slot) {
                return BarSlot::High(b);
            }
        }
        BarSlot::None
    }

    /// The read-only low bits of a BAR slot: I/O or memory, type, prefetchable.
    fn type_bits(&self, slot: u8) -> u32 {
        match self.bar_slot(slot) {
            BarSlot::Low(b) if b.kind == BarKind::Io => self.size_mask(slot) & 0x3,
            BarSlot::Low(_) => self.size_mask(slot) & 0xf,
            _ => 0,
        }
    }

    /// The bus address the guest gave BAR `b`.
    fn vbar_addr(&self, b: &Bar) -> u64 {
        let i = usize::from(b.index);
        let low = self.vbar[i] & !self.type_bits(b.index);
        let high = if b.kind == BarKind::Mem64 {
            self.vbar.get(i + 1).copied().unwrap_or(0)
        } else {
            0
        };
        u64::from(low) | u64::from(high) << 32
    }

    /// What a BAR slot reads back after all ones were written to it: the writable address
    /// bits plus the read-only type bits (PCI Local Bus 3.0 6.2.5.1), from the enumerated size.
    fn size_mask(&self, slot: u8) -> u32 {
        match self.bar_slot(slot) {
            BarSlot::None => 0,
            BarSlot::Low(b) => {
                let addr = !b.size.wrapping_sub(1) as u32;
                match b.kind {
                    BarKind::Io => addr & bar::IO_ADDR_MASK | bar::IO_SPACE,
                    BarKind::Mem32 | BarKind::Mem64 => {
                        let ty = if b.kind == BarKind::Mem64 {
                            bar::MEM_TYPE_64
                        } else {
                            0
                        };
                        let pf = if b.prefetchable { bar::PREFETCHABLE } else { 0 };
                        addr & bar::MEM_ADDR_MASK | ty | pf
                    }
                }
            }
            BarSlot::High(b) => (!b.size.wrapping_sub(1) >> 32) as u32,
        }
    }
}

/// Bytes of a PCIe Capability structure (PCIe Base spec 7.5.3: through Slot Control 2 and
/// Slot Status 2).
const PCIE_CAP_LEN: u16 = 0x3c;

/// Dword `rel` of a shown bridge's PCIe capability (at `at` in its configuration space), read
/// only, as the only capability.
///
/// Why show it at all: without it the guest takes the bridge for a conventional PCI-to-PCI
/// bridge, and Linux's `pci_for_each_dma_alias` then gives every function below it the
/// bridge's Requester ID as a DMA alias; its arm-smmu-v3 driver finds that StreamID already
/// taken by the bridge ("stream ... already in tree") and the function gets no IOMMU. A Root,
/// Upstream or Downstream Port adds no alias, which is also what the hypervisor's IOMMU groups
/// assume. What the guest must not act on is hidden: Slot Implemented (pciehp would drive slot
/// power and remove the function on a presence change it cannot see), the Root registers (PME
/// status it cannot clear would keep Linux's PME service polling), ASPM support (it could only
/// enable ASPM on the function's end of the link) and Link Bandwidth Notification, and ARI
/// Forwarding Supported (the guest would turn ARI on in a bridge whose Device Control 2 it
/// cannot write).
fn bridge_pcie_read(cfg: &dyn ConfigSpace, bdf: Bdf, at: u16, rel: u16) -> u32 {
    /// PCIe Capabilities register (bits 31:16 of the first dword): Slot Implemented.
    const SLOT_IMPLEMENTED: u32 = 1 << (16 + 8);
    /// Link Capabilities: ASPM Support (11:10) and Link Bandwidth Notification Capability (21).
    const LNKCAP_HIDDEN: u32 = 0b11 << 10 | 1 << 21;
    /// Device Capabilities 2: ARI Forwarding Supported.
    const DEVCAP2_ARI: u32 = 1 << 5;
    let hw = cfg.read32(bdf, at + rel);
    match rel {
        // Capability ID 0x10, no next capability, the port's own PCIe Capabilities.
        0x00 => hw & 0xffff_0000 & !SLOT_IMPLEMENTED | u32::from(cap_id::PCIE),
        0x0c => hw & !LNKCAP_HIDDEN,
        // Slot Capabilities, Slot Control/Status, Root Control/Capabilities, Root Status;
        // Slot Capabilities 2 and Slot Control/Status 2.
        0x14 | 0x18 | 0x1c | 0x20 | 0x34 | 0x38 => 0,
        0x24 => hw & !DEVCAP2_ARI,
        _ => hw,
    }
}

/// The configuration space of one VM's virtual ECAM host bridge.
///
/// Accesses are decoded as ECAM offsets (PCIe Base spec 7.2.2): bus (relative to the first
/// bus of the window, see [`VirtualEcam::with_first_bus`]) in bits 27:20, device 19:15,
/// function 14:12, register 11:0. One-, two- and four-byte accesses must be naturally aligned;
/// an access that crosses a dword is outside what ECAM defines (7.2.2.2), so it reads all ones
/// and its write is dropped. An eight-byte access (aligned to 8) is handled as two dword
/// accesses, low dword first.
#[derive(Debug)]
pub struct VirtualEcam {
    first_bus: u8,
    /// MSI and MSI-X shown and passed through ([`VirtualEcam::with_msi`]).
    msi: bool,
    functions: Vec<VFunction>,
    bridges: Vec<VBridge>,
    /// BAR moves not yet taken by [`VirtualEcam::take_bar_moves`].
    moves: Vec<BarMove>,
    /// Whether its functions may master DMA: closed ([`VirtualEcam::holding_bus_master`])
    /// until the VM's RAM is all zeroed and mapped ([`VirtualEcam::open_dma`]).
    dma_open: bool,
    /// A Bus Master Enable was held since [`VirtualEcam::take_dma_request`] last looked.
    dma_requested: bool,
}

/// A guest moved a memory BAR of one of its functions: the hypervisor must map the BAR's
/// physical address at the new place in the VM's stage 2 (and unmap the old one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMove {
    /// The function.
    pub bdf: Bdf,
    /// Its BAR (the slot of the low dword).
    pub index: u8,
    /// The BAR's size.
    pub size: u64,
    /// Where the BAR physically is (CPU address), as the hypervisor placed it.
    pub phys: u64,
    /// The bus address the guest gave it now.
    pub pci: u64,
}

impl VirtualEcam {
    /// A host bridge showing `functions`, the physical functions assigned to the VM with their
    /// enumerated (and resource-assigned) state, and `bridges`, the bridges on the path from
    /// the root bus to them (`pci::VmDevices::bridges`). Only Type 0 functions are given to the
    /// guest; only Type 1 bridges are shown, read-only, so that its scan reaches the functions
    /// below them. Anything else in either list is dropped (and logged).
    pub fn new(functions: Vec<PciDevice>, bridges: Vec<PciDevice>) -> Self {
        let (functions, others): (Vec<_>, Vec<_>) = functions
            .into_iter()
            .partition(|d| d.header_type == HeaderType::Endpoint);
        for d in &others {
            log::warn!(
                "vECAM: {} is not a Type 0 function; not shown to the VM",
                d.bdf
            );
        }
        let (bridges, others): (Vec<_>, Vec<_>) = bridges
            .into_iter()
            .partition(|d| d.header_type == HeaderType::Bridge);
        for d in &others {
            log::warn!(
                "vECAM: {} is not a Type 1 bridge; not shown to the VM",
                d.bdf
            );
        }
        let same_device = |a: Bdf, b: Bdf| a != b && a.bus == b.bus && a.dev == b.dev;
        // Linux scans functions 1-7 of a device only if function 0 says it is multi-function
        // (`pci_scan_slot`): every function the guest sees counts, bridges included.
        let bdfs: Vec<Bdf> = functions
            .iter()
            .chain(bridges.iter())
            .map(|d| d.bdf)
            .collect();
        let bridges = bridges
            .into_iter()
            .map(|dev| VBridge {
                keep_multifunction: bdfs.iter().any(|&b| same_device(b, dev.bdf)),
                command: None,
                interrupt_line: 0,
                dev,
            })
            .collect();
        let functions = functions
            .into_iter()
            .map(|dev| {
                let mut f = VFunction {
                    keep_multifunction: bdfs.iter().any(|&b| same_device(b, dev.bdf)),
                    sizing: [false; 6],
                    interrupt_line: 0,
                    chain: None,
                    vbar: [0; 6],
                    power_state: 0,
                    decode: None,
                    msi_only: false,
                    no_msi: false,
                    bus_master_held: false,
                    dev,
                };
                // The guest starts with the BARs where the hypervisor placed them.
                for b in f.dev.bars.clone() {
                    let i = usize::from(b.index);
                    let pci = b.addr.map_or(0, |a| a.pci);
                    f.vbar[i] = pci as u32 | f.type_bits(b.index);
                    if b.kind == BarKind::Mem64 && i + 1 < 6 {
                        f.vbar[i + 1] = (pci >> 32) as u32;
                    }
                }
                f
            })
            .collect();
        VirtualEcam {
            first_bus: 0,
            msi: false,
            functions,
            bridges,
            moves: Vec::new(),
            dma_open: true,
            dma_requested: false,
        }
    }

    /// Closes the DMA gate: a guest's Bus Master Enable does not reach its function (reads
    /// show it set) until [`VirtualEcam::open_dma`]; [`VirtualEcam::take_dma_request`] says one
    /// was held. The VM's RAM is zeroed lazily, and a function must never master DMA into a
    /// block not zeroed and mapped yet (`vm::ram`). Open by default.
    pub fn holding_bus_master(mut self) -> Self {
        self.dma_open = false;
        self
    }

    /// Whether a guest's Bus Master Enable was held since the last call: the caller zeroes and
    /// maps the VM's RAM, then calls [`VirtualEcam::open_dma`] within the same trap.
    pub fn take_dma_request(&mut self) -> bool {
        core::mem::take(&mut self.dma_requested)
    }

    /// Whether its functions may master DMA.
    pub fn dma_open(&self) -> bool {
        self.dma_open
    }

    /// Opens the DMA gate (the VM's RAM is all zeroed and mapped): every Bus Master Enable
    /// held is set in hardware, and later ones go straight through.
    pub fn open_dma(&mut self, cfg: &mut dyn ConfigSpace) {
        self.dma_open = true;
        for f in self.functions.iter_mut().filter(|f| f.bus_master_held) {
            f.bus_master_held = false;
            let hw = cfg.read32(f.dev.bdf, regs::COMMAND) & 0xffff;
            // The Status half as 0s: its RW1C bits stay as they are.
            cfg.write32(f.dev.bdf, regs::COMMAND, hw | regs::command::BUS_MASTER);
        }
    }

    /// Makes offset 0 of the window bus `bus` rather than bus 0: the guest DT's `bus-range`
    /// start, which Linux subtracts before indexing the window (`pci_ecam_map_bus`).
    pub fn with_first_bus(mut self, bus: u8) -> Self {
        self.first_bus = bus;
        self
    }

    /// Shows the functions' MSI and MSI-X capabilities and passes them through (`true`), or
    /// hides them as without a virtual ITS (`false`, the default). Only for a VM with a
    /// virtual ITS in its DT, over a host whose physical ITS maps its functions' DeviceIDs:
    /// see the module doc's "MSI and MSI-X with a virtual ITS". Call it before the guest runs
    /// (a capability list already read is read again).
    pub fn with_msi(mut self, msi: bool) -> Self {
        self.msi = msi;
        for f in &mut self.functions {
            f.chain = None;
        }
        self
    }

    /// Keeps MSI and MSI-X hidden for `bdfs` (those of the VM's functions among them) although
    /// the VM has a virtual ITS: functions whose MSIs that ITS cannot take (no DeviceID for it
    /// in their bridge's `msi-map`, or the DeviceID a CPU store carries, which the hypervisor
    /// never maps). They keep INTx, as without a vITS.
    pub fn without_msi_for(mut self, bdfs: &[Bdf]) -> Self {
        for f in self
            .functions
            .iter_mut()
            .filter(|f| bdfs.contains(&f.dev.bdf))
        {
            f.no_msi = true;
            f.chain = None;
        }
        self
    }

    /// Marks `bdfs` (those of the VM's functions among them) MSI-only (`pci::VmDevices::
    /// msi_only`): their INTx line is another VM's, so Command.INTxDisable is set in hardware
    /// now and held set (guest writes cannot clear it, reads show it set) and the Interrupt Pin
    /// reads 0, so the guest never looks for a legacy interrupt it has no line for. Setting it
    /// here rather than at the guest's first Command write matters: until then the function
    /// could hold the other VM's line asserted. Meant with [`VirtualEcam::with_msi`]`(true)`:
    /// without it such a function has no interrupt at all.
    pub fn with_msi_only(mut self, cfg: &mut dyn ConfigSpace, bdfs: &[Bdf]) -> Self {
        self = self.holding_intx_disable(bdfs);
        for f in self.functions.iter().filter(|f| f.msi_only) {
            // Command only: zeros in the Status half clear nothing (RW1C).
            let command = cfg.read32(f.dev.bdf, regs::COMMAND) & 0xffff;
            if command & regs::command::INTX_DISABLE == 0 {
                cfg.write32(
                    f.dev.bdf,
                    regs::COMMAND,
                    command | regs::command::INTX_DISABLE,
                );
            }
        }
        self
    }

    /// [`VirtualEcam::with_msi_only`] for functions whose INTxDisable the caller has already
    /// set in hardware (a VM's functions are quiesced, Command.INTxDisable set, before each of
    /// its boots): only the holding and the hidden pin.
    pub fn holding_intx_disable(mut self, bdfs: &[Bdf]) -> Self {
        for f in self
            .functions
            .iter_mut()
            .filter(|f| bdfs.contains(&f.dev.bdf))
        {
            f.msi_only = true;
        }
        self
    }

    /// Whether `bdf` is one of the VM's functions assigned MSI-only.
    pub fn is_msi_only(&self, bdf: Bdf) -> bool {
        self.functions
            .iter()
            .any(|f| f.dev.bdf == bdf && f.msi_only)
    }

    /// The memory BAR moves the guest made since the last call, in order.
    pub fn take_bar_moves(&mut self) -> Vec<BarMove> {
        core::mem::take(&mut self.moves)
    }

    /// The functions given to the VM (not the bridges shown above them).
    pub fn bdfs(&self) -> impl Iterator<Item = Bdf> + '_ {
        self.functions.iter().map(|f| f.dev.bdf)
    }

    /// Where a guest access of `len` bytes at bus address `pci` of its I/O space (`io`) or
    /// memory space lands: the CPU physical address inside one of its functions' BARs, as the
    /// guest placed the BAR, if the access lies wholly inside that BAR and the function decodes
    /// it now (Command's I/O or Memory Space Enable, and power state D0). Used for the accesses
    /// the VM's stage 2 does not map: I/O BARs always, memory BARs the guest placed where they
    /// cannot be mapped a page at a time. Anything else is absent (the caller makes the access
    /// fault).
    pub fn resolve(&mut self, cfg: &dyn ConfigSpace, io: bool, pci: u64, len: u64) -> Option<u64> {
        let end = pci.checked_add(len)?;
        let (i, phys) = self.functions.iter().enumerate().find_map(|(i, f)| {
            f.dev.bars.iter().find_map(|b| {
                if (b.kind == BarKind::Io) != io {
                    return None;
                }
                let at = b.addr?;
                let base = f.vbar_addr(b);
                let off = pci.checked_sub(base)?;
                (end <= base.checked_add(b.size)?)
                    .then(|| at.cpu.checked_add(off))?
                    .map(|p| (i, p))
            })
        })?;
        let bdf = self.functions[i].dev.bdf;
        let decode = if io {
            regs::command::IO
        } else {
            regs::command::MEMORY
        };
        if self.decode_bits(cfg, i) & decode == 0 {
            return None;
        }
        // A function out of D0 answers only configuration requests (PCI Bus PM 1.2, 5.3.1.4):
        // in the guest's view (its virtual PowerState) the access is not answered; one left
        // out of D0 before boot would end in an Unsupported Request, an external abort at EL2.
        if let Some(pm) = self.chain(cfg, i).pm {
            if self.functions[i].power_state != 0
                || cfg.read32(bdf, u16::from(pm) + 4) & PMCSR_POWER_STATE != 0
            {
                return None;
            }
        }
        Some(phys)
    }

    /// The bridges shown to the VM.
    pub fn bridge_bdfs(&self) -> impl Iterator<Item = Bdf> + '_ {
        self.bridges.iter().map(|b| b.dev.bdf)
    }

    /// The Interrupt Line value the guest last wrote for `bdf`.
    pub fn interrupt_line(&self, bdf: Bdf) -> Option<u8> {
        self.functions
            .iter()
            .find(|f| f.dev.bdf == bdf)
            .map(|f| f.interrupt_line)
            .or_else(|| {
                self.bridges
                    .iter()
                    .find(|b| b.dev.bdf == bdf)
                    .map(|b| b.interrupt_line)
            })
    }

    /// A guest read of `width` at `offset` in the window.
    pub fn read(&mut self, cfg: &dyn ConfigSpace, offset: u64, width: AccessWidth) -> u64 {
        if width == AccessWidth::Double {
            if !offset.is_multiple_of(8) {
                return u64::MAX;
            }
            let lo = self.read(cfg, offset, AccessWidth::Word);
            let hi = self.read(cfg, offset.wrapping_add(4), AccessWidth::Word);
            return hi << 32 | lo;
        }
        let ones = width.mask();
        if !offset.is_multiple_of(width.bytes()) {
            return ones;
        }
        let Some((shown, reg)) = self.decode(offset) else {
            return ones;
        };
        let dword = match shown {
            Shown::Function(i) => self.read_dword(cfg, i, reg & !3),
            Shown::Bridge(i) => self.bridge_read(cfg, i, reg & !3),
        };
        (u64::from(dword) >> ((reg & 3) * 8)) & ones
    }

    /// A guest write of the low `width` bytes of `value` at `offset` in the window.
    pub fn write(
        &mut self,
        cfg: &mut dyn ConfigSpace,
        offset: u64,
        width: AccessWidth,
        value: u64,
    ) {
        if width == AccessWidth::Double {
            if offset.is_multiple_of(8) {
                self.write(cfg, offset, AccessWidth::Word, value);
                self.write(cfg, offset.wrapping_add(4), AccessWidth::Word, value >> 32);
            }
            return;
        }
        if !offset.is_multiple_of(width.bytes()) {
            return;
        }
        let Some((shown, reg)) = self.decode(offset) else {
            return;
        };
        let shift = (reg & 3) * 8;
        let enable = (width.mask() << shift) as u32;
        let value = ((value & width.mask()) << shift) as u32;
        match shown {
            Shown::Function(i) => self.write_dword(cfg, i, reg & !3, value, enable),
            Shown::Bridge(i) => self.bridge_write(&*cfg, i, reg & !3, value, enable),
        }
    }

    /// The assigned function or shown bridge an offset addresses, and the register offset.
    fn decode(&self, offset: u64) -> Option<(Shown, u16)> {
        let rel_bus = offset >> ECAM_BUS_SHIFT;
        let bus = u8::try_from(u64::from(self.first_bus) + rel_bus).ok()?;
        let devfn = (offset >> 12) & 0xff;
        let bdf = Bdf::new(bus, (devfn >> 3) as u8, (devfn & 7) as u8);
        let shown = match self.functions.iter().position(|f| f.dev.bdf == bdf) {
            Some(i) => Shown::Function(i),
            None => Shown::Bridge(self.bridges.iter().position(|b| b.dev.bdf == bdf)?),
        };
        Some((shown, (offset & 0xfff) as u16))
    }

    /// The guest's Command register of shown bridge `i`.
    fn bridge_command(&mut self, cfg: &dyn ConfigSpace, i: usize) -> u32 {
        let b = &mut self.bridges[i];
        *b.command
            .get_or_insert_with(|| cfg.read32(b.dev.bdf, regs::COMMAND) & 0xffff)
    }

    /// The dword at `reg` (a multiple of 4) of shown bridge `i` as the guest sees it: a
    /// conventional PCI-to-PCI bridge (Type 1 header, PCI-to-PCI Bridge spec 1.2 3.2 and PCIe
    /// Base spec 7.5.1.3) whose routing registers read as the hypervisor programmed them and
    /// which has nothing else: no BARs, no ROM, no capabilities, no Bridge Control.
    fn bridge_read(&mut self, cfg: &dyn ConfigSpace, i: usize, reg: u16) -> u32 {
        let bdf = self.bridges[i].dev.bdf;
        let pcie = self.bridges[i].dev.pcie.map(|p| u16::from(p.offset) & !3);
        if let Some(at) = pcie.filter(|&at| (at..at + PCIE_CAP_LEN).contains(&reg)) {
            return bridge_pcie_read(cfg, bdf, at, reg - at);
        }
        match reg {
            regs::ID | regs::CLASS_REV => cfg.read32(bdf, reg),
            // Status as hardware reports it (the guest sees the link's errors), with the
            // Capabilities List bit only if the PCIe capability is shown.
            regs::COMMAND => {
                let mut status = cfg.read32(bdf, reg) & 0xffff_0000 & !regs::STATUS_CAP_LIST;
                if pcie.is_some() {
                    status |= regs::STATUS_CAP_LIST;
                }
                status | self.bridge_command(cfg, i)
            }
            regs::CAP_PTR => pcie.map_or(0, u32::from),
            // Header Type only: Cache Line Size and Latency Timer mean nothing on PCIe
            // (7.5.1.1.7-8) and BIST is not offered.
            regs::HEADER => {
                let mut header = cfg.read32(bdf, reg) & 0x00ff_0000;
                if !self.bridges[i].keep_multifunction {
                    header &= !(u32::from(regs::HEADER_MULTIFUNCTION) << 16);
                }
                header
            }
            // Bus numbers, Secondary Latency Timer, Secondary Status and the three windows
            // with their upper halves (7.5.1.3.2-3.12): as the hypervisor set them. A
            // probe-only guest takes them as they are (`pci_scan_bridge_extend`'s first pass,
            // `pci_read_bridge_bases`) and finds its functions' BARs inside them.
            regs::BRIDGE_BUSES..=regs::BRIDGE_IO_UPPER => cfg.read32(bdf, reg),
            // Interrupt Pin from hardware (Linux reads it and would swizzle through it only
            // for functions below), a virtual Interrupt Line, and Bridge Control as 0.
            regs::INTERRUPT => {
                let pin = cfg.read32(bdf, reg) & 0xff00;
                pin | u32::from(self.bridges[i].interrupt_line)
            }
            // BAR0-1 (0x10, 0x14), Capabilities Pointer (0x34), Expansion ROM (0x38 in a
            // Type 1 header), the capabilities and device-specific registers (0x40-0xff), and
            // extended configuration space: 0, which at 0x100 is an Extended Capability header
            // saying there are none (7.6.3). 0 rather than all ones: all ones would read as an
            // absent function at 0x00 and as an error response elsewhere (Linux
            // `PCI_POSSIBLE_ERROR`), and Linux never sizes extended space of a bridge without
            // PCIe or PCI-X capability anyway (`pci_cfg_space_size`).
            _ => 0,
        }
    }

    /// A guest write to shown bridge `i` (its PCIe capability included): Command and Interrupt
    /// Line land in the guest's
    /// copies; nothing ever reaches the bridge.
    ///
    /// Command stays virtual because the physical bridge must keep forwarding Memory and I/O
    /// transactions and its functions' DMA (Memory Space, I/O Space, Bus Master Enable) as the
    /// hypervisor set them: a guest clearing them (Linux does around BAR sizing,
    /// `__pci_read_base`) would cut off every function below, possibly other VMs' below a
    /// switch. Bus numbers and windows are the physical routing, shared below a switch. Bridge
    /// Control holds Secondary Bus Reset, which would reset every function below, BARs
    /// included, behind the hypervisor's back. Status (and Secondary Status) RW1C writes are
    /// dropped too: the error bits are the host's record of the link.
    fn bridge_write(&mut self, cfg: &dyn ConfigSpace, i: usize, reg: u16, value: u32, enable: u32) {
        match reg {
            regs::COMMAND if enable & 0xffff != 0 => {
                let old = self.bridge_command(cfg, i);
                let guest = COMMAND_GUEST_BITS & enable;
                self.bridges[i].command = Some(old & !guest | value & guest);
            }
            regs::INTERRUPT if enable & 0xff != 0 => {
                self.bridges[i].interrupt_line = value as u8;
            }
            _ => {}
        }
    }

    /// The guest's [`COMMAND_DECODE`] bits of function `i`.
    fn decode_bits(&mut self, cfg: &dyn ConfigSpace, i: usize) -> u32 {
        let f = &mut self.functions[i];
        *f.decode
            .get_or_insert_with(|| cfg.read32(f.dev.bdf, regs::COMMAND) & COMMAND_DECODE)
    }

    fn chain(&mut self, cfg: &dyn ConfigSpace, i: usize) -> &CapChain {
        let f = &mut self.functions[i];
        let msi = self.msi && !f.no_msi;
        f.chain
            .get_or_insert_with(|| CapChain::read(cfg, f.dev.bdf, msi))
    }

    /// The dword at `reg` (a multiple of 4) as the guest sees it.
    fn read_dword(&mut self, cfg: &dyn ConfigSpace, i: usize, reg: u16) -> u32 {
        let bdf = self.functions[i].dev.bdf;
        match reg {
            regs::COMMAND => {
                let mut hw = cfg.read32(bdf, reg) & !COMMAND_DECODE | self.decode_bits(cfg, i);
                if self.functions[i].msi_only {
                    hw |= regs::command::INTX_DISABLE;
                }
                if self.functions[i].bus_master_held {
                    hw |= regs::command::BUS_MASTER;
                }
                if self.chain(cfg, i).first == 0 {
                    hw & !regs::STATUS_CAP_LIST
                } else {
                    hw
                }
            }
            regs::HEADER => {
                let hw = cfg.read32(bdf, reg);
                if self.functions[i].keep_multifunction {
                    hw
                } else {
                    hw & !(u32::from(regs::HEADER_MULTIFUNCTION) << 16)
                }
            }
            regs::BAR0..BAR_END => {
                let slot = ((reg - regs::BAR0) / 4) as u8;
                let f = &self.functions[i];
                if f.sizing[usize::from(slot)] {
                    f.size_mask(slot)
                } else if matches!(f.bar_slot(slot), BarSlot::None) {
                    0
                } else {
                    f.vbar[usize::from(slot)]
                }
            }
            EXPANSION_ROM => 0,
            regs::CAP_PTR => {
                let hw = cfg.read32(bdf, reg);
                (hw & !0xff) | u32::from(self.chain(cfg, i).first)
            }
            regs::INTERRUPT => {
                let mut hw = cfg.read32(bdf, reg);
                if self.functions[i].msi_only {
                    // No pin: Linux then never looks for an INTx route (`pci_read_irq`).
                    hw &= !INTERRUPT_PIN;
                }
                (hw & !0xff) | u32::from(self.functions[i].interrupt_line)
            }
            DEVICE_SPECIFIC..regs::EXT_CAP_START => {
                let chain = self.chain(cfg, i);
                let pmcsr = chain.pm.map(|p| u16::from(p) + 4);
                if let Some(next) = chain.next_of(reg) {
                    let hw = cfg.read32(bdf, reg);
                    (hw & !0xff00) | u32::from(next) << 8
                } else if chain.is_hidden(reg) {
                    0
                } else if pmcsr == Some(reg) {
                    let hw = cfg.read32(bdf, reg);
                    (hw & !PMCSR_POWER_STATE) | self.functions[i].power_state
                } else {
                    cfg.read32(bdf, reg)
                }
            }
            _ => cfg.read32(bdf, reg),
        }
    }

    /// A guest write of the bytes `enable` selects of `value` to the dword at `reg`.
    fn write_dword(
        &mut self,
        cfg: &mut dyn ConfigSpace,
        i: usize,
        reg: u16,
        value: u32,
        enable: u32,
    ) {
        let bdf = self.functions[i].dev.bdf;
        match reg {
            regs::COMMAND => {
                let decode = self.decode_bits(&*cfg, i);
                self.functions[i].decode = Some(decode & !enable | value & enable & COMMAND_DECODE);
                let hw = cfg.read32(bdf, reg);
                let guest = COMMAND_GUEST_BITS & !COMMAND_DECODE & enable;
                let mut command = (hw & 0xffff & !guest) | (value & guest);
                if self.functions[i].msi_only {
                    command |= regs::command::INTX_DISABLE;
                }
                let bus_master = regs::command::BUS_MASTER;
                if guest & bus_master != 0 {
                    self.functions[i].bus_master_held = false;
                }
                if !self.dma_open && command & bus_master != 0 {
                    // No DMA before the VM's RAM is all zeroed and mapped: held until
                    // `open_dma`, which the trap that made this write calls.
                    command &= !bus_master;
                    self.functions[i].bus_master_held = true;
                    self.dma_requested = true;
                }
                // Zeros in the Status half leave it alone; only the ones the guest wrote clear.
                let clear = value & enable & STATUS_RW1C;
                // A write that changes nothing is not made: decode toggles stay off the bus.
                if command != hw & 0xffff || clear != 0 {
                    cfg.write32(bdf, reg, command | clear);
                }
            }
            regs::BAR0..BAR_END => self.write_bar(&*cfg, i, reg, value, enable),
            regs::INTERRUPT if enable & 0xff != 0 => {
                self.functions[i].interrupt_line = value as u8;
            }
            DEVICE_SPECIFIC..regs::EXT_CAP_START => {
                let pcie = self.functions[i].dev.pcie.map(|p| u16::from(p.offset));
                let chain = self.chain(&*cfg, i);
                if chain.is_hidden(reg) {
                    return;
                }
                if let Some(write) = msi_control_write(chain, &*cfg, bdf, reg, value, enable) {
                    if let Some(v) = write {
                        cfg.write32(bdf, reg, v);
                    }
                    return;
                }
                let pm = chain.pm.map(u16::from);
                let af = chain.af.map(u16::from);
                let (rw1c, value) = match pcie.map(|p| reg.wrapping_sub(p)) {
                    Some(pcie_cap::DEVICE) => (
                        pcie_cap::DEVICE_STATUS_RW1C,
                        value & !pcie_cap::INITIATE_FLR,
                    ),
                    Some(pcie_cap::LINK) => (pcie_cap::LINK_STATUS_RW1C, value),
                    Some(pcie_cap::SLOT) => (pcie_cap::SLOT_STATUS_RW1C, value),
                    _ if pm.map(|p| p + 4) == Some(reg) => (
                        PMCSR_PME_STATUS,
                        self.power_write(&*cfg, i, reg, value, enable),
                    ),
                    // AF Control, byte 4 of the capability: bit 0 is Initiate FLR, dropped as
                    // the PCIe one is.
                    _ if af.map(|p| p + 4) == Some(reg) => (0, value & !AF_INITIATE_FLR),
                    _ => (0, value),
                };
                let merged = if enable == u32::MAX {
                    value
                } else {
                    // Hardware takes whole dwords (see `ConfigSpace`): keep the bytes the
                    // guest did not write, except RW1C bits there, which writing back as read
                    // would clear behind the guest's back.
                    let hw = cfg.read32(bdf, reg);
                    (hw & !enable & !rw1c) | (value & enable)
                };
                cfg.write32(bdf, reg, merged);
            }
            // IDs, Header Type, BIST, cache line size, latency timer, subsystem IDs, ROM,
            // capability pointer, Interrupt Pin and extended configuration space.
            _ => {}
        }
    }

    /// A guest write to PMCSR: the PowerState the guest writes is kept virtual and the
    /// function stays in D0, which every function supports. Returns the value to pass on.
    ///
    /// Without No_Soft_Reset, the function's D3hot to D0 transition would reset it (PCI Bus PM
    /// 1.2, 5.4.1 and PCIe Base spec 5.3.1.4: its BARs then read 0 and the guest could not put
    /// them back, its BAR writes never reaching hardware). With it, a function out of D0
    /// stops decoding its BARs: a change of the physical address map, which no guest may make
    /// (see [`COMMAND_DECODE`]; QEMU 10.0 unmaps a BAR in D1-D3hot, and a guest's suspend, a
    /// runtime-suspending driver or a shutdown path such as e1000e's for quad-port adapters
    /// writes D3hot while the other VMs run), and on hardware the guest's own accesses would
    /// end in Unsupported Requests, external aborts at EL2. So neither reaches the function;
    /// a partition gives up the power its functions would save in D3hot.
    fn power_write(
        &mut self,
        cfg: &dyn ConfigSpace,
        i: usize,
        reg: u16,
        value: u32,
        enable: u32,
    ) -> u32 {
        if enable & PMCSR_POWER_STATE == 0 {
            return value;
        }
        let hw = cfg.read32(self.functions[i].dev.bdf, reg);
        self.functions[i].power_state = value & PMCSR_POWER_STATE;
        (value & !PMCSR_POWER_STATE) | (hw & PMCSR_POWER_STATE)
    }

    /// BARs are virtual: the guest may place them where it likes (Linux does on a bus rescan,
    /// which ignores `linux,pci-probe-only`), the physical BARs never change, and a move of a
    /// memory BAR is reported ([`VirtualEcam::take_bar_moves`]) for the hypervisor to map the
    /// BAR's physical address at its new place in the VM's stage 2. The sizing protocol (PCI
    /// Local Bus 3.0 6.2.5.1: write all ones, read the mask, write the old value back) is
    /// emulated per BAR slot from the enumerated size; the type bits are read-only.
    fn write_bar(&mut self, _cfg: &dyn ConfigSpace, i: usize, reg: u16, value: u32, enable: u32) {
        let slot = ((reg - regs::BAR0) / 4) as u8;
        let f = &mut self.functions[i];
        let probe = enable == u32::MAX && value == u32::MAX;
        f.sizing[usize::from(slot)] = probe;
        if probe {
            return;
        }
        let bar = match f.bar_slot(slot) {
            BarSlot::None => return,
            BarSlot::Low(b) | BarSlot::High(b) => *b,
        };
        let before = f.vbar_addr(&bar);
        let s = usize::from(slot);
        let merged = (f.vbar[s] & !enable) | (value & enable);
        f.vbar[s] = (merged & f.size_mask(slot) & !f.type_bits(slot)) | f.type_bits(slot);
        let after = f.vbar_addr(&bar);
        if after != before && bar.kind != BarKind::Io {
            if let Some(a) = bar.addr {
                self.moves.push(BarMove {
                    bdf: f.dev.bdf,
                    index: bar.index,
                    size: bar.size,
                    phys: a.cpu,
                    pci: after,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests;
