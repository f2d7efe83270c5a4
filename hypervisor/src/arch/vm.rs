//! A VM: its RAM and stage-2, its emulated devices, its vCPUs' power state, and loading its
//! kernel, initramfs and device tree from the pristine boot modules.

use super::guest_mem::{read_phys, GuestRam};
use super::vsmmu::{PhysSmmu, VmSmmu};
use crate::guest_dt::{build_guest_dt, GuestDtConfig, GuestPci, GuestSmmu};
use crate::pci::VirtualEcam;
use crate::platform::{MemRange, Platform};
use crate::stage2::{MemType, Stage2, Stage2Error};
use crate::vgic::{VGic, VGicConfig, GICR_FRAME_SIZE};
use crate::vpl011::VPl011;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU32, Ordering};
use spin::Mutex;

use crate::vm::bars::BarMaps;
pub use crate::vm::lifecycle::Power;
use crate::vm::lifecycle::{Lifecycle, VcpuPower};

/// One vCPU slot of a VM.
#[derive(Debug)]
pub struct VcpuSlot {
    /// Physical CPU (logical index) the vCPU is pinned to.
    pub pcpu: usize,
    /// MPIDR the guest sees (VMPIDR_EL2).
    pub mpidr: u64,
    /// Power state.
    pub power: VcpuPower,
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
    /// Kernel Image module (physical, pristine).
    pub kernel: MemRange,
    /// Initramfs module, if any.
    pub initrd: Option<MemRange>,
    /// Kernel command line.
    pub bootargs: String,
    /// The PCI functions it owns.
    pub devices: super::iommu::VmDevices,
}

