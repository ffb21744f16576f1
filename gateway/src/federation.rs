//! The federation executor: asks every permitted partner at once, each under
//! its own deadline, and merges what comes back in one stable order.
//!
//! One slow or failing partner never fails the query or delays it past that
//! partner's deadline; it gets a status saying what happened instead.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::ID;
use futures::future::join_all;
use meshgate_connectors::{Connector, ConnectorError, SearchOutcome};
use meshgate_schema::api::{PartnerOutcome, PartnerStatus};
use meshgate_schema::fhir::MappingOptions;
use meshgate_schema::{Study, StudyQuery};
use time::{PrimitiveDateTime, Time};
use tokio::time::{Instant, timeout_at};

/// A partner and the connector that reaches it.
#[derive(Debug)]
pub struct Partner {
    pub id: String,
    pub name: String,
    pub connector: Arc<dyn Connector>,
    pub deadline: Duration,
    pub mapping: MappingOptions,
}

/// Why a partner did not answer.
#[derive(Debug)]
enum Failure {
    Timeout,
    Connector(ConnectorError),
}

/// One partner's answer to the search phase.
#[derive(Debug)]
struct PartnerSearch {
    partner: Arc<Partner>,
    deadline: Instant,
    started: Instant,
    /// Time spent on this partner so far (search, then series for the page).
    elapsed: Duration,
    result: Result<SearchOutcome, Failure>,
    /// Set when the detail phase failed after the search succeeded.
    detail_failure: Option<Failure>,
}

/// A study in the merged result, with where it came from.
#[derive(Debug, Clone)]
pub struct FoundStudy {
    pub partner: Arc<Partner>,
    pub study: Study,
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
        SortKey {
            started: study
                .date
                .map(|date| PrimitiveDateTime::new(date, study.time.unwrap_or(Time::MIDNIGHT))),
            partner: partner.to_owned(),
            uid: study.uid.clone(),
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
    pub total: u32,
    pub statuses: Vec<PartnerStatus>,
}

/// All partners, in configuration order.
#[derive(Debug, Clone, Default)]
pub struct Federation {
    partners: Vec<Arc<Partner>>,
}

impl Federation {
    pub fn new(partners: Vec<Partner>) -> Federation {
        Federation {
            partners: partners.into_iter().map(Arc::new).collect(),
        }
    }

    pub fn partners(&self) -> &[Arc<Partner>] {
        &self.partners
    }

    /// The partners a query asks: those it names, or all.
    fn asked(&self, query: &StudyQuery) -> Vec<Arc<Partner>> {
        self.partners
            .iter()
            .filter(|p| query.partners.is_empty() || query.partners.contains(&p.id))
            .cloned()
            .collect()
    }

