use super::fake::{PhysOp, RecordingIts, FIRST_PLPI};
use super::*;
use crate::hw::fake::FakeRam;
use crate::mmio::AccessWidth::{Byte, Double, Half, Word};
use Command::*;

const RAM: u64 = 0x4000_0000;
const RAM_SIZE: usize = 0x10_0000;
/// The queue: one 4 KiB page (128 commands) at RAM + 64 KiB.
const QUEUE: u64 = RAM + 0x1_0000;
const ITT: u64 = RAM + 0x2_0000;
/// The VM's functions: 00:01.0 and 00:02.0.
const DEV_A: u32 = 0x08;
const DEV_B: u32 = 0x10;
/// A function of another VM.
const FOREIGN: u32 = 0x18;
const VCPUS: usize = 4;

struct Rig {
    ram: FakeRam,
    its: Vits,
    phys: RecordingIts,
}

impl Rig {
    fn with_cap(max_events: usize) -> Self {
        let cfg = VitsConfig {
            devices: vec![DEV_A, DEV_B],
            vcpus: VCPUS,
            max_events,
        };
        Self {
            ram: FakeRam::new(RAM, RAM_SIZE),
            its: Vits::new(&cfg),
            phys: RecordingIts::new(&[DEV_A, DEV_B]),
        }
    }

    /// A vITS as Linux leaves it after probe: queue at [`QUEUE`], CWRITER = 0, enabled.
    fn new() -> Self {
        let mut r = Self::with_cap(DEFAULT_MAX_EVENTS);
        r.w64(GITS_CBASER, CBASER_VALID | 0b111 << 59 | 1 << 10 | QUEUE);
        r.w64(GITS_CWRITER, 0);
        r.w32(GITS_CTLR, CTLR_ENABLED);
        r
    }

    fn w64(&mut self, off: u64, v: u64) {
        self.its.write(off, Double, v, &self.ram, &mut self.phys);
    }

    fn w32(&mut self, off: u64, v: u32) {
        self.its
            .write(off, Word, v.into(), &self.ram, &mut self.phys);
    }

    fn r64(&self, off: u64) -> u64 {
        self.its.read(off, Double)
    }

    fn r32(&self, off: u64) -> u32 {
        self.its.read(off, Word) as u32
    }

    /// Writes `cmds` at GITS_CWRITER's slots (wrapping in a `size`-byte queue) and moves
    /// GITS_CWRITER past them, as Linux's its_send_single_command does.
    fn send_in(&mut self, size: u64, cmds: &[Command]) {
        let mut w = self.r64(GITS_CWRITER);
        for c in cmds {
            GuestRam::write(&self.ram, Ipa(QUEUE + w), &c.encode()).unwrap();
            w = (w + CMD_SIZE as u64) % size;
        }
        self.w64(GITS_CWRITER, w);
    }

    fn send(&mut self, cmds: &[Command]) {
        self.send_in(4096, cmds);
    }

    /// Sends `cmds` and returns what reached the physical ITS.
    fn ops(&mut self, cmds: &[Command]) -> Vec<PhysOp> {
        self.phys.take();
        self.send(cmds);
        self.phys.take()
    }

    /// Sends one command that must be ignored with `kind`, changing nothing physically.
    fn refused(&mut self, cmd: Command, kind: CmdError) {
        let before = self.its.stats().error(kind);
        let events = self.its.mapped_events();
        assert_eq!(self.ops(&[cmd]), [], "{cmd:?} reached the physical ITS");
        assert_eq!(
            self.its.stats().error(kind),
            before + 1,
            "{cmd:?} not {kind:?}"
        );
        assert_eq!(self.its.mapped_events(), events);
        self.assert_caught_up();
    }

    fn assert_caught_up(&self) {
        assert_eq!(self.r64(GITS_CREADR), self.r64(GITS_CWRITER));
    }

    /// DEV_A with 32 EventIDs, collections 0-3 on vCPUs 0-3.
    fn linux_setup(&mut self) {
        let mut cmds: Vec<Command> = (0..VCPUS as u16)
            .map(|c| Mapc {
                icid: c,
                rdbase: c.into(),
                valid: true,
            })
            .collect();
        cmds.push(mapd(DEV_A, 4));
        self.send(&cmds);
    }
}

fn mapd(device: u32, size: u8) -> Command {
    Mapd {
        device,
        size,
        itt: ITT,
        valid: true,
    }
}

fn mapti(device: u32, event: u32, intid: u32, icid: u16) -> Command {
    Mapti {
        device,
        event,
        intid,
        icid,
    }
}

fn pev(device: u32, event: u32, plpi: u32) -> PhysEvent {
    PhysEvent {
        device,
        event,
        plpi,
    }
}

