//! Sharing one physical UART between several guests and the hypervisor.
//!
//! [`ConsoleMux`] merges output: every physical line on the terminal carries exactly one source's
//! bytes behind that source's prefix (`[vm0] `, `[hv] `, ...), so interleaved boot logs stay
//! readable. A guest line another source had to cut (the focused guest's output goes out as it
//! comes, so a hypervisor line can land in the middle of it) says so at both ends: the cut
//! physical line ends with [`CUT_MARK`], and the rest follows on a line with the guest's
//! continuation prefix (`[vm0]+ `), which no guest output can produce. A reader (a person, the
//! integration tests' runner) joins them back into the guest's logical line. [`InputRouter`] splits input: typed bytes go to the VM with the input focus, and an
//! escape sequence (Ctrl-\ then a digit) moves the focus.
//!
//! Both are pure state machines. The glue calls them under its console lock and passes an output
//! callback that writes bytes to the UART; nothing here touches hardware, so it is tested on the
//! host.

use crate::monitor::{Edit, LineEditor};
use alloc::string::String;
use alloc::vec::Vec;

/// Prefix of the hypervisor's own lines.
pub const HV_PREFIX: &str = "[hv] ";
/// Prefix used for output from a VM index that [`ConsoleMux::new`] was not told about.
pub const UNKNOWN_PREFIX: &str = "[vm?] ";
/// Bytes of one guest line that may wait for their newline. Long enough for any ordinary kernel
/// log line; a longer line is broken so a silent guest cannot hold back unbounded output.
pub const LINE_CAPACITY: usize = 512;
/// Ends a guest's physical line that another source cut (before the "\r\n"); its rest follows
/// behind the guest's continuation prefix ([`continuation_prefix`]).
pub const CUT_MARK: &str = "\\";

/// The prefix of the rest of a cut line: the guest's prefix with `+` before its final space
/// (`[vm0] ` -> `[vm0]+ `). A guest's own bytes always follow its prefix's space, so no guest can
/// print this.
pub fn continuation_prefix(prefix: &str) -> String {
    match prefix.strip_suffix(' ') {
        Some(p) => alloc::format!("{p}+ "),
        None => alloc::format!("{prefix}+"),
    }
}

/// Ends every physical line: the terminal needs the carriage return because the raw UART does no
/// newline translation.
const EOL: &[u8] = b"\r\n";

/// Who owns the bytes currently on the terminal's unfinished physical line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    /// A guest slot (index into `ConsoleMux::guests`; the last slot collects unknown VMs).
    Guest(usize),
    /// The hypervisor.
    Hv,
    /// The monitor's command line being typed ([`ConsoleMux::prompt_show`]).
    Prompt,
}

/// Starts the monitor's command line on the terminal.
pub const PROMPT: &str = "[hv] monitor> ";

/// Per-guest output state.
#[derive(Debug)]
struct GuestLine {
    prefix: String,
    /// [`continuation_prefix`] of `prefix`.
    cont_prefix: String,
    /// Bytes of the current logical line not yet written to the terminal. A trailing '\r' is
    /// kept here even for the focused guest because it may be the first half of "\r\n".
    pending: Vec<u8>,
    /// Part of the current logical line has already been written (focused output or
    /// `flush_partial`), so the rest continues it instead of starting a fresh line.
    mid_line: bool,
}

/// Output multiplexer: see the module documentation.
///
/// Unknown VM indices (>= the number of prefixes given to [`ConsoleMux::new`]) do not panic: they
/// all share one extra line buffer printed with [`UNKNOWN_PREFIX`], so a misrouted guest is still
/// visible rather than silently dropped.
#[derive(Debug)]
pub struct ConsoleMux {
    /// One slot per VM, plus a final slot for unknown VM indices.
    guests: Vec<GuestLine>,
    /// Source of the unfinished physical line on the terminal, if the last byte written was not
    /// the end of a line.
    open: Option<Source>,
    /// The monitor's command line while one is being typed: drawn again below whatever
    /// output cut it, so the operator always sees what they typed.
    prompt: Option<String>,
}