    /// Searches every asked partner concurrently, each under its deadline.
    async fn search(&self, query: &StudyQuery) -> Vec<PartnerSearch> {
        let started = Instant::now();
        join_all(self.asked(query).into_iter().map(|partner| async move {
            let deadline = started + partner.deadline;
            let result = match timeout_at(deadline, partner.connector.search(query)).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(error)) => Err(Failure::Connector(error)),
                Err(_) => Err(Failure::Timeout),
            };
            if let Err(failure) = &result {
                log_failure(&partner.id, failure, "search");
            }
            PartnerSearch {
                partner,
                deadline,
                started,
                elapsed: started.elapsed(),
                result,
                detail_failure: None,
            }
        }))
        .await
    }

    /// How many studies match, per partner.
    pub async fn count(&self, query: &StudyQuery) -> (u32, Vec<PartnerStatus>) {
        let searches = self.search(query).await;
        (total(&searches), searches.iter().map(status).collect())
    }

    /// The `first` studies after `after` in the merged order, with series
    /// and instances loaded.
    pub async fn page(
        &self,
        query: &StudyQuery,
        first: usize,
        after: Option<&SortKey>,
    ) -> MergedPage {
        let mut searches = self.search(query).await;
        let mut merged: Vec<(SortKey, usize, usize)> = Vec::new();
        for (partner_index, search) in searches.iter().enumerate() {
            if let Ok(outcome) = &search.result {
                for (study_index, study) in outcome.studies.iter().enumerate() {
                    let key = SortKey::of(&search.partner.id, study);
                    if after.is_none_or(|after| key > *after) {
                        merged.push((key, partner_index, study_index));
                    }
                }
            }
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        let has_next_page = merged.len() > first;
        merged.truncate(first);

        // Take the page's studies out of each partner's answer, keeping order.
        let mut per_partner: Vec<Vec<(usize, Study)>> = vec![Vec::new(); searches.len()];
        for (position, (_, partner_index, study_index)) in merged.iter().enumerate() {
            if let Some(Ok(outcome)) = searches.get_mut(*partner_index).map(|s| s.result.as_mut())
                && let Some(study) = outcome.studies.get_mut(*study_index)
                && let Some(bucket) = per_partner.get_mut(*partner_index)
            {
                bucket.push((position, std::mem::take(study)));
            }
        }
        let total = total(&searches);

        // Load series for the page, partner by partner, concurrently.
        let loaded = join_all(searches.iter().zip(per_partner).map(
            |(search, bucket)| async move {
                if bucket.is_empty() {
                    return (bucket, None, None);
                }
                let (positions, mut studies): (Vec<usize>, Vec<Study>) = bucket.into_iter().unzip();
                let failure = match timeout_at(
                    search.deadline,
                    search.partner.connector.load_series(&mut studies),
                )
                .await
                {
                    Ok(Ok(())) => None,
                    Ok(Err(error)) => Some(Failure::Connector(error)),
                    Err(_) => Some(Failure::Timeout),
                };
                if let Some(failure) = &failure {
                    log_failure(&search.partner.id, failure, "series");
                }
                let elapsed = search.started.elapsed();
                (
                    positions.into_iter().zip(studies).collect(),
                    failure,
                    Some(elapsed),
                )
            },
        ))
        .await;

        let mut slots: Vec<Option<FoundStudy>> = vec![None; merged.len()];
        for (search, (bucket, failure, elapsed)) in searches.iter_mut().zip(loaded) {
            search.detail_failure = failure;
            if let Some(elapsed) = elapsed {
                search.elapsed = elapsed;
            }
            for (position, study) in bucket {
                if let Some(slot) = slots.get_mut(position) {
                    *slot = Some(FoundStudy {
                        partner: Arc::clone(&search.partner),
                        study,
                    });
                }
            }
        }
        MergedPage {
            studies: slots.into_iter().flatten().collect(),
            has_next_page,
            total,
            statuses: searches.iter().map(status).collect(),
        }
    }
}

/// Matching studies across the partners that answered.
fn total(searches: &[PartnerSearch]) -> u32 {
    saturating_u32(
        searches
            .iter()
            .filter_map(|s| s.result.as_ref().ok())
            .map(|o| o.studies.len())
            .sum(),
    )
}

fn status(search: &PartnerSearch) -> PartnerStatus {
    let latency_ms =
        saturating_u32(usize::try_from(search.elapsed.as_millis()).unwrap_or(usize::MAX));
    let partner = ID(search.partner.id.clone());
    match (&search.result, &search.detail_failure) {
        (Ok(outcome), None) => PartnerStatus {
            partner,
            status: if outcome.truncated {
                PartnerOutcome::Truncated
            } else {
                PartnerOutcome::Ok
            },
            latency_ms,
            count: Some(saturating_u32(outcome.studies.len())),
            code: outcome.truncated.then(|| "PARTNER_RESULT_CAP".to_owned()),
            message: outcome.truncated.then(|| {
                "the partner's store caps results per query; there may be more matching studies"
                    .to_owned()
            }),
        },
        (Ok(outcome), Some(failure)) => {
            let (status, code, message) = describe(failure);
            PartnerStatus {
                partner,
                status,
                latency_ms,
                count: Some(saturating_u32(outcome.studies.len())),
                code: Some(code),
                message: Some(format!(
                    "{message}; its studies on this page are listed without series"
                )),
            }
        }
        (Err(failure), _) => {
            let (status, code, message) = describe(failure);
            PartnerStatus {
                partner,
                status,
                latency_ms,
                count: None,
                code: Some(code),
                message: Some(message),
            }
        }
    }
}

fn describe(failure: &Failure) -> (PartnerOutcome, String, String) {
    match failure {
        Failure::Timeout => (
            PartnerOutcome::Timeout,
            "PARTNER_TIMEOUT".to_owned(),
            "the partner did not answer within its deadline".to_owned(),
        ),
        Failure::Connector(error) => (
            if error.is_unavailable() {
                PartnerOutcome::Unavailable
            } else {
                PartnerOutcome::Error
            },
            error.code().to_owned(),
            error.to_string(),
        ),
    }
}

fn log_failure(partner: &str, failure: &Failure, phase: &'static str) {
    match failure {
        Failure::Timeout => tracing::warn!(partner, phase, "partner timed out"),
        Failure::Connector(error) => {
            tracing::warn!(partner, phase, code = error.code(), %error, "partner failed")
        }
    }
}

fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
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
