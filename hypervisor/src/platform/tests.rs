use super::blob::{align4, cstr, read_u32, FDT_BEGIN_NODE, FDT_END, FDT_NOP, FDT_PROP};
use super::*;
use vm_fdt::{FdtReserveEntry, FdtWriter};

const QEMU_VIRT: &[u8] = include_bytes!("../../tests/data/qemu-virt-gicv3.dtb");
const QEMU_VIRT_MODULES: &[u8] = include_bytes!("../../tests/data/qemu-virt-gicv3-modules.dtb");

fn qemu_expected() -> Platform {
    // Values read off `dtc -I dtb -O dts tests/data/qemu-virt-gicv3.dtb`.
    Platform {
        memory: vec![MemRange {
            base: 0x4000_0000,
            size: 0x1_0000_0000,
        }],
        reserved: vec![],
        cpus: vec![0, 1, 2, 3],
        psci: Some(PsciConduit::Smc),
        gic: GicInfo {
            gicd: MemRange {
                base: 0x800_0000,
                size: 0x1_0000,
            },
            gicr: vec![MemRange {
                base: 0x80a_0000,
                size: 0xf6_0000,
            }],
            redist_stride: None,
            maintenance_ppi: 25,
            its: vec![ItsInfo {
                path: "/intc@8000000/its@8080000".to_string(),
                phandle: Some(0x8006),
                regs: MemRange {
                    base: 0x808_0000,
                    size: 0x2_0000,
                },
                refused: None,
            }],
        },
        timer: TimerInfo {
            intids: [29, 30, 27, 26],
            flags: [4; 4],
        },
        uart: UartInfo {
            base: MemRange {
                base: 0x900_0000,
                size: 0x1000,
            },
            intid: Some(33),
            kind: UartKind::Pl011,
            compatible: "arm,pl011".to_string(),
            path: "/pl011@9000000".to_string(),
            note: None,
        },
        modules: vec![],
        bootargs: None,
        smmus: vec![],
    }
}

#[test]
fn qemu_virt() {
    assert_eq!(Platform::parse(QEMU_VIRT).unwrap(), qemu_expected());
}

#[test]
fn qemu_virt_smmuv3() {
    // Values read off `dtc -I dtb -O dts tests/data/qemu-virt-smmuv3-pci.dtb`: SPIs 74-77.
    let p = Platform::parse(include_bytes!("../../tests/data/qemu-virt-smmuv3-pci.dtb")).unwrap();
    assert_eq!(
        p.smmus,
        vec![SmmuInfo {
            path: "/smmuv3@9050000".to_string(),
            phandle: Some(0x8007),
            regs: MemRange {
                base: 0x905_0000,
                size: 0x2_0000,
            },
            eventq_intid: Some(32 + 0x4a),
            gerror_intid: Some(32 + 0x4d),
            coherent: true,
            polled: None,
            refused: None,
        }]
    );
}

#[test]
fn qemu_virt_guest_loader_modules() {
    let p = Platform::parse(QEMU_VIRT_MODULES).unwrap();
    // QEMU adds the ramdisk node last but it ends up first in the blob.
    assert_eq!(
        p.modules,
        vec![
            BootModule {
                kind: ModuleKind::Ramdisk,
                range: MemRange {
                    base: 0x5000_0000,
                    size: 0xc
                },
                bootargs: None,
            },
            BootModule {
                kind: ModuleKind::Kernel,
                range: MemRange {
                    base: 0x4800_0000,
                    size: 0x12
                },
                bootargs: Some("console=ttyAMA0 hvtest=x".to_string()),
            },
        ]
    );
    assert_eq!(
        Platform {
            modules: vec![],
            ..p
        },
        qemu_expected()
    );
}

#[test]
fn memrange_end() {
    assert_eq!(
        MemRange {
            base: 0x1000,
            size: 0x2000
        }
        .end(),
        0x3000
    );
    assert_eq!(
        MemRange {
            base: u64::MAX,
            size: 2
        }
        .end(),
        u64::MAX
    );
}

/// Knobs for the synthetic DT, each removing or changing one thing.
struct Opts {
    memory: bool,
    gic: bool,
    timer: bool,
    uarts: bool,
    psci_method: Option<&'static str>,
    stdout: Option<&'static str>,
    timer_irqs: &'static [u32],
    /// More `/chosen` properties (a string each; an empty string is an empty value).
    chosen: &'static [(&'static str, &'static str)],
}

const FULL: Opts = Opts {
    memory: true,
    gic: true,
    timer: true,
    uarts: true,
    psci_method: Some("hvc"),
    stdout: Some("serial1:115200n8"),
    timer_irqs: &[1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8],
    chosen: &[],
};

