use super::host_bridge::PCI_INTX_MASK;
use super::*;
use crate::platform::{Platform, PsciConduit};

fn config<'a>(mpidrs: &'a [u64]) -> GuestDtConfig<'a> {
    GuestDtConfig {
        vm_name: "linux-guest",
        vcpu_mpidrs: mpidrs,
        ram: MemRange {
            base: 0x4000_0000,
            size: 0x2000_0000,
        },
        gicd: MemRange {
            base: 0x800_0000,
            size: 0x1_0000,
        },
        gicr: MemRange {
            base: 0x80a_0000,
            size: 0x2_0000 * mpidrs.len() as u64,
        },
        maintenance_ppi: 25,
        timer: TimerInfo {
            intids: [29, 30, 27, 26],
            flags: [4, 4, 4, 8],
        },
        uart: MemRange {
            base: 0x900_0000,
            size: 0x1000,
        },
        uart_intid: 33,
        psci_method_hvc: true,
        bootargs: "console=ttyAMA0 earlycon",
        initrd: Some(MemRange {
            base: 0x4800_0000,
            size: 0x12_3456,
        }),
        boot_count: 3,
        pci: &[],
        smmus: &[],
        its: None,
    }
}

#[test]
fn round_trip_through_platform_parse() {
    let mpidrs = [0, 1, 0x100, 0x101];
    let cfg = config(&mpidrs);
    let dtb = build_guest_dt(&cfg).unwrap();
    let p = Platform::parse(&dtb).unwrap();
    assert_eq!(p.cpus, mpidrs);
    assert_eq!(p.memory, vec![cfg.ram]);
    assert!(p.reserved.is_empty());
    assert_eq!(p.gic.gicd, cfg.gicd);
    assert_eq!(p.gic.gicr, vec![cfg.gicr]);
    assert_eq!(p.gic.maintenance_ppi, 25);
    assert_eq!(p.timer, cfg.timer);
    assert_eq!(p.uart.base, cfg.uart);
    assert_eq!(p.uart.intid, Some(33));
    assert_eq!(p.uart.compatible, "arm,pl011");
    assert_eq!(p.psci, Some(PsciConduit::Hvc));
    assert_eq!(p.bootargs.as_deref(), Some(cfg.bootargs));
    assert!(p.modules.is_empty());

    let smc = build_guest_dt(&GuestDtConfig {
        psci_method_hvc: false,
        ..cfg
    })
    .unwrap();
    assert_eq!(Platform::parse(&smc).unwrap().psci, Some(PsciConduit::Smc));
}

#[test]
fn round_trip_through_fdt_crate() {
    let mpidrs = [0, 1];
    let cfg = config(&mpidrs);
    let dtb = build_guest_dt(&cfg).unwrap();
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let root = fdt.root();
    assert_eq!(root.compatible().first(), "linux,dummy-virt");
    assert_eq!(root.model(), "linux-guest");
    let chosen = fdt.find_node("/chosen").unwrap();
    let u64_prop = |name| {
        let v = chosen.property(name).unwrap().value;
        u64::from_be_bytes(v.try_into().unwrap())
    };
    assert_eq!(u64_prop("linux,initrd-start"), 0x4800_0000);
    assert_eq!(u64_prop("linux,initrd-end"), 0x4812_3456);
    assert_eq!(
        chosen.property("hypervisor,boot-count").unwrap().as_usize(),
        Some(3)
    );
    assert_eq!(
        chosen.property("hypervisor,vm-name").unwrap().as_str(),
        Some("linux-guest")
    );
    assert_eq!(fdt.chosen().stdout().unwrap().name, "pl011@9000000");
    assert_eq!(fdt.chosen().bootargs(), Some("console=ttyAMA0 earlycon"));

    let ids: Vec<usize> = fdt.cpus().map(|c| c.ids().first()).collect();
    assert_eq!(ids, [0, 1]);
    for cpu in fdt.cpus() {
        assert_eq!(
            cpu.property("enable-method").unwrap().as_str(),
            Some("psci")
        );
        assert_eq!(
            cpu.property("compatible").unwrap().as_str(),
            Some("arm,armv8")
        );
    }

    let gic = fdt.find_compatible(&["arm,gic-v3"]).unwrap();
    let gic_phandle = gic.property("phandle").unwrap().as_usize().unwrap();
    assert_eq!(
        root.property("interrupt-parent").unwrap().as_usize(),
        Some(gic_phandle)
    );
    assert!(gic.property("interrupt-controller").is_some());
    assert_eq!(gic.interrupt_cells(), Some(3));

    let uart = fdt.find_compatible(&["arm,pl011"]).unwrap();
    let clocks = uart.property("clocks").unwrap().value;
    let clk = fdt
        .find_phandle(u32::from_be_bytes(clocks[..4].try_into().unwrap()))
        .unwrap();
    assert_eq!(clk.name, "apb-pclk");
    assert_eq!(
        clk.property("clock-frequency").unwrap().as_usize(),
        Some(24_000_000)
    );
    assert_eq!(clk.property("#clock-cells").unwrap().as_usize(), Some(0));
    assert_eq!(&clocks[4..], &clocks[..4]);
    assert_eq!(
        uart.property("clock-names").unwrap().value,
        b"uartclk\0apb_pclk\0"
    );
    assert!(fdt
        .find_node("/timer")
        .unwrap()
        .property("always-on")
        .is_some());
}

