//! The device tree a guest boots with, describing the virtual machine rather than the host.
//!
//! The layout follows QEMU's `virt` board (root compatible `linux,dummy-virt`, `intc`,
//! `pl011`, `apb-pclk` node names) so a stock arm64 kernel needs nothing special, but every
//! address and interrupt comes from [`GuestDtConfig`].

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use vm_fdt::FdtWriter;

use crate::platform::{MemRange, TimerInfo};

/// Everything that varies between guests' device trees.
#[derive(Clone, Copy, Debug)]
pub struct GuestDtConfig<'a> {
    /// Name of the VM: `/chosen/hypervisor,vm-name` and the root `model`.
    pub vm_name: &'a str,
    /// MPIDR of each vCPU, in the order the vCPUs are numbered.
    pub vcpu_mpidrs: &'a [u64],
    /// Guest RAM (IPA range).
    pub ram: MemRange,
    /// Virtual GIC distributor frame.
    pub gicd: MemRange,
    /// Virtual GIC redistributor region (one frame pair per vCPU).
    pub gicr: MemRange,
    /// INTID of the GIC maintenance interrupt as seen by the guest (a PPI).
    pub maintenance_ppi: u32,
    /// Timer PPIs (INTIDs) and their trigger flags.
    pub timer: TimerInfo,
    /// Virtual PL011 frame.
    pub uart: MemRange,
    /// INTID of the virtual PL011 (an SPI).
    pub uart_intid: u32,
    /// PSCI conduit the guest must use: `hvc` if true, else `smc` (both trap to EL2).
    pub psci_method_hvc: bool,
    /// Kernel command line.
    pub bootargs: &'a str,
    /// Where the initrd was loaded in guest RAM, if there is one.
    pub initrd: Option<MemRange>,
    /// How many times the VM has booted before this boot (0 on the first):
    /// `/chosen/hypervisor,boot-count`, so a guest can tell a reboot from a first boot.
    pub boot_count: u32,
}

/// Why a guest DT could not be built.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum GuestDtError {
    /// The configuration lists no vCPUs.
    #[error("guest has no vCPUs")]
    NoVcpus,
    /// A vCPU MPIDR has bits outside Aff3..Aff0, which Linux rejects as a CPU `reg`.
    #[error("vCPU MPIDR {0:#x} has bits outside the affinity fields")]
    BadMpidr(u64),
    /// Two vCPUs share an MPIDR, which would give two nodes the same name.
    #[error("vCPU MPIDR {0:#x} is used twice")]
    DuplicateMpidr(u64),
    /// A memory range is empty or wraps past the top of the address space.
    #[error("{what}: range {base:#x}+{size:#x} is empty or wraps")]
    BadRange {
        /// Which range.
        what: &'static str,
        /// Its base.
        base: u64,
        /// Its size.
        size: u64,
    },
    /// The initrd does not lie inside guest RAM.
    #[error("initrd {base:#x}+{size:#x} is not inside guest RAM")]
    InitrdOutsideRam {
        /// Initrd base.
        base: u64,
        /// Initrd size.
        size: u64,
    },
    /// An INTID is not of the kind its device needs (SPI for the UART, PPI otherwise).
    #[error("{what}: INTID {intid} is not a {expected}")]
    BadIntid {
        /// Which interrupt.
        what: &'static str,
        /// The offending INTID.
        intid: u32,
        /// "SPI" or "PPI".
        expected: &'static str,
    },
    /// The FDT writer rejected something (e.g. a NUL inside `vm_name` or `bootargs`).
    #[error("FDT writer: {0}")]
    Writer(vm_fdt::Error),
}

// Manual because `vm_fdt::Error` only implements `Error` with its `std` feature, and
// thiserror's `#[from]` would also make it the `source()`.
impl From<vm_fdt::Error> for GuestDtError {
    fn from(e: vm_fdt::Error) -> Self {
        Self::Writer(e)
    }
}

