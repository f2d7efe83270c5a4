//! Self-checking drivers of the hypervisor's guest-facing device models, for fuzzing
//! (`hypervisor/fuzz/`, `cargo fuzz run -s none <target>`) and for deterministic randomised unit
//! tests. See `docs/fuzzing.md`.
//!
//! Each submodule plays a hostile guest against one model and checks, after every step, the
//! invariants that the model's specification and documented contract give it; a violation is a
//! panic whose message names the invariant:
//!
//! - [`vgic`]: the virtual GICv3 distributor and redistributors, with simulated list registers;
//! - [`vpl011`]: the virtual PL011, the console input path into it and the console output mux;
//! - [`vecam`]: the virtual ECAM, over a recording fake configuration space;
//! - [`vits`]: the virtual ITS model, over a recording physical ITS;
//! - [`viommu`]: the virtio-iommu device (virtio-mmio transport, queues, request model), over
//!   a recording physical SMMU;
//! - [`bars`]: the guest's BAR moves against where `vm::bars` maps them in its stage 2;
//! - [`host_dt`]: not a guest's model but the readers of the untrusted host DT, on any blob.
//!
//! Compiled only under `cfg(test)` or the `fuzzing` feature; no `unsafe`.

pub mod bars;
pub mod host_dt;
pub mod vecam;
pub mod vgic;
pub mod viommu;
pub mod vits;
pub mod vpl011;

use crate::mmio::AccessWidth;

/// Operations interpreted from one input at most.
pub const MAX_OPS: usize = 1024;

/// The input, read front to back; past its end every read is 0.
#[derive(Debug)]
pub(crate) struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub(crate) fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub(crate) fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    pub(crate) fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from(self.u16()) | u32::from(self.u16()) << 16
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    /// An index below `n` (0 if `n` is 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            usize::from(self.u8()) % n
        }
    }

    /// An access width as the trap handler delivers them: mostly 32-bit, sometimes 8- or 64-bit,
    /// rarely 16-bit.
    pub(crate) fn width(&mut self) -> AccessWidth {
        match self.u8() & 7 {
            0 => AccessWidth::Byte,
            1 => AccessWidth::Double,
            2 => AccessWidth::Half,
            3 if self.bool() => AccessWidth::Byte,
            _ => AccessWidth::Word,
        }
    }
}

/// xorshift64*: a small deterministic generator for the fixed-seed tests.
#[cfg(test)]
pub(crate) struct Rng(pub(crate) u64);

#[cfg(test)]
impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `n` random bytes with lengths spread over 0..max.
    pub(crate) fn input(&mut self, max: usize) -> alloc::vec::Vec<u8> {
        let len = (self.next() % max as u64) as usize;
        (0..len).map(|_| self.next() as u8).collect()
    }
}
