//! A QEMU runner for the integration tests.
//!
//! [`Qemu::spawn`] starts `qemu/board-virt.sh` (which execs QEMU) in its own process group, with stdin
//! piped so a test can type into the guest console and stdout and stderr captured line by line into a
//! log. Tests wait for lines ([`Qemu::wait_for`], [`Qemu::wait_fact`]), type ([`Qemu::send`]) and wait
//! for QEMU to exit ([`Qemu::wait_exit`]).
//!
//! Every wait is bounded, and so is the whole run: a wall-clock limit kills QEMU and its process
//! group, and a `timeout` wrapper kills it even if the test process itself dies. QEMU is always killed
//! on drop. On any failure (a wait that failed, or a panic such as a failed assertion) the whole
//! console log is printed with a clear header. The log is also written, as it arrives, to
//! `target/qemu-logs/<name>.log`.
//!
//! Guest facts are lines like `guest: nproc=2` printed by the guest's init (`tests/guest/init`);
//! [`guest_fact`] splits them into key and value.
//!
//! With several VMs the hypervisor prefixes every guest console line with the VM's name
//! (`[vm1] guest: nproc=2`) and its own lines with `[hv] `. The `wait_vm_*` methods look only at
//! one VM's lines, each VM with a cursor of its own, so waiting for vm0 does not skip vm1's lines;
//! [`vm_text`] strips the prefix.
//!
//! Set `HV_TEST_ECHO=1` to also echo the console live to the test's stderr.

#![forbid(unsafe_code)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// How long a guest may take from QEMU's start to its first `guest:` line (TCG on two slow cores).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// How long one step after boot (a fact, a command's answer, the power-off) may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(60);
/// Wall-clock limit of one whole QEMU run, whatever the test waits for.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(420);

/// Extra time the `timeout` wrapper grants beyond the runner's own wall-clock limit; it only acts
/// when the test process could not (it died).
const BACKSTOP_GRACE: Duration = Duration::from_secs(30);
/// How often the monitor thread checks QEMU's exit and the wall clock.
const POLL: Duration = Duration::from_millis(20);

/// The repository root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
        .to_path_buf()
}

/// The stock guest images built by `qemu/setup.sh`.
pub fn stock_guest_dir() -> PathBuf {
    repo_root().join("build/guest/stock")
}

/// The modular guest images built by `qemu/kernel.sh` (`arm_smmu_v3` as a module, which the guest
/// can unload and reload).
pub fn modular_guest_dir() -> PathBuf {
    repo_root().join("build/guest/modular")
}

/// The kernel release of the guest images in `dir` (its `kver` file), as `uname -r` prints it.
pub fn guest_kver(dir: &Path) -> io::Result<String> {
    let path = dir.join("kver");
    fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: {e} (run qemu/setup.sh)", path.display()),
            )
        })
}

/// The cargo target directory (`CARGO_TARGET_DIR` or the workspace's `target/`).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => repo_root().join(dir),
        None => repo_root().join("target"),
    }
}

/// The text of `line` without its `[VM] ` console prefix if it is a line of VM `vm`
/// (`vm_text("[vm1] guest: count=3", "vm1") == Some("guest: count=3")`); `None` for any other line.
pub fn vm_text<'a>(line: &'a str, vm: &str) -> Option<&'a str> {
    line.strip_prefix('[')?.strip_prefix(vm)?.strip_prefix("] ")
}

/// The name in the `[NAME] ` prefix of a console line (`"vm1"`, `"hv"`), if it has one.
pub fn line_source(line: &str) -> Option<&str> {
    let (name, _) = line.strip_prefix('[')?.split_once("] ")?;
    (!name.is_empty() && !name.contains(char::is_whitespace)).then_some(name)
}

/// Splits a guest fact line such as `guest: nproc=2` into `("nproc", "2")`.
///
/// The `guest: ` marker may sit anywhere in the line (a kernel message can precede it on the
/// console); the key is one word, the value runs to the end of the line, trimmed.
pub fn guest_fact(line: &str) -> Option<(&str, &str)> {
    let (_, rest) = line.split_once("guest: ")?;
    let (key, value) = rest.split_once('=')?;
    if key.is_empty() || key.contains(char::is_whitespace) {
        return None;
    }
    Some((key, value.trim()))
}

