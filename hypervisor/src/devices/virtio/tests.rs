//! The transport driven as Linux's virtio_mmio driver drives it, and the split virtqueue fed
//! what a driver (or a hostile guest) may write into its rings.

use super::fake::{FakeDevice, FakeRam, FAKE_FEATURES, RAM_BASE, RAM_SIZE};
use super::mmio::{regs, INT_CONFIG_CHANGE, INT_USED_BUFFER, MAGIC_VALUE, VENDOR_ID};
use super::queue::{
    MAX_CHAIN_BYTES, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
};
use super::*;
use smmu::vsmmu::GuestMemError;

const DESC: u64 = RAM_BASE + 0x1000;
const AVAIL: u64 = RAM_BASE + 0x2000;
const USED: u64 = RAM_BASE + 0x3000;
const BUF: u64 = RAM_BASE + 0x1_0000;

// ---- the transport ----

fn w(m: &mut VirtioMmio, d: &mut FakeDevice, off: u64, v: u32) -> MmioAction {
    m.write(off, 4, u64::from(v), d)
}

fn r(m: &VirtioMmio, d: &FakeDevice, off: u64) -> u32 {
    m.read(off, 4, d) as u32
}

/// Linux's `virtio_add_status`: read, OR in a bit, write back.
fn add_status(m: &mut VirtioMmio, d: &mut FakeDevice, bit: Status) -> MmioAction {
    let s = r(m, d, regs::STATUS);
    w(m, d, regs::STATUS, s | bit.bits())
}

/// Reset, ACKNOWLEDGE, DRIVER, features read and `features` written, FEATURES_OK asked.
fn negotiate(m: &mut VirtioMmio, d: &mut FakeDevice, features: u64) -> MmioAction {
    assert_eq!(w(m, d, regs::STATUS, 0), MmioAction::Reset);
    add_status(m, d, Status::ACKNOWLEDGE);
    add_status(m, d, Status::DRIVER);
    w(m, d, regs::DEVICE_FEATURES_SEL, 1);
    let hi = r(m, d, regs::DEVICE_FEATURES);
    w(m, d, regs::DEVICE_FEATURES_SEL, 0);
    let lo = r(m, d, regs::DEVICE_FEATURES);
    assert_eq!((u64::from(hi) << 32) | u64::from(lo), FAKE_FEATURES);
    w(m, d, regs::DRIVER_FEATURES_SEL, 1);
    w(m, d, regs::DRIVER_FEATURES, (features >> 32) as u32);
    w(m, d, regs::DRIVER_FEATURES_SEL, 0);
    w(m, d, regs::DRIVER_FEATURES, features as u32);
    add_status(m, d, Status::FEATURES_OK)
}

/// Linux's `vm_setup_vq` for queue `q`.
fn setup_queue(m: &mut VirtioMmio, d: &mut FakeDevice, q: u32, num: u32, areas: [u64; 3]) {
    w(m, d, regs::QUEUE_SEL, q);
    assert_eq!(r(m, d, regs::QUEUE_READY), 0);
    w(m, d, regs::QUEUE_NUM, num);
    for (i, a) in areas.into_iter().enumerate() {
        let low = [
            regs::QUEUE_DESC_LOW,
            regs::QUEUE_DRIVER_LOW,
            regs::QUEUE_DEVICE_LOW,
        ][i];
        w(m, d, low, a as u32);
        w(m, d, low + 4, (a >> 32) as u32);
    }
    w(m, d, regs::QUEUE_READY, 1);
}

fn live() -> (VirtioMmio, FakeDevice) {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    assert_eq!(negotiate(&mut m, &mut d, FAKE_FEATURES), MmioAction::None);
    setup_queue(&mut m, &mut d, 0, 64, [DESC, AVAIL, USED]);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 1);
    assert_eq!(
        add_status(&mut m, &mut d, Status::DRIVER_OK),
        MmioAction::DriverOk
    );
    (m, d)
}

