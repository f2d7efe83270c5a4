//! Physical memory planning: where a VM's RAM goes, away from everything already in use.

use crate::platform::MemRange;

/// Finds the highest `align`-aligned range of `size` bytes inside one of `ram` that overlaps
/// none of `busy`. Searching from the top keeps low RAM (where loaders put images) free.
pub fn place_top_down(ram: &[MemRange], busy: &[MemRange], size: u64, align: u64) -> Option<u64> {
    if size == 0 || !align.is_power_of_two() {
        return None;
    }
    let mut best: Option<u64> = None;
    for r in ram {
        let mut top = r.end();
        while let Some(start) = top.checked_sub(size).map(|s| s & !(align - 1)) {
            if start < r.base {
                break;
            }
            let end = start + size;
            match busy
                .iter()
                .filter(|b| b.base < end && start < b.end())
                .map(|b| b.base)
                .min()
            {
                None => {
                    best = best.max(Some(start));
                    break;
                }
                // Retry below the lowest conflicting range.
                Some(conflict_base) => top = conflict_base,
            }
        }
    }
    best
}

/// Whether two ranges overlap.
pub fn overlaps(a: MemRange, b: MemRange) -> bool {
    a.base < b.end() && b.base < a.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn r(base: u64, size: u64) -> MemRange {
        MemRange { base, size }
    }

    #[test]
    fn takes_the_top_of_ram_when_free() {
        let ram = [r(GIB, 4 * GIB)];
        assert_eq!(place_top_down(&ram, &[], GIB, 2 * MIB), Some(4 * GIB));
    }

    #[test]
    fn steps_below_busy_ranges() {
        let ram = [r(GIB, 4 * GIB)];
        let busy = [r(5 * GIB - 3 * MIB, MIB), r(GIB, 64 * MIB)];
        let got = place_top_down(&ram, &busy, GIB, 2 * MIB).unwrap();
        assert_eq!(got + GIB, 5 * GIB - 4 * MIB);
        assert!(busy.iter().all(|b| !overlaps(*b, r(got, GIB))));
    }

    #[test]
    fn none_when_nothing_fits() {
        let ram = [r(GIB, GIB)];
        assert_eq!(
            place_top_down(&ram, &[r(GIB + GIB / 2, MIB)], GIB, 2 * MIB),
            None
        );
        assert_eq!(place_top_down(&ram, &[], 2 * GIB, 2 * MIB), None);
        assert_eq!(place_top_down(&ram, &[], 0, 2 * MIB), None);
    }

    #[test]
    fn picks_the_highest_bank() {
        let ram = [r(GIB, GIB), r(8 * GIB, GIB)];
        assert_eq!(
            place_top_down(&ram, &[], 512 * MIB, 2 * MIB),
            Some(8 * GIB + 512 * MIB)
        );
    }
}
