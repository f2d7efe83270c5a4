//! The CPU, PSCI, GICv3, timer, console UART and SMMUv3 nodes.

use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use super::irqs::{irqs, Irqs};
use super::props::{bad, be, compatibles, missing, prop_str, prop_u32, reg};
use super::tree::Tree;
use super::{
    GicInfo, ItsInfo, MemRange, PlatformError, PsciConduit, Result, SmmuInfo, TimerInfo, UartInfo,
    UartKind,
};

pub(super) fn cpus(fdt: &Fdt) -> Result<Vec<u64>> {
    let Some(cpus_node) = fdt.find_node("/cpus") else {
        return Err(PlatformError::NoCpus);
    };
    let mut cpus = Vec::new();
    for cpu in cpus_node.children() {
        // `cpu-map` and friends also live under /cpus; only real CPU nodes count.
        if prop_str(cpu, "device_type") != Some("cpu") {
            continue;
        }
        // /cpus has #size-cells = 0, so each entry is just the MPIDR in `base`.
        let first = reg(cpu)?
            .first()
            .copied()
            .ok_or_else(|| missing(cpu, "reg"))?;
        cpus.push(first.base);
    }
    if cpus.is_empty() {
        return Err(PlatformError::NoCpus);
    }
    Ok(cpus)
}

pub(super) fn psci(fdt: &Fdt) -> Result<Option<PsciConduit>> {
    // PSCI 0.1 (`arm,psci` alone) uses DT-provided function IDs, which we do not support.
    let Some(node) = fdt.find_compatible(&["arm,psci-1.0", "arm,psci-0.2"]) else {
        return Ok(None);
    };
    match prop_str(node, "method") {
        Some("smc") => Ok(Some(PsciConduit::Smc)),
        Some("hvc") => Ok(Some(PsciConduit::Hvc)),
        Some(other) => Err(PlatformError::UnknownPsciMethod(other.to_string())),
        None => Err(missing(node, "method")),
    }
}

pub(super) fn gic(tree: &Tree, gic: usize) -> Result<GicInfo> {
    let node = tree.nodes[gic].node;
    // Binding order (`arm,gic-v3.yaml`): GICD, then #redistributor-regions GICR regions, then
    // CPU interface frames the hypervisor does not use.
    let regs = tree.cpu_reg(gic)?;
    let regions = match node.property("#redistributor-regions") {
        None => 1,
        Some(_) => match prop_u32(node, "#redistributor-regions") {
            Some(n @ 1..=MAX_GICR_REGIONS) => n as usize,
            _ => {
                return Err(bad(
                    node,
                    "#redistributor-regions",
                    "not one cell between 1 and 64",
                ))
            }
        },
    };
    let (Some(&gicd), Some(gicr)) = (regs.first(), regs.get(1..1 + regions)) else {
        return Err(bad(
            node,
            "reg",
            "needs a distributor and #redistributor-regions redistributor regions",
        ));
    };
    let redist_stride = match node.property("redistributor-stride") {
        None => None,
        Some(p) => match p.value.len() {
            4 | 8 => Some(be(p.value)).filter(|s| s.is_multiple_of(0x1_0000) && *s > 0),
            _ => None,
        }
        .map(Some)
        .ok_or_else(|| bad(node, "redistributor-stride", "not a multiple of 64 KiB"))?,
    };
    let maintenance_ppi = irqs(tree, gic, gic)?
        .require_gic(tree, gic)?
        .first()
        .map(|&(intid, _)| intid)
        .ok_or_else(|| missing(node, "interrupts"))?;
    Ok(GicInfo {
        gicd,
        gicr: gicr.to_vec(),
        redist_stride,
        maintenance_ppi,
        its: its(tree),
    })
}