#[test]
fn identification_registers() {
    let d = FakeDevice::new();
    let m = VirtioMmio::new(&d);
    assert_eq!(r(&m, &d, regs::MAGIC_VALUE), MAGIC_VALUE);
    assert_eq!(r(&m, &d, regs::MAGIC_VALUE).to_le_bytes(), *b"virt");
    assert_eq!(r(&m, &d, regs::VERSION), 2);
    assert_eq!(r(&m, &d, regs::DEVICE_ID), 23);
    assert_eq!(r(&m, &d, regs::VENDOR_ID), VENDOR_ID);
    assert_eq!(r(&m, &d, regs::SHM_LEN_LOW), u32::MAX);
    assert_eq!(r(&m, &d, regs::SHM_LEN_HIGH), u32::MAX);
    assert_eq!(r(&m, &d, regs::SHM_BASE_LOW), u32::MAX);
    assert_eq!(r(&m, &d, regs::SHM_BASE_HIGH), u32::MAX);
    assert_eq!(r(&m, &d, regs::QUEUE_RESET), 0);
    assert_eq!(m.bad_accesses(), 0);
}

#[test]
fn linux_init_sequence() {
    let (mut m, mut d) = live();
    let want = Status::ACKNOWLEDGE | Status::DRIVER | Status::FEATURES_OK | Status::DRIVER_OK;
    assert_eq!(m.status(), want);
    assert_eq!(r(&m, &d, regs::STATUS), want.bits());
    assert_eq!(m.driver_features(), FAKE_FEATURES);
    let q = m.queue_mut(0).unwrap();
    assert_eq!(
        (q.size(), q.desc_addr(), q.avail_addr(), q.used_addr()),
        (64, DESC, AVAIL, USED)
    );
    assert!(m.queue_mut(1).is_none());
    assert_eq!(m.bad_accesses(), 0);
    assert_eq!(
        w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0),
        MmioAction::Notify(0)
    );
}

#[test]
fn queue_num_max_and_unknown_queues() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    assert_eq!(r(&m, &d, regs::QUEUE_NUM_MAX), 64);
    w(&mut m, &mut d, regs::QUEUE_SEL, 1);
    assert_eq!(r(&m, &d, regs::QUEUE_NUM_MAX), 8);
    w(&mut m, &mut d, regs::QUEUE_SEL, 2);
    assert_eq!(r(&m, &d, regs::QUEUE_NUM_MAX), 0);
    // Setting up a queue that does not exist does nothing.
    setup_queue(&mut m, &mut d, 2, 8, [DESC, AVAIL, USED]);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 0);
    w(&mut m, &mut d, regs::QUEUE_SEL, 0x1_0000);
    assert_eq!(r(&m, &d, regs::QUEUE_NUM_MAX), 0);
}

#[test]
fn features_rejected_without_version_1() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    let f = FAKE_FEATURES & !feature(VIRTIO_F_VERSION_1);
    assert_eq!(negotiate(&mut m, &mut d, f), MmioAction::FeaturesRejected);
    assert!(!m.status().contains(Status::FEATURES_OK));
    assert_eq!(m.status(), Status::ACKNOWLEDGE | Status::DRIVER);
    // DRIVER_OK cannot follow refused features; FAILED can.
    assert_eq!(
        add_status(&mut m, &mut d, Status::DRIVER_OK),
        MmioAction::None
    );
    assert!(!m.status().contains(Status::DRIVER_OK));
    add_status(&mut m, &mut d, Status::FAILED);
    assert!(m.status().contains(Status::FAILED));
}

#[test]
fn features_rejected_with_unknown_bits() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    let f = FAKE_FEATURES | 1 << 40;
    assert_eq!(negotiate(&mut m, &mut d, f), MmioAction::FeaturesRejected);
    assert!(!m.status().contains(Status::FEATURES_OK));
    // A retry with a subset is accepted.
    let f = feature(VIRTIO_F_VERSION_1);
    assert_eq!(negotiate(&mut m, &mut d, f), MmioAction::None);
    assert!(m.status().contains(Status::FEATURES_OK));
    assert_eq!(m.driver_features(), f);
}

#[test]
fn feature_words_beyond_64_bits() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    w(&mut m, &mut d, regs::DEVICE_FEATURES_SEL, 2);
    assert_eq!(r(&m, &d, regs::DEVICE_FEATURES), 0);
    w(&mut m, &mut d, regs::DRIVER_FEATURES_SEL, 2);
    w(&mut m, &mut d, regs::DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(m.driver_features(), 0);
}

#[test]
fn features_fixed_after_features_ok() {
    let (mut m, mut d) = live();
    w(&mut m, &mut d, regs::DRIVER_FEATURES_SEL, 0);
    w(&mut m, &mut d, regs::DRIVER_FEATURES, 0);
    assert_eq!(m.driver_features(), FAKE_FEATURES);
}