impl ConsoleMux {
    /// Creates the mux; `prefixes[i]` is printed before VM `i`'s lines (e.g. `"[vm0] "`).
    pub fn new(prefixes: Vec<String>) -> Self {
        let guests = prefixes
            .into_iter()
            .chain(core::iter::once(String::from(UNKNOWN_PREFIX)))
            .map(|prefix| GuestLine {
                cont_prefix: continuation_prefix(&prefix),
                prefix,
                // Allocated once up front so the output path does not allocate.
                pending: Vec::with_capacity(LINE_CAPACITY),
                mid_line: false,
            })
            .collect();
        Self {
            guests,
            open: None,
            prompt: None,
        }
    }

    /// Maps a VM index to its slot; every unknown index goes to the shared last slot.
    fn slot(&self, vm: usize) -> usize {
        vm.min(self.guests.len() - 1)
    }

    /// Handles bytes VM `vm` transmitted. `focused` says whether that VM has the input focus: its
    /// partial line is then written at once (prompts and echo have no newline).
    pub fn guest_write(
        &mut self,
        vm: usize,
        bytes: &[u8],
        focused: bool,
        out: &mut dyn FnMut(&[u8]),
    ) {
        let slot = self.slot(vm);
        for &byte in bytes {
            if byte == b'\n' {
                let g = &mut self.guests[slot];
                // Linux terminates lines with "\r\n"; the mux adds its own "\r\n".
                if g.pending.last() == Some(&b'\r') {
                    g.pending.pop();
                }
                self.emit(slot, true, out);
                continue;
            }
            if self.guests[slot].pending.len() >= LINE_CAPACITY {
                // The focused guest's partial output is shown anyway, so it just goes out now and
                // the line goes on; anyone else gets a forced line break.
                self.emit(slot, !focused, out);
            }
            self.guests[slot].pending.push(byte);
        }
        if focused {
            self.emit(slot, false, out);
        }
        self.redraw_prompt(out);
    }

    /// Writes out VM `vm`'s buffered partial line (without ending it), e.g. when it gains focus so
    /// the user sees its prompt. A trailing '\r' stays buffered in case '\n' follows.
    pub fn flush_partial(&mut self, vm: usize, out: &mut dyn FnMut(&[u8])) {
        let slot = self.slot(vm);
        self.emit(slot, false, out);
    }

    /// Prints one line of the hypervisor's own. `line` should have no newline; embedded or
    /// trailing newlines are tolerated by printing each piece as its own prefixed line, so the
    /// one-source-per-line rule cannot be broken by a careless caller.
    pub fn hv_line(&mut self, line: &str, out: &mut dyn FnMut(&[u8])) {
        let line = line.strip_suffix('\n').unwrap_or(line);
        for piece in line.split('\n') {
            let piece = piece.strip_suffix('\r').unwrap_or(piece);
            self.end_foreign_line(Source::Hv, out);
            out(HV_PREFIX.as_bytes());
            out(piece.as_bytes());
            out(EOL);
        }
        self.redraw_prompt(out);
    }

    /// Shows the monitor's command line as `text`: only what changed when it is still the
    /// terminal's open line (typed bytes, or backspaces), else the whole line anew.
    pub fn prompt_show(&mut self, text: &str, out: &mut dyn FnMut(&[u8])) {
        let drawn = self
            .prompt
            .take()
            .filter(|_| self.open == Some(Source::Prompt));
        match drawn {
            Some(old) if text.starts_with(old.as_str()) => out(&text.as_bytes()[old.len()..]),
            Some(old) if old.starts_with(text) => {
                for _ in text.len()..old.len() {
                    out(b"\x08 \x08");
                }
            }
            Some(_) => {
                out(EOL);
                self.open = None;
            }
            None => {}
        }
        if self.open != Some(Source::Prompt) {
            self.end_foreign_line(Source::Prompt, out);
            out(PROMPT.as_bytes());
            out(text.as_bytes());
            self.open = Some(Source::Prompt);
        }
        self.prompt = Some(String::from(text));
    }

    /// Ends the monitor's command line (submitted or cancelled): it stays on the terminal as
    /// typed, and is not drawn again.
    pub fn prompt_end(&mut self, out: &mut dyn FnMut(&[u8])) {
        self.prompt = None;
        if self.open == Some(Source::Prompt) {
            out(EOL);
            self.open = None;
        }
    }

