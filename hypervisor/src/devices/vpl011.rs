//! Emulated Arm PrimeCell PL011 UART (r1p5, TRM DDI 0183) for the guest console.
//!
//! The guest's accesses to the UART frame trap to the hypervisor, which forwards them to
//! [`VPl011::read`] / [`VPl011::write`]. Transmitted bytes leave through a callback at the moment
//! the guest writes UARTDR; received bytes are queued by the hypervisor with
//! [`VPl011::push_rx`]. The combined interrupt line `UARTINTR` is [`VPl011::irq_level`], which the
//! hypervisor turns into a level-triggered virtual SPI. The behaviour follows QEMU's
//! `hw/char/pl011.c` where the TRM leaves room, because Linux's `amba-pl011` driver is known to
//! work against it.
//!
//! Deliberate simplifications (each one keeps Linux happy and the model free of timers):
//!
//! * The transmitter is infinitely fast: UARTFR always reads TXFE=1, TXFF=0, BUSY=0, so pollers
//!   (earlycon, the console write path, `tx_chars`) never wait.
//! * UARTCR.UARTEN/TXE/RXE do not gate traffic. The reset value of UARTCR has UARTEN clear, and
//!   `earlycon` writes UARTDR without initialising anything, relying on firmware having enabled
//!   the UART; Linux also briefly writes UARTCR=0 in `set_termios`, and input typed meanwhile
//!   should not be lost.
//! * The receive timeout (RTIS) expires "immediately": whenever the RX FIFO holds data below the
//!   trigger level and nothing more is arriving right now, RTIS is raised.
//! * Modem inputs are constant: CTS, DSR and DCD asserted (a connected terminal), RI clear, so the
//!   modem-status interrupts never fire and a getty without CLOCAL still sees carrier.
//! * Loopback (UARTCR.LBE) routes transmitted bytes into the RX FIFO instead of the console, and
//!   external input is discarded meanwhile, as the TRM describes; modem-line loopback is not
//!   modelled.
//! * No DMA (UARTDMACR is storage only), no IrDA, no break or line errors: only overrun can set an
//!   error bit.

use bitflags::bitflags;

use crate::mmio::AccessWidth;

/// Size of the PL011 register frame.
pub const UART_MMIO_SIZE: u64 = 0x1000;

/// Data register.
pub const UARTDR: u64 = 0x000;
/// Receive status register (read).
pub const UARTRSR: u64 = 0x004;
/// Error clear register (write), same offset as [`UARTRSR`].
pub const UARTECR: u64 = 0x004;
/// Flag register.
pub const UARTFR: u64 = 0x018;
/// IrDA low-power counter register.
pub const UARTILPR: u64 = 0x020;
/// Integer baud rate register.
pub const UARTIBRD: u64 = 0x024;
/// Fractional baud rate register.
pub const UARTFBRD: u64 = 0x028;
/// Line control register.
pub const UARTLCR_H: u64 = 0x02C;
/// Control register.
pub const UARTCR: u64 = 0x030;
/// Interrupt FIFO level select register.
pub const UARTIFLS: u64 = 0x034;
/// Interrupt mask set/clear register.
pub const UARTIMSC: u64 = 0x038;
/// Raw interrupt status register.
pub const UARTRIS: u64 = 0x03C;
/// Masked interrupt status register.
pub const UARTMIS: u64 = 0x040;
/// Interrupt clear register.
pub const UARTICR: u64 = 0x044;
/// DMA control register.
pub const UARTDMACR: u64 = 0x048;
/// First of the eight identification registers (UARTPeriphID0..3, UARTPCellID0..3).
pub const UARTPERIPHID0: u64 = 0xFE0;
/// Last identification register (UARTPCellID3).
pub const UARTPCELLID3: u64 = 0xFFC;

/// PeriphID0..3 then PCellID0..3 of a PL011 r1p5. The AMBA bus matches on these before binding
/// the driver, and PeriphID2 revision 3 makes Linux use 32-entry FIFOs, matching this model.
const ID_BYTES: [u8; 8] = [0x11, 0x10, 0x34, 0x00, 0x0D, 0xF0, 0x05, 0xB1];

