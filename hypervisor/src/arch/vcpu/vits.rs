//! The VM's virtual ITS on the machine: its trapped control frame, the port its command model
//! drives the physical ITS through, and a physical LPI taken at EL2 turned into the guest's.
//!
//! The port has two paths, chosen per VM when it is created (`VmIts::is_direct`): physical
//! LPIs taken at EL2 and injected through list registers, or GICv4.0 direct injection, where
//! each guest event is a vLPI of its target vCPU's vPE (VMAPTI) and the guest's LPI
//! configuration is copied into the VM's own vLPI property table at MAPTI and INV/INVALL.

use crate::arch::hw::Machine;
use crate::arch::{hv, its, this_cpu, uart};
use crate::devices::vits::{PhysEvent, PhysItsError, PhysicalIts};
use crate::mmio::AccessWidth;
use crate::vm::irq;
use crate::vm::Vm;

/// A guest access to its vITS's control frame at `off`.
pub(super) fn access(vm: &Vm, off: u64, width: AccessWidth, write: Option<u64>) -> Option<u64> {
    let v = vm.its.as_ref()?;
    let mut model = v.model.lock();
    Some(match write {
        None => model.read(off, width),
        Some(value) => {
            model.write(off, width, value, vm.ram(), &mut Port { vm });
            0
        }
    })
}

/// A VM reset: every physical mapping the VM's guest made undone, the model at reset values.
pub(crate) fn reset(vm: &Vm) {
    if let Some(v) = &vm.its {
        v.reset(&mut Port { vm });
    }
    // Anything the model lost track of (it never should) goes too: the VM's DeviceIDs are
    // its own, nobody else's mappings are touched.
    if let Some(i) = &hv().its.its {
        if let Err(e) = i.lock().unmap_all(vm.id) {
            log::error!("its: {}: reset: {e}", vm.config.name);
        }
    }
}

/// Physical LPI `plpi` (already EOId) for VM `owner`: pending in the vCPU the guest's
/// translation targets, which is woken if it is not the one running here. `false` if the VM
/// holds no translation for it (its ITS disabled, a collection unmapped: the interrupt is
/// dropped, as the architecture drops one to an unmapped collection).
pub(super) fn deliver(owner: usize, plpi: u32, running: Option<(&Vm, usize)>) -> bool {
    let Some(vm) = hv().vms.get(owner) else {
        return false;
    };
    let Some((vintid, vcpu)) = vm.its.as_ref().and_then(|v| v.virtual_of(plpi)) else {
        return false;
    };
    vm.vgic.lock().set_lpi_pending(vcpu, vintid);
    let here = running.filter(|(r, _)| r.id == vm.id).map(|(_, c)| c);
    if here != Some(vcpu) {
        irq::kick(vm, vcpu, &Machine);
    }
    true
}

/// The physical ITS as one VM's model sees it: its DeviceIDs, its vCPUs' physical CPUs.
struct Port<'a> {
    vm: &'a Vm,
}

impl Port<'_> {
    fn with<T>(
        &self,
        what: &str,
        f: impl FnOnce(&mut its::PhysIts) -> Result<T, crate::its::ItsError>,
    ) -> Result<T, PhysItsError> {
        let Some(i) = &hv().its.its else {
            return Err(PhysItsError);
        };
        f(&mut i.lock()).map_err(|e| {
            // A guest can make these fail (more events than LPIs remain): its own log budget.
            let old = uart::set_log_vm(Some(self.vm.id));
            log::warn!("its: {}: {what}: {e}", self.vm.config.name);
            uart::set_log_vm(old);
            PhysItsError
        })
    }

    /// The physical CPU vCPU `vcpu` is pinned to (the model only names vCPUs it has).
    fn cpu(&self, vcpu: usize) -> usize {
        self.vm.vcpus.get(vcpu).map_or(this_cpu(), |v| v.pcpu)
    }

    /// The guest's configuration byte of `vintid` re-read into the vGIC from its property
    /// table (GICR_PROPBASER of a vCPU that enabled LPIs, the last such vCPU's where they
    /// differ; Linux gives them all one table), and returned.
    fn refresh_guest_config(&self, vintid: u32) -> u8 {
        let mut vgic = self.vm.vgic.lock();
        for vcpu in 0..self.vm.vcpus.len() {
            vgic.lpi_config_refresh(self.vm.ram(), vcpu, vintid);
        }
        vgic.lpi_config(vintid)
    }

    /// GICv4.0 direct injection: events are mapped to the vCPUs' vPEs (chosen at creation).
    fn direct(&self) -> bool {
        self.vm.its.as_ref().is_some_and(|i| i.is_direct())
    }

    /// The guest's configuration byte of `vintid` (from its property table, re-read now)
    /// copied into the VM's vLPI property table, and the redistributor told (INV).
    fn copy_vlpi_config(&self, ev: PhysEvent, vintid: u32) {
        let config = self.refresh_guest_config(vintid);
        let id = self.vm.id;
        let _ = self.with("INV", |i| {
            i.set_vlpi_config(id, ev.device, ev.event, vintid, config)
        });
    }
}

