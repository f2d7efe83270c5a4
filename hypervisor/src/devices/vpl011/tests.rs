use super::*;
use alloc::vec::Vec;

const W: AccessWidth = AccessWidth::Word;

fn wr(u: &mut VPl011, offset: u64, value: u32) -> Vec<u8> {
    let mut out = Vec::new();
    u.write(offset, W, value, &mut |b| out.push(b));
    out
}

fn fr(u: &mut VPl011) -> Flags {
    Flags::from_bits_retain(u.read(UARTFR, W))
}

fn ris(u: &mut VPl011) -> Interrupts {
    Interrupts::from_bits_retain(u.read(UARTRIS, W))
}

fn with_fifo() -> VPl011 {
    let mut u = VPl011::new();
    wr(&mut u, UARTLCR_H, 0x70); // 8 bits, FEN
    u
}

#[test]
fn id_registers_and_reset_values() {
    let mut u = VPl011::new();
    let ids: Vec<u32> = (0..8).map(|i| u.read(UARTPERIPHID0 + 4 * i, W)).collect();
    assert_eq!(ids, [0x11, 0x10, 0x34, 0x00, 0x0D, 0xF0, 0x05, 0xB1]);
    assert_eq!(u.read(0xFE8, AccessWidth::Byte), 0x34);
    assert_eq!(u.read(UARTCR, W), 0x300);
    assert_eq!(u.read(UARTIFLS, W), 0x12);
    assert_eq!(u.read(UARTIMSC, W), 0);
    assert_eq!(u.read(UARTRIS, W), 0);
    assert_eq!(u.read(UARTLCR_H, W), 0);
    assert!(!u.irq_level());
    // ID registers are read-only.
    wr(&mut u, UARTPERIPHID0, 0xFF);
    assert_eq!(u.read(UARTPERIPHID0, W), 0x11);
    assert_eq!(u.rx_space(), 1);
    assert_eq!(VPl011::default().read(UARTCR, W), 0x300);
}

#[test]
fn tx_goes_through_callback_at_any_width() {
    let mut u = VPl011::new();
    assert_eq!(wr(&mut u, UARTDR, 0x141), b"A"); // only the data byte is sent
    let mut out = Vec::new();
    u.write(UARTDR, AccessWidth::Byte, u32::from(b'b'), &mut |b| {
        out.push(b)
    });
    u.write(UARTDR, AccessWidth::Half, u32::from(b'c'), &mut |b| {
        out.push(b)
    });
    u.write(UARTDR, AccessWidth::Double, u32::from(b'd'), &mut |b| {
        out.push(b)
    });
    // Byte 1 of DR is not the data lane.
    u.write(UARTDR + 1, AccessWidth::Byte, u32::from(b'x'), &mut |b| {
        out.push(b)
    });
    assert_eq!(out, b"bcd");
    let f = fr(&mut u);
    assert!(f.contains(Flags::TXFE) && !f.intersects(Flags::TXFF | Flags::BUSY));
    // Byte-wide FR read, as an 8-bit earlycon would do.
    assert_eq!(u.read(UARTFR, AccessWidth::Byte) & Flags::TXFF.bits(), 0);
}

#[test]
fn loopback_feeds_receiver_not_console() {
    let mut u = VPl011::new();
    wr(&mut u, UARTCR, 0x381);
    assert!(wr(&mut u, UARTDR, u32::from(b'L')).is_empty());
    assert!(u.push_rx(b'z')); // external input is disconnected
    assert_eq!(u.read(UARTDR, W), u32::from(b'L'));
    assert!(fr(&mut u).contains(Flags::RXFE));
}