/// Every enabled `arm,gic-v3-its` node (binding `arm,gic-v3.yaml`, patternProperties
/// "^msi-controller@"/"^its@"). Nothing here fails the parse: a board whose ITS the hypervisor
/// cannot use still runs VMs, without MSIs, so each problem is a reason in
/// [`ItsInfo::refused`].
fn its(tree: &Tree) -> Vec<ItsInfo> {
    tree.compatible("arm,gic-v3-its")
        .into_iter()
        .map(|index| {
            let node = tree.nodes[index].node;
            let translated = tree.cpu_reg(index);
            let regs = translated.as_ref().ok().and_then(|r| r.first().copied());
            let refused = match regs {
                None => Some(match &translated {
                    Err(e) => alloc::format!("its reg is unusable ({e})"),
                    Ok(_) => String::from("it has no reg"),
                }),
                Some(r) if r.size < ItsInfo::FRAMES_SIZE => Some(String::from(
                    "its reg is smaller than the two 64 KiB frames (control, translation)",
                )),
                Some(r) if !r.base.is_multiple_of(0x1_0000) => {
                    Some(String::from("its frames are not 64 KiB aligned"))
                }
                // Linux ignores such a node too ("no msi-controller property, ITS ignored").
                Some(_) if node.property("msi-controller").is_none() => {
                    Some(String::from("it has no msi-controller property"))
                }
                Some(_) => None,
            };
            ItsInfo {
                path: tree.path(index),
                phandle: tree.phandle_of(index),
                regs: regs.unwrap_or(MemRange { base: 0, size: 0 }),
                refused,
            }
        })
        .collect()
}

/// GICR_TYPER.VLPIS [1]: a GICv4 redistributor, with VLPI_base and a reserved frame after
/// RD_base and SGI_base (IHI 0069H 9.1).
const GICR_TYPER_VLPIS: u64 = 1 << 1;
/// GICR_TYPER.Last [4]: the last redistributor of its region (IHI 0069H 12.11.35).
const GICR_TYPER_LAST: u64 = 1 << 4;
/// RD_base + SGI_base.
const GICR_STRIDE_V3: u64 = 0x2_0000;
/// RD_base + SGI_base + VLPI_base + reserved.
const GICR_STRIDE_V4: u64 = 0x4_0000;
/// Most frames walked in one region without a Last bit: more than any GIC has.
const MAX_FRAMES_PER_REGION: usize = 4096;

/// Every redistributor's RD_base, in DT order, given `typer`, the GICR_TYPER of the frame at
/// an address. With a DT `redistributor-stride` the regions are cut at that stride; otherwise
/// each frame's GICR_TYPER.VLPIS gives the step to the next (0x20000, or 0x40000 on GICv4), as
/// Linux's `gic_iterate_rdists` does. Either way a region ends at GICR_TYPER.Last or where no
/// whole frame fits.
pub fn redistributor_frames(info: &GicInfo, mut typer: impl FnMut(u64) -> u64) -> Vec<u64> {
    let mut frames = Vec::new();
    for r in &info.gicr {
        let mut at = r.base;
        for _ in 0..MAX_FRAMES_PER_REGION {
            if at
                .checked_add(GICR_STRIDE_V3)
                .is_none_or(|end| end > r.end())
            {
                break;
            }
            let t = typer(at);
            frames.push(at);
            if t & GICR_TYPER_LAST != 0 {
                break;
            }
            at += info.redist_stride.unwrap_or(if t & GICR_TYPER_VLPIS != 0 {
                GICR_STRIDE_V4
            } else {
                GICR_STRIDE_V3
            });
        }
    }
    frames
}

/// Redistributor regions accepted; more than any GICv3 implementation has.
const MAX_GICR_REGIONS: u32 = 64;

pub(super) fn timer(tree: &Tree, gic: usize) -> Result<TimerInfo> {
    let index = *tree
        .compatible("arm,armv8-timer")
        .first()
        .ok_or(PlatformError::NoTimer)?;
    let node = tree.nodes[index].node;
    let irqs = irqs(tree, index, gic)?.require_gic(tree, index)?;
    // A fifth entry (hypervisor virtual timer, FEAT_VHE) may follow; we only use the four.
    if irqs.len() < 4 {
        return Err(bad(node, "interrupts", "fewer than four timer interrupts"));
    }
    let mut info = TimerInfo {
        intids: [0; 4],
        flags: [0; 4],
    };
    for (i, &(intid, flags)) in irqs.iter().take(4).enumerate() {
        info.intids[i] = intid;
        info.flags[i] = flags;
    }
    Ok(info)
}

/// The UART families the console driver knows, by `compatible`.
const PL011: &[&str] = &["arm,pl011"];
const SBSA_UART: &str = "arm,sbsa-uart";
/// 8250/16550-style UARTs (`8250.yaml`): the registers are the same, `reg-shift` spaces them.
const NS16550: &[&str] = &["ns16550a", "ns16550", "snps,dw-apb-uart"];