const GIC_PHANDLE: u32 = 1;
const CLK_PHANDLE: u32 = 2;
/// Interrupt type cells of the GIC binding.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// `IRQ_TYPE_LEVEL_HIGH`.
const LEVEL_HIGH: u32 = 4;
/// MPIDR_EL1 Aff3 (39:32) and Aff2..Aff0 (23:0); everything else is not part of a CPU's id.
const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;
/// The PL011 reference clock QEMU's `virt` advertises; our vPL011 ignores baud rates anyway.
const APB_PCLK_HZ: u32 = 24_000_000;

/// Builds the guest's DTB.
pub fn build_guest_dt(cfg: &GuestDtConfig) -> Result<Vec<u8>, GuestDtError> {
    validate(cfg)?;
    let mut w = FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string("compatible", "linux,dummy-virt")?;
    w.property_string("model", cfg.vm_name)?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;
    w.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let uart_path = format!("/pl011@{:x}", cfg.uart.base);
    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", cfg.bootargs)?;
    w.property_string("stdout-path", &uart_path)?;
    w.property_string("hypervisor,vm-name", cfg.vm_name)?;
    w.property_u32("hypervisor,boot-count", cfg.boot_count)?;
    if let Some(initrd) = cfg.initrd {
        w.property_u64("linux,initrd-start", initrd.base)?;
        w.property_u64("linux,initrd-end", initrd.end())?;
    }
    w.end_node(chosen)?;

    // Without an alias Linux would still call the UART ttyAMA0, but only by luck of probe order.
    let aliases = w.begin_node("aliases")?;
    w.property_string("serial0", &uart_path)?;
    w.end_node(aliases)?;

    let memory = w.begin_node(&format!("memory@{:x}", cfg.ram.base))?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &[cfg.ram.base, cfg.ram.size])?;
    w.end_node(memory)?;

    cpus(&mut w, cfg.vcpu_mpidrs)?;

    let psci = w.begin_node("psci")?;
    w.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    w.property_string("method", if cfg.psci_method_hvc { "hvc" } else { "smc" })?;
    w.end_node(psci)?;

    let gic = w.begin_node(&format!("intc@{:x}", cfg.gicd.base))?;
    w.property_string("compatible", "arm,gic-v3")?;
    w.property_u32("#interrupt-cells", 3)?;
    w.property_null("interrupt-controller")?;
    // No children; the explicit 0 is what an `interrupt-map` parent lookup (and dtc's
    // interrupt_provider check) expects of an interrupt controller.
    w.property_u32("#address-cells", 0)?;
    w.property_u32("#redistributor-regions", 1)?;
    w.property_array_u64(
        "reg",
        &[cfg.gicd.base, cfg.gicd.size, cfg.gicr.base, cfg.gicr.size],
    )?;
    w.property_array_u32(
        "interrupts",
        &[GIC_PPI, cfg.maintenance_ppi - 16, LEVEL_HIGH],
    )?;
    w.property_phandle(GIC_PHANDLE)?;
    w.end_node(gic)?;

    let timer = w.begin_node("timer")?;
    w.property_string("compatible", "arm,armv8-timer")?;
    w.property_null("always-on")?;
    let mut irqs = Vec::with_capacity(12);
    for (intid, flags) in cfg.timer.intids.iter().zip(cfg.timer.flags) {
        irqs.extend_from_slice(&[GIC_PPI, intid - 16, flags]);
    }
    w.property_array_u32("interrupts", &irqs)?;
    w.end_node(timer)?;

    let clk = w.begin_node("apb-pclk")?;
    w.property_string("compatible", "fixed-clock")?;
    w.property_u32("#clock-cells", 0)?;
    w.property_u32("clock-frequency", APB_PCLK_HZ)?;
    w.property_string("clock-output-names", "clk24mhz")?;
    w.property_phandle(CLK_PHANDLE)?;
    w.end_node(clk)?;

    // The node name must match `uart_path` above.
    let uart = w.begin_node(&uart_path[1..])?;
    w.property_string_list(
        "compatible",
        vec!["arm,pl011".into(), "arm,primecell".into()],
    )?;
    w.property_array_u64("reg", &[cfg.uart.base, cfg.uart.size])?;
    w.property_array_u32("interrupts", &[GIC_SPI, cfg.uart_intid - 32, LEVEL_HIGH])?;
    w.property_array_u32("clocks", &[CLK_PHANDLE, CLK_PHANDLE])?;
    w.property_string_list(
        "clock-names",
        vec![String::from("uartclk"), String::from("apb_pclk")],
    )?;
    w.end_node(uart)?;

    w.end_node(root)?;
    Ok(w.finish()?)
}

