//! The ITS commands (IHI 0069H 5.3): their encodings, and what each does to the model and asks
//! of the physical ITS.
//!
//! Every command is 32 bytes, four little-endian doublewords DW0-DW3, with its command number in
//! DW0[7:0] (IHI 0069H 5.3, "ITS command overview"). Fields are decoded per the command's own
//! section of 5.3 (named below); bits the spec leaves RES0 are ignored.
//!
//! Errors: GITS_TYPER.SEIS = 0, so a command error is not reported, and the spec leaves it to
//! the implementation whether the ITS then ignores the command and carries on or stalls the
//! queue (IHI 0069H 5.3, "ITS command errors"). This one ignores the command and carries on, as
//! QEMU's ITS does: a guest's bad command harms nobody and its next commands still run. Each
//! ignored command is counted by kind ([`super::Stats::errors`]). Checks are made in the order of
//! the spec's pseudocode for each command (DeviceID, then the device, then the EventID, then the
//! translation, then the collections).

use super::regs::*;
use super::{CmdError, Device, Ite, PhysEvent, PhysicalIts, Vits};
use crate::hw::{GuestRam, Ipa};

/// Bytes per command.
pub const CMD_SIZE: usize = 32;

/// A decoded command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// MOVI 0x01 (5.3, MOVI): DeviceID DW0[63:32], EventID DW1[31:0], ICID DW2[15:0].
    Movi { device: u32, event: u32, icid: u16 },
    /// INT 0x03 (5.3, INT): DeviceID DW0[63:32], EventID DW1[31:0].
    Int { device: u32, event: u32 },
    /// CLEAR 0x04 (5.3, CLEAR): DeviceID DW0[63:32], EventID DW1[31:0].
    Clear { device: u32, event: u32 },
    /// SYNC 0x05 (5.3, SYNC): RDbase DW2[51:16].
    Sync { rdbase: u64 },
    /// MAPD 0x08 (5.3, MAPD): DeviceID DW0[63:32], Size DW1[4:0] (EventID bits - 1),
    /// ITT_addr DW2[51:8] (so 256-byte aligned by construction), V DW2[63].
    Mapd {
        device: u32,
        size: u8,
        itt: u64,
        valid: bool,
    },
    /// MAPC 0x09 (5.3, MAPC): ICID DW2[15:0], RDbase DW2[51:16], V DW2[63].
    Mapc { icid: u16, rdbase: u64, valid: bool },
    /// MAPTI 0x0A (5.3, MAPTI): DeviceID DW0[63:32], EventID DW1[31:0], pINTID DW1[63:32],
    /// ICID DW2[15:0].
    Mapti {
        device: u32,
        event: u32,
        intid: u32,
        icid: u16,
    },
    /// MAPI 0x0B (5.3, MAPI): DeviceID DW0[63:32], EventID DW1[31:0] (also the pINTID),
    /// ICID DW2[15:0].
    Mapi { device: u32, event: u32, icid: u16 },
    /// INV 0x0C (5.3, INV): DeviceID DW0[63:32], EventID DW1[31:0].
    Inv { device: u32, event: u32 },
    /// INVALL 0x0D (5.3, INVALL): ICID DW2[15:0].
    Invall { icid: u16 },
    /// MOVALL 0x0E (5.3, MOVALL): RDbase1 DW2[51:16], RDbase2 DW3[51:16].
    Movall { rdbase1: u64, rdbase2: u64 },
    /// DISCARD 0x0F (5.3, DISCARD): DeviceID DW0[63:32], EventID DW1[31:0].
    Discard { device: u32, event: u32 },
    /// Any other command number: the GICv4 ones (VMAPP 0x29, VMAPTI 0x2A, VSYNC 0x25, ...) with
    /// GITS_TYPER.Virtual = 0, INVDB and VSGI (GICv4.1), and the unallocated ones.
    Unknown(u8),
}

/// RDbase [51:16]: with GITS_TYPER.PTA = 0, the target's processor number (Linux puts
/// GICR_TYPER.Processor_Number << 16 there, `its_encode_target`).
fn rdbase(dw: u64) -> u64 {
    (dw >> 16) & ((1 << 36) - 1)
}