/// A board unlike QEMU's: devices under a 1/1-cell bus, 2-cell MPIDRs, reservations,
/// stdout-path through an alias with options, /chosen with its own cell sizes.
fn synth(o: &Opts) -> Vec<u8> {
    let rsv = [FdtReserveEntry::new(0x8000_0000, 0x1000).unwrap()];
    let mut w = FdtWriter::new_with_mem_reserv(&rsv).unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_u32("interrupt-parent", 1).unwrap();
    if o.memory {
        let n = w.begin_node("memory@80000000").unwrap();
        w.property_string("device_type", "memory").unwrap();
        w.property_array_u64("reg", &[0x8000_0000, 0x4000_0000])
            .unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("memory@40000000").unwrap();
        w.property_string("device_type", "memory").unwrap();
        w.property_array_u64("reg", &[0x6000_0000, 0x1000_0000, 0x4000_0000, 0x1000_0000])
            .unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("memory@c0000000").unwrap();
        w.property_string("device_type", "memory").unwrap();
        w.property_string("status", "disabled").unwrap();
        w.property_array_u64("reg", &[0xc000_0000, 0x1000_0000])
            .unwrap();
        w.end_node(n).unwrap();
    }
    let rm = w.begin_node("reserved-memory").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_null("ranges").unwrap();
    let n = w.begin_node("fw@48000000").unwrap();
    w.property_array_u64("reg", &[0x4800_0000, 0x10_0000])
        .unwrap();
    w.property_null("no-map").unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("cma").unwrap();
    w.property_array_u64("size", &[0x100_0000]).unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("off@50000000").unwrap();
    w.property_string("status", "disabled").unwrap();
    w.property_array_u64("reg", &[0x5000_0000, 0x1000]).unwrap();
    w.end_node(n).unwrap();
    w.end_node(rm).unwrap();

    let cpus = w.begin_node("cpus").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 0).unwrap();
    for mpidr in [0x0u64, 0x1_0000_0100] {
        let n = w.begin_node(&format!("cpu@{mpidr:x}")).unwrap();
        w.property_string("device_type", "cpu").unwrap();
        w.property_u64("reg", mpidr).unwrap();
        w.end_node(n).unwrap();
    }
    let n = w.begin_node("cpu-map").unwrap();
    w.end_node(n).unwrap();
    w.end_node(cpus).unwrap();

    if let Some(method) = o.psci_method {
        let n = w.begin_node("psci").unwrap();
        w.property_string_list(
            "compatible",
            vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
        )
        .unwrap();
        w.property_string("method", method).unwrap();
        w.end_node(n).unwrap();
    }

    let soc = w.begin_node("soc").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 1).unwrap();
    w.property_null("ranges").unwrap();
    if o.gic {
        let n = w.begin_node("intc@2f000000").unwrap();
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_u32("#interrupt-cells", 3).unwrap();
        w.property_null("interrupt-controller").unwrap();
        w.property_array_u32("reg", &[0x2f00_0000, 0x1_0000, 0x2f10_0000, 0x20_0000])
            .unwrap();
        w.property_array_u32("interrupts", &[1, 9, 4]).unwrap();
        w.property_phandle(1).unwrap();
        w.end_node(n).unwrap();
    }
    if o.uarts {
        for (addr, spi) in [(0x1c09_0000u32, 5u32), (0x1c0a_0000, 6)] {
            let n = w.begin_node(&format!("serial@{addr:x}")).unwrap();
            w.property_string_list(
                "compatible",
                vec!["arm,pl011".into(), "arm,primecell".into()],
            )
            .unwrap();
            w.property_array_u32("reg", &[addr, 0x1000]).unwrap();
            w.property_array_u32("interrupts", &[0, spi, 4]).unwrap();
            w.end_node(n).unwrap();
        }
    }
    w.end_node(soc).unwrap();

    if o.timer {
        let n = w.begin_node("timer").unwrap();
        w.property_string("compatible", "arm,armv8-timer").unwrap();
        w.property_array_u32("interrupts", o.timer_irqs).unwrap();
        w.end_node(n).unwrap();
    }

    let n = w.begin_node("aliases").unwrap();
    w.property_string("serial0", "/soc/serial@1c090000")
        .unwrap();
    w.property_string("serial1", "/soc/serial@1c0a0000")
        .unwrap();
    w.property_string("loop", "loop").unwrap();
    w.end_node(n).unwrap();

    let chosen = w.begin_node("chosen").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 1).unwrap();
    w.property_string("bootargs", "hv=1").unwrap();
    if let Some(stdout) = o.stdout {
        w.property_string("stdout-path", stdout).unwrap();
    }
    for (name, value) in o.chosen {
        if value.is_empty() {
            w.property_null(name).unwrap();
        } else {
            w.property_string(name, value).unwrap();
        }
    }
    let n = w.begin_node("module@90000000").unwrap();
    w.property_string_list(
        "compatible",
        vec!["multiboot,kernel".into(), "multiboot,module".into()],
    )
    .unwrap();
    w.property_array_u32("reg", &[0x9000_0000, 0x20_0000])
        .unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("module@a0000000").unwrap();
    w.property_string("compatible", "multiboot,module").unwrap();
    w.property_array_u32("reg", &[0xa000_0000, 0x1000]).unwrap();
    w.property_string("bootargs", "blob").unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("other").unwrap();
    w.property_string("compatible", "something,else").unwrap();
    w.end_node(n).unwrap();
    w.end_node(chosen).unwrap();

    w.end_node(root).unwrap();
    w.finish().unwrap()
}