#[test]
fn linux_probe_sequence() {
    let mut r = Rig::with_cap(16);
    // its_probe_one: PIDR2.ArchRev 3; its_force_quiescent: disabled and quiescent.
    assert_eq!((r.r32(GITS_PIDR2) >> 4) & 0xF, 3);
    assert_eq!(r.r32(GITS_CTLR), CTLR_QUIESCENT);
    assert_eq!(r.r32(GITS_IIDR), 0x43B);
    let typer = r.r64(GITS_TYPER);
    assert_eq!(typer & 1, 1, "Physical");
    assert_eq!(typer & 2, 0, "no Virtual");
    assert_eq!((typer >> 4) & 0xF, 7, "8-byte ITT entries");
    assert_eq!((typer >> 8) & 0x1F, 15, "16 EventID bits");
    assert_eq!((typer >> 13) & 0x1F, 15, "16 DeviceID bits: every RID");
    assert_eq!(typer & (1 << 18 | 1 << 19), 0, "no SEIS, PTA = 0");
    assert_eq!((typer >> 32) & 0x1F, 0x17, "CIL = 1, 8 ICID bits");
    // The low and high halves by 32-bit reads.
    assert_eq!(u64::from(r.r32(GITS_TYPER)), typer & 0xFFFF_FFFF);
    assert_eq!(u64::from(r.r32(GITS_TYPER + 4)), typer >> 32);

    // All eight BASERs written 0; Type and Entry_Size stay.
    for n in 0..8 {
        r.w64(GITS_BASER + 8 * n, 0);
    }
    assert_eq!(r.r64(GITS_BASER), BASER_TYPE_DEVICE | 7 << 48);
    assert_eq!(r.r64(GITS_BASER + 8), BASER_TYPE_COLLECTION | 7 << 48);
    for n in 2..8 {
        r.w64(GITS_BASER + 8 * n, u64::MAX);
        assert_eq!(r.r64(GITS_BASER + 8 * n), 0, "BASER{n} is RAZ/WI");
    }
    // Page size probe (64K sticks), then Valid | Indirect | RaWaWb | IS | PA | Size.
    let dev = 1 << 63 | 1 << 62 | 0b111 << 59 | 0x4123_0000 | 1 << 10 | 2 << 8;
    r.w64(GITS_BASER, dev | 0b101 << 56 | 0x1F << 48);
    assert_eq!(r.r64(GITS_BASER), dev | BASER_TYPE_DEVICE | 7 << 48);
    // By halves too (a 32-bit kernel's lo_hi_writeq).
    let coll = 1u64 << 63 | 0x4124_0000 | 2 << 8;
    r.w32(GITS_BASER + 8, coll as u32);
    r.w32(GITS_BASER + 12, (coll >> 32) as u32);
    assert_eq!(
        r.r64(GITS_BASER + 8),
        coll | BASER_TYPE_COLLECTION | 7 << 48
    );

    // CBASER reads back; CWRITER = 0; enable.
    let cbaser = CBASER_VALID | 0b111 << 59 | 1 << 10 | QUEUE | 15;
    r.w64(GITS_CBASER, cbaser | 1 << 62 | 1 << 9);
    assert_eq!(r.r64(GITS_CBASER), cbaser, "RES0 bits dropped");
    r.w64(GITS_CWRITER, 0);
    r.w32(GITS_CTLR, CTLR_ENABLED);
    assert_eq!(r.r32(GITS_CTLR), CTLR_ENABLED, "enabled, not quiescent");
    assert_eq!(r.r64(GITS_CREADR), 0);
    assert_eq!(r.phys.ops, []);
}

#[test]
fn registers_are_read_only_while_enabled() {
    let mut r = Rig::new();
    let cbaser = r.r64(GITS_CBASER);
    let baser = r.r64(GITS_BASER);
    r.w64(GITS_CBASER, CBASER_VALID | (RAM + 0x8000));
    r.w64(GITS_BASER, 1 << 63 | 0x5000_0000);
    assert_eq!(r.r64(GITS_CBASER), cbaser);
    assert_eq!(r.r64(GITS_BASER), baser);
    // TYPER, CREADR, IIDR, PIDR2 are read-only at any time.
    r.w64(GITS_TYPER, 0);
    r.w64(GITS_CREADR, 0x40);
    r.w32(GITS_IIDR, 0);
    r.w32(GITS_PIDR2, 0);
    assert_eq!(r.r64(GITS_TYPER), ITS_TYPER);
    assert_eq!(r.r64(GITS_CREADR), 0);
    assert_eq!(r.r32(GITS_IIDR), ITS_IIDR);
    assert_eq!(r.r32(GITS_PIDR2), ITS_PIDR2);
    // Disabled again: writable, and a CBASER write resets CREADR.
    r.send(&[Sync { rdbase: 0 }]);
    assert_eq!(r.r64(GITS_CREADR), 32);
    r.w32(GITS_CTLR, 0);
    assert_eq!(r.r32(GITS_CTLR), CTLR_QUIESCENT);
    r.w64(GITS_CBASER, CBASER_VALID | (RAM + 0x8000));
    assert_eq!(r.r64(GITS_CBASER), CBASER_VALID | (RAM + 0x8000));
    assert_eq!(r.r64(GITS_CREADR), 0);
}

