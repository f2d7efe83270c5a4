//! ITS commands as the driver issues them (IHI 0069H 5.3). The encoding is the vITS model's
//! ([`crate::devices::vits::Command`]): one field layout, decoded for guests' queues and encoded
//! here for the physical one, so the two cannot drift apart.

pub use crate::devices::vits::{Command, CMD_SIZE};

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