#[test]
fn synthetic_board() {
    let p = Platform::parse(&synth(&FULL)).unwrap();
    let r = |base, size| MemRange { base, size };
    assert_eq!(
        p.memory,
        vec![
            r(0x4000_0000, 0x1000_0000),
            r(0x6000_0000, 0x1000_0000),
            r(0x8000_0000, 0x4000_0000)
        ]
    );
    assert_eq!(
        p.reserved,
        vec![r(0x4800_0000, 0x10_0000), r(0x8000_0000, 0x1000)]
    );
    assert_eq!(p.cpus, vec![0, 0x1_0000_0100]);
    assert_eq!(p.psci, Some(PsciConduit::Hvc));
    assert_eq!(
        p.gic,
        GicInfo {
            gicd: r(0x2f00_0000, 0x1_0000),
            gicr: vec![r(0x2f10_0000, 0x20_0000)],
            redist_stride: None,
            maintenance_ppi: 25,
            its: vec![],
        }
    );
    assert_eq!(
        p.timer,
        TimerInfo {
            intids: [29, 30, 27, 26],
            flags: [8; 4]
        }
    );
    assert_eq!(
        p.uart,
        UartInfo {
            base: r(0x1c0a_0000, 0x1000),
            intid: Some(38),
            kind: UartKind::Pl011,
            compatible: "arm,pl011".into(),
            path: "/soc/serial@1c0a0000".into(),
            note: None,
        }
    );
    assert_eq!(
        p.modules,
        vec![
            BootModule {
                kind: ModuleKind::Kernel,
                range: r(0x9000_0000, 0x20_0000),
                bootargs: None
            },
            BootModule {
                kind: ModuleKind::Other,
                range: r(0xa000_0000, 0x1000),
                bootargs: Some("blob".into())
            },
        ]
    );
    assert_eq!(p.bootargs.as_deref(), Some("hv=1"));
}

#[test]
fn stdout_path_variants() {
    let uart_base = |stdout| {
        let dtb = synth(&Opts { stdout, ..FULL });
        Platform::parse(&dtb).unwrap().uart.base.base
    };
    assert_eq!(uart_base(Some("/soc/serial@1c0a0000")), 0x1c0a_0000);
    assert_eq!(uart_base(Some("/soc/serial@1c0a0000:115200")), 0x1c0a_0000);
    assert_eq!(uart_base(Some("serial1")), 0x1c0a_0000);
    // Unresolvable or self-referential: fall back to the first PL011.
    assert_eq!(uart_base(Some("serial7")), 0x1c09_0000);
    assert_eq!(uart_base(Some("loop")), 0x1c09_0000);
    assert_eq!(uart_base(Some("/nowhere")), 0x1c09_0000);
    assert_eq!(uart_base(None), 0x1c09_0000);
}

#[test]
fn dtuart_on_the_command_line_picks_the_console() {
    // stdout-path names serial1 (0x1c0a_0000); Xen's dtuart= names another UART.
    let console = |chosen| {
        let dtb = synth(&Opts { chosen, ..FULL });
        let p = Platform::parse(&dtb).unwrap();
        assert_eq!(
            early_console(&dtb).map(|(b, _)| b),
            Some(p.uart.base.base),
            "early_console agrees"
        );
        (p.uart.base.base, p.uart.note)
    };
    let (base, note) = console(&[("smmu-hv,bootargs", "console=dtuart dtuart=serial0")]);
    assert_eq!(base, 0x1c09_0000);
    let note = note.unwrap();
    assert!(
        note.contains("dtuart=serial0") && note.contains("/soc/serial@1c0a0000"),
        "{note}"
    );
    let (base, _) = console(&[("smmu-hv,bootargs", "dtuart=/soc/serial@1c090000:115200")]);
    assert_eq!(base, 0x1c09_0000);
    // The same UART as stdout-path: nothing to say.
    assert_eq!(
        console(&[("smmu-hv,bootargs", "dtuart=serial1")]),
        (0x1c0a_0000, None)
    );
    // Unresolvable: stdout-path's, with a note.
    let (base, note) = console(&[("smmu-hv,bootargs", "dtuart=serial7")]);
    assert_eq!(base, 0x1c0a_0000);
    assert!(note.unwrap().contains("names no UART"));
    // Xen's command line counts only under the opt-in.
    assert_eq!(
        console(&[("xen,xen-bootargs", "dtuart=serial0")]).0,
        0x1c0a_0000
    );
    assert_eq!(
        console(&[
            ("xen,xen-bootargs", "dtuart=serial0"),
            ("smmu-hv,xen-dom0less", "")
        ])
        .0,
        0x1c09_0000
    );
}

