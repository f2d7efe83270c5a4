//! Console lines as text: the `[VM] ` and `[hv] ` prefixes, guest facts (`guest: KEY=VALUE`)
//! and terminal escape sequences.

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

/// What ends a guest's physical console line that another source cut (the hypervisor's
/// `console::CUT_MARK`); the rest follows on a line with the continuation prefix `[VM]+ `.
pub const CUT_MARK: char = '\\';

/// Joins guest lines the console multiplexer cut back into the guest's logical lines: a `[VM] `
/// line ending with [`CUT_MARK`] is held until VM's next line; a `[VM]+ ` continuation is
/// appended to it (and may be cut again); any other line of VM releases it as it was.
#[derive(Debug, Default)]
pub struct LineJoiner {
    /// Per VM: the held line (without its mark).
    held: std::collections::BTreeMap<String, String>,
}

impl LineJoiner {
    /// Takes one physical console line; returns the logical lines it completes, in order.
    pub fn push(&mut self, line: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((name, rest)) = continuation(line) {
            let joined = match self.held.remove(name) {
                Some(h) => format!("{h}{rest}"),
                // A continuation without its start (output before the runner attached).
                None => format!("[{name}] {rest}"),
            };
            self.hold_or_emit(name, joined, &mut out);
            return out;
        }
        match line_source(line) {
            Some(name) if name != "hv" => {
                if let Some(h) = self.held.remove(name) {
                    // Not a continuation: the held line really ended with the mark.
                    out.push(format!("{h}{CUT_MARK}"));
                }
                self.hold_or_emit(name, line.to_string(), &mut out);
            }
            _ => out.push(line.to_string()),
        }
        out
    }

    /// Everything still held (at the end of the output), each as it was shown.
    pub fn drain(&mut self) -> Vec<String> {
        std::mem::take(&mut self.held)
            .into_values()
            .map(|h| format!("{h}{CUT_MARK}"))
            .collect()
    }

    /// The held lines as they were shown, for a log of the output so far.
    pub fn pending(&self) -> impl Iterator<Item = String> + '_ {
        self.held.values().map(|h| format!("{h}{CUT_MARK}"))
    }

    fn hold_or_emit(&mut self, name: &str, line: String, out: &mut Vec<String>) {
        match line.strip_suffix(CUT_MARK) {
            Some(h) => {
                self.held.insert(name.to_string(), h.to_string());
            }
            None => out.push(line),
        }
    }
}

/// `("vm1", "rest")` for a continuation line `[vm1]+ rest`.
fn continuation(line: &str) -> Option<(&str, &str)> {
    let (name, rest) = line.strip_prefix('[')?.split_once("]+ ")?;
    (!name.is_empty() && !name.contains(char::is_whitespace) && !name.contains(']'))
        .then_some((name, rest))
}