impl PhysicalIts for Port<'_> {
    fn map_device(&mut self, device: u32, events: u32) -> Result<(), PhysItsError> {
        let id = self.vm.id;
        self.with("MAPD", |i| i.map_device(id, device, events))
    }

    fn unmap_device(&mut self, device: u32) {
        let id = self.vm.id;
        let _ = self.with("MAPD V=0", |i| i.unmap_device(id, device));
    }

    fn map_event(
        &mut self,
        device: u32,
        event: u32,
        vcpu: usize,
        vintid: u32,
    ) -> Result<u32, PhysItsError> {
        let (id, cpu) = (self.vm.id, self.cpu(vcpu));
        if !self.direct() {
            return self.with("MAPTI", |i| i.map_event(id, device, event, cpu));
        }
        // VMAPTI to the vCPU's vPE, then the vLPI's configuration as the guest has it now
        // (as KVM's its_map_vlpi): a guest that configured the LPI before its MAPTI gets no
        // further INV.
        let handle = self.with("VMAPTI", |i| i.map_vevent(id, device, event, vcpu, vintid))?;
        self.copy_vlpi_config(
            PhysEvent {
                device,
                event,
                plpi: handle,
            },
            vintid,
        );
        Ok(handle)
    }

    fn unmap_event(&mut self, ev: PhysEvent) {
        let id = self.vm.id;
        let _ = self.with("DISCARD", |i| i.unmap_event(id, ev.device, ev.event));
    }

    fn move_event(&mut self, ev: PhysEvent, vcpu: usize) {
        let (id, cpu) = (self.vm.id, self.cpu(vcpu));
        if self.direct() {
            let _ = self.with("VMOVI", |i| i.move_vevent(id, ev.device, ev.event, vcpu));
            return;
        }
        let _ = self.with("MOVI", |i| i.move_event(id, ev.device, ev.event, cpu));
    }

    fn invalidate(&mut self, ev: PhysEvent, vintid: u32) {
        if self.direct() {
            // The vLPI's enable and priority are the redistributor's, from the VM's vLPI
            // property table (never the guest's memory): the guest's byte is copied there.
            self.copy_vlpi_config(ev, vintid);
            return;
        }
        // The LPI's enable and priority live in the vGIC, read from the guest's property
        // table. The physical LPI stays enabled: one that fires while the guest has it
        // disabled stays pending in the vGIC, as a disabled LPI stays pending in a
        // redistributor.
        self.refresh_guest_config(vintid);
    }

    fn raise(&mut self, ev: PhysEvent) {
        let id = self.vm.id;
        let _ = self.with("INT", |i| i.raise(id, ev.device, ev.event));
    }

    fn clear(&mut self, ev: PhysEvent, vintid: u32, vcpu: usize) {
        let id = self.vm.id;
        let _ = self.with("CLEAR", |i| i.clear(id, ev.device, ev.event));
        // One taken at EL2 already is pending in the vGIC: cleared there too.
        self.vm.vgic.lock().clear_lpi_pending(vcpu, vintid);
    }

    fn move_all(&mut self, from: usize, to: usize) {
        // With direct injection pending vLPIs sit in the vPEs' vPTs, which GICv4.0 gives no
        // command to move between vPEs; MOVALL then moves nothing (Linux never issues it).
        self.vm.vgic.lock().move_lpis(from, to);
    }

    fn sync(&mut self, _vcpu: usize) {
        // Every physical command the port issues is followed by its own SYNC (the driver's),
        // and delivery to the vGIC is synchronous: nothing is left to make visible.
    }
}