/// Depth of the RX FIFO when UARTLCR_H.FEN is set (r1p5 has 32-entry FIFOs).
const FIFO_DEPTH: usize = 32;

/// UARTDR read bits above the data byte: framing, parity, break and overrun errors.
const DR_OE: u16 = 1 << 11;
/// UARTRSR bit for overrun; the other three RSR bits mirror UARTDR bits 10:8.
const RSR_OE: u32 = 1 << 3;

/// UARTLCR_H.FEN: FIFOs enabled (otherwise 1-entry holding registers).
const LCR_H_FEN: u32 = 1 << 4;
/// UARTCR.LBE: loopback enable.
const CR_LBE: u32 = 1 << 7;
/// UARTCR.TXE | UARTCR.RXE, the TRM reset value of UARTCR.
const CR_RESET: u32 = 0x300;
/// UARTIFLS reset value: both trigger levels at 1/2 full.
const IFLS_RESET: u32 = 0x12;

/// Writable bits of each register, so reads return zero in reserved fields as hardware does.
const ILPR_MASK: u32 = 0xFF;
const IBRD_MASK: u32 = 0xFFFF;
const FBRD_MASK: u32 = 0x3F;
const LCR_H_MASK: u32 = 0xFF;
const CR_MASK: u32 = 0xFF87;
const IFLS_MASK: u32 = 0x3F;
const DMACR_MASK: u32 = 0x7;

bitflags! {
    /// UARTFR bits.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Flags: u32 {
        /// Clear to send (modem input).
        const CTS = 1 << 0;
        /// Data set ready (modem input).
        const DSR = 1 << 1;
        /// Data carrier detect (modem input).
        const DCD = 1 << 2;
        /// Transmitter busy.
        const BUSY = 1 << 3;
        /// Receive FIFO empty.
        const RXFE = 1 << 4;
        /// Transmit FIFO full.
        const TXFF = 1 << 5;
        /// Receive FIFO full.
        const RXFF = 1 << 6;
        /// Transmit FIFO empty.
        const TXFE = 1 << 7;
        /// Ring indicator (modem input).
        const RI = 1 << 8;
    }

    /// Interrupt bits, laid out identically in UARTIMSC, UARTRIS, UARTMIS and UARTICR.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Interrupts: u32 {
        /// nUARTRI modem interrupt.
        const RIM = 1 << 0;
        /// nUARTCTS modem interrupt.
        const CTSM = 1 << 1;
        /// nUARTDCD modem interrupt.
        const DCDM = 1 << 2;
        /// nUARTDSR modem interrupt.
        const DSRM = 1 << 3;
        /// Receive (RX FIFO at or above trigger level).
        const RX = 1 << 4;
        /// Transmit (TX FIFO at or below trigger level).
        const TX = 1 << 5;
        /// Receive timeout.
        const RT = 1 << 6;
        /// Framing error.
        const FE = 1 << 7;
        /// Parity error.
        const PE = 1 << 8;
        /// Break error.
        const BE = 1 << 9;
        /// Overrun error.
        const OE = 1 << 10;
    }
}

