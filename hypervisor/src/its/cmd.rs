//! ITS commands as the driver issues them (IHI 0069H 5.3). The encoding is the vITS model's
//! ([`crate::devices::vits::Command`]): one field layout, decoded for guests' queues and encoded
//! here for the physical one, so the two cannot drift apart.

pub use crate::devices::vits::{Command, CMD_SIZE};

/// The INTID that means "no doorbell" in VMAPTI/VMOVI (IHI 0069H 5.3, VMAPTI: Dbell_pINTID
/// 1023): a vLPI for a non-resident vPE then only sets its vPT bit.
pub const NO_DOORBELL: u32 = 1023;

/// The GICv4.0 commands the driver issues (IHI 0069H 5.3, "VMAPP" ... "VSYNC"). Kept apart from
/// [`Command`], which is also the guest-facing decoder: a guest's vITS has GITS_TYPER.Virtual = 0,
/// so for it these command numbers stay `Command::Unknown`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VCommand {
    /// VMAPP 0x29 (5.3, VMAPP): vPEID DW1[47:32], RDbase DW2[51:16], V DW2[63],
    /// VPT_size DW3[4:0] (ID bits - 1), VPT_addr DW3[51:16] (64 KiB aligned).
    Vmapp {
        vpe: u16,
        rdbase: u64,
        vpt: u64,
        vpt_size: u8,
        valid: bool,
    },
    /// VMAPTI 0x2A (5.3, VMAPTI): DeviceID DW0[63:32], EventID DW1[31:0], vPEID DW1[47:32],
    /// vINTID DW2[31:0], Dbell_pINTID DW2[63:32].
    Vmapti {
        device: u32,
        event: u32,
        vpe: u16,
        vintid: u32,
        doorbell: u32,
    },
    /// VMOVI 0x21 (5.3, VMOVI): DeviceID DW0[63:32], EventID DW1[31:0], vPEID DW1[47:32],
    /// D DW2[0] (the doorbell field is valid), Dbell_pINTID DW2[63:32].
    Vmovi {
        device: u32,
        event: u32,
        vpe: u16,
        doorbell: Option<u32>,
    },
    /// VMOVP 0x22 (5.3, VMOVP): SequenceNumber DW0[47:32], ITSList DW1[15:0], vPEID
    /// DW1[47:32], RDbase DW2[51:16]. With GITS_TYPER.VMOVP = 1 (QEMU) sequence and list are
    /// ignored: one command to one ITS moves the vPE everywhere.
    Vmovp { vpe: u16, rdbase: u64 },
    /// VSYNC 0x25 (5.3, VSYNC): vPEID DW1[47:32].
    Vsync { vpe: u16 },
    /// VINVALL 0x2D (5.3, VINVALL): vPEID DW1[47:32].
    Vinvall { vpe: u16 },
}

impl VCommand {
    /// The command numbers, as DW0[7:0].
    pub const NUMBERS: [u8; 6] = [0x29, 0x2A, 0x21, 0x22, 0x25, 0x2D];

    /// Encodes it for the physical command queue.
    pub fn encode(&self) -> [u8; CMD_SIZE] {
        let dev = |d: u32| u64::from(d) << 32;
        let vpe_f = |v: u16| u64::from(v) << 32;
        let rd = |r: u64| (r & ((1 << 36) - 1)) << 16;
        let (d0, d1, d2, d3) = match *self {
            Self::Vmapp {
                vpe,
                rdbase,
                vpt,
                vpt_size,
                valid,
            } => (
                0x29,
                vpe_f(vpe),
                rd(rdbase) | u64::from(valid) << 63,
                (vpt & 0x000F_FFFF_FFFF_0000) | u64::from(vpt_size & 0x1F),
            ),
            Self::Vmapti {
                device,
                event,
                vpe,
                vintid,
                doorbell,
            } => (
                0x2A | dev(device),
                u64::from(event) | vpe_f(vpe),
                u64::from(vintid) | u64::from(doorbell) << 32,
                0,
            ),
            Self::Vmovi {
                device,
                event,
                vpe,
                doorbell,
            } => (
                0x21 | dev(device),
                u64::from(event) | vpe_f(vpe),
                doorbell.map_or(0, |d| 1 | u64::from(d) << 32),
                0,
            ),
            Self::Vmovp { vpe, rdbase } => (0x22, vpe_f(vpe), rd(rdbase), 0),
            Self::Vsync { vpe } => (0x25, vpe_f(vpe), 0, 0),
            Self::Vinvall { vpe } => (0x2D, vpe_f(vpe), 0, 0),
        };
        let mut out = [0u8; CMD_SIZE];
        for (i, d) in [d0, d1, d2, d3].into_iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        out
    }

