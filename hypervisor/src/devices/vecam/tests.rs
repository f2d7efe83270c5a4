use super::*;
use crate::pci::assign_resources;
use crate::pci::enumerate::{enumerate, PortType};
use crate::pci::fake::{qemu_host_bridge, FakeConfigSpace, FakeFn};

const B: AccessWidth = AccessWidth::Byte;
const H: AccessWidth = AccessWidth::Half;
const W: AccessWidth = AccessWidth::Word;
const D: AccessWidth = AccessWidth::Double;

/// Enumerates and places `f`, and gives the VM the functions `owned`.
fn setup(mut f: FakeConfigSpace, owned: &[Bdf]) -> (FakeConfigSpace, VirtualEcam) {
    let mut topo = enumerate(&mut f, 0, 0xff).unwrap();
    assign_resources(&mut f, &mut topo, &qemu_host_bridge()).unwrap();
    let devs = topo
        .devices
        .into_iter()
        .filter(|d| owned.contains(&d.bdf))
        .collect();
    (f, VirtualEcam::new(devs, Vec::new()))
}

fn off(bdf: Bdf, reg: u16) -> u64 {
    u64::from(bdf.bus) << 20 | u64::from(bdf.dev) << 15 | u64::from(bdf.func) << 12 | u64::from(reg)
}

/// Walks the capability list as Linux does and returns the IDs found.
fn cap_ids(v: &mut VirtualEcam, f: &FakeConfigSpace, bdf: Bdf) -> Vec<u8> {
    let mut ids = Vec::new();
    if v.read(f, off(bdf, 0x06), H) & 0x10 == 0 {
        return ids;
    }
    let mut ptr = v.read(f, off(bdf, 0x34), B) as u16 & 0xfc;
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        ids.push(v.read(f, off(bdf, ptr), B) as u8);
        ptr = v.read(f, off(bdf, ptr + 1), B) as u16 & 0xfc;
    }
    ids
}

#[test]
fn absent_functions_read_all_ones_and_ignore_writes() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let net = Bdf::new(0, 1, 0);
    let before = f.read32(net, regs::COMMAND);
    assert_eq!(v.read(&f, off(net, 0), W), 0xffff_ffff);
    assert_eq!(v.read(&f, off(net, 0), H), 0xffff);
    assert_eq!(v.read(&f, off(net, 0), B), 0xff);
    assert_eq!(v.read(&f, off(net, 0), D), u64::MAX);
    v.write(&mut f, off(net, 4), H, 0);
    assert_eq!(f.read32(net, regs::COMMAND), before);
    // The host bridge function and an empty slot or bus are absent too.
    assert_eq!(v.read(&f, off(Bdf::new(0, 0, 0), 0), W), 0xffff_ffff);
    assert_eq!(v.read(&f, off(Bdf::new(0, 9, 0), 0), W), 0xffff_ffff);
    assert_eq!(v.read(&f, off(Bdf::new(3, 2, 0), 0), W), 0xffff_ffff);
    assert_eq!(v.bdfs().collect::<Vec<_>>(), [blk]);
}

#[test]
fn identity_passes_through() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    assert_eq!(v.read(&f, off(blk, 0), W), 0x1042_1af4);
    assert_eq!(v.read(&f, off(blk, 0), H), 0x1af4);
    assert_eq!(v.read(&f, off(blk, 2), H), 0x1042);
    assert_eq!(v.read(&f, off(blk, 0x0b), B), 0x01);
    assert_eq!(v.read(&f, off(blk, 0x08), B), 0x01);
    assert_eq!(v.read(&f, off(blk, 0x3d), B), 1);
    // ID writes go nowhere.
    v.write(&mut f, off(blk, 0), W, 0);
    assert_eq!(f.read32(blk, 0), 0x1042_1af4);
}

#[test]
fn multifunction_bit_only_when_a_sibling_is_owned() {
    let (f, mut v) = setup(FakeConfigSpace::multifunction(true), &[Bdf::new(0, 1, 0)]);
    assert_eq!(v.read(&f, off(Bdf::new(0, 1, 0), 0x0e), B), 0);
    assert_eq!(v.read(&f, off(Bdf::new(0, 1, 1), 0), W), 0xffff_ffff);
    let both = [Bdf::new(0, 1, 0), Bdf::new(0, 1, 1)];
    let (f, mut v) = setup(FakeConfigSpace::multifunction(true), &both);
    assert_eq!(v.read(&f, off(both[0], 0x0e), B), 0x80);
    assert_eq!(v.read(&f, off(both[1], 0), H), 0x8086);
}

#[test]
fn bars_read_physical_and_size_by_protocol() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let dev_bars: Vec<u32> = (0..6).map(|i| f.read32(blk, 0x10 + 4 * i)).collect();
    for i in 0..6u16 {
        assert_eq!(
            v.read(&f, off(blk, 0x10 + 4 * i), W),
            u64::from(dev_bars[i as usize])
        );
    }
    // BAR1: 32-bit, 4 KiB.
    assert_ne!(dev_bars[1] & !0xf, 0);
    v.write(&mut f, off(blk, 0x14), W, 0xffff_ffff);
    assert_eq!(v.read(&f, off(blk, 0x14), W), 0xffff_f000);
    v.write(&mut f, off(blk, 0x14), W, u64::from(dev_bars[1]));
    assert_eq!(v.read(&f, off(blk, 0x14), W), u64::from(dev_bars[1]));
    // BAR0: I/O, 128 bytes.
    v.write(&mut f, off(blk, 0x10), W, 0xffff_ffff);
    assert_eq!(v.read(&f, off(blk, 0x10), W), 0xffff_ff81);
    v.write(&mut f, off(blk, 0x10), W, u64::from(dev_bars[0]));
    // BAR4/5: 64-bit prefetchable, 16 KiB, sized half by half.
    v.write(&mut f, off(blk, 0x20), W, 0xffff_ffff);
    assert_eq!(v.read(&f, off(blk, 0x20), W), 0xffff_c00c);
    v.write(&mut f, off(blk, 0x20), W, u64::from(dev_bars[4]));
    v.write(&mut f, off(blk, 0x24), W, 0xffff_ffff);
    assert_eq!(v.read(&f, off(blk, 0x24), W), 0xffff_ffff);
    v.write(&mut f, off(blk, 0x24), W, u64::from(dev_bars[5]));
    assert_eq!(v.read(&f, off(blk, 0x24), W), u64::from(dev_bars[5]));
    // Unimplemented BARs and the ROM read 0 and size to 0.
    v.write(&mut f, off(blk, 0x18), W, 0xffff_ffff);
    assert_eq!(v.read(&f, off(blk, 0x18), W), 0);
    v.write(&mut f, off(blk, 0x30), W, 0xffff_f800);
    assert_eq!(v.read(&f, off(blk, 0x30), W), 0);
    assert!(v.take_bar_moves().is_empty());
    // Hardware never saw the probes.
    for i in 0..6u16 {
        assert_eq!(f.read32(blk, 0x10 + 4 * i), dev_bars[i as usize]);
    }
    assert!(!f.decode_seen_with_all_ones);
}

