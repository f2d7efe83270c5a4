//! The VM control plane as plain, host-tested Rust: a VM and what is decided about it — its
//! vCPUs' power states and PSCI ([`psci`]), its lifecycle ([`lifecycle`]), the MMIO bus of its
//! IPA space ([`bus`]), BAR remapping ([`bars`]), list-register scheduling ([`lr`]), interrupt
//! delivery ([`irq`]) and where its images go ([`layout`]). It reaches the machine only through
//! the [`crate::hw::Hw`] port; `arch/` carries the decisions out (entering vCPUs, the traps).

pub mod bars;
pub mod bus;
pub mod events;
pub mod irq;
pub mod its;
pub mod layout;
pub mod lifecycle;
pub mod lr;
pub mod psci;
pub mod ram;
pub mod viommu;

use crate::devices::console::ConsoleBacklog;
use crate::devices::vecam::{BarMove, VirtualEcam};
use crate::devices::vgic::{VGic, VGicConfig, GICR_FRAME_SIZE};
use crate::devices::vpl011::VPl011;
use crate::devices::vsmmu::{PhysFacts, VmSmmu};
use crate::guest_dt::{build_guest_dt, GuestDtConfig, GuestIts, GuestPci, GuestSmmu};
use crate::hw::{GuestRam, Hw, Ipa, OutOfRam, PhysAddr};
use crate::pci::{ConfigSpace, HostBridge, VmPciDevices};
use crate::platform::{MemRange, Platform};
use crate::stage2::{MemType, Stage2, Stage2Error};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use bars::BarMaps;
use core::sync::atomic::{AtomicU32, Ordering};
use lifecycle::{Lifecycle, VcpuPower};
use spin::Mutex;

/// One vCPU slot of a VM.
#[derive(Debug)]
pub struct VcpuSlot {
    /// Physical CPU (logical index) the vCPU is pinned to.
    pub pcpu: usize,
    /// MPIDR the guest sees (VMPIDR_EL2).
    pub mpidr: u64,
    /// Power state.
    pub power: VcpuPower,
    /// Where its exits' time went (`crate::profile`), written only by its physical CPU.
    pub profile: spin::Mutex<crate::profile::TrapProfile>,
}

/// A boot module: where it lies and its bytes (pristine, never written: every boot of the VM
/// copies from it).
#[derive(Debug, Clone, Copy)]
pub struct BootImage {
    /// Its physical range.
    pub range: MemRange,
    /// Its contents.
    pub bytes: &'static [u8],
}

/// What a VM is made of, decided by configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Name, also the console prefix.
    pub name: String,
    /// Physical CPUs (logical indices) its vCPUs are pinned to, in vCPU order.
    pub pcpus: Vec<usize>,
    /// RAM size.
    pub ram_size: u64,
    /// Kernel Image module.
    pub kernel: BootImage,
    /// Initramfs module, if any.
    pub initrd: Option<BootImage>,
    /// Kernel command line.
    pub bootargs: String,
    /// The PCI functions it owns, by host bridge.
    pub devices: VmPciDevices,
    /// `smmu-hv,intx-only`: no virtual ITS, so its functions keep INTx.
    pub intx_only: bool,
    /// `smmu-hv,iommu`: the vSMMU or a virtio-iommu over each physical SMMU it has functions
    /// behind.
    pub iommu: crate::config::IommuKind,
    /// When its RAM is zeroed in each boot (the hypervisor's `ram-zero=`).
    pub ram_zeroing: crate::platform::RamZeroing,
}