    /// Draws the command line being typed again once other output has ended its lines.
    fn redraw_prompt(&mut self, out: &mut dyn FnMut(&[u8])) {
        if self.open.is_none() {
            if let Some(p) = &self.prompt {
                out(PROMPT.as_bytes());
                out(p.as_bytes());
                self.open = Some(Source::Prompt);
            }
        }
    }

    /// Ends the terminal's unfinished physical line unless it belongs to `src`, so `src` can
    /// start a line of its own.
    fn end_foreign_line(&mut self, src: Source, out: &mut dyn FnMut(&[u8])) {
        if let Some(open) = self.open {
            if open != src {
                Self::cut(open, out);
                self.open = None;
            }
        }
    }

    /// Ends the open physical line of `open` because another source needs the terminal: a
    /// guest's gets [`CUT_MARK`] (its logical line goes on later).
    fn cut(open: Source, out: &mut dyn FnMut(&[u8])) {
        if matches!(open, Source::Guest(_)) {
            out(CUT_MARK.as_bytes());
        }
        out(EOL);
    }

    /// Writes slot `slot`'s pending bytes and, if `end_line`, ends its logical line. Without
    /// `end_line` a trailing '\r' is held back (it may pair with a coming '\n').
    fn emit(&mut self, slot: usize, end_line: bool, out: &mut dyn FnMut(&[u8])) {
        let src = Source::Guest(slot);
        let g = &mut self.guests[slot];
        let held_cr = !end_line && g.pending.last() == Some(&b'\r');
        let len = g.pending.len() - usize::from(held_cr);
        let continuing = g.mid_line && self.open == Some(src);
        if len == 0 && !end_line {
            return;
        }
        // Cut by another source: what follows is the rest of that line (an empty rest still
        // says the line ended there, so a reader waiting for it is not left waiting).
        let rest_of_cut = g.mid_line && !continuing;
        if !continuing {
            if let Some(open) = self.open {
                // Only another source can own the open line here (our own would be
                // `continuing`).
                debug_assert_ne!(open, src);
                Self::cut(open, out);
            }
            out(if rest_of_cut {
                g.cont_prefix.as_bytes()
            } else {
                g.prefix.as_bytes()
            });
        }
        out(&g.pending[..len]);
        g.pending.drain(..len);
        if end_line {
            out(EOL);
            g.mid_line = false;
            self.open = None;
        } else {
            g.mid_line = true;
            self.open = Some(src);
        }
    }
}

/// The console escape byte, Ctrl-\. Not Ctrl-A, which QEMU's own monitor escape already uses.
pub const ESCAPE: u8 = 0x1c;

/// The console's help, printed on [`InputAction::Help`] (then the monitor's commands).
pub const HELP: &str = "console keys, Ctrl-\\ then:
  0-9      send console input to that VM
  :        open the monitor's command line (its `help` lists the commands)
  s        statistics, as tables
  ?        this help
  Ctrl-\\   send a Ctrl-\\ to the VM with the input";

/// What the glue should do with one input byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputAction {
    /// Queue `byte` into VM `vm`'s UART receiver.
    Deliver {
        /// The focused VM.
        vm: usize,
        /// The byte to deliver.
        byte: u8,
    },
    /// The focus moved to this VM; the glue should `flush_partial` it so its prompt shows.
    SwitchFocus(usize),
    /// The user asked for help; print [`HELP`] (e.g. with [`ConsoleMux::hv_line`]).
    Help,
    /// The user asked for the vSMMUs' trap counters and the stream table.
    Stats,
    /// The monitor's command line changed; [`InputRouter::monitor_line`] has it.
    Monitor(MonitorInput),
    /// Nothing to do: the byte was consumed by an escape sequence or dropped.
    Ignored,
}

/// What happened to the monitor's command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MonitorInput {
    /// Opened (Ctrl-\\ :) or edited: draw [`InputRouter::monitor_line`].
    Edited,
    /// Enter: [`InputRouter::take_command`] has the line.
    Submitted,
    /// Esc or Ctrl-C: the line is gone.
    Cancelled,
}

