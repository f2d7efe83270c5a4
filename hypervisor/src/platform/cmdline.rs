//! The hypervisor's own command line: `/chosen/smmu-hv,bootargs`, and with
//! `smmu-hv,xen-dom0less;` also Xen's `/chosen/xen,xen-bootargs` (Xen's
//! `docs/misc/arm/device-tree/booting.txt`, "Command lines"), so that a DT written for Xen keeps
//! its log level and console choice.
//!
//! Here rather than in `config`, which reads the VMs, because the console UART (`dtuart=`) is
//! chosen while the platform is read.
//!
//! `/chosen/bootargs` is never read as ours: it is the kernel command line of a VM made from
//! the `/chosen` modules, as it is dom0's under Xen.

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use fdt::node::FdtNode;
use log::LevelFilter;

use super::{prop_str, with_fdt, PlatformError};

/// Our own command-line property in `/chosen`.
pub const HV_BOOTARGS: &str = "smmu-hv,bootargs";
/// Xen's, read only under [`XEN_OPT_IN`].
pub const XEN_BOOTARGS: &str = "xen,xen-bootargs";
/// The `/chosen` boolean that makes a Xen DT ours: its `xen,domain` nodes become VMs and its
/// `xen,xen-bootargs` our command line. Without it a Xen DT's domains are left alone, because
/// the same DT also describes dom0, which has no meaning here.
pub const XEN_OPT_IN: &str = "smmu-hv,xen-dom0less";

/// What the command line asks for. `None` leaves the built-in behaviour.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HvOptions {
    /// `loglvl=` / `log=`: the most verbose level logged.
    pub log_level: Option<LevelFilter>,
    /// Xen's `dtuart=`: the console UART, a path or an alias (`serial0`), options after `:`
    /// ignored as Xen's own baud settings are, instead of `/chosen/stdout-path`.
    pub dtuart: Option<String>,
    /// `ram-zero=`: when the VMs' RAM is zeroed in each boot.
    pub ram_zero: Option<RamZeroing>,
}

/// When a VM's RAM is zeroed in each boot (`ram-zero=`; docs/design.md section 3). Whichever,
/// no block is mapped, read or DMA'd into before it is zeroed in that boot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamZeroing {
    /// `lazy` (the default): each 2 MiB block at its first use (a vCPU's access, the
    /// hypervisor's), and all that is left at the DMA gate (the first Bus Master Enable), where
    /// the VM's idle CPUs help.
    #[default]
    Lazy,
    /// `idle`: as `lazy`, and a VM with PCI functions (whose first Bus Master Enable needs all
    /// of it) has its idle CPUs zero the rest ahead of need. Under TCG on few host cores this
    /// slows the boot (an idle vCPU zeroing answers IPIs a block late): measured, not default.
    Idle,
    /// `eager`: all of it before the guest starts, on all of the VM's CPUs at once.
    Eager,
}

impl HvOptions {
    /// `later` over `self`: what a later command line says wins.
    fn merge(&mut self, later: HvOptions) {
        if later.log_level.is_some() {
            self.log_level = later.log_level;
        }
        if later.dtuart.is_some() {
            self.dtuart = later.dtuart;
        }
        if later.ram_zero.is_some() {
            self.ram_zero = later.ram_zero;
        }
    }
}

/// A level by our names (`error|warn|info|debug|trace`) or Xen's (`none|error|warning|info|
/// debug|all`). Xen's `none` becomes `error`: a refused VM or a dead device must still be said.
fn level(name: &str) -> Option<LevelFilter> {
    Some(match name {
        "none" | "error" => LevelFilter::Error,
        "warn" | "warning" => LevelFilter::Warn,
        "info" => LevelFilter::Info,
        "debug" => LevelFilter::Debug,
        "trace" | "all" => LevelFilter::Trace,
        _ => return None,
    })
}