#[test]
fn large_64bit_bar_sizes_across_both_halves() {
    let mut fake = FakeConfigSpace::new();
    fake.add(
        None,
        3,
        0,
        FakeFn::endpoint(0x1234, 0x5678)
            .pcie(PortType::Endpoint)
            .bar64(0, 0x2_0000_0000, true),
    );
    let ep = Bdf::new(0, 3, 0);
    let (mut f, mut v) = setup(fake, &[ep]);
    v.write(&mut f, off(ep, 0x10), W, 0xffff_ffff);
    v.write(&mut f, off(ep, 0x14), W, 0xffff_ffff);
    let mask = v.read(&f, off(ep, 0x10), D);
    assert_eq!(mask, 0xffff_fffe_0000_000c);
    assert_eq!(f.read32(ep, 0x10) & !0xf, 0);
    assert_eq!(f.read32(ep, 0x14), 0x80);
}

#[test]
fn bar_moves_are_virtual_and_reported() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let hw: Vec<u32> = (0..6).map(|i| f.read32(blk, 0x10 + 4 * i)).collect();
    let phys1 = u64::from(hw[1] & !0xf);
    // BAR1 (32-bit, 4 KiB) to 0x2000_0000: reads back, is reported, hardware unchanged.
    v.write(&mut f, off(blk, 0x14), W, 0x2000_0000);
    assert_eq!(v.read(&f, off(blk, 0x14), W), 0x2000_0000);
    assert_eq!(
        v.take_bar_moves(),
        [BarMove {
            bdf: blk,
            index: 1,
            size: 0x1000,
            phys: phys1,
            pci: 0x2000_0000
        }]
    );
    assert_eq!(f.read32(blk, 0x14), hw[1]);
    // Address bits below the size and the type bits are read-only.
    v.write(&mut f, off(blk, 0x14), W, 0x3000_0fff);
    assert_eq!(v.read(&f, off(blk, 0x14), W), 0x3000_0000);
    assert_eq!(v.take_bar_moves()[0].pci, 0x3000_0000);
    // A 64-bit BAR moved half by half: one move per half that changed the address; the
    // prefetchable 64-bit type bits stay.
    v.write(&mut f, off(blk, 0x20), W, 0x4000_0000);
    v.write(&mut f, off(blk, 0x24), W, 0x1);
    assert_eq!(v.read(&f, off(blk, 0x20), D), 0x1_4000_000c);
    let m = v.take_bar_moves();
    assert_eq!(m.len(), 2);
    assert_eq!(
        (m[1].index, m[1].size, m[1].pci),
        (4, 0x4000, 0x1_4000_0000)
    );
    // In one 64-bit access: two moves, the last one the final address.
    v.write(&mut f, off(blk, 0x20), D, 0x0000_0000_5000_0000);
    assert_eq!(v.take_bar_moves().last().map(|m| m.pci), Some(0x5000_0000));
    // Writing back the current value, whole or in part, is not a move.
    v.write(&mut f, off(blk, 0x20), W, 0x5000_000c);
    v.write(&mut f, off(blk, 0x21), B, 0);
    assert!(v.take_bar_moves().is_empty());
    // A probe then the old value (the sizing protocol) is not a move either.
    v.write(&mut f, off(blk, 0x14), W, 0xffff_ffff);
    v.write(&mut f, off(blk, 0x14), W, 0x3000_0000);
    assert!(v.take_bar_moves().is_empty());
    // I/O BARs are virtual too but never mapped: not reported.
    v.write(&mut f, off(blk, 0x10), W, 0x100);
    assert_eq!(v.read(&f, off(blk, 0x10), W), 0x101);
    assert!(v.take_bar_moves().is_empty());
    for i in 0..6u16 {
        assert_eq!(
            f.read32(blk, 0x10 + 4 * i),
            hw[i as usize],
            "hardware BAR{i}"
        );
    }
    // A new vECAM (a VM reboot) shows the hypervisor's placement again.
    let (_, mut fresh) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    assert_eq!(fresh.read(&f, off(blk, 0x14), W), u64::from(hw[1]));
}

#[test]
fn decode_enables_are_virtual() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let io = v.functions[0].dev.bars[0].addr.unwrap().pci;
    let mut rec = Recorder::default();
    // Linux's BAR sizing: decode off, all ones, size, restore, decode on again.
    v.write(&mut rec.with(&mut f), off(blk, 4), H, 0x0000);
    assert_eq!(v.read(&f, off(blk, 4), H) & 0x3, 0);
    assert_eq!(f.read32(blk, 4) & 0x3, 0x3, "decode changed physically");
    assert_eq!(
        v.resolve(&f, true, io, 4),
        None,
        "forwarded with I/O Space off"
    );
    v.write(&mut rec.with(&mut f), off(blk, 4), H, 0x0001);
    assert_eq!(v.read(&f, off(blk, 4), H) & 0x3, 0x1);
    assert_eq!(v.resolve(&f, true, io, 4), Some(io + 0x3eff_0000));
    v.write(&mut rec.with(&mut f), off(blk, 4), H, 0x0003);
    // Decode toggles alone never reach the function.
    assert!(rec.writes.is_empty(), "{:x?}", rec.writes);
    // Bus Master Enable does, with the decode bits as the hypervisor set them.
    v.write(&mut f, off(blk, 4), H, 0x0004);
    assert_eq!(f.read32(blk, 4) & 0x7, 0x7);
    assert_eq!(v.read(&f, off(blk, 4), H) & 0x7, 0x4);
    // A byte write to the upper Command byte leaves the guest's decode bits alone.
    v.write(&mut f, off(blk, 5), B, 0x04);
    assert_eq!(v.read(&f, off(blk, 4), H), 0x0404);
    // A new vECAM (the VM's next boot) starts from the hypervisor's decode again.
    let (_, mut fresh) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    assert_eq!(fresh.read(&f, off(blk, 4), H) & 0x3, 0x3);
}

