//! Running QEMU: [`Qemu::spawn`] starts `qemu/board-virt.sh` in its own process group under a
//! wall-clock limit and a `timeout` backstop, reader threads collect its output line by line
//! into memory and the log file, and drop kills it and prints the log on failure. The waits
//! on its output and typing into it are in [`expect`].

mod expect;

use crate::paths::{repo_root, target_dir};
use crate::text::LineJoiner;
use crate::{Error, RUN_TIMEOUT};
use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Extra time the `timeout` wrapper grants beyond the runner's own wall-clock limit; it only acts
/// when the test process could not (it died).
const BACKSTOP_GRACE: Duration = Duration::from_secs(30);
/// How often the monitor thread checks QEMU's exit and the wall clock.
const POLL: Duration = Duration::from_millis(20);

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

/// State shared by the runner and its threads.
struct State {
    lines: Vec<Line>,
    /// The unfinished last line of each stream (a shell prompt has no newline).
    partial: [String; 2],
    /// Guest lines on the console that the hypervisor's multiplexer cut, waiting for their rest.
    joiner: LineJoiner,
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
            // The waits see the guests' logical lines: a line the console multiplexer cut (to
            // print another source's) is joined with its rest. The log file keeps what the
            // terminal showed.
            let mut logical = Vec::new();
            for text in &done {
                if stream == Stream::Stdout {
                    logical.extend(st.joiner.push(text));
                } else {
                    logical.push(text.clone());
                }
            }
            if eof && stream == Stream::Stdout {
                logical.extend(st.joiner.drain());
            }
            for text in logical {
                st.lines.push(Line { text, at, stream });
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
        Self::spawn_two_pci_vms_with(name, guest, vm0_args, vm1_args, &[], limit)
    }

    /// As [`Qemu::spawn_two_pci_vms`], with more board script arguments (`--vm-iommu 0
    /// virtio-iommu`, say).
    pub fn spawn_two_pci_vms_with(
        name: &str,
        guest: Option<&Path>,
        vm0_args: &str,
        vm1_args: &str,
        board: &[&str],
        limit: Duration,
    ) -> Result<Qemu, Error> {
        let guest = guest.map(|g| g.to_str().expect("the repository path is UTF-8"));
        let mut args = vec!["--vms", "2", "--pci"];
        args.extend(board);
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
                joiner: LineJoiner::default(),
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

    /// The run's name (of its log file), for log lines of the checks outside this module.
    pub(crate) fn name(&self) -> &str {
        &self.shared.name
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
        for held in st.joiner.pending() {
            out.push_str(&held);
            out.push_str("  <cut by another source's line, its rest not yet shown>\n");
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

    /// Records `e` as a failure of this run (its log is printed on drop) and returns it, for
    /// the checks outside this module that make their own errors.
    pub(crate) fn fail(&mut self, e: Error) -> Error {
        self.failed = true;
        eprintln!("[qemu] {}: FAILED: {e}", self.shared.name);
        e
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