#[test]
fn wide_mpidrs_and_no_initrd() {
    let mpidrs = [0x1_0000_0000, 0x1_0000_0001];
    let cfg = GuestDtConfig {
        initrd: None,
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    assert_eq!(Platform::parse(&dtb).unwrap().cpus, mpidrs);
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    assert!(fdt
        .find_node("/chosen")
        .unwrap()
        .property("linux,initrd-start")
        .is_none());
}

#[test]
fn rejects_bad_configs() {
    let mpidrs = [0, 1];
    let ok = config(&mpidrs);
    let err = |cfg: GuestDtConfig| build_guest_dt(&cfg).unwrap_err();
    assert_eq!(
        err(GuestDtConfig {
            vcpu_mpidrs: &[],
            ..ok
        }),
        GuestDtError::NoVcpus
    );
    assert_eq!(
        err(GuestDtConfig {
            vcpu_mpidrs: &[1, 1],
            ..ok
        }),
        GuestDtError::DuplicateMpidr(1)
    );
    assert_eq!(
        err(GuestDtConfig {
            vcpu_mpidrs: &[1 << 31],
            ..ok
        }),
        GuestDtError::BadMpidr(1 << 31)
    );
    assert!(matches!(
        err(GuestDtConfig {
            uart_intid: 27,
            ..ok
        }),
        GuestDtError::BadIntid { what: "uart", .. }
    ));
    assert!(matches!(
        err(GuestDtConfig {
            maintenance_ppi: 40,
            ..ok
        }),
        GuestDtError::BadIntid {
            what: "maintenance",
            ..
        }
    ));
    assert!(matches!(
        err(GuestDtConfig {
            ram: MemRange {
                base: u64::MAX,
                size: 2
            },
            ..ok
        }),
        GuestDtError::BadRange { what: "ram", .. }
    ));
    assert!(matches!(
        err(GuestDtConfig {
            initrd: Some(MemRange {
                base: 0x1000,
                size: 0x1000
            }),
            ..ok
        }),
        GuestDtError::InitrdOutsideRam { .. }
    ));
    assert_eq!(
        err(GuestDtConfig {
            bootargs: "a\0b",
            ..ok
        }),
        GuestDtError::Writer(vm_fdt::Error::InvalidString)
    );
}

const WINDOWS: [PciWindow; 3] = [
    PciWindow {
        space: PciSpace::Io,
        prefetchable: false,
        pci_base: 0,
        cpu_base: 0x3eff_0000,
        size: 0x1_0000,
    },
    PciWindow {
        space: PciSpace::Mem32,
        prefetchable: false,
        pci_base: 0x1000_0000,
        cpu_base: 0x1000_0000,
        size: 0x2eff_0000,
    },
    PciWindow {
        space: PciSpace::Mem64,
        prefetchable: true,
        pci_base: 0x80_0000_0000,
        cpu_base: 0x80_0000_0000,
        size: 0x80_0000_0000,
    },
];

const INTX: [(Bdf, IntxPin, u32, (Bdf, IntxPin)); 4] = [
    (
        Bdf::new(0, 2, 0),
        IntxPin::A,
        37,
        (Bdf::new(0, 2, 0), IntxPin::A),
    ),
    (
        Bdf::new(0, 3, 0),
        IntxPin::A,
        38,
        (Bdf::new(0, 3, 0), IntxPin::A),
    ),
    // Slot 6 shares slot 2's lines on QEMU (SPI 3 + slot % 4) but is its own key here.
    (
        Bdf::new(0, 6, 0),
        IntxPin::B,
        40,
        (Bdf::new(0, 6, 0), IntxPin::B),
    ),
    // A second function of slot 3 on the same pin and line: one map entry.
    (
        Bdf::new(0, 3, 1),
        IntxPin::A,
        38,
        (Bdf::new(0, 3, 1), IntxPin::A),
    ),
];

fn pci() -> GuestPci<'static> {
    GuestPci {
        domain: 0,
        ecam: MemRange {
            base: 0x40_1000_0000,
            size: 0x100_0000,
        },
        bus_range: (0, 0xf),
        ranges: &WINDOWS,
        intx: &INTX,
        iommu_map: &[],
        iommu_map_mask: None,
        msi_map: &[],
        msi_map_mask: None,
    }
}

