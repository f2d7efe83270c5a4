//! A whole VM on the fake machine: building it, loading its images, its lifecycle, its MMIO bus
//! and interrupt delivery.

use super::bus::{route, Target};
use super::irq::{self, VmIrqs, KICK_SGI, VTIMER_PPI};
use super::lifecycle::Power;
use super::*;
use crate::devices::vgic::regs::*;
use crate::devices::IrqPort;
use crate::hw::fake::{FakeHw, FakeRam, HwOp};
use crate::hw::IntId;
use crate::mmio::AccessWidth::Word;
use crate::pci::fake::FakeConfigSpace;
use crate::pci::{Bdf, IntxPin, SegmentDevices, VmDevices};

const QEMU_DTB: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
const RAM_SIZE: u64 = 64 << 20;
const KERNEL_PA: u64 = 0x4800_0000;

fn platform() -> Platform {
    Platform::parse(QEMU_DTB).unwrap()
}

/// A 1 MiB arm64 Image whose bytes after the header count up.
fn kernel() -> BootImage {
    let mut bytes = alloc::vec![0u8; 1 << 20];
    bytes[16..24].copy_from_slice(&(2u64 << 20).to_le_bytes()); // image_size
    bytes[56..60].copy_from_slice(b"ARM\x64");
    for (i, b) in bytes.iter_mut().enumerate().skip(64) {
        *b = i as u8;
    }
    BootImage {
        range: MemRange {
            base: KERNEL_PA,
            size: bytes.len() as u64,
        },
        bytes: alloc::boxed::Box::leak(bytes.into_boxed_slice()),
    }
}

/// `devices` as the functions of the one host bridge (segment 0, domain 0).
fn one_segment(devices: VmDevices) -> VmPciDevices {
    let smmus = devices.smmus.clone();
    VmPciDevices {
        segments: if devices.functions.is_empty() && devices.intx.is_empty() {
            Vec::new()
        } else {
            alloc::vec![SegmentDevices {
                segment: 0,
                domain: 0,
                devices,
            }]
        },
        smmus,
    }
}

fn config(devices: VmDevices) -> VmConfig {
    VmConfig {
        name: "vm7".into(),
        pcpus: alloc::vec![2, 3],
        ram_size: RAM_SIZE,
        kernel: kernel(),
        initrd: Some(BootImage {
            range: MemRange {
                base: 0x4900_0000,
                size: 4,
            },
            bytes: b"cpio",
        }),
        bootargs: "console=ttyAMA0".into(),
        devices: one_segment(devices),
        intx_only: false,
        iommu: crate::config::IommuKind::default(),
        ram_zeroing: crate::platform::RamZeroing::default(),
    }
}

fn vm_with(devices: VmDevices) -> Vm {
    let p = platform();
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    Vm::new(
        0,
        config(devices),
        &p,
        ram,
        PhysAddr(0x8000_0000),
        &VmMachine::default(),
    )
    .unwrap()
}

fn vm() -> Vm {
    vm_with(VmDevices::default())
}

/// The physical SMMU a VM without a vSMMU never touches.
#[derive(Debug)]
struct NoSmmu;

impl smmu::vsmmu::PhysicalSmmu for NoSmmu {
    fn write_ste(
        &mut self,
        _: u32,
        _: smmu::ste::Ste,
    ) -> Result<smmu::driver::SteWrite, smmu::driver::DriverError> {
        unreachable!("no vSMMU")
    }
    fn make_ste(
        &mut self,
        _: smmu::driver::SteBreak,
    ) -> Result<smmu::cmd::Command, smmu::driver::DriverError> {
        unreachable!("no vSMMU")
    }
    fn submit(&mut self, _: &[smmu::cmd::Command]) -> Result<(), smmu::driver::DriverError> {
        unreachable!("no vSMMU")
    }
    fn submit_sync(
        &mut self,
        _: &[smmu::cmd::Command],
    ) -> Result<smmu::driver::SyncTicket, smmu::driver::DriverError> {
        unreachable!("no vSMMU")
    }
    fn publish(&self) {}
    fn wait(&self, _: smmu::driver::SyncTicket) -> Result<(), smmu::driver::DriverError> {
        unreachable!("no vSMMU")
    }
    fn now(&self) -> Option<u64> {
        None
    }
    fn wait_until(&self, _: u64) {}
}