/// Routes console input to the focused VM and interprets the escape sequences:
///
/// * Ctrl-\ then digit `d`: focus moves to VM `d` if `d` < number of VMs, else the pair is
///   ignored. Only single digits exist, so at most VMs 0-9 are reachable.
/// * Ctrl-\ Ctrl-\: one literal 0x1c goes to the focused VM.
/// * Ctrl-\ ?: [`InputAction::Help`].
/// * Ctrl-\ s: [`InputAction::Stats`].
/// * Ctrl-\ : opens the monitor's command line ([`crate::monitor::LineEditor`]): every byte
///   goes to it until Enter, Esc or Ctrl-C ([`InputAction::Monitor`]); none reaches a VM.
/// * Ctrl-\ then anything else: both bytes are dropped, so a mistyped sequence never leaks half
///   an escape into a guest.
#[derive(Debug)]
pub struct InputRouter {
    num_vms: usize,
    focus: usize,
    /// The previous byte was an unconsumed [`ESCAPE`].
    escaped: bool,
    /// The monitor's command line, while one is open.
    monitor: Option<LineEditor>,
    /// The last command line submitted, not yet taken.
    command: Option<String>,
}

impl InputRouter {
    /// Creates a router for `num_vms` VMs with the focus on VM 0. With zero VMs every byte is
    /// [`InputAction::Ignored`].
    pub fn new(num_vms: usize) -> Self {
        Self {
            num_vms,
            focus: 0,
            escaped: false,
            monitor: None,
            command: None,
        }
    }

    /// Moves the input focus to VM `vm` (the monitor's `focus`); `false` if there is none.
    pub fn set_focus(&mut self, vm: usize) -> bool {
        let ok = vm < self.num_vms;
        if ok {
            self.focus = vm;
        }
        ok
    }

    /// The monitor's command line as typed so far, while it is open.
    pub fn monitor_line(&self) -> Option<&str> {
        self.monitor.as_ref().map(LineEditor::text)
    }

    /// The command line last submitted ([`MonitorInput::Submitted`]).
    pub fn take_command(&mut self) -> Option<String> {
        self.command.take()
    }

    /// The VM that currently receives input.
    pub fn focus(&self) -> usize {
        self.focus
    }

    /// Processes one input byte.
    pub fn feed(&mut self, byte: u8) -> InputAction {
        if let Some(ed) = &mut self.monitor {
            return match ed.feed(byte) {
                Edit::Changed => InputAction::Monitor(MonitorInput::Edited),
                Edit::Ignored => InputAction::Ignored,
                Edit::Submit => {
                    self.command = Some(ed.take());
                    self.monitor = None;
                    InputAction::Monitor(MonitorInput::Submitted)
                }
                Edit::Cancel => {
                    self.monitor = None;
                    InputAction::Monitor(MonitorInput::Cancelled)
                }
            };
        }
        if core::mem::take(&mut self.escaped) {
            return match byte {
                ESCAPE => self.deliver(ESCAPE),
                b'0'..=b'9' => {
                    let vm = usize::from(byte - b'0');
                    if vm < self.num_vms {
                        self.focus = vm;
                        InputAction::SwitchFocus(vm)
                    } else {
                        InputAction::Ignored
                    }
                }
                b'?' => InputAction::Help,
                b's' => InputAction::Stats,
                b':' => {
                    self.monitor = Some(LineEditor::new());
                    InputAction::Monitor(MonitorInput::Edited)
                }
                _ => InputAction::Ignored,
            };
        }
        if byte == ESCAPE {
            self.escaped = true;
            return InputAction::Ignored;
        }
        self.deliver(byte)
    }

    fn deliver(&self, byte: u8) -> InputAction {
        if self.num_vms == 0 {
            // No VM to receive it.
            return InputAction::Ignored;
        }
        InputAction::Deliver {
            vm: self.focus,
            byte,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::ToString;
    use alloc::vec;

    fn mux(n: usize) -> ConsoleMux {
        ConsoleMux::new((0..n).map(|i| format!("[vm{i}] ")).collect())
    }

    /// Runs `f` with an output callback and returns what it wrote.
    fn capture(f: impl FnOnce(&mut dyn FnMut(&[u8]))) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut |b: &[u8]| v.extend_from_slice(b));
        v
    }