/// State of one emulated PL011.
///
/// Interrupt semantics (all raw bits are latched in `ris`; the line is `ris & imsc != 0`):
///
/// * RXIS is set when a received byte brings the RX FIFO level to the trigger level or above
///   (trigger is 1 with the FIFO disabled) and cleared when reads bring it below, or by UARTICR.
/// * RTIS is set when the FIFO holds data below the trigger level after a byte arrives or is
///   read (the timeout is modelled as already expired) and cleared when the FIFO empties, or by
///   UARTICR.
/// * TXIS: the TX FIFO drains instantly, so it is always "at or below the trigger level". As in
///   QEMU, TXIS is latched on every UARTDR write (the FIFO just passed back through the trigger)
///   and is cleared only by UARTICR. In addition it is latched when the guest unmasks TXIM, so a
///   driver that enables the interrupt first and writes from its handler gets the interrupt it
///   waits for instead of stalling. Linux never clears TXIS through UARTICR; it gates it with
///   TXIM, which it sets only while its buffer is non-empty and clears in `stop_tx` once the
///   buffer is empty, and each TX interrupt sends up to 16 bytes, so TX progress is guaranteed
///   and the interrupt handler terminates.
/// * OEIS is latched on an RX overrun and cleared by UARTICR.
#[derive(Clone, Debug)]
pub struct VPl011 {
    /// Ring buffer of received entries: data in bits 7:0, error flags in bits 11:8 as UARTDR.
    rx_fifo: [u16; FIFO_DEPTH],
    /// Index of the oldest entry.
    rx_head: usize,
    /// Number of queued entries.
    rx_len: usize,
    /// An overrun happened: the next character that enters the FIFO carries UARTDR.OE, which is
    /// how the TRM reports that characters were lost before it.
    rx_overrun_pending: bool,
    rsr: u32,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: Interrupts,
    ris: Interrupts,
    dmacr: u32,
}

impl Default for VPl011 {
    fn default() -> Self {
        Self::new()
    }
}

impl VPl011 {
    /// A UART in its TRM reset state: FIFOs disabled, UARTCR = TXE|RXE, UARTIFLS = 1/2, all
    /// interrupts masked and clear.
    pub fn new() -> Self {
        Self {
            rx_fifo: [0; FIFO_DEPTH],
            rx_head: 0,
            rx_len: 0,
            rx_overrun_pending: false,
            rsr: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            imsc: Interrupts::empty(),
            ris: Interrupts::empty(),
            dmacr: 0,
        }
    }

    /// Guest read of the register frame at `offset`.
    ///
    /// Narrow accesses return the addressed byte lanes of the containing 32-bit register; a
    /// 64-bit access is treated as a 32-bit one (the registers are 32 bits apart, and an Arm
    /// UART is never accessed that way by a correct driver). Reserved and out-of-frame offsets
    /// read as zero. Only an access that includes byte 0 of UARTDR pops the RX FIFO.
    pub fn read(&mut self, offset: u64, width: AccessWidth) -> u32 {
        if offset >= UART_MMIO_SIZE {
            return 0;
        }
        let shift = (offset & 3) * 8;
        let word = match offset & !3 {
            UARTDR if shift == 0 => self.read_dr(),
            // Bytes 1..3 of UARTDR: the error bits of the next character, without consuming it.
            UARTDR => self.peek_rx().map_or(0, u32::from),
            UARTRSR => self.rsr,
            UARTFR => self.flags().bits(),
            UARTILPR => self.ilpr,
            UARTIBRD => self.ibrd,
            UARTFBRD => self.fbrd,
            UARTLCR_H => self.lcr_h,
            UARTCR => self.cr,
            UARTIFLS => self.ifls,
            UARTIMSC => self.imsc.bits(),
            UARTRIS => self.ris.bits(),
            UARTMIS => (self.ris & self.imsc).bits(),
            UARTDMACR => self.dmacr,
            id @ UARTPERIPHID0..=UARTPCELLID3 => usize::try_from((id - UARTPERIPHID0) >> 2)
                .ok()
                .and_then(|i| ID_BYTES.get(i))
                .map_or(0, |&b| u32::from(b)),
            // UARTICR is write-only; everything else is reserved or test space: RAZ.
            _ => 0,
        };
        (word >> shift) & lane_mask(width)
    }

