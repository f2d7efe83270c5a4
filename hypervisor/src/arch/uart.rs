//! The physical console: a PL011 or 8250-family UART found through /chosen/stdout-path, shared by the hypervisor's
//! log and every guest's console. Output goes through the [`ConsoleMux`] (one source per
//! physical line, each line prefixed) and input through the [`InputRouter`] (one VM has the
//! focus), both under the one console lock.

use super::mmio::{block, Mmio, Pl011Regs};
use crate::console::{ConsoleMux, InputAction, InputRouter, MonitorInput};
use crate::platform::UartKind;
use crate::ratelimit::{site_key, LogLimiter, Verdict};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};
use spin::Mutex;
use tock_registers::interfaces::{Readable, Writeable};

const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;
const INT_RX: u32 = 1 << 4;
const CR_UARTEN: u32 = 1 << 0;
const CR_TXE: u32 = 1 << 8;
const CR_RXE: u32 = 1 << 9;
const INT_RT: u32 = 1 << 6;

/// The physical UART.
#[derive(Debug)]
enum Uart {
    Pl011(Mmio<Pl011Regs>),
    Ns16550(Ns16550),
}

impl Uart {
    fn write(&self, bytes: &[u8]) {
        match self {
            Uart::Pl011(regs) => {
                for &b in bytes {
                    while regs.uartfr.get() & FR_TXFF != 0 {}
                    regs.uartdr.set(b as u32);
                }
            }
            Uart::Ns16550(u) => {
                for &b in bytes {
                    while u.read(NS_LSR) & LSR_THRE == 0 {}
                    u.write(NS_THR, b);
                }
            }
        }
    }

    fn getc(&self) -> Option<u8> {
        match self {
            Uart::Pl011(regs) => {
                (regs.uartfr.get() & FR_RXFE == 0).then(|| regs.uartdr.get() as u8)
            }
            Uart::Ns16550(u) => (u.read(NS_LSR) & LSR_DR != 0).then(|| u.read(NS_RBR)),
        }
    }

    fn enable_rx_irq(&self) {
        match self {
            Uart::Pl011(regs) => {
                regs.uarticr.set(INT_RX | INT_RT);
                regs.uartimsc.set(INT_RX | INT_RT);
            }
            // Received-data-available only: the line stays asserted until RBR is drained.
            Uart::Ns16550(u) => u.write(NS_IER, IER_ERBFI),
        }
    }
}

// 8250/16550 registers (by index, spaced by `reg-shift`) and bits, as in Linux's
// `include/uapi/linux/serial_reg.h`.
const NS_RBR: usize = 0;
const NS_THR: usize = 0;
const NS_IER: usize = 1;
const NS_LSR: usize = 5;
const LSR_DR: u8 = 1 << 0;
const LSR_THRE: u8 = 1 << 5;
const IER_ERBFI: u8 = 1 << 0;

/// An 8250/16550-compatible UART: register `n` at `base + (n << shift)`, accessed with
/// `width`-byte loads and stores (DesignWare APB UARTs need 32-bit ones).
#[derive(Debug)]
struct Ns16550 {
    base: u64,
    shift: u8,
    width: u8,
}

impl Ns16550 {
    fn addr(&self, reg: usize) -> usize {
        self.base as usize + (reg << self.shift)
    }

    fn read(&self, reg: usize) -> u8 {
        let a = self.addr(reg);
        // SAFETY: `init`'s caller guarantees an 8250-family register block at `base`, mapped as
        // Device memory; `reg` is one of its registers at the DT's spacing and width.
        unsafe {
            if self.width == 4 {
                (a as *const u32).read_volatile() as u8
            } else {
                (a as *const u8).read_volatile()
            }
        }
    }

    fn write(&self, reg: usize, v: u8) {
        let a = self.addr(reg);
        // SAFETY: as in `read`.
        unsafe {
            if self.width == 4 {
                (a as *mut u32).write_volatile(u32::from(v));
            } else {
                (a as *mut u8).write_volatile(v);
            }
        }
    }
}

/// The console: the UART and the state that shares it.
#[derive(Debug)]
pub struct Console {
    uart: Uart,
    mux: ConsoleMux,
    input: InputRouter,
    /// Per VM: input has been delivered to it (it is being used interactively).
    typed_into: Vec<bool>,
    /// The VMs' names, by index, for the console's messages.
    names: Vec<String>,
}

/// The console, once probed.
pub static CONSOLE: Mutex<Option<Console>> = Mutex::new(None);