#[test]
fn command_register_is_filtered() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    // assign_resources enabled I/O and memory decoding.
    assert_eq!(f.read32(blk, 4) & 0xffff, 0x3);
    // Guest sets bus master, MWI (4), fast back-to-back (9) and INTx disable.
    v.write(&mut f, off(blk, 4), H, 0x0617);
    assert_eq!(f.read32(blk, 4) & 0xffff, 0x0407);
    assert_eq!(v.read(&f, off(blk, 4), H), 0x0407);
    // Byte write to the upper command byte leaves the lower alone.
    v.write(&mut f, off(blk, 5), B, 0x01);
    assert_eq!(f.read32(blk, 4) & 0xffff, 0x0107);
    // Status RW1C: a set error bit is cleared by writing 1, kept by writing 0 elsewhere.
    // qemu_flat's handles: the host bridge function is 0, then slots 1-4.
    let hw = f.read32(blk, 4);
    f.set(2, 4, hw | 1 << 29);
    v.write(&mut f, off(blk, 4), H, 0x0107);
    assert_ne!(f.read32(blk, 4) & 1 << 29, 0);
    v.write(&mut f, off(blk, 6), H, 1 << 13);
    assert_eq!(f.read32(blk, 4) & 1 << 29, 0);
    assert_eq!(f.read32(blk, 4) & 0xffff, 0x0107);
}

#[test]
fn msix_hidden_when_first() {
    // virtio in qemu_flat: PCIe capability at 0x40, then MSI-X at 0x50 (last).
    let blk = Bdf::new(0, 2, 0);
    let (f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    assert_eq!(cap_ids(&mut v, &f, blk), [cap_id::PCIE]);
    assert_eq!(v.read(&f, off(blk, 0x41), B), 0);

    // MSI-X first, then MSI, then PCIe, then PM: the pointer skips both.
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2)
            .msix()
            .msi()
            .pcie(PortType::Endpoint)
            .bar32(0, 0x1000, false),
    );
    // Append a PM capability at 0x70 behind the PCIe capability at 0x60.
    fake.set(h, 0x60, fake.read32(Bdf::new(0, 1, 0), 0x60) | 0x70 << 8);
    fake.set(h, 0x70, 0x0003_0001);
    let ep = Bdf::new(0, 1, 0);
    let (mut f, mut v2) = setup(fake, &[ep]);
    assert_eq!(v2.read(&f, off(ep, 0x34), B), 0x60);
    assert_eq!(cap_ids(&mut v2, &f, ep), [cap_id::PCIE, cap_id::PM]);
    // The hidden capabilities read as zero and ignore writes.
    assert_eq!(v2.read(&f, off(ep, 0x40), W), 0);
    assert_eq!(v2.read(&f, off(ep, 0x50), W), 0);
    let mut rec = Recorder::default();
    v2.write(&mut rec.with(&mut f), off(ep, 0x42), H, 0x8000);
    v2.write(&mut rec.with(&mut f), off(ep, 0x52), H, 0x0001);
    v2.write(&mut rec.with(&mut f), off(ep, 0x44), W, 0xfee0_0000);
    assert!(rec.writes.is_empty());
    // The visible ones still take writes (PM's PMCSR, a byte of it: PME_Status is
    // RW1C and must not be written back as read; PME_En passes; without No_Soft_Reset the
    // PowerState stays D0 in hardware).
    f.set(h, 0x74, 0x8000);
    let mut rec = Recorder::default();
    v2.write(&mut rec.with(&mut f), off(ep, 0x74), H, 0x0103);
    assert_eq!(rec.writes, [(ep, 0x74, 0x0100)]);

    // Only MSI: the list is empty and Status says so.
    let mut fake = FakeConfigSpace::new();
    fake.add(None, 1, 0, FakeFn::endpoint(1, 2).msi());
    let (f, mut v3) = setup(fake, &[ep]);
    assert_eq!(v3.read(&f, off(ep, 0x06), H) & 0x10, 0);
    assert_eq!(v3.read(&f, off(ep, 0x34), B), 0);
    assert!(cap_ids(&mut v3, &f, ep).is_empty());
}

#[test]
fn device_specific_writes_pass_through_with_care() {
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2)
            .pcie(PortType::Endpoint)
            .bar32(0, 0x1000, false),
    );
    let ep = Bdf::new(0, 1, 0);
    let (mut f, mut v) = setup(fake, &[ep]);
    // PCIe capability at 0x40: Device Control/Status at 0x48, Correctable Error Detected
    // set. A 16-bit Device Control write with Initiate FLR reaches hardware without FLR
    // and with zeros (no clearing) in the RW1C Device Status.
    f.set(h, 0x48, 0x0001_0000);
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x48), H, 0x8000 | 0x0010);
    assert_eq!(rec.writes, [(ep, 0x48, 0x0010)]);
    // An extended-space write goes nowhere; reads pass through.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x100), W, 0x1234);
    assert!(rec.writes.is_empty());
    assert_eq!(
        v.read(&f, off(ep, 0x100), W),
        u64::from(f.read32(ep, 0x100))
    );
    // A dword write elsewhere in device-specific space passes unchanged.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x80), W, 0xdead_beef);
    assert_eq!(rec.writes, [(ep, 0x80, 0xdead_beef)]);
}

#[test]
fn interrupt_line_is_virtual() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    assert_eq!(v.read(&f, off(blk, 0x3c), H), 0x0100);
    v.write(&mut f, off(blk, 0x3c), B, 37);
    assert_eq!(v.read(&f, off(blk, 0x3c), W) & 0xffff, 0x0125);
    assert_eq!(v.interrupt_line(blk), Some(37));
    assert_eq!(f.read32(blk, 0x3c) & 0xff, 0);
    // The pin is read-only to the guest.
    v.write(&mut f, off(blk, 0x3d), B, 4);
    assert_eq!(v.read(&f, off(blk, 0x3d), B), 1);
}

#[test]
fn never_panics_on_any_offset_or_width() {
    let owned = [Bdf::new(0, 2, 0), Bdf::new(0, 4, 0)];
    let (mut f, v) = setup(FakeConfigSpace::qemu_flat(), &owned);
    let mut v = v.with_first_bus(0);
    for width in [B, H, W, D] {
        for reg in 0..0x1000u64 {
            let o = off(owned[0], 0) + reg;
            v.read(&f, o, width);
            v.write(&mut f, o, width, u64::MAX);
            v.write(&mut f, o, width, 0);
        }
        for o in [u64::MAX, u64::MAX - 3, 0xfff_ffff, 0x1000_0000, 1 << 40] {
            v.read(&f, o, width);
            v.write(&mut f, o, width, 0x5a5a_5a5a);
        }
    }
    // Misaligned accesses read all ones.
    assert_eq!(v.read(&f, off(owned[0], 1), H), 0xffff);
    assert_eq!(v.read(&f, off(owned[0], 4), D), u64::MAX);
    let (_, shifted) = setup(FakeConfigSpace::qemu_flat(), &owned);
    let mut shifted = shifted.with_first_bus(0xff);
    assert_eq!(shifted.read(&f, 1 << 20, W), 0xffff_ffff);
}