#[test]
fn rx_fifo_order_full_and_overrun_with_fifo() {
    let mut u = with_fifo();
    assert_eq!(u.rx_space(), 32);
    for i in 0..32u8 {
        assert!(u.push_rx(i));
    }
    assert_eq!(u.rx_space(), 0);
    assert!(fr(&mut u).contains(Flags::RXFF));
    assert!(!u.push_rx(0xAA));
    assert!(!u.push_rx(0xBB));
    assert_eq!(u.read(UARTRSR, W), RSR_OE);
    assert!(ris(&mut u).contains(Interrupts::OE));
    for i in 0..32u32 {
        assert_eq!(u.read(UARTDR, W), i, "FIFO contents survive the overrun");
    }
    assert!(fr(&mut u).contains(Flags::RXFE));
    // The next character to enter carries DR.OE to say data was lost before it.
    assert!(u.push_rx(b'n'));
    assert_eq!(u.read(UARTDR, W), u32::from(DR_OE) | u32::from(b'n'));
    assert!(u.push_rx(b'o'));
    assert_eq!(u.read(UARTDR, W), u32::from(b'o'));
    // OE in RSR is sticky until UARTECR; UARTICR clears the interrupt.
    assert_eq!(u.read(UARTRSR, W) & RSR_OE, RSR_OE);
    wr(&mut u, UARTECR, 0);
    assert_eq!(u.read(UARTRSR, W), 0);
    wr(&mut u, UARTICR, Interrupts::OE.bits());
    assert!(!ris(&mut u).contains(Interrupts::OE));
    // Empty reads are harmless.
    assert_eq!(u.read(UARTDR, W), 0);
}

/// Found by the vpl011 fuzz target: reading the character that carries DR.OE set
/// UARTRSR.OE again after the guest had cleared it with UARTECR.
#[test]
fn rsr_overrun_stays_clear_after_ecr() {
    let mut u = VPl011::new();
    assert!(u.push_rx(b'a'));
    assert!(!u.push_rx(b'b'), "the holding register is full");
    assert_eq!(u.read(UARTRSR, W), RSR_OE);
    wr(&mut u, UARTECR, 0);
    assert_eq!(u.read(UARTDR, W), u32::from(b'a'));
    assert!(u.push_rx(b'c'));
    assert_eq!(u.read(UARTDR, W), u32::from(DR_OE) | u32::from(b'c'));
    assert_eq!(
        u.read(UARTRSR, W),
        0,
        "OE was cleared by UARTECR, no overrun since"
    );
}

#[test]
fn rx_holding_register_without_fifo() {
    let mut u = VPl011::new();
    assert!(fr(&mut u).contains(Flags::RXFE));
    assert!(!fr(&mut u).contains(Flags::RXFF));
    assert!(u.push_rx(b'1'));
    let f = fr(&mut u);
    assert!(f.contains(Flags::RXFF) && !f.contains(Flags::RXFE));
    assert_eq!(u.rx_space(), 0);
    assert!(!u.push_rx(b'2'));
    assert!(ris(&mut u).contains(Interrupts::OE));
    // Byte 1 of DR peeks at the error bits without consuming.
    assert_eq!(u.read(UARTDR + 1, AccessWidth::Byte), 0);
    assert_eq!(u.read(UARTDR, AccessWidth::Byte), u32::from(b'1'));
    assert!(fr(&mut u).contains(Flags::RXFE));
    assert_eq!(u.rx_space(), 1);
    // Wrap-around through the ring with the holding register.
    for c in b"xyz" {
        assert!(u.push_rx(*c));
        assert_eq!(u.read(UARTDR, W) & 0xFF, u32::from(*c));
    }
}

#[test]
fn toggling_fen_flushes_rx() {
    let mut u = with_fifo();
    u.push_rx(1);
    u.push_rx(2);
    wr(&mut u, UARTLCR_H, 0x60);
    assert!(fr(&mut u).contains(Flags::RXFE));
    assert_eq!(u.rx_space(), 1);
    assert!(!ris(&mut u).intersects(Interrupts::RX | Interrupts::RT));
    // Rewriting LCR_H with FEN unchanged keeps data.
    wr(&mut u, UARTLCR_H, 0x70);
    u.push_rx(3);
    wr(&mut u, UARTLCR_H, 0x72);
    assert_eq!(u.read(UARTDR, W), 3);
}

