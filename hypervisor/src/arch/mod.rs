//! Everything that runs only on the real (or emulated) machine at EL2: boot sequence, physical
//! devices, the vCPU run loop. Built only for `aarch64-unknown-none-softfloat`.

pub mod gic;
pub mod guest_mem;
pub mod hw;
pub mod iommu;
pub mod iopt;
pub mod its;
pub mod mmio;
pub mod mmu;
pub mod sysreg;
pub mod uart;
pub mod vcpu;

use crate::config;
use crate::hw::PhysAddr;
use crate::monitor::RefusedVm;
use crate::platform::{MemRange, ModuleKind, Platform, PsciConduit};
use crate::vm::{BootImage, SmmuFacts, Vm, VmConfig};
use aarch64_cpu::registers::{Readable, Writeable, CNTFRQ_EL0, CNTPCT_EL0, MPIDR_EL1, TPIDR_EL2};
use alloc::string::String;
use alloc::vec::Vec;
use boot::MAX_CPUS;
use buddy_system_allocator::LockedHeap;
use core::sync::atomic::{AtomicUsize, Ordering};
use gic::Gic;
use hw::Machine;
use spin::Once;
use vcpu::Binding;

const HEAP_SIZE: usize = 16 << 20;
const GIB: u64 = 1 << 30;
/// RAM given to each VM when the configuration does not say.
const DEFAULT_VM_RAM: u64 = GIB;
/// vCPUs given to the VM when the configuration does not say.
const DEFAULT_VCPUS: usize = 2;

#[global_allocator]
static ALLOCATOR: LockedHeap<32> = LockedHeap::empty();

/// The hypervisor heap's bytes in use (as the allocator rounds them) and its size.
pub fn heap_usage() -> (usize, usize) {
    let heap = ALLOCATOR.lock();
    (heap.stats_alloc_actual(), heap.stats_total_bytes())
}

#[repr(C, align(4096))]
struct HeapSpace([u8; HEAP_SIZE]);
static mut HEAP_SPACE: HeapSpace = HeapSpace([0; HEAP_SIZE]);

extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __image_end: u8;
}

/// A physical CPU.
#[derive(Debug)]
pub struct CpuInfo {
    /// Its MPIDR affinity.
    pub mpidr: u64,
    /// Its redistributor index, set when it comes up.
    redist: AtomicUsize,
    /// The vCPU pinned to it, if any.
    pub binding: Option<Binding>,
}

impl CpuInfo {
    /// Its GIC redistributor index.
    pub fn redist(&self) -> usize {
        self.redist.load(Ordering::Acquire)
    }
}

/// The hypervisor's global state, built once by the primary CPU.
#[derive(Debug)]
pub struct Hv {
    /// What the DT says about the machine.
    pub platform: Platform,
    /// The physical GIC.
    pub gic: Gic,
    /// Physical CPUs, by logical index (0 = boot CPU).
    pub cpus: Vec<CpuInfo>,
    /// The VMs.
    pub vms: Vec<Vm>,
    /// The VMs the configuration asked for that were not built, with the reasons logged.
    pub refused: Vec<RefusedVm>,
    /// The physical SMMU's and PCI's state.
    pub iommu: iommu::Iommu,
    /// The physical ITS and LPIs, if the machine has a usable ITS.
    pub its: its::Its,
}

static HV: Once<Hv> = Once::new();

/// The global state (after boot).
pub fn hv() -> &'static Hv {
    HV.get()
        .expect("hypervisor state is initialised before any CPU runs a vCPU")
}

/// Logical index of the calling CPU (kept in TPIDR_EL2).
pub fn this_cpu() -> usize {
    TPIDR_EL2.get() as usize
}

/// Milliseconds since the counter started (boot-time figures in the log).
pub fn timestamp_ms() -> u64 {
    CNTPCT_EL0.get() * 1000 / CNTFRQ_EL0.get().max(1)
}

static CONDUIT: Once<PsciConduit> = Once::new();

