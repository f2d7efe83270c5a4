//! Typed MMIO register blocks of the physical devices the hypervisor drives itself (PL011 console,
//! GICv3 distributor and redistributors). Each block is a `tock-registers` struct whose size is
//! checked by `register_structs!`; the only unsafe is turning a DT-given base into a reference.

use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};

register_structs! {
    /// PL011 UART (Arm DDI 0183).
    pub Pl011Regs {
        (0x000 => pub uartdr: ReadWrite<u32>),
        (0x004 => _reserved0),
        (0x018 => pub uartfr: ReadOnly<u32>),
        (0x01c => _reserved1),
        (0x030 => pub uartcr: ReadWrite<u32>),
        (0x034 => pub uartifls: ReadWrite<u32>),
        (0x038 => pub uartimsc: ReadWrite<u32>),
        (0x03c => pub uartris: ReadOnly<u32>),
        (0x040 => pub uartmis: ReadOnly<u32>),
        (0x044 => pub uarticr: WriteOnly<u32>),
        (0x048 => @END),
    }
}

register_structs! {
    /// GICv3 distributor (IHI 0069, 12.9).
    pub GicdRegs {
        (0x0000 => pub ctlr: ReadWrite<u32>),
        (0x0004 => pub typer: ReadOnly<u32>),
        (0x0008 => pub iidr: ReadOnly<u32>),
        (0x000c => _reserved0),
        (0x0080 => pub igroupr: [ReadWrite<u32>; 32]),
        (0x0100 => pub isenabler: [ReadWrite<u32>; 32]),
        (0x0180 => pub icenabler: [ReadWrite<u32>; 32]),
        (0x0200 => pub ispendr: [ReadWrite<u32>; 32]),
        (0x0280 => pub icpendr: [ReadWrite<u32>; 32]),
        (0x0300 => pub isactiver: [ReadWrite<u32>; 32]),
        (0x0380 => pub icactiver: [ReadWrite<u32>; 32]),
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 255]),
        (0x07fc => _reserved1),
        (0x0c00 => pub icfgr: [ReadWrite<u32>; 64]),
        (0x0d00 => _reserved2),
        (0x6100 => pub irouter: [ReadWrite<u64>; 988]),
        (0x7fe0 => _reserved3),
        (0x10000 => @END),
    }
}

register_structs! {
    /// GICv3 redistributor, RD_base frame (IHI 0069, 12.10).
    pub GicrRdRegs {
        (0x0000 => pub ctlr: ReadWrite<u32>),
        (0x0004 => pub iidr: ReadOnly<u32>),
        (0x0008 => pub typer: ReadOnly<u64>),
        (0x0010 => pub statusr: ReadWrite<u32>),
        (0x0014 => pub waker: ReadWrite<u32>),
        (0x0018 => _reserved0),
        (0x0070 => pub propbaser: ReadWrite<u64>),
        (0x0078 => pub pendbaser: ReadWrite<u64>),
        (0x0080 => _reserved1),
        (0x10000 => @END),
    }
}

register_structs! {
    /// GICv3 redistributor, SGI_base frame (IHI 0069, 12.10).
    pub GicrSgiRegs {
        (0x0000 => _reserved0),
        (0x0080 => pub igroupr0: ReadWrite<u32>),
        (0x0084 => _reserved1),
        (0x0100 => pub isenabler0: ReadWrite<u32>),
        (0x0104 => _reserved2),
        (0x0180 => pub icenabler0: ReadWrite<u32>),
        (0x0184 => _reserved3),
        (0x0280 => pub icpendr0: ReadWrite<u32>),
        (0x0284 => _reserved4),
        (0x0380 => pub icactiver0: ReadWrite<u32>),
        (0x0384 => _reserved5),
        (0x0400 => pub ipriorityr: [ReadWrite<u32>; 8]),
        (0x0420 => _reserved6),
        (0x0c00 => pub icfgr0: ReadWrite<u32>),
        (0x0c04 => pub icfgr1: ReadWrite<u32>),
        (0x0c08 => _reserved7),
        (0x10000 => @END),
    }
}

/// A device register block at a physical address, shareable between CPUs.
pub struct Mmio<T: 'static>(&'static T);

// SAFETY: register blocks contain only volatile-accessed registers; concurrent accesses from
// several CPUs are what the device (GIC, UART) is built for, and callers serialize where the
// device's programming model requires it.
unsafe impl<T> Sync for Mmio<T> {}
// SAFETY: as above; the reference is to device memory, not to thread-local data.
unsafe impl<T> Send for Mmio<T> {}

impl<T> core::ops::Deref for Mmio<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.0
    }
}

impl<T> core::fmt::Debug for Mmio<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "Mmio({:p})", self.0)
    }
}

/// The register block of type `T` at physical address `base`.
///
/// # Safety
///
/// `base` must be the address of a device of type `T`, mapped as Device memory in the EL2
/// stage-1 tables (or the MMU off) for the rest of the hypervisor's life, and not otherwise
/// aliased as normal memory.
pub unsafe fn block<T>(base: u64) -> Mmio<T> {
    // SAFETY: guaranteed by the caller; register blocks only contain UnsafeCell-based registers.
    Mmio(unsafe { &*(base as usize as *const T) })
}