#[test]
fn status_bits_cannot_be_cleared_but_by_reset() {
    let (mut m, mut d) = live();
    let before = m.status();
    assert_eq!(
        w(&mut m, &mut d, regs::STATUS, Status::ACKNOWLEDGE.bits()),
        MmioAction::None
    );
    assert_eq!(m.status(), before);
    // The driver cannot set DEVICE_NEEDS_RESET itself.
    add_status(&mut m, &mut d, Status::DEVICE_NEEDS_RESET);
    assert_eq!(m.status(), before);
}

#[test]
fn needs_reset_raises_config_change_and_stops_notifies() {
    let (mut m, mut d) = live();
    assert!(m.needs_reset());
    assert!(m.status().contains(Status::DEVICE_NEEDS_RESET));
    assert_eq!(m.interrupt_status(), INT_CONFIG_CHANGE);
    assert_eq!(w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0), MmioAction::None);
    // The driver's read-modify-write carries the device's bit back; nothing breaks.
    add_status(&mut m, &mut d, Status::FAILED);
    assert!(m
        .status()
        .contains(Status::FAILED | Status::DEVICE_NEEDS_RESET));
    assert_eq!(w(&mut m, &mut d, regs::STATUS, 0), MmioAction::Reset);
    assert_eq!(m.status(), Status::empty());
    // Before DRIVER_OK: the bit, but no interrupt.
    assert!(!m.needs_reset());
    assert_eq!(m.interrupt_status(), 0);
}

#[test]
fn notify_only_when_ready_and_driver_ok() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    negotiate(&mut m, &mut d, FAKE_FEATURES);
    setup_queue(&mut m, &mut d, 0, 64, [DESC, AVAIL, USED]);
    // Ready but no DRIVER_OK.
    assert_eq!(w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0), MmioAction::None);
    assert!(m.queue_mut(0).is_none());
    add_status(&mut m, &mut d, Status::DRIVER_OK);
    assert_eq!(
        w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0),
        MmioAction::Notify(0)
    );
    // Queue 1 exists but is not ready; 2 does not exist; notification data is not offered.
    assert_eq!(w(&mut m, &mut d, regs::QUEUE_NOTIFY, 1), MmioAction::None);
    assert_eq!(w(&mut m, &mut d, regs::QUEUE_NOTIFY, 2), MmioAction::None);
    assert_eq!(
        w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0x1_0000),
        MmioAction::None
    );
    // QueueReady = 0 takes it down.
    w(&mut m, &mut d, regs::QUEUE_SEL, 0);
    w(&mut m, &mut d, regs::QUEUE_READY, 0);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 0);
    assert_eq!(w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0), MmioAction::None);
}

#[test]
fn queue_ready_needs_valid_size_and_alignment() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    negotiate(&mut m, &mut d, FAKE_FEATURES);
    for num in [0, 3, 128, 0x1_0040] {
        setup_queue(&mut m, &mut d, 0, num, [DESC, AVAIL, USED]);
        assert_eq!(r(&m, &d, regs::QUEUE_READY), 0, "num {num}");
    }
    for areas in [
        [DESC + 8, AVAIL, USED],
        [DESC, AVAIL + 1, USED],
        [DESC, AVAIL, USED + 2],
    ] {
        setup_queue(&mut m, &mut d, 0, 64, areas);
        assert_eq!(r(&m, &d, regs::QUEUE_READY), 0, "{areas:x?}");
    }
    // 64-bit addresses, queue 1 at its maximum.
    let high = 0x12_0000_0000;
    setup_queue(&mut m, &mut d, 1, 8, [high, high + 0x102, high + 0x204]);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 1);
    add_status(&mut m, &mut d, Status::DRIVER_OK);
    let q = m.queue_mut(1).unwrap();
    assert_eq!(
        (q.size(), q.desc_addr(), q.avail_addr(), q.used_addr()),
        (8, high, high + 0x102, high + 0x204)
    );
}

#[test]
fn queue_config_ignored_while_ready() {
    let (mut m, mut d) = live();
    w(&mut m, &mut d, regs::QUEUE_SEL, 0);
    w(&mut m, &mut d, regs::QUEUE_NUM, 16);
    w(&mut m, &mut d, regs::QUEUE_DESC_LOW, 0x9000);
    w(&mut m, &mut d, regs::QUEUE_READY, 1);
    let q = m.queue_mut(0).unwrap();
    assert_eq!((q.size(), q.desc_addr()), (64, DESC));
}