/// Walks the capability list as the guest sees it; returns (ID, offset) pairs.
fn caps_at(v: &mut VirtualEcam, f: &FakeConfigSpace, bdf: Bdf) -> Vec<(u8, u16)> {
    let mut ptr = v.read(f, off(bdf, 0x34), B) as u16 & 0xfc;
    let mut out = Vec::new();
    for _ in 0..48 {
        if ptr < 0x40 {
            break;
        }
        out.push((v.read(f, off(bdf, ptr), B) as u8, ptr));
        ptr = v.read(f, off(bdf, ptr + 1), B) as u16 & 0xfc;
    }
    out
}

#[test]
fn d3hot_never_resets_a_function_behind_the_hypervisors_back() {
    // Without No_Soft_Reset, D3hot -> D0 resets the function (its BARs): PowerState is
    // virtual and hardware stays in D0.
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2).pm(false).bar32(0, 0x1000, false),
    );
    let ep = Bdf::new(0, 1, 0);
    let (mut f, mut v) = setup(fake, &[ep]);
    let pm = caps_at(&mut v, &f, ep)
        .into_iter()
        .find(|&(id, _)| id == cap_id::PM)
        .unwrap()
        .1;
    let pmcsr = off(ep, pm + 4);
    f.set(h, pm + 4, f.read32(ep, pm + 4) | 1 << 15);
    let mut rec = Recorder::default();
    // D3hot with PME_En, as Linux's pci_set_power_state writes it (16 bits).
    v.write(&mut rec.with(&mut f), pmcsr, H, 0x0103);
    assert_eq!(v.read(&f, pmcsr, H) & 0x3, 3, "the guest sees D3hot");
    assert_eq!(f.read32(ep, pm + 4) & 0x3, 0, "the function stays in D0");
    assert_eq!(f.read32(ep, pm + 4) & 0x100, 0x100, "PME_En reaches it");
    // PME_Status was not cleared by the write of 0 there.
    assert_ne!(f.read32(ep, pm + 4) & 1 << 15, 0);
    v.write(&mut f, pmcsr, H, 0x0000);
    assert_eq!(v.read(&f, pmcsr, H) & 0x3, 0);
    // Its BAR is reachable all along.
    let bar = f.read32(ep, 0x10) as u64;
    assert_eq!(v.resolve(&f, false, bar, 4), Some(bar));

    // With No_Soft_Reset the transition would keep the configuration, but a function out
    // of D0 stops decoding (a change of the physical address map): virtual as well. In the
    // guest's D3hot its accesses are not forwarded (they would be Unsupported Requests).
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2).pm(true).bar32(0, 0x1000, false),
    );
    let (mut f, mut v) = setup(fake, &[ep]);
    v.write(&mut f, pmcsr, H, 0x0003);
    assert_eq!(f.read32(ep, pm + 4) & 0x3, 0, "the function stays in D0");
    assert_eq!(
        v.read(&f, pmcsr, H) & 0xb,
        0xb,
        "D3hot, No_Soft_Reset as hardware"
    );
    let bar = f.read32(ep, 0x10) as u64;
    assert_eq!(v.resolve(&f, false, bar, 4), None);
    v.write(&mut f, pmcsr, H, 0x0000);
    assert_eq!(v.resolve(&f, false, bar, 4), Some(bar));
    // A function some earlier software left out of D0 is not forwarded to either.
    f.set(h, pm + 4, f.read32(ep, pm + 4) | 3);
    assert_eq!(v.resolve(&f, false, bar, 4), None);
}

#[test]
fn virtio_pci_cfg_window_is_hidden() {
    let mut fake = FakeConfigSpace::new();
    let virtio = FakeFn::endpoint(0x1af4, 0x1042)
        .pm(true)
        .virtio_pci_cfg()
        .virtio_modern(1 << 32 | 1)
        .bar32(4, 0x4000, false);
    fake.add(None, 1, 0, virtio);
    // Another vendor's capability of the same cfg_type byte stays.
    let other = FakeFn::endpoint(0x8086, 0x1234).virtio_pci_cfg();
    fake.add(None, 2, 0, other);
    let (ep, not_virtio) = (Bdf::new(0, 1, 0), Bdf::new(0, 2, 0));
    let (mut f, mut v) = setup(fake, &[ep, not_virtio]);
    let caps = caps_at(&mut v, &f, ep);
    assert_eq!(
        caps.iter().map(|c| c.0).collect::<Vec<_>>(),
        [cap_id::PM, cap_id::VENDOR]
    );
    // The hidden one: 20 bytes at 0x50, after PM's 16 at 0x40.
    assert_eq!(caps[1].1, 0x64);
    let mut rec = Recorder::default();
    for reg in (0x50..0x64).step_by(4) {
        assert_eq!(v.read(&f, off(ep, reg), W), 0);
        v.write(&mut rec.with(&mut f), off(ep, reg), W, 0x0004_0000);
    }
    assert!(rec.writes.is_empty(), "{:x?}", rec.writes);
    assert_eq!(cap_ids(&mut v, &f, not_virtio), [cap_id::VENDOR]);

    // A cap_len of 255 (broken hardware) hides up to the end of the capability space.
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(0x1af4, 0x1042).virtio_pci_cfg(),
    );
    fake.set(h, 0x40, 0x05ff_0009);
    let (f, mut v) = setup(fake, &[ep]);
    assert!(cap_ids(&mut v, &f, ep).is_empty());
    assert_eq!(v.read(&f, off(ep, 0xfc), W), 0);
}

#[test]
fn af_flr_is_dropped_and_ea_is_hidden() {
    let mut fake = FakeConfigSpace::new();
    fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2)
            .af()
            .ea()
            .pm(false)
            .bar32(0, 0x1000, false),
    );
    let ep = Bdf::new(0, 1, 0);
    let (mut f, mut v) = setup(fake, &[ep]);
    let caps = caps_at(&mut v, &f, ep);
    let ids: Vec<u8> = caps.iter().map(|c| c.0).collect();
    assert_eq!(ids, [cap_id::AF, cap_id::PM], "EA is unlinked");
    let af = caps[0].1;
    let mut rec = Recorder::default();
    // AF Control: Initiate FLR (bit 0 of byte 4) never reaches hardware.
    v.write(&mut rec.with(&mut f), off(ep, af + 4), B, 0x1);
    assert!(rec
        .writes
        .iter()
        .all(|&(_, o, val)| o != af + 4 || val & 1 == 0));
    assert_eq!(f.read32(ep, af + 4) & 1, 0);
    // The EA capability (at 0x50) reads 0 and takes no writes: its entry's Enable stays.
    assert_eq!(v.read(&f, off(ep, 0x50), W), 0);
    assert_eq!(v.read(&f, off(ep, 0x54), W), 0);
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x54), W, 0);
    assert!(rec.writes.is_empty());
    assert_ne!(f.read32(ep, 0x54) & 1 << 31, 0);
}

