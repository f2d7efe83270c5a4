//! Glue between a VM and its emulated SMMUv3 (`smmu::vsmmu`): where the guest sees it, the
//! trapped register accesses, and the model's wired interrupts. The model reaches the guest's
//! tables and queues through the VM's RAM ([`crate::hw::GuestRam`] implements
//! `smmu::vsmmu::GuestMemory`) and the physical SMMU through `arch`'s implementation of
//! `smmu::vsmmu::PhysicalSmmu`, with no adapter in between.

use super::IrqPort;
use crate::hw::IntId;
use crate::platform::{MemRange, SmmuInfo};
use crate::profile::{Laps, Stage, Timed};
use alloc::string::String;
use alloc::vec::Vec;
use smmu::driver::EventFate;
use smmu::event::Event;
use smmu::vsmmu::{
    reg_name, Budget, Forward, GuestMemory, Irqs, PhysicalSmmu, StreamMap, Vsmmu, VsmmuConfig,
    MAX_ROUNDS, REG_SLOTS,
};
use spin::Mutex;

/// What a vSMMU needs to know of the physical SMMU it forwards to.
#[derive(Debug, Clone, Copy)]
pub struct PhysFacts {
    /// SMMU_IDR0.S1P and S2P: stage 1 can be nested over stage 2.
    pub nesting: bool,
    /// SMMU_IDR0.STALL_MODEL = 0b10: stalls forced.
    pub stalls_forced: bool,
    /// SMMU_IDR5 (granules and OAS the guest may be offered).
    pub idr5: u32,
    /// SMMU_IDR3.RIL: range invalidation.
    pub ril: bool,
}

/// Why a VM gets no vSMMU (its devices then run on stage 2 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NoVsmmu {
    /// The SMMU cannot nest stage 1 over stage 2.
    #[error("the SMMU cannot nest stage 1 over stage 2")]
    NoNesting,
    /// With stalls forced a CD with S = 0 is ILLEGAL (IHI 0070 5.4), and a guest's CDs have
    /// S = 0 (its vSMMU says there are no stalls, STALL_MODEL = 0b01).
    #[error("the SMMU forces stalls, which a guest's stage 1 cannot use")]
    StallsForced,
    /// Every SPI of the VM's vGIC is taken: the vSMMU's two lines have nowhere to go.
    #[error("no two SPIs of the VM's vGIC are free for its interrupts")]
    NoSpi,
}

/// A VM's emulated SMMUv3: where the guest sees it and the model behind it.
#[derive(Debug)]
pub struct VmSmmu {
    /// The driver instance of the physical SMMU it sits on (`arch::iommu`'s unit index).
    pub unit: usize,
    /// The physical SMMU's phandle: the host bridge `iommu-map` entries naming it name this
    /// vSMMU in the guest's.
    pub host_phandle: Option<u32>,
    /// Register pages 0 and 1 (guest IPA; never mapped, every access traps).
    pub regs: MemRange,
    /// INTID of its event queue interrupt (an edge SPI).
    pub eventq_intid: u32,
    /// INTID of its global error interrupt (an edge SPI).
    pub gerror_intid: u32,
    /// The register and queue model.
    pub model: Mutex<Vsmmu>,
}

/// Output address size of the guest's stage 1: the smallest SMMU OAS encoding that covers the
/// VM's IPA space (39 bits -> 40). Addresses above the IPA space fault at stage 2.
const GUEST_OAS_BITS: u8 = 40;
/// StreamID bits the guest sees: any PCI Requester ID, as on the physical SMMU.
const GUEST_SID_BITS: u8 = 16;

/// The vSMMU's two interrupts (eventq, gerror): the physical SMMU's numbers where the DT wires
/// it two distinct GIC lines the VM's vGIC has (`spi_end`: one past its last SPI) and nothing
/// in `used` (the VM's other lines) has them, so the guest's DT reads like the host's; else
/// (MSIs, mbigen lines, one combined line, SPIs beyond the vGIC's, a clash) the highest pair of
/// free SPIs. They are virtual either way: the vSMMU raises them itself. `None` when no two
/// SPIs are free.
pub fn pick_intids(info: &SmmuInfo, spi_end: u32, used: &[u32]) -> Option<(u32, u32)> {
    let free = |i: u32| (32..spi_end).contains(&i) && !used.contains(&i);
    if let (Some(e), Some(g)) = (info.eventq_intid, info.gerror_intid) {
        if e != g && free(e) && free(g) {
            return Some((e, g));
        }
    }
    let mut spare = (32..spi_end).rev().filter(|&i| free(i));
    let gerror = spare.next()?;
    let eventq = spare.next()?;
    Some((eventq, gerror))
}

