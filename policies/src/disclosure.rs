//! Count disclosure control: small counts are never disclosed, and the
//! counts that are cannot be differenced back into small ones exactly.
//!
//! A partner's count below its threshold is reported as suppressed — never
//! as the number, and not as zero either, so "none" and "a few" look the
//! same. Totals add up only what was disclosed and say when they are a
//! lower bound, so subtracting the other partners from a total gives back
//! nothing that was suppressed.
//!
//! Counts a partner discloses *instead of* records (COUNTS_ONLY) are also
//! perturbed by the cell-key method, and whether they are suppressed is
//! decided on the perturbed value, so the suppressed/shown bit says nothing
//! exact about the true count. They are perturbed (as the Australian Bureau of
//! Statistics' TableBuilder does): every study gets a secret key, a set of
//! studies the sum of its studies' keys, and the noise added to the count
//! (up to ± `perturbation`) is a function of that cell key. The same studies
//! always get the same count, however the query was phrased and however
//! often it is asked, so repetition and averaging learn nothing; two nested
//! cohorts carry independent noise, so subtracting one from the other gives
//! a small count only approximately. Optional rounding comes last.

use serde::Serialize;

/// The threshold when a partner configures none.
pub const DEFAULT_MIN_COUNT: u32 = 10;

/// The largest noise added to a counts-only count when a partner
/// configures none.
pub const DEFAULT_PERTURBATION: u32 = 2;

/// One partner's disclosure rule for counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountControl {
    /// Counts below this are suppressed (0 disables; 1 still hides a zero).
    pub min_count: u32,
    /// Disclosed counts are rounded to the nearest multiple of this; 1 (or
    /// 0) disables rounding.
    pub round_to: u32,
    /// Disclosed counts move by up to this much, by cell key; 0 disables.
    pub perturbation: u32,
}

impl Default for CountControl {
    fn default() -> Self {
        CountControl {
            min_count: DEFAULT_MIN_COUNT,
            round_to: 1,
            perturbation: DEFAULT_PERTURBATION,
        }
    }
}

/// What may be said about a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DisclosedCount {
    Exact(u32),
    /// Perturbed and/or rounded.
    Approximate(u32),
    Suppressed,
}

impl DisclosedCount {
    /// The number that may be shown, if any.
    pub fn value(self) -> Option<u32> {
        match self {
            DisclosedCount::Exact(n) | DisclosedCount::Approximate(n) => Some(n),
            DisclosedCount::Suppressed => None,
        }
    }

    pub fn is_suppressed(self) -> bool {
        self == DisclosedCount::Suppressed
    }
}

impl CountControl {
    /// No control: for a partner's own staff reading identified records.
    pub const NONE: CountControl = CountControl {
        min_count: 0,
        round_to: 1,
        perturbation: 0,
    };

    /// The threshold alone: for a partner that releases the records, which
    /// show their number anyway.
    pub fn threshold_only(self) -> CountControl {
        CountControl {
            min_count: self.min_count,
            ..CountControl::NONE
        }
    }

    /// What may be said about `count` studies whose cell key is `cell`.
    ///
    /// Suppression is decided on the perturbed value, never on the true
    /// count: otherwise whether a count is suppressed would answer "is the
    /// true count at least `min_count`" exactly, and bisecting on that one
    /// bit recovers small cells. So a true count a little below the
    /// threshold may be shown (at the threshold or above) and one a little
    /// above it may be suppressed, by the same cell key every time.
    pub fn disclose(self, count: u32, cell: CellKey) -> DisclosedCount {
        if self.perturbation == 0 && self.round_to <= 1 {
            return if count < self.min_count {
                DisclosedCount::Suppressed
            } else {
                DisclosedCount::Exact(count)
            };
        }
        let mut value = i64::from(count);
        if self.perturbation > 0 {
            let span = 2 * u64::from(self.perturbation) + 1;
            let offset = i64::try_from(cell.0 % span).unwrap_or_default();
            value += offset - i64::from(self.perturbation);
        }
        let mut value = u32::try_from(value.max(0)).unwrap_or(u32::MAX);
        if self.round_to > 1 {
            let step = self.round_to;
            let down = value - value % step;
            value = if value % step >= step.div_ceil(2) {
                down.saturating_add(step)
            } else {
                down
            };
        }
        if value < self.min_count {
            DisclosedCount::Suppressed
        } else {
            DisclosedCount::Approximate(value)
        }
    }
}

/// The cell key of a set of studies: the wrapping sum of its studies'
/// keys, so it depends on which studies are counted and on nothing else.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CellKey(u64);

/// Gives studies their secret keys. Derived from the gateway's master key;
/// never printed.
#[derive(Clone)]
pub struct CellKeys([u8; 32]);

impl std::fmt::Debug for CellKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CellKeys(<redacted>)")
    }
}

impl CellKeys {
    pub(crate) fn new(secret: [u8; 32]) -> CellKeys {
        CellKeys(secret)
    }

