//! The federation executor: asks every permitted partner at once (each
//! through its own path, [`crate::partner`]) and merges what they release
//! in one stable order.
//!
//! One slow or failing partner never fails the query or delays it past that
//! partner's deadline; it gets a status saying what happened instead. A
//! partner its policies refuse is not asked at all. Each partner's answer is
//! put through its disclosure rules before anything is merged: counts under
//! count disclosure control, records only where the policy releases them
//! and de-identified under the profile it chose — so merge order and cursors
//! are built from pseudonymous values only.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::Arc;

use futures::future::join_all;
use meshgate_policies::{CellKeys, Total};
use meshgate_schema::PartnerReport;
use meshgate_schema::{Caller, Study, StudyQuery};
use time::{Date, PrimitiveDateTime, Time};
use tokio::time::Instant;

use crate::budget::QueryBudgets;
use crate::cache::AnswerCache;
use crate::partner::{Asking, FoundStudy, Grant, Partner, PartnerSearch, report, saturating_u32};

/// What the policies decided for one query.
#[derive(Debug, Clone)]
pub struct Grants {
    /// Each asked partner's grant, by partner id. A partner without one is denied.
    pub partners: HashMap<String, Grant>,
    /// For perturbing counts.
    pub cell_keys: CellKeys,
    /// The research project the query serves.
    pub project: String,
    /// Who asks: cached answers and query budgets are the caller's own.
    pub caller: Caller,
}

/// Where a study sits in the merged order: newest first, then partner id,
/// then study UID. Studies without a date come last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    pub started: Option<PrimitiveDateTime>,
    pub partner: String,
    pub uid: String,
}

impl SortKey {
    pub fn of(partner: &str, study: &Study) -> SortKey {
        SortKey::new(partner, study.uid.clone(), study.date, study.time)
    }

    pub fn new(partner: &str, uid: String, date: Option<Date>, time: Option<Time>) -> SortKey {
        SortKey {
            started: date.map(|date| PrimitiveDateTime::new(date, time.unwrap_or(Time::MIDNIGHT))),
            partner: partner.to_owned(),
            uid,
        }
    }
}

impl Ord for SortKey {
    fn cmp(&self, other: &Self) -> Ordering {
        let by_time = match (self.started, other.started) {
            (Some(a), Some(b)) => b.cmp(&a),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => Ordering::Equal,
        };
        by_time
            .then_with(|| self.partner.cmp(&other.partner))
            .then_with(|| self.uid.cmp(&other.uid))
    }
}

impl PartialOrd for SortKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// A page of the merged result.
#[derive(Debug)]
pub struct MergedPage {
    pub studies: Vec<FoundStudy>,
    pub has_next_page: bool,
    /// Studies that can be paged through.
    pub total: u32,
    pub statuses: Vec<PartnerReport>,
}

/// All partners, in configuration order, and their cached answers.
#[derive(Debug, Clone)]
pub struct Federation {
    partners: Vec<Arc<Partner>>,
    cache: AnswerCache,
    budgets: QueryBudgets,
}

impl Federation {
    /// The federation of `partners`, with the answer cache and the query
    /// budgets it shares with the snapshots before and after it (a reload
    /// neither empties the cache of unchanged partners nor resets budgets).
    pub fn new(
        partners: Vec<Arc<Partner>>,
        cache: AnswerCache,
        budgets: QueryBudgets,
    ) -> Federation {
        Federation {
            partners,
            cache,
            budgets,
        }
    }

    /// Every caller's query budgets.
    pub fn budgets(&self) -> &QueryBudgets {
        &self.budgets
    }

    /// The partners' cached answers.
    pub fn cache(&self) -> &AnswerCache {
        &self.cache
    }

    pub fn partners(&self) -> &[Arc<Partner>] {
        &self.partners
    }

    /// The partner `id`, if it is one.
    pub fn partner(&self, id: &str) -> Option<&Arc<Partner>> {
        self.partners.iter().find(|p| p.id == id)
    }

    /// The partners a query asks: those it names, or all.
    pub fn asked(&self, query: &StudyQuery) -> Vec<Arc<Partner>> {
        self.partners
            .iter()
            .filter(|p| query.partners.is_empty() || query.partners.contains(&p.id))
            .cloned()
            .collect()
    }