#[test]
fn rx_interrupt_trigger_level_and_masking() {
    let mut u = with_fifo();
    wr(&mut u, UARTIFLS, 0x08); // RX 1/4 = 8 entries
    wr(&mut u, UARTIMSC, (Interrupts::RX).bits());
    for i in 0..7 {
        u.push_rx(i);
        assert!(!ris(&mut u).contains(Interrupts::RX));
        assert!(!u.irq_level(), "RTIS is masked, RXIS below trigger");
    }
    u.push_rx(7);
    assert!(ris(&mut u).contains(Interrupts::RX));
    assert!(u.irq_level());
    assert_eq!(u.read(UARTMIS, W), Interrupts::RX.bits());
    // Masking drops the line but not the raw status.
    wr(&mut u, UARTIMSC, 0);
    assert!(!u.irq_level());
    assert_eq!(u.read(UARTMIS, W), 0);
    assert!(ris(&mut u).contains(Interrupts::RX));
    wr(&mut u, UARTIMSC, Interrupts::RX.bits());
    // Reading below the trigger clears RXIS.
    u.read(UARTDR, W);
    assert!(!ris(&mut u).contains(Interrupts::RX));
    assert!(!u.irq_level());
    // UARTICR clears RXIS while data is still at the trigger level.
    u.push_rx(8);
    assert!(u.irq_level());
    wr(&mut u, UARTICR, Interrupts::RX.bits());
    assert!(!u.irq_level());
    // Lowering the trigger below the current level raises RXIS again.
    wr(&mut u, UARTIFLS, 0x00);
    assert!(u.irq_level());
}

#[test]
fn rx_without_fifo_interrupts_on_every_byte() {
    let mut u = VPl011::new();
    wr(&mut u, UARTIMSC, Interrupts::RX.bits());
    u.push_rx(b'q');
    assert!(u.irq_level());
    assert_eq!(u.read(UARTDR, W), u32::from(b'q'));
    assert!(!u.irq_level());
}

#[test]
fn rx_timeout_below_trigger() {
    let mut u = with_fifo(); // trigger 1/2 = 16
    wr(&mut u, UARTIMSC, Interrupts::RT.bits());
    u.push_rx(b'a');
    u.push_rx(b'b');
    assert_eq!(
        ris(&mut u) & (Interrupts::RX | Interrupts::RT),
        Interrupts::RT
    );
    assert!(u.irq_level());
    // UARTICR clears it; new data re-raises it.
    wr(&mut u, UARTICR, Interrupts::RT.bits());
    assert!(!u.irq_level());
    u.push_rx(b'c');
    assert!(u.irq_level());
    // Partial reads keep it (timeout already expired), draining clears it.
    u.read(UARTDR, W);
    assert!(u.irq_level());
    u.read(UARTDR, W);
    u.read(UARTDR, W);
    assert!(!u.irq_level());
    assert!(!ris(&mut u).contains(Interrupts::RT));
}

#[test]
fn tx_interrupt_semantics() {
    let mut u = VPl011::new();
    // A write latches TXIS, but masked it does not raise the line.
    wr(&mut u, UARTDR, u32::from(b'x'));
    assert!(ris(&mut u).contains(Interrupts::TX));
    assert!(!u.irq_level());
    wr(&mut u, UARTICR, 0x7FF);
    assert_eq!(ris(&mut u), Interrupts::empty());
    // Unmasking TXIM reports the empty TX FIFO at once.
    wr(&mut u, UARTIMSC, Interrupts::TX.bits());
    assert!(u.irq_level());
    assert_eq!(u.read(UARTMIS, W), Interrupts::TX.bits());
    // ICR clears it; a write raises it again.
    wr(&mut u, UARTICR, Interrupts::TX.bits());
    assert!(!u.irq_level());
    wr(&mut u, UARTDR, u32::from(b'y'));
    assert!(u.irq_level());
    // Re-writing IMSC with TXIM already set does not re-latch.
    wr(&mut u, UARTICR, Interrupts::TX.bits());
    wr(&mut u, UARTIMSC, Interrupts::TX.bits());
    assert!(!u.irq_level());
    // Masking it drops the line.
    wr(&mut u, UARTDR, u32::from(b'z'));
    wr(&mut u, UARTIMSC, 0);
    assert!(!u.irq_level());
}

/// A model of Linux 6.12's amba-pl011 PIO paths (no DMA), used to check that transmission
/// neither stalls nor loops forever against this device.
struct LinuxDriver {
    im: u32,
    xmit: Vec<u8>,
    sent: usize,
    fifosize: usize,
    received: Vec<u8>,
}