#[test]
fn unsupported_accesses_are_raz_wi() {
    let mut r = Rig::new();
    // A 64-bit access to the 32-bit GITS_CTLR/GITS_IIDR pair, bytes, halfwords, misaligned
    // words, offsets beyond the frame, unmodelled registers.
    assert_eq!(r.r64(GITS_CTLR), 0);
    assert_eq!(r.its.read(GITS_CTLR, Byte), 0);
    assert_eq!(r.its.read(GITS_IIDR, Half), 0);
    assert_eq!(r.its.read(GITS_IIDR + 1, Word), 0);
    assert_eq!(r.its.read(GITS_FRAME_SIZE + GITS_CTLR, Word), 0);
    assert_eq!(
        r.its.read(0x10040, Word),
        0,
        "GITS_TRANSLATER is not the model's"
    );
    assert_eq!(r.r32(0x0010), 0, "GITS_MPAMIDR");
    assert_eq!(r.r64(GITS_TYPER + 4), 0, "misaligned 64-bit");
    for (off, w) in [(GITS_CTLR, Double), (GITS_CTLR, Byte), (GITS_CTLR, Half)] {
        r.its.write(off, w, 0, &r.ram, &mut r.phys);
        assert_eq!(r.r32(GITS_CTLR), CTLR_ENABLED, "{w:?} write to GITS_CTLR");
    }
    r.its
        .write(GITS_FRAME_SIZE + GITS_CTLR, Word, 0, &r.ram, &mut r.phys);
    assert_eq!(r.r32(GITS_CTLR), CTLR_ENABLED);
}

#[test]
fn cwriter_processes_the_queue_synchronously() {
    let mut r = Rig::new();
    r.send(&[Sync { rdbase: 1 }, Sync { rdbase: 2 }]);
    assert_eq!(r.r64(GITS_CWRITER), 64);
    r.assert_caught_up();
    assert_eq!(r.phys.take(), [PhysOp::Sync(1), PhysOp::Sync(2)]);
    assert_eq!(r.its.stats().commands, 2);
    // A 32-bit write to the low half processes; to the RES0 high half, nothing.
    GuestRam::write(&r.ram, Ipa(QUEUE + 64), &Sync { rdbase: 3 }.encode()).unwrap();
    r.w32(GITS_CWRITER + 4, 1);
    assert_eq!(r.r64(GITS_CREADR), 64);
    r.w32(GITS_CWRITER, 96);
    r.assert_caught_up();
    assert_eq!(r.phys.take(), [PhysOp::Sync(3)]);
}

#[test]
fn the_queue_wraps() {
    let mut r = Rig::new();
    // 126 SYNCs, then 4 more: two at the end of the page, two at its start.
    let syncs = |n| vec![Sync { rdbase: 0 }; n];
    r.send(&syncs(126));
    assert_eq!(r.r64(GITS_CREADR), 126 * 32);
    r.phys.take();
    r.send(&[
        Sync { rdbase: 1 },
        Sync { rdbase: 2 },
        Sync { rdbase: 3 },
        Sync { rdbase: 0 },
    ]);
    assert_eq!(r.r64(GITS_CWRITER), 2 * 32);
    r.assert_caught_up();
    assert_eq!(
        r.phys.take(),
        [1, 2, 3, 0].map(PhysOp::Sync),
        "in order across the wrap"
    );
    assert_eq!(r.its.stats().commands, 130);
    assert_eq!(r.its.stats().stalls, 0);
}

#[test]
fn nothing_is_processed_while_disabled_or_without_a_queue() {
    let mut r = Rig::new();
    r.w32(GITS_CTLR, 0);
    r.send(&[Sync { rdbase: 1 }]);
    assert_eq!(r.r64(GITS_CREADR), 0);
    assert_eq!(r.phys.take(), []);
    // Enabling processes what is there.
    r.w32(GITS_CTLR, CTLR_ENABLED);
    r.assert_caught_up();
    assert_eq!(r.phys.take(), [PhysOp::Sync(1)]);
    // CBASER.Valid = 0: nothing.
    r.w32(GITS_CTLR, 0);
    r.w64(GITS_CBASER, QUEUE);
    r.w32(GITS_CTLR, CTLR_ENABLED);
    r.send(&[Sync { rdbase: 1 }]);
    assert_eq!(r.r64(GITS_CREADR), 0);
    assert_eq!(r.phys.take(), []);
    assert_eq!(r.its.stats().stalls, 0);
}

#[test]
fn a_queue_outside_ram_stalls() {
    for base in [RAM - 0x1000, RAM + RAM_SIZE as u64 - 0x1000, 0] {
        let mut r = Rig::new();
        r.w32(GITS_CTLR, 0);
        // Two pages, the second (or both) beyond guest RAM.
        r.w64(GITS_CBASER, CBASER_VALID | base | 1);
        r.w32(GITS_CTLR, CTLR_ENABLED);
        r.w64(GITS_CWRITER, 32);
        assert_eq!(r.r64(GITS_CREADR), CREADR_STALLED, "queue at {base:#x}");
        assert_eq!(r.its.stats().stalls, 1);
        assert_eq!(r.its.stats().commands, 0);
        assert_eq!(r.phys.ops, []);
        // Retry stalls again; a CBASER write (disabled) ends the stall.
        r.w64(GITS_CWRITER, 32 | CWRITER_RETRY);
        assert_eq!(r.r64(GITS_CREADR), CREADR_STALLED);
        r.w32(GITS_CTLR, 0);
        r.w64(GITS_CBASER, CBASER_VALID | QUEUE);
        assert_eq!(r.r64(GITS_CREADR), 0);
    }
}