#[test]
fn pci_node_parses_back_as_the_same_host_bridge() {
    let mpidrs = [0];
    let cfg = GuestDtConfig {
        pci: &[pci()],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    assert_eq!(hb.ecam, pci().ecam);
    assert_eq!((hb.bus_start, hb.bus_end), (0, 0xf));
    assert_eq!(hb.windows, WINDOWS);
    assert!(hb.dma_coherent);
    // No vSMMU: the guest's devices must not wait for an IOMMU that never probes.
    assert!(hb.iommu_map.is_empty());
    assert!(fdt::Fdt::new(&dtb)
        .unwrap()
        .find_compatible(&["arm,smmu-v3"])
        .is_none());
    assert_eq!(hb.interrupt_map.mask, PCI_INTX_MASK);
    assert_eq!(hb.interrupt_map.entries.len(), 3);
    for (bdf, pin, intid, _) in INTX {
        let route = hb.interrupt_map.lookup(bdf, pin).unwrap();
        assert_eq!((route.intid, route.flags, route.parent), (intid, 4, 1));
    }
    assert_eq!(hb.interrupt_map.lookup(Bdf::new(0, 2, 0), IntxPin::B), None);
    assert_eq!(hb.interrupt_map.lookup(Bdf::new(0, 4, 0), IntxPin::A), None);

    // What the fdt crate (and so Linux's generic binding code) sees.
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(
        chosen.property("linux,pci-probe-only").unwrap().as_usize(),
        Some(1)
    );
    let node = fdt.find_node("/pcie@4010000000").unwrap();
    assert_eq!(node.compatible().unwrap().first(), "pci-host-ecam-generic");
    assert_eq!(node.property("device_type").unwrap().as_str(), Some("pci"));
    assert_eq!(
        node.property("linux,pci-domain").unwrap().as_usize(),
        Some(0)
    );
    assert_eq!(node.interrupt_cells(), Some(1));
    let reg = node.reg().unwrap().next().unwrap();
    assert_eq!(reg.starting_address as u64, 0x40_1000_0000);
    assert_eq!(reg.size, Some(0x100_0000));
    let ranges = node.property("ranges").unwrap().value;
    // 64-bit prefetchable memory: ss = 11, p = 1.
    assert_eq!(&ranges[2 * 28..2 * 28 + 4], &0x4300_0000u32.to_be_bytes());

    // Without PCI, neither the node nor probe-only.
    let dtb = build_guest_dt(&config(&mpidrs)).unwrap();
    assert_eq!(crate::pci::HostBridge::from_dtb(&dtb).unwrap(), None);
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    assert!(fdt
        .find_node("/chosen")
        .unwrap()
        .property("linux,pci-probe-only")
        .is_none());
}

#[test]
fn rejects_bad_pci_configs() {
    let mpidrs = [0];
    let err = |pci: GuestPci| {
        build_guest_dt(&GuestDtConfig {
            pci: &[pci],
            ..config(&mpidrs)
        })
        .unwrap_err()
    };
    assert_eq!(
        err(GuestPci {
            bus_range: (2, 1),
            ..pci()
        }),
        GuestDtError::BadBusRange { start: 2, end: 1 }
    );
    assert_eq!(
        err(GuestPci {
            bus_range: (0, 0x10),
            ..pci()
        }),
        GuestDtError::EcamTooSmall {
            size: 0x100_0000,
            buses: 17
        }
    );
    assert!(matches!(
        err(GuestPci {
            ecam: MemRange {
                base: u64::MAX,
                size: 1 << 20
            },
            ..pci()
        }),
        GuestDtError::BadRange {
            what: "pci ecam",
            ..
        }
    ));
    let high_io = [PciWindow {
        pci_base: 0xffff_f000,
        ..WINDOWS[0]
    }];
    assert!(matches!(
        err(GuestPci {
            ranges: &high_io,
            ..pci()
        }),
        GuestDtError::BadPciWindow { .. }
    ));
    let clash = [
        (
            Bdf::new(0, 2, 0),
            IntxPin::A,
            37,
            (Bdf::new(0, 2, 0), IntxPin::A),
        ),
        (
            Bdf::new(0, 2, 1),
            IntxPin::A,
            38,
            (Bdf::new(0, 2, 1), IntxPin::A),
        ),
    ];
    assert_eq!(
        err(GuestPci {
            intx: &clash,
            ..pci()
        }),
        GuestDtError::ConflictingIntx {
            slot: 2,
            pin: IntxPin::A,
            first: 37,
            second: 38
        }
    );
    let ppi = [(
        Bdf::new(0, 2, 0),
        IntxPin::A,
        27,
        (Bdf::new(0, 2, 0), IntxPin::A),
    )];
    assert!(matches!(
        err(GuestPci {
            intx: &ppi,
            ..pci()
        }),
        GuestDtError::BadIntid {
            what: "pci intx",
            ..
        }
    ));
}

/// Shaped like QEMU `virt`'s SMMUv3 (SPIs 74 and 77), but INTIDs of the guest's choosing.
const SMMU: GuestSmmu = GuestSmmu {
    regs: MemRange {
        base: 0x905_0000,
        size: 0x2_0000,
    },
    eventq_intid: 32 + 74,
    gerror_intid: 32 + 77,
    host_phandle: Some(0x77),
    kind: crate::config::IommuKind::Smmuv3,
};

fn be32(bytes: &[u8]) -> Vec<u32> {
    bytes
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn smmu_node_and_iommu_map() {
    let mpidrs = [0, 1];
    let cfg = GuestDtConfig {
        pci: &[pci()],
        smmus: &[SMMU],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();

    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let smmu = fdt.find_node("/smmuv3@9050000").unwrap();
    assert_eq!(smmu.compatible().unwrap().first(), "arm,smmu-v3");
    let reg = smmu.reg().unwrap().next().unwrap();
    assert_eq!(reg.starting_address as u64, 0x905_0000);
    assert_eq!(reg.size, Some(0x2_0000));
    // <GIC_SPI n IRQ_TYPE_EDGE_RISING> twice, eventq first.
    assert_eq!(
        be32(smmu.property("interrupts").unwrap().value),
        [0, 74, 1, 0, 77, 1]
    );
    assert_eq!(
        smmu.property("interrupt-names").unwrap().value,
        b"eventq\0gerror\0"
    );
    assert!(smmu.property("dma-coherent").unwrap().value.is_empty());
    assert_eq!(smmu.property("#iommu-cells").unwrap().as_usize(), Some(1));
    assert!(smmu.property("msi-parent").is_none());
    let phandle = smmu.property("phandle").unwrap().as_usize().unwrap() as u32;
    assert_eq!(fdt.find_phandle(phandle).unwrap().name, "smmuv3@9050000");
    // The GIC's interrupt-parent still resolves: the phandles did not collide.
    assert_eq!(
        fdt.find_phandle(GIC_PHANDLE)
            .unwrap()
            .compatible()
            .unwrap()
            .first(),
        "arm,gic-v3"
    );

    let pcie = fdt.find_node("/pcie@4010000000").unwrap();
    assert_eq!(
        be32(pcie.property("iommu-map").unwrap().value),
        [0, phandle, 0, 0x1_0000]
    );

    // The hypervisor's own readers, as used on the host DT, agree.
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    assert_eq!(
        hb.iommu_map,
        [crate::pci::IommuMapEntry {
            rid_base: 0,
            iommu: phandle,
            sid_base: 0,
            length: 0x1_0000,
        }]
    );
    assert_eq!(hb.iommu_map_mask, None);
    for rid in [0, 0x10, 0x1801, 0xffff] {
        assert_eq!(hb.stream_id(rid), Some(u32::from(rid)));
    }
    let p = Platform::parse(&dtb).unwrap();
    assert_eq!(
        p.smmus,
        vec![crate::platform::SmmuInfo {
            path: "/smmuv3@9050000".to_string(),
            phandle: Some(phandle),
            regs: SMMU.regs,
            eventq_intid: Some(SMMU.eventq_intid),
            gerror_intid: Some(SMMU.gerror_intid),
            coherent: true,
            polled: None,
            refused: None,
        }]
    );
}

#[test]
fn smmu_without_pci() {
    let mpidrs = [0];
    let cfg = GuestDtConfig {
        smmus: &[SMMU],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    assert_eq!(crate::pci::HostBridge::from_dtb(&dtb).unwrap(), None);
    let p = Platform::parse(&dtb).unwrap();
    assert_eq!(p.smmus[0].regs, SMMU.regs);
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    assert!(fdt.find_node("/smmuv3@9050000").is_some());
}

#[test]
fn rejects_bad_smmu_configs() {
    let mpidrs = [0];
    let err = |smmu: GuestSmmu| {
        build_guest_dt(&GuestDtConfig {
            pci: &[pci()],
            smmus: &[smmu],
            ..config(&mpidrs)
        })
        .unwrap_err()
    };
    // Page 1 (the event queue's PROD/CONS) would be missing.
    assert_eq!(
        err(GuestSmmu {
            regs: MemRange {
                base: 0x905_0000,
                size: 0x1_0000
            },
            ..SMMU
        }),
        GuestDtError::BadRange {
            what: "smmu regs",
            base: 0x905_0000,
            size: 0x1_0000
        }
    );
    assert!(matches!(
        err(GuestSmmu {
            regs: MemRange {
                base: u64::MAX - 0xffff,
                size: 0x2_0000
            },
            ..SMMU
        }),
        GuestDtError::BadRange {
            what: "smmu regs",
            ..
        }
    ));
    assert_eq!(
        err(GuestSmmu {
            eventq_intid: 27,
            ..SMMU
        }),
        GuestDtError::BadIntid {
            what: "smmu eventq",
            intid: 27,
            expected: "SPI"
        }
    );
    assert_eq!(
        err(GuestSmmu {
            gerror_intid: 1020,
            ..SMMU
        }),
        GuestDtError::BadIntid {
            what: "smmu gerror",
            intid: 1020,
            expected: "SPI"
        }
    );
    assert_eq!(
        err(GuestSmmu {
            gerror_intid: SMMU.eventq_intid,
            ..SMMU
        }),
        GuestDtError::SharedIntid {
            intid: SMMU.eventq_intid,
            first: "smmu eventq",
            second: "smmu gerror"
        }
    );
    assert_eq!(
        err(GuestSmmu {
            eventq_intid: 33,
            ..SMMU
        }),
        GuestDtError::SharedIntid {
            intid: 33,
            first: "uart",
            second: "smmu eventq"
        }
    );
    assert_eq!(
        err(GuestSmmu {
            gerror_intid: 38,
            ..SMMU
        }),
        GuestDtError::SharedIntid {
            intid: 38,
            first: "pci intx",
            second: "smmu gerror"
        }
    );
}

#[test]
fn guest_iommu_map_repeats_the_hosts_onto_the_vsmmu() {
    // A board whose bridge offsets StreamIDs (RID 0x100.. → SID 0x1100..) and masks the RID:
    // the guest's map must give each function the same StreamID the physical SMMU sees, as the
    // vSMMU keeps StreamIDs as they are.
    let mpidrs = [0];
    let host_map = [crate::pci::IommuMapEntry {
        rid_base: 0x100,
        iommu: 0x77,
        sid_base: 0x1100,
        length: 0x100,
    }];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            iommu_map: &host_map,
            iommu_map_mask: Some(0xfff8),
            ..pci()
        }],
        smmus: &[SMMU],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    let vsmmu = Platform::parse(&dtb).unwrap().smmus[0].phandle.unwrap();
    assert_eq!(hb.iommu_map_mask, Some(0xfff8));
    for rid in [0x100u16, 0x10f, 0x1ff] {
        assert_eq!(
            hb.translate(rid),
            Some((vsmmu, 0x1100 + u32::from(rid & 0xfff8) - 0x100))
        );
    }
    assert_eq!(hb.translate(0x200), None);
}

#[test]
fn a_vsmmu_per_physical_smmu_each_with_its_share_of_the_map() {
    // Functions behind two physical SMMUs (phandles 0x77 and 0x88) and a third SMMU the VM has
    // no vSMMU over (0x99: its RIDs get no entry, so no IOMMU in the guest): the guest gets two
    // `arm,smmu-v3` nodes, and each RID goes to the vSMMU over the SMMU the host sends it to,
    // with the host's StreamID.
    let mpidrs = [0];
    let host_map = [
        crate::pci::IommuMapEntry {
            rid_base: 0,
            iommu: 0x77,
            sid_base: 0,
            length: 0x18,
        },
        crate::pci::IommuMapEntry {
            rid_base: 0x18,
            iommu: 0x88,
            sid_base: 0x10,
            length: 0x100,
        },
        crate::pci::IommuMapEntry {
            rid_base: 0x200,
            iommu: 0x99,
            sid_base: 0,
            length: 0x100,
        },
    ];
    let second = GuestSmmu {
        regs: MemRange {
            base: 0x2b40_0000,
            size: 0x2_0000,
        },
        eventq_intid: 158,
        gerror_intid: 159,
        host_phandle: Some(0x88),
        kind: crate::config::IommuKind::Smmuv3,
    };
    let smmus = [SMMU, second];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            iommu_map: &host_map,
            ..pci()
        }],
        smmus: &smmus,
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let p = Platform::parse(&dtb).unwrap();
    assert_eq!(p.smmus.len(), 2, "{:?}", p.smmus);
    let by_base = |base: u64| p.smmus.iter().find(|s| s.regs.base == base).unwrap();
    let (a, b) = (by_base(0x905_0000), by_base(0x2b40_0000));
    assert_eq!((a.eventq_intid, a.gerror_intid), (Some(106), Some(109)));
    assert_eq!((b.eventq_intid, b.gerror_intid), (Some(158), Some(159)));
    assert!(a.refused.is_none() && b.refused.is_none(), "{a:?} {b:?}");
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    let (pa, pb) = (a.phandle.unwrap(), b.phandle.unwrap());
    assert_ne!(pa, pb);
    assert_eq!(hb.translate(0x10), Some((pa, 0x10)));
    assert_eq!(hb.translate(0x18), Some((pb, 0x10)));
    assert_eq!(hb.translate(0x20), Some((pb, 0x18)));
    assert_eq!(hb.translate(0x200), None, "no vSMMU over 0x99: no entry");

    // Several vSMMUs need the host's map to divide the RIDs; two at one address or sharing a
    // line are refused.
    let no_map = GuestDtConfig {
        pci: &[pci()],
        smmus: &smmus,
        ..config(&mpidrs)
    };
    assert_eq!(
        build_guest_dt(&no_map).unwrap_err(),
        GuestDtError::NoIommuMap(2)
    );
    let same_place = [
        SMMU,
        GuestSmmu {
            regs: SMMU.regs,
            ..second
        },
    ];
    assert_eq!(
        build_guest_dt(&GuestDtConfig {
            smmus: &same_place,
            ..cfg
        })
        .unwrap_err(),
        GuestDtError::SmmusOverlap {
            first: 0x905_0000,
            second: 0x905_0000
        }
    );
    let same_line = [
        SMMU,
        GuestSmmu {
            eventq_intid: SMMU.gerror_intid,
            ..second
        },
    ];
    assert!(matches!(
        build_guest_dt(&GuestDtConfig {
            smmus: &same_line,
            ..cfg
        })
        .unwrap_err(),
        GuestDtError::SharedIntid { intid: 109, .. }
    ));
}