/// The command line's `ram-zero=` (every VM's).
static RAM_ZEROING: Once<crate::platform::RamZeroing> = Once::new();

/// Powers the machine off through PSCI; never returns.
pub fn system_off() -> ! {
    match CONDUIT.get() {
        Some(PsciConduit::Hvc) => {
            let _ = smccc::psci::system_off::<smccc::Hvc>();
        }
        _ => {
            let _ = smccc::psci::system_off::<smccc::Smc>();
        }
    }
    loop {
        sysreg::wfi();
    }
}

#[no_mangle]
extern "C" fn hv_primary_main(dtb: usize, image_base: usize) -> ! {
    TPIDR_EL2.set(0);
    // SAFETY: HEAP_SPACE is used by nothing but the allocator, initialised once here.
    unsafe {
        ALLOCATOR
            .lock()
            .init(core::ptr::addr_of_mut!(HEAP_SPACE) as usize, HEAP_SIZE);
    }
    // SAFETY: x0 holds the DTB the loader placed in RAM; its header gives its size.
    let dtb_slice = unsafe {
        let header = core::slice::from_raw_parts(dtb as *const u8, 8);
        let size = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        core::slice::from_raw_parts(dtb as *const u8, size.min(2 << 20))
    };
    let platform = match Platform::parse(dtb_slice) {
        Ok(p) => p,
        Err(e) => system_off_early(dtb_slice, &e),
    };
    // SAFETY: the DT names this UART as the console, of this kind; the MMU is off (device
    // accesses).
    unsafe { uart::init(platform.uart.base.base, platform.uart.kind) };
    let _ = log::set_logger(&uart::Logger);
    // The command line's `loglvl=` (docs/vm-config.md), else info.
    let (hv_opts, hv_warnings) = config::hv_options(dtb_slice).unwrap_or_default();
    log::set_max_level(hv_opts.log_level.unwrap_or(log::LevelFilter::Info));
    RAM_ZEROING.call_once(|| hv_opts.ram_zero.unwrap_or_default());
    for w in hv_warnings {
        log::warn!("bootargs: {w}");
    }
    if let Some(note) = &platform.uart.note {
        log::warn!("console: {note}");
    }
    if let Some(c) = platform.psci {
        CONDUIT.call_once(|| c);
    }

    let image_start = core::ptr::addr_of!(__image_start) as u64;
    let text_end = core::ptr::addr_of!(__text_end) as u64;
    let image_end = core::ptr::addr_of!(__image_end) as u64;
    let ram: Vec<(u64, u64)> = platform.memory.iter().map(|m| (m.base, m.size)).collect();
    let gic_info = platform.gic.clone();
    let host_bridges = pick_host_bridges(dtb_slice);
    let mut devices = alloc::vec![
        (gic_info.gicd.base, gic_info.gicd.size),
        (platform.uart.base.base, platform.uart.base.size.max(0x1000)),
    ];
    devices.extend(gic_info.gicr.iter().map(|r| (r.base, r.size)));
    // An ITS's control frame (GITS_*); the translation frame is for devices' MSI writes only.
    devices.extend(
        gic_info
            .its
            .iter()
            .filter(|i| i.refused.is_none())
            .map(|i| (i.regs.base, 0x1_0000)),
    );
    // Only the SMMUs the hypervisor may drive: the others' registers are never touched.
    devices.extend(
        platform
            .smmus
            .iter()
            .filter(|s| s.refused.is_none())
            .map(|s| (s.regs.base, s.regs.size)),
    );
    let mut forwardable = Vec::new();
    for (_, _, h) in &host_bridges {
        devices.push((h.ecam.base, h.ecam.size));
        // The windows a VM's trapped PCI accesses are forwarded into (I/O BARs, and memory
        // BARs a guest placed where they cannot be mapped): only those its IPA space reaches.
        for w in h.windows.iter().filter(|w| {
            w.space != crate::pci::PciSpace::Config
                && w.cpu_base
                    .checked_add(w.size)
                    .is_some_and(|e| e <= 1 << crate::stage2::IPA_BITS)
        }) {
            devices.push((w.cpu_base, w.size));
            forwardable.push(MemRange {
                base: w.cpu_base,
                size: w.size,
            });
        }
    }
    // SAFETY: first call, MMU off; the layout covers all RAM (image, stacks, heap, DTB,
    // modules) and every device the hypervisor touches.
    if let Err(e) = unsafe {
        mmu::init_primary(&mmu::Layout {
            ram: &ram,
            text: (image_start, text_end),
            devices: &devices,
        })
    } {
        panic!("EL2 page tables: {e:?}");
    }
    log::info!(
        "smmu-hv {} at EL2: image {image_base:#x}..{image_end:#x} ({} KiB), DTB at {dtb:#x}, {} CPUs, PSCI via {:?}",
        env!("CARGO_PKG_VERSION"),
        (image_end - image_start) / 1024,
        platform.cpus.len(),
        platform.psci
    );

    // SAFETY: the DT's GIC ranges, mapped as device memory above.
    let gic = unsafe { Gic::new(&gic_info) };
    if let Err(e) = gic.init_distributor() {
        panic!("GIC distributor: {e}");
    }
    iommu::set_forwardable(forwardable);
    let iommu = iommu::init(&platform.smmus, &host_bridges);

    // Logical CPU 0 is the boot CPU; the others follow in DT order.
    let boot_mpidr = MPIDR_EL1.get() & 0xff_00ff_ffff;
    let mut mpidrs = Vec::with_capacity(platform.cpus.len());
    mpidrs.push(boot_mpidr);
    mpidrs.extend(platform.cpus.iter().copied().filter(|&m| m != boot_mpidr));
    if mpidrs.len() > MAX_CPUS {
        log::error!(
            "the DT describes {} CPUs; this build drives at most {MAX_CPUS} (boot::MAX_CPUS): the CPUs with MPIDRs {:#x?} stay off",
            mpidrs.len(),
            &mpidrs[MAX_CPUS..]
        );
        mpidrs.truncate(MAX_CPUS);
    }

    let busy = busy_ranges(
        &platform,
        image_start,
        image_end,
        dtb as u64,
        dtb_slice.len() as u64,
    );
    let hypervisor = MemRange {
        base: image_start,
        size: image_end - image_start,
    };
    // The ITS before the VMs: a VM gets a vITS only over an ITS that is driven. Its Device
    // table covers every function on the machine (a few KiB on QEMU), not only the assigned
    // ones, so which VM takes what never depends on the probe order.
    let its_phandle = gic_info
        .its
        .iter()
        .find(|i| i.refused.is_none())
        .and_then(|i| i.phandle);
    let its = its::init(
        &gic_info.its,
        &gic,
        mpidrs.len(),
        max_device_id(&iommu, its_phandle),
    );
    let (vms, refused) = match build_vms(
        &platform, dtb_slice, &mpidrs, &busy, hypervisor, &iommu, &its,
    ) {
        Ok(v) => v,
        Err(e) => {
            log::error!("no VM could be built: {e}");
            system_off();
        }
    };
    // The delivery path of each VM's MSIs, chosen once: GICv4.0 direct injection when the
    // machine has it, list registers otherwise.
    for vm in &vms {
        if let Some(v) = &vm.its {
            let pcpus: Vec<usize> = vm.vcpus.iter().map(|c| c.pcpu).collect();
            v.set_direct(its::create_direct(
                &its,
                &gic,
                &mpidrs,
                vm.id,
                &vm.config.name,
                &pcpus,
            ));
        }
    }
    let cpus = mpidrs
        .iter()
        .enumerate()
        .map(|(i, &mpidr)| CpuInfo {
            mpidr,
            redist: AtomicUsize::new(0),
            binding: vms.iter().enumerate().find_map(|(vmi, vm)| {
                vm.vcpus
                    .iter()
                    .position(|s| s.pcpu == i)
                    .map(|vcpu| Binding { vm: vmi, vcpu })
            }),
        })
        .collect();
    iommu::dump_stream_table(iommu.groups(), &iommu.directory);
    banner(
        dtb_slice,
        &platform,
        mpidrs.len(),
        &iommu,
        &its,
        &vms,
        &refused,
    );
    uart::set_vms(
        vms.iter().map(|v| v.config.name.clone()).collect(),
        vms.iter().map(|v| v.prefix.clone()).collect(),
    );
    HV.call_once(|| Hv {
        iommu,
        platform,
        gic,
        cpus,
        vms,
        refused,
        its,
    });
    cpu_common_init(0);

    log::info!("platform up at {} ms", timestamp_ms());
    // Each VM's images are loaded by the CPU of its vCPU 0, so VMs come up in parallel.
    for vm in &hv().vms {
        vm.request_boot(&Machine);
    }

    // Secondaries read the image (page tables, statics) with their MMU off at first.
    sysreg::clean_dcache_range(image_start as usize, (image_end - image_start) as usize);
    for (i, &mpidr) in mpidrs.iter().enumerate().skip(1) {
        let entry = boot::secondary_entry_addr() as u64;
        let r = match CONDUIT.get() {
            Some(PsciConduit::Hvc) => smccc::psci::cpu_on::<smccc::Hvc>(mpidr, entry, i as u64),
            _ => smccc::psci::cpu_on::<smccc::Smc>(mpidr, entry, i as u64),
        };
        if let Err(e) = r {
            log::error!("CPU {i} (MPIDR {mpidr:#x}) did not start: {e}");
        }
    }
    log::info!("boot done at {} ms", timestamp_ms());
    if crate::vm::lifecycle::all_stopped_for_good(hv().vms.iter().map(|v| &v.life)) {
        log::error!("no VM is running: powering off");
        system_off();
    }
    vcpu::run_bound_vcpu();
}

