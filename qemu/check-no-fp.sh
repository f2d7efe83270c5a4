#!/usr/bin/env bash
# Checks that no instruction of the hypervisor ELF touches FP/SIMD state, except the zeroing of a
# vCPU's fresh entry (boot/'s `enter_fresh_frame`).
#
# Why: the trap path does not save the guest's V registers, FPCR and FPSR (docs/design.md,
# section 6): each vCPU owns its physical CPU, so they stay in the registers across traps, and
# that is only sound if no code at EL2 ever uses them. It cannot be trapped instead: in non-VHE
# CPTR_EL2.TFP traps EL2's own FP/SIMD use too (Arm ARM D24.2.35), so the guest's would trap as
# well. The softfloat target makes the compiler emit none; this proves it for the whole binary
# (core, compiler-builtins, every dependency, every global_asm!/asm!).
#
#   qemu/check-no-fp.sh [ELF]     default build/hypervisor.elf (qemu/build.sh)
#
# Disassembles with llvm-objdump from rustup's llvm-tools component (rust-toolchain.toml), the
# same directory as build.sh's llvm-objcopy. An instruction counts as FP/SIMD when an operand is a
# V/Q/D/S/H/B register (SVE Z/P registers, FFR, SME ZA too), FPCR, FPSR or FPMR, or its mnemonic is
# an FP one (f*, SME smstart/smstop). Exit 1 names each function and instruction found; exit 2 on a
# broken set-up (no ELF, no objdump, or the allowed routine missing or no longer seen as FP, which
# would mean this check has gone blind).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The one routine allowed to touch FP/SIMD state, and the fewest such instructions it has (32
# `movi vN.2d, #0`, then FPCR and FPSR written): fewer means this script no longer sees them.
ALLOWED=enter_fresh_frame
ALLOWED_MIN=34
# How many offending functions to name at most, each with its first such instruction (all are
# counted).
SHOW=60

say() { printf '[check-no-fp] %s\n' "$*" >&2; }
die() { printf '[check-no-fp] error: %s\n' "$*" >&2; exit 2; }

elf="${1:-$ROOT/build/hypervisor.elf}"
[ -f "$elf" ] || die "no ELF at $elf: run qemu/build.sh first"

sysroot="$(cd "$ROOT" && rustc --print sysroot)" || die "rustc failed: run qemu/setup.sh"
host="$(cd "$ROOT" && rustc -vV | sed -n 's/^host: //p')"
objdump="$sysroot/lib/rustlib/$host/bin/llvm-objdump"
if [ ! -x "$objdump" ]; then
    say "rustup component add llvm-tools (for llvm-objdump)"
    (cd "$ROOT" && rustup component add llvm-tools) || die "rustup component add llvm-tools failed"
fi
[ -x "$objdump" ] || die "no $objdump after adding llvm-tools"

dis="$(mktemp)"
trap 'rm -f "$dis"' EXIT
# -d: the executable sections; mapping symbols ($d) keep literal pools and the Image header out
# as data. --demangle: Rust names as written.
"$objdump" -d --no-show-raw-insn --demangle "$elf" >"$dis" || die "llvm-objdump failed on $elf"

set +e
awk -v allowed="$ALLOWED" -v allowed_min="$ALLOWED_MIN" -v show="$SHOW" '
    # A function (symbol) header: "0000000000001000 <name>:".
    /^[0-9a-f]+ <.*>:$/ {
        fn = $0
        sub(/^[0-9a-f]+ </, "", fn)
        sub(/>:$/, "", fn)
        next
    }
    # An instruction: "    1000:      \tmnemonic\toperands" (data: "  10: 00 10 4c 01  \t.word\t...").
    /^ *[0-9a-f]+:[^\t]*\t/ {
        line = $0
        addr = line
        sub(/^ */, "", addr)
        sub(/:.*/, "", addr)
        insn = line
        sub(/^[^\t]*\t/, "", insn)
        text = tolower(insn)
        sub(/[ \t]*\/\/.*$/, "", text)      # the comment (decoded immediates, addresses)
        gsub(/<[^>]*>/, "", text)            # symbol names of branch and adr targets
        n = split(text, tok, /[^a-z0-9_]+/)
        mnem = tok[1]
        if (mnem == "" || substr(insn, 1, 1) == "." || text ~ /unknown/) next
        total++
        fp = (mnem ~ /^f/ || mnem == "smstart" || mnem == "smstop")
        for (i = 2; i <= n && !fp; i++) {
            t = tok[i]
            if (t ~ /^[vqdshbzp][0-9]+$/ || t ~ /^(fpcr|fpsr|fpmr|ffr|svcr)$/ || t ~ /^za[0-9a-z]*$/)
                fp = 1
        }
        if (!fp) next
        if (fn == allowed) { allowed_seen++; next }
        bad++
        # The first such instruction of each function, for the first `show` functions.
        if (!(fn in badfn) && ++nbadfn <= show)
            printf "[check-no-fp] FP/SIMD instruction in %s at 0x%s: %s\n", fn, addr, insn
        badfn[fn]++
    }
    END {
        if (total == 0) { print "[check-no-fp] error: no instruction disassembled"; exit 2 }
        if (bad > 0) {
            if (nbadfn > show) printf "[check-no-fp] ... and %d more functions\n", nbadfn - show
            printf "[check-no-fp] FAIL: %d FP/SIMD instructions in %d functions outside %s (of %d instructions); the trap path does not save the guest FP/SIMD state, so EL2 must not touch it\n", bad, nbadfn, allowed, total
            exit 1
        }
        if (allowed_seen < allowed_min) {
            printf "[check-no-fp] error: %s has %d FP/SIMD instructions, not at least %d: the routine is missing or this check no longer recognises them\n", allowed, allowed_seen, allowed_min
            exit 2
        }
        printf "[check-no-fp] ok: %d instructions, no FP/SIMD register or instruction outside %s (%d there)\n", total, allowed, allowed_seen
    }
' "$dis"
rc=$?
set -e
exit "$rc"