/// Starts using the UART of `kind` at `base`, for the hypervisor's own lines only until
/// [`set_vms`].
///
/// # Safety
///
/// `base` must be a UART of that kind mapped as Device memory (or the MMU off) for the rest of
/// the hypervisor's life.
pub unsafe fn init(base: u64, kind: UartKind) {
    let uart = match kind {
        UartKind::Pl011 => {
            // SAFETY: the caller guarantees `base` is a PL011 register block.
            let regs = unsafe { block::<Pl011Regs>(base) };
            // Firmware normally leaves the console enabled (U-Boot does); QEMU's loader does
            // not. Baud rate and framing are left as firmware set them.
            if regs.uartcr.get() & CR_UARTEN == 0 {
                regs.uartcr
                    .set(regs.uartcr.get() | CR_UARTEN | CR_TXE | CR_RXE);
            }
            Uart::Pl011(regs)
        }
        // SAFETY: as above; the SBSA UART has the PL011's registers but UARTCR.
        UartKind::SbsaUart => Uart::Pl011(unsafe { block::<Pl011Regs>(base) }),
        // Left as firmware programmed it (divisor, framing, FIFOs): the boot loader printed
        // through it.
        UartKind::Ns16550 {
            reg_shift,
            reg_io_width,
        } => Uart::Ns16550(Ns16550 {
            base,
            shift: reg_shift,
            width: reg_io_width,
        }),
    };
    *CONSOLE.lock() = Some(Console {
        uart,
        mux: ConsoleMux::new(Vec::new()),
        input: InputRouter::new(0),
        typed_into: Vec::new(),
        names: Vec::new(),
    });
}

/// Shares the console with VMs whose names and prefixes are given by VM index; input goes to
/// VM 0.
pub fn set_vms(names: Vec<String>, prefixes: Vec<String>) {
    if let Some(c) = CONSOLE.lock().as_mut() {
        c.input = InputRouter::new(prefixes.len());
        c.typed_into = alloc::vec![false; prefixes.len()];
        c.mux = ConsoleMux::new(prefixes);
        c.names = names;
    }
}

/// Moves the console input to VM `vm` (the monitor's `focus`), saying so as Ctrl-\ <digit>
/// does; `false` if there is no such VM.
pub fn set_focus(vm: usize) -> bool {
    let mut guard = CONSOLE.lock();
    let Some(c) = guard.as_mut() else {
        return false;
    };
    if !c.input.set_focus(vm) {
        return false;
    }
    c.focus_moved(vm);
    true
}

impl Console {
    fn focus_moved(&mut self, vm: usize) {
        let uart = &self.uart;
        let name = self.names.get(vm).map_or("?", String::as_str);
        self.mux
            .hv_line(&alloc::format!("console input -> {name}"), &mut |b| {
                uart.write(b)
            });
        self.mux.flush_partial(vm, &mut |b| uart.write(b));
    }
}

struct LineBuf(String);

impl Write for LineBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.push_str(s);
        Ok(())
    }
}

/// Writes one hypervisor line (prefixed `[hv] ` by the mux).
pub fn print_hv(args: fmt::Arguments) {
    let mut line = LineBuf(String::new());
    let _ = line.write_fmt(args);
    if let Some(c) = CONSOLE.lock().as_mut() {
        let uart = &c.uart;
        c.mux.hv_line(&line.0, &mut |b| uart.write(b));
    }
}

/// Writes guest console output of VM `vm`. Complete lines appear at once; a partial line
/// waits for its newline, or for [`flush_if_focused`] when the guest goes idle (a prompt, the
/// echo of typed input), so boot messages of two VMs never break each other's lines.
pub fn print_guest(vm: usize, bytes: &[u8]) {
    if let Some(c) = CONSOLE.lock().as_mut() {
        let uart = &c.uart;
        c.mux.guest_write(vm, bytes, false, &mut |b| uart.write(b));
    }
}

/// Shows VM `vm`'s partial line if it has the input focus and someone has typed into it:
/// called when one of its vCPUs goes idle, which is when a shell waits at its prompt. A VM
/// nobody types into keeps whole lines only, so its output never splits around other sources'.
pub fn flush_if_focused(vm: usize) {
    if let Some(c) = CONSOLE.lock().as_mut() {
        if c.input.focus() == vm
            && c.typed_into.get(vm).copied().unwrap_or(false)
            && c.input.monitor_line().is_none()
        {
            let uart = &c.uart;
            c.mux.flush_partial(vm, &mut |b| uart.write(b));
        }
    }
}

/// Most input bytes handled per call; the rest stay in the UART's FIFO for the next interrupt.
const MAX_INPUT: usize = 64;

/// Console input taken from the UART.
#[derive(Debug, Default)]
pub struct Input {
    /// The bytes for each VM (VM index, byte), in order.
    pub bytes: Vec<(usize, u8)>,
    /// The user asked for the vSMMU statistics (Ctrl-\ s).
    pub stats: bool,
    /// Monitor command lines submitted, in order.
    pub commands: Vec<String>,
}