#[test]
fn a_bridge_given_as_a_function_is_not_shown() {
    let mut fake = FakeConfigSpace::switch_topology(true);
    let mut topo = enumerate(&mut fake, 0, 0xff).unwrap();
    assign_resources(&mut fake, &mut topo, &qemu_host_bridge()).unwrap();
    // A VM handed a root port as one of its functions (check_assignment refuses it; the model
    // drops it too): it is neither the guest's nor shown.
    let rp = Bdf::new(0, 1, 0);
    let devs = topo.devices.into_iter().filter(|d| d.bdf == rp).collect();
    let mut v = VirtualEcam::new(devs, Vec::new());
    let mut rec = Recorder::default();
    // Bridge Control (0x3e) bit 6: Secondary Bus Reset.
    v.write(&mut rec.with(&mut fake), off(rp, 0x3c), W, 0x0040_0000);
    assert!(rec.writes.is_empty());
    assert_eq!(v.read(&fake, off(rp, 0), W), 0xffff_ffff);
    assert_eq!(fake.read32(rp, 0x3c) >> 16, 0);
}

/// Enumerates and places `f`, gives the VM the functions `owned` and shows it the bridges
/// above them, as `pci::resolve` lists them.
fn setup_with_bridges(mut f: FakeConfigSpace, owned: &[Bdf]) -> (FakeConfigSpace, VirtualEcam) {
    let mut topo = enumerate(&mut f, 0, 0xff).unwrap();
    assign_resources(&mut f, &mut topo, &qemu_host_bridge()).unwrap();
    let mut bridges: Vec<PciDevice> = owned
        .iter()
        .flat_map(|&b| topo.bridges_above(b))
        .cloned()
        .collect();
    bridges.sort_by_key(|d| d.bdf);
    bridges.dedup_by_key(|d| d.bdf);
    let devs = topo
        .devices
        .iter()
        .filter(|d| owned.contains(&d.bdf))
        .cloned()
        .collect();
    (f, VirtualEcam::new(devs, bridges))
}

/// What a probe-only scan from the root bus finds, as Linux's `pci_scan_child_bus` and
/// `pci_scan_bridge_extend` (first pass) walk it: every function that answers, and behind each
/// Type 1 header the secondary bus it reports.
fn scan(v: &mut VirtualEcam, f: &FakeConfigSpace, bus: u8, found: &mut Vec<Bdf>) {
    for dev in 0..32 {
        for func in 0..8 {
            let bdf = Bdf::new(bus, dev, func);
            if v.read(f, off(bdf, 0), W) == 0xffff_ffff {
                if func == 0 {
                    break;
                }
                continue;
            }
            found.push(bdf);
            let header = v.read(f, off(bdf, 0x0e), B);
            if header & 0x7f == 1 {
                let buses = v.read(f, off(bdf, 0x18), W);
                let (primary, secondary, subordinate) =
                    (buses as u8, (buses >> 8) as u8, (buses >> 16) as u8);
                // The checks `pci_scan_bridge_extend` makes before it takes the numbers.
                assert_eq!(primary, bus, "{bdf}");
                assert!(secondary > bus && secondary <= subordinate, "{bdf}");
                scan(v, f, secondary, found);
            }
            if func == 0 && header & 0x80 == 0 {
                break;
            }
        }
    }
}

