//! What the guests print about themselves, checked: the stock guest's init facts (kernel
//! release, CPU count and features, an MD5, timer interrupts), and the bound on the worker's
//! load gaps.

use crate::md5::md5_hex;
use crate::paths::{guest_kver, stock_guest_dir};
use crate::{Error, Qemu, BOOT_TIMEOUT, STEP_TIMEOUT};
use std::path::Path;
use std::time::Duration;

/// What the stock guest's init proved, beyond the checked facts.
#[derive(Clone, Debug)]
pub struct GuestReport {
    /// Time from QEMU's start to `guest: init started`.
    pub init_started_at: Duration,
    /// The VM name the guest read from its DT (`/chosen/hypervisor,vm-name`), `none` without one.
    pub vm_name: String,
    /// The timer interrupt counts before and after the guest slept one second.
    pub timer_irqs: (u64, u64),
    /// The CPU features its kernel found (`Features` of /proc/cpuinfo).
    pub cpu_features: Vec<String>,
}

/// Features of QEMU's `-cpu max,sve=off,sme=off` a guest must keep under the hypervisor: plain
/// EL0/EL1 instructions and state it switches nothing for (pointer authentication and BTI are
/// left untrapped, MOPS is enabled in HCRX_EL2).
pub const CPU_FEATURES_KEPT: [&str; 9] = [
    "fp", "asimd", "atomics", "lrcpc", "paca", "pacg", "bti", "ecv", "mops",
];
/// Features a guest must never see under the hypervisor: their state is trapped (SVE, SME) or
/// not given to it (MTE tag storage).
pub const CPU_FEATURES_HIDDEN: [&str; 5] = ["sve", "sve2", "sme", "mte", "mte3"];

/// Checks, in the order the stock guest's init prints them, the facts it computes at run time
/// against what the host expects: the kernel release (the `kver` file of `guest_dir`), the CPU
/// count `nproc`, the MD5 of 4 MiB of 'A' (computed here), and that timer interrupts kept coming
/// while the guest slept. Panics with the reason on a wrong fact (the log is then printed).
/// Looks at every console line (one guest); see [`check_vm_guest_facts`] for one VM among several.
pub fn check_guest_facts(
    q: &mut Qemu,
    guest_dir: &Path,
    nproc: usize,
) -> Result<GuestReport, Error> {
    guest_facts(q, None, guest_dir, nproc)
}

/// As [`check_guest_facts`] for the next boot of VM `vm`, among its own console lines only
/// (`[vm] ...`, with the VM's own cursor: other VMs' lines are left for their own waits), and
/// checks that the guest's DT names it `vm`.
pub fn check_vm_guest_facts(
    q: &mut Qemu,
    vm: &str,
    guest_dir: &Path,
    nproc: usize,
) -> Result<GuestReport, Error> {
    let report = guest_facts(q, Some(vm), guest_dir, nproc)?;
    assert_eq!(
        report.vm_name, vm,
        "the VM name in the guest's DT (/chosen/hypervisor,vm-name) of the guest printing as [{vm}]"
    );
    Ok(report)
}