/// The MD5 digest of `data` in lowercase hex, as `md5sum` prints it (RFC 1321).
pub fn md5_hex(data: &[u8]) -> String {
    const S: [u32; 64] = [
        7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 7, 12, 17, 22, 5, 9, 14, 20, 5, 9, 14, 20, 5,
        9, 14, 20, 5, 9, 14, 20, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 4, 11, 16, 23, 6, 10,
        15, 21, 6, 10, 15, 21, 6, 10, 15, 21, 6, 10, 15, 21,
    ];
    // K[i] = floor(2^32 * |sin(i + 1)|).
    let k: Vec<u32> = (0..64)
        .map(|i| ((i as f64 + 1.0).sin().abs() * 4_294_967_296.0) as u32)
        .collect();
    let mut h: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

    let mut msg = data.to_vec();
    let bit_len = (data.len() as u64).wrapping_mul(8);
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&bit_len.to_le_bytes());

    for block in msg.chunks_exact(64) {
        let m: Vec<u32> = block
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        let [mut a, mut b, mut c, mut d] = h;
        for i in 0..64 {
            let (f, g) = match i / 16 {
                0 => ((b & c) | (!b & d), i),
                1 => ((d & b) | (!d & c), (5 * i + 1) % 16),
                2 => (b ^ c ^ d, (3 * i + 5) % 16),
                _ => (c ^ (b | !d), (7 * i) % 16),
            };
            let rotated = a
                .wrapping_add(f)
                .wrapping_add(k[i])
                .wrapping_add(m[g])
                .rotate_left(S[i]);
            a = d;
            d = c;
            c = b;
            b = b.wrapping_add(rotated);
        }
        for (acc, v) in h.iter_mut().zip([a, b, c, d]) {
            *acc = acc.wrapping_add(v);
        }
    }
    h.iter()
        .flat_map(|w| w.to_le_bytes())
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

/// Which QEMU output a line came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// QEMU's stdout: the serial console (hypervisor and guest output).
    Stdout,
    /// QEMU's stderr (and the board script's messages).
    Stderr,
}

/// One line of QEMU output.
#[derive(Clone, Debug)]
pub struct Line {
    /// The text, without the line ending.
    pub text: String,
    /// Time from QEMU's start to the line's arrival.
    pub at: Duration,
    /// Where it came from.
    pub stream: Stream,
}

/// Why a wait or an action on QEMU failed.
pub enum Error {
    /// QEMU could not be started.
    Spawn(io::Error),
    /// Writing to QEMU's stdin (the guest console) failed.
    Send(io::Error),
    /// The awaited thing did not happen in time.
    Timeout {
        /// What was awaited.
        what: String,
        /// How long it was awaited.
        waited: Duration,
    },
    /// The run's wall-clock limit passed: QEMU was killed.
    WallClock {
        /// What was awaited when it happened.
        what: String,
        /// The limit.
        limit: Duration,
    },
    /// QEMU exited (and its output ended) before the awaited thing happened.
    Exited {
        /// What was awaited.
        what: String,
        /// QEMU's exit status.
        status: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Spawn(e) => write!(f, "could not start qemu/board-virt.sh: {e}"),
            Error::Send(e) => write!(f, "could not type into the guest console: {e}"),
            Error::Timeout { what, waited } => {
                write!(
                    f,
                    "timed out after {:.1} s waiting for {what}",
                    waited.as_secs_f64()
                )
            }
            Error::WallClock { what, limit } => write!(
                f,
                "wall-clock limit of {} s reached (QEMU killed) while waiting for {what}",
                limit.as_secs()
            ),
            Error::Exited { what, status } => {
                write!(f, "QEMU exited ({status}) while waiting for {what}")
            }
        }
    }
}

// `Debug` as `Display`: a test returning `Err` shows a readable message.
impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for Error {}

/// State shared by the runner and its threads.
struct State {
    lines: Vec<Line>,
    /// The unfinished last line of each stream (a shell prompt has no newline).
    partial: [String; 2],
    eof: [bool; 2],
    child: Child,
    status: Option<ExitStatus>,
    /// Set when the runner killed QEMU, with the reason.
    killed: Option<String>,
    /// Set by drop: the monitor thread stops.
    closing: bool,
}

struct Shared {
    name: String,
    start: Instant,
    limit: Duration,
    echo: bool,
    state: Mutex<State>,
    changed: Condvar,
    log: Mutex<Option<BufWriter<File>>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking reader thread must not hide the log from the failure report.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_log(&self, text: &str) {
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = log.as_mut() {
            // The log file is a convenience; the in-memory log is what failures print.
            let _ = writeln!(w, "{text}").and_then(|()| w.flush());
        }
    }