/// Reads a command line: whitespace-separated `option` or `option=value` words. Returns what it
/// asks for and one warning per word that is not understood (never an error: a typo in the
/// command line must not keep the VMs from booting).
pub fn parse_hv_bootargs(line: &str) -> (HvOptions, Vec<String>) {
    let mut opts = HvOptions::default();
    let mut warnings = Vec::new();
    for word in line.split_ascii_whitespace() {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        match (key, value) {
            ("loglvl" | "log", Some(v)) => {
                // Xen's `loglvl=<level>[/<rate-limited level>]`: nothing is rate-limited by
                // level here, so the second half has nothing to set.
                let lower = v.split('/').next().unwrap_or("");
                match level(lower) {
                    Some(l) => opts.log_level = Some(l),
                    None => warnings.push(format!(
                        "`{word}`: unknown level {lower:?} (error, warn, info, debug, trace; or Xen's none, warning, all): ignored"
                    )),
                }
            }
            ("console", Some(v)) => {
                // Xen's list of console drivers; on Arm the UART one is `dtuart`, the only
                // console there is here.
                for item in v.split(',').filter(|i| !i.is_empty() && *i != "dtuart") {
                    warnings.push(format!(
                        "`{word}`: console {item:?} ignored: the console is always a DT UART (console=dtuart)"
                    ));
                }
            }
            ("ram-zero", Some(v)) => match v {
                "lazy" => opts.ram_zero = Some(RamZeroing::Lazy),
                "idle" => opts.ram_zero = Some(RamZeroing::Idle),
                "eager" => opts.ram_zero = Some(RamZeroing::Eager),
                _ => warnings.push(format!(
                    "`{word}`: unknown value {v:?} (lazy, idle, eager): ignored"
                )),
            },
            ("dtuart", Some(v)) => {
                // Xen's default (an empty value) is the UART stdout-path names.
                opts.dtuart = (!v.is_empty()).then(|| v.to_string());
            }
            _ => warnings.push(format!("`{word}`: unknown option, ignored")),
        }
    }
    (opts, warnings)
}

/// Whether `/chosen` opts in to Xen dom0less configurations, and a warning if the property is
/// there but not a boolean (a value such as `<0>` might mean "no", so it does not opt in).
pub fn xen_opt_in(chosen: FdtNode) -> (bool, Option<String>) {
    match chosen.property(XEN_OPT_IN) {
        None => (false, None),
        Some(p) if p.value.is_empty() => (true, None),
        Some(_) => (
            false,
            Some(format!(
                "/chosen: `{XEN_OPT_IN}` is a boolean and takes no value (write `{XEN_OPT_IN};`): Xen configurations ignored"
            )),
        ),
    }
}

/// The options `/chosen` gives: `xen,xen-bootargs` (under the opt-in) first, then
/// `smmu-hv,bootargs`, whose words win. Warnings name the property they come from.
pub fn hv_options_of(chosen: FdtNode) -> (HvOptions, Vec<String>) {
    let mut opts = HvOptions::default();
    let mut warnings = Vec::new();
    let (xen, _) = xen_opt_in(chosen);
    let props = [(xen, XEN_BOOTARGS), (true, HV_BOOTARGS)];
    for (_, name) in props.into_iter().filter(|(read, _)| *read) {
        if chosen.property(name).is_none() {
            continue;
        }
        let Some(line) = prop_str(chosen, name) else {
            warnings.push(format!(
                "/chosen/{name}: not a NUL-terminated string: ignored"
            ));
            continue;
        };
        let (o, w) = parse_hv_bootargs(line);
        opts.merge(o);
        warnings.extend(w.into_iter().map(|w| format!("/chosen/{name}: {w}")));
    }
    (opts, warnings)
}

/// [`hv_options_of`] the DT's `/chosen`: defaults if there is none.
pub fn hv_options(dtb: &[u8]) -> Result<(HvOptions, Vec<String>), PlatformError> {
    with_fdt(dtb, |fdt| match fdt.find_node("/chosen") {
        Some(chosen) => hv_options_of(chosen),
        None => (HvOptions::default(), Vec::new()),
    })
}