#[test]
fn load_places_the_images_and_writes_a_device_tree_naming_the_vm() {
    let vm = vm();
    let hw = FakeHw::new(2, 4);
    let (entry, dtb) = vm.load(&hw, |_| NoSmmu).unwrap();
    assert_eq!(entry, Ipa(vm.ram_ipa.base));
    assert_eq!(
        dtb,
        Ipa(vm.ram_ipa.base + (2 << 20)),
        "the 2 MiB block after image_size"
    );
    let mut k = [0u8; 64];
    vm.ram().read(Ipa(entry.get() + 1000), &mut k).unwrap();
    assert_eq!(k[0], 1000u32 as u8, "the kernel's bytes, in place");
    let mut i = [0u8; 4];
    vm.ram().read(Ipa(dtb.get() + (2 << 20)), &mut i).unwrap();
    assert_eq!(&i, b"cpio", "the initramfs in the block after the DTB");
    let mut d = alloc::vec![0u8; 4096];
    vm.ram().read(dtb, &mut d).unwrap();
    assert_eq!(&d[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
    let fdt = fdt::Fdt::new(&d).unwrap();
    assert_eq!(
        fdt.chosen().bootargs(),
        Some("console=ttyAMA0"),
        "the VM's command line"
    );
    assert_eq!(fdt.cpus().count(), 2);
    assert_eq!(vm.boots.load(Ordering::Acquire), 1);
}

/// A VM over RAM that firmware left full of 0xa5 (every block stale), with `devices`; the
/// test keeps a handle on the RAM to see what the machine holds.
fn vm_on_stale_ram(devices: VmDevices) -> (Vm, alloc::sync::Arc<FakeRam>) {
    vm_on_stale_ram_zeroing(devices, crate::platform::RamZeroing::default())
}

/// [`vm_on_stale_ram`] with `ram-zero=` `zeroing`.
fn vm_on_stale_ram_zeroing(
    devices: VmDevices,
    zeroing: crate::platform::RamZeroing,
) -> (Vm, alloc::sync::Arc<FakeRam>) {
    let p = platform();
    let ram = alloc::sync::Arc::new(FakeRam::stale(p.memory[0].base, RAM_SIZE as usize, 0xa5));
    let vm = Vm::new(
        0,
        VmConfig {
            ram_zeroing: zeroing,
            ..config(devices)
        },
        &p,
        alloc::boxed::Box::new(ram.clone()),
        PhysAddr(0x8000_0000),
        &VmMachine::default(),
    )
    .unwrap();
    (vm, ram)
}

const BLOCK: u64 = crate::hw::scrub::BLOCK;

#[test]
fn ram_is_zeroed_before_first_use_in_every_boot_and_mapped_only_then() {
    let (vm, ram) = vm_on_stale_ram(VmDevices::default());
    let base = vm.ram_ipa.base;
    let mapped = |ipa: u64| vm.stage2.lock().lookup(ipa).is_some();
    assert!(!mapped(base), "nothing of RAM is mapped before a boot");
    let hw = FakeHw::new(2, 4);
    let (entry, dtb) = vm.load(&hw, |_| NoSmmu).unwrap();
    // The kernel (1 MiB of file, 2 MiB of image_size) fills block 0, the DT block 1, the
    // initramfs block 2: the loader zeroed what they do not cover there, nothing else.
    let zeroed = ram.zeroed_ranges();
    assert!(
        zeroed.iter().all(|&(a, l)| a + l <= base + 3 * BLOCK),
        "the loader zeroes only the images' blocks: {zeroed:x?}"
    );
    assert!(
        !zeroed
            .iter()
            .any(|&(a, l)| a < entry.get() + (1 << 20) && entry.get() < a + l),
        "the kernel's bytes are not zeroed before being written: {zeroed:x?}"
    );
    assert_eq!(ram.peek(Ipa(entry.get() + 1000), 1), [1000u32 as u8]);
    assert_eq!(
        ram.peek(Ipa(entry.get() + (1 << 20)), 4),
        [0; 4],
        "BSS zeroed"
    );
    assert_eq!(
        ram.peek(Ipa(dtb.get() + 0x10_0000), 4),
        [0; 4],
        "after the DT"
    );
    assert!(mapped(base) && mapped(dtb.get()) && mapped(base + 2 * BLOCK));
    let top = Ipa(vm.ram_ipa.end() - 16);
    assert!(!mapped(top.get()), "a block nothing wrote stays unmapped");
    assert_eq!(ram.peek(top, 4), [0xa5; 4], "and is not zeroed yet");
    let z = vm.ram_zeroing();
    assert_eq!(z.left, (RAM_SIZE / BLOCK) as usize - 3);
    assert_eq!(
        z.by(crate::hw::scrub::By::Loader),
        3 * BLOCK - (1 << 20) - 4 - dtb_len(&ram, dtb),
        "all of their blocks but the images' bytes"
    );

    // A vCPU's first access: zeroed, mapped, retried; what the DSB publishes.
    hw.take_ops();
    assert!(matches!(vm.ram_fault(top, true, &hw), ram::RamFault::Retry));
    assert!(mapped(top.get()));
    assert_eq!(ram.peek(Ipa(top.get() & !(BLOCK - 1)), 4), [0; 4]);
    assert_eq!(ram.peek(top, 16), [0; 16]);
    assert_eq!(hw.take_ops(), [HwOp::Stage2Published]);
    assert!(
        matches!(vm.ram_fault(top, true, &hw), ram::RamFault::Retry),
        "a fault another CPU's mapping answered is retried"
    );
    assert!(
        matches!(vm.ram_fault(top, false, &hw), ram::RamFault::NotRam),
        "a permission fault on RAM is not a lazy mapping"
    );
    assert!(matches!(
        vm.ram_fault(Ipa(0x0900_0000), true, &hw),
        ram::RamFault::NotRam
    ));

    // The hypervisor's own access to a stale block zeroes it first, leaving it unmapped.
    let mid = Ipa(base + 20 * BLOCK + 8);
    let mut b = [0xffu8; 8];
    vm.ram().read(mid, &mut b).unwrap();
    assert_eq!(b, [0; 8]);
    assert_eq!(
        ram.peek(Ipa(base + 21 * BLOCK - 8), 8),
        [0; 8],
        "the whole block"
    );
    assert!(!mapped(mid.get()));

    // The guest leaves a marker; its next boot (a reset) finds zeroes there.
    vm.ram().write(top, &[7; 16]).unwrap();
    hw.take_ops();
    vm.load(&hw, |_| NoSmmu).unwrap();
    assert!(!mapped(top.get()), "every block unmapped again");
    assert!(
        hw.take_ops().contains(&HwOp::TlbiVm(vm.vttbr)),
        "and the TLBs dropped"
    );
    assert_eq!(ram.peek(top, 16), [7; 16], "still in the machine");
    vm.ram().read(top, &mut b).unwrap();
    assert_eq!(b, [0; 8], "never seen by the next boot");
}

/// The DT's length as the loader wrote it (its header's totalsize).
fn dtb_len(ram: &FakeRam, dtb: Ipa) -> u64 {
    let h = ram.peek(Ipa(dtb.get() + 4), 4);
    u64::from(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
}

#[test]
fn idle_cpus_zero_ahead_only_when_asked_for_a_vm_with_devices_and_stop_when_told() {
    use crate::platform::RamZeroing;
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let mine = Bdf::new(0, 2, 0);
    let devices = || VmDevices {
        functions: alloc::vec![topo.device(mine).unwrap().clone()],
        ..VmDevices::default()
    };
    let hw = FakeHw::new(2, 4);
    for (d, z) in [
        (VmDevices::default(), RamZeroing::Idle),
        (devices(), RamZeroing::Lazy),
    ] {
        let (vm, _) = vm_on_stale_ram_zeroing(d, z);
        vm.load(&hw, |_| NoSmmu).unwrap();
        assert!(!vm.has_idle_zeroing());
        assert_eq!(vm.zero_idle(&hw, &mut || false), 0, "{z:?}: on demand only");
    }

    let (vm, ram) = vm_on_stale_ram_zeroing(devices(), RamZeroing::Idle);
    vm.load(&hw, |_| NoSmmu).unwrap();
    assert!(vm.has_idle_zeroing());
    let mut asked = 0;
    assert_eq!(
        vm.zero_idle(&hw, &mut || {
            asked += 1;
            asked > 2
        }),
        2,
        "asked before each block"
    );
    let n = (RAM_SIZE / BLOCK) as usize;
    assert_eq!(vm.zero_idle(&hw, &mut || false), n - 3 - 2);
    assert!(!vm.has_idle_zeroing());
    assert!((0..n as u64).all(|i| vm
        .stage2
        .lock()
        .lookup(vm.ram_ipa.base + i * BLOCK)
        .is_some()));
    assert_eq!(ram.peek(Ipa(vm.ram_ipa.end() - 4), 4), [0; 4]);
}

#[test]
fn an_eager_load_zeroes_and_maps_all_of_it_before_the_start() {
    let (vm, ram) =
        vm_on_stale_ram_zeroing(VmDevices::default(), crate::platform::RamZeroing::Eager);
    let hw = FakeHw::new(2, 4);
    vm.load(&hw, |_| NoSmmu).unwrap();
    let n = RAM_SIZE / BLOCK;
    assert!((0..n).all(|i| vm
        .stage2
        .lock()
        .lookup(vm.ram_ipa.base + i * BLOCK)
        .is_some()));
    assert_eq!(ram.peek(Ipa(vm.ram_ipa.end() - 4), 4), [0; 4]);
    assert_eq!(vm.ram_zeroing().left, 0);
    assert!(
        hw.take_ops().contains(&HwOp::Kick(3)),
        "the other vCPU's CPU helps"
    );
}

#[test]
fn bus_master_enable_waits_until_all_ram_is_zeroed_and_mapped() {
    use crate::pci::regs::command;
    use crate::pci::ConfigSpace;
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let mine = Bdf::new(0, 2, 0);
    let devices = VmDevices {
        functions: alloc::vec![topo.device(mine).unwrap().clone()],
        intx: alloc::vec![(mine, IntxPin::A, 37, (mine, IntxPin::A))],
        ..VmDevices::default()
    };
    let host = crate::pci::HostBridge::from_dtb(QEMU_DTB).unwrap().unwrap();
    let p = platform();
    let ram = alloc::sync::Arc::new(FakeRam::stale(p.memory[0].base, RAM_SIZE as usize, 0xa5));
    let vm = Vm::new(
        0,
        config(devices),
        &p,
        alloc::boxed::Box::new(ram.clone()),
        PhysAddr(0x8000_0000),
        &VmMachine {
            host_bridges: &[&host],
            ..VmMachine::default()
        },
    )
    .unwrap();
    let hw = FakeHw::new(2, 4);
    vm.load(&hw, |_| NoSmmu).unwrap();
    let mut c = Some(&mut cfg);
    vm.quiesce_functions(|_| c.take());
    // The guest's driver sets Memory Space and Bus Master Enable.
    let off = u64::from(mine.dev) << 15 | 0x04;
    let mut vecam = vm.pci[0].vecam.lock();
    vecam.write(&mut cfg, off, Word, 0x6);
    assert_eq!(
        cfg.read32(mine, 0x04) & command::BUS_MASTER,
        0,
        "held: the function cannot master DMA yet"
    );
    assert_eq!(
        vecam.read(&cfg, off, Word) & u64::from(command::BUS_MASTER),
        u64::from(command::BUS_MASTER),
        "the guest sees what it wrote"
    );
    assert!(vecam.take_dma_request());
    assert!(!vecam.take_dma_request(), "taken once");
    drop(vecam);
    assert!(!ram.zeroed_ranges().is_empty());
    hw.take_ops();
    let mut c = Some(&mut cfg);
    assert!(vm.open_dma(&hw, |_| c.take()).unwrap());
    let n = RAM_SIZE / BLOCK;
    assert!(
        (0..n).all(|i| vm
            .stage2
            .lock()
            .lookup(vm.ram_ipa.base + i * BLOCK)
            .is_some()),
        "every block mapped before the device may master"
    );
    assert_eq!(ram.peek(Ipa(vm.ram_ipa.end() - 4), 4), [0; 4], "and zeroed");
    let ops = hw.take_ops();
    assert!(
        ops.contains(&HwOp::SmmuTlbi(vm.vmid)),
        "the SMMU sees them: {ops:?}"
    );
    assert!(
        ops.contains(&HwOp::Kick(3)),
        "the idle vCPU is woken to help: {ops:?}"
    );
    assert_eq!(
        cfg.read32(mine, 0x04) & command::BUS_MASTER,
        command::BUS_MASTER,
        "let through"
    );
    // Open now: a later Bus Master Enable goes straight through.
    let mut vecam = vm.pci[0].vecam.lock();
    assert!(vecam.dma_open());
    vecam.write(&mut cfg, off, Word, 0x2);
    assert_eq!(cfg.read32(mine, 0x04) & command::BUS_MASTER, 0);
    vecam.write(&mut cfg, off, Word, 0x6);
    assert!(!vecam.take_dma_request());
    assert_eq!(
        cfg.read32(mine, 0x04) & command::BUS_MASTER,
        command::BUS_MASTER
    );
    drop(vecam);
    // A reset begun while a gate would wait: it gives up at once, still held.
    let mut c = Some(&mut cfg);
    vm.quiesce_functions(|_| c.take());
    vm.load(&hw, |_| NoSmmu).unwrap();
    vm.pci[0].vecam.lock().write(&mut cfg, off, Word, 0x6);
    assert!(vm.life.begin_reset());
    let mut c = Some(&mut cfg);
    assert!(
        !vm.open_dma(&hw, |_| c.take()).unwrap(),
        "given up for the reset"
    );
    assert_eq!(
        cfg.read32(mine, 0x04) & command::BUS_MASTER,
        0,
        "still held"
    );
    assert!(vm.life.finish_reset());
    // A reset: held again until the next boot's RAM is all zeroed.
    let mut c = Some(&mut cfg);
    vm.quiesce_functions(|_| c.take());
    vm.load(&hw, |_| NoSmmu).unwrap();
    let mut vecam = vm.pci[0].vecam.lock();
    vecam.write(&mut cfg, off, Word, 0x6);
    assert!(vecam.take_dma_request());
    assert_eq!(cfg.read32(mine, 0x04) & command::BUS_MASTER, 0);
}

#[test]
fn a_kernel_that_is_not_an_image_or_does_not_fit_is_refused_with_its_address() {
    let p = platform();
    let mut c = config(VmDevices::default());
    c.kernel.bytes = &[0u8; 64];
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let vm = Vm::new(0, c, &p, ram, PhysAddr(0), &VmMachine::default()).unwrap();
    let e = vm.load(&FakeHw::new(2, 4), |_| NoSmmu).unwrap_err();
    assert_eq!(
        e.to_string(),
        "kernel at 0x48000000: the kernel module is not an arm64 Image (bad magic)"
    );
    let mut c = config(VmDevices::default());
    c.ram_size = 3 << 20;
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, 3 << 20));
    let vm = Vm::new(0, c, &p, ram, PhysAddr(0), &VmMachine::default()).unwrap();
    assert!(matches!(
        vm.load(&FakeHw::new(2, 4), |_| NoSmmu),
        Err(VmError::Layout { .. })
    ));
}

#[test]
fn a_boot_request_wakes_vcpu0s_cpu_unless_it_is_the_caller() {
    let vm = vm();
    let hw = FakeHw::new(0, 4);
    vm.request_boot(&hw);
    assert_eq!(vm.vcpus[0].power.get(), Power::Boot);
    assert_eq!(hw.take_ops(), [HwOp::Kick(2)]);
    hw.set_cpu(2);
    vm.request_boot(&hw);
    assert!(hw.take_ops().is_empty());
}

#[test]
fn a_reset_waits_for_every_vcpu_to_park_and_gives_up_at_its_deadline() {
    let vm = vm();
    let hw = FakeHw::new(2, 4);
    vm.vcpus[0].power.set(Power::Off);
    vm.vcpus[1].power.set(Power::OnPending {
        entry: Ipa(0),
        context: 0,
        generation: 0,
    });
    assert_eq!(vm.wait_stopped_for_reset(&hw, 1000), Ok(()));
    assert_eq!(
        vm.vcpus[1].power.get(),
        Power::Off,
        "a CPU_ON never entered is cancelled"
    );
    vm.vcpus[1].power.set(Power::On);
    // 1 MHz counter, 1 tick per read: a 5 ms deadline is 5000 reads away.
    assert_eq!(vm.wait_stopped_for_reset(&hw, 5), Err(1));
    assert!(hw.counter() >= 5000, "it waited for the deadline, not less");
}

#[test]
fn stop_and_kick_reach_every_vcpu() {
    let vm = vm();
    let hw = FakeHw::new(2, 4);
    assert!(vm.stop());
    assert!(vm.is_stopped());
    assert!(!vm.stop(), "once");
    vm.kick_all(None, &hw);
    assert_eq!(hw.take_ops(), [HwOp::Kick(2), HwOp::Kick(3), HwOp::WakeAll]);
    // A reset from vCPU 1 kicks the others only.
    vm.kick_all(Some(1), &hw);
    assert_eq!(hw.take_ops(), [HwOp::Kick(2), HwOp::WakeAll]);
}

#[test]
fn quiesce_stops_dma_and_lines_of_the_vms_functions_only() {
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let mine = Bdf::new(0, 2, 0);
    let other = Bdf::new(0, 3, 0);
    for b in [mine, other] {
        // Memory Space + Bus Master on, as a guest driver leaves them.
        cfg.write32(b, 0x04, 0x6);
    }
    let devices = VmDevices {
        functions: alloc::vec![topo.device(mine).unwrap().clone()],
        intx: alloc::vec![(mine, IntxPin::A, 37, (mine, IntxPin::A))],
        ..VmDevices::default()
    };
    let vm = vm_with(devices);
    let hw = FakeHw::new(2, 4);
    let mut bridge0 = Some(&mut cfg);
    vm.quiesce_devices(|segment| bridge0.take().filter(|_| segment == 0), &hw);
    use crate::pci::ConfigSpace;
    assert_eq!(
        cfg.read32(mine, 0x04) & 0xffff,
        0x402,
        "BME off, INTx Disable on"
    );
    assert_eq!(
        cfg.read32(other, 0x04) & 0xffff,
        0x6,
        "another VM's function untouched"
    );
    assert_eq!(hw.take_ops(), [HwOp::DisableSpi(IntId(37))]);
}

#[test]
fn the_bus_routes_each_device_window_and_nothing_else() {
    let vm = vm();
    let p = platform();
    let gicd = p.gic.gicd.base;
    let gicr = p.gic.gicr[0].base;
    let uart = p.uart.base.base;
    assert_eq!(route(&vm, Ipa(gicd)), Some(Target::Gicd(0)));
    assert_eq!(route(&vm, Ipa(gicd + 0xfffc)), Some(Target::Gicd(0xfffc)));
    assert_eq!(
        route(&vm, Ipa(gicd + 0x1_0000)),
        None,
        "past the distributor frame"
    );
    assert_eq!(
        route(&vm, Ipa(gicr + GICR_FRAME_SIZE + 0x80)),
        Some(Target::Gicr { vcpu: 1, off: 0x80 })
    );
    assert_eq!(
        route(&vm, Ipa(gicr + 2 * GICR_FRAME_SIZE)),
        None,
        "two vCPUs: no third redistributor frame"
    );
    assert_eq!(route(&vm, Ipa(uart + 0x18)), Some(Target::Uart(0x18)));
    assert_eq!(route(&vm, Ipa(uart + 0x1000)), None);
    assert_eq!(
        route(&vm, Ipa(vm.ram_ipa.base)),
        None,
        "RAM never traps to a device"
    );
    assert_eq!(route(&vm, Ipa(u64::MAX)), None);
    assert_eq!(
        route(&vm, Ipa(p.smmus[0].regs.base)),
        None,
        "no vSMMU without devices"
    );
}

/// The guest's GICD_CTLR as Linux sets it: affinity routing, Group 1 on.
fn enable_group1(g: &mut VGic) {
    g.dist_write(
        GICD_CTLR,
        Word,
        u64::from(GICD_CTLR_ARE | GICD_CTLR_ENABLE_GRP1),
    );
}

#[test]
fn a_device_interrupt_is_made_pending_for_its_target_which_is_woken_unless_it_runs_here() {
    let vm = vm();
    let hw = FakeHw::new(2, 4);
    {
        let mut g = vm.vgic.lock();
        enable_group1(&mut g);
        g.dist_write(GICD_IGROUPR + 4, Word, 0xffff_ffff);
        g.dist_write(GICD_ISENABLER + 4, Word, 1 << 8); // SPI 40
        g.dist_write(GICD_IROUTER + 40 * 8, crate::mmio::AccessWidth::Double, 1);
        // vCPU 1
    }
    VmIrqs {
        vm: &vm,
        hw: &hw,
        here: Some(0),
    }
    .raise(IntId(40));
    assert_eq!(hw.take_ops(), [HwOp::Kick(3)], "vCPU 1 runs on pCPU 3");
    assert_eq!(
        vm.vgic.lock().pop_deliverable(1, &[]).map(|d| d.0),
        Some(IntId(40))
    );
    VmIrqs {
        vm: &vm,
        hw: &hw,
        here: Some(1),
    }
    .raise(IntId(40));
    assert!(hw.take_ops().is_empty(), "it runs here: no kick");
}

#[test]
fn sgis_go_to_their_targets_and_wake_the_others() {
    let vm = vm();
    let hw = FakeHw::new(2, 4);
    {
        let mut g = vm.vgic.lock();
        enable_group1(&mut g);
        for t in 0..2 {
            g.redist_write(t, GICR_IGROUPR0, Word, 0xffff_ffff);
            g.redist_write(t, GICR_ISENABLER0, Word, 0xffff);
        }
    }
    // ICC_SGI1R_EL1: INTID 3, target list = vCPUs 0 and 1 (Aff0 0, 1).
    irq::send_sgi(&vm, 0, (3 << 24) | 0b11, &hw);
    assert_eq!(hw.take_ops(), [HwOp::Kick(3)], "the sender is not kicked");
    assert_eq!(
        vm.vgic.lock().pop_deliverable(0, &[]).map(|d| d.0),
        Some(IntId(3))
    );
    assert_eq!(
        vm.vgic.lock().pop_deliverable(1, &[]).map(|d| d.0),
        Some(IntId(3))
    );
}

#[test]
fn forwarded_lines_follow_the_guests_enables() {
    let devices = VmDevices {
        intx: alloc::vec![(
            Bdf::new(0, 2, 0),
            IntxPin::A,
            37,
            (Bdf::new(0, 2, 0), IntxPin::A)
        )],
        ..VmDevices::default()
    };
    let vm = vm_with(devices);
    let hw = FakeHw::new(2, 4);
    irq::follow_spi_enables(&vm, &hw);
    assert_eq!(hw.take_ops(), [HwOp::DisableSpi(IntId(37))]);
    vm.vgic.lock().dist_write(GICD_ISENABLER + 4, Word, 1 << 5);
    irq::follow_spi_enables(&vm, &hw);
    assert_eq!(
        hw.take_ops(),
        [HwOp::EnableSpi(IntId(37), 2)],
        "routed to vCPU 0's CPU"
    );
    vm.vgic
        .lock()
        .redist_write(1, GICR_ISENABLER0, Word, 1 << VTIMER_PPI.0);
    irq::follow_timer_enable(&vm, 1, &hw);
    assert_eq!(hw.take_ops(), [HwOp::SetPpi(3, VTIMER_PPI, true)]);
    assert_eq!(KICK_SGI, IntId(0));
}

#[test]
fn a_bar_move_without_pci_changes_nothing_and_tlbs_are_dropped_for_the_vmid_only() {
    let vm = vm();
    assert!(!vm.apply_bar_moves(0, &[]));
    let hw = FakeHw::new(2, 4);
    vm.invalidate_tlbs(&hw);
    assert_eq!(hw.take_ops(), [HwOp::TlbiVm(vm.vttbr), HwOp::SmmuTlbi(1)]);
    assert_eq!(vm.vttbr >> 48, 1, "VMID 1 for VM 0");
}

#[test]
fn console_input_waits_in_the_backlog_while_the_fifo_is_full() {
    let vm = vm();
    for i in 0..100u8 {
        vm.console_input(i);
    }
    assert!(!vm.console_backlog.lock().is_empty());
    let mut got = alloc::vec::Vec::new();
    loop {
        let fr = vm.vuart.lock().read(crate::devices::vpl011::UARTFR, Word);
        if fr & (1 << 4) != 0 {
            break;
        }
        got.push(vm.vuart.lock().read(crate::devices::vpl011::UARTDR, Word) as u8);
        vm.refill_console();
    }
    assert_eq!(got, (0..100u8).collect::<alloc::vec::Vec<_>>());
}

#[test]
fn psci_sees_the_vms_vcpus_by_mpidr() {
    let vm = vm();
    let v = vm.psci_view();
    assert_eq!(v.by_mpidr(1), Some(1));
    assert_eq!(
        v.by_mpidr(0x8000_0001),
        Some(1),
        "non-affinity bits ignored"
    );
    assert_eq!(v.by_mpidr(2), None);
    assert_eq!(v.ram, vm.ram_ipa);
}

/// A physical SMMU that records which unit each STE write and command reached.
#[derive(Debug)]
struct UnitSmmu<'a> {
    unit: usize,
    log: &'a core::cell::RefCell<Vec<(usize, &'static str)>>,
}

