//! The U-Boot board path (`qemu/board-virt.sh --uboot`): the commands docs/vm-config.md gives a
//! board user, taken from the doc itself (the block between [`BEGIN_MARKER`] and
//! [`END_MARKER`]), checked against U-Boot's limits, and typed at U-Boot's prompt one line at a
//! time, each after the prompt and each checked: its echo must come back whole, and what it
//! prints must hold no error.

use crate::paths::repo_root;
use crate::{Error, Line, Qemu, Stream, STEP_TIMEOUT};
use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

/// The doc that holds the commands, relative to the repository root.
pub const UBOOT_DOC: &str = "docs/vm-config.md";
/// The line before the command block in [`UBOOT_DOC`].
pub const BEGIN_MARKER: &str = "<!-- uboot-commands:begin -->";
/// The line after it.
pub const END_MARKER: &str = "<!-- uboot-commands:end -->";
/// U-Boot's prompt (`CONFIG_SYS_PROMPT`), without its trailing blank.
pub const UBOOT_PROMPT: &str = "=>";
/// What U-Boot shows while it counts down to its autoboot (`CONFIG_BOOTDELAY` = 2 s).
pub const AUTOBOOT_PROMPT: &str = "Hit any key to stop autoboot";
/// Debian's u-boot-qemu 2023.01, `qemu_arm64`: at most this many words per command
/// (`CONFIG_SYS_MAXARGS`; more make the command print its usage instead of running) ...
pub const UBOOT_MAX_ARGS: usize = 16;
/// ... and lines shorter than this (`CONFIG_SYS_CBSIZE`, which counts the terminating NUL).
pub const UBOOT_LINE_MAX: usize = 512;
/// Text in a command's output that means it failed (compared in lower case): U-Boot's
/// messages for an unknown command, a usage print, a missing file or partition, libfdt errors.
const FAILURE_MARKS: [&str; 12] = [
    "unknown command",
    "usage:",
    "error",
    "fail",
    "fdt_err",
    "not found",
    "no partition",
    "can't",
    "couldn't",
    "invalid",
    "bad ",
    "** ",
];

/// The commands of the block between the markers of `doc` (a fenced code block, alone between
/// them), in order, blank lines left out; comment lines (`# ...`) are kept, since U-Boot's
/// shell takes them as typed.
pub fn uboot_commands(doc: &str) -> Result<Vec<String>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let find = |marker: &str| -> Result<usize, String> {
        let at: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].trim() == marker)
            .collect();
        match at[..] {
            [i] => Ok(i),
            _ => Err(format!(
                "{marker} must be on a line of its own exactly once; found {} times",
                at.len()
            )),
        }
    };
    let (begin, end) = (find(BEGIN_MARKER)?, find(END_MARKER)?);
    if end <= begin {
        return Err(format!("{END_MARKER} comes before {BEGIN_MARKER}"));
    }
    let inner: Vec<&str> = lines[begin + 1..end]
        .iter()
        .copied()
        .filter(|l| !l.trim().is_empty())
        .collect();
    match inner[..] {
        [open, ref body @ .., close] if open.trim() == "```" && close.trim() == "```" => {
            if let Some(fence) = body.iter().find(|l| l.trim_start().starts_with("```")) {
                return Err(format!("a second fence inside the block: {fence:?}"));
            }
            Ok(body.iter().map(|l| l.trim_end().to_string()).collect())
        }
        _ => Err(format!(
            "between {BEGIN_MARKER} and {END_MARKER} there must be one fenced block (```)"
        )),
    }
}

/// The commands of [`UBOOT_DOC`] (see [`uboot_commands`]); panics if the block is missing or
/// malformed.
pub fn doc_uboot_commands() -> Vec<String> {
    let path = repo_root().join(UBOOT_DOC);
    let doc =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    uboot_commands(&doc).unwrap_or_else(|e| panic!("{UBOOT_DOC}: {e}"))
}

/// The words U-Boot's shell splits `line` into (blanks outside quotes separate them; quotes
/// group and are dropped). A `#` that starts a word starts a comment.
pub fn uboot_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '"' | '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (None, ' ' | '\t') => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, '#') if !in_word => break,
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

/// Checks `commands` against what U-Boot takes: every line shorter than [`UBOOT_LINE_MAX`], at
/// most [`UBOOT_MAX_ARGS`] words, no tab (U-Boot's line editor completes on it), quotes closed;
/// the last command `booti` (nothing typed after it would reach U-Boot).
pub fn check_uboot_commands(commands: &[String]) -> Result<(), String> {
    for c in commands {
        if c.len() >= UBOOT_LINE_MAX {
            return Err(format!(
                "{} characters, over U-Boot's {UBOOT_LINE_MAX}: {c:?}",
                c.len()
            ));
        }
        if c.contains('\t') {
            return Err(format!("a tab (U-Boot completes on it): {c:?}"));
        }
        if c.matches('"').count() % 2 != 0 {
            return Err(format!("an unclosed quote: {c:?}"));
        }
        let n = uboot_words(c).len();
        if n > UBOOT_MAX_ARGS {
            return Err(format!(
                "{n} words, over U-Boot's {UBOOT_MAX_ARGS} (it would print the usage): {c:?}"
            ));
        }
    }
    let last = commands
        .iter()
        .rev()
        .find(|c| !uboot_words(c).is_empty())
        .ok_or("no command in the block")?;
    if uboot_words(last)[0] != "booti" {
        return Err(format!("the last command must be booti, not {last:?}"));
    }
    Ok(())
}