#[test]
fn a_function_behind_a_switch_is_reached_through_its_bridges_read_only() {
    let ep = Bdf::new(3, 0, 0);
    let (rp, up, dp) = (Bdf::new(0, 1, 0), Bdf::new(1, 0, 0), Bdf::new(2, 0, 0));
    let (mut fake, mut v) = setup_with_bridges(FakeConfigSpace::switch_topology(true), &[ep]);
    assert_eq!(v.bridge_bdfs().collect::<Vec<_>>(), [rp, up, dp]);
    assert_eq!(v.bdfs().collect::<Vec<_>>(), [ep]);

    let mut found = Vec::new();
    scan(&mut v, &fake, 0, &mut found);
    // Not the other root port (00:02.0), the other downstream port (02:01.0) or the other
    // VM's endpoint below this switch (04:00.0), nor 05:00.0.
    assert_eq!(found, [rp, up, dp, ep]);
    for other in [
        Bdf::new(0, 2, 0),
        Bdf::new(2, 1, 0),
        Bdf::new(4, 0, 0),
        Bdf::new(5, 0, 0),
    ] {
        assert_eq!(v.read(&fake, off(other, 0), W), 0xffff_ffff, "{other}");
        assert_eq!(v.read(&fake, off(other, 0x18), W), 0xffff_ffff, "{other}");
    }

    // The endpoint's memory BARs lie inside every window above it, as the guest reads them
    // (Linux `pci_read_bridge_mmio{,_pref}`, then `pci_claim_resource` in the window).
    // 03:00.0: BAR0 32-bit memory, BAR2 64-bit prefetchable.
    let mut bars: Vec<(u64, bool)> = Vec::new();
    for reg in [0x10u16, 0x18] {
        let lo = v.read(&fake, off(ep, reg), W);
        let hi = if lo & 0x4 != 0 {
            v.read(&fake, off(ep, reg + 4), W)
        } else {
            0
        };
        bars.push((lo & !0xf | hi << 32, lo & 0x8 != 0));
    }
    assert_eq!(bars.iter().map(|b| b.1).collect::<Vec<_>>(), [false, true]);
    for b in [rp, up, dp] {
        let mem = v.read(&fake, off(b, 0x20), W);
        let (mem_base, mem_limit) = (mem << 16 & 0xfff0_0000, (mem & 0xfff0_0000) | 0xf_ffff);
        let pref = v.read(&fake, off(b, 0x24), W);
        let pref_base = (pref << 16 & 0xfff0_0000) | v.read(&fake, off(b, 0x28), W) << 32;
        let pref_limit = ((pref & 0xfff0_0000) | 0xf_ffff) | v.read(&fake, off(b, 0x2c), W) << 32;
        for &(addr, prefetchable) in &bars {
            let inside = if prefetchable {
                (pref_base..=pref_limit).contains(&addr)
            } else {
                (mem_base..=mem_limit).contains(&addr)
            };
            assert!(inside, "{b}: BAR at {addr:#x} outside the bridge's window");
        }
    }

    for b in [rp, up, dp] {
        // Hardware where the routing is; no BARs, ROM, capabilities or Bridge Control.
        for reg in [0x00, 0x08, 0x18, 0x1c, 0x20, 0x24, 0x28, 0x2c, 0x30] {
            assert_eq!(
                v.read(&fake, off(b, reg), W),
                u64::from(fake.read32(b, reg))
            );
        }
        for reg in [0x10, 0x14, 0x38, 0x100, 0xffc] {
            assert_eq!(v.read(&fake, off(b, reg), W), 0, "{b} {reg:#x}");
        }
        // Its PCIe capability alone, read-only: a Root, Upstream or Downstream Port adds no
        // DMA alias for the functions below (a conventional bridge would), with the slot and
        // root registers, ASPM and ARI forwarding hidden.
        assert_ne!(fake.read32(b, 0x04) & regs::STATUS_CAP_LIST, 0);
        assert_eq!(v.read(&fake, off(b, 0x06), H) & 0x10, 0x10);
        let at = v.read(&fake, off(b, 0x34), B) as u16;
        assert!(at >= 0x40, "{b}: the capability pointer {at:#x}");
        let hdr = v.read(&fake, off(b, at), W) as u32;
        assert_eq!(hdr & 0xffff, 0x0010, "{b}: PCIe capability, no next one");
        assert_eq!(
            hdr >> 16 & 0xf0,
            fake.read32(b, at) >> 16 & 0xf0,
            "port type"
        );
        assert_eq!(hdr & 1 << 24, 0, "{b}: no slot");
        for rel in [0x14u16, 0x18, 0x1c, 0x20] {
            assert_eq!(v.read(&fake, off(b, at + rel), W), 0, "{b} +{rel:#x}");
        }
        assert_eq!(
            v.read(&fake, off(b, at + 0x24), W) & 0x20,
            0,
            "no ARI forwarding"
        );
        assert_eq!(v.read(&fake, off(b, at + 0x0c), W) & 0xc00, 0, "no ASPM");
        assert_eq!(v.read(&fake, off(b, 0x0e), B), 1, "Type 1, single function");
        assert_eq!(v.read(&fake, off(b, 0x0c), B), 0, "no cache line size");
        assert_eq!(v.read(&fake, off(b, 0x3e), H), 0);

        let before: Vec<u32> = (0..0x100).step_by(4).map(|r| fake.read32(b, r)).collect();
        let mut rec = Recorder::default();
        let mut hw = rec.with(&mut fake);
        // Bus numbers and windows (Linux writes them when it reassigns, `pci_setup_bridge`,
        // and probes window support, `pci_read_bridge_windows`).
        v.write(&mut hw, off(b, 0x18), W, 0x00ff_0100);
        for reg in [0x1c, 0x20, 0x24, 0x28, 0x2c, 0x30] {
            v.write(&mut hw, off(b, reg), W, 0xffff_ffff);
            v.write(&mut hw, off(b, reg), W, 0);
        }
        // Secondary Bus Reset, as a half-word and as part of the dword.
        v.write(&mut hw, off(b, 0x3e), H, 0x0040);
        v.write(&mut hw, off(b, 0x3c), W, 0x0040_0000);
        // Command cleared (BAR sizing, `__pci_read_base`) and Status written as RW1C.
        v.write(&mut hw, off(b, 0x04), W, 0xffff_0000);
        // Its BARs, ROM, capability (Device, Link, Root and Slot Control: Link Disable,
        // slot power) and extended space.
        for reg in [
            0x10,
            0x14,
            0x38,
            0x40,
            at + 8,
            at + 0x10,
            at + 0x18,
            at + 0x1c,
            0x100,
        ] {
            v.write(&mut hw, off(b, reg), W, 0xffff_ffff);
        }
        assert!(rec.writes.is_empty(), "{b}: {:x?}", rec.writes);
        let after: Vec<u32> = (0..0x100).step_by(4).map(|r| fake.read32(b, r)).collect();
        assert_eq!(before, after, "{b}");
        assert!(v.take_bar_moves().is_empty());
        // The hardware bridge still forwards memory and DMA as the hypervisor set it; the guest
        // reads back what it wrote.
        let cmd = fake.read32(b, 0x04);
        assert_eq!(
            cmd & 0x6,
            0x6,
            "{b}: Memory Space and Bus Master stay enabled"
        );
        assert_eq!(v.read(&fake, off(b, 0x04), H), 0);
        v.write(&mut fake, off(b, 0x04), H, 0x0006);
        assert_eq!(v.read(&fake, off(b, 0x04), H), 0x0006);
        // Interrupt Line is a byte of the guest's.
        v.write(&mut fake, off(b, 0x3c), B, 0x2a);
        assert_eq!(v.read(&fake, off(b, 0x3c), B), 0x2a);
        assert_eq!(fake.read32(b, 0x3c) & 0xff, 0);
        assert_eq!(v.interrupt_line(b), Some(0x2a));
    }
    // Behind the bridges the endpoint is the VM's as before.
    assert_eq!(v.read(&fake, off(ep, 0), W), u64::from(fake.read32(ep, 0)));
    // Forwarding knows only the VM's functions' BARs: the bridge's window itself, outside
    // them, is not forwarded.
    let mem = v.read(&fake, off(rp, 0x20), W);
    let window_end = (mem & 0xfff0_0000) | 0xf_ffff;
    assert!(bars.iter().all(|&(a, _)| a != window_end - 3));
    assert_eq!(v.resolve(&fake, false, window_end - 3, 4), None);
}

#[test]
fn a_multi_function_bridge_keeps_its_bit_only_when_the_guest_sees_a_sibling() {
    let build = || {
        let mut f = FakeConfigSpace::new();
        let a = f.add(None, 1, 0, FakeFn::root_port().multifunction());
        let b = f.add(None, 1, 1, FakeFn::root_port().multifunction());
        for rp in [a, b] {
            f.add(
                Some(rp),
                0,
                0,
                FakeFn::endpoint(0x8086, 0x10d3)
                    .pcie(PortType::Endpoint)
                    .bar32(0, 0x4000, false)
                    .pin(1),
            );
        }
        f
    };
    let (a, b) = (Bdf::new(1, 0, 0), Bdf::new(2, 0, 0));
    let (f, mut v) = setup_with_bridges(build(), &[a]);
    assert_eq!(v.read(&f, off(Bdf::new(0, 1, 0), 0x0e), B), 0x01);
    assert_eq!(v.read(&f, off(Bdf::new(0, 1, 1), 0), W), 0xffff_ffff);
    let (f, mut v) = setup_with_bridges(build(), &[a, b]);
    assert_eq!(v.read(&f, off(Bdf::new(0, 1, 0), 0x0e), B), 0x81);
    let mut found = Vec::new();
    scan(&mut v, &f, 0, &mut found);
    assert_eq!(found, [Bdf::new(0, 1, 0), a, Bdf::new(0, 1, 1), b]);
}