impl smmu::vsmmu::PhysicalSmmu for UnitSmmu<'_> {
    fn write_ste(
        &mut self,
        _: u32,
        _: smmu::ste::Ste,
    ) -> Result<smmu::driver::SteWrite, smmu::driver::DriverError> {
        self.log.borrow_mut().push((self.unit, "ste"));
        Ok(smmu::driver::SteWrite::Unchanged)
    }
    fn make_ste(
        &mut self,
        b: smmu::driver::SteBreak,
    ) -> Result<smmu::cmd::Command, smmu::driver::DriverError> {
        Ok(b.cfgi)
    }
    fn submit(&mut self, _: &[smmu::cmd::Command]) -> Result<(), smmu::driver::DriverError> {
        self.log.borrow_mut().push((self.unit, "cmd"));
        Ok(())
    }
    fn submit_sync(
        &mut self,
        _: &[smmu::cmd::Command],
    ) -> Result<smmu::driver::SyncTicket, smmu::driver::DriverError> {
        self.log.borrow_mut().push((self.unit, "sync"));
        Ok(smmu::driver::SyncTicket::at(1))
    }
    fn publish(&self) {}
    fn wait(&self, _: smmu::driver::SyncTicket) -> Result<(), smmu::driver::DriverError> {
        Ok(())
    }
    fn now(&self) -> Option<u64> {
        None
    }
    fn wait_until(&self, _: u64) {}
}