#[test]
fn cwriter_beyond_the_queue_stalls_until_retried() {
    let mut r = Rig::new();
    r.send(&[Sync { rdbase: 1 }]);
    r.phys.take();
    // 4 KiB queue: offset 4096 is outside it.
    r.w64(GITS_CWRITER, 4096);
    assert_eq!(r.r64(GITS_CREADR), 32 | CREADR_STALLED);
    assert_eq!(r.r64(GITS_CWRITER), 4096, "CWRITER reads back");
    // A stalled queue stays stalled: a good CWRITER alone does not restart it.
    GuestRam::write(&r.ram, Ipa(QUEUE + 32), &Sync { rdbase: 2 }.encode()).unwrap();
    r.w64(GITS_CWRITER, 64);
    assert_eq!(r.r64(GITS_CREADR), 32 | CREADR_STALLED);
    assert_eq!(r.phys.take(), []);
    // Retry restarts at CREADR.
    r.w64(GITS_CWRITER, 64 | CWRITER_RETRY);
    assert_eq!(r.r64(GITS_CREADR), 64);
    assert_eq!(r.r64(GITS_CWRITER), 64, "Retry is not stored");
    assert_eq!(r.phys.take(), [PhysOp::Sync(2)]);
    assert_eq!(
        r.its.stats().stalls,
        1,
        "a stalled queue does not stall again"
    );
}

#[test]
fn decode_matches_the_spec_layouts() {
    // MAPD as Linux's its_build_mapd_cmd encodes it: DeviceID 0x10, Size 4, ITT, V.
    let mut raw = [0u8; CMD_SIZE];
    raw[0..8].copy_from_slice(&(0x08u64 | 0x10 << 32).to_le_bytes());
    raw[8..16].copy_from_slice(&4u64.to_le_bytes());
    raw[16..24].copy_from_slice(&(1u64 << 63 | 0x4567_8900).to_le_bytes());
    assert_eq!(
        Command::decode(&raw),
        Mapd {
            device: 0x10,
            size: 4,
            itt: 0x4567_8900,
            valid: true
        }
    );
    // MAPC ICID 3, target = Processor_Number 2 << 16 (its_encode_target).
    raw = [0; CMD_SIZE];
    raw[0] = 0x09;
    raw[16..24].copy_from_slice(&(1u64 << 63 | 2 << 16 | 3).to_le_bytes());
    assert_eq!(
        Command::decode(&raw),
        Mapc {
            icid: 3,
            rdbase: 2,
            valid: true
        }
    );
    // MAPTI: EventID [31:0] and pINTID [63:32] of DW1.
    raw = [0; CMD_SIZE];
    raw[0..8].copy_from_slice(&(0x0Au64 | 0x8 << 32).to_le_bytes());
    raw[8..16].copy_from_slice(&(8195u64 << 32 | 7).to_le_bytes());
    raw[16..24].copy_from_slice(&1u64.to_le_bytes());
    assert_eq!(Command::decode(&raw), mapti(0x8, 7, 8195, 1));
    // GICv4 commands are unknown here.
    raw = [0; CMD_SIZE];
    raw[0] = 0x29;
    assert_eq!(Command::decode(&raw), Unknown(0x29));
    for c in [
        Movi {
            device: 1,
            event: 2,
            icid: 3,
        },
        Int {
            device: 4,
            event: 5,
        },
        Clear {
            device: 6,
            event: 7,
        },
        Sync { rdbase: 8 },
        mapd(9, 31),
        Mapc {
            icid: 10,
            rdbase: 11,
            valid: false,
        },
        mapti(12, 13, 14, 15),
        Mapi {
            device: 16,
            event: 17,
            icid: 18,
        },
        Inv {
            device: 19,
            event: 20,
        },
        Invall { icid: 21 },
        Movall {
            rdbase1: 22,
            rdbase2: 23,
        },
        Discard {
            device: 24,
            event: 25,
        },
        Unknown(0x42),
    ] {
        assert_eq!(Command::decode(&c.encode()), c);
    }
}