/// The boot banner: the hypervisor, the machine, its SMMUs and ITSs, and the VMs accepted and
/// refused, in one block the operator reads at a glance (the detail is in the lines before).
fn banner(
    dtb: &[u8],
    p: &Platform,
    cpus: usize,
    iommu: &iommu::Iommu,
    its: &its::Its,
    vms: &[Vm],
    refused: &[RefusedVm],
) {
    let fdt = fdt::Fdt::new(dtb).ok();
    let root = fdt.as_ref().and_then(|f| f.find_node("/"));
    let board = root
        .and_then(|n| n.property("model"))
        .and_then(|m| m.as_str())
        .or_else(|| {
            root.and_then(|n| n.compatible())
                .and_then(|c| c.all().next())
        })
        .unwrap_or("an unnamed board");
    let ram: Vec<(u64, u64)> = p.memory.iter().map(|m| (m.base, m.size)).collect();
    let driven = its.unit.as_ref().map(|u| u.0.as_str());
    let its_lines: Vec<String> = p
        .gic
        .its
        .iter()
        .map(|i| match (&i.refused, driven == Some(i.path.as_str())) {
            (Some(why), _) => alloc::format!("{}: not used: {why}", i.path),
            (None, true) => alloc::format!(
                "{}: driven: a vITS per VM, MSIs by {}",
                i.path,
                if its.gicv4 {
                    "GICv4.0 direct injection"
                } else {
                    "list registers"
                }
            ),
            (None, false) => alloc::format!("{}: not used (see above)", i.path),
        })
        .collect();
    let rows: Vec<crate::monitor::VmRow> = vms.iter().map(vcpu::monitor_row).collect();
    let lines = crate::monitor::banner_lines(
        &crate::monitor::Machine {
            version: env!("CARGO_PKG_VERSION"),
            board,
            cpus,
            ram: &ram,
            smmus: &iommu.summary,
            its: &its_lines,
        },
        &rows,
        refused,
    );
    for l in lines {
        uart::print_hv(format_args!("{l}"));
    }
}