impl VmSmmu {
    /// A vSMMU for VM `vm` owning `stream_ids` of physical SMMU `unit` (the guest sees them
    /// under the same numbers, its `iommu-map` repeating the host's), at the physical SMMU's
    /// address, forwarding to stage-2 configuration `s2`, raising `intids` (eventq, gerror;
    /// see [`pick_intids`]).
    pub fn new(
        vm: &str,
        unit: usize,
        info: &SmmuInfo,
        phys: &PhysFacts,
        stream_ids: &[u32],
        s2: smmu::ste::S2Config,
        intids: (u32, u32),
    ) -> Result<Self, NoVsmmu> {
        let (eventq_intid, gerror_intid) = intids;
        if !phys.nesting {
            return Err(NoVsmmu::NoNesting);
        }
        if phys.stalls_forced {
            return Err(NoVsmmu::StallsForced);
        }
        let cfg = VsmmuConfig {
            name: String::from(vm),
            streams: stream_ids
                .iter()
                .map(|&sid| StreamMap {
                    vsid: sid,
                    psid: sid,
                })
                .collect(),
            s2,
            sid_bits: GUEST_SID_BITS,
            oas_bits: GUEST_OAS_BITS,
            phys_idr5: phys.idr5,
            phys_ril: phys.ril,
            budget: Budget::default(),
        };
        Ok(Self {
            unit,
            host_phandle: info.phandle,
            regs: MemRange {
                base: info.regs.base,
                size: smmu::regs::MMIO_SIZE,
            },
            eventq_intid,
            gerror_intid,
            model: Mutex::new(Vsmmu::new(cfg)),
        })
    }

    /// A trapped read at `off` from the register base.
    pub fn read(&self, off: u64, size: u8) -> u64 {
        self.model.lock().read(off, size)
    }

    /// A trapped write at `off`. A write that forwarded commands is finished without the
    /// model's lock: the physical queue is published and waited for (and a budget waited out)
    /// while the VM's other vCPUs can trap on their own vSMMU accesses; round after round, at
    /// most `MAX_ROUNDS`. Its interrupts are raised through `irq` at the end. Returns whether
    /// the write completed within `MAX_ROUNDS` (if not, a model bug, the rest is left to the
    /// VM's next trap). The trap's stopwatch (`crate::profile`) that comes with `phys` is told
    /// the stages: the model's work, the waits, the completion, and inside them the physical
    /// submissions and waits.
    pub fn write<P: PhysicalSmmu, L: Laps>(
        &self,
        off: u64,
        size: u8,
        value: u64,
        mut ram: impl GuestMemory,
        phys: &mut Timed<'_, P, L>,
        irq: &impl IrqPort,
    ) -> bool {
        let laps = phys.laps;
        laps.enter(Stage::Model);
        let mut o = self
            .model
            .lock()
            .write_start(off, size, value, &mut ram, phys);
        let mut irqs = o.irqs;
        for _ in 0..MAX_ROUNDS {
            if !o.pending() {
                break;
            }
            laps.enter(Stage::Wait);
            let waited = o.wait(&*phys);
            laps.enter(Stage::Complete);
            o = self.model.lock().complete(o, waited, &mut ram, phys);
            irqs |= o.irqs;
        }
        laps.enter(Stage::Complete);
        let done = !o.pending();
        o.publish(&*phys);
        self.raise(irqs, irq);
        done
    }

    /// Makes the model's wired interrupts pending.
    pub fn raise(&self, irqs: Irqs, irq: &impl IrqPort) {
        for (flag, intid) in [
            (Irqs::EVENTQ, self.eventq_intid),
            (Irqs::GERROR, self.gerror_intid),
        ] {
            if irqs.contains(flag) {
                irq.raise(IntId(intid));
            }
        }
    }

    /// Hands a physical event of one of the VM's streams to the model: what the guest's stage 1
    /// caused goes into its event queue (and raises its interrupt).
    pub fn forward_event(
        &self,
        e: &Event,
        fate: EventFate,
        mut ram: impl GuestMemory,
        irq: &impl IrqPort,
    ) -> Forward {
        let (fwd, irqs) = self.model.lock().forward_event(e, fate, &mut ram);
        self.raise(irqs, irq);
        fwd
    }