#[test]
fn functions_behind_two_smmus_get_a_vsmmu_over_each() {
    use crate::pci::{IommuMapEntry, UnitStreams};
    let p = platform();
    // The board's SMMU and a second one at another address, wired to the same SPIs (so the
    // second vSMMU must take other lines); the host bridge sends RIDs up to 0x17 to the first
    // and the rest to the second, with StreamIDs starting again at 0x10.
    let first = p.smmus[0].clone();
    let second = crate::platform::SmmuInfo {
        path: "/smmuv3@2b400000".into(),
        phandle: Some(0x1234),
        regs: MemRange {
            base: 0x2b40_0000,
            size: 0x2_0000,
        },
        ..first.clone()
    };
    let mut host = crate::pci::HostBridge::from_dtb(QEMU_DTB).unwrap().unwrap();
    let whole = host.iommu_map[0];
    host.iommu_map = alloc::vec![
        IommuMapEntry {
            length: 0x18,
            ..whole
        },
        IommuMapEntry {
            rid_base: 0x18,
            sid_base: 0x10,
            length: 0x1_0000 - 0x18,
            iommu: 0x1234,
        },
    ];
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let (a, b) = (Bdf::new(0, 2, 0), Bdf::new(0, 3, 0));
    let devices = VmDevices {
        functions: alloc::vec![
            topo.device(a).unwrap().clone(),
            topo.device(b).unwrap().clone()
        ],
        intx: alloc::vec![
            (a, IntxPin::A, 37, (a, IntxPin::A)),
            (b, IntxPin::A, 38, (b, IntxPin::A))
        ],
        smmus: alloc::vec![
            UnitStreams {
                unit: 0,
                stream_ids: alloc::vec![0x10],
            },
            UnitStreams {
                unit: 3,
                stream_ids: alloc::vec![0x10],
            },
        ],
        ..VmDevices::default()
    };
    let phys = crate::devices::vsmmu::PhysFacts {
        nesting: true,
        stalls_forced: false,
        idr5: 0x75,
        ril: false,
    };
    let facts = [
        SmmuFacts {
            unit: 0,
            info: &first,
            oas_bits: 44,
            phys,
        },
        SmmuFacts {
            unit: 3,
            info: &second,
            oas_bits: 44,
            phys,
        },
    ];
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let vm = Vm::new(
        0,
        config(devices),
        &p,
        ram,
        PhysAddr(0x8000_0000),
        &VmMachine {
            host_bridges: &[&host],
            smmus: &facts,
            its: None,
            viommu: None,
        },
    )
    .unwrap();
    let lines: Vec<(usize, u32, u32)> = vm
        .vsmmus
        .iter()
        .map(|s| (s.unit, s.eventq_intid, s.gerror_intid))
        .collect();
    let (e0, g0) = (first.eventq_intid.unwrap(), first.gerror_intid.unwrap());
    assert_eq!(lines, [(0, e0, g0), (3, 158, 159)]);
    // Each register frame traps to its own vSMMU.
    assert_eq!(
        route(&vm, Ipa(first.regs.base + 0x44)),
        Some(Target::Vsmmu(0, 0x44))
    );
    assert_eq!(
        route(&vm, Ipa(0x2b40_0000 + 0x1_00a8)),
        Some(Target::Vsmmu(1, 0x1_00a8))
    );
    // A boot resets each vSMMU through its own physical SMMU.
    let log = core::cell::RefCell::new(Vec::new());
    let (_, dtb) = vm
        .load(&FakeHw::new(2, 4), |unit| UnitSmmu { unit, log: &log })
        .unwrap();
    let units: alloc::collections::BTreeSet<usize> = log.borrow().iter().map(|&(u, _)| u).collect();
    assert_eq!(units, [0, 3].into_iter().collect());
    // The guest sees two SMMUv3s, and its host bridge sends each function to the right one
    // with the StreamID its physical SMMU sees.
    let mut d = alloc::vec![0u8; 1 << 16];
    vm.ram().read(dtb, &mut d).unwrap();
    let guest = Platform::parse(&d).unwrap();
    assert_eq!(guest.smmus.len(), 2);
    let hb = crate::pci::HostBridge::from_dtb(&d).unwrap().unwrap();
    let phandle_at = |base: u64| {
        guest
            .smmus
            .iter()
            .find(|s| s.regs.base == base)
            .and_then(|s| s.phandle)
    };
    assert_eq!(
        hb.translate(a.rid()).map(|t| (Some(t.0), t.1)),
        Some((phandle_at(first.regs.base), 0x10))
    );
    assert_eq!(
        hb.translate(b.rid()).map(|t| (Some(t.0), t.1)),
        Some((phandle_at(0x2b40_0000), 0x10))
    );
    // A physical event is the vSMMU's over the SMMU that raised it: StreamID 0x10 of unit 3
    // is 00:03.0's, not 00:02.0's (StreamID 0x10 of unit 0).
    let hw = FakeHw::new(2, 4);
    let suppressed = |unit: usize| {
        let drained = super::events::Drained {
            unit,
            events: alloc::vec![(
                smmu::event::Event::new(smmu::event::EventKind::FTranslation, 0x10),
                smmu::driver::EventFate::Suppressed,
            )],
            overflowed: false,
            gerror: smmu::regs::Gerror::empty(),
            stalls_terminated: 0,
            quarantined: Vec::new(),
        };
        super::events::route(core::slice::from_ref(&vm), &drained, None, &hw);
        vm.vsmmus
            .iter()
            .map(|s| s.model.lock().stats().evt_suppressed)
            .collect::<Vec<_>>()
    };
    assert_eq!(suppressed(3), [0, 1]);
    assert_eq!(suppressed(0), [1, 1]);
    assert_eq!(suppressed(1), [1, 1], "no VM's stream on unit 1");
}