/// The variables the commands set with a literal value (`setenv NAME VALUE`, no `$` in VALUE).
pub fn uboot_literal_vars(commands: &[String]) -> BTreeMap<String, String> {
    commands
        .iter()
        .filter_map(|c| match &uboot_words(c)[..] {
            [set, name, value] if set == "setenv" && !value.contains('$') => {
                Some((name.clone(), value.clone()))
            }
            _ => None,
        })
        .collect()
}

/// What typing the commands took (times from QEMU's start, as [`Line::at`]).
#[derive(Clone, Debug, Default)]
pub struct UbootReport {
    /// The echo of the last command (`booti`): every command typed.
    pub booti_at: Duration,
    /// The commands typed, comments included.
    pub typed: usize,
}

/// Stops U-Boot's autoboot and waits for its prompt: waits for the countdown, sends a newline,
/// and sends another if no prompt follows (U-Boot drops what comes while it sets up its UART,
/// and its countdown may swallow a key). Returns the time of the banner and of the prompt.
pub fn stop_autoboot(q: &mut Qemu, timeout: Duration) -> Result<(Duration, Duration), Error> {
    let banner = q.wait_for_line("U-Boot 20", timeout)?;
    println!("u-boot: {}", banner.text.trim());
    if !q.wait_for_partial(timeout, |p| p.contains(AUTOBOOT_PROMPT)) {
        // The countdown line may already be complete (the autoboot ran out): then the prompt
        // comes once the autoboot gave up.
        q.wait_for(AUTOBOOT_PROMPT, Duration::ZERO)?;
    }
    for attempt in 0..10 {
        q.send("\n")?;
        if q.wait_for_prompt(
            UBOOT_PROMPT,
            Duration::from_secs(if attempt < 3 { 3 } else { 20 }),
        ) {
            return Ok((banner.at, q.elapsed()));
        }
    }
    Err(Error::Timeout {
        what: format!("U-Boot's prompt {UBOOT_PROMPT:?} after stopping its autoboot"),
        waited: timeout,
    })
}

/// Types `commands` at U-Boot's prompt (its autoboot already stopped: [`stop_autoboot`]), one
/// at a time: waits for the prompt, types the line, waits for U-Boot's echo of the whole line
/// (`=> LINE`; a lost or mangled character fails here), and checks what the command printed
/// before the next prompt for failure messages. For each `load` of a file named in `sizes`,
/// U-Boot must report reading exactly that many bytes. The last command (`booti`) is typed and
/// echoed; what follows is the caller's to wait for. Panics on a failed command.
pub fn type_uboot_commands(
    q: &mut Qemu,
    commands: &[String],
    sizes: &BTreeMap<String, u64>,
) -> Result<UbootReport, Error> {
    let mut report = UbootReport::default();
    let mut previous: Option<(&String, String)> = None;
    let typed: Vec<&String> = commands.iter().filter(|c| !c.trim().is_empty()).collect();
    for cmd in typed {
        if !q.wait_for_prompt(UBOOT_PROMPT, STEP_TIMEOUT) {
            let what = match &previous {
                Some((c, _)) => format!("U-Boot's prompt after {c:?}"),
                None => "U-Boot's prompt".to_string(),
            };
            return Err(q.fail(Error::Timeout {
                what,
                waited: STEP_TIMEOUT,
            }));
        }
        if let Some((c, echo)) = previous.take() {
            check_output(c, &output_after(&q.lines(), &echo), sizes);
        }
        q.send(&format!("{cmd}\n"))?;
        let echo = format!("{UBOOT_PROMPT} {cmd}");
        let line = q.wait_until(&format!("U-Boot's echo {echo:?}"), STEP_TIMEOUT, |l| {
            l.trim_end() == echo
        })?;
        report.booti_at = line.at;
        report.typed += 1;
        previous = Some((cmd, echo));
    }
    Ok(report)
}

/// The console lines after the last echo `echo` (what the command printed).
fn output_after(lines: &[Line], echo: &str) -> Vec<String> {
    let start = lines
        .iter()
        .rposition(|l| l.stream == Stream::Stdout && l.text.trim_end() == echo)
        .map_or(lines.len(), |i| i + 1);
    lines[start..]
        .iter()
        .filter(|l| l.stream == Stream::Stdout)
        .map(|l| l.text.clone())
        .collect()
}

/// Panics if the output of `cmd` holds a failure message, or if a `load` of a file in `sizes`
/// read another size.
fn check_output(cmd: &str, output: &[String], sizes: &BTreeMap<String, u64>) {
    for l in output {
        let lower = l.to_lowercase();
        if let Some(mark) = FAILURE_MARKS.iter().find(|m| lower.contains(*m)) {
            panic!("U-Boot command {cmd:?} failed ({mark:?} in its output): {output:#?}");
        }
    }
    let words = uboot_words(cmd);
    if words.first().map(String::as_str) == Some("load") {
        if let Some(size) = words.last().and_then(|f| sizes.get(f)) {
            let read = format!("{size} bytes read");
            assert!(
                output.iter().any(|l| l.starts_with(&read)),
                "U-Boot's {cmd:?} must report \"{read}\" (the host's file size): {output:#?}"
            );
        }
    }
}