#[test]
fn missing_mandatory_nodes() {
    let err = |o: Opts| Platform::parse(&synth(&o)).unwrap_err();
    assert_eq!(err(Opts { gic: false, ..FULL }), PlatformError::NoGic);
    assert_eq!(
        err(Opts {
            timer: false,
            ..FULL
        }),
        PlatformError::NoTimer
    );
    assert_eq!(
        err(Opts {
            memory: false,
            ..FULL
        }),
        PlatformError::NoMemory
    );
    assert_eq!(
        err(Opts {
            uarts: false,
            ..FULL
        }),
        PlatformError::NoUart
    );
    assert_eq!(
        err(Opts {
            psci_method: Some("svc"),
            ..FULL
        }),
        PlatformError::UnknownPsciMethod("svc".into())
    );
    assert!(matches!(
        err(Opts {
            timer_irqs: &[1, 13, 8, 1, 14, 8],
            ..FULL
        }),
        PlatformError::BadProperty {
            property: "interrupts",
            ..
        }
    ));
    assert!(matches!(
        err(Opts {
            timer_irqs: &[1, 16, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8],
            ..FULL
        }),
        PlatformError::BadProperty {
            property: "interrupts",
            ..
        }
    ));
    let no_psci = Platform::parse(&synth(&Opts {
        psci_method: None,
        ..FULL
    }))
    .unwrap();
    assert_eq!(no_psci.psci, None);
    assert!(err(Opts { gic: false, ..FULL })
        .to_string()
        .contains("arm,gic-v3"));
}

#[test]
fn malformed_blobs() {
    assert!(matches!(
        Platform::parse(&[]),
        Err(PlatformError::Malformed { .. })
    ));
    assert!(matches!(
        Platform::parse(&[0u8; 64]),
        Err(PlatformError::Malformed { .. })
    ));
    let truncated = &QEMU_VIRT[..QEMU_VIRT.len() - 1];
    assert!(matches!(
        Platform::parse(truncated),
        Err(PlatformError::Malformed { .. })
    ));
}

/// Inserts a NOP token before every token of the structure block, fixing up the header.
fn with_nops(dtb: &[u8]) -> Vec<u8> {
    let field = |i: usize| read_u32(dtb, i * 4).unwrap() as usize;
    let (off_struct, off_strings, size_struct) = (field(2), field(3), field(9));
    let strings = &dtb[off_strings..off_strings + field(8)];
    let s = &dtb[off_struct..off_struct + size_struct];
    let mut out_struct = Vec::new();
    let mut pos = 0;
    loop {
        let tok = read_u32(s, pos).unwrap();
        let next = match tok {
            FDT_BEGIN_NODE => align4(pos + 4 + cstr(s, pos + 4).unwrap().len() + 1),
            FDT_PROP => align4(pos + 12 + read_u32(s, pos + 4).unwrap() as usize),
            _ => pos + 4,
        };
        out_struct.extend_from_slice(&FDT_NOP.to_be_bytes());
        out_struct.extend_from_slice(&s[pos..next]);
        if tok == FDT_END {
            break;
        }
        pos = next;
    }
    // Rebuild as header | rsvmap | struct | strings.
    let mut out = dtb[..off_struct].to_vec();
    out.extend_from_slice(&out_struct);
    let new_strings = out.len();
    out.extend_from_slice(strings);
    let total = out.len();
    out[4..8].copy_from_slice(&(total as u32).to_be_bytes());
    out[12..16].copy_from_slice(&(new_strings as u32).to_be_bytes());
    out[36..40].copy_from_slice(&(out_struct.len() as u32).to_be_bytes());
    out
}

#[test]
fn nop_tokens_are_tolerated() {
    // The raw `fdt` crate misreads (or panics on) this blob, which is why `check_blob`
    // compacts it.
    let nops = with_nops(QEMU_VIRT);
    let raw = std::panic::catch_unwind(|| {
        let fdt = Fdt::new(&nops).unwrap();
        fdt.find_node("/chosen").map(|n| n.name)
    });
    assert!(!matches!(raw, Ok(Some("chosen"))));
    assert_eq!(
        Platform::parse(&with_nops(QEMU_VIRT)).unwrap(),
        qemu_expected()
    );
    let synth = synth(&FULL);
    assert_eq!(Platform::parse(&with_nops(&synth)), Platform::parse(&synth));
}