#[test]
fn functions_on_two_host_bridges_get_a_virtual_bridge_each() {
    use crate::pci::{IommuMapEntry, UnitStreams};
    let p = platform();
    // QEMU's bridge as domain 0 and a second one (another ECAM window and windows, its RIDs
    // at StreamIDs 0x8000 up on the same SMMU) as domain 1, both with 00:02.0.
    let host0 = crate::pci::HostBridge::from_dtb(QEMU_DTB).unwrap().unwrap();
    let mut host1 = host0.clone();
    host1.ecam.base += 0x1000_0000;
    for w in &mut host1.windows {
        w.cpu_base += w.size;
    }
    host1.iommu_map = alloc::vec![IommuMapEntry {
        sid_base: 0x8000,
        ..host0.iommu_map[0]
    }];
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let f = Bdf::new(0, 2, 0);
    let on = |segment: usize, domain: u16, intid: u32| SegmentDevices {
        segment,
        domain,
        devices: VmDevices {
            functions: alloc::vec![topo.device(f).unwrap().clone()],
            intx: alloc::vec![(f, IntxPin::A, intid, (f, IntxPin::A))],
            ..VmDevices::default()
        },
    };
    let mut c = config(VmDevices::default());
    c.devices = VmPciDevices {
        segments: alloc::vec![on(0, 0, 37), on(1, 1, 38)],
        smmus: alloc::vec![UnitStreams {
            unit: 0,
            stream_ids: alloc::vec![0x10, 0x8010],
        }],
    };
    let facts = [SmmuFacts {
        unit: 0,
        info: &p.smmus[0],
        oas_bits: 44,
        phys: crate::devices::vsmmu::PhysFacts {
            nesting: true,
            stalls_forced: false,
            idr5: 0x75,
            ril: false,
        },
    }];
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let vm = Vm::new(
        0,
        c,
        &p,
        ram,
        PhysAddr(0x8000_0000),
        &VmMachine {
            host_bridges: &[&host0, &host1],
            smmus: &facts,
            its: None,
            viommu: None,
        },
    )
    .unwrap();
    assert_eq!(vm.pci.len(), 2);
    assert_eq!(
        vm.vsmmus.len(),
        1,
        "one SMMU behind both bridges: one vSMMU"
    );
    // Each ECAM window traps to its own virtual bridge.
    assert_eq!(
        route(&vm, Ipa(host0.ecam.base + 0x1_0000)),
        Some(Target::Ecam(0, 0x1_0000))
    );
    assert_eq!(
        route(&vm, Ipa(host1.ecam.base + 0x1_0000)),
        Some(Target::Ecam(1, 0x1_0000))
    );
    let log = core::cell::RefCell::new(Vec::new());
    let (_, dtb) = vm
        .load(&FakeHw::new(2, 4), |unit| UnitSmmu { unit, log: &log })
        .unwrap();
    let mut d = alloc::vec![0u8; 1 << 16];
    vm.ram().read(dtb, &mut d).unwrap();
    let bridges = crate::pci::host_bridges(&d).unwrap();
    let seen: Vec<(Option<u32>, u64)> = bridges
        .iter()
        .map(|b| (b.domain, b.bridge.as_ref().unwrap().ecam.base))
        .collect();
    assert_eq!(
        seen,
        [(Some(0), host0.ecam.base), (Some(1), host1.ecam.base)]
    );
    // Each bridge's iommu-map gives its function the StreamID its physical bridge's does.
    let vsmmu = Platform::parse(&d).unwrap().smmus[0].phandle.unwrap();
    let sid = |i: usize| bridges[i].bridge.as_ref().unwrap().translate(f.rid());
    assert_eq!(
        (sid(0), sid(1)),
        (Some((vsmmu, 0x10)), Some((vsmmu, 0x8010)))
    );
    // Each bridge's interrupt-map has its own function's line.
    let line = |i: usize| {
        bridges[i]
            .bridge
            .as_ref()
            .unwrap()
            .interrupt_map
            .lookup(f, IntxPin::A)
            .map(|r| r.intid)
    };
    assert_eq!((line(0), line(1)), (Some(37), Some(38)));
}