#[no_mangle]
extern "C" fn hv_secondary_main(cpu: usize) -> ! {
    TPIDR_EL2.set(cpu as u64);
    // SAFETY: a secondary with its MMU off; the primary built the map and cleaned the image.
    unsafe { mmu::init_secondary() };
    cpu_common_init(cpu);
    vcpu::run_bound_vcpu();
}

/// Per-CPU set-up: GIC redistributor and CPU interface, the interrupts the hypervisor takes.
fn cpu_common_init(cpu: usize) {
    let hv = hv();
    let info = &hv.cpus[cpu];
    match hv.gic.init_cpu(info.mpidr) {
        Ok(idx) => info.redist.store(idx, Ordering::Release),
        Err(e) => panic!("GIC on CPU {cpu}: {e}"),
    }
    let rd = info.redist();
    its::init_cpu(&hv.its, &hv.gic, cpu, rd);
    hv.gic
        .set_private_enabled(rd, crate::vm::irq::KICK_SGI.0, true);
    hv.gic
        .set_private_enabled(rd, hv.platform.gic.maintenance_ppi, true);
    if cpu == 0 {
        if let Some(intid) = hv.platform.uart.intid {
            uart::enable_rx_irq();
            hv.gic.enable_spi(intid, info.mpidr);
        }
        // The SMMUs' wired interrupts are edge-triggered (QEMU pulses them).
        for intid in iommu::smmu_irqs() {
            hv.gic.enable_spi_with(intid, info.mpidr, true);
        }
    }
}