impl Command {
    /// Decodes one command as the guest wrote it.
    pub fn decode(raw: &[u8; CMD_SIZE]) -> Self {
        let dw = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&raw[i * 8..i * 8 + 8]);
            u64::from_le_bytes(b)
        };
        let (d0, d1, d2, d3) = (dw(0), dw(1), dw(2), dw(3));
        let device = (d0 >> 32) as u32;
        let event = d1 as u32;
        let icid = d2 as u16;
        match d0 as u8 {
            0x01 => Self::Movi {
                device,
                event,
                icid,
            },
            0x03 => Self::Int { device, event },
            0x04 => Self::Clear { device, event },
            0x05 => Self::Sync { rdbase: rdbase(d2) },
            0x08 => Self::Mapd {
                device,
                size: (d1 & 0x1F) as u8,
                itt: d2 & 0x000F_FFFF_FFFF_FF00,
                valid: d2 >> 63 != 0,
            },
            0x09 => Self::Mapc {
                icid,
                rdbase: rdbase(d2),
                valid: d2 >> 63 != 0,
            },
            0x0A => Self::Mapti {
                device,
                event,
                intid: (d1 >> 32) as u32,
                icid,
            },
            0x0B => Self::Mapi {
                device,
                event,
                icid,
            },
            0x0C => Self::Inv { device, event },
            0x0D => Self::Invall { icid },
            0x0E => Self::Movall {
                rdbase1: rdbase(d2),
                rdbase2: rdbase(d3),
            },
            0x0F => Self::Discard { device, event },
            n => Self::Unknown(n),
        }
    }

    /// Encodes it as a guest would (the inverse of [`Command::decode`] on its fields; for tests
    /// and the fuzz harness).
    pub fn encode(&self) -> [u8; CMD_SIZE] {
        let dev = |d: u32| u64::from(d) << 32;
        let rd = |r: u64| (r & ((1 << 36) - 1)) << 16;
        let v = |b: bool| u64::from(b) << 63;
        let (d0, d1, d2, d3) = match *self {
            Self::Movi {
                device,
                event,
                icid,
            } => (0x01 | dev(device), u64::from(event), u64::from(icid), 0),
            Self::Int { device, event } => (0x03 | dev(device), u64::from(event), 0, 0),
            Self::Clear { device, event } => (0x04 | dev(device), u64::from(event), 0, 0),
            Self::Sync { rdbase } => (0x05, 0, rd(rdbase), 0),
            Self::Mapd {
                device,
                size,
                itt,
                valid,
            } => (
                0x08 | dev(device),
                u64::from(size & 0x1F),
                (itt & 0x000F_FFFF_FFFF_FF00) | v(valid),
                0,
            ),
            Self::Mapc {
                icid,
                rdbase,
                valid,
            } => (0x09, 0, u64::from(icid) | rd(rdbase) | v(valid), 0),
            Self::Mapti {
                device,
                event,
                intid,
                icid,
            } => (
                0x0A | dev(device),
                u64::from(event) | u64::from(intid) << 32,
                u64::from(icid),
                0,
            ),
            Self::Mapi {
                device,
                event,
                icid,
            } => (0x0B | dev(device), u64::from(event), u64::from(icid), 0),
            Self::Inv { device, event } => (0x0C | dev(device), u64::from(event), 0, 0),
            Self::Invall { icid } => (0x0D, 0, u64::from(icid), 0),
            Self::Movall { rdbase1, rdbase2 } => (0x0E, 0, rd(rdbase1), rd(rdbase2)),
            Self::Discard { device, event } => (0x0F | dev(device), u64::from(event), 0, 0),
            Self::Unknown(n) => (u64::from(n), 0, 0, 0),
        };
        let mut out = [0u8; CMD_SIZE];
        for (i, d) in [d0, d1, d2, d3].into_iter().enumerate() {
            out[i * 8..i * 8 + 8].copy_from_slice(&d.to_le_bytes());
        }
        out
    }
}