    /// The model's counters as two log lines: a summary, then the registers it trapped on.
    pub fn stats_lines(&self, vm: &str) -> [String; 2] {
        let st = *self.model.lock().stats();
        let prod = smmu::vsmmu::reg_index(smmu::regs::SMMU_CMDQ_PROD);
        let cons = smmu::vsmmu::reg_index(smmu::regs::SMMU_CMDQ_CONS);
        let summary = alloc::format!(
            "vsmmu: {vm} stats: traps={} cmdq_prod={} cmdq_cons={} reg_reads={} reg_writes={} commands={} syncs={} phys_commands={} phys_syncs={} ste_writes={} guest_events={} dropped_events={} s2_faults={} command_errors={} tlbi_merged={} syncs_merged={} budget_waits={} order_waits={} gbpa_deferred={} ste_skipped={} ste_breaks={} evt_quarantined={} evt_suppressed={} phys_sync_errors={}",
            st.traps(),
            st.writes[prod],
            st.reads[cons],
            st.reg_reads(),
            st.reg_writes(),
            st.commands,
            st.syncs,
            st.phys_commands,
            st.phys_syncs,
            st.ste_writes,
            st.guest_events,
            st.dropped_events,
            st.s2_faults,
            st.command_errors,
            st.tlbi_merged,
            st.syncs_merged,
            st.budget_waits,
            st.order_waits,
            st.gbpa_deferred,
            st.ste_skipped,
            st.ste_breaks,
            st.evt_quarantined,
            st.evt_suppressed,
            st.phys_sync_errors
        );
        let mut by_reg: Vec<String> = Vec::new();
        for slot in 0..REG_SLOTS {
            let (r, w) = (st.reads[slot], st.writes[slot]);
            if r + w > 0 {
                let off = (slot / 64) as u64 * smmu::regs::PAGE1 + (slot % 64) as u64 * 4;
                by_reg.push(alloc::format!("{}@{off:#x} r{r}/w{w}", reg_name(slot)));
            }
        }
        [
            summary,
            alloc::format!("vsmmu: {vm} traps by register: {}", by_reg.join(", ")),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    fn info(eventq: Option<u32>, gerror: Option<u32>) -> SmmuInfo {
        SmmuInfo {
            path: "/smmuv3@9050000".to_string(),
            phandle: Some(1),
            regs: MemRange {
                base: 0x905_0000,
                size: 0x2_0000,
            },
            eventq_intid: eventq,
            gerror_intid: gerror,
            coherent: true,
            polled: None,
            refused: None,
        }
    }

    #[test]
    fn interrupts_mirror_the_host_where_they_can() {
        let end = 32 + 128;
        // Two distinct lines the vGIC has: the guest's DT reads like the host's.
        assert_eq!(
            pick_intids(&info(Some(106), Some(109)), end, &[33]),
            Some((106, 109))
        );
        // Polled (MSIs, mbigen lines), one combined line, or lines beyond the vGIC's SPIs: the
        // vGIC's last two SPIs, so the guest's driver still gets its two interrupts.
        assert_eq!(pick_intids(&info(None, None), end, &[]), Some((158, 159)));
        assert_eq!(
            pick_intids(&info(Some(260), Some(260)), end, &[]),
            Some((158, 159))
        );
        assert_eq!(
            pick_intids(&info(Some(401), Some(403)), end, &[]),
            Some((158, 159))
        );
        // A second vSMMU of the VM: the lines the first one took (or an INTx line) are not
        // reused, whether the host's numbers clash or the spare ones do.
        assert_eq!(
            pick_intids(&info(Some(106), Some(109)), end, &[109]),
            Some((158, 159))
        );
        assert_eq!(
            pick_intids(&info(None, None), end, &[158, 159, 157]),
            Some((155, 156))
        );
        assert_eq!(pick_intids(&info(None, None), 34, &[33]), None);
    }

    #[test]
    fn a_vsmmu_names_its_unit_and_the_host_phandle() {
        let phys = PhysFacts {
            nesting: true,
            stalls_forced: false,
            idr5: 0,
            ril: false,
        };
        let s2 = crate::stage2::smmu_s2_config(44, 1, 0x1000);
        let v = VmSmmu::new("vm0", 2, &info(None, None), &phys, &[8], s2, (150, 151)).unwrap();
        assert_eq!((v.unit, v.host_phandle), (2, Some(1)));
        assert_eq!((v.eventq_intid, v.gerror_intid), (150, 151));
        let no_nest = PhysFacts {
            nesting: false,
            ..phys
        };
        assert_eq!(
            VmSmmu::new("vm0", 0, &info(None, None), &no_nest, &[8], s2, (150, 151)).unwrap_err(),
            NoVsmmu::NoNesting
        );
    }
}