    #[test]
    fn prefixes_complete_lines_and_collapses_crlf() {
        let mut m = mux(2);
        let o = capture(|out| {
            m.guest_write(0, b"hello\r\n", false, out);
            m.guest_write(1, b"world\n", false, out);
            m.guest_write(0, b"\n", false, out);
        });
        assert_eq!(o, b"[vm0] hello\r\n[vm1] world\r\n[vm0] \r\n");
    }

    #[test]
    fn crlf_split_across_writes_and_inner_cr_kept() {
        let mut m = mux(1);
        let o = capture(|out| {
            m.guest_write(0, b"ab\rcd\r", true, out);
            m.guest_write(0, b"\n", true, out);
        });
        assert_eq!(o, b"[vm0] ab\rcd\r\n");
        // A held '\r' not followed by '\n' still comes out.
        let o = capture(|out| {
            m.guest_write(0, b"x\r", true, out);
            m.guest_write(0, b"y", true, out);
        });
        assert_eq!(o, b"[vm0] x\ry");
    }

    #[test]
    fn unfocused_partial_waits_for_newline() {
        let mut m = mux(1);
        let o = capture(|out| m.guest_write(0, b"abc", false, out));
        assert!(o.is_empty());
        let o = capture(|out| m.guest_write(0, b"def\n", false, out));
        assert_eq!(o, b"[vm0] abcdef\r\n");
    }

    #[test]
    fn focused_partial_appears_immediately_and_continues() {
        let mut m = mux(1);
        let o = capture(|out| m.guest_write(0, b"login: ", true, out));
        assert_eq!(o, b"[vm0] login: ");
        let o = capture(|out| m.guest_write(0, b"r", true, out));
        assert_eq!(o, b"r");
        let o = capture(|out| m.guest_write(0, b"oot\r\n", true, out));
        assert_eq!(o, b"oot\r\n");
    }

    #[test]
    fn other_source_interrupts_partial_line() {
        let mut m = mux(2);
        let o = capture(|out| {
            m.guest_write(0, b"$ ", true, out);
            m.guest_write(1, b"kernel msg\n", false, out);
            m.guest_write(0, b"ls", true, out);
            m.guest_write(0, b"\r\n", true, out);
        });
        assert_eq!(o, b"[vm0] $ \\\r\n[vm1] kernel msg\r\n[vm0]+ ls\r\n");
    }

    #[test]
    fn hv_line_in_middle_of_partial_line() {
        let mut m = mux(1);
        let o = capture(|out| {
            m.guest_write(0, b"abc", true, out);
            m.hv_line("switched", out);
            m.guest_write(0, b"def", true, out);
            m.hv_line("two\nlines", out);
            // The line was cut by the hypervisor right before its end: an empty rest says so.
            m.guest_write(0, b"\n", true, out);
        });
        assert_eq!(
            o,
            b"[vm0] abc\\\r\n[hv] switched\r\n[vm0]+ def\\\r\n[hv] two\r\n[hv] lines\r\n[vm0]+ \r\n"
                .as_slice()
        );
    }

    #[test]
    fn forced_break_at_capacity_for_unfocused() {
        let mut m = mux(1);
        let long = vec![b'a'; LINE_CAPACITY];
        // Exactly full: no break yet, and a newline completes it as one line.
        let o = capture(|out| m.guest_write(0, &long, false, out));
        assert!(o.is_empty());
        let o = capture(|out| m.guest_write(0, b"b\n", false, out));
        let mut want = b"[vm0] ".to_vec();
        want.extend_from_slice(&long);
        want.extend_from_slice(b"\r\n[vm0] b\r\n");
        assert_eq!(o, want);
    }

    #[test]
    fn focused_long_line_is_not_broken() {
        let mut m = mux(1);
        let long = vec![b'a'; LINE_CAPACITY * 2 + 3];
        let o = capture(|out| m.guest_write(0, &long, true, out));
        let mut want = b"[vm0] ".to_vec();
        want.extend_from_slice(&long);
        assert_eq!(o, want);
    }