#[test]
fn mapd_maps_owned_devices_and_checks_the_itt() {
    let mut r = Rig::new();
    assert_eq!(
        r.ops(&[mapd(DEV_A, 4)]),
        [PhysOp::MapDevice {
            device: DEV_A,
            events: 32
        }]
    );
    assert_eq!(r.its.device_mapping(DEV_A), Some((32, Ipa(ITT))));
    // Size 15 is the largest (IDbits = 15): 65536 EventIDs, a 512 KiB ITT in RAM.
    assert_eq!(
        r.ops(&[mapd(DEV_B, 15)]),
        [PhysOp::MapDevice {
            device: DEV_B,
            events: 1 << 16
        }]
    );
    r.refused(mapd(DEV_B, 16), CmdError::IttSizeOor);
    r.refused(mapd(DEV_B, 31), CmdError::IttSizeOor);
    // The ITT must lie wholly in guest RAM.
    for itt in [0, RAM - 0x100, RAM + RAM_SIZE as u64, 0x000F_FFFF_FFFF_FF00] {
        r.refused(
            Mapd {
                device: DEV_A,
                size: 4,
                itt,
                valid: true,
            },
            CmdError::IttOutsideRam,
        );
    }
    // 32 entries of 8 bytes fit exactly at the end of RAM.
    let end = RAM + RAM_SIZE as u64 - 256;
    let ops = r.ops(&[Mapd {
        device: DEV_A,
        size: 4,
        itt: end,
        valid: true,
    }]);
    assert_eq!(
        ops,
        [
            PhysOp::UnmapDevice(DEV_A),
            PhysOp::MapDevice {
                device: DEV_A,
                events: 32
            }
        ],
        "a remap replaces the mapping"
    );
    assert_eq!(r.its.device_mapping(DEV_A), Some((32, Ipa(end))));
    // V = 0 unmaps; of an unmapped device it does nothing.
    let unmap = Mapd {
        device: DEV_A,
        size: 0,
        itt: 0,
        valid: false,
    };
    assert_eq!(r.ops(&[unmap]), [PhysOp::UnmapDevice(DEV_A)]);
    assert_eq!(r.ops(&[unmap]), []);
    assert_eq!(r.its.device_mapping(DEV_A), None);
    assert_eq!(r.its.stats().total_errors(), 6);
}

#[test]
fn a_foreign_device_never_reaches_the_physical_its() {
    let mut r = Rig::new();
    r.linux_setup();
    for c in [
        mapd(FOREIGN, 4),
        Mapd {
            device: FOREIGN,
            size: 4,
            itt: ITT,
            valid: false,
        },
        mapti(FOREIGN, 0, 8192, 0),
        Mapi {
            device: FOREIGN,
            event: 0,
            icid: 0,
        },
        Int {
            device: FOREIGN,
            event: 0,
        },
        Clear {
            device: FOREIGN,
            event: 0,
        },
        Inv {
            device: FOREIGN,
            event: 0,
        },
        Discard {
            device: FOREIGN,
            event: 0,
        },
        Movi {
            device: FOREIGN,
            event: 0,
            icid: 1,
        },
    ] {
        r.refused(c, CmdError::ForeignDevice);
    }
    // Beyond Devbits (16 bits).
    r.refused(mapd(0x1_0000 | DEV_A, 4), CmdError::DeviceOor);
    r.refused(mapd(u32::MAX, 4), CmdError::DeviceOor);
    // A VM configured with a DeviceID beyond Devbits cannot use it either.
    let its = Vits::new(&VitsConfig {
        devices: vec![0x1_0008],
        vcpus: 1,
        max_events: 8,
    });
    assert!(its.owned.is_empty());
    assert_eq!(r.phys.devices.keys().copied().collect::<Vec<_>>(), [DEV_A]);
}

#[test]
fn mapc_targets_vcpus() {
    let mut r = Rig::new();
    r.send(&[Mapc {
        icid: 255,
        rdbase: 3,
        valid: true,
    }]);
    assert_eq!(r.its.collection(255), Some(3));
    r.refused(
        Mapc {
            icid: 256,
            rdbase: 0,
            valid: true,
        },
        CmdError::CollectionOor,
    );
    r.refused(
        Mapc {
            icid: 1,
            rdbase: VCPUS as u64,
            valid: true,
        },
        CmdError::ProcnumOor,
    );
    // An RDbase that is a redistributor address (PTA = 1 style) is no vCPU either.
    r.refused(
        Mapc {
            icid: 1,
            rdbase: 0x80a_0000 >> 16,
            valid: true,
        },
        CmdError::ProcnumOor,
    );
    assert_eq!(r.its.collection(1), None);
    // V = 0 unmaps whatever RDbase says.
    r.send(&[Mapc {
        icid: 255,
        rdbase: 99,
        valid: false,
    }]);
    assert_eq!(r.its.collection(255), None);
    assert_eq!(r.phys.ops, []);
}

