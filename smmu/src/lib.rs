//! SMMUv3 (Arm IHI 0070) support for the hypervisor: register and in-memory structure definitions,
//! the physical driver, and the guest-facing vSMMU model. Hardware and guest memory are reached only
//! through small traits so that all of it is testable on the host.
//!
//! - [`regs`]: register offsets (page 0 and page 1) and typed ID/control register values.
//! - [`ste`]: the 64-byte Stream Table Entry.
//! - [`cmd`]: the 16-byte command queue entries.
//! - [`event`]: the 32-byte event queue records.
//! - [`queue`]: the PROD/CONS index arithmetic shared by all SMMU queues.
//! - [`driver`]: the physical SMMU driver over [`driver::SmmuRegs`] and [`driver::DmaMemory`].
//! - [`budget`]: the token bucket behind the budgets of what VMs share.
//!
//! - [`vsmmu`]: the guest-facing stage-1 SMMUv3 model, nested over the VM's stage 2.
#![no_std]
#![forbid(unsafe_code)]
// Field positions are written as the spec does, `[hi:lo]`, which rustdoc would take for links.
#![allow(rustdoc::broken_intra_doc_links)]

extern crate alloc;

mod bits;
pub mod budget;
pub mod cmd;
pub mod driver;
pub mod event;
pub mod queue;
pub mod regs;
pub mod ste;
mod sync;
pub mod vsmmu;