/// The guest's `interrupt-map` behind bridges: Linux (`of_irq_parse_pci`) swizzles each pin up
/// to the root bus and looks the map up with the root-bus ancestor's slot; the guest sees the
/// physical bridges (guest BDFs are physical), so the same walk over the physical topology
/// ([`crate::pci::Topology::intx_route`]) against the parsed-back guest map must give every
/// function the INTID its physical routing gives.
#[test]
fn interrupt_map_is_keyed_on_the_root_slot_and_swizzled_pin() {
    use crate::pci::fake::FakeConfigSpace;
    use crate::pci::{enumerate, iommu_groups, HostBridge, IommuDirectory, IommuEntry};
    const QEMU_SMMU: &[u8] = include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb");
    let host = HostBridge::from_dtb(QEMU_SMMU).unwrap().unwrap();
    let dir = IommuDirectory {
        entries: alloc::vec![IommuEntry {
            phandle: host.iommu_map[0].iommu,
            path: "/smmuv3@9050000".into(),
            driven: Ok(0),
        }],
    };
    let t = enumerate(&mut FakeConfigSpace::switch_topology(true), 0, 0xff).unwrap();
    let g = iommu_groups(&t, &host);
    let fns = [Bdf::new(3, 0, 0), Bdf::new(4, 0, 0), Bdf::new(5, 0, 0)];
    let d = crate::pci::resolve(&t, &g, &host, &dir, "vm0", &fns, &[], 39).unwrap();
    let mpidrs = [0];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            intx: &d.intx,
            ..pci()
        }],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let guest = HostBridge::from_dtb(&dtb).unwrap().unwrap();
    // Root slot 1 INTA (03:00.0), slot 1 INTB (04:00.0), slot 2 INTA (05:00.0).
    assert_eq!(guest.interrupt_map.entries.len(), 3);
    for bdf in fns {
        let physical = t.intx_route(bdf, &host.interrupt_map).unwrap().intid;
        let seen = t.intx_route(bdf, &guest.interrupt_map).unwrap();
        assert_eq!((seen.intid, seen.flags), (physical, 4), "{bdf}");
    }
    // Keyed on the functions' own slot (0) and pin (INTA), as before bridges were shown, the
    // three would have asked for one entry with two INTIDs.
    assert_eq!(
        guest.interrupt_map.lookup(Bdf::new(0, 0, 0), IntxPin::A),
        None
    );
}

