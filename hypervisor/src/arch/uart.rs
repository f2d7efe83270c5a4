//! The physical console: a PL011 found through /chosen/stdout-path. Shared by the hypervisor's
//! log and every guest's console output, under one lock so that lines stay whole.

use super::mmio::{block, Mmio, Pl011Regs};
use core::fmt::{self, Write};
use spin::Mutex;
use tock_registers::interfaces::{Readable, Writeable};

const FR_TXFF: u32 = 1 << 5;
const FR_RXFE: u32 = 1 << 4;
const INT_RX: u32 = 1 << 4;
const INT_RT: u32 = 1 << 6;

/// The physical UART.
#[derive(Debug)]
pub struct Uart {
    regs: Mmio<Pl011Regs>,
    /// Whether the last byte written ended a line, so the next one gets a prefix.
    at_line_start: bool,
}

impl Uart {
    fn putc(&mut self, b: u8) {
        while self.regs.uartfr.get() & FR_TXFF != 0 {}
        self.regs.uartdr.set(b as u32);
    }

    /// Writes `bytes`, starting every line with `prefix`.
    pub fn write_prefixed(&mut self, prefix: &str, bytes: &[u8]) {
        for &b in bytes {
            if self.at_line_start {
                for p in prefix.bytes() {
                    self.putc(p);
                }
                self.at_line_start = false;
            }
            if b == b'\n' {
                self.putc(b'\r');
                self.at_line_start = true;
            }
            self.putc(b);
        }
    }

    /// Reads one received byte, if any.
    pub fn getc(&mut self) -> Option<u8> {
        if self.regs.uartfr.get() & FR_RXFE != 0 {
            None
        } else {
            Some(self.regs.uartdr.get() as u8)
        }
    }

    /// Unmasks the receive and receive-timeout interrupts.
    pub fn enable_rx_irq(&mut self) {
        self.regs.uarticr.set(INT_RX | INT_RT);
        self.regs.uartimsc.set(INT_RX | INT_RT);
    }
}

/// Ends any partial guest line so a hypervisor line starts on its own.
struct LineWriter<'a>(&'a mut Uart, &'a str);

impl Write for LineWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_prefixed(self.1, s.as_bytes());
        Ok(())
    }
}

/// The console, once probed.
pub static CONSOLE: Mutex<Option<Uart>> = Mutex::new(None);

/// Starts using the PL011 at `base`.
///
/// # Safety
///
/// `base` must be a PL011 mapped as Device memory (or the MMU off) for the rest of the
/// hypervisor's life.
pub unsafe fn init(base: u64) {
    // SAFETY: the caller guarantees `base` is a PL011 register block.
    let regs = unsafe { block::<Pl011Regs>(base) };
    *CONSOLE.lock() = Some(Uart {
        regs,
        at_line_start: true,
    });
}

/// Writes a formatted hypervisor line, prefixed `[hv] `.
pub fn print_hv(args: fmt::Arguments) {
    let mut guard = CONSOLE.lock();
    if let Some(uart) = guard.as_mut() {
        if !uart.at_line_start {
            uart.write_prefixed("", b"\n");
        }
        let _ = LineWriter(uart, "[hv] ").write_fmt(args);
        uart.write_prefixed("", b"\n");
    }
}

/// Writes guest console output with the VM's prefix at each line start.
pub fn print_guest(prefix: &str, bytes: &[u8]) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        uart.write_prefixed(prefix, bytes);
    }
}

/// Drains received bytes into `sink`.
pub fn drain_rx(mut sink: impl FnMut(u8)) {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        while let Some(b) = uart.getc() {
            sink(b);
        }
    }
}

/// Enables receive interrupts on the console.
pub fn enable_rx_irq() {
    if let Some(uart) = CONSOLE.lock().as_mut() {
        uart.enable_rx_irq();
    }
}

/// `log` backend printing to the console.
#[derive(Debug)]
pub struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            match record.level() {
                log::Level::Info => print_hv(format_args!("{}", record.args())),
                level => print_hv(format_args!("{level}: {}", record.args())),
            }
        }
    }

    fn flush(&self) {}
}