/// Why a VM could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The stage-2 table could not map its RAM or devices.
    #[error("stage-2: {0}")]
    Stage2(#[from] Stage2Error),
    /// The images cannot be placed in its RAM.
    #[error("kernel at {kernel:#x}: {err}")]
    Layout {
        /// The kernel module's physical address.
        kernel: u64,
        /// What is wrong.
        err: layout::LayoutError,
    },
    /// The guest DT could not be built.
    #[error("guest device tree: {0}")]
    Dt(crate::guest_dt::GuestDtError),
    /// The guest device tree is larger than its 2 MiB block.
    #[error("guest device tree of {0} bytes exceeds its 2 MiB block")]
    DtTooLarge(usize),
    /// Copying into guest RAM failed.
    #[error("guest memory: {0}")]
    Mem(#[from] OutOfRam),
}

/// One of a VM's virtual generic ECAM host bridges, over the physical one its functions sit
/// behind (one per physical bridge): same ECAM window, bus range, domain and address windows,
/// showing only the VM's functions.
#[derive(Debug)]
pub struct VmPci {
    /// The physical bridge's segment index (`pci::Segment`), for its configuration space.
    pub segment: usize,
    /// Its index in `VmConfig::devices.segments`: the functions it shows.
    pub at: usize,
    /// Its PCI domain (`linux,pci-domain`), the physical bridge's.
    pub domain: u16,
    /// ECAM window (guest IPA = host PA; never mapped, every access traps).
    pub ecam: MemRange,
    /// Bus numbers.
    pub bus_range: (u8, u8),
    /// Address windows as the guest DT states them.
    pub windows: Vec<crate::pci::PciWindow>,
    /// The config-space model.
    pub vecam: Mutex<VirtualEcam>,
    /// The host bridge's `iommu-map` entries onto the SMMUs under the VM's vSMMUs.
    pub iommu_map: Vec<crate::pci::IommuMapEntry>,
    /// The host bridge's `iommu-map-mask`.
    pub iommu_map_mask: Option<u32>,
    /// The host bridge's `msi-map` entries onto the ITS the VM's vITS stands for (empty
    /// without a vITS): the guest's map repeats them, so a DeviceID is the same on both sides.
    pub msi_map: Vec<crate::pci::MsiMapEntry>,
    /// The host bridge's `msi-map-mask`, with them.
    pub msi_map_mask: Option<u32>,
    /// `None` without a vITS (MSI and MSI-X hidden); with one, its functions whose MSIs the
    /// ITS cannot take (`its::ItsFacts::no_msi`), which keep them hidden.
    no_msi: Option<Vec<crate::pci::Bdf>>,
    /// Where each of its memory BARs is mapped in the VM's stage 2 now.
    bar_maps: Mutex<BarMaps>,
}

/// The virtual UART's INTID when the host UART has none wired to the GIC (SPI 1, QEMU `virt`'s
/// UART line and clear of PCI INTx lines on the boards the hypervisor knows).
const VUART_FALLBACK_INTID: u32 = 33;

/// What of the machine a VM is built over: the host bridges its functions sit behind (by
/// segment), the physical SMMUs they sit behind, the ITS their MSIs reach (`None`: no vITS).
#[derive(Debug, Clone, Copy, Default)]
pub struct VmMachine<'a> {
    /// The host bridges, by segment index.
    pub host_bridges: &'a [&'a HostBridge],
    /// The physical SMMUs the VM's functions sit behind.
    pub smmus: &'a [SmmuFacts<'a>],
    /// The ITS the VM's functions' MSIs reach, if it gets a vITS.
    pub its: Option<&'a its::ItsFacts>,
    /// What makes a virtio-iommu's model and table pool (`None`: the machine has none, and a
    /// VM asking for a virtio-iommu gets stage 2 only).
    pub viommu: Option<&'a dyn crate::devices::viommu::device::ViommuFactory>,
}

/// The physical SMMU as a VM's construction needs it: its DT node and what it can do.
#[derive(Debug, Clone, Copy)]
pub struct SmmuFacts<'a> {
    /// Its driver instance (`arch::iommu`'s unit index, as in `VmDevices::smmus`).
    pub unit: usize,
    /// Its DT node.
    pub info: &'a crate::platform::SmmuInfo,
    /// Its output address size (stage-2 STEs' S2PS).
    pub oas_bits: u8,
    /// What a vSMMU needs of it.
    pub phys: PhysFacts,
}