    /// Records complete lines from `buf` (and keeps the unfinished rest as the stream's partial line).
    fn push_output(&self, stream: Stream, buf: &[u8], eof: bool) {
        let idx = stream as usize;
        let at = self.start.elapsed();
        let mut done = Vec::new();
        {
            let mut st = self.lock();
            st.partial[idx].push_str(&String::from_utf8_lossy(buf));
            while let Some(nl) = st.partial[idx].find('\n') {
                let rest = st.partial[idx].split_off(nl + 1);
                let line = std::mem::replace(&mut st.partial[idx], rest);
                done.push(line.trim_end_matches(['\n', '\r']).to_string());
            }
            if eof {
                if !st.partial[idx].is_empty() {
                    done.push(std::mem::take(&mut st.partial[idx]));
                }
                st.eof[idx] = true;
            }
            for text in &done {
                st.lines.push(Line {
                    text: text.clone(),
                    at,
                    stream,
                });
            }
        }
        self.changed.notify_all();
        for text in &done {
            self.write_log(text);
            if self.echo {
                eprintln!("[{}] {text}", self.name);
            }
        }
    }

    /// Kills QEMU and its process group unless it has already been reaped; waits for it.
    fn kill(&self, st: &mut State, reason: &str) {
        if st.status.is_some() {
            return;
        }
        let pid = st.child.id();
        // The whole group: the `timeout` wrapper, QEMU and anything they started.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{pid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = st.child.kill();
        if let Ok(status) = st.child.wait() {
            st.status = Some(status);
        }
        st.killed = Some(reason.to_string());
        self.changed.notify_all();
    }
}

fn reader(shared: Arc<Shared>, stream: Stream, mut pipe: impl Read) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => {
                shared.push_output(stream, &[], true);
                return;
            }
            Ok(n) => shared.push_output(stream, &buf[..n], false),
        }
    }
}

/// Watches for QEMU's exit and enforces the wall-clock limit.
fn monitor(shared: Arc<Shared>) {
    loop {
        {
            let mut st = shared.lock();
            if st.status.is_some() || st.closing {
                return;
            }
            match st.child.try_wait() {
                Ok(Some(status)) => {
                    st.status = Some(status);
                    drop(st);
                    shared.changed.notify_all();
                    return;
                }
                Ok(None) => {}
                Err(_) => return,
            }
            if shared.start.elapsed() >= shared.limit {
                let reason = format!("wall-clock limit of {} s", shared.limit.as_secs());
                shared.kill(&mut st, &reason);
                return;
            }
        }
        thread::sleep(POLL);
    }
}

/// A running QEMU (through `qemu/board-virt.sh`). Killed on drop.
pub struct Qemu {
    shared: Arc<Shared>,
    stdin: Option<ChildStdin>,
    /// Index of the first line not yet consumed by a wait.
    cursor: usize,
    /// The same for the `wait_vm_*` waits, per VM.
    vm_cursors: HashMap<String, usize>,
    failed: bool,
    log_path: PathBuf,
    monitor: Option<JoinHandle<()>>,
}