pub(super) fn uart_kind(node: FdtNode) -> Result<Option<UartKind>> {
    if compatibles(node).any(|c| PL011.contains(&c)) {
        return Ok(Some(UartKind::Pl011));
    }
    if compatibles(node).any(|c| c == SBSA_UART) {
        return Ok(Some(UartKind::SbsaUart));
    }
    if !compatibles(node).any(|c| NS16550.contains(&c)) {
        return Ok(None);
    }
    let reg_shift = match node.property("reg-shift") {
        None => 0,
        Some(_) => prop_u32(node, "reg-shift")
            .filter(|&s| s <= 3)
            .ok_or_else(|| bad(node, "reg-shift", "not one cell between 0 and 3"))?,
    };
    let reg_io_width = match node.property("reg-io-width") {
        None => 1,
        Some(_) => prop_u32(node, "reg-io-width")
            .filter(|&w| w == 1 || w == 4)
            .ok_or_else(|| bad(node, "reg-io-width", "not 1 or 4"))?,
    };
    Ok(Some(UartKind::Ns16550 {
        reg_shift: reg_shift as u8,
        reg_io_width: reg_io_width as u8,
    }))
}

/// The console: the UART `/chosen/stdout-path` names if the driver knows its kind, else the
/// first enabled UART it knows (with a note saying why the named one was passed over).
pub(super) fn uart<'b, 'a>(
    tree: &Tree<'b, 'a>,
    fdt: &'b Fdt<'a>,
    chosen: Option<FdtNode<'b, 'a>>,
    gic: usize,
) -> Result<UartInfo> {
    let stdout = chosen
        .and_then(|c| prop_str(c, "stdout-path"))
        .and_then(|path| stdout_node(tree, fdt, path));
    let mut note: Option<String> = None;
    let named = match chosen.and_then(|c| super::cmdline::hv_options_of(c).0.dtuart) {
        None => stdout,
        Some(d) => match dtuart_node(tree, fdt, &d) {
            Some(i) => {
                if Some(i) != stdout {
                    note = Some(alloc::format!(
                        "dtuart={d} (hypervisor command line) selects {}{}",
                        tree.path(i),
                        stdout
                            .map(|s| alloc::format!(" instead of stdout-path's {}", tree.path(s)))
                            .unwrap_or_default()
                    ));
                }
                Some(i)
            }
            None => {
                note = Some(alloc::format!(
                    "dtuart={d} (hypervisor command line) names no UART the console driver knows: using stdout-path's"
                ));
                stdout
            }
        },
    };
    let index = match named {
        Some(i) if uart_kind(tree.nodes[i].node)?.is_some() => i,
        other => {
            // A UART of a known kind, even one whose properties are then refused: the error
            // names it.
            let any = (0..tree.nodes.len())
                .find(|&i| tree.enabled(i) && !matches!(uart_kind(tree.nodes[i].node), Ok(None)));
            match (other, any) {
                (Some(n), Some(any)) => {
                    let earlier = note
                        .take()
                        .map(|n| alloc::format!("{n}; "))
                        .unwrap_or_default();
                    note = Some(alloc::format!(
                        "{earlier}stdout-path names {} (compatible {:?}), which the console driver does not know: using {}",
                        tree.path(n),
                        compatibles(tree.nodes[n].node).next().unwrap_or(""),
                        tree.path(any)
                    ));
                    any
                }
                (None, Some(any)) => any,
                (Some(n), None) => {
                    return Err(PlatformError::UnsupportedUart {
                        node: tree.path(n),
                        compatible: compatibles(tree.nodes[n].node)
                            .next()
                            .unwrap_or("")
                            .to_string(),
                    })
                }
                (None, None) => return Err(PlatformError::NoUart),
            }
        }
    };
    let node = tree.nodes[index].node;
    let kind = uart_kind(node)?.ok_or(PlatformError::NoUart)?;
    let base = tree
        .cpu_reg(index)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;
    // Without its interrupt the console still prints; only input is lost.
    let intid = match irqs(tree, index, gic)? {
        Irqs::Gic(v) => v.first().map(|&(intid, _)| intid),
        Irqs::None | Irqs::Elsewhere { .. } => None,
    };
    let compatible = compatibles(node)
        .next()
        .ok_or_else(|| missing(node, "compatible"))?;
    Ok(UartInfo {
        base,
        intid,
        kind,
        compatible: compatible.to_string(),
        path: tree.path(index),
        note,
    })
}

