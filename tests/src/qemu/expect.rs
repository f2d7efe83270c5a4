//! The console machinery of [`Qemu`]: waiting, with a timeout, for lines (all of them, or one
//! VM's, each with its own cursor), for guest facts and for a shell prompt, and typing into
//! the guest console.

use super::{describe, Line, Qemu, Stream};
use crate::text::{guest_fact, strip_ansi, vm_text};
use crate::Error;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl Qemu {
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
        self.wait_for_partial(timeout, |partial| {
            partial.trim_end().ends_with(prompt.trim_end())
        })
    }

    /// Best effort: waits up to `timeout` for the unfinished console line (without terminal
    /// escape sequences) to satisfy `pred`, e.g. U-Boot's "Hit any key to stop autoboot:  2 ",
    /// which counts down on one line. Returns whether it did; never a failure by itself.
    pub fn wait_for_partial(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> bool {
        let until = Instant::now() + timeout;
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        loop {
            let partial = strip_ansi(&st.partial[Stream::Stdout as usize]);
            if pred(&partial) {
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
}