impl Vits {
    /// Carries out one command, or says why it is ignored (having changed nothing).
    pub(super) fn execute(
        &mut self,
        cmd: Command,
        ram: &dyn GuestRam,
        phys: &mut dyn PhysicalIts,
    ) -> Result<(), CmdError> {
        match cmd {
            Command::Mapd {
                device,
                size,
                itt,
                valid,
            } => self.mapd(device, size, itt, valid, ram, phys),
            Command::Mapc {
                icid,
                rdbase,
                valid,
            } => self.mapc(icid, rdbase, valid, phys),
            Command::Mapti {
                device,
                event,
                intid,
                icid,
            } => self.mapti(device, event, intid, icid, phys),
            // MAPI is MAPTI with pINTID = EventID (5.3, MAPI).
            Command::Mapi {
                device,
                event,
                icid,
            } => self.mapti(device, event, event, icid, phys),
            Command::Movi {
                device,
                event,
                icid,
            } => self.movi(device, event, icid, phys),
            Command::Discard { device, event } => {
                // DISCARD (5.3): the translation, and any pending state at its collection's
                // redistributor, goes; the collection must be mapped.
                self.targeted(device, event)?;
                self.unmap_event(device, event, phys);
                Ok(())
            }
            Command::Int { device, event } => {
                let (ite, _) = self.targeted(device, event)?;
                phys.raise(ev(device, event, &ite));
                Ok(())
            }
            Command::Clear { device, event } => {
                let (ite, vcpu) = self.targeted(device, event)?;
                phys.clear(ev(device, event, &ite), ite.vintid, vcpu);
                Ok(())
            }
            Command::Inv { device, event } => {
                let (ite, _) = self.targeted(device, event)?;
                phys.invalidate(ev(device, event, &ite), ite.vintid);
                Ok(())
            }
            Command::Invall { icid } => {
                // INVALL (5.3): every LPI of the collection rereads its configuration.
                self.mapped_collection(icid)?;
                for (&(device, event), ite) in &self.ites {
                    if ite.icid == icid {
                        phys.invalidate(ev(device, event, ite), ite.vintid);
                    }
                }
                Ok(())
            }
            Command::Sync { rdbase } => {
                let vcpu = self.vcpu(rdbase)?;
                phys.sync(vcpu);
                Ok(())
            }
            Command::Movall { rdbase1, rdbase2 } => {
                let from = self.vcpu(rdbase1)?;
                let to = self.vcpu(rdbase2)?;
                // MOVALL (5.3) moves pending state only; the collections' targets are MAPC's.
                if from != to {
                    phys.move_all(from, to);
                }
                Ok(())
            }
            Command::Unknown(_) => Err(CmdError::UnknownCommand),
        }
    }

    /// A DeviceID the command may name: within Devbits and owned by the VM.
    fn owned(&self, device: u32) -> Result<(), CmdError> {
        if device >= 1 << DEVICE_BITS {
            Err(CmdError::DeviceOor)
        } else if !self.owned.contains(&device) {
            Err(CmdError::ForeignDevice)
        } else {
            Ok(())
        }
    }

    /// The vCPU a target (RDbase with PTA = 0) names.
    fn vcpu(&self, rdbase: u64) -> Result<usize, CmdError> {
        usize::try_from(rdbase)
            .ok()
            .filter(|&v| v < self.vcpus)
            .ok_or(CmdError::ProcnumOor)
    }

    fn icid_in_range(icid: u16) -> Result<(), CmdError> {
        if u32::from(icid) >= 1 << COLLECTION_BITS {
            Err(CmdError::CollectionOor)
        } else {
            Ok(())
        }
    }

    /// The target vCPU of collection `icid`, which must be in range and mapped.
    fn mapped_collection(&self, icid: u16) -> Result<usize, CmdError> {
        Self::icid_in_range(icid)?;
        self.collection(icid).ok_or(CmdError::UnmappedCollection)
    }

    /// The mapped device `device`, after the DeviceID checks.
    fn device(&self, device: u32) -> Result<Device, CmdError> {
        self.owned(device)?;
        self.devices
            .get(&device)
            .copied()
            .ok_or(CmdError::UnmappedDevice)
    }

    /// The translation of (`device`, `event`): the device mapped, the EventID within its
    /// Size, the translation there.
    fn ite(&self, device: u32, event: u32) -> Result<Ite, CmdError> {
        let d = self.device(device)?;
        if u64::from(event) >= 1u64 << d.event_bits {
            return Err(CmdError::IdOor);
        }
        self.ites
            .get(&(device, event))
            .copied()
            .ok_or(CmdError::UnmappedInterrupt)
    }

    /// The translation of (`device`, `event`) and its collection's target vCPU, which must be
    /// mapped: what INT, CLEAR, INV and DISCARD need to reach the interrupt's redistributor.
    fn targeted(&self, device: u32, event: u32) -> Result<(Ite, usize), CmdError> {
        let ite = self.ite(device, event)?;
        let vcpu = self.mapped_collection(ite.icid)?;
        Ok((ite, vcpu))
    }