#[test]
fn two_functions_entering_at_one_root_slot_and_pin_must_agree() {
    let rp = Bdf::new(0, 1, 0);
    let clash = [
        (Bdf::new(1, 0, 0), IntxPin::A, 36, (rp, IntxPin::A)),
        (Bdf::new(2, 0, 0), IntxPin::A, 37, (rp, IntxPin::A)),
    ];
    let mpidrs = [0];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            intx: &clash,
            ..pci()
        }],
        ..config(&mpidrs)
    };
    assert_eq!(
        build_guest_dt(&cfg),
        Err(GuestDtError::ConflictingIntx {
            slot: 1,
            pin: IntxPin::A,
            first: 36,
            second: 37
        })
    );
    // Same key, same line: one entry.
    let shared = [
        clash[0],
        (Bdf::new(2, 0, 0), IntxPin::A, 36, (rp, IntxPin::A)),
    ];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            intx: &shared,
            ..pci()
        }],
        ..config(&mpidrs)
    };
    let guest = crate::pci::HostBridge::from_dtb(&build_guest_dt(&cfg).unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(guest.interrupt_map.entries.len(), 1);
    assert_eq!(
        guest.interrupt_map.lookup(rp, IntxPin::A).unwrap().intid,
        36
    );
}

/// QEMU `virt`'s ITS placement.
const ITS: GuestIts = GuestIts {
    base: 0x808_0000,
    size: GUEST_ITS_SIZE,
};