#[test]
fn io_and_unmappable_accesses_resolve_only_inside_own_bars() {
    let (blk, net) = (Bdf::new(0, 2, 0), Bdf::new(0, 1, 0));
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let io = u64::from(f.read32(blk, 0x10) & !0x3);
    let net_io = u64::from(f.read32(net, 0x10) & !0x3);
    // The guest's I/O BAR: 0x80 bytes, physically where it is placed.
    let phys = |pci: u64| 0x3eff_0000 + pci;
    assert_eq!(v.resolve(&f, true, io, 4), Some(phys(io)));
    assert_eq!(v.resolve(&f, true, io + 0x7c, 4), Some(phys(io + 0x7c)));
    // Crossing its end, or another function's BAR next to it: absent.
    assert_eq!(v.resolve(&f, true, io + 0x7e, 4), None);
    assert_eq!(v.resolve(&f, true, net_io, 1), None);
    assert_eq!(v.resolve(&f, true, u64::MAX, 4), None);
    // A memory address is not an I/O one.
    let mem = u64::from(f.read32(blk, 0x14) & !0xf);
    assert_eq!(v.resolve(&f, true, mem, 4), None);
    assert_eq!(v.resolve(&f, false, mem + 8, 4), Some(mem + 8));
    // Moved by the guest: resolved at the new place only, to the same physical bytes.
    v.write(&mut f, off(blk, 0x10), W, 0x2000);
    assert_eq!(v.resolve(&f, true, 0x2010, 2), Some(phys(io + 0x10)));
    assert_eq!(v.resolve(&f, true, io, 4), None);
    // With I/O decoding off, nothing answers.
    v.write(&mut f, off(blk, 4), H, 0x0002);
    assert_eq!(v.resolve(&f, true, 0x2010, 2), None);
    assert_eq!(v.resolve(&f, false, mem, 4), Some(mem));
}

/// Records what reaches hardware while forwarding to a fake.
#[derive(Debug, Default)]
struct Recorder {
    writes: Vec<(Bdf, u16, u32)>,
}

struct Recording<'a> {
    rec: &'a mut Recorder,
    inner: &'a mut FakeConfigSpace,
}

impl Recorder {
    fn with<'a>(&'a mut self, inner: &'a mut FakeConfigSpace) -> Recording<'a> {
        Recording { rec: self, inner }
    }
}

impl ConfigSpace for Recording<'_> {
    fn read32(&self, bdf: Bdf, offset: u16) -> u32 {
        self.inner.read32(bdf, offset)
    }
    fn write32(&mut self, bdf: Bdf, offset: u16, value: u32) {
        self.rec.writes.push((bdf, offset, value));
        self.inner.write32(bdf, offset, value);
    }
}

/// An endpoint on 00:01.0 with INTA, MSI-X at 0x40 (Table Size 8, table in BAR0 at 0x800, PBA
/// at 0xc00), a 64-bit MSI with 4 vectors capable at 0x50, PCIe at 0x60. Returns the fake
/// (enumerated and placed) and the vECAM with `msi`.
fn msi_function(msi: bool) -> (FakeConfigSpace, VirtualEcam, Bdf) {
    let mut fake = FakeConfigSpace::new();
    let h = fake.add(
        None,
        1,
        0,
        FakeFn::endpoint(1, 2)
            .pin(1)
            .msix()
            .msi()
            .pcie(PortType::Endpoint)
            .bar32(0, 0x1000, false),
    );
    let ep = Bdf::new(0, 1, 0);
    let at = |f: &FakeConfigSpace, r: u16| f.read32(ep, r);
    // MSI-X: Table Size field 7 (8 entries); Table Offset 0x800 BIR 0; PBA Offset 0xc00 BIR 0.
    fake.set(h, 0x40, at(&fake, 0x40) | 0x0007 << 16);
    fake.set(h, 0x44, 0x800);
    fake.set(h, 0x48, 0xc00);
    // MSI: 64-bit Address Capable, Multiple Message Capable 2 (4 vectors).
    fake.set(h, 0x50, at(&fake, 0x50) | (1 << 7 | 2 << 1) << 16);
    let (f, v) = setup(fake, &[ep]);
    (f, v.with_msi(msi), ep)
}

#[test]
fn msi_and_msix_are_shown_only_with_msi() {
    let (f, mut v, ep) = msi_function(false);
    assert_eq!(cap_ids(&mut v, &f, ep), [cap_id::PCIE]);
    assert_eq!(v.read(&f, off(ep, 0x40), W), 0);
    let (f, mut v, ep) = msi_function(true);
    assert_eq!(v.read(&f, off(ep, 0x34), B), 0x40);
    assert_eq!(
        cap_ids(&mut v, &f, ep),
        [cap_id::MSIX, cap_id::MSI, cap_id::PCIE]
    );
    // Read through: Message Control, Table and PBA Offset/BIR as hardware has them.
    assert_eq!(v.read(&f, off(ep, 0x42), H), 0x0007);
    assert_eq!(v.read(&f, off(ep, 0x44), W), 0x800);
    assert_eq!(v.read(&f, off(ep, 0x48), W), 0xc00);
    assert_eq!(v.read(&f, off(ep, 0x52), H), 0x0084);
    // Switching back hides them again, even after they were read.
    let mut v = v.with_msi(false);
    assert_eq!(cap_ids(&mut v, &f, ep), [cap_id::PCIE]);
}

#[test]
fn a_function_the_vits_cannot_serve_keeps_msi_hidden() {
    let (mut f, v, ep) = msi_function(true);
    let mut v = v.without_msi_for(&[ep]);
    assert_eq!(cap_ids(&mut v, &f, ep), [cap_id::PCIE]);
    assert_eq!(v.read(&f, off(ep, 0x40), W), 0);
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x42), H, 0x8000);
    assert!(rec.writes.is_empty(), "MSI-X Enable never reaches it");
    // Its pin stays visible: it keeps INTx.
    assert_ne!(v.read(&f, off(ep, 0x3d), B), 0);
    // Another function is not affected: the list names only this one.
    let (f, v, ep) = msi_function(true);
    let mut v = v.without_msi_for(&[Bdf::new(0, 9, 0)]);
    assert_eq!(
        cap_ids(&mut v, &f, ep),
        [cap_id::MSIX, cap_id::MSI, cap_id::PCIE]
    );
}

