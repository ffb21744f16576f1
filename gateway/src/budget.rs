//! Query budgets: how many different questions one caller may ask one
//! partner for one project in a time window, where the partner releases
//! only de-identified records or counts.
//!
//! Differencing attacks on released data — bisecting ranges, subtracting
//! overlapping cohorts, averaging noise over many rephrasings — need many
//! *different* questions. A budget bounds them. Only distinct questions
//! are charged: repeating a query or paging through its answer reveals
//! nothing new (the answers are deterministic), so it costs nothing.
//! A partner whose budget is spent answers `BUDGET_EXHAUSTED` (audited with
//! the query) until the caller's window ends; the window starts with the
//! first question charged to it.
//!
//! Budgets are held by each gateway process: replicas count separately and
//! a restart starts every window afresh.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshgate_schema::Caller;
use serde::Deserialize;

use crate::audit::rfc3339;

/// A partner's `budget`: distinct questions per caller and project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// Distinct questions per window; 0 turns budgets off for the partner.
    pub questions: u32,
    /// The window's length in hours.
    pub window_hours: u32,
}

impl Default for BudgetConfig {
    /// 250 different questions a day: several cohort explorations' worth
    /// (paging and repeats are free), and about an eighth of what bisecting
    /// the dates of one partner's 300 studies took.
    fn default() -> Self {
        BudgetConfig {
            questions: 250,
            window_hours: 24,
        }
    }
}

impl BudgetConfig {
    fn window(self) -> Duration {
        Duration::from_secs(u64::from(self.window_hours) * 3600)
    }
}

/// Whose budget: the caller, project and partner.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BudgetKey {
    caller: Caller,
    project: String,
    partner: String,
}

#[derive(Debug)]
struct Window {
    started: SystemTime,
    ends: SystemTime,
    /// Fingerprints of the distinct questions charged.
    questions: HashSet<String>,
    limit: u32,
}

/// The budget was spent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "you have asked this partner {limit} different questions for this project within {window_hours} hours, its budget; it answers again from {renews}"
)]
pub struct Exhausted {
    pub limit: u32,
    pub window_hours: u32,
    /// RFC 3339, UTC.
    pub renews: String,
}

impl Exhausted {
    /// The stable code of a partner status past its budget.
    pub const CODE: &'static str = "QUERY_BUDGET_EXHAUSTED";
}

/// One caller's use of one partner's query budget, for governance.
#[derive(async_graphql::SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct QueryBudgetUse {
    pub issuer: String,
    pub subject: String,
    pub project: String,
    pub partner: String,
    /// Distinct questions asked in this window.
    pub used: u32,
    pub limit: u32,
    /// RFC 3339 (UTC).
    pub window_started: String,
    pub window_ends: String,
}

/// Every caller's budgets in this process.
#[derive(Debug, Clone, Default)]
pub struct QueryBudgets {
    windows: Arc<Mutex<HashMap<BudgetKey, Window>>>,
}

/// Windows kept before expired ones are swept out.
const SWEEP_AT: usize = 4096;

impl QueryBudgets {
    /// Charges `question` (a fingerprint of the normalised query) to the
    /// caller's budget at `partner`: free if already asked in this window.
    pub fn charge(
        &self,
        config: BudgetConfig,
        caller: &Caller,
        project: &str,
        partner: &str,
        question: &str,
    ) -> Result<(), Exhausted> {
        if config.questions == 0 {
            return Ok(());
        }
        let now = SystemTime::now();
        let mut windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if windows.len() >= SWEEP_AT {
            windows.retain(|_, window| window.ends > now);
        }
        let key = BudgetKey {
            caller: caller.clone(),
            project: project.to_owned(),
            partner: partner.to_owned(),
        };
        let window = windows.entry(key).or_insert_with(|| Window {
            started: now,
            ends: now + config.window(),
            questions: HashSet::new(),
            limit: config.questions,
        });
        if window.ends <= now {
            *window = Window {
                started: now,
                ends: now + config.window(),
                questions: HashSet::new(),
                limit: config.questions,
            };
        }
        window.limit = config.questions;
        if window.questions.contains(question) {
            return Ok(());
        }
        if window.questions.len() >= config.questions as usize {
            return Err(Exhausted {
                limit: config.questions,
                window_hours: config.window_hours,
                renews: rfc3339(window.ends.into()),
            });
        }
        window.questions.insert(question.to_owned());
        Ok(())
    }