/// Every `phandle` in the tree, with its node's name.
fn phandles(fdt: &fdt::Fdt) -> Vec<(u32, String)> {
    fdt.all_nodes()
        .filter_map(|n| {
            let p = n.property("phandle")?.as_usize()? as u32;
            Some((p, n.name.to_string()))
        })
        .collect()
}

/// The `interrupt-map` walked the way Linux's `of_irq_parse_raw` walks it: per entry the
/// child unit address (the bridge's #address-cells, 3) and specifier (#interrupt-cells, 1),
/// the parent's phandle, then as many unit-address cells as the *parent's* #address-cells
/// and as many specifier cells as its #interrupt-cells. Returns (child cells, pin, parent,
/// parent unit address, parent specifier) per entry.
#[allow(clippy::type_complexity)]
fn linux_interrupt_map(
    fdt: &fdt::Fdt,
    bridge: &str,
) -> Vec<([u32; 3], u32, u32, Vec<u32>, Vec<u32>)> {
    let node = fdt.find_node(bridge).unwrap();
    let cells = be32(node.property("interrupt-map").unwrap().value);
    let own_addr = node.property("#address-cells").unwrap().as_usize().unwrap();
    let own_int = node
        .property("#interrupt-cells")
        .unwrap()
        .as_usize()
        .unwrap();
    assert_eq!((own_addr, own_int), (3, 1));
    let mut rest = &cells[..];
    let mut out = Vec::new();
    while !rest.is_empty() {
        let parent = fdt.find_phandle(rest[4]).unwrap();
        // Absent #address-cells counts as 0 for an interrupt parent (`of_irq_parse_raw`).
        let pa = parent
            .property("#address-cells")
            .and_then(|p| p.as_usize())
            .unwrap_or(0);
        let pi = parent
            .property("#interrupt-cells")
            .unwrap()
            .as_usize()
            .unwrap();
        out.push((
            [rest[0], rest[1], rest[2]],
            rest[3],
            rest[4],
            rest[5..5 + pa].to_vec(),
            rest[5 + pa..5 + pa + pi].to_vec(),
        ));
        rest = &rest[5 + pa + pi..];
    }
    out
}