#[test]
fn reset_clears_everything() {
    let (mut m, mut d) = live();
    m.raise_used();
    w(&mut m, &mut d, regs::QUEUE_SEL, 1);
    w(&mut m, &mut d, regs::DEVICE_FEATURES_SEL, 1);
    let gen = r(&m, &d, regs::CONFIG_GENERATION);
    assert_eq!(w(&mut m, &mut d, regs::STATUS, 0), MmioAction::Reset);
    assert_eq!(m.status(), Status::empty());
    assert_eq!(m.driver_features(), 0);
    assert_eq!(m.interrupt_status(), 0);
    // Selectors back to 0.
    assert_eq!(r(&m, &d, regs::QUEUE_NUM_MAX), 64);
    assert_eq!(r(&m, &d, regs::DEVICE_FEATURES), FAKE_FEATURES as u32);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 0);
    assert_eq!(r(&m, &d, regs::CONFIG_GENERATION), gen);
    // The queue's size and areas are forgotten: ready alone does not bring it back.
    w(&mut m, &mut d, regs::QUEUE_READY, 1);
    assert_eq!(r(&m, &d, regs::QUEUE_READY), 0);
    negotiate(&mut m, &mut d, FAKE_FEATURES);
    add_status(&mut m, &mut d, Status::DRIVER_OK);
    assert!(m.queue_mut(0).is_none());
}

#[test]
fn wrong_access_sizes() {
    let (mut m, mut d) = live();
    assert_eq!(m.read(regs::MAGIC_VALUE, 2, &d), 0);
    assert_eq!(m.read(regs::MAGIC_VALUE, 8, &d), 0);
    assert_eq!(m.read(regs::MAGIC_VALUE + 1, 4, &d), 0);
    assert_eq!(m.write(regs::STATUS, 1, 0, &mut d), MmioAction::None);
    assert_eq!(m.write(regs::QUEUE_NOTIFY, 2, 0, &mut d), MmioAction::None);
    assert_eq!(m.write(regs::STATUS, 8, 0, &mut d), MmioAction::None);
    assert!(m.status().contains(Status::DRIVER_OK));
    assert_eq!(m.bad_accesses(), 6);
    // No register there, a read-only register written, a write-only one read.
    assert_eq!(r(&m, &d, 0x018), 0);
    w(&mut m, &mut d, regs::MAGIC_VALUE, 0);
    assert_eq!(r(&m, &d, regs::QUEUE_NOTIFY), 0);
    assert_eq!(m.bad_accesses(), 9);
}

#[test]
fn config_space_access() {
    let (mut m, mut d) = live();
    assert_eq!(m.read(regs::CONFIG, 4, &d), 0x0403_0201);
    assert_eq!(m.read(regs::CONFIG + 4, 4, &d), 0x0807_0605);
    assert_eq!(m.read(regs::CONFIG + 2, 2, &d), 0x0403);
    assert_eq!(m.read(regs::CONFIG + 7, 1, &d), 8);
    assert_eq!(m.read(regs::CONFIG + 0x40, 4, &d), 0);
    // Misaligned or 8-byte.
    assert_eq!(m.read(regs::CONFIG + 1, 2, &d), 0);
    assert_eq!(m.read(regs::CONFIG, 8, &d), 0);
    assert_eq!(m.bad_accesses(), 2);
    m.write(regs::CONFIG, 2, 0xbeef, &mut d);
    assert_eq!(d.writes, [(0, 2, 0xbeef, FAKE_FEATURES)]);
    assert_eq!(m.read(regs::CONFIG, 4, &d), 0x0403_beef);
    m.write(regs::CONFIG + 2, 4, 0, &mut d);
    assert_eq!(d.writes.len(), 1);
}

#[test]
fn interrupt_status_and_ack() {
    let (mut m, mut d) = live();
    m.raise_used();
    assert!(m.config_changed());
    assert_eq!(
        r(&m, &d, regs::INTERRUPT_STATUS),
        INT_USED_BUFFER | INT_CONFIG_CHANGE
    );
    w(&mut m, &mut d, regs::INTERRUPT_ACK, INT_USED_BUFFER);
    assert_eq!(m.interrupt_status(), INT_CONFIG_CHANGE);
    w(&mut m, &mut d, regs::INTERRUPT_ACK, 0xffff_ffff);
    assert_eq!(m.interrupt_status(), 0);
}