#[test]
fn corrupted_blobs_never_panic() {
    // Every byte of the blob, set to a few nasty values: parse may fail or even succeed,
    // but must return.
    let base = synth(&FULL);
    for i in 0..base.len() {
        for v in [0x00, 0x01, 0x03, 0x04, 0x7f, 0xff] {
            let mut dtb = base.clone();
            dtb[i] = v;
            let _ = Platform::parse(&dtb);
        }
    }
    for len in 0..base.len() {
        let _ = Platform::parse(&base[..len]);
    }
}

/// What varies in [`multi`]'s machine.
#[derive(Clone, Copy)]
struct Multi {
    /// The console's compatible and (reg-shift, reg-io-width).
    uart: (&'static str, Option<(u32, u32)>),
    /// The third SMMU's `interrupt-parent` (none: inherited from its bus, the mbigen).
    loop_parents: bool,
}

const MULTI: Multi = Multi {
    uart: ("snps,dw-apb-uart", Some((2, 4))),
    loop_parents: false,
};

/// A board with three SMMUs in the ways real DTs wire them: one on the GIC by
/// `interrupt-parent` inherited from the root, one by `interrupts-extended`, one on a bus whose
/// `interrupt-parent` is an mbigen-like controller (HiSilicon D05); a GIC with two
/// redistributor regions and a stride; an 8250-family console through an alias.
fn multi(o: Multi) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_u32("interrupt-parent", 1).unwrap();
    let n = w.begin_node("memory@80000000").unwrap();
    w.property_string("device_type", "memory").unwrap();
    w.property_array_u64("reg", &[0x8000_0000, 0x8000_0000])
        .unwrap();
    w.end_node(n).unwrap();
    let cpus = w.begin_node("cpus").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 0).unwrap();
    for mpidr in 0..3u32 {
        let n = w.begin_node(&format!("cpu@{mpidr:x}")).unwrap();
        w.property_string("device_type", "cpu").unwrap();
        w.property_u32("reg", mpidr).unwrap();
        w.end_node(n).unwrap();
    }
    w.end_node(cpus).unwrap();
    let n = w.begin_node("interrupt-controller@2f000000").unwrap();
    w.property_string("compatible", "arm,gic-v3").unwrap();
    w.property_u32("#interrupt-cells", 3).unwrap();
    w.property_null("interrupt-controller").unwrap();
    w.property_u32("#redistributor-regions", 2).unwrap();
    w.property_u64("redistributor-stride", 0x4_0000).unwrap();
    w.property_array_u64(
        "reg",
        &[
            0x2f00_0000,
            0x1_0000,
            0x2f10_0000,
            0x8_0000,
            0x3f10_0000,
            0x4_0000,
            0x2c00_0000,
            0x2000,
        ],
    )
    .unwrap();
    w.property_array_u32("interrupts", &[1, 9, 4]).unwrap();
    w.property_phandle(1).unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("timer").unwrap();
    w.property_string("compatible", "arm,armv8-timer").unwrap();
    w.property_array_u32("interrupts", &[1, 13, 8, 1, 14, 8, 1, 11, 8, 1, 10, 8])
        .unwrap();
    w.end_node(n).unwrap();
    let smmu = |w: &mut FdtWriter, name: &str, base: u64, phandle: u32| {
        let n = w.begin_node(name).unwrap();
        w.property_string("compatible", "arm,smmu-v3").unwrap();
        w.property_array_u64("reg", &[base, 0x2_0000]).unwrap();
        w.property_u32("#iommu-cells", 1).unwrap();
        w.property_null("dma-coherent").unwrap();
        w.property_phandle(phandle).unwrap();
        n
    };
    // The display's SMMU first, on the GIC through the root's interrupt-parent.
    let n = smmu(&mut w, "iommu@4f000000", 0x4f00_0000, 10);
    w.property_array_u32("interrupts", &[0, 100, 1, 0, 101, 1])
        .unwrap();
    w.property_string_list("interrupt-names", vec!["eventq".into(), "gerror".into()])
        .unwrap();
    w.end_node(n).unwrap();
    // PCIe's, combined interrupt by interrupts-extended.
    let n = smmu(&mut w, "iommu@4f100000", 0x4f10_0000, 11);
    w.property_array_u32("interrupts-extended", &[1, 0, 110, 4])
        .unwrap();
    w.property_string("interrupt-names", "combined").unwrap();
    w.end_node(n).unwrap();
    // A bus whose interrupts go to an mbigen, itself (in D05) wired to the GIC by MSIs.
    let bus = w.begin_node("soc").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_null("ranges").unwrap();
    w.property_u32("interrupt-parent", 20).unwrap();
    let n = w.begin_node("mbigen@60000000").unwrap();
    w.property_string("compatible", "hisilicon,mbigen-v2")
        .unwrap();
    w.property_array_u64("reg", &[0x6000_0000, 0x1_0000])
        .unwrap();
    w.property_u32("#interrupt-cells", 2).unwrap();
    w.property_null("interrupt-controller").unwrap();
    w.property_phandle(20).unwrap();
    if o.loop_parents {
        w.property_u32("interrupt-parent", 21).unwrap();
    }
    w.end_node(n).unwrap();
    if o.loop_parents {
        // A node with no #interrupt-cells pointing back: Linux would walk A -> B -> A.
        let n = w.begin_node("nexus").unwrap();
        w.property_phandle(21).unwrap();
        w.property_u32("interrupt-parent", 22).unwrap();
        w.end_node(n).unwrap();
        let n = w.begin_node("nexus2").unwrap();
        w.property_phandle(22).unwrap();
        w.property_u32("interrupt-parent", 21).unwrap();
        w.end_node(n).unwrap();
    }
    let n = smmu(&mut w, "iommu@a0040000", 0xa004_0000, 12);
    if o.loop_parents {
        w.property_u32("interrupt-parent", 21).unwrap();
    }
    w.property_array_u32("interrupts", &[65, 4]).unwrap();
    w.end_node(n).unwrap();
    // Disabled: not reported at all.
    let n = smmu(&mut w, "iommu@a0050000", 0xa005_0000, 13);
    w.property_string("status", "disabled").unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("serial@feb50000").unwrap();
    w.property_string_list("compatible", vec![o.uart.0.into(), "ns16550a".into()])
        .unwrap();
    w.property_array_u64("reg", &[0xfeb5_0000, 0x100]).unwrap();
    w.property_u32("interrupt-parent", 1).unwrap();
    w.property_array_u32("interrupts", &[0, 333, 4]).unwrap();
    if let Some((shift, width)) = o.uart.1 {
        w.property_u32("reg-shift", shift).unwrap();
        w.property_u32("reg-io-width", width).unwrap();
    }
    w.end_node(n).unwrap();
    w.end_node(bus).unwrap();
    let n = w.begin_node("aliases").unwrap();
    w.property_string("serial2", "/soc/serial@feb50000")
        .unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("chosen").unwrap();
    w.property_string("stdout-path", "serial2:1500000n8")
        .unwrap();
    w.end_node(n).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