#[test]
fn its_node_msi_map_and_interrupt_map_with_parent_address_cells() {
    let mpidrs = [0, 1];
    let cfg = GuestDtConfig {
        pci: &[pci()],
        smmus: &[SMMU],
        its: Some(ITS),
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let fdt = fdt::Fdt::new(&dtb).unwrap();

    let gic = fdt.find_node("/intc@8000000").unwrap();
    assert_eq!(gic.property("#address-cells").unwrap().as_usize(), Some(2));
    assert_eq!(gic.property("#size-cells").unwrap().as_usize(), Some(2));
    assert!(gic.property("ranges").unwrap().value.is_empty());
    let its = fdt.find_node("/intc@8000000/its@8080000").unwrap();
    assert_eq!(its.compatible().unwrap().first(), "arm,gic-v3-its");
    assert!(its.property("msi-controller").unwrap().value.is_empty());
    assert_eq!(its.property("#msi-cells").unwrap().as_usize(), Some(1));
    assert_eq!(
        be32(its.property("reg").unwrap().value),
        [0, 0x808_0000, 0, 0x2_0000]
    );
    let its_ph = its.property("phandle").unwrap().as_usize().unwrap() as u32;
    // After the one vSMMU's, and no phandle is given twice.
    assert_eq!(its_ph, SMMU_PHANDLE + 1);
    let mut all = phandles(&fdt);
    assert_eq!(all.len(), 4, "{all:?}");
    all.sort();
    all.dedup_by_key(|p| p.0);
    assert_eq!(all.len(), 4, "{all:?}");
    assert_eq!(fdt.find_phandle(its_ph).unwrap().name, "its@8080000");

    let pcie = fdt.find_node("/pcie@4010000000").unwrap();
    // DeviceID = RID over the whole RID space, onto the vITS.
    assert_eq!(
        be32(pcie.property("msi-map").unwrap().value),
        [0, its_ph, 0, 0x1_0000]
    );
    assert!(pcie.property("msi-map-mask").is_none());
    assert!(pcie.property("msi-parent").is_none());

    // 10 cells per entry: 3 + 1 + phandle + 2 zero parent unit-address cells + 3.
    let raw = be32(pcie.property("interrupt-map").unwrap().value);
    assert_eq!(raw.len(), 3 * 10);
    let map = linux_interrupt_map(&fdt, "/pcie@4010000000");
    assert_eq!(map.len(), 3);
    for (_, _, parent, addr, _) in &map {
        assert_eq!((*parent, &addr[..]), (GIC_PHANDLE, &[0, 0][..]));
    }
    // Each function's pin still finds its own SPI, level high.
    for (_, _, intid, (root, pin)) in INTX {
        let found = map
            .iter()
            .find(|(child, p, ..)| {
                let key = u32::from(root.rid()) << 8;
                child[0] & PCI_INTX_MASK[0] == key & PCI_INTX_MASK[0] && *p == pin.number()
            })
            .unwrap();
        assert_eq!(found.4, [GIC_SPI, intid - 32, LEVEL_HIGH]);
    }
    // The hypervisor's own reader (the same walk) agrees, and reads the msi-map back.
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    for (bdf, pin, intid, _) in INTX {
        let route = hb.interrupt_map.lookup(bdf, pin).unwrap();
        assert_eq!((route.intid, route.parent), (intid, GIC_PHANDLE));
    }
    assert_eq!(
        hb.msi_map,
        [crate::pci::MsiMapEntry {
            rid_base: 0,
            its_phandle: its_ph,
            devid_base: 0,
            len: 0x1_0000,
        }]
    );
    // The vSMMU keeps its wired interrupts.
    let smmu = fdt.find_node("/smmuv3@9050000").unwrap();
    assert!(smmu.property("msi-parent").is_none());
    assert_eq!(
        be32(smmu.property("interrupts").unwrap().value),
        [0, 74, 1, 0, 77, 1]
    );
    // The platform parser still finds the GIC and the rest.
    let p = Platform::parse(&dtb).unwrap();
    assert_eq!(p.gic.gicd, cfg.gicd);
}

#[test]
fn without_an_its_nothing_changes() {
    let mpidrs = [0];
    let cfg = GuestDtConfig {
        pci: &[pci()],
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let gic = fdt.find_node("/intc@8000000").unwrap();
    assert_eq!(gic.property("#address-cells").unwrap().as_usize(), Some(0));
    assert!(gic.property("ranges").is_none());
    assert_eq!(gic.children().count(), 0);
    assert!(fdt.find_compatible(&["arm,gic-v3-its"]).is_none());
    let pcie = fdt.find_node("/pcie@4010000000").unwrap();
    assert!(pcie.property("msi-map").is_none());
    assert_eq!(
        be32(pcie.property("interrupt-map").unwrap().value).len(),
        3 * 8
    );
    for (_, _, _, addr, spec) in linux_interrupt_map(&fdt, "/pcie@4010000000") {
        assert!(addr.is_empty());
        assert_eq!(spec.len(), 3);
    }
}

#[test]
fn the_hosts_msi_map_is_repeated_onto_the_vits() {
    let mpidrs = [0];
    let msi_map = [
        crate::pci::MsiMapEntry {
            its_phandle: 0,
            rid_base: 0,
            devid_base: 0x1_0000,
            len: 0x100,
        },
        crate::pci::MsiMapEntry {
            its_phandle: 0,
            rid_base: 0x100,
            devid_base: 0x2_0000,
            len: 0xff00,
        },
    ];
    let cfg = GuestDtConfig {
        pci: &[GuestPci {
            msi_map: &msi_map,
            msi_map_mask: Some(0xfff8),
            ..pci()
        }],
        its: Some(ITS),
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    // No vSMMU: the ITS takes the first phandle after the (absent) vSMMUs'.
    let its_ph = SMMU_PHANDLE;
    assert_eq!(fdt.find_phandle(its_ph).unwrap().name, "its@8080000");
    let pcie = fdt.find_node("/pcie@4010000000").unwrap();
    assert_eq!(
        be32(pcie.property("msi-map").unwrap().value),
        [0, its_ph, 0x1_0000, 0x100, 0x100, its_ph, 0x2_0000, 0xff00]
    );
    assert_eq!(
        pcie.property("msi-map-mask").unwrap().as_usize(),
        Some(0xfff8)
    );
    assert!(pcie.property("iommu-map").is_none());
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    let triple = |e: &crate::pci::MsiMapEntry| (e.rid_base, e.devid_base, e.len);
    let back: Vec<_> = hb.msi_map.iter().map(triple).collect();
    assert_eq!(back, msi_map.iter().map(triple).collect::<Vec<_>>());
    assert!(hb.msi_map.iter().all(|e| e.its_phandle == its_ph));
    assert_eq!(hb.msi_map_mask, Some(0xfff8));
}

#[test]
fn rejects_bad_its_configs() {
    let mpidrs = [0];
    let with = |its: Option<GuestIts>, pci: GuestPci| {
        build_guest_dt(&GuestDtConfig {
            pci: &[pci],
            smmus: &[SMMU],
            its,
            ..config(&mpidrs)
        })
    };
    let at = |base: u64| Some(GuestIts { base, ..ITS });
    assert!(with(at(0x808_0000), pci()).is_ok());
    for (base, what, other) in [
        (0x800_0000, "gicd", 0x800_0000),
        (0x80a_0000, "gicr", 0x80a_0000),
        (0x8ff_0000, "uart", 0x900_0000),
        (0x904_0000, "smmu", 0x905_0000),
        (0x4000_0000, "ram", 0x4000_0000),
        (0x40_1000_0000, "pci ecam", 0x40_1000_0000),
        (0x2000_0000, "pci window", 0x1000_0000),
    ] {
        assert_eq!(
            with(at(base), pci()).unwrap_err(),
            GuestDtError::ItsOverlaps {
                its: base,
                what,
                base: other
            },
            "{what}"
        );
    }
    for its in [
        GuestIts {
            size: 0x1_0000,
            ..ITS
        },
        GuestIts {
            base: 0x808_1000,
            ..ITS
        },
        GuestIts {
            base: u64::MAX - 0xffff,
            ..ITS
        },
    ] {
        assert!(matches!(
            with(Some(its), pci()).unwrap_err(),
            GuestDtError::BadRange { what: "its", .. }
        ));
    }
    // msi-map iff ITS: entries or a mask without one are refused.
    let entry = crate::pci::MsiMapEntry {
        its_phandle: 0,
        rid_base: 0,
        devid_base: 0,
        len: 0x1_0000,
    };
    let mapped = GuestPci {
        msi_map: core::slice::from_ref(&entry),
        ..pci()
    };
    assert_eq!(
        with(None, mapped).unwrap_err(),
        GuestDtError::MsiMapWithoutIts(0x40_1000_0000)
    );
    let masked = GuestPci {
        msi_map_mask: Some(0xffff),
        ..pci()
    };
    assert_eq!(
        with(None, masked).unwrap_err(),
        GuestDtError::MsiMapWithoutIts(0x40_1000_0000)
    );
    assert!(with(at(0x808_0000), mapped).is_ok());
    for (rid_base, devid_base, len) in [(0, 0, 0), (0x8000, 0, 0x8001), (0, u32::MAX, 2)] {
        let bad = [crate::pci::MsiMapEntry {
            its_phandle: 0,
            rid_base,
            devid_base,
            len,
        }];
        let p = GuestPci {
            msi_map: &bad,
            ..pci()
        };
        assert_eq!(
            with(at(0x808_0000), p).unwrap_err(),
            GuestDtError::BadMsiMap {
                rid_base,
                devid_base,
                len
            }
        );
    }
}

#[test]
fn a_virtio_iommu_is_a_virtio_mmio_node_with_one_interrupt() {
    let mpidrs = [0u64, 1];
    let viommu = GuestSmmu {
        regs: MemRange {
            base: 0x905_0000,
            size: 0x200,
        },
        // One line: the second field is unused, so repeating it is no clash.
        eventq_intid: 32 + 74,
        gerror_intid: 32 + 74,
        host_phandle: Some(0x77),
        kind: crate::config::IommuKind::VirtioIommu,
    };
    let smmus = [viommu];
    let cfg = GuestDtConfig {
        pci: &[pci()],
        smmus: &smmus,
        ..config(&mpidrs)
    };
    let dtb = build_guest_dt(&cfg).unwrap();
    let fdt = fdt::Fdt::new(&dtb).unwrap();
    let node = fdt.find_node("/virtio_mmio@9050000").unwrap();
    assert_eq!(node.compatible().map(|c| c.first()), Some("virtio,mmio"));
    assert_eq!(
        be32(node.property("interrupts").unwrap().value),
        [0, 74, 1],
        "one edge SPI"
    );
    assert_eq!(
        node.property("#iommu-cells").and_then(|p| p.as_usize()),
        Some(1)
    );
    // The host bridge's RIDs go to it, and the guest's init learns which driver to load.
    let hb = crate::pci::HostBridge::from_dtb(&dtb).unwrap().unwrap();
    let phandle = node.property("phandle").and_then(|p| p.as_usize()).unwrap() as u32;
    assert_eq!(hb.translate(0x10), Some((phandle, 0x10)));
    let chosen = fdt.find_node("/chosen").unwrap();
    assert_eq!(
        chosen.property("hypervisor,iommu").and_then(|p| p.as_str()),
        Some("virtio-iommu")
    );
    // A frame too small for its config space is refused.
    let small = [GuestSmmu {
        regs: MemRange {
            base: 0x905_0000,
            size: 0x100,
        },
        ..viommu
    }];
    assert_eq!(
        build_guest_dt(&GuestDtConfig {
            smmus: &small,
            ..cfg
        })
        .unwrap_err(),
        GuestDtError::BadRange {
            what: "virtio-iommu regs",
            base: 0x905_0000,
            size: 0x100
        }
    );
}