    /// Decodes one, as the ITS would (for the recording fake and a stalled command's report);
    /// `None` for any other command number.
    pub fn decode(raw: &[u8; CMD_SIZE]) -> Option<Self> {
        let dw = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (d0, d1, d2, d3) = (dw(0), dw(1), dw(2), dw(3));
        let device = (d0 >> 32) as u32;
        let event = d1 as u32;
        let vpe = (d1 >> 32) as u16;
        let rdbase = (d2 >> 16) & ((1 << 36) - 1);
        Some(match d0 as u8 {
            0x29 => Self::Vmapp {
                vpe,
                rdbase,
                vpt: d3 & 0x000F_FFFF_FFFF_0000,
                vpt_size: (d3 & 0x1F) as u8,
                valid: d2 >> 63 != 0,
            },
            0x2A => Self::Vmapti {
                device,
                event,
                vpe,
                vintid: d2 as u32,
                doorbell: (d2 >> 32) as u32,
            },
            0x21 => Self::Vmovi {
                device,
                event,
                vpe,
                doorbell: (d2 & 1 != 0).then_some((d2 >> 32) as u32),
            },
            0x22 => Self::Vmovp { vpe, rdbase },
            0x25 => Self::Vsync { vpe },
            0x2D => Self::Vinvall { vpe },
            _ => return None,
        })
    }
}

/// One command for the physical queue: a GICv3 one or a GICv4.0 one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnyCommand {
    /// GICv3 (physical LPIs, and INV/INT/CLEAR/DISCARD on virtual ITEs too).
    P(Command),
    /// GICv4.0.
    V(VCommand),
}

impl AnyCommand {
    /// Encodes it.
    pub fn encode(&self) -> [u8; CMD_SIZE] {
        match self {
            Self::P(c) => c.encode(),
            Self::V(c) => c.encode(),
        }
    }

    /// Decodes it (a V command number as [`VCommand`], anything else as [`Command`]).
    pub fn decode(raw: &[u8; CMD_SIZE]) -> Self {
        VCommand::decode(raw).map_or_else(|| Self::P(Command::decode(raw)), Self::V)
    }
}

impl From<Command> for AnyCommand {
    fn from(c: Command) -> Self {
        Self::P(c)
    }
}

impl From<VCommand> for AnyCommand {
    fn from(c: VCommand) -> Self {
        Self::V(c)
    }
}

/// MAPD's Size field for a device with `events` EventIDs: EventID bits - 1 (IHI 0069H 5.3.8),
/// with at least two events (one bit) as the field cannot say fewer.
pub fn mapd_size(events: u32) -> u8 {
    let bits = events.max(2).next_power_of_two().trailing_zeros();
    (bits - 1) as u8
}