/// The largest DeviceID a function of the machine sends its MSIs with to the ITS with phandle
/// `its_phandle` (through its bridge's `msi-map`): the Device table is sized for it rather
/// than for all of Devbits. 0 when no function has one.
fn max_device_id(iommu: &iommu::Iommu, its_phandle: Option<u32>) -> u32 {
    let Some(its) = its_phandle else {
        return 0;
    };
    iommu
        .segments
        .iter()
        .flat_map(|seg| {
            seg.topology
                .devices
                .iter()
                .filter_map(|f| seg.bridge.device_id(f.bdf.rid()))
        })
        .filter(|&(ph, _)| ph == its)
        .map(|(_, devid)| devid)
        .max()
        .unwrap_or(0)
}

/// The host bridges the hypervisor takes: every generic ECAM one, each with its DT path and
/// PCI domain (`pci::segments::domains`). Every other host bridge node is named with why it is
/// left alone, so that a function behind it, which can then never be assigned, is not a silent
/// surprise; so is a generic one whose domain repeats another's or whose ECAM window or address
/// windows overlap an earlier one's (one address would be two devices).
fn pick_host_bridges(dtb: &[u8]) -> Vec<(String, u16, crate::pci::HostBridge)> {
    let nodes = match crate::pci::host_bridges(dtb) {
        Ok(n) => n,
        Err(e) => {
            log::error!("pci: the DT's host bridges cannot be read: {e}");
            return Vec::new();
        }
    };
    let (taken, left) = crate::pci::segments::choose(nodes);
    for (path, why) in &left {
        log::warn!("pci: {path}: not driven: {why}; its functions cannot be assigned");
    }
    for (path, domain, b) in &taken {
        log::info!(
            "pci: host bridge {path}: domain {domain:04x}, buses {:02x}-{:02x}, ECAM {:#x}+{:#x}",
            b.bus_start,
            b.bus_end,
            b.ecam.base,
            b.ecam.size
        );
    }
    taken
}

/// Everything guest RAM must not overlap besides the boot modules (the planner checks those):
/// the hypervisor image, the DTB and reserved memory.
fn busy_ranges(
    p: &Platform,
    image_start: u64,
    image_end: u64,
    dtb: u64,
    dtb_len: u64,
) -> Vec<MemRange> {
    let mut busy = Vec::new();
    busy.push(MemRange {
        base: image_start,
        size: image_end - image_start,
    });
    busy.push(MemRange {
        base: dtb,
        size: dtb_len,
    });
    busy.extend(p.reserved.iter().copied());
    busy
}