#[test]
fn config_generation_counts_device_changes() {
    let mut d = FakeDevice::new();
    let mut m = VirtioMmio::new(&d);
    assert_eq!(r(&m, &d, regs::CONFIG_GENERATION), 0);
    // Before DRIVER_OK the generation moves but no interrupt is due.
    assert!(!m.config_changed());
    assert_eq!(m.interrupt_status(), 0);
    assert_eq!(r(&m, &d, regs::CONFIG_GENERATION), 1);
    // A driver's config write is not a device-side change.
    m.write(regs::CONFIG, 4, 7, &mut d);
    assert_eq!(r(&m, &d, regs::CONFIG_GENERATION), 1);
    m.config_changed();
    assert_eq!(r(&m, &d, regs::CONFIG_GENERATION), 2);
}

// ---- the split virtqueue ----

fn desc(ram: &mut FakeRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let mut b = [0; 16];
    b[0..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..16].copy_from_slice(&next.to_le_bytes());
    ram.put(DESC + 16 * u64::from(i), &b);
}

/// Makes `heads` available after what `q` has taken, as the driver does.
fn offer(ram: &mut FakeRam, q: &SplitQueue, heads: &[u16]) {
    let mut idx = ram.u16_at(AVAIL + 2);
    for &h in heads {
        ram.put_u16(AVAIL + 4 + 2 * u64::from(idx % q.size()), h);
        idx = idx.wrapping_add(1);
    }
    ram.put_u16(AVAIL + 2, idx);
}

fn queue(size: u16) -> (SplitQueue, FakeRam) {
    (
        SplitQueue::new(size, DESC, AVAIL, USED).unwrap(),
        FakeRam::new(),
    )
}

#[test]
fn new_checks_size_and_alignment() {
    assert!(SplitQueue::new(0, DESC, AVAIL, USED).is_none());
    assert!(SplitQueue::new(6, DESC, AVAIL, USED).is_none());
    assert!(SplitQueue::new(8, DESC + 4, AVAIL, USED).is_none());
    assert!(SplitQueue::new(8, DESC, AVAIL + 1, USED).is_none());
    assert!(SplitQueue::new(8, DESC, AVAIL, USED + 2).is_none());
    assert!(SplitQueue::new(1, DESC, AVAIL, USED).is_some());
}

#[test]
fn empty_queue_pops_none() {
    let (mut q, ram) = queue(8);
    assert_eq!(q.available(&ram), Ok(0));
    assert_eq!(q.pop(&ram), Ok(None));
    assert_eq!(q.last_avail(), 0);
}

#[test]
fn one_readable_one_writable() {
    let (mut q, mut ram) = queue(8);
    desc(&mut ram, 3, BUF, 4, VIRTQ_DESC_F_NEXT, 5);
    desc(&mut ram, 5, BUF + 0x100, 16, VIRTQ_DESC_F_WRITE, 0);
    ram.put(BUF, b"ping");
    offer(&mut ram, &q, &[3]);
    assert_eq!(q.available(&ram), Ok(1));
    let c = q.pop(&ram).unwrap().unwrap();
    assert_eq!(c.head, 3);
    assert_eq!(c.readable, [(BUF, 4)]);
    assert_eq!(c.writable, [(BUF + 0x100, 16)]);
    assert_eq!(c.writable_len(), 16);
    assert_eq!(c.read_all(&ram, 100).unwrap(), b"ping");
    assert_eq!(c.read_all(&ram, 2).unwrap(), b"pi");
    assert_eq!(c.write_all(&mut ram, b"pong").unwrap(), 4);
    assert_eq!(ram.bytes(BUF + 0x100, 4), b"pong");
    assert_eq!(q.last_avail(), 1);
    assert_eq!(q.pop(&ram), Ok(None));
}