    /// Guest write of `value` to the register frame at `offset`; transmitted bytes go to `tx`.
    ///
    /// Narrow writes to storage registers replace only the addressed byte lanes. A write to
    /// UARTDR transmits only when it includes byte 0. Reserved, read-only and out-of-frame
    /// offsets ignore writes.
    pub fn write(&mut self, offset: u64, width: AccessWidth, value: u32, tx: &mut dyn FnMut(u8)) {
        if offset >= UART_MMIO_SIZE {
            return;
        }
        let shift = (offset & 3) * 8;
        let lanes = lane_mask(width) << shift;
        let bits = (value << shift) & lanes;
        let merge = |old: u32| (old & !lanes) | bits;
        match offset & !3 {
            // Only a write that includes byte 0 carries a character.
            UARTDR if shift == 0 => self.transmit(bits as u8, tx),
            // Any write clears the error status, whatever the data.
            UARTECR => self.rsr = 0,
            UARTILPR => self.ilpr = merge(self.ilpr) & ILPR_MASK,
            UARTIBRD => self.ibrd = merge(self.ibrd) & IBRD_MASK,
            UARTFBRD => self.fbrd = merge(self.fbrd) & FBRD_MASK,
            UARTLCR_H => {
                let new = merge(self.lcr_h) & LCR_H_MASK;
                // The FIFO depth changes with FEN; like QEMU, start the new mode empty rather
                // than guess which entries a 1-deep holding register would have kept.
                if (new ^ self.lcr_h) & LCR_H_FEN != 0 {
                    self.flush_rx();
                }
                self.lcr_h = new;
                self.trigger_changed();
            }
            UARTCR => self.cr = merge(self.cr) & CR_MASK,
            UARTIFLS => {
                self.ifls = merge(self.ifls) & IFLS_MASK;
                self.trigger_changed();
            }
            UARTIMSC => {
                let new = Interrupts::from_bits_truncate(merge(self.imsc.bits()));
                // See the TX semantics on the struct: unmasking TXIM reports the (always empty)
                // TX FIFO immediately.
                if new.contains(Interrupts::TX) && !self.imsc.contains(Interrupts::TX) {
                    self.ris.insert(Interrupts::TX);
                }
                self.imsc = new;
            }
            UARTICR => self.ris.remove(Interrupts::from_bits_truncate(bits)),
            UARTDMACR => self.dmacr = merge(self.dmacr) & DMACR_MASK,
            // UARTFR, UARTRIS, UARTMIS and the ID registers are read-only; the rest is reserved.
            _ => {}
        }
    }

    /// Queue one received byte; false if the FIFO is full (byte dropped, overrun flagged as the
    /// TRM says).
    ///
    /// In loopback mode the receiver is disconnected from the outside, so the byte is consumed
    /// and discarded (true), matching QEMU; retrying it would never succeed until the guest
    /// leaves loopback.
    pub fn push_rx(&mut self, byte: u8) -> bool {
        if self.cr & CR_LBE != 0 {
            return true;
        }
        self.receive(byte)
    }

    /// Space left in the RX FIFO.
    pub fn rx_space(&self) -> usize {
        self.rx_depth().saturating_sub(self.rx_len)
    }

    /// Level of the combined interrupt output UARTINTR: any unmasked raw interrupt.
    pub fn irq_level(&self) -> bool {
        self.ris.intersects(self.imsc)
    }

    /// Current UARTFR value.
    fn flags(&self) -> Flags {
        // TX side: infinitely fast transmitter, see the module comment. Modem inputs: a
        // connected terminal.
        let mut fr = Flags::TXFE | Flags::CTS | Flags::DSR | Flags::DCD;
        if self.rx_len == 0 {
            fr |= Flags::RXFE;
        }
        if self.rx_len >= self.rx_depth() {
            fr |= Flags::RXFF;
        }
        fr
    }

    /// Whether the receiver can take a byte now without an overrun (in loopback mode it takes
    /// and discards anything).
    pub fn rx_ready(&self) -> bool {
        self.cr & CR_LBE != 0 || self.rx_len < self.rx_depth()
    }

    fn fifo_enabled(&self) -> bool {
        self.lcr_h & LCR_H_FEN != 0
    }

    fn rx_depth(&self) -> usize {
        if self.fifo_enabled() {
            FIFO_DEPTH
        } else {
            1
        }
    }