impl fmt::Debug for Qemu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qemu")
            .field("name", &self.shared.name)
            .field("cursor", &self.cursor)
            .field("log", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl Qemu {
    /// Starts `qemu/board-virt.sh ARGS` from the repository root, with a wall-clock limit of
    /// [`RUN_TIMEOUT`]. `name` names the log file, `target/qemu-logs/<name>.log`.
    pub fn spawn(name: &str, args: &[&str]) -> Result<Qemu, Error> {
        Self::spawn_with_limit(name, args, RUN_TIMEOUT)
    }

    /// Two VMs, each with its `--pci` disk and NIC and its own kernel command line, on the guest
    /// images in `guest` (the stock ones for `None`), under a wall-clock `limit`.
    pub fn spawn_two_pci_vms(
        name: &str,
        guest: Option<&Path>,
        vm0_args: &str,
        vm1_args: &str,
        limit: Duration,
    ) -> Result<Qemu, Error> {
        let guest = guest.map(|g| g.to_str().expect("the repository path is UTF-8"));
        let mut args = vec!["--vms", "2", "--pci"];
        if let Some(g) = guest {
            args.extend(["--guest", g]);
        }
        args.extend([
            "--vm-bootargs",
            "0",
            vm0_args,
            "--vm-bootargs",
            "1",
            vm1_args,
        ]);
        Qemu::spawn_with_limit(name, &args, limit)
    }

    /// As [`Qemu::spawn`], with the wall-clock limit `limit`.
    pub fn spawn_with_limit(name: &str, args: &[&str], limit: Duration) -> Result<Qemu, Error> {
        let root = repo_root();
        let log_dir = target_dir().join("qemu-logs");
        let log_path = log_dir.join(format!("{name}.log"));
        let log = fs::create_dir_all(&log_dir)
            .and_then(|()| File::create(&log_path))
            .map(BufWriter::new)
            .map_err(|e| eprintln!("[qemu] warning: no log file {}: {e}", log_path.display()))
            .ok();

        let board = root.join("qemu/board-virt.sh");
        let backstop = limit + BACKSTOP_GRACE;
        eprintln!(
            "[qemu] {name}: qemu/board-virt.sh {} (limit {} s, log {})",
            shell_words(args),
            limit.as_secs(),
            log_path.display()
        );
        // `timeout` kills QEMU even if this process dies without running our drop; the process
        // group lets us kill the wrapper and QEMU together.
        let mut child = Command::new("timeout")
            .args(["-k", "5", &format!("{}s", backstop.as_secs())])
            .arg(&board)
            .args(args)
            .current_dir(&root)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .map_err(Error::Spawn)?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");

        let shared = Arc::new(Shared {
            name: name.to_string(),
            start: Instant::now(),
            limit,
            echo: std::env::var_os("HV_TEST_ECHO").is_some_and(|v| !v.is_empty() && v != "0"),
            state: Mutex::new(State {
                lines: Vec::new(),
                partial: [String::new(), String::new()],
                eof: [false, false],
                child,
                status: None,
                killed: None,
                closing: false,
            }),
            changed: Condvar::new(),
            log: Mutex::new(log),
        });
        // Readers run until EOF, which QEMU's death guarantees; they are not joined.
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, Stream::Stdout, stdout));
        let s = Arc::clone(&shared);
        thread::spawn(move || reader(s, Stream::Stderr, stderr));
        let s = Arc::clone(&shared);
        let monitor = Some(thread::spawn(move || monitor(s)));

        Ok(Qemu {
            shared,
            stdin,
            cursor: 0,
            vm_cursors: HashMap::new(),
            failed: false,
            log_path,
            monitor,
        })
    }

    /// Time since QEMU was started.
    pub fn elapsed(&self) -> Duration {
        self.shared.start.elapsed()
    }

    /// Waits up to `timeout` for a line after the last one a wait consumed that contains `pattern`;
    /// consumes the lines up to and including it and returns its text.
    pub fn wait_for(&mut self, pattern: &str, timeout: Duration) -> Result<String, Error> {
        self.wait_for_line(pattern, timeout).map(|l| l.text)
    }

    /// As [`Qemu::wait_for`], returning the whole [`Line`] (with its arrival time).
    pub fn wait_for_line(&mut self, pattern: &str, timeout: Duration) -> Result<Line, Error> {
        self.wait_until(&format!("a line containing {pattern:?}"), timeout, |l| {
            l.contains(pattern)
        })
    }

    /// As [`Qemu::wait_for`], for a line that contains every one of `patterns`.
    pub fn wait_for_all(&mut self, patterns: &[&str], timeout: Duration) -> Result<String, Error> {
        let what = format!("a line containing all of {patterns:?}");
        self.wait_until(&what, timeout, |l| patterns.iter().all(|p| l.contains(p)))
            .map(|l| l.text)
    }

    /// Waits up to `timeout` for the guest fact `guest: KEY=VALUE`; returns VALUE.
    pub fn wait_fact(&mut self, key: &str, timeout: Duration) -> Result<String, Error> {
        let what = format!("the guest fact \"guest: {key}=...\"");
        let line = self.wait_until(&what, timeout, |l| {
            guest_fact(l).is_some_and(|(k, _)| k == key)
        })?;
        let (_, value) = guest_fact(&line.text).expect("the line matched as a fact");
        Ok(value.to_string())
    }

    /// Waits up to `timeout` for a line after the cursor for which `pred` holds; `what` describes it
    /// in errors. Consumes the lines up to and including it.
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, Error> {
        let mut cursor = self.cursor;
        let result = self.wait_from(&mut cursor, what, timeout, pred);
        self.cursor = cursor;
        self.note(result)
    }

    /// Waits up to `timeout` for a console line of VM `vm` (one that starts with `[vm] `) for
    /// which `pred` holds on its text without the prefix; `what` describes it in errors. Only
    /// `vm`'s own cursor moves: other waits still see every line.
    pub fn wait_vm_until(
        &mut self,
        vm: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, Error> {
        let mut cursor = self.vm_cursors.get(vm).copied().unwrap_or(0);
        let what = format!("{what} from [{vm}]");
        let result = self.wait_from(&mut cursor, &what, timeout, |l| {
            vm_text(l, vm).is_some_and(&pred)
        });
        self.vm_cursors.insert(vm.to_string(), cursor);
        self.note(result)
    }

    /// As [`Qemu::wait_for`] among the lines of VM `vm`; returns the text without the prefix.
    pub fn wait_vm_for(
        &mut self,
        vm: &str,
        pattern: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        let what = format!("a line containing {pattern:?}");
        let line = self.wait_vm_until(vm, &what, timeout, |l| l.contains(pattern))?;
        Ok(vm_text(&line.text, vm).unwrap_or_default().to_string())
    }

    /// As [`Qemu::wait_fact`] among the lines of VM `vm`: waits for `[vm] guest: KEY=VALUE`.
    pub fn wait_vm_fact(
        &mut self,
        vm: &str,
        key: &str,
        timeout: Duration,
    ) -> Result<String, Error> {
        let what = format!("the guest fact \"guest: {key}=...\"");
        let line = self.wait_vm_until(vm, &what, timeout, |l| {
            guest_fact(l).is_some_and(|(k, _)| k == key)
        })?;
        let (_, value) = guest_fact(&line.text).expect("the line matched as a fact");
        Ok(value.to_string())
    }

    /// Every complete line so far, with arrival times (for checks over the whole run).
    pub fn lines(&self) -> Vec<Line> {
        self.shared.lock().lines.clone()
    }

    /// The waiting behind [`Qemu::wait_until`], from `*cursor` (moved past the line found, or to
    /// the end). Does not record a failure: the callers do.
    fn wait_from(
        &self,
        cursor: &mut usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, Error> {
        let started = Instant::now();
        let until = started + timeout;
        let shared = &self.shared;
        let mut st = shared.lock();
        loop {
            if let Some(i) = st.lines[*cursor..].iter().position(|l| pred(&l.text)) {
                let line = st.lines[*cursor + i].clone();
                *cursor += i + 1;
                break Ok(line);
            }
            *cursor = st.lines.len();
            if let Some(reason) = st.killed.as_ref().filter(|_| st.eof == [true, true]) {
                break Err(if reason.starts_with("wall-clock") {
                    Error::WallClock {
                        what: what.to_string(),
                        limit: shared.limit,
                    }
                } else {
                    Error::Exited {
                        what: what.to_string(),
                        status: format!("killed: {reason}"),
                    }
                });
            }
            if let (Some(status), [true, true]) = (st.status, st.eof) {
                break Err(Error::Exited {
                    what: what.to_string(),
                    status: describe(status),
                });
            }
            let now = Instant::now();
            if now >= until {
                break Err(Error::Timeout {
                    what: what.to_string(),
                    waited: now - started,
                });
            }
            st = shared
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Best effort: waits up to `timeout` for an unfinished console line (a shell prompt has no
    /// newline) that ends with `prompt`, ignoring terminal escape sequences (busybox's line editor
    /// follows its prompt with a cursor-position query) and trailing blanks. Returns whether it appeared; never a failure by itself.
    pub fn wait_for_prompt(&mut self, prompt: &str, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        loop {
            let partial = strip_ansi(&st.partial[Stream::Stdout as usize]);
            if partial.trim_end().ends_with(prompt.trim_end()) {
                return true;
            }
            let now = Instant::now();
            if now >= until || st.status.is_some() {
                return false;
            }
            st = shared
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Types `text` into the guest console (QEMU's stdin). Include the `\n`.
    pub fn send(&mut self, text: &str) -> Result<(), Error> {
        self.shared
            .write_log(&format!("[qemu-runner] typed: {text:?}"));
        let result = match self.stdin.as_mut() {
            Some(stdin) => stdin
                .write_all(text.as_bytes())
                .and_then(|()| stdin.flush())
                .map_err(Error::Send),
            None => Err(Error::Send(io::Error::other("stdin already closed"))),
        };
        self.note(result)
    }

    /// Waits up to `timeout` for QEMU to exit by itself (and its output to end); returns its status.
    /// Exiting with a failure status is returned as `Ok`: check it.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, Error> {
        let started = Instant::now();
        let until = started + timeout;
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        let result = loop {
            if let Some(reason) = &st.killed {
                break Err(if reason.starts_with("wall-clock") {
                    Error::WallClock {
                        what: "QEMU to exit".to_string(),
                        limit: shared.limit,
                    }
                } else {
                    Error::Exited {
                        what: "QEMU to exit by itself".to_string(),
                        status: format!("killed: {reason}"),
                    }
                });
            }
            let now = Instant::now();
            match st.status {
                // Exited: give the readers a moment to drain the pipes so the log is complete.
                Some(status) if st.eof == [true, true] || now >= until => break Ok(status),
                None if now >= until => {
                    break Err(Error::Timeout {
                        what: "QEMU to exit".to_string(),
                        waited: now - started,
                    })
                }
                _ => {}
            }
            st = shared
                .changed
                .wait_timeout(st, (until - now).min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        drop(st);
        let result = self.note(result)?;
        eprintln!(
            "[qemu] {}: QEMU exited ({}) after {:.1} s",
            self.shared.name,
            describe(result),
            self.elapsed().as_secs_f64()
        );
        Ok(result)
    }

    /// The whole console log so far, one line per line.
    pub fn log(&self) -> String {
        let st = self.shared.lock();
        let mut out = String::new();
        for line in &st.lines {
            out.push_str(&line.text);
            out.push('\n');
        }
        for partial in &st.partial {
            if !partial.is_empty() {
                out.push_str(partial);
                out.push_str("  <no newline yet>\n");
            }
        }
        out
    }

    /// Where the log file is.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn note<T>(&mut self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.failed = true;
            eprintln!("[qemu] {}: FAILED: {e}", self.shared.name);
        }
        result
    }

    fn print_log(&self) {
        let log = self.log();
        let name = &self.shared.name;
        let mut err = io::stderr().lock();
        let _ = writeln!(
            err,
            "\n========== QEMU console log of '{name}' ({} lines, {:.1} s; also in {}) ==========",
            log.lines().count(),
            self.elapsed().as_secs_f64(),
            self.log_path.display()
        );
        let _ = err.write_all(log.as_bytes());
        let _ = writeln!(
            err,
            "========== end of the QEMU console log of '{name}' ==========\n"
        );
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Closing stdin first lets nothing block on a full pipe.
        self.stdin = None;
        {
            let mut st = self.shared.lock();
            st.closing = true;
            self.shared.kill(&mut st, "the test ended");
        }
        if let Some(monitor) = self.monitor.take() {
            let _ = monitor.join();
        }
        // Let the readers reach EOF (bounded) so the printed log is complete.
        {
            let until = Instant::now() + Duration::from_secs(5);
            let mut st = self.shared.lock();
            while st.eof != [true, true] && Instant::now() < until {
                st = self
                    .shared
                    .changed
                    .wait_timeout(st, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if self.failed || thread::panicking() {
            self.print_log();
        }
        let mut log = self.shared.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(mut w) = log.take() {
            let _ = w.flush();
        }
    }
}

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
        q.shared.name,
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

/// The part of each `--pci` disk image the host and the guest checksum: its first 8 MiB.
pub const DISK_CONTENT: usize = 8 << 20;
/// The whole `--pci` disk: the content, then 1 MiB of scratch that the guest writes each boot.
pub const DISK_BYTES: usize = DISK_CONTENT + (1 << 20);

/// The MD5 of the first [`DISK_CONTENT`] bytes of VM `vm`'s disk image `build/disks/VM.img` (made
/// by the board script's `--pci`); panics if it is missing or not [`DISK_BYTES`] long.
pub fn host_disk_md5(vm: &str) -> String {
    let path = repo_root().join(format!("build/disks/{vm}.img"));
    let data = fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(data.len(), DISK_BYTES, "the size of {}", path.display());
    md5_hex(&data[..DISK_CONTENT])
}

/// Checks the disk facts of VM `vm`'s next boot, in the order its guest prints them: its
/// `/dev/vda` size ([`DISK_BYTES`]), the MD5 of its first [`DISK_CONTENT`] bytes against the
/// host's of its image ([`host_disk_md5`]), and its scratch MiB written and read back
/// (`disk-rw=ok`). Returns the MD5.
pub fn check_vm_disk(q: &mut Qemu, vm: &str) -> Result<String, Error> {
    assert_eq!(
        q.wait_vm_fact(vm, "disk-bytes", STEP_TIMEOUT)?,
        DISK_BYTES.to_string(),
        "{vm}'s /dev/vda size"
    );
    let md5 = q.wait_vm_fact(vm, "disk-md5", STEP_TIMEOUT)?;
    assert_eq!(
        md5,
        host_disk_md5(vm),
        "{vm}'s MD5 of its disk's first {DISK_CONTENT} bytes against the host's of \
         build/disks/{vm}.img"
    );
    assert_eq!(
        q.wait_vm_fact(vm, "disk-rw", STEP_TIMEOUT)?,
        "ok",
        "{vm} read back (O_DIRECT) the pattern it wrote to its disk's scratch MiB"
    );
    Ok(md5)
}

/// Checks that VM `vm` pinged the other VM over its own NIC and was pinged by it (`hvping=`).
pub fn check_vm_pings(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    assert_eq!(
        q.wait_vm_fact(vm, "ping", STEP_TIMEOUT)?,
        "ok",
        "{vm} pinging the other VM"
    );
    assert_eq!(
        q.wait_vm_fact(vm, "pinged", STEP_TIMEOUT)?,
        "yes",
        "{vm} pinged by the other VM"
    );
    Ok(())
}

/// What the board script's `--pci` gives a VM (its own virtio disk and NIC), and the network
/// address the tests give it.
#[derive(Debug)]
pub struct Assigned {
    /// The VM's name.
    pub vm: &'static str,
    /// The VMID the hypervisor gives the VM (vm0: 1, vm1: 2).
    pub vmid: u32,
    /// virtio-blk-pci (modern: 1af4:1042): its BDF and RequesterID (= StreamID).
    pub disk: (&'static str, u32),
    /// virtio-net-pci (modern: 1af4:1041): its BDF and RequesterID.
    pub nic: (&'static str, u32),
    /// The NIC's MAC address.
    pub mac: &'static str,
    /// The address the tests give its NIC (`hvip=IP/24`).
    pub ip: &'static str,
}

/// vm0's devices with `--pci`.
pub const VM0: Assigned = Assigned {
    vm: "vm0",
    vmid: 1,
    disk: ("00:01.0", 0x08),
    nic: ("00:02.0", 0x10),
    mac: "52:54:00:00:00:10",
    ip: "10.0.2.10",
};
/// vm1's devices with `--pci`.
pub const VM1: Assigned = Assigned {
    vm: "vm1",
    vmid: 2,
    disk: ("00:03.0", 0x18),
    nic: ("00:04.0", 0x20),
    mac: "52:54:00:00:00:11",
    ip: "10.0.2.11",
};

impl Assigned {
    /// The guest's `pci-list` of exactly these functions (BDF:VENDOR:DEVICE, sorted), without
    /// QEMU's host bridge.
    pub fn pci_list(&self) -> String {
        format!("{}:1af4:1042,{}:1af4:1041", self.disk.0, self.nic.0)
    }

    /// The guest's `iommu-groups` of exactly these functions (sorted BDFs).
    pub fn iommu_groups(&self) -> String {
        format!("{},{}", self.disk.0, self.nic.0)
    }

    /// Its StreamIDs, sorted.
    pub fn stream_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.disk.1, self.nic.1];
        ids.sort_unstable();
        ids
    }

    /// Kernel command line with its NIC at its address, pinging `peer` and waiting to be pinged.
    pub fn net_bootargs(&self, peer: &str) -> String {
        format!(
            "console=ttyAMA0 rdinit=/init hvip={}/24 hvping={peer} hvpinged=1",
            self.ip
        )
    }
}

/// The byte that starts a hypervisor console command (Ctrl-\).
pub const CONSOLE_ESCAPE: char = '\u{1c}';
/// [`type_paced`]: bytes per write to the console, and the pause after each.
const TYPE_CHUNK: usize = 8;
const TYPE_PAUSE: Duration = Duration::from_millis(100);

/// The text of a hypervisor line (`[hv] ...`) without the prefix and its log level tag, if any
/// (`[hv] WARN: smmu: event ...` gives `smmu: event ...`); `None` for any other line.
pub fn hv_text(line: &str) -> Option<&str> {
    let text = line.strip_prefix("[hv] ")?;
    Some(
        ["ERROR: ", "WARN: ", "DEBUG: ", "TRACE: "]
            .iter()
            .find_map(|tag| text.strip_prefix(tag))
            .unwrap_or(text),
    )
}

/// Sends a hypervisor console command: Ctrl-\ then `key`.
pub fn console_command(q: &mut Qemu, key: char) -> Result<(), Error> {
    q.send(&format!("{CONSOLE_ESCAPE}{key}"))
}

/// Types `text` into the focused VM's console a few bytes at a time (8 bytes per 100 ms): the
/// hypervisor's vPL011 has a 32-byte receive FIFO like the real one, and bytes that arrive while
/// it is full are lost (the guest logs `ttyAMA0: 1 input overrun(s)`).
pub fn type_paced(q: &mut Qemu, text: &str) -> Result<(), Error> {
    let mut rest = text;
    while !rest.is_empty() {
        let mut n = rest.len().min(TYPE_CHUNK);
        while !rest.is_char_boundary(n) {
            n -= 1;
        }
        let (chunk, tail) = rest.split_at(n);
        q.send(chunk)?;
        rest = tail;
        if !rest.is_empty() {
            thread::sleep(TYPE_PAUSE);
        }
    }
    Ok(())
}

/// Switches the console input to `vm` (Ctrl-\ then its digit) and waits for the hypervisor to
/// say so (a global wait: it consumes the lines up to that one).
pub fn focus(q: &mut Qemu, vm: &str) -> Result<(), Error> {
    console_command(q, vm.trim_start_matches("vm").chars().next().unwrap_or('?'))?;
    q.wait_for(&format!("[hv] console input -> {vm}"), STEP_TIMEOUT)?;
    Ok(())
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

/// The counters every `[hv] vsmmu: vmN stats: ...` line has (it may have more).
pub const VSMMU_STATS_KEYS: [&str; 9] = [
    "traps",
    "cmdq_prod",
    "cmdq_cons",
    "reg_reads",
    "reg_writes",
    "commands",
    "syncs",
    "guest_events",
    "s2_faults",
];

/// The counters of a `[hv] vsmmu: vmN stats: traps=1 cmdq_prod=2 ...` line (all of them, decimal;
/// at least [`VSMMU_STATS_KEYS`]); panics on anything else.
pub fn parse_stats(line: &str) -> BTreeMap<String, u64> {
    let (_, fields) = line
        .split_once(" stats: ")
        .unwrap_or_else(|| panic!("not a vSMMU stats line: {line:?}"));
    let stats: BTreeMap<String, u64> = fields
        .split_whitespace()
        .map(|f| {
            f.split_once('=')
                .and_then(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .unwrap_or_else(|| panic!("unreadable counter {f:?} in {line:?}"))
        })
        .collect();
    for key in VSMMU_STATS_KEYS {
        assert!(
            stats.contains_key(key),
            "the vSMMU stats line lacks {key}: {line:?}"
        );
    }
    stats
}

/// Asks the hypervisor for its vSMMU counters (Ctrl-\ s) and returns VM `vm`'s, from the first
/// stats line of `vm` after the last line a global wait consumed (the STE dump that follows is
/// left for the next wait, [`ste_lines`]).
pub fn vsmmu_stats(q: &mut Qemu, vm: &str) -> Result<BTreeMap<String, u64>, Error> {
    console_command(q, 's')?;
    let prefix = format!("vsmmu: {vm} stats: ");
    let what = format!("the hypervisor's line {prefix:?}...");
    let line = q.wait_until(&what, STEP_TIMEOUT, |l| {
        hv_text(l).is_some_and(|t| t.starts_with(&prefix))
    })?;
    println!("hypervisor: {}", line.text);
    Ok(parse_stats(&line.text))
}

/// The first STE dump line of each of `sids` after the last line a global wait consumed
/// (`[hv] smmu: STE 8 (IOMMU group 1): V=1 Nested, VMID 1, S2TTB 0x...`), by StreamID.
pub fn ste_lines(q: &mut Qemu, sids: &[u32]) -> Result<BTreeMap<u32, String>, Error> {
    let found = RefCell::new(BTreeMap::new());
    let what = format!("the STE dump lines of StreamIDs {sids:?}");
    q.wait_until(&what, STEP_TIMEOUT, |l| {
        let mut found = found.borrow_mut();
        for &sid in sids {
            if hv_text(l).is_some_and(|t| t.starts_with(&format!("smmu: STE {sid} ("))) {
                found.entry(sid).or_insert_with(|| l.to_string());
            }
        }
        found.len() == sids.len()
    })?;
    Ok(found.into_inner())
}

/// `text` without ANSI CSI escape sequences (`ESC [ params final`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(124), _) => "exit 124: killed by the timeout backstop".to_string(),
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

fn shell_words(args: &[&str]) -> String {
    args.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_=/.,:".contains(c))
            {
                a.to_string()
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_known_vectors() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
        assert_eq!(
            md5_hex(b"The quick brown fox jumps over the lazy dog"),
            "9e107d9d372bb6826bd81d3542a419d6"
        );
        // 56..64 bytes: the padding spills into a second block.
        assert_eq!(
            md5_hex(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"),
            "d174ab98d277d9f5a5611c2c9f419d9f"
        );
        assert_eq!(
            md5_hex(
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890"
            ),
            "57edf4a22be3c955ac49da2e2107b67a"
        );
    }

    #[test]
    fn ansi() {
        assert_eq!(strip_ansi("/ # \u{1b}[6n"), "/ # ");
        assert_eq!(strip_ansi("a\u{1b}[1;31mb\u{1b}[0mc"), "abc");
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn facts() {
        assert_eq!(guest_fact("guest: nproc=2"), Some(("nproc", "2")));
        assert_eq!(guest_fact("guest: nproc=2\r"), Some(("nproc", "2")));
        assert_eq!(
            guest_fact("[    1.0] x guest: timer-irqs-grew=10->20"),
            Some(("timer-irqs-grew", "10->20"))
        );
        assert_eq!(guest_fact("guest: init started"), None);
        assert_eq!(guest_fact("guest: shell (poweroff -f to stop)"), None);
        assert_eq!(guest_fact("nproc=2"), None);
    }

    #[test]
    fn vm_prefixes() {
        assert_eq!(
            vm_text("[vm1] guest: count=3", "vm1"),
            Some("guest: count=3")
        );
        assert_eq!(vm_text("[vm1] guest: count=3", "vm0"), None);
        assert_eq!(vm_text("[vm10] x", "vm1"), None);
        assert_eq!(vm_text("x [vm1] y", "vm1"), None);
        assert_eq!(vm_text("[vm1]", "vm1"), None);
        assert_eq!(line_source("[hv] vm0: reset done"), Some("hv"));
        assert_eq!(line_source("[vm1] guest: nproc=2"), Some("vm1"));
        assert_eq!(line_source("[    0.5] booting"), None);
        assert_eq!(line_source("guest: nproc=2"), None);
    }
}