impl LinuxDriver {
    fn new(uart: &mut VPl011, out: &mut Vec<u8>) -> Self {
        let mut d = Self {
            im: 0,
            xmit: Vec::new(),
            sent: 0,
            fifosize: 32,
            received: Vec::new(),
        };
        let mut tx = |b| out.push(b);
        // probe
        uart.write(UARTIMSC, W, 0, &mut tx);
        uart.write(UARTICR, W, 0xFFFF, &mut tx);
        // set_termios
        uart.write(UARTCR, W, 0, &mut tx);
        uart.write(UARTIBRD, W, 13, &mut tx);
        uart.write(UARTFBRD, W, 1, &mut tx);
        uart.write(UARTLCR_H, W, 0x70, &mut tx);
        // startup: hwinit, IFLS, CR, enable_interrupts
        uart.write(UARTICR, W, 0x7D0, &mut tx);
        uart.write(UARTIMSC, W, 0x50, &mut tx);
        uart.write(UARTIFLS, W, 0x12, &mut tx);
        uart.write(UARTCR, W, 0x301, &mut tx);
        uart.write(UARTICR, W, 0x50, &mut tx);
        for _ in 0..d.fifosize * 2 {
            if uart.read(UARTFR, W) & Flags::RXFE.bits() != 0 {
                break;
            }
            uart.read(UARTDR, W);
        }
        d.im = 0x50;
        uart.write(UARTIMSC, W, d.im, &mut tx);
        d
    }

    fn stop_tx(&mut self, uart: &mut VPl011, tx: &mut dyn FnMut(u8)) {
        self.im &= !Interrupts::TX.bits();
        uart.write(UARTIMSC, W, self.im, tx);
    }

    fn tx_char(&mut self, uart: &mut VPl011, from_irq: bool, tx: &mut dyn FnMut(u8)) -> bool {
        if !from_irq && uart.read(UARTFR, W) & Flags::TXFF.bits() != 0 {
            return false;
        }
        uart.write(UARTDR, W, u32::from(self.xmit[self.sent]), tx);
        self.sent += 1;
        true
    }

    /// pl011_tx_chars: true if TX interrupts must stay enabled.
    fn tx_chars(&mut self, uart: &mut VPl011, from_irq: bool, tx: &mut dyn FnMut(u8)) -> bool {
        let mut count = self.fifosize >> 1;
        if self.sent == self.xmit.len() {
            self.stop_tx(uart, tx);
            return false;
        }
        loop {
            if from_irq {
                if count == 0 {
                    break;
                }
                count -= 1;
            }
            if self.sent == self.xmit.len() || !self.tx_char(uart, from_irq, tx) {
                break;
            }
        }
        if self.sent == self.xmit.len() {
            self.stop_tx(uart, tx);
            return false;
        }
        true
    }

    /// pl011_start_tx_pio.
    fn start_tx(&mut self, uart: &mut VPl011, tx: &mut dyn FnMut(u8)) {
        if self.tx_chars(uart, false, tx) {
            self.im |= Interrupts::TX.bits();
            uart.write(UARTIMSC, W, self.im, tx);
        }
    }

    /// pl011_int. Returns how many passes it made.
    fn irq(&mut self, uart: &mut VPl011, tx: &mut dyn FnMut(u8)) -> usize {
        let mut pass_counter = 256;
        let mut passes = 0;
        let mut status = uart.read(UARTRIS, W) & self.im;
        while status != 0 {
            passes += 1;
            let clear = status & !(Interrupts::TX | Interrupts::RT | Interrupts::RX).bits();
            uart.write(UARTICR, W, clear, tx);
            if status & (Interrupts::RT | Interrupts::RX).bits() != 0 {
                // pl011_fifo_to_tty
                for _ in 0..256 {
                    if uart.read(UARTFR, W) & Flags::RXFE.bits() != 0 {
                        break;
                    }
                    self.received.push(uart.read(UARTDR, W) as u8);
                }
            }
            if status & Interrupts::TX.bits() != 0 {
                self.tx_chars(uart, true, tx);
            }
            if pass_counter == 0 {
                break;
            }
            pass_counter -= 1;
            status = uart.read(UARTRIS, W) & self.im;
        }
        passes
    }
}

/// Runs the guest until the UART line is idle, failing if it never settles.
fn run_irqs(d: &mut LinuxDriver, u: &mut VPl011, out: &mut Vec<u8>) {
    for _ in 0..1000 {
        if !u.irq_level() {
            return;
        }
        let passes = d.irq(u, &mut |b| out.push(b));
        assert!(passes < 256, "interrupt handler hit its pass limit");
    }
    panic!("interrupt line never settled");
}

