//! The CPU, PSCI, GICv3, timer, console UART and SMMUv3 nodes, and the GIC interrupt
//! specifiers they use.

use alloc::string::ToString;
use alloc::vec::Vec;

use fdt::node::FdtNode;
use fdt::Fdt;

use super::props::{bad, be, compatibles, is_enabled, missing, prop_str, reg};
use super::{GicInfo, PlatformError, PsciConduit, Result, SmmuInfo, TimerInfo, UartInfo};

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

pub(super) fn gic(node: FdtNode, icells: u32) -> Result<GicInfo> {
    // Binding order: GICD, then #redistributor-regions GICR regions, then optional CPU
    // interface frames we do not use.
    let regs = reg(node)?;
    let [gicd, gicr, ..] = regs[..] else {
        return Err(bad(
            node,
            "reg",
            "needs at least a distributor and a redistributor region",
        ));
    };
    let maintenance_ppi = interrupts(node, icells)?
        .first()
        .map(|&(intid, _)| intid)
        .ok_or_else(|| missing(node, "interrupts"))?;
    Ok(GicInfo {
        gicd,
        gicr,
        maintenance_ppi,
    })
}

pub(super) fn timer(fdt: &Fdt, icells: u32) -> Result<TimerInfo> {
    let node = fdt
        .find_compatible(&["arm,armv8-timer"])
        .ok_or(PlatformError::NoTimer)?;
    let irqs = interrupts(node, icells)?;
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

pub(super) fn uart<'b, 'a>(
    fdt: &'b Fdt<'a>,
    chosen: Option<FdtNode<'b, 'a>>,
    icells: u32,
) -> Result<UartInfo> {
    let node = chosen
        .and_then(|c| prop_str(c, "stdout-path"))
        .and_then(|path| stdout_node(fdt, path))
        .or_else(|| {
            fdt.all_nodes()
                .find(|n| is_enabled(*n) && compatibles(*n).any(|c| c == "arm,pl011"))
        })
        .ok_or(PlatformError::NoUart)?;
    let base = reg(node)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;
    let intid = interrupts(node, icells)?
        .first()
        .map(|&(intid, _)| intid)
        .ok_or_else(|| missing(node, "interrupts"))?;
    let compatible = compatibles(node)
        .next()
        .ok_or_else(|| missing(node, "compatible"))?;
    Ok(UartInfo {
        base,
        intid,
        compatible: compatible.to_string(),
    })
}

/// Resolves a `stdout-path` value ("path-or-alias[:options]") to its node.
fn stdout_node<'b, 'a>(fdt: &'b Fdt<'a>, value: &str) -> Option<FdtNode<'b, 'a>> {
    let name = value.split(':').next()?.trim();
    // Aliases are resolved here rather than through `Fdt::find_node`'s own fallback, because
    // that recurses without bound on an alias whose value is itself an unknown alias.
    let path = if name.starts_with('/') {
        name
    } else {
        prop_str(fdt.find_node("/aliases")?, name)?
    };
    if !path.starts_with('/') {
        return None;
    }
    fdt.find_node(path)
}

/// The first enabled `arm,smmu-v3` node: its registers and its wired interrupts by name
/// (Linux's binding: "eventq", "priq", "cmdq-sync", "gerror"; a combined "combined" line is
/// reported as both eventq and gerror).
pub(super) fn smmu(fdt: &Fdt<'_>, icells: u32) -> Result<Option<SmmuInfo>> {
    let Some(node) = fdt
        .all_nodes()
        .find(|n| is_enabled(*n) && compatibles(*n).any(|c| c == "arm,smmu-v3"))
    else {
        return Ok(None);
    };
    let regs = reg(node)?
        .first()
        .copied()
        .ok_or_else(|| missing(node, "reg"))?;
    let irqs = interrupts(node, icells)?;
    let names: Vec<&str> = node
        .property("interrupt-names")
        .map(|p| {
            p.value
                .split(|&b| b == 0)
                .filter(|s| !s.is_empty())
                .filter_map(|s| core::str::from_utf8(s).ok())
                .collect()
        })
        .unwrap_or_default();
    let by_name = |name: &str| {
        names
            .iter()
            .position(|n| *n == name || *n == "combined")
            .and_then(|i| irqs.get(i))
            .map(|&(intid, _)| intid)
    };
    Ok(Some(SmmuInfo {
        regs,
        eventq_intid: by_name("eventq"),
        gerror_intid: by_name("gerror"),
    }))
}

/// Decodes GIC interrupt specifiers into (INTID, trigger flags).
fn interrupts(node: FdtNode, icells: u32) -> Result<Vec<(u32, u32)>> {
    let Some(prop) = node.property("interrupts") else {
        return Ok(Vec::new());
    };
    // GICv3 specifiers are <type number flags> with an optional fourth (PPI partition) cell.
    if !(3..=4).contains(&icells) {
        return Err(bad(
            node,
            "interrupts",
            "interrupt parent's #interrupt-cells is not 3 or 4",
        ));
    }
    let stride = icells as usize * 4;
    if !prop.value.len().is_multiple_of(stride) {
        return Err(bad(
            node,
            "interrupts",
            "length is not a whole number of specifiers",
        ));
    }
    prop.value
        .chunks_exact(stride)
        .map(|spec| {
            let cell = |i: usize| be(&spec[i * 4..i * 4 + 4]) as u32;
            let (kind, num) = (cell(0), cell(1));
            // Ranges from the GICv3 binding: SPI 0-987, PPI 0-15, ESPI 0-1023, EPPI 0-63.
            let intid = match kind {
                0 if num < 988 => 32 + num,
                1 if num < 16 => 16 + num,
                2 if num < 1024 => 4096 + num,
                3 if num < 64 => 1056 + num,
                _ => {
                    return Err(bad(
                        node,
                        "interrupts",
                        "unknown type or out-of-range number",
                    ))
                }
            };
            Ok((intid, cell(2)))
        })
        .collect()
}
