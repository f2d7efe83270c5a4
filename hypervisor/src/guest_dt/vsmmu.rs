//! The node of the VM's IOMMU over each physical SMMU: its emulated SMMUv3, or its
//! virtio-iommu.

use alloc::format;
use alloc::string::String;
use alloc::vec;

use vm_fdt::FdtWriter;

use super::{GuestDtError, GuestSmmu, EDGE_RISING, GIC_SPI};

/// The vSMMU node, as QEMU `virt` writes its SMMUv3 (`create_smmu` in `hw/arm/virt.c`), or
/// the virtio-iommu's.
pub(super) fn smmu_node(
    w: &mut FdtWriter,
    smmu: &GuestSmmu,
    phandle: u32,
) -> Result<(), GuestDtError> {
    if smmu.kind == crate::config::IommuKind::VirtioIommu {
        return virtio_iommu_node(w, smmu, phandle);
    }
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

/// The virtio-iommu's node: a `virtio,mmio` transport (Linux
/// `Documentation/devicetree/bindings/virtio/mmio.yaml`, as QEMU `virt` writes its
/// virtio-mmio slots) that is also an IOMMU (`#iommu-cells = <1>`: the endpoint ID, which is
/// the StreamID, the binding's `virtio,mmio` IOMMU example).
fn virtio_iommu_node(
    w: &mut FdtWriter,
    smmu: &GuestSmmu,
    phandle: u32,
) -> Result<(), GuestDtError> {
    let node = w.begin_node(&format!("virtio_mmio@{:x}", smmu.regs.base))?;
    w.property_string("compatible", "virtio,mmio")?;
    w.property_array_u64("reg", &[smmu.regs.base, smmu.regs.size])?;
    // Edge: the device raises it once per used-buffer or configuration notification; the
    // driver's handler reads and acknowledges InterruptStatus either way.
    w.property_array_u32(
        "interrupts",
        &[GIC_SPI, smmu.eventq_intid - 32, EDGE_RISING],
    )?;
    // The device reads and writes the queues through the CPU's coherent view of RAM.
    w.property_null("dma-coherent")?;
    w.property_u32("#iommu-cells", 1)?;
    w.property_phandle(phandle)?;
    w.end_node(node)?;
    Ok(())
}