#[test]
fn chain_of_three_with_zero_length_and_scatter() {
    let (mut q, mut ram) = queue(8);
    desc(&mut ram, 0, BUF, 2, VIRTQ_DESC_F_NEXT, 1);
    desc(&mut ram, 1, BUF + 0x10, 0, VIRTQ_DESC_F_NEXT, 2);
    desc(&mut ram, 2, BUF + 0x20, 3, VIRTQ_DESC_F_NEXT, 4);
    desc(
        &mut ram,
        4,
        BUF + 0x30,
        2,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        6,
    );
    desc(
        &mut ram,
        6,
        BUF + 0x40,
        0,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        7,
    );
    desc(&mut ram, 7, BUF + 0x50, 3, VIRTQ_DESC_F_WRITE, 0);
    ram.put(BUF, b"ab");
    ram.put(BUF + 0x20, b"cde");
    offer(&mut ram, &q, &[0]);
    let c = q.pop(&ram).unwrap().unwrap();
    assert_eq!(c.readable, [(BUF, 2), (BUF + 0x20, 3)]);
    assert_eq!(c.writable, [(BUF + 0x30, 2), (BUF + 0x50, 3)]);
    assert_eq!(c.readable_len(), 5);
    assert_eq!(c.read_all(&ram, 4096).unwrap(), b"abcde");
    // Longer than the writable part: only what fits.
    assert_eq!(c.write_all(&mut ram, b"0123456789").unwrap(), 5);
    assert_eq!(ram.bytes(BUF + 0x30, 2), b"01");
    assert_eq!(ram.bytes(BUF + 0x50, 3), b"234");
}

fn pop_err(q: &mut SplitQueue, ram: &FakeRam) -> QueueError {
    let before = q.clone();
    let e = q.pop(ram).unwrap_err();
    // An error leaves the queue as it was.
    assert_eq!(*q, before);
    e
}

#[test]
fn chain_loop() {
    let (mut q, mut ram) = queue(8);
    desc(&mut ram, 0, BUF, 4, VIRTQ_DESC_F_NEXT, 1);
    desc(&mut ram, 1, BUF, 4, VIRTQ_DESC_F_NEXT, 0);
    offer(&mut ram, &q, &[0]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::Loop);
    // A chain of exactly `size` descriptors is fine.
    for i in 0..8 {
        let flags = if i < 7 { VIRTQ_DESC_F_NEXT } else { 0 };
        desc(&mut ram, i, BUF, 1, flags, i + 1);
    }
    assert_eq!(q.pop(&ram).unwrap().unwrap().readable.len(), 8);
}

#[test]
fn next_and_head_out_of_range() {
    let (mut q, mut ram) = queue(8);
    desc(&mut ram, 0, BUF, 4, VIRTQ_DESC_F_NEXT, 8);
    offer(&mut ram, &q, &[0]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::BadNext(8));
    let (mut q, mut ram) = queue(8);
    offer(&mut ram, &q, &[8]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::BadHead(8));
}

#[test]
fn indirect_refused() {
    let (mut q, mut ram) = queue(8);
    desc(&mut ram, 0, BUF, 32, VIRTQ_DESC_F_INDIRECT, 0);
    offer(&mut ram, &q, &[0]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::Indirect);
}

#[test]
fn readable_after_writable() {
    let (mut q, mut ram) = queue(8);
    desc(
        &mut ram,
        0,
        BUF,
        4,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        1,
    );
    desc(&mut ram, 1, BUF, 4, 0, 0);
    offer(&mut ram, &q, &[0]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::ReadableAfterWritable);
}

#[test]
fn chain_too_long() {
    let (mut q, mut ram) = queue(8);
    let half = (MAX_CHAIN_BYTES / 2) as u32;
    desc(&mut ram, 0, BUF, half, VIRTQ_DESC_F_NEXT, 1);
    desc(&mut ram, 1, BUF, half, VIRTQ_DESC_F_NEXT, 2);
    desc(
        &mut ram,
        2,
        BUF,
        half,
        VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
        3,
    );
    desc(&mut ram, 3, BUF, half + 1, VIRTQ_DESC_F_WRITE, 0);
    offer(&mut ram, &q, &[2]);
    assert_eq!(pop_err(&mut q, &ram), QueueError::TooLong);
    // Exactly the cap, readable, is accepted (head 0 replacing head 2 in the same slot).
    desc(&mut ram, 1, BUF, half, 0, 0);
    ram.put_u16(AVAIL + 4, 0);
    assert_eq!(q.pop(&ram).unwrap().unwrap().readable_len(), 2 * half);
    desc(&mut ram, 0, u64::MAX - 2, 4, 0, 0);
    offer(&mut ram, &q, &[0]);
    assert_eq!(
        pop_err(&mut q, &ram),
        QueueError::BadBuffer {
            addr: u64::MAX - 2,
            len: 4
        }
    );
}