    /// Searches every asked partner its grant lets be asked, concurrently,
    /// each under its deadline.
    async fn search(&self, query: &StudyQuery, grants: &Grants) -> Vec<PartnerSearch> {
        let started = Instant::now();
        // The question as every partner gets it; paging and repeats are free.
        let question = StudyQuery {
            partners: Default::default(),
            ..query.clone()
        }
        .fingerprint();
        let asking = Asking {
            started,
            question: &question,
            caller: &grants.caller,
            project: &grants.project,
            cell_keys: &grants.cell_keys,
            cache: &self.cache,
            budgets: &self.budgets,
        };
        join_all(self.asked(query).into_iter().map(|partner| {
            let grant = grants
                .partners
                .get(&partner.id)
                .cloned()
                .unwrap_or_else(|| Grant::denied("no policy decision was made"));
            partner.answer(query, grant, &asking)
        }))
        .await
    }

    /// How many studies match, per partner, as they may be disclosed.
    pub async fn count(&self, query: &StudyQuery, grants: &Grants) -> (Total, Vec<PartnerReport>) {
        let searches = self.search(query, grants).await;
        let mut total = Total::default();
        for count in searches.iter().filter_map(PartnerSearch::disclosed) {
            total.add(count);
        }
        (total, searches.iter().map(report).collect())
    }

    /// The `first` studies after `after` in the merged order, from the
    /// partners that release records; with their series and instances
    /// loaded when `with_series` (the caller selected what needs them).
    pub async fn page(
        &self,
        query: &StudyQuery,
        grants: &Grants,
        first: usize,
        after: Option<&SortKey>,
        with_series: bool,
    ) -> MergedPage {
        let mut searches = self.search(query, grants).await;
        let mut merged: Vec<(SortKey, usize, usize)> = Vec::new();
        let mut total = 0_usize;
        for (partner_index, search) in searches.iter().enumerate() {
            if !search.releases_records() {
                continue;
            }
            let studies = search.studies();
            total += studies.len();
            for (study_index, study) in studies.iter().enumerate() {
                // The order and the cursor see only what leaves the partner.
                let key = search.order_key(study);
                if after.is_none_or(|after| key > *after) {
                    merged.push((key, partner_index, study_index));
                }
            }
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        let has_next_page = merged.len() > first;
        merged.truncate(first);

        // Copy the page's studies out of each partner's (shared) answer, keeping order.
        let mut per_partner: Vec<Vec<(usize, Study)>> = vec![Vec::new(); searches.len()];
        for (position, (_, partner_index, study_index)) in merged.iter().enumerate() {
            if let Some(study) = searches
                .get(*partner_index)
                .and_then(|s| s.studies().get(*study_index))
                && let Some(bucket) = per_partner.get_mut(*partner_index)
            {
                bucket.push((position, study.clone()));
            }
        }

        // Load series for the page, partner by partner, concurrently; series
        // cached under the same decision are reused.
        // Each partner releases its studies on the page (series loaded,
        // de-identified), concurrently; they take their places in the order.
        let released = join_all(
            searches
                .iter_mut()
                .zip(per_partner)
                .map(|(search, bucket)| {
                    search.details(
                        bucket,
                        with_series,
                        &self.cache,
                        &grants.caller,
                        &grants.project,
                    )
                }),
        )
        .await;
        let mut slots: Vec<Option<FoundStudy>> = vec![None; merged.len()];
        for (position, found) in released.into_iter().flatten() {
            if let Some(slot) = slots.get_mut(position) {
                *slot = Some(found);
            }
        }
        MergedPage {
            studies: slots.into_iter().flatten().collect(),
            has_next_page,
            total: saturating_u32(total),
            statuses: searches.iter().map(report).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, time};

    fn key(date: Option<time::Date>, partner: &str, uid: &str) -> SortKey {
        SortKey {
            started: date.map(|d| PrimitiveDateTime::new(d, time!(10:00))),
            partner: partner.into(),
            uid: uid.into(),
        }
    }

    #[test]
    fn merged_order_is_newest_first_then_partner_then_uid_with_undated_last() {
        let mut keys = vec![
            key(None, "a", "1"),
            key(Some(date!(2019 - 01 - 01)), "b", "2"),
            key(Some(date!(2020 - 01 - 01)), "b", "1"),
            key(Some(date!(2019 - 01 - 01)), "a", "3"),
            key(Some(date!(2019 - 01 - 01)), "a", "2"),
        ];
        keys.sort();
        let order: Vec<(String, String)> = keys.into_iter().map(|k| (k.partner, k.uid)).collect();
        assert_eq!(
            order,
            [("b", "1"), ("a", "2"), ("a", "3"), ("b", "2"), ("a", "1")]
                .map(|(p, u)| (p.to_owned(), u.to_owned()))
        );
    }
}