/// A VM.
#[derive(Debug)]
pub struct Vm {
    /// Index in the hypervisor's VM table.
    pub id: usize,
    /// Console prefix, e.g. `[vm0] `.
    pub prefix: String,
    /// Configuration it was built from.
    pub config: VmConfig,
    /// VMID (VTTBR_EL2.VMID).
    pub vmid: u16,
    /// VTTBR_EL2 value: stage-2 root and VMID.
    pub vttbr: u64,
    /// Guest RAM in IPA space.
    pub ram_ipa: MemRange,
    /// Where guest RAM lives physically.
    pub ram_pa: PhysAddr,
    ram: Box<dyn GuestRam>,
    /// Which 2 MiB blocks of its RAM are mapped in its stage 2 now: only blocks zeroed in this
    /// boot (`vm::ram`), changed under the stage-2 lock.
    ram_mapped: Box<[core::sync::atomic::AtomicBool]>,
    /// Whether its idle CPUs zero its RAM ahead of need: `ram-zero=idle` and it has PCI
    /// functions, whose first Bus Master Enable needs all of it zeroed and mapped.
    zero_ahead: bool,
    /// Callers waiting for all of its RAM to be zeroed (the DMA gate, an eager load): its idle
    /// CPUs help them whatever `zero_ahead` says.
    zero_wanted: AtomicU32,
    /// Its stage-2 tables (shared with the SMMU); changed when a RAM block is first mapped in a
    /// boot, when a boot unmaps them all, and when the guest moves a BAR.
    stage2: Mutex<Stage2>,
    /// BAR moves since its last boot (the first few are logged).
    bar_moves: AtomicU32,
    /// Emulated GIC distributor (guest IPA).
    pub gicd: MemRange,
    /// Emulated redistributors (guest IPA).
    pub gicr: MemRange,
    /// Emulated PL011 (guest IPA).
    pub uart: MemRange,
    /// The PL011's interrupt.
    pub uart_intid: u32,
    /// The VM's virtual PCI host bridges: one per physical bridge its functions sit behind.
    pub pci: Vec<VmPci>,
    /// The VM's emulated SMMUv3s: one over each physical SMMU its PCI functions sit behind
    /// that can nest, ordered by driver instance.
    pub vsmmus: Vec<VmSmmu>,
    /// Its virtio-iommus (`smmu-hv,iommu = "virtio-iommu"`), in place of the vSMMUs: one over
    /// each physical SMMU its functions sit behind that can nest, ordered by driver instance.
    pub viommus: Vec<crate::devices::viommu::device::VmViommu>,
    /// Its virtual ITS, when the machine has an ITS its functions' MSIs reach and the VM did
    /// not ask for INTx only.
    pub its: Option<its::VmIts>,
    /// Physical address of its stage-2 root table (shared with the SMMU).
    pub s2_root: u64,
    /// Virtual GIC register model, with the generation that lets an exit skip the list
    /// registers when nothing changed (`lr::VgicLock`).
    pub vgic: lr::VgicLock,
    /// Virtual PL011 model.
    pub vuart: Mutex<VPl011>,
    /// Console input its PL011's FIFO had no room for yet.
    pub console_backlog: Mutex<ConsoleBacklog>,
    /// vCPUs.
    pub vcpus: Vec<VcpuSlot>,
    /// Running, resetting or stopped for good; its vCPUs park at their next exit when it is
    /// not running.
    pub life: Lifecycle,
    /// Completed loads of the VM's images (the guest sees the count before this boot).
    pub boots: AtomicU32,
    /// When its current boot started (ms since the hypervisor started), for its uptime.
    pub booted_at_ms: core::sync::atomic::AtomicU64,
    dt_template: GuestDtInputs,
}

#[derive(Debug, Clone)]
struct GuestDtInputs {
    maintenance_ppi: u32,
    timer: crate::platform::TimerInfo,
}

/// The virtual ECAM of a VM's functions on one host bridge whose first bus is `first_bus`, at
/// its reset values: MSI and MSI-X shown when the VM has a vITS (`no_msi` is `Some`) except for
/// the functions `no_msi` lists, INTxDisable held for the functions assigned MSI-only (the
/// hypervisor sets it in hardware when it quiesces the VM's functions, before every boot).
fn vecam_of(
    d: &crate::pci::VmDevices,
    first_bus: u8,
    no_msi: &Option<Vec<crate::pci::Bdf>>,
) -> VirtualEcam {
    VirtualEcam::new(d.functions.clone(), d.bridges.clone())
        .with_first_bus(first_bus)
        .with_msi(no_msi.is_some())
        .without_msi_for(no_msi.as_deref().unwrap_or_default())
        .holding_intx_disable(&d.msi_only)
        .holding_bus_master()
}

/// SPIs of each VM's vGIC (INTIDs 32-159): room for the host's own SPI numbers, which the VM's
/// devices keep (the UART, PCI INTx, the vSMMU's lines).
const VGIC_SPIS: u32 = 128;