#[test]
fn buffer_outside_ram_fails_cleanly() {
    let (mut q, mut ram) = queue(8);
    let end = RAM_BASE + RAM_SIZE as u64;
    desc(&mut ram, 0, end - 2, 4, VIRTQ_DESC_F_NEXT, 1);
    desc(&mut ram, 1, end + 0x1000, 4, VIRTQ_DESC_F_WRITE, 0);
    offer(&mut ram, &q, &[0]);
    let c = q.pop(&ram).unwrap().unwrap();
    assert!(matches!(
        c.read_all(&ram, 64),
        Err(QueueError::Memory(GuestMemError { .. }))
    ));
    assert!(matches!(
        c.write_all(&mut ram, b"xx"),
        Err(QueueError::Memory(_))
    ));
    // Rings outside RAM.
    let mut q = SplitQueue::new(8, end, AVAIL, USED).unwrap();
    offer(&mut ram, &q, &[0]);
    assert!(matches!(pop_err(&mut q, &ram), QueueError::Memory(_)));
    let mut q = SplitQueue::new(8, DESC, end, end + 0x100).unwrap();
    assert!(matches!(pop_err(&mut q, &ram), QueueError::Memory(_)));
    assert!(q.push_used(&mut ram, 0, 0).is_err());
    assert_eq!(q.used_idx(), 0);
    assert!(q.needs_interrupt(&ram));
}

#[test]
fn avail_idx_overrun() {
    let (mut q, mut ram) = queue(8);
    ram.put_u16(AVAIL + 2, 9);
    assert_eq!(
        pop_err(&mut q, &ram),
        QueueError::AvailOverrun {
            avail_idx: 9,
            last_avail: 0
        }
    );
    assert!(q.available(&ram).is_err());
    // Exactly `size` outstanding is fine.
    ram.put_u16(AVAIL + 2, 8);
    assert_eq!(q.available(&ram), Ok(8));
}

#[test]
fn index_wrap_around() {
    let (mut q, mut ram) = queue(4);
    q.set_indices(0xfffe, 0xfffe);
    ram.put_u16(AVAIL + 2, 0xfffe);
    ram.put_u16(USED + 2, 0xfffe);
    for i in 0..4 {
        desc(
            &mut ram,
            i,
            BUF + 0x10 * u64::from(i),
            8,
            VIRTQ_DESC_F_WRITE,
            0,
        );
    }
    offer(&mut ram, &q, &[1, 2, 3]);
    assert_eq!(ram.u16_at(AVAIL + 2), 1);
    assert_eq!(q.available(&ram), Ok(3));
    for (n, want) in [1u16, 2, 3].into_iter().enumerate() {
        let c = q.pop(&ram).unwrap().unwrap();
        assert_eq!(c.head, want);
        q.push_used(&mut ram, c.head, 8).unwrap();
        // Slots (0xfffe + n) % 4: 2, 3, 0.
        let slot = (0xfffe_u16.wrapping_add(n as u16) % 4) as u64;
        assert_eq!(ram.u32_at(USED + 4 + 8 * slot), u32::from(want));
    }
    assert_eq!(q.last_avail(), 1);
    assert_eq!(q.used_idx(), 1);
    assert_eq!(ram.u16_at(USED + 2), 1);
    assert_eq!(q.pop(&ram), Ok(None));
}

#[test]
fn push_used_writes_slot_then_idx() {
    let (mut q, mut ram) = queue(8);
    q.push_used(&mut ram, 5, 0x1234).unwrap();
    q.push_used(&mut ram, 7, 9).unwrap();
    assert_eq!(ram.u32_at(USED + 4), 5);
    assert_eq!(ram.u32_at(USED + 8), 0x1234);
    assert_eq!(ram.u32_at(USED + 12), 7);
    assert_eq!(ram.u32_at(USED + 16), 9);
    assert_eq!(ram.u16_at(USED + 2), 2);
    assert_eq!(ram.u16_at(USED), 0);
    assert_eq!(q.used_idx(), 2);
    assert_eq!(q.push_used(&mut ram, 8, 0), Err(QueueError::BadHead(8)));
    assert_eq!(q.used_idx(), 2);
}