#[test]
fn every_smmu_with_its_interrupts_resolved_per_node() {
    let p = Platform::parse(&multi(MULTI)).unwrap();
    let s = &p.smmus;
    assert_eq!(s.len(), 3, "the disabled one is left out: {s:#?}");
    assert_eq!(
        (s[0].path.as_str(), s[0].phandle, s[0].regs.base),
        ("/iommu@4f000000", Some(10), 0x4f00_0000)
    );
    assert_eq!(
        (s[0].eventq_intid, s[0].gerror_intid),
        (Some(132), Some(133))
    );
    assert_eq!((s[0].polled.as_ref(), s[0].refused.as_ref()), (None, None));
    // "combined" is both.
    assert_eq!(
        (s[1].eventq_intid, s[1].gerror_intid),
        (Some(142), Some(142))
    );
    assert_eq!(s[1].polled, None);
    // Inherited from its bus: the mbigen. Driven, polled, and the message names the controller.
    assert_eq!(s[2].path, "/soc/iommu@a0040000");
    assert_eq!((s[2].eventq_intid, s[2].gerror_intid), (None, None));
    let why = s[2].polled.as_deref().unwrap();
    assert!(
        why.contains("/soc/mbigen@60000000") && why.contains("hisilicon,mbigen-v2"),
        "{why}"
    );
    assert_eq!(s[2].refused, None);

    let r = |base, size| MemRange { base, size };
    assert_eq!(
        p.gic.gicr,
        vec![r(0x2f10_0000, 0x8_0000), r(0x3f10_0000, 0x4_0000)]
    );
    assert_eq!(p.gic.redist_stride, Some(0x4_0000));
    assert_eq!(p.cpus, vec![0, 1, 2]);
    assert_eq!(
        p.uart,
        UartInfo {
            base: r(0xfeb5_0000, 0x100),
            intid: Some(32 + 333),
            kind: UartKind::Ns16550 {
                reg_shift: 2,
                reg_io_width: 4
            },
            compatible: "snps,dw-apb-uart".into(),
            path: "/soc/serial@feb50000".into(),
            note: None,
        }
    );
    assert_eq!(
        early_console(&multi(MULTI)),
        Some((
            0xfeb5_0000,
            UartKind::Ns16550 {
                reg_shift: 2,
                reg_io_width: 4
            }
        ))
    );
}

#[test]
fn interrupt_parent_loops_are_errors() {
    let e = Platform::parse(&multi(Multi {
        loop_parents: true,
        ..MULTI
    }))
    .unwrap_err();
    assert!(
        matches!(&e, PlatformError::BadProperty { property: "interrupt-parent", reason, .. } if reason.contains("loops")),
        "{e}"
    );
}