/// QEMU's ITS as a VM with `functions` (segment index, function, DeviceID) sees it.
fn its_facts(functions: &[(usize, Bdf, Option<u32>)]) -> super::its::ItsFacts {
    super::its::ItsFacts {
        index: 0,
        base: 0x0808_0000,
        phandle: None,
        functions: functions.to_vec(),
    }
}

fn vm_with_its(intx_only: bool) -> Vm {
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let f = Bdf::new(0, 2, 0);
    let devices = VmDevices {
        functions: alloc::vec![topo.device(f).unwrap().clone()],
        ..VmDevices::default()
    };
    let p = platform();
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let facts = its_facts(&[(0, Bdf::new(0, 2, 0), Some(0x10))]);
    let c = VmConfig {
        intx_only,
        iommu: crate::config::IommuKind::default(),
        ..config(devices)
    };
    let m = VmMachine {
        its: Some(&facts),
        ..VmMachine::default()
    };
    Vm::new(0, c, &p, ram, PhysAddr(0x8000_0000), &m).unwrap()
}

#[test]
fn a_vits_traps_its_control_frame_and_maps_only_the_doorbell_page() {
    let vm = vm_with_its(false);
    let its = vm.its.as_ref().expect("a vITS");
    assert_eq!(its.devices(), &[0x10]);
    assert_eq!(route(&vm, Ipa(0x0808_0000)), Some(Target::Vits(0)));
    assert_eq!(route(&vm, Ipa(0x0808_fff8)), Some(Target::Vits(0xfff8)));
    let s2 = vm.stage2.lock();
    let leaf = s2.lookup(0x0809_0040).expect("GITS_TRANSLATER mapped");
    assert_eq!(leaf.pa, 0x0809_0040, "onto the physical doorbell");
    assert_eq!(leaf.mem, MemType::DeviceWriteOnly);
    assert_eq!(s2.lookup(0x0808_0000), None, "control frame never mapped");
    assert_eq!(
        s2.lookup(0x0809_1000),
        None,
        "rest of the translation frame unmapped"
    );
}