#[test]
fn no_interrupt_flag() {
    let (q, mut ram) = queue(8);
    assert!(q.needs_interrupt(&ram));
    ram.put_u16(AVAIL, VIRTQ_AVAIL_F_NO_INTERRUPT);
    assert!(!q.needs_interrupt(&ram));
    ram.put_u16(AVAIL, 2);
    assert!(q.needs_interrupt(&ram));
}

#[test]
fn notify_then_pop_through_the_transport() {
    let (mut m, mut d) = live();
    let mut ram = FakeRam::new();
    desc(&mut ram, 0, BUF, 3, VIRTQ_DESC_F_NEXT, 1);
    desc(&mut ram, 1, BUF + 0x10, 8, VIRTQ_DESC_F_WRITE, 0);
    ram.put(BUF, b"req");
    offer(&mut ram, m.queue_mut(0).unwrap(), &[0]);
    let MmioAction::Notify(n) = w(&mut m, &mut d, regs::QUEUE_NOTIFY, 0) else {
        panic!("no notify");
    };
    let q = m.queue_mut(n).unwrap();
    let c = q.pop(&ram).unwrap().unwrap();
    assert_eq!(c.read_all(&ram, 64).unwrap(), b"req");
    let len = c.write_all(&mut ram, b"resp").unwrap();
    q.push_used(&mut ram, c.head, len).unwrap();
    if q.needs_interrupt(&ram) {
        m.raise_used();
    }
    assert_eq!(r(&m, &d, regs::INTERRUPT_STATUS), INT_USED_BUFFER);
    assert_eq!(ram.u32_at(USED + 8), 4);
}

/// xorshift64: deterministic noise.
fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

#[test]
fn random_rings_never_panic() {
    let mut s = 0x9e37_79b9_7f4a_7c15;
    let (mut ok, mut err) = (0, 0);
    for _ in 0..4000 {
        let size = 1u16 << (xorshift(&mut s) % 5);
        let mut ram = FakeRam::new();
        let mut q = SplitQueue::new(size, DESC, AVAIL, USED).unwrap();
        q.set_indices(xorshift(&mut s) as u16, xorshift(&mut s) as u16);
        // Noise over the descriptor table and the rings, with addresses pointing mostly into
        // (or just past) RAM so some chains are valid.
        for a in [DESC, AVAIL, USED] {
            for i in 0..(16 * u64::from(size) + 8) / 8 {
                ram.put(a + 8 * i, &xorshift(&mut s).to_le_bytes());
            }
        }
        for i in 0..size {
            let x = xorshift(&mut s);
            let addr = RAM_BASE + (x % (RAM_SIZE as u64 + 0x1000));
            let flags = (x >> 40) as u16 & 0x7;
            let flags = if x & 1 == 0 {
                flags & !VIRTQ_DESC_F_INDIRECT
            } else {
                flags
            };
            desc(
                &mut ram,
                i,
                addr,
                (x >> 20) as u32 % 0x2000,
                flags,
                (x >> 48) as u16 % (size + 1),
            );
        }
        // Mostly heads in range and an avail.idx at most a little past the queue's reach.
        for i in 0..size {
            let h = (xorshift(&mut s) % (u64::from(size) + 1)) as u16;
            ram.put_u16(AVAIL + 4 + 2 * u64::from(i), h);
        }
        if !xorshift(&mut s).is_multiple_of(8) {
            let ahead = (xorshift(&mut s) % (u64::from(size) + 2)) as u16;
            ram.put_u16(AVAIL + 2, q.last_avail().wrapping_add(ahead));
        }
        for _ in 0..4 {
            match q.pop(&ram) {
                Ok(Some(c)) => {
                    ok += 1;
                    assert!(c.readable_len() as u64 <= MAX_CHAIN_BYTES);
                    let _ = c.read_all(&ram, 4096);
                    let _ = c.write_all(&mut ram, &[0xa5; 300]);
                    let _ = q.push_used(&mut ram, c.head, c.writable_len());
                }
                Ok(None) => break,
                Err(_) => {
                    err += 1;
                    break;
                }
            }
        }
        let _ = q.needs_interrupt(&ram);
    }
    // The noise reaches both outcomes.
    assert!(ok > 100 && err > 100, "ok {ok} err {err}");
}