#[test]
fn msix_control_writes_reach_hardware_with_read_only_bits_kept() {
    let (mut f, mut v, ep) = msi_function(true);
    let hdr = f.read32(ep, 0x40);
    let mut rec = Recorder::default();
    // Enable and Function Mask, and an attempt at Table Size.
    v.write(&mut rec.with(&mut f), off(ep, 0x42), H, 0xc3ff);
    assert_eq!(rec.writes, [(ep, 0x40, hdr & 0xffff | 0xc007 << 16)]);
    // A whole-dword write cannot change the ID or next pointer either.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x40), W, 0x8000_0000);
    assert_eq!(rec.writes, [(ep, 0x40, hdr & 0xffff | 0x8007 << 16)]);
    // A write that covers no writable bit, and the BIR dwords, never reach hardware.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x40), H, 0xffff);
    v.write(&mut rec.with(&mut f), off(ep, 0x44), W, 0x1001);
    v.write(&mut rec.with(&mut f), off(ep, 0x48), W, 0x2002);
    assert!(rec.writes.is_empty());
    assert_eq!(f.read32(ep, 0x44), 0x800);
}

#[test]
fn msi_control_address_and_data_reach_hardware() {
    let (mut f, mut v, ep) = msi_function(true);
    let hdr = f.read32(ep, 0x50);
    let mut rec = Recorder::default();
    // Enable with Multiple Message Enable 7 (128 vectors): clamped to the 4 it supports.
    v.write(&mut rec.with(&mut f), off(ep, 0x52), H, 0x00f1);
    assert_eq!(
        rec.writes,
        [(ep, 0x50, hdr & !(0x70 << 16) | (0x01 | 2 << 4) << 16)]
    );
    // 64-bit Address Capable and Multiple Message Capable are read-only.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x52), H, 0x0010);
    assert_eq!(rec.writes, [(ep, 0x50, hdr | 0x0010 << 16)]);
    // The guest's doorbell IOVA and EventID, unchanged.
    let mut rec = Recorder::default();
    v.write(&mut rec.with(&mut f), off(ep, 0x54), W, 0x0809_0040);
    v.write(&mut rec.with(&mut f), off(ep, 0x58), W, 0x1);
    v.write(&mut rec.with(&mut f), off(ep, 0x5c), H, 0x0023);
    assert_eq!(
        rec.writes,
        [(ep, 0x54, 0x0809_0040), (ep, 0x58, 1), (ep, 0x5c, 0x23)]
    );
}

#[test]
fn an_msi_only_function_keeps_intx_disabled_and_shows_no_pin() {
    let mut fake = FakeConfigSpace::new();
    for dev in [1, 2] {
        fake.add(
            None,
            dev,
            0,
            FakeFn::endpoint(1, 2).pin(1).msix().bar32(0, 0x1000, false),
        );
    }
    let (ep, other) = (Bdf::new(0, 1, 0), Bdf::new(0, 2, 0));
    let (mut f, v) = setup(fake, &[ep, other]);
    assert_eq!(f.read32(ep, 4) & 0x400, 0);
    let mut v = v.with_msi(true).with_msi_only(&mut f, &[ep]);
    // Set in hardware at once, before the guest writes anything.
    assert_ne!(f.read32(ep, 4) & 0x400, 0);
    assert!(v.is_msi_only(ep) && !v.is_msi_only(other));
    // The guest clears it (and sets Bus Master): hardware keeps it, reads show it.
    v.write(&mut f, off(ep, 4), H, 0x0007);
    assert_eq!(f.read32(ep, 4) & 0x0404, 0x0404);
    assert_eq!(v.read(&f, off(ep, 4), H), 0x0407);
    v.write(&mut f, off(ep, 5), B, 0x00);
    assert_eq!(f.read32(ep, 4) & 0x400, 0x400);
    // No pin; the Interrupt Line byte stays the guest's.
    assert_eq!(v.read(&f, off(ep, 0x3d), B), 0);
    v.write(&mut f, off(ep, 0x3c), B, 0x2a);
    assert_eq!(v.read(&f, off(ep, 0x3c), H), 0x002a);
    // The other function's INTx Disable and pin are the guest's as before.
    v.write(&mut f, off(other, 4), H, 0x0407);
    v.write(&mut f, off(other, 4), H, 0x0007);
    assert_eq!(f.read32(other, 4) & 0x400, 0);
    assert_eq!(v.read(&f, off(other, 0x3d), B), 1);
}

#[test]
fn bus_master_enable_is_held_until_the_dma_gate_opens() {
    let blk = Bdf::new(0, 2, 0);
    let (mut f, v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    let mut v = v.holding_bus_master();
    let bme = u64::from(regs::command::BUS_MASTER);
    assert!(!v.dma_open());
    // Memory Space and Bus Master Enable in one byte write, as Linux's pci_set_master does.
    v.write(&mut f, off(blk, 4), B, 0x06);
    assert_eq!(
        u64::from(f.read32(blk, regs::COMMAND)) & bme,
        0,
        "held in hardware"
    );
    assert_eq!(
        v.read(&f, off(blk, 4), H) & bme,
        bme,
        "the guest reads what it wrote"
    );
    assert!(v.take_dma_request());
    assert!(!v.take_dma_request());
    // The guest clears it again before the gate opened: nothing is let through.
    v.write(&mut f, off(blk, 4), H, 0x02);
    assert_eq!(v.read(&f, off(blk, 4), H) & bme, 0);
    v.write(&mut f, off(blk, 4), H, 0x06);
    assert!(v.take_dma_request());
    // A write of another byte of the dword keeps it held.
    v.write(&mut f, off(blk, 5), B, 0x00);
    assert_eq!(v.read(&f, off(blk, 4), H) & bme, bme);
    assert_eq!(u64::from(f.read32(blk, regs::COMMAND)) & bme, 0);
    v.open_dma(&mut f);
    assert!(v.dma_open());
    assert_eq!(
        u64::from(f.read32(blk, regs::COMMAND)) & bme,
        bme,
        "let through"
    );
    v.write(&mut f, off(blk, 4), H, 0x02);
    assert_eq!(u64::from(f.read32(blk, regs::COMMAND)) & bme, 0);
    v.write(&mut f, off(blk, 4), H, 0x06);
    assert!(!v.take_dma_request(), "the gate stays open");
    assert_eq!(u64::from(f.read32(blk, regs::COMMAND)) & bme, bme);
    // Open by default: a VirtualEcam without the gate passes it straight through.
    let (mut f, mut v) = setup(FakeConfigSpace::qemu_flat(), &[blk]);
    v.write(&mut f, off(blk, 4), B, 0x06);
    assert_eq!(u64::from(f.read32(blk, regs::COMMAND)) & bme, bme);
}