impl Vm {
    /// Builds a VM whose RAM is `ram` (physically at `ram_pa`), seen by the guest at the host's
    /// first RAM base. Emulated devices sit at the host's device addresses (they are never
    /// mapped in stage-2, so every access traps). A VM with PCI functions gets a vSMMU over
    /// each of `machine.smmus` (the physical SMMUs they sit behind) that can nest; for one that
    /// cannot, the reason is logged and the devices behind it run on stage 2 only.
    pub fn new(
        id: usize,
        config: VmConfig,
        platform: &Platform,
        ram: Box<dyn GuestRam>,
        ram_pa: PhysAddr,
        machine: &VmMachine<'_>,
    ) -> Result<Self, VmError> {
        let VmMachine {
            host_bridges,
            smmus,
            its,
            viommu,
        } = *machine;
        let ram_ipa = MemRange {
            base: platform.memory[0].base,
            size: config.ram_size,
        };
        let mut stage2 = Stage2::new();
        // RAM is mapped block by block as each is zeroed in a boot (`vm::ram`): the tables are
        // built now, every block left unmapped.
        ram::prebuild(&mut stage2, ram_ipa, ram_pa.get())?;
        // Assigned functions' memory BARs, their slots checked to hold nothing else: the guest
        // sees them where they physically are. I/O BARs are not mapped: their accesses trap.
        for seg in &config.devices.segments {
            for slot in &seg.devices.slots {
                stage2.map(slot.page, slot.page, slot.len, MemType::Device)?;
            }
        }
        let has_devices = !config.devices.is_empty();
        let its = its
            .filter(|_| has_devices && !config.intx_only)
            .and_then(|f| its::VmIts::new(f, config.pcpus.len()));
        if let Some(v) = &its {
            // The doorbell the guest's functions write their MSIs to: the physical
            // GITS_TRANSLATER page, write-only (see `vm::its` for what a CPU store does).
            stage2.map(
                v.doorbell.base,
                v.doorbell.base,
                v.doorbell.size,
                MemType::DeviceWriteOnly,
            )?;
        }
        let vmid = (id + 1) as u16;
        let uart_intid = platform.uart.intid.unwrap_or(VUART_FALLBACK_INTID);
        let mut vsmmus: Vec<VmSmmu> = Vec::new();
        let mut viommus: Vec<crate::devices::viommu::device::VmViommu> = Vec::new();
        // Lines a vSMMU must not take: the UART's, the INTx lines, earlier vSMMUs'.
        let mut used: Vec<u32> = alloc::vec![uart_intid];
        used.extend(config.devices.intx_intids());
        for s in smmus.iter().filter(|_| has_devices) {
            let s2 = crate::stage2::smmu_s2_config(s.oas_bits, vmid, stage2.root_pa());
            let ids = config.devices.stream_ids_on(s.unit);
            if config.iommu == crate::config::IommuKind::VirtioIommu {
                let window = viommu::pool_window(platform, ram_ipa, viommus.len());
                match viommu::build(
                    &config.name,
                    s,
                    ids,
                    s2,
                    32 + VGIC_SPIS,
                    &used,
                    window,
                    its.as_ref().map(|v| v.doorbell),
                    viommu,
                ) {
                    Ok((v, pool_pa)) => {
                        // The SMMU's nested walks read the domains' tables through this
                        // mapping; the guest's CPUs may read but never write them.
                        stage2.map(
                            v.pool.base,
                            pool_pa.base,
                            pool_pa.size,
                            MemType::NormalReadOnly,
                        )?;
                        log::info!(
                            "viommu: {}: virtio-iommu at {:#x} (virtio-mmio), endpoints {ids:?} of {}, SPI {}, table pool {} KiB at IPA {:#x}",
                            config.name,
                            v.regs.base,
                            s.info.path,
                            v.intid,
                            pool_pa.size / 1024,
                            v.pool.base
                        );
                        used.push(v.intid);
                        viommus.push(v);
                    }
                    Err(e) => log::warn!(
                        "viommu: {}: {}: {e}: no virtio-iommu there, its devices behind it on stage 2 only",
                        config.name,
                        s.info.path
                    ),
                }
                continue;
            }
            let made = crate::devices::vsmmu::pick_intids(s.info, 32 + VGIC_SPIS, &used)
                .ok_or(crate::devices::vsmmu::NoVsmmu::NoSpi)
                .and_then(|intids| {
                    VmSmmu::new(&config.name, s.unit, s.info, &s.phys, ids, s2, intids)
                });
            match made {
                Ok(v) => {
                    log::info!(
                        "vsmmu: {}: SMMUv3 (stage 1) at {:#x}, StreamIDs {ids:?} of {}, SPIs {}/{}",
                        config.name,
                        s.info.regs.base,
                        s.info.path,
                        v.eventq_intid,
                        v.gerror_intid
                    );
                    used.extend([v.eventq_intid, v.gerror_intid]);
                    vsmmus.push(v);
                }
                Err(e) => log::warn!(
                    "vsmmu: {}: {}: {e}: no vSMMU there, its devices behind it on stage 2 only",
                    config.name,
                    s.info.path
                ),
            }
        }
        // The functions on (physical) segment `segment` that take no MSIs: all without a vITS.
        let no_msi_on = |segment: usize| {
            machine
                .its
                .filter(|_| its.is_some())
                .map(|f| f.no_msi_on(segment))
        };
        for seg in &config.devices.segments {
            let none = no_msi_on(seg.segment).unwrap_or_default();
            for f in seg.devices.msi_only.iter().filter(|f| none.contains(f)) {
                log::warn!(
                    "{}: {} is assigned MSI-only, but the ITS cannot take its MSIs: it has no interrupt",
                    config.name,
                    crate::pci::PciAddr::new(seg.domain, *f)
                );
            }
        }
        let pci: Vec<VmPci> = config
            .devices
            .segments
            .iter()
            .enumerate()
            .filter(|(_, seg)| !seg.devices.functions.is_empty())
            .filter_map(|(at, seg)| {
                let host = host_bridges.get(seg.segment)?;
                Some(VmPci {
                    segment: seg.segment,
                    at,
                    domain: seg.domain,
                    ecam: host.ecam,
                    bus_range: (host.bus_start, host.bus_end),
                    windows: host.windows.clone(),
                    // Offset 0 of the window is the bridge's first bus (0x80 for a second
                    // segment that starts there).
                    vecam: Mutex::new(vecam_of(
                        &seg.devices,
                        host.bus_start,
                        &no_msi_on(seg.segment),
                    )),
                    iommu_map: host
                        .iommu_map
                        .iter()
                        .filter(|e| {
                            vsmmus.iter().any(|v| v.host_phandle == Some(e.iommu))
                                || viommus.iter().any(|v| v.host_phandle == Some(e.iommu))
                        })
                        .copied()
                        .collect(),
                    iommu_map_mask: host.iommu_map_mask,
                    msi_map: host
                        .msi_map
                        .iter()
                        .filter(|e| {
                            its.as_ref()
                                .is_some_and(|i| i.host_phandle == Some(e.its_phandle))
                        })
                        .copied()
                        .collect(),
                    msi_map_mask: host.msi_map_mask.filter(|_| its.is_some()),
                    no_msi: no_msi_on(seg.segment),
                    bar_maps: Mutex::new(BarMaps::new(&seg.devices.slots)),
                })
            })
            .collect();
        let vttbr = stage2.root_pa() | (vmid as u64) << 48;
        let vcpus: Vec<VcpuSlot> = config
            .pcpus
            .iter()
            .enumerate()
            .map(|(i, &pcpu)| VcpuSlot {
                pcpu,
                mpidr: i as u64,
                power: VcpuPower::new(),
                profile: Default::default(),
            })
            .collect();
        let vgic = VGic::new(VGicConfig {
            num_spis: VGIC_SPIS,
            vcpu_mpidr: vcpus.iter().map(|v| v.mpidr).collect(),
            // LPIs exactly when the guest has an ITS to raise them.
            lpis: its.is_some(),
            ..VGicConfig::default()
        });
        let gicr = MemRange {
            // The guest's redistributors sit where the host's first region starts (its layout
            // mirrors the host's; `guest_dt::validate` checks they fit).
            base: platform.gic.gicr.first().map_or(0, |r| r.base),
            size: GICR_FRAME_SIZE * vcpus.len() as u64,
        };
        Ok(Self {
            id,
            prefix: format!("[{}] ", config.name),
            vmid,
            vttbr,
            ram_ipa,
            ram_pa,
            ram_mapped: (0..ram_ipa.size.div_ceil(crate::hw::scrub::BLOCK))
                .map(|_| core::sync::atomic::AtomicBool::new(false))
                .collect(),
            zero_ahead: match config.ram_zeroing {
                crate::platform::RamZeroing::Lazy => false,
                crate::platform::RamZeroing::Idle => has_devices,
                crate::platform::RamZeroing::Eager => false,
            },
            zero_wanted: AtomicU32::new(0),
            ram,
            s2_root: stage2.root_pa(),
            stage2: Mutex::new(stage2),
            bar_moves: AtomicU32::new(0),
            pci,
            vsmmus,
            viommus,
            its,
            gicd: MemRange {
                base: platform.gic.gicd.base,
                size: 0x10000,
            },
            gicr,
            uart: MemRange {
                base: platform.uart.base.base,
                size: 0x1000,
            },
            // A host console without a wired interrupt still gives the guest a working one.
            uart_intid,
            vgic: lr::VgicLock::new(vgic),
            vuart: Mutex::new(VPl011::new()),
            console_backlog: Mutex::new(ConsoleBacklog::default()),
            vcpus,
            life: Lifecycle::new(),
            boots: AtomicU32::new(0),
            booted_at_ms: core::sync::atomic::AtomicU64::new(0),
            dt_template: GuestDtInputs {
                maintenance_ppi: platform.gic.maintenance_ppi,
                timer: platform.timer,
            },
            config,
        })
    }