#[test]
fn mapti_maps_an_event_to_a_physical_lpi() {
    let mut r = Rig::new();
    r.linux_setup();
    let ops = r.ops(&[mapti(DEV_A, 0, 8192, 2), mapti(DEV_A, 31, 65535, 3)]);
    assert_eq!(
        ops,
        [
            PhysOp::MapEvent {
                ev: pev(DEV_A, 0, FIRST_PLPI),
                vcpu: 2
            },
            PhysOp::MapEvent {
                ev: pev(DEV_A, 31, FIRST_PLPI + 1),
                vcpu: 3
            },
        ]
    );
    assert_eq!(r.its.translation(DEV_A, 0), Some((8192, 2, FIRST_PLPI)));
    // The port is told the guest's LPI (a GICv4 port maps the event straight to it).
    assert_eq!(r.phys.vintids[&FIRST_PLPI], 8192);
    assert_eq!(r.phys.vintids[&(FIRST_PLPI + 1)], 65535);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), Some((8192, 2)));
    assert_eq!(r.its.virtual_of(FIRST_PLPI + 1), Some((65535, 3)));
    assert_eq!(r.its.virtual_of(FIRST_PLPI + 2), None);
    assert_eq!(r.its.virtual_of(8192), None, "a vINTID is not a pLPI");
    // MAPI: pINTID = EventID, which must then be an LPI.
    r.send(&[mapd(DEV_B, 15)]);
    r.phys.take();
    let ops = r.ops(&[Mapi {
        device: DEV_B,
        event: 9000,
        icid: 1,
    }]);
    assert_eq!(
        ops,
        [PhysOp::MapEvent {
            ev: pev(DEV_B, 9000, FIRST_PLPI + 2),
            vcpu: 1
        }]
    );
    assert_eq!(r.its.virtual_of(FIRST_PLPI + 2), Some((9000, 1)));
    r.refused(
        Mapi {
            device: DEV_B,
            event: 5,
            icid: 1,
        },
        CmdError::PhysicalIdOor,
    );
    // A MAPTI of a mapped event replaces it, its old pLPI freed first.
    let ops = r.ops(&[mapti(DEV_A, 0, 8200, 1)]);
    assert_eq!(
        ops,
        [
            PhysOp::UnmapEvent(pev(DEV_A, 0, FIRST_PLPI)),
            PhysOp::MapEvent {
                ev: pev(DEV_A, 0, FIRST_PLPI + 3),
                vcpu: 1
            }
        ]
    );
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    assert_eq!(r.its.virtual_of(FIRST_PLPI + 3), Some((8200, 1)));
    assert_eq!(r.its.mapped_events(), 3);
}

#[test]
fn mapti_errors() {
    let mut r = Rig::new();
    r.linux_setup();
    r.refused(mapti(DEV_B, 0, 8192, 0), CmdError::UnmappedDevice);
    r.refused(mapti(DEV_A, 32, 8192, 0), CmdError::IdOor);
    r.refused(mapti(DEV_A, u32::MAX, 8192, 0), CmdError::IdOor);
    r.refused(mapti(DEV_A, 0, 8191, 0), CmdError::PhysicalIdOor);
    r.refused(mapti(DEV_A, 0, 1023, 0), CmdError::PhysicalIdOor);
    r.refused(mapti(DEV_A, 0, 1 << 16, 0), CmdError::PhysicalIdOor);
    r.refused(mapti(DEV_A, 0, 8192, 256), CmdError::CollectionOor);
    // The physical ITS out of LPIs.
    r.phys.lpi_limit = Some(0);
    r.phys.take();
    r.send(&[mapti(DEV_A, 0, 8192, 0)]);
    assert_eq!(r.its.stats().error(CmdError::Physical), 1);
    assert_eq!(r.its.mapped_events(), 0);
    r.phys.fail = true;
    r.send(&[mapd(DEV_B, 1)]);
    assert_eq!(r.its.stats().error(CmdError::Physical), 2);
    assert_eq!(r.its.device_mapping(DEV_B), None);
    assert!(r.phys.live.is_empty());
}

#[test]
fn an_unmapped_collection_drops_its_interrupts_until_mapped() {
    let mut r = Rig::new();
    r.send(&[mapd(DEV_A, 4), mapti(DEV_A, 1, 8193, 7)]);
    // Routed to vCPU 0 meanwhile, translated to nothing.
    assert_eq!(r.phys.live[&FIRST_PLPI], (DEV_A, 1, 0));
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    r.refused(
        Int {
            device: DEV_A,
            event: 1,
        },
        CmdError::UnmappedCollection,
    );
    // MAPC of ICID 7 to vCPU 2 retargets its events.
    let ops = r.ops(&[Mapc {
        icid: 7,
        rdbase: 2,
        valid: true,
    }]);
    assert_eq!(ops, [PhysOp::MoveEvent(pev(DEV_A, 1, FIRST_PLPI), 2)]);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), Some((8193, 2)));
    // A MAPC to the same vCPU again moves nothing; V = 0 drops interrupts again.
    let again = Mapc {
        icid: 7,
        rdbase: 2,
        valid: true,
    };
    assert_eq!(r.ops(&[again]), []);
    r.send(&[Mapc {
        icid: 7,
        rdbase: 0,
        valid: false,
    }]);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    // A disabled ITS translates nothing.
    r.send(&[again]);
    r.w32(GITS_CTLR, 0);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    r.w32(GITS_CTLR, CTLR_ENABLED);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), Some((8193, 2)));
}