fn guest_facts(
    q: &mut Qemu,
    vm: Option<&str>,
    guest_dir: &Path,
    nproc: usize,
) -> Result<GuestReport, Error> {
    let kver = guest_kver(guest_dir).expect("the guest images have a kver file");
    let md5 = md5_hex(&vec![b'A'; 4 << 20]);
    let who = vm.map_or_else(|| "guest".to_string(), |vm| format!("{vm}'s guest"));
    let fact = |q: &mut Qemu, key: &str| match vm {
        Some(vm) => q.wait_vm_fact(vm, key, STEP_TIMEOUT),
        None => q.wait_fact(key, STEP_TIMEOUT),
    };

    let started = match vm {
        Some(vm) => q.wait_vm_until(vm, "\"guest: init started\"", BOOT_TIMEOUT, |l| {
            l.contains("guest: init started")
        })?,
        None => q.wait_for_line("guest: init started", BOOT_TIMEOUT)?,
    };
    eprintln!(
        "[qemu] {}: {who} init started {:.2} s after QEMU's start",
        q.name(),
        started.at.as_secs_f64()
    );
    let vm_name = fact(q, "vm-name")?;
    assert_eq!(
        fact(q, "uname-r")?,
        kver,
        "{who}'s kernel release (uname -r)"
    );
    assert_eq!(
        fact(q, "nproc")?,
        nproc.to_string(),
        "{who}'s CPU count (nproc)"
    );
    let cpu_features: Vec<String> = fact(q, "cpu-features")?
        .split(',')
        .map(str::to_string)
        .collect();
    // Under the hypervisor; the modular kernel is built without most of these features.
    if vm_name != "none" && guest_dir == stock_guest_dir() {
        for f in CPU_FEATURES_KEPT {
            assert!(
                cpu_features.iter().any(|c| c == f),
                "{who} lost CPU feature {f:?} under the hypervisor: {cpu_features:?}"
            );
        }
        for f in CPU_FEATURES_HIDDEN {
            assert!(
                !cpu_features.iter().any(|c| c == f),
                "{who} sees CPU feature {f:?}, which the hypervisor does not give it"
            );
        }
    }
    assert_eq!(fact(q, "md5-4MiB-A")?, md5, "{who}'s MD5 of 4 MiB of 'A'");
    let grew = fact(q, "timer-irqs-grew")?;
    let timer_irqs = grew
        .split_once("->")
        .and_then(|(a, b)| Some((a.trim().parse::<u64>().ok()?, b.trim().parse::<u64>().ok()?)))
        .unwrap_or_else(|| panic!("{who}: timer-irqs-grew={grew:?} is not A->B"));
    assert!(
        timer_irqs.1 > timer_irqs.0,
        "{who}'s timer interrupts did not grow while it slept: {grew}"
    );
    Ok(GuestReport {
        init_started_at: started.at,
        vm_name,
        timer_irqs,
        cpu_features,
    })
}

/// The longest the worker's load may go between two rounds' ends (its `maxgap-ms`). A round is a
/// 1 MiB read, a 64 KiB write and read-back and a few processes, on TCG sharing two host cores
/// with the other VM: 0.06-0.25 s measured. The longest gap measured: 1190 ms (while the other
/// VM cycled its driver and another QEMU ran on the host), otherwise 220-530 ms. A stall of the
/// worker's DMA behind the other VM's driver reset (a global SMMU disable or invalidation, a
/// physical queue stuck on the other VM's commands) would last for the whole reset or past the
/// guest's 1 s CMD_SYNC timeout, and its block layer's 30 s request timeout; 5 s is 4x the worst
/// measured, room for a busy host, and still catches those.
pub const MAX_LOAD_GAP_MS: u64 = 5000;

/// What `hvfpcheck` (tests/guest/fpcheck.c, in the modular guest) printed: `fpcheck: ok traps=N
/// mismatches=0 threads=2 batch=1000 secs=S ns_per_trap=X reg=0xV`, or `fpcheck: FAIL ...
/// first=...` with the first mismatch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FpCheck {
    /// `ok` rather than `FAIL`.
    pub ok: bool,
    /// Trapping reads of all its threads.
    pub traps: u64,
    /// Registers (or FPCR, FPSR, the value read) found different from what they must be.
    pub mismatches: u64,
    /// The run's wall-clock time over the reads of one thread (the threads run at once).
    pub ns_per_trap: u64,
    /// The line, from `fpcheck:` on.
    pub text: String,
}

/// Parses an `fpcheck: ...` line (anything before `fpcheck:`, such as a VM prefix, is skipped).
pub fn parse_fpcheck(line: &str) -> Option<FpCheck> {
    let (_, rest) = line.split_once("fpcheck: ")?;
    let rest = rest.trim_end();
    let mut words = rest.split_whitespace();
    let ok = match words.next()? {
        "ok" => true,
        "FAIL" => false,
        _ => return None,
    };
    let field = |key: &str| -> Option<u64> {
        rest.split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    Some(FpCheck {
        ok,
        traps: field("traps")?,
        mismatches: field("mismatches")?,
        ns_per_trap: field("ns_per_trap").unwrap_or(0),
        text: format!("fpcheck: {rest}"),
    })
}

/// Checks the `fpcheck:` line `line` of VM `vm`: `ok`, no mismatch, exactly `traps` reads.
/// Panics with the line otherwise.
pub fn check_fpcheck(vm: &str, line: &str, traps: u64) -> FpCheck {
    let f = parse_fpcheck(line).unwrap_or_else(|| panic!("{vm}: unreadable fpcheck line {line:?}"));
    assert!(
        f.ok && f.mismatches == 0,
        "{vm}'s FP/SIMD registers, FPCR or FPSR changed across the hypervisor's traps: {}",
        f.text
    );
    assert_eq!(f.traps, traps, "{vm}'s fpcheck reads: {}", f.text);
    f
}