#[test]
fn intx_only_vm_gets_no_vits_and_no_doorbell() {
    let vm = vm_with_its(true);
    assert!(vm.its.is_none());
    assert_eq!(route(&vm, Ipa(0x0808_0000)), None);
    assert_eq!(vm.stage2.lock().lookup(0x0809_0040), None);
    // Nor does a VM without functions, whatever the machine has.
    let p = platform();
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let facts = its_facts(&[(0, Bdf::new(0, 2, 0), Some(0x10))]);
    let vm = Vm::new(
        0,
        config(VmDevices::default()),
        &p,
        ram,
        PhysAddr(0x8000_0000),
        &VmMachine {
            its: Some(&facts),
            ..VmMachine::default()
        },
    )
    .unwrap();
    assert!(vm.its.is_none());
}

#[test]
fn a_vits_vm_boots_with_an_its_node_and_lpis_in_its_vgic() {
    let vm = vm_with_its(false);
    let hw = FakeHw::new(2, 4);
    let (_, dtb) = vm.load(&hw, |_| NoSmmu).unwrap();
    let mut blob = alloc::vec![0u8; 0x10000];
    vm.ram().read(dtb, &mut blob).unwrap();
    let fdt = fdt::Fdt::new(&blob).unwrap();
    let its = fdt
        .find_compatible(&["arm,gic-v3-its"])
        .expect("an ITS node");
    assert!(its.property("msi-controller").is_some());
    let reg = its.reg().unwrap().next().unwrap();
    assert_eq!(reg.starting_address as u64, 0x0808_0000);
    // The vGIC offers LPIs: GICD_TYPER.LPIS (bit 17).
    let typer = vm
        .vgic
        .lock()
        .dist_read(0x4, crate::mmio::AccessWidth::Word);
    assert_ne!(typer & (1 << 17), 0);
    // And a VM without one does not.
    let plain = vm_with_its(true);
    plain.load(&hw, |_| NoSmmu).unwrap();
    let typer = plain
        .vgic
        .lock()
        .dist_read(0x4, crate::mmio::AccessWidth::Word);
    assert_eq!(typer & (1 << 17), 0);
}

#[test]
fn a_function_the_vits_cannot_serve_keeps_msi_hidden_its_neighbour_does_not() {
    let p = platform();
    let host0 = crate::pci::HostBridge::from_dtb(QEMU_DTB).unwrap().unwrap();
    let mut host1 = host0.clone();
    host1.ecam.base += 0x1000_0000;
    for w in &mut host1.windows {
        w.cpu_base += w.size;
    }
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let f = Bdf::new(0, 2, 0);
    let on = |segment: usize, domain: u16| SegmentDevices {
        segment,
        domain,
        devices: VmDevices {
            functions: alloc::vec![topo.device(f).unwrap().clone()],
            ..VmDevices::default()
        },
    };
    let mut c = config(VmDevices::default());
    c.devices = VmPciDevices {
        segments: alloc::vec![on(0, 0), on(1, 1)],
        smmus: Vec::new(),
    };
    // Segment 1's 00:02.0 has no DeviceID for the ITS.
    let facts = its_facts(&[(0, f, Some(0x10)), (1, f, None)]);
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let m = VmMachine {
        host_bridges: &[&host0, &host1],
        its: Some(&facts),
        ..VmMachine::default()
    };
    let vm = Vm::new(0, c, &p, ram, PhysAddr(0x8000_0000), &m).unwrap();
    assert!(vm.its.is_some());
    // The capability after the PCIe one (0x40): MSI-X at 0x50 where shown, none where hidden.
    let next_after_pcie = |bridge: usize| {
        let off = (2u64 << 15) | 0x41;
        vm.pci[bridge]
            .vecam
            .lock()
            .read(&cfg, off, crate::mmio::AccessWidth::Byte)
    };
    assert_eq!(next_after_pcie(0), 0x50, "segment 0's function shows MSI-X");
    assert_eq!(
        next_after_pcie(1),
        0,
        "segment 1's function keeps MSI-X hidden"
    );
}

/// A virtio-iommu table pool over aarch64-paging's `IdTranslation` (tables on the host heap,
/// which a `Send` model needs: `TargetAllocator` is not), for the VM-level tests; the model's
/// own tests check its tables and pages.
#[derive(Debug)]
struct TestPool {
    base: u64,
}

impl crate::devices::viommu::TablePool for TestPool {
    type Tr = aarch64_paging::idmap::IdTranslation<aarch64_paging::descriptor::El1Attributes>;
    fn translation(&mut self) -> Self::Tr {
        aarch64_paging::idmap::IdTranslation::new()
    }
    fn free_pages(&self) -> usize {
        64
    }
    fn cd_ipa(&self, slot: usize) -> u64 {
        self.base + 64 * slot as u64
    }
    fn write_cd(&mut self, _: usize, _: [u64; 8]) {}
}

/// Makes virtio-iommu models over [`TestPool`]s, their pool "physically" at 0x7000_0000, or
/// refuses (`ok` false) as a machine whose heap is exhausted would.
#[derive(Debug)]
struct TestFactory {
    ok: bool,
    /// The RESV_MEM regions of the last config it was given.
    resv: spin::Mutex<Vec<(u64, u64, u8)>>,
}

impl TestFactory {
    fn new(ok: bool) -> Self {
        Self {
            ok,
            resv: spin::Mutex::new(Vec::new()),
        }
    }
}

impl crate::devices::viommu::device::ViommuFactory for TestFactory {
    fn make(
        &self,
        cfg: crate::devices::viommu::ViommuConfig,
        pool_ipa: u64,
    ) -> Result<
        (
            alloc::boxed::Box<dyn crate::devices::viommu::device::ViommuModel>,
            MemRange,
        ),
        &'static str,
    > {
        if !self.ok {
            return Err("the heap cannot give it");
        }
        *self.resv.lock() = cfg.resv.clone();
        let pool = TestPool { base: pool_ipa };
        let model = crate::devices::viommu::Viommu::new(cfg, pool);
        Ok((
            alloc::boxed::Box::new(model),
            MemRange {
                base: 0x7000_0000,
                size: 1 << 20,
            },
        ))
    }
}

/// A VM with two functions behind the board's SMMU and `smmu-hv,iommu = "virtio-iommu"`,
/// built with `factory`.
fn viommu_vm(factory: &TestFactory) -> (Vm, Platform) {
    viommu_vm_with(factory, None)
}