    /// Makes its RAM stale and unmapped, copies the pristine kernel and initramfs and the guest
    /// DT in (zeroing only what of their blocks they do not overwrite: `vm::ram`), resets the
    /// emulated devices (each vSMMU through `phys` of its physical SMMU's unit) and returns
    /// (entry IPA, DTB IPA) for vCPU 0.
    pub fn load<P: smmu::vsmmu::PhysicalSmmu>(
        &self,
        hw: &impl Hw,
        mut phys: impl FnMut(usize) -> P,
    ) -> Result<(Ipa, Ipa), VmError> {
        let kernel = self.config.kernel;
        let place = layout::place(
            self.ram_ipa,
            kernel.bytes,
            kernel.bytes.len() as u64,
            self.config.initrd.map(|m| m.bytes.len() as u64),
        )
        .map_err(|err| VmError::Layout {
            kernel: kernel.range.base,
            err,
        })?;
        let boots = self.boots.load(Ordering::Acquire);
        let mpidrs: Vec<u64> = self.vcpus.iter().map(|v| v.mpidr).collect();
        let smmus: Vec<GuestSmmu> = self
            .vsmmus
            .iter()
            .map(|s| GuestSmmu {
                regs: s.regs,
                eventq_intid: s.eventq_intid,
                gerror_intid: s.gerror_intid,
                host_phandle: s.host_phandle,
                kind: crate::config::IommuKind::Smmuv3,
            })
            .chain(self.viommus.iter().map(|v| GuestSmmu {
                regs: v.regs,
                eventq_intid: v.intid,
                gerror_intid: v.intid,
                host_phandle: v.host_phandle,
                kind: crate::config::IommuKind::VirtioIommu,
            }))
            .collect();
        let pci: Vec<GuestPci> = self
            .pci
            .iter()
            .map(|p| GuestPci {
                domain: p.domain,
                ecam: p.ecam,
                bus_range: p.bus_range,
                ranges: &p.windows,
                intx: &self.config.devices.segments[p.at].devices.intx,
                iommu_map: &p.iommu_map,
                iommu_map_mask: p.iommu_map_mask,
                msi_map: &p.msi_map,
                msi_map_mask: p.msi_map_mask,
            })
            .collect();
        let dtb = build_guest_dt(&GuestDtConfig {
            vm_name: &self.config.name,
            vcpu_mpidrs: &mpidrs,
            ram: self.ram_ipa,
            gicd: self.gicd,
            gicr: self.gicr,
            maintenance_ppi: self.dt_template.maintenance_ppi,
            timer: self.dt_template.timer,
            uart: self.uart,
            uart_intid: self.uart_intid,
            psci_method_hvc: true,
            bootargs: &self.config.bootargs,
            initrd: place.initrd,
            boot_count: boots,
            pci: &pci,
            smmus: &smmus,
            its: self.its.as_ref().map(|i| GuestIts {
                base: i.regs.base,
                size: crate::guest_dt::GUEST_ITS_SIZE,
            }),
        })
        .map_err(VmError::Dt)?;
        if dtb.len() as u64 > layout::DTB_MAX {
            return Err(VmError::DtTooLarge(dtb.len()));
        }
        // Every boot starts from zeroes, whoever used the RAM before (firmware, or this VM's
        // previous boot): nothing of it is mapped until zeroed, and the loader zeroes only what
        // its images do not overwrite (`vm::ram`).
        self.restart_ram(hw)?;
        let mut images: Vec<(Ipa, &[u8])> = alloc::vec![(place.entry, kernel.bytes)];
        if let (Some(m), Some(r)) = (self.config.initrd, place.initrd) {
            images.push((Ipa(r.base), m.bytes));
        }
        images.push((place.dtb, &dtb));
        self.load_ram(hw, &images)?;
        *self.vgic.lock() = VGic::new(VGicConfig {
            num_spis: VGIC_SPIS,
            vcpu_mpidr: mpidrs,
            lpis: self.its.is_some(),
            ..VGicConfig::default()
        });
        *self.vuart.lock() = VPl011::new();
        self.console_backlog.lock().clear();
        for p in &self.pci {
            let d = &self.config.devices.segments[p.at].devices;
            *p.vecam.lock() = vecam_of(d, p.bus_range.0, &p.no_msi);
        }
        self.reset_bar_maps(hw);
        if boots > 0 {
            self.log_vsmmu_stats();
        }
        for s in &self.vsmmus {
            // Architectural reset: the guest's streams go back to stage 2 only (GBPA's reset
            // value) and whatever its previous boot left in the TLBs of its VMID is dropped.
            s.model.lock().reset(&mut phys(s.unit));
        }
        for v in &self.viommus {
            // Device and VM reset: no domains, `bypass` = 1, every endpoint on stage 2 only,
            // the VMID's stage-1 TLB entries dropped.
            v.vm_reset(&mut phys(v.unit));
        }
        self.boots.fetch_add(1, Ordering::AcqRel);
        Ok((place.entry, place.dtb))
    }