    /// MAPD (5.3): V = 1 maps the device with 2^(Size+1) EventIDs and its ITT; V = 0 unmaps it
    /// and, with it, every translation it had. A MAPD V = 1 of a device already mapped first
    /// drops its translations (as KVM's vITS: the new ITT holds none of them).
    fn mapd(
        &mut self,
        device: u32,
        size: u8,
        itt: u64,
        valid: bool,
        ram: &dyn GuestRam,
        phys: &mut dyn PhysicalIts,
    ) -> Result<(), CmdError> {
        self.owned(device)?;
        if !valid {
            self.unmap_device(device, phys);
            return Ok(());
        }
        let event_bits = u32::from(size) + 1;
        if event_bits > EVENT_BITS {
            return Err(CmdError::IttSizeOor);
        }
        let len = (1u64 << event_bits) * ITT_ENTRY_SIZE;
        let r = ram.ipa_range();
        if itt < r.base || itt.checked_add(len).is_none_or(|e| e > r.end()) {
            return Err(CmdError::IttOutsideRam);
        }
        self.unmap_device(device, phys);
        phys.map_device(device, 1 << event_bits)
            .map_err(|_| CmdError::Physical)?;
        self.devices.insert(
            device,
            Device {
                event_bits,
                itt: Ipa(itt),
            },
        );
        Ok(())
    }

    /// MAPC (5.3): V = 1 maps (or retargets) the collection to a vCPU, and the physical LPIs
    /// of its events follow; V = 0 unmaps it (its events stay, but are dropped until it is
    /// mapped again).
    fn mapc(
        &mut self,
        icid: u16,
        rdbase: u64,
        valid: bool,
        phys: &mut dyn PhysicalIts,
    ) -> Result<(), CmdError> {
        Self::icid_in_range(icid)?;
        if !valid {
            self.collections[usize::from(icid)] = None;
            return Ok(());
        }
        let vcpu = self.vcpu(rdbase)?;
        self.collections[usize::from(icid)] = Some(vcpu);
        for (&(device, event), ite) in self.ites.iter_mut() {
            if ite.icid == icid && ite.routed != vcpu {
                phys.move_event(ev(device, event, ite), vcpu);
                ite.routed = vcpu;
            }
        }
        Ok(())
    }

    /// MAPTI (5.3): the translation of (DeviceID, EventID) to the guest's LPI `intid` in
    /// collection `icid`, which need not be mapped yet. A translation already there is
    /// replaced (its physical LPI freed first). The physical LPI is routed to the collection's
    /// vCPU, or vCPU 0 while the collection is unmapped (`virtual_of` drops it meanwhile).
    fn mapti(
        &mut self,
        device: u32,
        event: u32,
        intid: u32,
        icid: u16,
        phys: &mut dyn PhysicalIts,
    ) -> Result<(), CmdError> {
        let d = self.device(device)?;
        if u64::from(event) >= 1u64 << d.event_bits {
            return Err(CmdError::IdOor);
        }
        if !(FIRST_LPI..1 << INTID_BITS).contains(&intid) {
            return Err(CmdError::PhysicalIdOor);
        }
        Self::icid_in_range(icid)?;
        let replacing = self.ites.contains_key(&(device, event));
        if !replacing && self.ites.len() >= self.max_events {
            return Err(CmdError::EventCap);
        }
        self.unmap_event(device, event, phys);
        let vcpu = self.collection(icid).unwrap_or(0);
        let plpi = phys
            .map_event(device, event, vcpu, intid)
            .map_err(|_| CmdError::Physical)?;
        self.ites.insert(
            (device, event),
            Ite {
                vintid: intid,
                icid,
                plpi,
                routed: vcpu,
            },
        );
        self.by_plpi.insert(plpi, (device, event));
        Ok(())
    }

    /// MOVI (5.3): the translation moves to collection `icid`; both its collection and the new
    /// one must be mapped.
    fn movi(
        &mut self,
        device: u32,
        event: u32,
        icid: u16,
        phys: &mut dyn PhysicalIts,
    ) -> Result<(), CmdError> {
        let (ite, _) = self.targeted(device, event)?;
        let vcpu = self.mapped_collection(icid)?;
        if ite.routed != vcpu {
            phys.move_event(ev(device, event, &ite), vcpu);
        }
        if let Some(i) = self.ites.get_mut(&(device, event)) {
            i.icid = icid;
            i.routed = vcpu;
        }
        Ok(())
    }
}

fn ev(device: u32, event: u32, ite: &Ite) -> PhysEvent {
    PhysEvent {
        device,
        event,
        plpi: ite.plpi,
    }
}