#[test]
fn int_clear_inv_discard() {
    let mut r = Rig::new();
    r.linux_setup();
    r.send(&[mapti(DEV_A, 3, 8195, 1)]);
    let e = pev(DEV_A, 3, FIRST_PLPI);
    let ops = r.ops(&[
        Int {
            device: DEV_A,
            event: 3,
        },
        Clear {
            device: DEV_A,
            event: 3,
        },
        Inv {
            device: DEV_A,
            event: 3,
        },
        Sync { rdbase: 1 },
    ]);
    assert_eq!(
        ops,
        [
            PhysOp::Raise(e),
            PhysOp::Clear(e),
            PhysOp::Invalidate(e, 8195),
            PhysOp::Sync(1)
        ]
    );
    for (c, k) in [
        (
            Int {
                device: DEV_A,
                event: 4,
            },
            CmdError::UnmappedInterrupt,
        ),
        (
            Clear {
                device: DEV_A,
                event: 32,
            },
            CmdError::IdOor,
        ),
        (
            Inv {
                device: DEV_B,
                event: 3,
            },
            CmdError::UnmappedDevice,
        ),
        (
            Discard {
                device: DEV_A,
                event: 2,
            },
            CmdError::UnmappedInterrupt,
        ),
        (
            Discard {
                device: 0x2_0000,
                event: 3,
            },
            CmdError::DeviceOor,
        ),
        (Sync { rdbase: 4 }, CmdError::ProcnumOor),
    ] {
        r.refused(c, k);
    }
    let discard = Discard {
        device: DEV_A,
        event: 3,
    };
    assert_eq!(r.ops(&[discard]), [PhysOp::UnmapEvent(e)]);
    assert_eq!(r.its.translation(DEV_A, 3), None);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    r.refused(discard, CmdError::UnmappedInterrupt);
    assert!(r.phys.live.is_empty());
}

#[test]
fn invall_invalidates_the_collections_events() {
    let mut r = Rig::new();
    r.linux_setup();
    r.send(&[
        mapti(DEV_A, 0, 8192, 1),
        mapti(DEV_A, 1, 8193, 2),
        mapti(DEV_A, 2, 8194, 1),
    ]);
    let ops = r.ops(&[Invall { icid: 1 }]);
    assert_eq!(
        ops,
        [
            PhysOp::Invalidate(pev(DEV_A, 0, FIRST_PLPI), 8192),
            PhysOp::Invalidate(pev(DEV_A, 2, FIRST_PLPI + 2), 8194)
        ]
    );
    r.refused(Invall { icid: 256 }, CmdError::CollectionOor);
    r.refused(Invall { icid: 9 }, CmdError::UnmappedCollection);
}

#[test]
fn movi_and_movall() {
    let mut r = Rig::new();
    r.linux_setup();
    r.send(&[mapti(DEV_A, 5, 8197, 0)]);
    let e = pev(DEV_A, 5, FIRST_PLPI);
    let movi = |icid| Movi {
        device: DEV_A,
        event: 5,
        icid,
    };
    // Linux's its_set_affinity: MOVI to the new CPU's collection.
    assert_eq!(r.ops(&[movi(3)]), [PhysOp::MoveEvent(e, 3)]);
    assert_eq!(r.its.translation(DEV_A, 5), Some((8197, 3, FIRST_PLPI)));
    assert_eq!(r.its.virtual_of(FIRST_PLPI), Some((8197, 3)));
    assert_eq!(r.phys.live[&FIRST_PLPI].2, 3);
    // To a collection on the same vCPU: the ICID changes, the route does not.
    r.send(&[Mapc {
        icid: 20,
        rdbase: 3,
        valid: true,
    }]);
    assert_eq!(r.ops(&[movi(20)]), []);
    assert_eq!(r.its.translation(DEV_A, 5), Some((8197, 20, FIRST_PLPI)));
    r.refused(movi(21), CmdError::UnmappedCollection);
    r.refused(movi(300), CmdError::CollectionOor);
    r.refused(
        Movi {
            device: DEV_A,
            event: 6,
            icid: 1,
        },
        CmdError::UnmappedInterrupt,
    );
    // Its current collection unmapped: an error too.
    r.send(&[Mapc {
        icid: 20,
        rdbase: 0,
        valid: false,
    }]);
    r.refused(movi(1), CmdError::UnmappedCollection);
    // MOVALL between vCPUs.
    let ops = r.ops(&[
        Movall {
            rdbase1: 1,
            rdbase2: 2,
        },
        Movall {
            rdbase1: 2,
            rdbase2: 2,
        },
    ]);
    assert_eq!(ops, [PhysOp::MoveAll(1, 2)]);
    r.refused(
        Movall {
            rdbase1: 1,
            rdbase2: 4,
        },
        CmdError::ProcnumOor,
    );
    r.refused(
        Movall {
            rdbase1: 9,
            rdbase2: 0,
        },
        CmdError::ProcnumOor,
    );
}