    /// The cell key of these studies (by Study Instance UID) at `partner`.
    pub fn cell<'a>(&self, partner: &str, uids: impl IntoIterator<Item = &'a str>) -> CellKey {
        CellKey(uids.into_iter().fold(0_u64, |sum, uid| {
            let mac =
                crate::deid::hmac(&self.0, &[b"cell key", partner.as_bytes(), uid.as_bytes()]);
            let mut bytes = [0_u8; 8];
            bytes.copy_from_slice(&mac[..8]);
            sum.wrapping_add(u64::from_be_bytes(bytes))
        }))
    }
}

/// A total over partners' disclosed counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Total {
    /// The sum of the disclosed counts.
    pub value: u32,
    /// True when some count was suppressed: the true total may be larger.
    pub lower_bound: bool,
    /// True when some count was perturbed or rounded.
    pub approximate: bool,
}

impl Total {
    pub fn add(&mut self, count: DisclosedCount) {
        match count {
            DisclosedCount::Exact(n) => self.value = self.value.saturating_add(n),
            DisclosedCount::Approximate(n) => {
                self.value = self.value.saturating_add(n);
                self.approximate = true;
            }
            DisclosedCount::Suppressed => self.lower_bound = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> CellKeys {
        CellKeys::new([3; 32])
    }

    fn exact(min_count: u32) -> CountControl {
        CountControl {
            min_count,
            round_to: 1,
            perturbation: 0,
        }
    }

    #[test]
    fn counts_below_the_threshold_less_the_noise_are_always_suppressed_including_zero() {
        // 0 to 7: even the largest noise (+2) keeps them below 10.
        for count in 0..8 {
            assert_eq!(
                CountControl::default().disclose(count, CellKey(count.into())),
                DisclosedCount::Suppressed
            );
        }
        assert_eq!(
            exact(10).disclose(10, CellKey(0)),
            DisclosedCount::Exact(10)
        );
    }

    #[test]
    fn rounding_goes_to_the_nearest_step_and_suppression_is_decided_after_it() {
        let control = CountControl {
            round_to: 5,
            ..exact(10)
        };
        assert_eq!(
            control.disclose(12, CellKey(0)),
            DisclosedCount::Approximate(10)
        );
        assert_eq!(
            control.disclose(13, CellKey(0)),
            DisclosedCount::Approximate(15)
        );
        let coarse = CountControl {
            round_to: 10,
            ..exact(11)
        };
        assert_eq!(coarse.disclose(14, CellKey(0)), DisclosedCount::Suppressed);
        assert_eq!(
            coarse.disclose(16, CellKey(0)),
            DisclosedCount::Approximate(20)
        );
    }

    #[test]
    fn whether_a_count_near_the_threshold_is_suppressed_is_not_a_function_of_the_true_count() {
        // Over many cells of each true size near the threshold, both answers
        // occur: "suppressed" does not mean "fewer than 10", nor a shown
        // value "at least 10".
        let keys = keys();
        let control = CountControl::default();
        for n in 8..=11_u32 {
            let (mut shown, mut suppressed) = (0, 0);
            for cell in 0..200 {
                let uids: Vec<String> = (0..n).map(|i| format!("{cell}.{i}")).collect();
                match control.disclose(n, keys.cell("south", uids.iter().map(String::as_str))) {
                    DisclosedCount::Suppressed => suppressed += 1,
                    DisclosedCount::Approximate(value) => {
                        assert!(value >= 10 && value.abs_diff(n) <= 2);
                        shown += 1;
                    }
                    DisclosedCount::Exact(_) => panic!("perturbed counts are never exact"),
                }
            }
            assert!(
                shown > 20 && suppressed > 20,
                "{n}: {shown} shown, {suppressed} suppressed"
            );
        }
    }

    #[test]
    fn perturbation_depends_only_on_the_set_of_studies_and_stays_within_its_bound() {
        let keys = keys();
        let control = CountControl::default();
        let a = keys.cell("north", ["1", "2", "3"]);
        assert_eq!(
            a,
            keys.cell("north", ["3", "1", "2"]),
            "order does not matter"
        );
        assert_ne!(a, keys.cell("north", ["1", "2", "4"]));
        let mut moved = 0;
        for n in 12..200_u32 {
            let uids: Vec<String> = (0..n).map(|i| i.to_string()).collect();
            let cell = keys.cell("north", uids.iter().map(String::as_str));
            let DisclosedCount::Approximate(value) = control.disclose(n, cell) else {
                panic!("perturbed counts are approximate");
            };
            assert!(value.abs_diff(n) <= 2 && value >= 10, "{n} -> {value}");
            moved += usize::from(value != n);
            assert_eq!(
                control.disclose(n, cell),
                DisclosedCount::Approximate(value)
            );
        }
        assert!(moved > 100, "only {moved} of 188 counts moved");
    }

    #[test]
    fn a_total_with_a_suppressed_partner_is_a_lower_bound_that_subtracts_to_nothing() {
        let mut total = Total::default();
        for count in [40, 3, 25] {
            total.add(exact(10).disclose(count, CellKey(0)));
        }
        assert_eq!(total.value, 65);
        assert!(total.lower_bound && !total.approximate);
        assert_eq!(
            total.value - 40 - 25,
            0,
            "total minus the others reveals nothing"
        );
    }

    #[test]
    fn cell_keys_never_print() {
        assert_eq!(format!("{:?}", keys()), "CellKeys(<redacted>)");
    }
}