/// Why no VM can be built at all (a single VM's fault refuses only that VM).
#[derive(Debug, thiserror::Error)]
enum BuildError {
    /// /chosen cannot be read for VM nodes.
    #[error("VM configuration: {0}")]
    Config(crate::platform::PlatformError),
    /// Neither VM nodes nor a kernel module to make the one default VM of.
    #[error("no smmu-hv,vm node and no multiboot,kernel module in /chosen")]
    NoVm,
    /// Every VM was refused (each with its own error, logged).
    #[error("no VM has a usable configuration")]
    AllRefused,
}

/// The VMs the DT describes (`smmu-hv,vm` nodes under /chosen, see docs/vm-config.md). A VM
/// whose configuration is wrong is refused with an error naming it and the field; the others
/// are built. Without VM nodes, one VM is made from the /chosen boot modules (as QEMU's
/// guest-loader or a plain dom0-style boot provides them).
fn build_vms(
    p: &Platform,
    dtb: &[u8],
    mpidrs: &[u64],
    busy: &[MemRange],
    hypervisor: MemRange,
    iommu: &iommu::Iommu,
    its: &its::Its,
) -> Result<(Vec<Vm>, Vec<RefusedVm>), BuildError> {
    let specs = config::parse_vm_specs(dtb).map_err(BuildError::Config)?;
    let specs = if specs.is_empty() {
        legacy_spec(p)?
    } else {
        specs
    };
    let machine = config::Machine {
        cpus: mpidrs,
        ram: &p.memory,
        busy,
        hypervisor,
    };
    let (plans, errors) = config::plan_vms(specs, &machine);
    let mut refused = Vec::new();
    // Logged as each kind of refusal always was (docs/vm-config.md, the tests); kept for the
    // boot table and the monitor's `list`.
    let mut refuse = |name: &str, reason: String, logged: String| {
        log::error!("{logged}");
        refused.push(RefusedVm {
            name: name.into(),
            reason,
        });
    };
    for e in &errors {
        refuse(
            &e.vm,
            alloc::format!("`{}`: {}", e.field, e.reason),
            alloc::format!("config: {e}: VM not started"),
        );
    }
    let mut vms = Vec::new();
    let mut assigned: Vec<(String, Vec<crate::pci::PciAddr>)> = Vec::new();
    for plan in plans {
        let id = vms.len();
        // MSIs need an ITS the machine has and the VM not asking for INTx only.
        let msi = its.its.is_some() && !plan.intx_only;
        let devices = match iommu.resolve(&plan.name, &plan.pci_devices, &assigned, msi) {
            Ok(d) => d,
            Err(e) => {
                refuse(
                    &plan.name,
                    alloc::format!("`smmu-hv,pci-devices`: {e}"),
                    alloc::format!(
                        "config: {}: `smmu-hv,pci-devices`: {e}: VM not started",
                        plan.name
                    ),
                );
                continue;
            }
        };
        let bootargs = plan
            .kernel
            .bootargs
            .clone()
            .unwrap_or_else(|| String::from("console=ttyAMA0"));
        let module = |r: MemRange| BootImage {
            range: r,
            // SAFETY: the boot modules are RAM the planner keeps clear of every VM and of the
            // heap, identity-mapped, never written: the pristine copies every boot loads from.
            bytes: unsafe { guest_mem::boot_module(r.base, r.size) },
        };
        let vm_config = VmConfig {
            name: plan.name.clone(),
            pcpus: plan.pcpus.clone(),
            ram_size: plan.ram_size,
            kernel: module(plan.kernel.range),
            initrd: plan.ramdisk.map(module),
            bootargs,
            devices,
            intx_only: plan.intx_only,
            iommu: plan.iommu,
            ram_zeroing: RAM_ZEROING.get().copied().unwrap_or_default(),
        };
        let units: Vec<usize> = vm_config.devices.smmus.iter().map(|u| u.unit).collect();
        let heap_before = ALLOCATOR.lock().stats_alloc_actual();
        let ram_ipa = MemRange {
            base: p.memory[0].base,
            size: plan.ram_size,
        };
        // SAFETY: `plan_vms` placed this RAM inside the machine's RAM, clear of the hypervisor,
        // the DTB, reserved memory, every boot module and every other VM's RAM.
        let ram = unsafe { guest_mem::PhysRam::new(ram_ipa, PhysAddr(plan.ram_pa)) };
        let ram = alloc::boxed::Box::new(ram);
        let smmus: Vec<SmmuFacts> = units
            .iter()
            .filter_map(|&unit| {
                let (info, oas_bits, phys) = iommu::facts(unit)?;
                p.smmus.get(info).map(|info| SmmuFacts {
                    unit,
                    info,
                    oas_bits,
                    phys,
                })
            })
            .collect();
        let host_bridges: Vec<&crate::pci::HostBridge> =
            iommu.segments.iter().map(|s| &s.bridge).collect();
        let its_facts = vm_its_facts(its, iommu, &vm_config.devices);
        let vm = match Vm::new(
            id,
            vm_config,
            p,
            ram,
            PhysAddr(plan.ram_pa),
            &crate::vm::VmMachine {
                host_bridges: &host_bridges,
                smmus: &smmus,
                its: its_facts.as_ref().filter(|_| msi),
                viommu: Some(&iopt::Factory),
            },
        ) {
            Ok(vm) => vm,
            Err(e) => {
                refuse(
                    &plan.name,
                    alloc::format!("{e}"),
                    alloc::format!("{}: not started: {e}", plan.name),
                );
                continue;
            }
        };
        let d = &vm.config.devices;
        if !d.is_empty() {
            // Every SMMU its functions sit behind translates them through its stage 2, or the VM
            // does not start.
            let attached = if d.smmus.is_empty() {
                Err(iommu::DeviceError::NoSmmu)
            } else {
                d.smmus.iter().try_for_each(|u| {
                    iommu::attach_stage2(
                        &vm.config.name,
                        u.unit,
                        &u.stream_ids,
                        vm.vmid,
                        vm.s2_root,
                    )
                })
            };
            if let Err(e) = attached {
                refuse(
                    &plan.name,
                    alloc::format!("its devices cannot be confined: {e}"),
                    alloc::format!(
                        "{}: not started: its devices cannot be confined: {e}",
                        plan.name
                    ),
                );
                continue;
            }
            let streams: Vec<String> = d
                .smmus
                .iter()
                .map(|u| alloc::format!("{:?} on {}", u.stream_ids, iommu::unit_path(u.unit)))
                .collect();
            let groups: Vec<usize> = d.groups().collect();
            for seg in &d.segments {
                for f in &seg.devices.functions {
                    log::info!(
                        "{}: assigned {} (IOMMU groups {groups:?}, StreamIDs {})",
                        plan.name,
                        crate::pci::PciAddr::new(seg.domain, f.bdf),
                        streams.join(", ")
                    );
                }
            }
            // Its functions start quiesced: no DMA until the guest enables it, and INTx
            // Disable set, which a function assigned MSI-only keeps (its vECAM holds it):
            // it must not raise the line another VM's function has.
            vm.quiesce_functions(|segment| iommu.ecam(segment));
            assigned.push((plan.name.clone(), plan.pci_devices.clone()));
        }
        // A statement of its own: the allocator's lock guard must be gone before the log line
        // allocates.
        let used = ALLOCATOR.lock().stats_alloc_actual() - heap_before;
        log::info!(
            "{}: hypervisor heap for its stage-2 tables and device models: {} KiB",
            plan.name,
            used.div_ceil(1024)
        );
        vms.push(vm);
    }
    if vms.is_empty() {
        return Err(BuildError::AllRefused);
    }
    Ok((vms, refused))
}