/// Why a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The stage-2 table could not map its RAM.
    #[error("stage-2: {0}")]
    Stage2(#[from] Stage2Error),
    /// The kernel module is not an arm64 Image.
    #[error("kernel module at {0:#x} is not an arm64 Image (bad magic)")]
    NotAnImage(u64),
    /// The images do not fit in the VM's RAM.
    #[error("kernel, initramfs and DTB do not fit in {0:#x} bytes of RAM")]
    TooSmall(u64),
    /// The guest DT could not be built.
    #[error("guest device tree: {0}")]
    Dt(crate::guest_dt::GuestDtError),
    /// Copying into guest RAM failed.
    #[error("guest memory: {0}")]
    Mem(#[from] super::guest_mem::OutOfRam),
}

/// A VM's virtual generic ECAM host bridge: same ECAM window and address windows as the
/// physical one, showing only the VM's functions.
#[derive(Debug)]
pub struct VmPci {
    /// ECAM window (guest IPA = host PA; never mapped, every access traps).
    pub ecam: MemRange,
    /// Bus numbers.
    pub bus_range: (u8, u8),
    /// Address windows as the guest DT states them.
    pub windows: Vec<crate::pci::PciWindow>,
    /// The config-space model.
    pub vecam: Mutex<VirtualEcam>,
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
    pub ram_pa: u64,
    ram: GuestRam,
    /// Its stage-2 tables (shared with the SMMU); changed only when the guest moves a BAR.
    stage2: Mutex<Stage2>,
    /// Where each of its memory BARs is mapped in its stage 2 now.
    bar_maps: Mutex<BarMaps>,
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
    /// The VM's virtual PCI host bridge, if it owns PCI functions.
    pub pci: Option<VmPci>,
    /// The VM's emulated SMMUv3, if it owns PCI functions and the physical SMMU can nest.
    pub vsmmu: Option<VmSmmu>,
    /// Physical address of its stage-2 root table (shared with the SMMU).
    pub s2_root: u64,
    /// Virtual GIC register model.
    pub vgic: Mutex<VGic>,
    /// Virtual PL011 model.
    pub vuart: Mutex<VPl011>,
    /// Console input the virtual PL011's FIFO had no room for yet (at most
    /// [`CONSOLE_BACKLOG`] bytes): fed in as the guest reads, like a terminal server with flow
    /// control, so pasted text is not lost to the 32-byte FIFO.
    pub console_backlog: Mutex<alloc::collections::VecDeque<u8>>,
    /// vCPUs.
    pub vcpus: Vec<VcpuSlot>,
    /// Running, resetting or stopped for good; its vCPUs park at their next exit when it is
    /// not running.
    pub life: Lifecycle,
    /// Completed loads of the VM's images (the guest sees the count before this boot).
    pub boots: AtomicU32,
    dt_template: GuestDtInputs,
}

#[derive(Debug, Clone)]
struct GuestDtInputs {
    maintenance_ppi: u32,
    timer: crate::platform::TimerInfo,
}

const MIB: u64 = 1 << 20;

/// Console input bytes held per VM while its UART's receive FIFO is full.
pub const CONSOLE_BACKLOG: usize = 4096;

/// SPIs of each VM's vGIC (INTIDs 32-159): room for the host's own SPI numbers, which the VM's
/// devices keep (the UART, PCI INTx, the vSMMU's lines).
const VGIC_SPIS: u32 = 128;

impl Vm {
    /// Builds a VM whose RAM lives at physical `ram_pa`, seen by the guest at the host's first
    /// RAM base. Emulated devices sit at the host's device addresses (they are never mapped in
    /// stage-2, so every access traps).
    ///
    /// # Safety
    ///
    /// `[ram_pa, ram_pa + config.ram_size)` must be RAM reserved for this VM alone.
    pub unsafe fn new(
        id: usize,
        config: VmConfig,
        platform: &Platform,
        ram_pa: u64,
        hv_host_bridge: Option<&crate::pci::HostBridge>,
    ) -> Result<Self, VmError> {
        let ram_ipa = MemRange {
            base: platform.memory[0].base,
            size: config.ram_size,
        };
        let mut stage2 = Stage2::new();
        stage2.map(ram_ipa.base, ram_pa, ram_ipa.size, MemType::Normal)?;
        // Assigned functions' memory BARs, their slots checked to hold nothing else: the guest
        // sees them where they physically are. I/O BARs are not mapped: their accesses trap.
        for slot in &config.devices.slots {
            stage2.map(slot.page, slot.page, slot.len, MemType::Device)?;
        }
        let pci = hv_host_bridge
            .filter(|_| !config.devices.functions.is_empty())
            .map(|host| VmPci {
                ecam: host.ecam,
                bus_range: (host.bus_start, host.bus_end),
                windows: host.windows.clone(),
                vecam: Mutex::new(VirtualEcam::new(config.devices.functions.clone())),
            });
        let vmid = (id + 1) as u16;
        let vsmmu = platform
            .smmu
            .as_ref()
            .filter(|_| !config.devices.functions.is_empty())
            .and_then(|info| {
                VmSmmu::new(
                    &config.name,
                    info,
                    &config.devices.stream_ids,
                    vmid,
                    stage2.root_pa(),
                )
            });
        let vttbr = stage2.root_pa() | (vmid as u64) << 48;
        let vcpus: Vec<VcpuSlot> = config
            .pcpus
            .iter()
            .enumerate()
            .map(|(i, &pcpu)| VcpuSlot {
                pcpu,
                mpidr: i as u64,
                power: VcpuPower::new(),
            })
            .collect();
        let vgic = VGic::new(VGicConfig {
            num_spis: VGIC_SPIS,
            vcpu_mpidr: vcpus.iter().map(|v| v.mpidr).collect(),
        });
        let gicr = MemRange {
            base: platform.gic.gicr.base,
            size: GICR_FRAME_SIZE * vcpus.len() as u64,
        };
        Ok(Self {
            id,
            prefix: format!("[{}] ", config.name),
            vmid,
            vttbr,
            ram_ipa,
            ram_pa,
            // SAFETY: the caller reserved this RAM for the VM.
            ram: unsafe { GuestRam::new(ram_ipa, ram_pa) },
            s2_root: stage2.root_pa(),
            stage2: Mutex::new(stage2),
            bar_maps: Mutex::new(BarMaps::new(&config.devices.slots)),
            bar_moves: AtomicU32::new(0),
            pci,
            vsmmu,
            gicd: MemRange {
                base: platform.gic.gicd.base,
                size: 0x10000,
            },
            gicr,
            uart: MemRange {
                base: platform.uart.base.base,
                size: 0x1000,
            },
            uart_intid: platform.uart.intid,
            vgic: Mutex::new(vgic),
            vuart: Mutex::new(VPl011::new()),
            console_backlog: Mutex::new(alloc::collections::VecDeque::new()),
            vcpus,
            life: Lifecycle::new(),
            boots: AtomicU32::new(0),
            dt_template: GuestDtInputs {
                maintenance_ppi: platform.gic.maintenance_ppi,
                timer: platform.timer,
            },
            config,
        })
    }

    /// Zeroes RAM, copies the pristine kernel and initramfs in, writes the guest DT, resets the
    /// emulated devices and returns (entry IPA, DTB IPA) for vCPU 0.
    pub fn load(&self) -> Result<(u64, u64), VmError> {
        let kernel = self.config.kernel;
        // SAFETY: boot modules are reserved RAM, identity-mapped, never written by anyone.
        let header = unsafe { read_phys(kernel.base, 64) };
        let word = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
        if &header[56..60] != b"ARM\x64" {
            return Err(VmError::NotAnImage(kernel.base));
        }
        let text_offset = word(8);
        let image_size = word(16).max(kernel.size);
        let ram = self.ram_ipa;
        // Linux: the Image goes text_offset bytes above a 2 MiB-aligned base. The DTB follows
        // in the next 2 MiB block clear of the kernel's image_size (Linux maps it with 2 MiB
        // blocks: it must not share one with anything else), the initramfs in the block after
        // it: everything the guest is given sits low, as U-Boot's `booti` lays it out, so a
        // guest that limits its RAM with `mem=` still reaches its DTB and initramfs.
        let entry = ram.base + text_offset;
        let dtb_ipa = (entry + image_size).next_multiple_of(2 * MIB);
        let initrd = self.config.initrd.map(|m| MemRange {
            base: dtb_ipa + 2 * MIB,
            size: m.size,
        });
        let top = initrd.map_or(dtb_ipa + 2 * MIB, |r| r.end());
        if top > ram.end() {
            return Err(VmError::TooSmall(ram.size));
        }
        if self.boots.load(Ordering::Acquire) == 0 {
            // RAM straight from firmware may hold earlier boot stages' data: the VM starts
            // from zeroes. On a reboot the RAM only ever held this VM's own data, and the
            // kernel, initramfs and DT are rewritten from pristine copies anyway. (Under
            // emulation this first pass costs seconds: it makes the host allocate all of it.)
            self.ram.zero_all();
        }
        // SAFETY: the modules are reserved RAM (see above).
        unsafe {
            self.ram.copy_from_phys(entry, kernel.base, kernel.size)?;
            if let (Some(m), Some(r)) = (self.config.initrd, initrd) {
                self.ram.copy_from_phys(r.base, m.base, m.size)?;
            }
        }
        let mpidrs: Vec<u64> = self.vcpus.iter().map(|v| v.mpidr).collect();
        let dtb = build_guest_dt(&GuestDtConfig {
            vm_name: &self.config.name,
            vcpu_mpidrs: &mpidrs,
            ram,
            gicd: self.gicd,
            gicr: self.gicr,
            maintenance_ppi: self.dt_template.maintenance_ppi,
            timer: self.dt_template.timer,
            uart: self.uart,
            uart_intid: self.uart_intid,
            psci_method_hvc: true,
            bootargs: &self.config.bootargs,
            initrd,
            boot_count: self.boots.load(Ordering::Acquire),
            pci: self.pci.as_ref().map(|p| GuestPci {
                ecam: p.ecam,
                bus_range: p.bus_range,
                ranges: &p.windows,
                intx: &self.config.devices.intx,
            }),
            smmu: self.vsmmu.as_ref().map(|s| GuestSmmu {
                regs: s.regs,
                eventq_intid: s.eventq_intid,
                gerror_intid: s.gerror_intid,
            }),
        })
        .map_err(VmError::Dt)?;
        if dtb.len() as u64 > 2 * MIB {
            return Err(VmError::TooSmall(ram.size));
        }
        self.ram.write(dtb_ipa, &dtb)?;
        *self.vgic.lock() = VGic::new(VGicConfig {
            num_spis: VGIC_SPIS,
            vcpu_mpidr: mpidrs,
        });
        *self.vuart.lock() = VPl011::new();
        self.console_backlog.lock().clear();
        if let Some(p) = &self.pci {
            *p.vecam.lock() = VirtualEcam::new(self.config.devices.functions.clone());
            self.reset_bar_maps();
        }
        if let Some(s) = &self.vsmmu {
            if self.boots.load(Ordering::Acquire) > 0 {
                super::vsmmu::log_stats(self);
            }
            // Architectural reset: the guest's streams go back to stage 2 only (GBPA's reset
            // value) and whatever its previous boot left in the TLBs of its VMID is dropped.
            s.model.lock().reset(&mut PhysSmmu);
        }
        self.boots.fetch_add(1, Ordering::AcqRel);
        Ok((entry, dtb_ipa))
    }

    /// Queues console input for the guest: into its UART while the FIFO has room, behind
    /// what is already waiting otherwise. Beyond [`CONSOLE_BACKLOG`] bytes the UART gets the byte
    /// anyway, which then overruns as a real one would.
    pub fn console_input(&self, byte: u8) {
        let mut backlog = self.console_backlog.lock();
        let mut uart = self.vuart.lock();
        if backlog.is_empty() && uart.rx_ready() {
            uart.push_rx(byte);
            return;
        }
        if backlog.len() >= CONSOLE_BACKLOG {
            // The FIFO may have room while the backlog is full (the guest changed FEN and has
            // not read since): what waits goes first, or this byte would overtake it (found by
            // the vpl011 fuzz target, `fuzz_harness::vpl011`, whose copy of this glue matches).
            while uart.rx_ready() {
                let Some(b) = backlog.pop_front() else { break };
                uart.push_rx(b);
            }
        }
        if backlog.len() < CONSOLE_BACKLOG {
            backlog.push_back(byte);
        } else {
            uart.push_rx(byte);
        }
    }

    /// Moves waiting console input into the UART as far as its FIFO has room (after the guest
    /// read from it).
    pub fn refill_console(&self) {
        let mut backlog = self.console_backlog.lock();
        if backlog.is_empty() {
            return;
        }
        let mut uart = self.vuart.lock();
        while uart.rx_ready() {
            let Some(b) = backlog.pop_front() else { break };
            uart.push_rx(b);
        }
    }

    /// Maps each BAR the guest moved (virtual ECAM) at its new IPA in the VM's stage 2 and
    /// unmaps the old place. Only the BAR's own slot is ever mapped. A BAR put outside the VM's
    /// PCI memory windows, over another of its BARs, or at an address whose page offset differs
    /// from the physical one stays unmapped: its accesses then trap and are forwarded by
    /// [`Vm::forward_pci`] as long as they stay inside it. Returns whether stage 2 changed: the
    /// caller then invalidates the VM's TLBs in the CPUs and the SMMU.
    pub fn apply_bar_moves(&self, moves: &[crate::pci::BarMove]) -> bool {
        let Some(pci) = &self.pci else {
            return false;
        };
        let mut changed = false;
        let mut maps = self.bar_maps.lock();
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
    fn reset_bar_maps(&self) {
        let mut maps = self.bar_maps.lock();
        let mut s2 = self.stage2.lock();
        // Every moved BAR out first, then every one back: a BAR's old place may be another's
        // home.
        let (unmap, home) = maps.reset();
        for &(ipa, len) in &unmap {
            let _ = s2.unmap(ipa, len);
        }
        for slot in &home {
            if let Err(e) = s2.map(slot.page, slot.page, slot.len, MemType::Device) {
                log::error!("{}: {} BAR{}: {e}", self.config.name, slot.bdf, slot.bar);
            }
        }
        drop(s2);
        drop(maps);
        self.bar_moves.store(0, Ordering::Relaxed);
        if !home.is_empty() {
            self.invalidate_tlbs();
        }
    }

    /// A trapped guest access at `ipa` inside its PCI windows that its stage 2 does not map:
    /// forwarded to the function whose BAR the guest placed there (its virtual ECAM decides:
    /// inside one of the VM's own BARs, wholly, with decoding on), or `None` (absent: the
    /// access faults). I/O BARs are served here always, memory BARs when the guest placed them
    /// where they cannot be mapped.
    pub fn forward_pci(
        &self,
        ipa: u64,
        width: crate::mmio::AccessWidth,
        write: Option<u64>,
    ) -> Option<u64> {
        let pci = self.pci.as_ref()?;
        let w = pci.windows.iter().find(|w| {
            ipa >= w.cpu_base
                && ipa - w.cpu_base < w.size
                && w.space != crate::pci::PciSpace::Config
        })?;
        let bus = (ipa - w.cpu_base).checked_add(w.pci_base)?;
        let io = w.space == crate::pci::PciSpace::Io;
        let host = super::hv().iommu.host.as_ref()?;
        let ecam = super::iommu::Ecam::new(host);
        let phys = pci.vecam.lock().resolve(&ecam, io, bus, width.bytes())?;
        Some(super::iommu::forward_access(phys, width, write))
    }

    /// Drops every TLB entry of the VM's VMID, in the CPUs and in the SMMU (after a stage-2
    /// change).
    pub fn invalidate_tlbs(&self) {
        super::sysreg::tlbi_vmid(self.vttbr);
        super::iommu::invalidate_vm_tlbs(self.vmid);
    }

    /// The VM's RAM, for the device models that read or write it.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
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
        self.config.devices.intx.iter().any(|&(_, _, i)| i == intid)
    }

    /// vCPU index with the given MPIDR.
    pub fn vcpu_by_mpidr(&self, mpidr: u64) -> Option<usize> {
        self.vcpus
            .iter()
            .position(|v| v.mpidr == mpidr & 0xff_00ff_ffff)
    }
}