/// As [`viommu_vm`], with the machine's ITS facts `its` (a vITS for the VM if they name its
/// functions).
fn viommu_vm_with(factory: &TestFactory, its: Option<&super::its::ItsFacts>) -> (Vm, Platform) {
    use crate::pci::UnitStreams;
    let p = platform();
    let host = crate::pci::HostBridge::from_dtb(QEMU_DTB).unwrap().unwrap();
    let mut cfg = FakeConfigSpace::qemu_flat();
    let topo = crate::pci::enumerate::enumerate(&mut cfg, 0, 0).unwrap();
    let (a, b) = (Bdf::new(0, 2, 0), Bdf::new(0, 3, 0));
    let devices = VmDevices {
        functions: alloc::vec![
            topo.device(a).unwrap().clone(),
            topo.device(b).unwrap().clone()
        ],
        intx: alloc::vec![
            (a, IntxPin::A, 37, (a, IntxPin::A)),
            (b, IntxPin::A, 38, (b, IntxPin::A))
        ],
        smmus: alloc::vec![UnitStreams {
            unit: 0,
            stream_ids: alloc::vec![0x10, 0x18],
        }],
        ..VmDevices::default()
    };
    let facts = [SmmuFacts {
        unit: 0,
        info: &p.smmus[0],
        oas_bits: 44,
        phys: crate::devices::vsmmu::PhysFacts {
            nesting: true,
            stalls_forced: false,
            idr5: 0x75,
            ril: false,
        },
    }];
    let c = VmConfig {
        iommu: crate::config::IommuKind::VirtioIommu,
        ..config(devices)
    };
    let ram = alloc::boxed::Box::new(FakeRam::new(p.memory[0].base, RAM_SIZE as usize));
    let vm = Vm::new(
        0,
        c,
        &p,
        ram,
        PhysAddr(0x8000_0000),
        &VmMachine {
            host_bridges: &[&host],
            smmus: &facts,
            its,
            viommu: Some(factory),
        },
    )
    .unwrap();
    (vm, p)
}

#[test]
fn a_virtio_iommu_vm_gets_a_virtio_mmio_device_over_its_smmu_and_a_read_only_table_pool() {
    let (vm, p) = viommu_vm(&TestFactory::new(true));
    let smmu = &p.smmus[0];
    assert!(vm.vsmmus.is_empty(), "a virtio-iommu instead of the vSMMU");
    assert_eq!(vm.viommus.len(), 1);
    let v = &vm.viommus[0];
    // At the physical SMMU's address, its virtio-mmio frame; its line the SMMU's eventq one.
    assert_eq!(
        (v.unit, v.regs.base, v.regs.size),
        (0, smmu.regs.base, 0x200)
    );
    assert_eq!(Some(v.intid), smmu.eventq_intid);
    assert_eq!(
        route(&vm, Ipa(smmu.regs.base + 0x70)),
        Some(Target::Viommu(0, 0x70))
    );
    assert_eq!(route(&vm, Ipa(smmu.regs.base + 0x200)), None);
    // The pool: 2 MiB above the VM's RAM, read-only Normal memory in its stage 2, onto the
    // pool's physical pages; nothing above it.
    assert_eq!(v.pool.base, p.memory[0].base + RAM_SIZE);
    let s2 = vm.stage2.lock();
    let leaf = s2.lookup(v.pool.base + 0x1008).unwrap();
    assert_eq!(
        (leaf.pa, leaf.mem),
        (0x7000_1008, crate::stage2::MemType::NormalReadOnly)
    );
    assert_eq!(s2.lookup(v.pool.base + (1 << 20)), None);
    drop(s2);
    // A boot resets it through its physical SMMU and describes it in the guest's DT: a
    // `virtio,mmio` IOMMU node the host bridge's `iommu-map` names, and which driver to load.
    let log = core::cell::RefCell::new(Vec::new());
    let (_, dtb) = vm
        .load(&FakeHw::new(2, 4), |unit| UnitSmmu { unit, log: &log })
        .unwrap();
    assert!(log
        .borrow()
        .iter()
        .any(|&(u, what)| u == 0 && what == "ste"));
    let mut d = alloc::vec![0u8; 1 << 16];
    vm.ram().read(dtb, &mut d).unwrap();
    let fdt = fdt::Fdt::new(&d).unwrap();
    let node = fdt
        .find_node(&alloc::format!("/virtio_mmio@{:x}", smmu.regs.base))
        .expect("the virtio-iommu's node");
    assert_eq!(node.compatible().map(|c| c.first()), Some("virtio,mmio"));
    assert!(node.property("dma-coherent").is_some());
    assert_eq!(
        node.property("#iommu-cells").and_then(|p| p.as_usize()),
        Some(1)
    );
    let phandle = node.property("phandle").and_then(|p| p.as_usize()).unwrap() as u32;
    let hb = crate::pci::HostBridge::from_dtb(&d).unwrap().unwrap();
    assert_eq!(hb.translate(0x10), Some((phandle, 0x10)));
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(
        chosen.property("hypervisor,iommu").and_then(|p| p.as_str()),
        Some("virtio-iommu")
    );
    assert!(fdt.find_node("/smmuv3@9050000").is_none());
}

#[test]
fn a_virtio_iommu_the_machine_cannot_give_leaves_the_functions_on_stage_2() {
    let (vm, _) = viommu_vm(&TestFactory::new(false));
    assert!(vm.viommus.is_empty() && vm.vsmmus.is_empty());
    // No pool window was mapped.
    let above = vm.ram_ipa.base + RAM_SIZE;
    assert_eq!(vm.stage2.lock().lookup(above), None);
}

#[test]
fn the_pool_window_lies_above_the_vms_ram_inside_the_hosts_ram() {
    let p = platform();
    let ram = MemRange {
        base: p.memory[0].base,
        size: RAM_SIZE + 0x1000,
    };
    // Rounded up to 2 MiB past the RAM's end, one window per device.
    let w = super::viommu::pool_window(&p, ram, 1).unwrap();
    assert_eq!(w.base, p.memory[0].base + RAM_SIZE + (4 << 20));
    // A VM whose RAM ends where the host's does has no room.
    let full = MemRange {
        base: p.memory[0].base,
        size: p.memory[0].size,
    };
    assert_eq!(super::viommu::pool_window(&p, full, 0), None);
}

#[test]
fn a_virtio_iommu_reports_its_vits_doorbell_as_the_msi_region() {
    // No vITS: no MSI region (Linux then uses its software MSI window).
    let f = TestFactory::new(true);
    let (vm, _) = viommu_vm(&f);
    assert!(vm.its.is_none());
    assert_eq!(*f.resv.lock(), alloc::vec![]);
    // With one: its GITS_TRANSLATER page, the one stage 2 sends to the physical doorbell.
    let f = TestFactory::new(true);
    let facts = its_facts(&[
        (0, Bdf::new(0, 2, 0), Some(0x10)),
        (0, Bdf::new(0, 3, 0), Some(0x18)),
    ]);
    let (vm, _) = viommu_vm_with(&f, Some(&facts));
    let doorbell = vm.its.as_ref().expect("a vITS").doorbell;
    assert_eq!(
        *f.resv.lock(),
        alloc::vec![(
            doorbell.base,
            doorbell.end() - 1,
            crate::devices::viommu::RESV_MEM_T_MSI
        )]
    );
    assert_eq!((doorbell.base, doorbell.size), (0x0809_0000, 0x1000));
    let leaf = vm.stage2.lock().lookup(doorbell.base + 0x40).unwrap();
    assert_eq!(leaf.mem, MemType::DeviceWriteOnly);
}