    #[test]
    fn flush_partial_shows_buffered_prompt() {
        let mut m = mux(2);
        let o = capture(|out| {
            m.guest_write(1, b"# ", false, out);
            m.guest_write(0, b"log\n", false, out);
        });
        assert_eq!(o, b"[vm0] log\r\n");
        let o = capture(|out| m.flush_partial(1, out));
        assert_eq!(o, b"[vm1] # ");
        let o = capture(|out| m.guest_write(1, b"x", true, out));
        assert_eq!(o, b"x");
        // Nothing buffered: flushing writes nothing.
        let o = capture(|out| m.flush_partial(0, out));
        assert!(o.is_empty());
    }

    #[test]
    fn unknown_vm_does_not_panic() {
        let mut m = mux(1);
        let o = capture(|out| {
            m.guest_write(7, b"hi\n", false, out);
            m.flush_partial(9, out);
        });
        assert_eq!(o, b"[vm?] hi\r\n");
        let mut empty = ConsoleMux::new(Vec::new());
        let o = capture(|out| empty.guest_write(0, b"x\n", true, out));
        assert_eq!(o, b"[vm?] x\r\n");
    }

    /// Deterministic xorshift so the interleaving test needs no dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> usize {
            (self.next() % n) as usize
        }
    }

    /// What a source's byte stream should look like on screen: "\r\n" collapsed to "\n".
    fn collapse_crlf(input: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        for (i, &b) in input.iter().enumerate() {
            if b == b'\r' && input.get(i + 1) == Some(&b'\n') {
                continue;
            }
            v.push(b);
        }
        v
    }

    /// Splits `output` into physical lines and returns each source's reconstructed stream (line
    /// contents with '\n' after each ended logical line: a cut line joined with its rest),
    /// indexed like `prefixes`. Panics if a physical line does not start with a known prefix, if
    /// a cut line is not continued before that source's next line, or a continuation has no cut.
    fn demux(output: &[u8], prefixes: &[String]) -> Vec<Vec<u8>> {
        let conts: Vec<String> = prefixes.iter().map(|p| continuation_prefix(p)).collect();
        let mut streams = vec![Vec::new(); prefixes.len()];
        let mut cut = vec![false; prefixes.len()];
        let mut rest = output;
        while !rest.is_empty() {
            let (line, ended) = match rest.windows(2).position(|w| w == EOL) {
                Some(p) => {
                    let l = &rest[..p];
                    rest = &rest[p + 2..];
                    (l, true)
                }
                None => {
                    let l = rest;
                    rest = &[];
                    (l, false)
                }
            };
            let (src, is_cont, content) = (0..prefixes.len())
                .find_map(|i| {
                    line.strip_prefix(conts[i].as_bytes())
                        .map(|c| (i, true, c))
                        .or_else(|| {
                            line.strip_prefix(prefixes[i].as_bytes())
                                .map(|c| (i, false, c))
                        })
                })
                .unwrap_or_else(|| {
                    panic!("line without prefix: {:?}", String::from_utf8_lossy(line))
                });
            let text = String::from_utf8_lossy(line);
            assert_eq!(
                is_cont, cut[src],
                "cut and continuation must pair: {text:?}"
            );
            // Contents never contain '[', '+' or '\\', so these inside would be a mix-up.
            let (content, was_cut) = match content.strip_suffix(CUT_MARK.as_bytes()) {
                Some(c) if ended => (c, true),
                _ => (content, false),
            };
            assert!(
                !content.contains(&b'['),
                "two sources on one line: {text:?}"
            );
            assert!(
                !content.contains(&b'\\'),
                "a cut mark inside a line: {text:?}"
            );
            streams[src].extend_from_slice(content);
            cut[src] = was_cut;
            if ended && !was_cut {
                streams[src].push(b'\n');
            }
        }
        streams
    }

    /// `got` must equal `want` except for extra '\n' (line breaks added by interruptions or
    /// forced breaks): every byte in order, every real line end kept.
    fn assert_same_modulo_breaks(got: &[u8], want: &[u8], who: &str) {
        let mut w = 0;
        for &b in got {
            if want.get(w) == Some(&b) {
                w += 1;
            } else {
                assert_eq!(b, b'\n', "{who}: unexpected byte {b:#x} at want[{w}]");
            }
        }
        assert_eq!(w, want.len(), "{who}: bytes lost");
    }

    #[test]
    fn random_interleaving_never_mixes_sources() {
        const VMS: usize = 3;
        // Small alphabet with many line ends and CRs to hit the edge cases often.
        const ALPHABET: &[u8] = b"abc \r\n\n\r\nxyz";
        let mut cuts = 0;
        for seed in 1..=40u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
            let mut m = mux(VMS);
            let mut prefixes: Vec<String> = (0..VMS).map(|i| format!("[vm{i}] ")).collect();
            prefixes.push(HV_PREFIX.to_string());
            let mut inputs = vec![Vec::new(); VMS + 1];
            let mut output = Vec::new();
            let mut focus = 0;
            for _ in 0..400 {
                match rng.below(20) {
                    0 => {
                        focus = rng.below(VMS as u64);
                        m.flush_partial(focus, &mut |b| output.extend_from_slice(b));
                    }
                    1 => {
                        let line = format!("hv{}", rng.below(100));
                        m.hv_line(&line, &mut |b| output.extend_from_slice(b));
                        inputs[VMS].extend_from_slice(line.as_bytes());
                        inputs[VMS].push(b'\n');
                    }
                    _ => {
                        let vm = rng.below(VMS as u64);
                        // Mostly short writes, sometimes long ones to hit the capacity.
                        let len = if rng.below(10) == 0 {
                            rng.below(1200)
                        } else {
                            1 + rng.below(4)
                        };
                        let bytes: Vec<u8> = (0..len)
                            .map(|_| {
                                if len > 100 {
                                    b'l' // long runs without newline
                                } else {
                                    ALPHABET[rng.below(ALPHABET.len() as u64)]
                                }
                            })
                            .collect();
                        let focused = vm == focus;
                        m.guest_write(vm, &bytes, focused, &mut |b| output.extend_from_slice(b));
                        inputs[vm].extend_from_slice(&bytes);
                        if focused {
                            // Everything the focused guest sent is visible, except a '\r' that
                            // may still pair with a '\n'.
                            let want = collapse_crlf(&inputs[vm]);
                            let mut want_count = want.iter().filter(|&&b| b != b'\n').count();
                            if want.last() == Some(&b'\r') {
                                want_count -= 1;
                            }
                            let streams = demux(&output, &prefixes);
                            let got_count = streams[vm].iter().filter(|&&b| b != b'\n').count();
                            assert_eq!(got_count, want_count, "seed {seed}: focused output late");
                        }
                    }
                }
            }
            // End every guest's line so nothing may remain buffered.
            for (vm, input) in inputs.iter_mut().enumerate().take(VMS) {
                m.guest_write(vm, b"\n", false, &mut |b| output.extend_from_slice(b));
                input.push(b'\n');
            }
            assert!(output.ends_with(EOL));
            cuts += output.windows(3).filter(|w| w == b"\\\r\n").count();
            let streams = demux(&output, &prefixes);
            for (i, (got, input)) in streams.iter().zip(&inputs).enumerate() {
                let who = format!("seed {seed} source {i}");
                assert_same_modulo_breaks(got, &collapse_crlf(input), &who);
            }
        }
        assert!(
            cuts > 0,
            "the runs cut no line: the pairing check saw nothing"
        );
    }

    #[test]
    fn router_delivers_to_focus_and_switches() {
        let mut r = InputRouter::new(3);
        assert_eq!(r.focus(), 0);
        assert_eq!(r.feed(b'a'), InputAction::Deliver { vm: 0, byte: b'a' });
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'2'), InputAction::SwitchFocus(2));
        assert_eq!(r.focus(), 2);
        assert_eq!(r.feed(b'b'), InputAction::Deliver { vm: 2, byte: b'b' });
        // Digits outside an escape are ordinary input.
        assert_eq!(r.feed(b'1'), InputAction::Deliver { vm: 2, byte: b'1' });
    }

    #[test]
    fn router_escapes_help_and_out_of_range() {
        let mut r = InputRouter::new(2);
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(
            r.feed(ESCAPE),
            InputAction::Deliver {
                vm: 0,
                byte: ESCAPE
            }
        );
        // The delivered escape does not start a new sequence.
        assert_eq!(r.feed(b'1'), InputAction::Deliver { vm: 0, byte: b'1' });
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'?'), InputAction::Help);
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b's'), InputAction::Stats);
        assert_eq!(r.feed(b's'), InputAction::Deliver { vm: 0, byte: b's' });
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'2'), InputAction::Ignored);
        assert_eq!(r.focus(), 0);
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'x'), InputAction::Ignored);
        assert_eq!(r.feed(b'y'), InputAction::Deliver { vm: 0, byte: b'y' });
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'1'), InputAction::SwitchFocus(1));
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'1'), InputAction::SwitchFocus(1));

        let mut none = InputRouter::new(0);
        assert_eq!(none.feed(b'a'), InputAction::Ignored);
        assert_eq!(none.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(none.feed(b'0'), InputAction::Ignored);
    }

    #[test]
    fn the_monitor_line_takes_every_byte_until_enter_and_no_vm_gets_one() {
        let mut r = InputRouter::new(2);
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b':'), InputAction::Monitor(MonitorInput::Edited));
        assert_eq!(r.monitor_line(), Some(""));
        for &b in b"stop vm1" {
            assert_eq!(r.feed(b), InputAction::Monitor(MonitorInput::Edited));
        }
        // The escape and digits are text here, not focus switches.
        assert_eq!(r.feed(ESCAPE), InputAction::Ignored);
        assert_eq!(r.feed(b'1'), InputAction::Monitor(MonitorInput::Edited));
        assert_eq!(r.feed(0x7f), InputAction::Monitor(MonitorInput::Edited));
        assert_eq!(r.focus(), 0);
        assert_eq!(r.monitor_line(), Some("stop vm1"));
        assert_eq!(r.feed(b'\r'), InputAction::Monitor(MonitorInput::Submitted));
        assert_eq!(r.monitor_line(), None);
        assert_eq!(r.take_command().as_deref(), Some("stop vm1"));
        assert_eq!(r.take_command(), None);
        // Input goes to the focused VM again.
        assert_eq!(r.feed(b'x'), InputAction::Deliver { vm: 0, byte: b'x' });
        r.feed(ESCAPE);
        r.feed(b':');
        r.feed(b'l');
        assert_eq!(r.feed(0x1b), InputAction::Monitor(MonitorInput::Cancelled));
        assert_eq!(r.take_command(), None);
        assert_eq!(r.feed(b'y'), InputAction::Deliver { vm: 0, byte: b'y' });
        assert!(r.set_focus(1));
        assert!(!r.set_focus(2));
        assert_eq!(r.feed(b'z'), InputAction::Deliver { vm: 1, byte: b'z' });
    }

    #[test]
    fn the_prompt_echoes_what_changed_and_comes_back_below_other_output() {
        let mut m = mux(1);
        assert_eq!(capture(|out| m.prompt_show("", out)), PROMPT.as_bytes());
        assert_eq!(capture(|out| m.prompt_show("li", out)), b"li");
        assert_eq!(capture(|out| m.prompt_show("l", out)), b"\x08 \x08");
        // A guest line cuts the prompt (no cut mark: it is not a guest's), then the prompt
        // is drawn again with what was typed.
        let o = capture(|out| m.guest_write(0, b"boot\n", false, out));
        assert_eq!(o, b"\r\n[vm0] boot\r\n[hv] monitor> l");
        let o = capture(|out| m.hv_line("note", out));
        assert_eq!(o, b"\r\n[hv] note\r\n[hv] monitor> l");
        assert_eq!(capture(|out| m.prompt_show("list", out)), b"ist");
        // A line that is not an extension is drawn whole.
        assert_eq!(
            capture(|out| m.prompt_show("stop", out)),
            b"\r\n[hv] monitor> stop"
        );
        assert_eq!(capture(|out| m.prompt_end(out)), b"\r\n");
        // Gone: later output does not bring it back.
        let o = capture(|out| m.hv_line("done", out));
        assert_eq!(o, b"[hv] done\r\n");
        assert!(capture(|out| m.prompt_end(out)).is_empty());
    }
}