/// The driven ITS as a VM with `devices` would see it: the DeviceID each of its functions' MSIs
/// carry there (their host bridges' `msi-map`s), if any. `None` without a driven ITS.
fn vm_its_facts(
    its: &its::Its,
    iommu: &iommu::Iommu,
    devices: &crate::pci::VmPciDevices,
) -> Option<crate::vm::its::ItsFacts> {
    let driver = its.its.as_ref()?;
    let phandle = its.unit.as_ref().and_then(|u| u.1);
    let functions = devices
        .segments
        .iter()
        .filter_map(|sd| Some((sd, &iommu.segments.get(sd.segment)?.bridge)))
        .flat_map(|(sd, bridge)| {
            sd.devices.functions.iter().map(move |f| {
                let id = bridge
                    .device_id(f.bdf.rid())
                    .filter(|&(ph, _)| Some(ph) == phandle)
                    .map(|(_, id)| id);
                (sd.segment, f.bdf, id)
            })
        })
        .collect();
    Some(crate::vm::its::ItsFacts {
        index: 0,
        base: driver.lock().base(),
        phandle,
        functions,
    })
}

/// One VM on the first CPUs from the /chosen kernel and ramdisk modules.
fn legacy_spec(
    p: &Platform,
) -> Result<Vec<Result<config::VmSpec, config::ConfigError>>, BuildError> {
    let kernel = p
        .modules
        .iter()
        .find(|m| m.kind == ModuleKind::Kernel)
        .ok_or(BuildError::NoVm)?;
    let ramdisk = p
        .modules
        .iter()
        .find(|m| m.kind == ModuleKind::Ramdisk)
        .map(|m| m.range);
    Ok(alloc::vec![Ok(config::VmSpec {
        name: String::from("vm0"),
        vcpus: DEFAULT_VCPUS.min(p.cpus.len()) as u32,
        pcpus: None,
        mem_size: DEFAULT_VM_RAM,
        static_mem: None,
        kernel: Some(config::ModuleSpec {
            range: kernel.range,
            bootargs: kernel.bootargs.clone().or_else(|| p.bootargs.clone()),
        }),
        ramdisk,
        pci_devices: Vec::new(),
        intx_only: false,
        iommu: crate::config::IommuKind::default(),
        cpupool: None,
    })])
}