#[test]
fn unknown_commands_are_ignored_and_processing_goes_on() {
    let mut r = Rig::new();
    let ops = r.ops(&[Unknown(0x29), Unknown(0), Sync { rdbase: 1 }]);
    assert_eq!(ops, [PhysOp::Sync(1)]);
    assert_eq!(r.its.stats().error(CmdError::UnknownCommand), 2);
    assert_eq!(r.its.stats().commands, 3);
    assert_eq!(r.its.stats().stalls, 0);
    r.assert_caught_up();
}

#[test]
fn mapd_v0_unmaps_every_event_of_the_device() {
    let mut r = Rig::new();
    r.linux_setup();
    r.send(&[
        mapd(DEV_B, 2),
        mapti(DEV_A, 0, 8192, 0),
        mapti(DEV_B, 0, 8193, 0),
        mapti(DEV_A, 7, 8194, 0),
    ]);
    let ops = r.ops(&[Mapd {
        device: DEV_A,
        size: 0,
        itt: 0,
        valid: false,
    }]);
    assert_eq!(
        ops,
        [
            PhysOp::UnmapEvent(pev(DEV_A, 0, FIRST_PLPI)),
            PhysOp::UnmapEvent(pev(DEV_A, 7, FIRST_PLPI + 2)),
            PhysOp::UnmapDevice(DEV_A),
        ]
    );
    assert_eq!(r.its.mapped_events(), 1);
    assert_eq!(r.its.virtual_of(FIRST_PLPI + 1), Some((8193, 0)));
    // Mapped again, the device has no events.
    r.send(&[mapd(DEV_A, 4)]);
    r.refused(
        Int {
            device: DEV_A,
            event: 7,
        },
        CmdError::UnmappedInterrupt,
    );
}

#[test]
fn the_event_cap_bounds_the_state() {
    let mut r = Rig::with_cap(3);
    r.w64(GITS_CBASER, CBASER_VALID | QUEUE);
    r.w32(GITS_CTLR, CTLR_ENABLED);
    r.linux_setup();
    r.phys.take();
    let cmds: Vec<Command> = (0..5).map(|e| mapti(DEV_A, e, 8192 + e, 0)).collect();
    r.send(&cmds);
    assert_eq!(r.its.mapped_events(), 3);
    assert_eq!(r.phys.live.len(), 3);
    assert_eq!(r.its.stats().error(CmdError::EventCap), 2);
    // Replacing one at the cap is allowed; after a DISCARD there is room again.
    r.send(&[mapti(DEV_A, 0, 9000, 1)]);
    assert_eq!(r.its.translation(DEV_A, 0).map(|t| t.0), Some(9000));
    r.send(&[
        Discard {
            device: DEV_A,
            event: 1,
        },
        mapti(DEV_A, 4, 8196, 0),
    ]);
    assert_eq!(r.its.mapped_events(), 3);
    assert_eq!(r.its.stats().error(CmdError::EventCap), 2);
    // A full queue of MAPTIs (2048 commands, wrapping) keeps to the cap.
    r.w32(GITS_CTLR, 0);
    r.w64(GITS_CBASER, CBASER_VALID | QUEUE | 15);
    r.w64(GITS_CWRITER, 0);
    r.w32(GITS_CTLR, CTLR_ENABLED);
    r.send(&[mapd(DEV_B, 15)]);
    let cmds: Vec<Command> = (0..2047).map(|e| mapti(DEV_B, e, 8192, 0)).collect();
    r.send_in(0x1_0000, &cmds);
    r.send_in(0x1_0000, &cmds);
    r.assert_caught_up();
    assert_eq!(r.its.mapped_events(), 3);
    assert_eq!(r.phys.live.len(), 3);
    assert_eq!(r.its.stats().error(CmdError::EventCap), 2 + 2 * 2047);
}

#[test]
fn reset_unmaps_everything_physically() {
    let mut r = Rig::new();
    r.linux_setup();
    r.send(&[
        mapd(DEV_B, 1),
        mapti(DEV_A, 0, 8192, 0),
        mapti(DEV_A, 1, 8193, 1),
        mapti(DEV_B, 1, 8194, 2),
    ]);
    r.phys.take();
    r.its.reset(&mut r.phys);
    let ops = r.phys.take();
    assert_eq!(ops.len(), 5, "{ops:?}");
    assert!(r.phys.live.is_empty());
    assert!(r.phys.devices.is_empty());
    assert_eq!(r.its.mapped_events(), 0);
    assert_eq!(r.its.mapped_devices(), 0);
    assert_eq!(r.its.physical_lpis().count(), 0);
    assert_eq!(r.its.collection(0), None);
    assert_eq!(r.its.virtual_of(FIRST_PLPI), None);
    assert_eq!(r.its.stats(), Stats::default());
    // Registers at reset.
    assert_eq!(r.r32(GITS_CTLR), CTLR_QUIESCENT);
    assert_eq!(r.r64(GITS_CBASER), 0);
    assert_eq!(r.r64(GITS_CWRITER), 0);
    assert_eq!(r.r64(GITS_CREADR), 0);
    assert_eq!(r.r64(GITS_BASER), BASER_RESET[0]);
    // Reset twice: nothing more.
    r.its.reset(&mut r.phys);
    assert_eq!(r.phys.take(), []);
}
