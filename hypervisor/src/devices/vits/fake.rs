//! A recording physical ITS for host tests and the vITS fuzz harness: it hands out physical
//! LPIs from 0x10000 up (never the guest's range, so a vINTID passed off as a pLPI shows),
//! records every call, and panics, naming the rule, on any call that breaks the port's
//! contract: a DeviceID the VM does not own, a device used before it is mapped or unmapped with
//! events left, an event mapped twice, a pLPI it did not hand out or already got back.

use super::{PhysEvent, PhysItsError, PhysicalIts};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

/// The first physical LPI it hands out.
pub const FIRST_PLPI: u32 = 0x1_0000;

/// One recorded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhysOp {
    MapDevice { device: u32, events: u32 },
    UnmapDevice(u32),
    MapEvent { ev: PhysEvent, vcpu: usize },
    UnmapEvent(PhysEvent),
    MoveEvent(PhysEvent, usize),
    Invalidate(PhysEvent, u32),
    Raise(PhysEvent),
    Clear(PhysEvent),
    MoveAll(usize, usize),
    Sync(usize),
}

/// The fake.
#[derive(Debug, Default)]
pub struct RecordingIts {
    owned: BTreeSet<u32>,
    /// Every call, in order.
    pub ops: Vec<PhysOp>,
    /// Mapped devices and their number of EventIDs.
    pub devices: BTreeMap<u32, u32>,
    /// pLPIs handed out and not yet given back, with their event and routing.
    pub live: BTreeMap<u32, (u32, u32, usize)>,
    /// Every pLPI ever handed out.
    pub handed: BTreeSet<u32>,
    /// The guest LPI each pLPI was asked for with (the last time it was handed out).
    pub vintids: BTreeMap<u32, u32>,
    next: u32,
    /// When set, `map_device` and `map_event` refuse.
    pub fail: bool,
    /// When set, `map_event` refuses once this many pLPIs are live.
    pub lpi_limit: Option<usize>,
}

impl RecordingIts {
    /// A physical ITS whose VM owns `owned`.
    pub fn new(owned: &[u32]) -> Self {
        Self {
            owned: owned.iter().copied().collect(),
            next: FIRST_PLPI,
            ..Self::default()
        }
    }

    /// The calls so far, forgotten.
    pub fn take(&mut self) -> Vec<PhysOp> {
        core::mem::take(&mut self.ops)
    }

    fn check_owned(&self, device: u32, call: &str) {
        assert!(
            self.owned.contains(&device),
            "(b) owned DeviceIDs only: {call} for DeviceID {device:#x}"
        );
    }

    /// The event is mapped, with this pLPI.
    fn check_live(&self, ev: PhysEvent, call: &str) {
        self.check_owned(ev.device, call);
        match self.live.get(&ev.plpi) {
            Some(&(d, e, _)) if (d, e) == (ev.device, ev.event) => {}
            _ => panic!("(c) pLPIs: {call} of {ev:?}, which is not live"),
        }
    }
}

impl PhysicalIts for RecordingIts {
    fn map_device(&mut self, device: u32, events: u32) -> Result<(), PhysItsError> {
        self.check_owned(device, "map_device");
        assert!(events.is_power_of_two(), "map_device with {events} events");
        assert!(
            !self.devices.contains_key(&device),
            "map_device of mapped DeviceID {device:#x}"
        );
        self.ops.push(PhysOp::MapDevice { device, events });
        if self.fail {
            return Err(PhysItsError);
        }
        self.devices.insert(device, events);
        Ok(())
    }

    fn unmap_device(&mut self, device: u32) {
        self.check_owned(device, "unmap_device");
        assert!(
            self.devices.remove(&device).is_some(),
            "unmap_device of unmapped DeviceID {device:#x}"
        );
        assert!(
            self.live.values().all(|&(d, _, _)| d != device),
            "unmap_device of DeviceID {device:#x} with events still mapped"
        );
        self.ops.push(PhysOp::UnmapDevice(device));
    }

    fn map_event(
        &mut self,
        device: u32,
        event: u32,
        vcpu: usize,
        vintid: u32,
    ) -> Result<u32, PhysItsError> {
        self.check_owned(device, "map_event");
        let events = *self
            .devices
            .get(&device)
            .unwrap_or_else(|| panic!("map_event on unmapped DeviceID {device:#x}"));
        assert!(event < events, "map_event of EventID {event} of {events}");
        assert!(
            self.live
                .values()
                .all(|&(d, e, _)| (d, e) != (device, event)),
            "map_event of ({device:#x}, {event}) mapped already"
        );
        let full = self.lpi_limit.is_some_and(|l| self.live.len() >= l);
        if self.fail || full {
            return Err(PhysItsError);
        }
        let plpi = self.next;
        self.next += 1;
        self.live.insert(plpi, (device, event, vcpu));
        self.handed.insert(plpi);
        self.vintids.insert(plpi, vintid);
        self.ops.push(PhysOp::MapEvent {
            ev: PhysEvent {
                device,
                event,
                plpi,
            },
            vcpu,
        });
        Ok(plpi)
    }

    fn unmap_event(&mut self, ev: PhysEvent) {
        self.check_live(ev, "unmap_event");
        self.live.remove(&ev.plpi);
        self.ops.push(PhysOp::UnmapEvent(ev));
    }

    fn move_event(&mut self, ev: PhysEvent, vcpu: usize) {
        self.check_live(ev, "move_event");
        if let Some(l) = self.live.get_mut(&ev.plpi) {
            l.2 = vcpu;
        }
        self.ops.push(PhysOp::MoveEvent(ev, vcpu));
    }

    fn invalidate(&mut self, ev: PhysEvent, vintid: u32) {
        self.check_live(ev, "invalidate");
        self.ops.push(PhysOp::Invalidate(ev, vintid));
    }

    fn raise(&mut self, ev: PhysEvent) {
        self.check_live(ev, "raise");
        self.ops.push(PhysOp::Raise(ev));
    }

    fn clear(&mut self, ev: PhysEvent, _vintid: u32, _vcpu: usize) {
        self.check_live(ev, "clear");
        self.ops.push(PhysOp::Clear(ev));
    }

    fn move_all(&mut self, from: usize, to: usize) {
        self.ops.push(PhysOp::MoveAll(from, to));
    }

    fn sync(&mut self, vcpu: usize) {
        self.ops.push(PhysOp::Sync(vcpu));
    }
}