/// The node Xen's `dtuart=` names ("path-or-alias[:options]", as `stdout-path`), if it is a
/// UART of a kind the console driver knows.
pub(super) fn dtuart_node(tree: &Tree, fdt: &Fdt, value: &str) -> Option<usize> {
    stdout_node(tree, fdt, value).filter(|&i| matches!(uart_kind(tree.nodes[i].node), Ok(Some(_))))
}

/// Resolves a `stdout-path` value ("path-or-alias[:options]") to its node.
pub(super) fn stdout_node(tree: &Tree, fdt: &Fdt, value: &str) -> Option<usize> {
    let name = value.split(':').next()?.trim();
    // Aliases are resolved here rather than through `Fdt::find_node`'s own fallback, because
    // that recurses without bound on an alias whose value is itself an unknown alias.
    let path = if name.starts_with('/') {
        name
    } else {
        prop_str(fdt.find_node("/aliases")?, name)?
    };
    tree.find(path)
}

/// Every enabled `arm,smmu-v3` node (`arm,smmu-v3.yaml`), in document order, with what the
/// hypervisor makes of it: its registers, its wired interrupts by name ("eventq", "priq",
/// "cmdq-sync", "gerror"; "combined" counts as eventq and gerror), or why it is polled, or why
/// the hypervisor will not drive it. Which SMMU translates which PCI function is the host
/// bridges' `iommu-map` business, never this order.
pub(super) fn smmus(tree: &Tree, gic: usize) -> Result<Vec<SmmuInfo>> {
    let mut out = Vec::new();
    for index in tree.compatible("arm,smmu-v3") {
        let node = tree.nodes[index].node;
        let path = tree.path(index);
        let translated = tree.cpu_reg(index);
        let regs = translated.as_ref().ok().and_then(|r| r.first().copied());
        let coherent = node.property("dma-coherent").is_some();
        let mut info = SmmuInfo {
            path,
            phandle: tree.phandle_of(index),
            regs: regs.unwrap_or(MemRange { base: 0, size: 0 }),
            eventq_intid: None,
            gerror_intid: None,
            coherent,
            polled: None,
            refused: None,
        };
        // Pages 0 and 1 (SMMUv3 spec 6.1: 64 KiB each) hold every register the driver uses.
        info.refused = match regs {
            None if translated.is_err() => translated
                .as_ref()
                .err()
                .map(|e| alloc::format!("its reg is unusable ({e})")),
            None => Some(String::from("it has no reg")),
            Some(r) if r.size < 0x2_0000 => Some(String::from(
                "its reg is smaller than the two 64 KiB register pages",
            )),
            Some(r) if !r.base.is_multiple_of(0x1_0000) => {
                Some(String::from("its registers are not 64 KiB aligned"))
            }
            // The driver writes tables and queues with plain cacheable stores and no cache
            // maintenance, so a non-coherent SMMU would walk stale memory.
            Some(_) if !coherent => Some(String::from(
                "it is not dma-coherent, and the hypervisor's driver needs coherent table walks",
            )),
            Some(_) => None,
        };
        if prop_u32(node, "#iommu-cells") != Some(1) {
            info.refused = Some(String::from("its #iommu-cells is not 1"));
        }
        match irqs(tree, index, gic)? {
            Irqs::Gic(wired) => {
                let names = stringlist(node, "interrupt-names");
                let by_name = |name: &str| {
                    names
                        .iter()
                        .position(|n| *n == name || *n == "combined")
                        .and_then(|i| wired.get(i))
                        .map(|&(intid, _)| intid)
                };
                info.eventq_intid = by_name("eventq");
                info.gerror_intid = by_name("gerror");
                if info.eventq_intid.is_none() {
                    info.polled = Some(String::from("it has no interrupt named eventq"));
                }
            }
            Irqs::None => {
                info.polled = Some(if node.property("msi-parent").is_some() {
                    String::from("its interrupts are MSIs (msi-parent), which the hypervisor does not program")
                } else {
                    String::from("it has no interrupts")
                });
            }
            Irqs::Elsewhere {
                controller,
                compatible,
            } => {
                info.polled = Some(alloc::format!(
                    "its interrupts go to {controller} ({compatible:?}), not to the GIC"
                ));
            }
        }
        out.push(info);
    }
    Ok(out)
}

/// The strings of a stringlist property (empty if absent or not UTF-8).
fn stringlist<'a>(node: FdtNode<'_, 'a>, name: &str) -> Vec<&'a str> {
    node.property(name)
        .map(|p| {
            p.value
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .filter_map(|s| core::str::from_utf8(s).ok())
                .collect()
        })
        .unwrap_or_default()
}
