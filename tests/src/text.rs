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