fn cpus(w: &mut FdtWriter, mpidrs: &[u64]) -> Result<(), GuestDtError> {
    // One address cell is enough unless some vCPU uses Aff3.
    let wide = mpidrs.iter().any(|&m| m > u64::from(u32::MAX));
    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", if wide { 2 } else { 1 })?;
    w.property_u32("#size-cells", 0)?;
    for &mpidr in mpidrs {
        let cpu = w.begin_node(&format!("cpu@{mpidr:x}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_string("compatible", "arm,armv8")?;
        if wide {
            w.property_u64("reg", mpidr)?;
        } else {
            // Checked just above: every MPIDR fits in 32 bits here.
            w.property_u32("reg", mpidr as u32)?;
        }
        w.property_string("enable-method", "psci")?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;
    Ok(())
}

/// Rejects configurations that would produce a DT the guest misreads, so that the writer
/// code above can compute interrupt numbers and ends without overflow checks.
fn validate(cfg: &GuestDtConfig) -> Result<(), GuestDtError> {
    if cfg.vcpu_mpidrs.is_empty() {
        return Err(GuestDtError::NoVcpus);
    }
    for (i, &mpidr) in cfg.vcpu_mpidrs.iter().enumerate() {
        if mpidr & !MPIDR_AFFINITY_MASK != 0 {
            return Err(GuestDtError::BadMpidr(mpidr));
        }
        if cfg.vcpu_mpidrs[..i].contains(&mpidr) {
            return Err(GuestDtError::DuplicateMpidr(mpidr));
        }
    }
    let mut ranges = vec![
        ("ram", cfg.ram),
        ("gicd", cfg.gicd),
        ("gicr", cfg.gicr),
        ("uart", cfg.uart),
    ];
    if let Some(initrd) = cfg.initrd {
        ranges.push(("initrd", initrd));
    }
    for (what, r) in ranges {
        if r.size == 0 || r.base.checked_add(r.size).is_none() {
            return Err(GuestDtError::BadRange {
                what,
                base: r.base,
                size: r.size,
            });
        }
    }
    if let Some(initrd) = cfg.initrd {
        if initrd.base < cfg.ram.base || initrd.end() > cfg.ram.end() {
            return Err(GuestDtError::InitrdOutsideRam {
                base: initrd.base,
                size: initrd.size,
            });
        }
    }
    let ppi = |what, intid: u32| {
        if (16..32).contains(&intid) {
            Ok(())
        } else {
            Err(GuestDtError::BadIntid {
                what,
                intid,
                expected: "PPI",
            })
        }
    };
    ppi("maintenance", cfg.maintenance_ppi)?;
    for intid in cfg.timer.intids {
        ppi("timer", intid)?;
    }
    if !(32..1020).contains(&cfg.uart_intid) {
        return Err(GuestDtError::BadIntid {
            what: "uart",
            intid: cfg.uart_intid,
            expected: "SPI",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
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
        assert_eq!(p.gic.gicr, cfg.gicr);
        assert_eq!(p.gic.maintenance_ppi, 25);
        assert_eq!(p.timer, cfg.timer);
        assert_eq!(p.uart.base, cfg.uart);
        assert_eq!(p.uart.intid, 33);
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
}