    /// RX FIFO level at which RXIS asserts, from UARTIFLS.RXIFLSEL (bits 5:3).
    fn rx_trigger(&self) -> usize {
        if !self.fifo_enabled() {
            // Character mode: any received character is "at the trigger level".
            return 1;
        }
        match (self.ifls >> 3) & 7 {
            0 => FIFO_DEPTH / 8,
            1 => FIFO_DEPTH / 4,
            2 => FIFO_DEPTH / 2,
            3 => FIFO_DEPTH * 3 / 4,
            // 7/8, and the reserved encodings, which the TRM leaves undefined.
            _ => FIFO_DEPTH * 7 / 8,
        }
    }

    fn transmit(&mut self, byte: u8, tx: &mut dyn FnMut(u8)) {
        if self.cr & CR_LBE != 0 {
            // Loopback: the TX line feeds the receiver and nothing reaches the console.
            self.receive(byte);
        } else {
            tx(byte);
        }
        // The byte left the (instant) TX FIFO, which passed back through its trigger level.
        self.ris.insert(Interrupts::TX);
    }

    /// Puts a character into the RX FIFO, or records an overrun if it is full.
    fn receive(&mut self, byte: u8) -> bool {
        if self.rx_len >= self.rx_depth() {
            // TRM: the FIFO contents stay valid, the new character is lost, and the overrun is
            // reported at once in UARTRSR and UARTRIS.
            self.rsr |= RSR_OE;
            self.ris.insert(Interrupts::OE);
            self.rx_overrun_pending = true;
            return false;
        }
        let mut entry = u16::from(byte);
        if core::mem::take(&mut self.rx_overrun_pending) {
            entry |= DR_OE;
        }
        let tail = (self.rx_head + self.rx_len) % FIFO_DEPTH;
        self.rx_fifo[tail] = entry;
        self.rx_len += 1;
        if self.rx_len >= self.rx_trigger() {
            self.ris.insert(Interrupts::RX);
        } else {
            // Nothing more is arriving right now, so the receive timeout expires at once.
            self.ris.insert(Interrupts::RT);
        }
        true
    }

    fn peek_rx(&self) -> Option<u16> {
        (self.rx_len > 0).then(|| self.rx_fifo[self.rx_head])
    }

    /// UARTDR read: pops the oldest character and updates the error status and RX interrupts.
    fn read_dr(&mut self) -> u32 {
        let Some(entry) = self.peek_rx() else {
            // Reading an empty FIFO returns no data; hardware returns stale contents, zero is as
            // good and deterministic.
            return 0;
        };
        self.rx_head = (self.rx_head + 1) % FIFO_DEPTH;
        self.rx_len -= 1;
        // FE/PE/BE (UARTDR 10:8) describe the character just read; OE is set when the overrun
        // happens and stays until UARTECR is written (TRM 3.3.2), so the DR.OE of the character
        // after an overrun must not set it again.
        self.rsr = (self.rsr & RSR_OE) | u32::from((entry >> 8) & 0x7);
        self.rx_level_dropped();
        u32::from(entry)
    }

    /// Re-evaluates RXIS/RTIS after the FIFO level fell.
    fn rx_level_dropped(&mut self) {
        if self.rx_len == 0 {
            self.ris.remove(Interrupts::RX | Interrupts::RT);
        } else if self.rx_len < self.rx_trigger() {
            // Data is left below the trigger level and the line is idle: timeout, immediately.
            self.ris.remove(Interrupts::RX);
            self.ris.insert(Interrupts::RT);
        }
    }

    /// Re-evaluates RXIS/RTIS after UARTIFLS or UARTLCR_H moved the trigger level.
    fn trigger_changed(&mut self) {
        if self.rx_len > 0 && self.rx_len >= self.rx_trigger() {
            self.ris.insert(Interrupts::RX);
        } else {
            self.rx_level_dropped();
        }
    }

    fn flush_rx(&mut self) {
        self.rx_head = 0;
        self.rx_len = 0;
        self.ris.remove(Interrupts::RX | Interrupts::RT);
    }
}

/// Mask of the bits a guest access of `width` moves, capped at the 32-bit register size.
fn lane_mask(width: AccessWidth) -> u32 {
    u32::try_from(width.mask()).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests;
