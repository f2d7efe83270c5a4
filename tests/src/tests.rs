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

#[test]
fn cut_guest_lines_are_joined_back() {
    use crate::text::LineJoiner;
    let mut j = LineJoiner::default();
    // The report cut by a hypervisor line, then continued.
    assert!(j
        .push("[vm1] guest: load-report rounds=22 io-error-lin\\")
        .is_empty());
    assert_eq!(j.push("[hv] vsmmu: vm0: event"), ["[hv] vsmmu: vm0: event"]);
    assert_eq!(j.push("[vm0] other vm"), ["[vm0] other vm"]);
    assert!(j.push("[vm1]+ es=0 echo\\").is_empty(), "cut again");
    assert_eq!(
        j.push("[vm1]+ -replies=0"),
        ["[vm1] guest: load-report rounds=22 io-error-lines=0 echo-replies=0"]
    );
    // A line that really ends with a backslash comes out whole, before the VM's next line.
    assert!(j.push("[vm0] a \\").is_empty());
    assert_eq!(j.push("[vm0] b"), ["[vm0] a \\", "[vm0] b"]);
    // An empty rest ends the line; a continuation without its start keeps its text.
    assert!(j.push("[vm0] ready\\").is_empty());
    assert_eq!(j.pending().collect::<Vec<_>>(), ["[vm0] ready\\"]);
    assert_eq!(j.push("[vm0]+ "), ["[vm0] ready"]);
    assert_eq!(j.push("[vm2]+ tail"), ["[vm2] tail"]);
    assert!(j.push("[vm3] x\\").is_empty());
    assert_eq!(j.drain(), ["[vm3] x\\"]);
    assert_eq!(j.push("plain qemu line"), ["plain qemu line"]);
}

#[test]
fn uboot_block_extraction() {
    let doc = "text\n<!-- uboot-commands:begin -->\n```\n# a comment\nsetenv a 0x1\n\nbooti ${a} - ${b}\n```\n<!-- uboot-commands:end -->\nmore\n";
    assert_eq!(
        uboot_commands(doc).unwrap(),
        ["# a comment", "setenv a 0x1", "booti ${a} - ${b}"]
    );
    // No block, two blocks, markers reversed, no fence, a second fence: refused.
    assert!(uboot_commands("no markers").is_err());
    let twice = format!("{doc}{doc}");
    assert!(uboot_commands(&twice).is_err());
    let reversed = "<!-- uboot-commands:end -->\n```\nbooti\n```\n<!-- uboot-commands:begin -->\n";
    assert!(uboot_commands(reversed).is_err());
    let unfenced = "<!-- uboot-commands:begin -->\nbooti\n<!-- uboot-commands:end -->\n";
    assert!(uboot_commands(unfenced).is_err());
    let nested = "<!-- uboot-commands:begin -->\n```\nbooti\n```\n```\nx\n```\n<!-- uboot-commands:end -->\n";
    assert!(uboot_commands(nested).is_err());
}

#[test]
fn uboot_word_splitting_and_limits() {
    assert_eq!(
        uboot_words(r##"fdt set /chosen/vm0 "#address-cells" <2>"##),
        ["fdt", "set", "/chosen/vm0", "#address-cells", "<2>"]
    );
    assert_eq!(
        uboot_words(r#"fdt set /n compatible "a,b" "c""#),
        ["fdt", "set", "/n", "compatible", "a,b", "c"]
    );
    assert_eq!(uboot_words("echo a # comment"), ["echo", "a"]);
    assert!(uboot_words("# only a comment").is_empty());
    assert!(uboot_words("").is_empty());

    let ok: Vec<String> = ["# c", "setenv x 0x1", "booti ${x} - ${y}"]
        .map(String::from)
        .to_vec();
    check_uboot_commands(&ok).unwrap();
    // 17 words: U-Boot would print the usage.
    let long = format!("fdt set /n p <{}>", vec!["0x1"; 13].join(" "));
    assert_eq!(uboot_words(&long).len(), 17);
    assert!(check_uboot_commands(&[long, "booti".to_string()]).is_err());
    let wide = format!("echo {}", "x".repeat(UBOOT_LINE_MAX));
    assert!(check_uboot_commands(&[wide, "booti".to_string()]).is_err());
    assert!(check_uboot_commands(&["booti\t1".to_string()]).is_err());
    assert!(check_uboot_commands(&["echo \"open".to_string(), "booti".to_string()]).is_err());
    assert!(check_uboot_commands(&["booti x".to_string(), "# after".to_string()]).is_ok());
    assert!(check_uboot_commands(&["booti x".to_string(), "echo late".to_string()]).is_err());

    let vars = uboot_literal_vars(
        &["setenv a 0x49000000", "setenv b 0x${filesize}", "load x"].map(String::from),
    );
    assert_eq!(vars.len(), 1);
    assert_eq!(vars["a"], "0x49000000");
}

#[test]
fn fpcheck_lines() {
    let ok = parse_fpcheck(
        "[vm1] fpcheck: ok traps=2000000 mismatches=0 threads=2 batch=1000 secs=9.123 \
         ns_per_trap=9123 reg=0x1c1e0eb\r",
    )
    .expect("an ok line");
    assert!(ok.ok);
    assert_eq!(
        (ok.traps, ok.mismatches, ok.ns_per_trap),
        (2_000_000, 0, 9123)
    );
    assert!(ok.text.starts_with("fpcheck: ok traps=2000000"));
    let fail = parse_fpcheck(
        "fpcheck: FAIL traps=4000 mismatches=3 threads=2 batch=1000 secs=0.1 ns_per_trap=50 \
         reg=0x1 first=thread 0 batch 0 v5 expected 0x1 got 0x0",
    )
    .expect("a FAIL line");
    assert!(!fail.ok);
    assert_eq!(fail.mismatches, 3);
    assert_eq!(parse_fpcheck("fpcheck: FAIL cannot open /dev/mem"), None);
    assert_eq!(parse_fpcheck("hvfpcheck smmu 1000"), None);
}

#[test]
fn register_trap_lines() {
    let regs = parse_register_traps(
        "[hv] vsmmu: vm0 traps by register: IDR0@0x0 r2000005/w0, CR0@0x20 r3/w2, \
         EVENTQ_CONS@0x100ac r1/w7",
    );
    assert_eq!(regs["IDR0"], (2_000_005, 0));
    assert_eq!(regs["CR0"], (3, 2));
    assert_eq!(regs["EVENTQ_CONS"], (1, 7));
    assert!(parse_register_traps("[hv] vsmmu: vm0 traps by register: ").is_empty());
}