/// Powers off when the host DT cannot be used, having said why on its console if the DT
/// still names one the hypervisor can drive (found by `platform::early_console`, which needs
/// no more of the DT than the blob structure and `stdout-path`).
fn system_off_early(dtb: &[u8], error: &crate::platform::PlatformError) -> ! {
    if let Some((base, kind)) = crate::platform::early_console(dtb) {
        // SAFETY: the DT's stdout-path names a UART of this kind at `base`; the MMU is off, so
        // the access is a Device access.
        unsafe { uart::init(base, kind) };
        uart::print_hv(format_args!(
            "smmu-hv {}: the host device tree cannot be used: {error}; powering off",
            env!("CARGO_PKG_VERSION")
        ));
    }
    // QEMU and most firmware use SMC for PSCI; the DT that would say otherwise is unusable.
    let _ = smccc::psci::system_off::<smccc::Smc>();
    loop {
        sysreg::wfi();
    }
}

static PANICKING: AtomicUsize = AtomicUsize::new(0);

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if PANICKING.fetch_add(1, Ordering::AcqRel) == 0 {
        // The console lock may be held by the code that panicked on this CPU.
        for _ in 0..1_000_000 {
            if !uart::CONSOLE.is_locked() {
                break;
            }
        }
        if uart::CONSOLE.is_locked() {
            // SAFETY: the holder is stuck (it panicked or is spinning on us); the machine is
            // going down and this is the last output.
            unsafe { uart::CONSOLE.force_unlock() };
        }
        uart::print_hv(format_args!("PANIC on CPU {}: {info}", this_cpu()));
    }
    system_off();
}