/// The RDbase field of MAPC/SYNC/MOVALL (IHI 0069H 5.3.9): with GITS_TYPER.PTA = 0 the target's
/// GICR_TYPER.Processor_Number, with PTA = 1 its redistributor's physical address, 64 KiB
/// aligned, in units of 64 KiB ([51:16] of the address).
pub fn rdbase(pta: bool, processor_number: u16, rd_pa: u64) -> u64 {
    if pta {
        rd_pa >> 16
    } else {
        u64::from(processor_number)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_the_driver_issues_round_trips_through_the_decoder() {
        let cmds = [
            Command::Mapd {
                device: 0x1_0008,
                size: 4,
                itt: 0x4123_4500,
                valid: true,
            },
            Command::Mapd {
                device: 7,
                size: 0,
                itt: 0,
                valid: false,
            },
            Command::Mapc {
                icid: 3,
                rdbase: 3,
                valid: true,
            },
            Command::Mapti {
                device: 8,
                event: 2,
                intid: 8200,
                icid: 1,
            },
            Command::Mapi {
                device: 8,
                event: 9000,
                icid: 1,
            },
            Command::Movi {
                device: 8,
                event: 2,
                icid: 0,
            },
            Command::Discard {
                device: 8,
                event: 2,
            },
            Command::Inv {
                device: 8,
                event: 2,
            },
            Command::Invall { icid: 2 },
            Command::Int {
                device: 8,
                event: 2,
            },
            Command::Clear {
                device: 8,
                event: 2,
            },
            Command::Sync { rdbase: 0x808 },
        ];
        for c in cmds {
            assert_eq!(Command::decode(&c.encode()), c, "{c:?}");
        }
        // The spec's bit positions, checked on the raw doublewords (IHI 0069H 5.3.8, MAPD:
        // DeviceID DW0[63:32], Size DW1[4:0], ITT_addr DW2[51:8], V DW2[63]).
        let raw = cmds[0].encode();
        let dw = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap());
        assert_eq!(dw(0), 0x0001_0008_0000_0008);
        assert_eq!(dw(1), 4);
        assert_eq!(dw(2), 0x8000_0000_4123_4500);
    }

    #[test]
    fn v_commands_encode_at_the_spec_bit_positions_and_stay_unknown_to_guests() {
        let cmds = [
            VCommand::Vmapp {
                vpe: 3,
                rdbase: 2,
                vpt: 0x4123_0000,
                vpt_size: 15,
                valid: true,
            },
            VCommand::Vmapti {
                device: 0x18,
                event: 2,
                vpe: 3,
                vintid: 8200,
                doorbell: NO_DOORBELL,
            },
            VCommand::Vmovi {
                device: 0x18,
                event: 2,
                vpe: 4,
                doorbell: None,
            },
            VCommand::Vmovi {
                device: 0x18,
                event: 2,
                vpe: 4,
                doorbell: Some(8300),
            },
            VCommand::Vmovp { vpe: 3, rdbase: 1 },
            VCommand::Vsync { vpe: 3 },
            VCommand::Vinvall { vpe: 3 },
        ];
        for c in cmds {
            let raw = c.encode();
            assert_eq!(VCommand::decode(&raw), Some(c), "{c:?}");
            assert_eq!(AnyCommand::decode(&raw), AnyCommand::V(c));
            // The guest-facing decoder: GITS_TYPER.Virtual = 0, unknown commands.
            assert_eq!(Command::decode(&raw), Command::Unknown(raw[0]), "{c:?}");
        }
        let dw = |raw: &[u8; 32], i: usize| {
            u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap())
        };
        // VMAPP (IHI 0069H 5.3): vPEID DW1[47:32], RDbase DW2[51:16], V DW2[63], VPT_addr
        // DW3[51:16], VPT_size DW3[4:0].
        let r = cmds[0].encode();
        assert_eq!(
            [dw(&r, 0), dw(&r, 1), dw(&r, 2), dw(&r, 3)],
            [0x29, 3 << 32, 1 << 63 | 2 << 16, 0x4123_0000 | 15]
        );
        // VMAPTI: vINTID DW2[31:0], Dbell_pINTID DW2[63:32].
        let r = cmds[1].encode();
        assert_eq!(
            [dw(&r, 0), dw(&r, 1), dw(&r, 2)],
            [0x18 << 32 | 0x2A, 3 << 32 | 2, 1023 << 32 | 8200]
        );
        // VMOVI with a doorbell: D DW2[0].
        let r = cmds[3].encode();
        assert_eq!(dw(&r, 2), 8300 << 32 | 1);
        assert_eq!(dw(&cmds[4].encode(), 2), 1 << 16);
        assert_eq!(dw(&cmds[6].encode(), 0), 0x2D);
        assert_eq!(
            VCommand::decode(&Command::Sync { rdbase: 1 }.encode()),
            None
        );
    }

    #[test]
    fn mapd_size_is_event_bits_minus_one() {
        assert_eq!(mapd_size(0), 0);
        assert_eq!(mapd_size(1), 0);
        assert_eq!(mapd_size(2), 0);
        assert_eq!(mapd_size(3), 1);
        assert_eq!(mapd_size(32), 4);
        assert_eq!(mapd_size(2048), 10);
    }

    #[test]
    fn rdbase_follows_pta() {
        assert_eq!(rdbase(false, 5, 0x080e_0000), 5);
        assert_eq!(rdbase(true, 5, 0x080e_0000), 0x80e);
    }
}