    /// Budgets in use at or above `fraction` of their limit, fullest first.
    pub fn in_use(&self, fraction: f64) -> Vec<QueryBudgetUse> {
        let now = SystemTime::now();
        let windows = self
            .windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut uses: Vec<(&BudgetKey, &Window)> = windows
            .iter()
            .filter(|(_, w)| w.ends > now)
            .filter(|(_, w)| w.questions.len() as f64 >= fraction * f64::from(w.limit))
            .collect();
        // Fullest first: used / limit, compared without division.
        uses.sort_by(|(a_key, a), (b_key, b)| {
            (b.questions.len() as u64 * u64::from(a.limit))
                .cmp(&(a.questions.len() as u64 * u64::from(b.limit)))
                .then_with(|| (&a_key.caller, &a_key.partner).cmp(&(&b_key.caller, &b_key.partner)))
        });
        uses.into_iter()
            .map(|(key, w)| QueryBudgetUse {
                issuer: key.caller.issuer.clone(),
                subject: key.caller.subject.clone(),
                project: key.project.clone(),
                partner: key.partner.clone(),
                used: u32::try_from(w.questions.len()).unwrap_or(u32::MAX),
                limit: w.limit,
                window_started: rfc3339(w.started.into()),
                window_ends: rfc3339(w.ends.into()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(subject: &str) -> Caller {
        Caller {
            issuer: "https://issuer".into(),
            subject: subject.into(),
        }
    }

    fn small() -> BudgetConfig {
        BudgetConfig {
            questions: 3,
            window_hours: 1,
        }
    }

    #[test]
    fn distinct_questions_are_charged_until_the_budget_is_spent_and_repeats_are_free() {
        let budgets = QueryBudgets::default();
        let charge = |subject: &str, partner: &str, question: &str| {
            budgets.charge(small(), &caller(subject), "p1", partner, question)
        };
        for question in ["a", "b", "c", "a", "b", "c"] {
            assert_eq!(charge("alice", "north", question), Ok(()));
        }
        let spent = charge("alice", "north", "d").unwrap_err();
        assert_eq!(spent.limit, 3);
        assert_eq!(charge("alice", "north", "a"), Ok(()), "asked before: free");
        assert_eq!(charge("alice", "south", "d"), Ok(()), "each partner apart");
        assert_eq!(charge("bob", "north", "d"), Ok(()), "each caller apart");
        assert!(
            budgets
                .charge(small(), &caller("alice"), "p2", "north", "d")
                .is_ok(),
            "each project apart"
        );
        let off = BudgetConfig {
            questions: 0,
            ..small()
        };
        assert!(
            budgets
                .charge(off, &caller("alice"), "p1", "north", "z")
                .is_ok()
        );
    }

    #[test]
    fn governance_sees_the_budgets_nearest_their_limit_first() {
        let budgets = QueryBudgets::default();
        for question in ["a", "b", "c"] {
            budgets
                .charge(small(), &caller("alice"), "p1", "north", question)
                .unwrap_or_default();
        }
        budgets
            .charge(small(), &caller("bob"), "p1", "north", "a")
            .unwrap_or_default();
        let near = budgets.in_use(0.5);
        assert_eq!(near.len(), 1);
        assert_eq!((near[0].subject.as_str(), near[0].used), ("alice", 3));
        assert_eq!(budgets.in_use(0.0).len(), 2);
    }
}