    /// Aborts every stream of its functions (a stop, or before a reload): each physical STE
    /// aborts and the VMID's TLB entries are dropped, in force before this returns. The next
    /// [`Vm::load`] sets them up again, on stage 2 only until the guest's driver says more.
    pub fn abort_streams<P: smmu::vsmmu::PhysicalSmmu>(&self, mut phys: impl FnMut(usize) -> P) {
        for s in &self.vsmmus {
            s.model.lock().abort_streams(&mut phys(s.unit));
        }
        for v in &self.viommus {
            v.abort_streams(&mut phys(v.unit));
        }
    }

    /// The counters of the VM's vITS and of each of its vSMMUs and virtio-iommus, as the
    /// machine-readable `... stats: key=value ...` lines the tests and the benchmark read.
    pub fn stats_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        // The vITS's line first: a reader that waits for a VM's vSMMU lines has seen it by then
        // (the benchmark reads both around each workload; an INTx-only VM has none).
        if let Some(i) = &self.its {
            lines.push(i.stats_line(&self.config.name));
        }
        for s in &self.vsmmus {
            lines.extend(s.stats_lines(&self.iommu_name(s.regs.base, self.vsmmus.len())));
        }
        for v in &self.viommus {
            lines.push(v.stats_line(&self.iommu_name(v.regs.base, self.viommus.len())));
        }
        lines
    }

    /// The trap profile of all its vCPUs together (`crate::profile`), as a statistics line;
    /// `freq` is the generic counter's frequency.
    pub fn profile_line(&self, freq: u64) -> String {
        let sum = self
            .vcpus
            .iter()
            .fold(crate::profile::TrapProfile::default(), |acc, v| {
                acc.merged(&v.profile.lock())
            });
        sum.stats_line(&self.config.name, freq)
    }

    /// How the stats lines name one of `count` emulated IOMMUs at `base`: a VM with several
    /// names each by its address.
    fn iommu_name(&self, base: u64, count: usize) -> String {
        if count > 1 {
            format!("{}@{base:#x}", self.config.name)
        } else {
            self.config.name.clone()
        }
    }

    /// Logs [`Vm::stats_lines`].
    pub fn log_vsmmu_stats(&self) {
        for line in self.stats_lines() {
            log::info!("{line}");
        }
    }

    /// One line per emulated IOMMU saying what the guest's driver made of it (the monitor's
    /// `list`): its streams' physical STE configurations and its main counters.
    pub fn iommu_summaries(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.vsmmus {
            let model = s.model.lock();
            let (mut nested, mut s2, mut abort, mut other) = (0, 0, 0, 0);
            for (_, ste) in model.physical_stes() {
                match ste.map(|e| e.config()) {
                    Some(smmu::ste::StreamConfig::Nested) => nested += 1,
                    Some(smmu::ste::StreamConfig::S2Translate) => s2 += 1,
                    Some(smmu::ste::StreamConfig::Abort) => abort += 1,
                    _ => other += 1,
                }
            }
            let st = model.stats();
            let kinds: Vec<String> = [
                (nested, "nested"),
                (s2, "stage 2 only"),
                (abort, "aborting"),
                (other, "not set up"),
            ]
            .iter()
            .filter(|(n, _)| *n > 0)
            .map(|(n, what)| format!("{n} {what}"))
            .collect();
            let streams = kinds.join(", ");
            out.push(format!(
                "vsmmu {:#x}: {streams}; {} traps {} cmds {} errors {} faults",
                s.regs.base,
                st.traps(),
                st.commands,
                st.command_errors,
                st.s2_faults
            ));
        }
        for v in &self.viommus {
            let line = v.stats_line("");
            let field = |k: &str| -> String {
                String::from(
                    line.split(' ')
                        .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                        .unwrap_or("?"),
                )
            };
            out.push(format!(
                "virtio-iommu {:#x}: status {}; {} domains {} mappings {} errors {} faults {} resets",
                v.regs.base,
                field("status"),
                field("domains"),
                field("mappings"),
                field("errors"),
                field("faults"),
                field("resets")
            ));
        }
        out
    }

    /// Queues console input for the guest (see [`ConsoleBacklog::input`]).
    pub fn console_input(&self, byte: u8) {
        let mut backlog = self.console_backlog.lock();
        backlog.input(&mut self.vuart.lock(), byte);
    }

    /// Moves waiting console input into the UART as far as its FIFO has room (after the guest
    /// read from it).
    pub fn refill_console(&self) {
        let mut backlog = self.console_backlog.lock();
        if !backlog.is_empty() {
            backlog.refill(&mut self.vuart.lock());
        }
    }

    /// Maps each BAR the guest moved (in the virtual ECAM of its host bridge `bridge`, an index
    /// of [`Vm::pci`]) at its new IPA in the VM's stage 2 and
    /// unmaps the old place. Only the BAR's own slot is ever mapped. A BAR put outside the VM's
    /// PCI memory windows, over another of its BARs, or at an address whose page offset differs
    /// from the physical one stays unmapped: its accesses then trap and are forwarded (see
    /// [`Vm::resolve_pci`]) as long as they stay inside it. Returns whether stage 2 changed:
    /// the caller then invalidates the VM's TLBs in the CPUs and the SMMU.
    pub fn apply_bar_moves(&self, bridge: usize, moves: &[BarMove]) -> bool {
        let Some(pci) = self.pci.get(bridge) else {
            return false;
        };
        let mut changed = false;
        let mut maps = pci.bar_maps.lock();
        let mut s2 = self.stage2.lock();
        for m in moves {
            let Some(plan) = maps.plan_move(m, &pci.windows) else {
                continue;
            };
            if let Some((old, len)) = plan.unmap {
                // Slots are whole pages of one BAR each: nothing else uses these pages.
                let _ = s2.unmap(old, len);
                changed = true;
            }
            let n = self.bar_moves.fetch_add(1, Ordering::Relaxed);
            let slot = maps
                .maps()
                .iter()
                .find(|b| b.slot.bdf == m.bdf && b.slot.bar == m.index)
                .map(|b| b.slot);
            match (plan.map, slot) {
                (Some((base, len)), Some(slot)) => match s2.map(base, slot.page, len, MemType::Device) {
                    Ok(()) => {
                        maps.set_mapped(m.bdf, m.index, base);
                        changed = true;
                        if n < 8 {
                            log::info!(
                                "{}: {} BAR{} moved by the guest to {:#x} (physically at {:#x}): stage 2 remapped",
                                self.config.name, m.bdf, m.index, base, m.phys
                            );
                        }
                    }
                    Err(e) => log::warn!(
                        "{}: {} BAR{} at {base:#x}: {e}: left unmapped, accesses forwarded",
                        self.config.name,
                        m.bdf,
                        m.index
                    ),
                },
                _ => log::warn!(
                    "{}: {} BAR{}: the guest put it at bus address {:#x}, outside its windows, over another BAR or off its page offset: left unmapped, accesses forwarded",
                    self.config.name,
                    m.bdf,
                    m.index,
                    m.pci
                ),
            }
        }
        changed
    }

    /// Puts every BAR back where the hypervisor placed it (a VM boot: its new virtual ECAM
    /// shows that placement) and drops the VM's TLB entries if anything moved.
    fn reset_bar_maps(&self, hw: &impl Hw) {
        let mut moved = false;
        for pci in &self.pci {
            let mut maps = pci.bar_maps.lock();
            let mut s2 = self.stage2.lock();
            // Every moved BAR out first, then every one back: a BAR's old place may be
            // another's home.
            let (unmap, home) = maps.reset();
            for &(ipa, len) in &unmap {
                let _ = s2.unmap(ipa, len);
            }
            for slot in &home {
                if let Err(e) = s2.map(slot.page, slot.page, slot.len, MemType::Device) {
                    log::error!("{}: {} BAR{}: {e}", self.config.name, slot.bdf, slot.bar);
                }
            }
            moved |= !home.is_empty();
        }
        self.bar_moves.store(0, Ordering::Relaxed);
        if moved {
            self.invalidate_tlbs(hw);
        }
    }

    /// Where a trapped guest access at `ipa` inside its PCI windows that its stage 2 does not
    /// map goes: the physical address in the function whose BAR the guest placed there (its
    /// virtual ECAM decides, reading `cfg_of` the bridge's segment: inside one of the VM's own
    /// BARs, wholly, with
    /// decoding on), or `None` (absent: the access faults). I/O BARs are served this way
    /// always, memory BARs when the guest placed them where they cannot be mapped.
    pub fn resolve_pci<C: ConfigSpace>(
        &self,
        cfg_of: impl Fn(usize) -> Option<C>,
        ipa: Ipa,
        width: crate::mmio::AccessWidth,
    ) -> Option<PhysAddr> {
        let (pci, (io, bus)) = self
            .pci
            .iter()
            .find_map(|p| bus::pci_window(&p.windows, ipa).map(|w| (p, w)))?;
        let cfg = cfg_of(pci.segment)?;
        pci.vecam
            .lock()
            .resolve(&cfg, io, bus, width.bytes())
            .map(PhysAddr)
    }

    /// Drops every TLB entry of the VM's VMID, in the CPUs and in the SMMU (after a stage-2
    /// change).
    pub fn invalidate_tlbs(&self, hw: &impl Hw) {
        hw.tlbi_vm(self.vttbr);
        hw.smmu_tlbi_vmid(self.vmid);
    }

    /// The VM's RAM, for the device models that read or write it.
    pub fn ram(&self) -> &dyn GuestRam {
        &*self.ram
    }

    /// Stops the VM for good; returns whether this call stopped it (a VM that is resetting is
    /// the reset's to finish).
    pub fn stop(&self) -> bool {
        self.life.stop()
    }

    /// Whether the VM's vCPUs must not run: it is stopped or resetting.
    pub fn is_stopped(&self) -> bool {
        !self.life.runs()
    }

    /// Whether physical SPI `intid` is the INTx line of one of the VM's PCI functions.
    pub fn owns_spi(&self, intid: u32) -> bool {
        self.config.devices.intx_intids().any(|i| i == intid)
    }

    /// Its vCPUs as PSCI sees them.
    pub fn psci_view(&self) -> psci::Vcpus<'_> {
        psci::Vcpus {
            vm: &self.config.name,
            slots: &self.vcpus,
            life: &self.life,
            ram: self.ram_ipa,
        }
    }
}

#[cfg(test)]
mod tests;
