//! Console input on its way into a VM's virtual PL011: what its 32-byte receive FIFO has no room
//! for waits here (at most [`CONSOLE_BACKLOG`] bytes) and is fed in as the guest reads, like a
//! terminal server with flow control, so pasted text is not lost.

use super::vpl011::VPl011;
use alloc::collections::VecDeque;

/// Console input bytes held per VM while its UART's receive FIFO is full.
pub const CONSOLE_BACKLOG: usize = 4096;

/// The bytes waiting for room in one VM's UART.
#[derive(Debug, Default)]
pub struct ConsoleBacklog {
    bytes: VecDeque<u8>,
}

impl ConsoleBacklog {
    /// Queues console input for the guest: into its UART while the FIFO has room, behind what is
    /// already waiting otherwise. Beyond [`CONSOLE_BACKLOG`] bytes the UART gets the byte anyway,
    /// which then overruns as a real one would.
    pub fn input(&mut self, uart: &mut VPl011, byte: u8) {
        if self.bytes.is_empty() && uart.rx_ready() {
            uart.push_rx(byte);
            return;
        }
        if self.bytes.len() >= CONSOLE_BACKLOG {
            // The FIFO may have room while the backlog is full (the guest changed FEN and has
            // not read since): what waits goes first, or this byte would overtake it (found by
            // the vpl011 fuzz target, `fuzz_harness::vpl011`, whose copy of this glue matches).
            self.refill(uart);
        }
        if self.bytes.len() < CONSOLE_BACKLOG {
            self.bytes.push_back(byte);
        } else {
            uart.push_rx(byte);
        }
    }

    /// Moves waiting input into the UART as far as its FIFO has room (after the guest read).
    pub fn refill(&mut self, uart: &mut VPl011) {
        while uart.rx_ready() {
            let Some(b) = self.bytes.pop_front() else {
                break;
            };
            uart.push_rx(b);
        }
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Forgets what waits (a VM reset).
    pub fn clear(&mut self) {
        self.bytes.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::vpl011::{UARTDR as DR, UARTFR as FR};
    use crate::mmio::AccessWidth;

    /// UARTFR.RXFE: the receive FIFO is empty (PL011 TRM 3.3.3).
    const RXFE: u32 = 1 << 4;

    fn drain(uart: &mut VPl011, backlog: &mut ConsoleBacklog) -> alloc::vec::Vec<u8> {
        let mut got = alloc::vec::Vec::new();
        while uart.read(FR, AccessWidth::Word) & RXFE == 0 {
            got.push(uart.read(DR, AccessWidth::Word) as u8);
            backlog.refill(uart);
        }
        got
    }

    #[test]
    fn a_paste_longer_than_the_fifo_arrives_whole_and_in_order() {
        let mut uart = VPl011::new();
        let mut b = ConsoleBacklog::default();
        let text: alloc::vec::Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        for &c in &text {
            b.input(&mut uart, c);
        }
        assert!(
            !b.is_empty(),
            "the FIFO holds only 32 bytes: the rest waits"
        );
        assert_eq!(drain(&mut uart, &mut b), text);
        assert!(b.is_empty());
    }

    #[test]
    fn beyond_the_backlog_the_uart_overruns_rather_than_the_hypervisor_growing() {
        let mut uart = VPl011::new();
        let mut b = ConsoleBacklog::default();
        for i in 0..CONSOLE_BACKLOG + 100 {
            b.input(&mut uart, i as u8);
        }
        assert_eq!(b.len(), CONSOLE_BACKLOG);
        b.clear();
        assert!(b.is_empty());
    }
}