#[test]
fn linux_tx_loop_terminates_and_sends_everything() {
    let mut u = VPl011::new();
    let mut out = Vec::new();
    let mut d = LinuxDriver::new(&mut u, &mut out);
    assert!(out.is_empty());
    assert!(!u.irq_level());
    let msg: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    for chunk in msg.chunks(77) {
        d.xmit.extend_from_slice(chunk);
        d.start_tx(&mut u, &mut |b| out.push(b));
        run_irqs(&mut d, &mut u, &mut out);
    }
    assert_eq!(out, msg);
    assert_eq!(
        d.im & Interrupts::TX.bits(),
        0,
        "TXIM off once the buffer is empty"
    );
    assert!(!u.irq_level());
}

#[test]
fn interrupt_driven_tx_makes_progress() {
    // A driver that only unmasks TXIM and sends from the handler (as Linux does whenever
    // its non-IRQ attempt finds the FIFO full) must still be woken and finish.
    let mut u = VPl011::new();
    let mut out = Vec::new();
    let mut d = LinuxDriver::new(&mut u, &mut out);
    d.xmit.extend_from_slice(&[b'#'; 100]);
    d.im |= Interrupts::TX.bits();
    u.write(UARTIMSC, W, d.im, &mut |b| out.push(b));
    assert!(u.irq_level());
    run_irqs(&mut d, &mut u, &mut out);
    assert_eq!(out, [b'#'; 100]);
    assert!(!u.irq_level());
}

#[test]
fn linux_rx_path_reads_everything() {
    let mut u = VPl011::new();
    let mut out = Vec::new();
    let mut d = LinuxDriver::new(&mut u, &mut out);
    // A few bytes below the trigger arrive via the timeout, a burst via RXIS.
    for burst in [&b"ls\r"[..], &[b'k'; 32][..], &b"x"[..]] {
        for &b in burst {
            assert!(u.push_rx(b));
        }
        assert!(u.irq_level());
        run_irqs(&mut d, &mut u, &mut out);
    }
    let mut want = b"ls\r".to_vec();
    want.extend_from_slice(&[b'k'; 32]);
    want.push(b'x');
    assert_eq!(d.received, want);
    assert!(out.is_empty());
}

#[test]
fn narrow_writes_merge_lanes() {
    let mut u = VPl011::new();
    wr(&mut u, UARTIBRD, 0x1234);
    let mut tx = |_| panic!("no transmit");
    u.write(UARTIBRD + 1, AccessWidth::Byte, 0xAB, &mut tx);
    assert_eq!(u.read(UARTIBRD, W), 0xAB34);
    assert_eq!(u.read(UARTIBRD + 1, AccessWidth::Byte), 0xAB);
    assert_eq!(u.read(UARTIBRD, AccessWidth::Half), 0xAB34);
    u.write(UARTCR, AccessWidth::Half, 0xFFFF_FFFF, &mut tx);
    assert_eq!(u.read(UARTCR, W), CR_MASK);
}

#[test]
fn arbitrary_offsets_and_widths_never_panic() {
    let widths = [
        AccessWidth::Byte,
        AccessWidth::Half,
        AccessWidth::Word,
        AccessWidth::Double,
    ];
    let mut u = with_fifo();
    let mut sent = 0usize;
    let offsets = (0..0x1010u64).chain([u64::MAX, u64::MAX - 3, 0x8000_0000_0000_0000]);
    for offset in offsets {
        for w in widths {
            for value in [0, 0xFFFF_FFFF, 0x5A5A_A5A5] {
                u.push_rx(value as u8);
                let _ = u.read(offset, w);
                u.write(offset, w, value, &mut |_| sent += 1);
                let _ = u.irq_level();
                let _ = u.rx_space();
            }
        }
    }
    assert!(sent > 0);
    assert_eq!(u.read(0x1000, W), 0);
    assert_eq!(u.read(UARTICR, W), 0);
}

#[test]
fn rx_ready_until_the_fifo_is_full() {
    let mut u = with_fifo();
    for i in 0..FIFO_DEPTH {
        assert!(u.rx_ready(), "entry {i}");
        assert!(u.push_rx(b'a'));
    }
    assert!(!u.rx_ready());
    u.read(0x000, AccessWidth::Word);
    assert!(u.rx_ready());
}
