//! The node of the VM's emulated SMMUv3.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use vm_fdt::FdtWriter;

use super::{GuestDtError, GuestSmmu, EDGE_RISING, GIC_SPI};

/// The vSMMU node, as QEMU `virt` writes its SMMUv3 (`create_smmu` in `hw/arm/virt.c`).
pub(super) fn smmu_node(
    w: &mut FdtWriter,
    smmu: &GuestSmmu,
    phandle: u32,
) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("smmuv3@{:x}", smmu.regs.base))?;
    w.property_string("compatible", "arm,smmu-v3")?;
    w.property_array_u64("reg", &[smmu.regs.base, smmu.regs.size])?;
    // Edge rising, as in the binding's example and on QEMU `virt`. The binding fixes the
    // name order ("eventq" before "gerror"); the driver looks lines up by name
    // (`platform_get_irq_byname_optional`).
    w.property_array_u32(
        "interrupts",
        &[
            GIC_SPI,
            smmu.eventq_intid - 32,
            EDGE_RISING,
            GIC_SPI,
            smmu.gerror_intid - 32,
            EDGE_RISING,
        ],
    )?;
    w.property_string_list(
        "interrupt-names",
        vec![String::from("eventq"), String::from("gerror")],
    )?;
    // The vSMMU reads the guest's tables and queues through the CPU's coherent view of RAM,
    // so the driver need not clean caches for them: it takes ARM_SMMU_FEAT_COHERENCY from
    // this property (IDR0.COHACC disagreeing only earns a warning).
    w.property_null("dma-coherent")?;
    // One cell: the StreamID, the only specifier the binding allows.
    w.property_u32("#iommu-cells", 1)?;
    w.property_phandle(phandle)?;
    w.end_node(node)?;
    Ok(())
}
