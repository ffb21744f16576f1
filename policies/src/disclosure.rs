//! Count disclosure control: small counts are never disclosed.
//!
//! A partner's count below its threshold is reported as suppressed — never
//! as the number, and not as zero either, so "none" and "a few" look the
//! same. Counts at or above it may be rounded. Totals add up only what was
//! disclosed and say when they are a lower bound, so subtracting the other
//! partners from a total gives back nothing that was suppressed; the rule is
//! a pure function of the true count, so repeating a query gives the same
//! answer and averaging repeats learns nothing.

use serde::Serialize;

/// The threshold when a partner configures none.
pub const DEFAULT_MIN_COUNT: u32 = 10;

/// One partner's disclosure rule for counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CountControl {
    /// Counts below this are suppressed. 0 or 1 suppresses only nothing /
    /// nothing at all respectively: 1 still hides a zero.
    pub min_count: u32,
    /// Disclosed counts are rounded to the nearest multiple of this; 1 (or
    /// 0) disables rounding.
    pub round_to: u32,
}

impl Default for CountControl {
    fn default() -> Self {
        CountControl {
            min_count: DEFAULT_MIN_COUNT,
            round_to: 1,
        }
    }
}

/// What may be said about a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DisclosedCount {
    Exact(u32),
    Rounded(u32),
    Suppressed,
}

impl DisclosedCount {
    /// The number that may be shown, if any.
    pub fn value(self) -> Option<u32> {
        match self {
            DisclosedCount::Exact(n) | DisclosedCount::Rounded(n) => Some(n),
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
    };

    pub fn disclose(self, count: u32) -> DisclosedCount {
        if count < self.min_count {
            return DisclosedCount::Suppressed;
        }
        if self.round_to <= 1 {
            return DisclosedCount::Exact(count);
        }
        let step = self.round_to;
        let down = count - count % step;
        let nearest = if count % step >= step.div_ceil(2) {
            down.saturating_add(step)
        } else {
            down
        };
        // Rounding never turns a disclosed count into one that looks
        // suppressed, nor a suppressed-sized one into a disclosed one.
        DisclosedCount::Rounded(nearest.max(self.min_count))
    }
}

/// A total over partners' disclosed counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Total {
    /// The sum of the disclosed counts.
    pub value: u32,
    /// True when some count was suppressed (or rounded): the true total may
    /// be larger.
    pub lower_bound: bool,
}

impl Total {
    pub fn add(&mut self, count: DisclosedCount) {
        match count {
            DisclosedCount::Exact(n) => self.value = self.value.saturating_add(n),
            DisclosedCount::Rounded(n) => {
                self.value = self.value.saturating_add(n);
                self.lower_bound = true;
            }
            DisclosedCount::Suppressed => self.lower_bound = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_below_the_threshold_are_suppressed_including_zero() {
        let control = CountControl::default();
        for count in 0..10 {
            assert_eq!(control.disclose(count), DisclosedCount::Suppressed);
        }
        assert_eq!(control.disclose(10), DisclosedCount::Exact(10));
    }

    #[test]
    fn rounding_goes_to_the_nearest_step_and_never_below_the_threshold() {
        let control = CountControl {
            min_count: 10,
            round_to: 5,
        };
        assert_eq!(control.disclose(12), DisclosedCount::Rounded(10));
        assert_eq!(control.disclose(13), DisclosedCount::Rounded(15));
        let coarse = CountControl {
            min_count: 11,
            round_to: 10,
        };
        assert_eq!(coarse.disclose(14), DisclosedCount::Rounded(11));
    }

    #[test]
    fn a_total_with_a_suppressed_partner_is_a_lower_bound_that_subtracts_to_nothing() {
        let control = CountControl::default();
        let mut total = Total::default();
        for count in [40, 3, 25] {
            total.add(control.disclose(count));
        }
        assert_eq!(total.value, 65);
        assert!(total.lower_bound);
        assert_eq!(
            total.value - 40 - 25,
            0,
            "total minus the others reveals nothing"
        );
    }
}