/// Drains received bytes and routes them. Focus switches and help are handled here; the rest
/// is the caller's.
pub fn take_input() -> Input {
    let mut input = Input::default();
    let delivered = &mut input.bytes;
    let mut guard = CONSOLE.lock();
    let Some(c) = guard.as_mut() else {
        return input;
    };
    while delivered.len() < MAX_INPUT {
        let Some(byte) = c.uart.getc() else {
            break;
        };
        match c.input.feed(byte) {
            InputAction::Deliver { vm, byte } => {
                if let Some(t) = c.typed_into.get_mut(vm) {
                    *t = true;
                }
                delivered.push((vm, byte));
            }
            InputAction::SwitchFocus(vm) => c.focus_moved(vm),
            InputAction::Help => {
                let uart = &c.uart;
                c.mux.hv_line(crate::console::HELP, &mut |b| uart.write(b));
                c.mux.hv_line(crate::monitor::HELP, &mut |b| uart.write(b));
            }
            InputAction::Stats => input.stats = true,
            InputAction::Monitor(what) => {
                let uart = &c.uart;
                match what {
                    MonitorInput::Edited => {
                        let line = c.input.monitor_line().unwrap_or_default();
                        c.mux.prompt_show(line, &mut |b| uart.write(b));
                    }
                    MonitorInput::Cancelled => c.mux.prompt_end(&mut |b| uart.write(b)),
                    MonitorInput::Submitted => {
                        c.mux.prompt_end(&mut |b| uart.write(b));
                        input.commands.extend(c.input.take_command());
                        // One command per call: it runs before the bytes typed after it.
                        break;
                    }
                }
            }
            InputAction::Ignored => {}
        }
    }
    drop(guard);
    input
}

/// Unmasks the receive and receive-timeout interrupts.
pub fn enable_rx_irq() {
    if let Some(c) = CONSOLE.lock().as_mut() {
        c.uart.enable_rx_irq();
    }
}

/// The VM whose action each CPU is handling, for the log rate limits: `usize::MAX` while the
/// CPU does the hypervisor's own work (boot, a VM's load, console input).
static LOG_VM: [AtomicUsize; boot::MAX_CPUS] =
    [const { AtomicUsize::new(usize::MAX) }; boot::MAX_CPUS];

/// The log rate limits (crate::ratelimit): per VM and call site.
static LIMITER: Mutex<LogLimiter> = Mutex::new(LogLimiter::new());

/// Makes this CPU's log lines from now on count against `vm`'s rate limits (`None`: the
/// hypervisor's own, not limited). Returns what it was.
pub fn set_log_vm(vm: Option<usize>) -> Option<usize> {
    let old = LOG_VM[super::this_cpu()].swap(vm.unwrap_or(usize::MAX), Ordering::Relaxed);
    (old != usize::MAX).then_some(old)
}

/// Prints how many lines each VM had dropped by the rate limits, if that is due.
pub fn report_dropped() {
    let Some(counts) = LIMITER.lock().report(super::timestamp_ms()) else {
        return;
    };
    for (vm, &n) in counts.iter().enumerate().filter(|(_, &n)| n > 0) {
        let name = super::HV
            .get()
            .and_then(|h| h.vms.get(vm))
            .map_or("a VM", |v| v.config.name.as_str());
        print_hv(format_args!(
            "WARN: {name}: {n} log lines it caused were dropped by the rate limit (at most {} a second per message after a burst of {})",
            1000 / crate::ratelimit::REFILL_MS.max(1),
            crate::ratelimit::BURST
        ));
    }
}

/// `log` backend printing to the console; lines a guest caused are rate-limited per VM and
/// call site.
#[derive(Debug)]
pub struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let vm = LOG_VM[super::this_cpu()].load(Ordering::Relaxed);
        let mut dropped = 0;
        if vm != usize::MAX {
            let site = site_key(record.file().unwrap_or(""), record.line().unwrap_or(0));
            match LIMITER.lock().check(vm, site, super::timestamp_ms()) {
                Verdict::Drop => return,
                Verdict::Print { dropped: n } => dropped = n,
            }
        }
        let level = record.level();
        match (level, dropped) {
            (log::Level::Info, 0) => print_hv(format_args!("{}", record.args())),
            (log::Level::Info, n) => {
                print_hv(format_args!("{} ({n} more like it dropped)", record.args()))
            }
            (_, 0) => print_hv(format_args!("{level}: {}", record.args())),
            (_, n) => print_hv(format_args!(
                "{level}: {} ({n} more like it dropped)",
                record.args()
            )),
        }
        if vm != usize::MAX {
            report_dropped();
        }
    }

    fn flush(&self) {}
}