#[test]
fn console_uart_kinds() {
    // Plain 16550 defaults: byte registers, no shift.
    let p = Platform::parse(&multi(Multi {
        uart: ("ns16550a", None),
        ..MULTI
    }))
    .unwrap();
    assert_eq!(
        p.uart.kind,
        UartKind::Ns16550 {
            reg_shift: 0,
            reg_io_width: 1
        }
    );
    // A width the driver cannot do is an error naming the property.
    let e = Platform::parse(&multi(Multi {
        uart: ("ns16550a", Some((2, 2))),
        ..MULTI
    }))
    .unwrap_err();
    assert!(
        matches!(
            &e,
            PlatformError::BadProperty {
                property: "reg-io-width",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn unknown_console_falls_back_or_is_refused_by_name() {
    // stdout-path names a UART the driver does not know: a known one elsewhere is used, with
    // a note saying why; with none, the error names the node and its compatible.
    let mut blob = synth(&FULL);
    let at = blob.windows(9).position(|w| w == b"arm,pl011").unwrap();
    blob[at..at + 9].copy_from_slice(b"xyz,uart0");
    let p = Platform::parse(&blob).unwrap();
    assert_eq!(p.uart.path, "/soc/serial@1c0a0000");
    assert_eq!(p.uart.note, None, "serial1 is still a PL011");
    let at = blob.windows(9).position(|w| w == b"arm,pl011").unwrap();
    blob[at..at + 9].copy_from_slice(b"xyz,uart1");
    match Platform::parse(&blob).unwrap_err() {
        PlatformError::UnsupportedUart { node, compatible } => {
            assert_eq!(
                (node.as_str(), compatible.as_str()),
                ("/soc/serial@1c0a0000", "xyz,uart1")
            );
        }
        e => panic!("{e}"),
    }
    let mut blob = synth(&FULL);
    let second = blob
        .windows(9)
        .enumerate()
        .filter(|(_, w)| *w == b"arm,pl011")
        .nth(1)
        .unwrap()
        .0;
    blob[second..second + 9].copy_from_slice(b"xyz,uart1");
    let p = Platform::parse(&blob).unwrap();
    assert_eq!(p.uart.path, "/soc/serial@1c090000");
    let note = p.uart.note.unwrap();
    assert!(
        note.contains("/soc/serial@1c0a0000") && note.contains("xyz,uart1"),
        "{note}"
    );
}

/// A minimal board whose GIC (at 0x8000000, #address-cells 2 and, with `ranges`, mapping its
/// children 1:1) has the ITS children `its`: (unit name, reg cells, msi-controller).
fn its_board(ranges: Option<&[u32]>, its: &[(&str, &[u32], bool)]) -> Vec<u8> {
    let mut w = FdtWriter::new().unwrap();
    let root = w.begin_node("").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    w.property_u32("interrupt-parent", 1).unwrap();
    let n = w.begin_node("memory@40000000").unwrap();
    w.property_string("device_type", "memory").unwrap();
    w.property_array_u64("reg", &[0x4000_0000, 0x4000_0000])
        .unwrap();
    w.end_node(n).unwrap();
    let cpus = w.begin_node("cpus").unwrap();
    w.property_u32("#address-cells", 1).unwrap();
    w.property_u32("#size-cells", 0).unwrap();
    let n = w.begin_node("cpu@0").unwrap();
    w.property_string("device_type", "cpu").unwrap();
    w.property_u32("reg", 0).unwrap();
    w.end_node(n).unwrap();
    w.end_node(cpus).unwrap();
    let gic = w.begin_node("intc@8000000").unwrap();
    w.property_string("compatible", "arm,gic-v3").unwrap();
    w.property_u32("#interrupt-cells", 3).unwrap();
    w.property_null("interrupt-controller").unwrap();
    w.property_u32("#address-cells", 2).unwrap();
    w.property_u32("#size-cells", 2).unwrap();
    match ranges {
        Some([]) => w.property_null("ranges").unwrap(),
        Some(r) => w.property_array_u32("ranges", r).unwrap(),
        None => {}
    }
    w.property_array_u64("reg", &[0x800_0000, 0x1_0000, 0x80a_0000, 0xf6_0000])
        .unwrap();
    w.property_array_u32("interrupts", &[1, 9, 4]).unwrap();
    w.property_phandle(1).unwrap();
    for (i, (name, reg, msi)) in its.iter().enumerate() {
        let n = w.begin_node(name).unwrap();
        w.property_string("compatible", "arm,gic-v3-its").unwrap();
        if *msi {
            w.property_null("msi-controller").unwrap();
        }
        w.property_u32("#msi-cells", 1).unwrap();
        w.property_array_u32("reg", reg).unwrap();
        w.property_phandle(10 + i as u32).unwrap();
        w.end_node(n).unwrap();
    }
    w.end_node(gic).unwrap();
    let n = w.begin_node("timer").unwrap();
    w.property_string("compatible", "arm,armv8-timer").unwrap();
    w.property_array_u32("interrupts", &[1, 13, 4, 1, 14, 4, 1, 11, 4, 1, 10, 4])
        .unwrap();
    w.end_node(n).unwrap();
    let n = w.begin_node("pl011@9000000").unwrap();
    w.property_string("compatible", "arm,pl011").unwrap();
    w.property_array_u64("reg", &[0x900_0000, 0x1000]).unwrap();
    w.end_node(n).unwrap();
    let chosen = w.begin_node("chosen").unwrap();
    w.property_string("stdout-path", "/pl011@9000000").unwrap();
    w.end_node(chosen).unwrap();
    w.end_node(root).unwrap();
    w.finish().unwrap()
}

#[test]
fn its_nodes_are_found_translated_and_checked() {
    let good: &[u32] = &[0, 0x808_0000, 0, 0x2_0000];
    // The GIC's `ranges` moves its children: child 0 is CPU 0x1000_0000.
    let p = Platform::parse(&its_board(
        Some(&[0, 0, 0, 0x1000_0000, 0, 0x1000_0000]),
        &[
            ("its@8080000", good, true),
            ("its@80a0000", &[0, 0x80a_0000, 0, 0x2_0000], false),
            ("its@80c0000", &[0, 0x80c_0000, 0, 0x1_0000], true),
            ("its@80d0000", &[0, 0x80d_8000, 0, 0x2_0000], true),
        ],
    ))
    .unwrap();
    let its = &p.gic.its;
    assert_eq!(its.len(), 4);
    assert_eq!(its[0].path, "/intc@8000000/its@8080000");
    assert_eq!(its[0].phandle, Some(10));
    assert_eq!(
        its[0].regs,
        MemRange {
            base: 0x1808_0000,
            size: 0x2_0000
        }
    );
    assert_eq!(its[0].refused, None);
    assert_eq!(its[0].translater(), 0x1809_0040);
    assert_eq!(
        its[1].refused.as_deref(),
        Some("it has no msi-controller property")
    );
    assert!(its[2].refused.as_deref().unwrap().contains("smaller"));
    assert!(its[3].refused.as_deref().unwrap().contains("aligned"));
    // An empty `ranges` is the identity.
    let p = Platform::parse(&its_board(Some(&[]), &[("its@8080000", good, true)])).unwrap();
    assert_eq!(p.gic.its[0].regs.base, 0x808_0000);
    // Without `ranges` the children are not memory-mapped: refused, with the reason, and the
    // rest of the platform still parses.
    let p = Platform::parse(&its_board(None, &[("its@8080000", good, true)])).unwrap();
    let why = p.gic.its[0].refused.as_deref().unwrap();
    assert!(why.contains("no ranges"), "{why}");
    // No ITS: an empty list.
    let p = Platform::parse(&its_board(Some(&[]), &[])).unwrap();
    assert!(p.gic.its.is_empty());
}

#[test]
fn redistributor_frames_step_by_vlpis_or_the_dt_stride() {
    let region = |base, size| MemRange { base, size };
    let mut info = GicInfo {
        gicd: region(0x800_0000, 0x1_0000),
        gicr: vec![region(0x80a_0000, 0xf6_0000)],
        redist_stride: None,
        maintenance_ppi: 25,
        its: vec![],
    };
    const VLPIS: u64 = 1 << 1;
    const LAST: u64 = 1 << 4;
    // QEMU gic-version=4, 4 CPUs: frames 0x40000 apart, the fourth Last.
    let v4 = |at: u64| {
        VLPIS
            | if at == 0x80a_0000 + 3 * 0x4_0000 {
                LAST
            } else {
                0
            }
    };
    assert_eq!(
        redistributor_frames(&info, v4),
        [0x80a_0000, 0x80e_0000, 0x812_0000, 0x816_0000]
    );
    // GICv3: 0x20000 apart (CPU1's RD at 0x80c0000).
    let v3 = |at: u64| if at == 0x80c_0000 { LAST } else { 0 };
    assert_eq!(redistributor_frames(&info, v3), [0x80a_0000, 0x80c_0000]);
    // No Last bit: the walk ends where no whole frame fits in the region.
    info.gicr = vec![region(0x100_0000, 0x5_0000), region(0x200_0000, 0x2_0000)];
    assert_eq!(
        redistributor_frames(&info, |_| 0),
        [0x100_0000, 0x102_0000, 0x200_0000]
    );
    // A DT stride wins over VLPIS.
    info.redist_stride = Some(0x2_0000);
    assert_eq!(
        redistributor_frames(&info, |_| VLPIS),
        [0x100_0000, 0x102_0000, 0x200_0000]
    );
    info.gicr = vec![];
    assert!(redistributor_frames(&info, |_| 0).is_empty());
}
