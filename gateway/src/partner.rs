//! One partner's path through a query: its connector, asked through the
//! answer cache, its guard (circuit breaker, call slots) and its deadline,
//! on the view its grant allows; then its count under disclosure control,
//! its studies de-identified as they leave it, and a status saying what
//! happened. The federation ([`crate::federation`]) only fans out to these
//! and merges what they release.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use meshgate_connectors::{Connector, ConnectorError, Fault, SearchOutcome};
use meshgate_policies::deid::ShiftBasis;
use meshgate_policies::released::Withheld;
use meshgate_policies::{
    CellKeys, CountControl, Deidentifier, DisclosedCount, Disclosure, Profile,
};
use meshgate_schema::fhir::MappingOptions;
use meshgate_schema::{Caller, Study, StudyQuery};
use meshgate_schema::{CountDisclosure, DisclosureLevel, PartnerOutcome, PartnerReport};
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::budget::{BudgetConfig, Exhausted, QueryBudgets};
use crate::cache::{AnswerCache, CacheKey};
use crate::metrics::METRICS;
use crate::protection::{Guard, Refusal};

/// What every partner asked in one query shares.
pub(crate) struct Asking<'a> {
    pub(crate) started: Instant,
    /// The question's fingerprint, charged to query budgets.
    pub(crate) question: &'a str,
    pub(crate) caller: &'a Caller,
    pub(crate) project: &'a str,
    pub(crate) cell_keys: &'a CellKeys,
    pub(crate) cache: &'a AnswerCache,
    pub(crate) budgets: &'a QueryBudgets,
}

/// A partner and the connector that reaches it.
#[derive(Debug)]
pub struct Partner {
    pub id: String,
    /// This build of the partner, unique in the process (see
    /// [`Partner::next_generation`]).
    pub generation: u64,
    pub name: String,
    pub connector: Arc<dyn Connector>,
    /// Concurrency limit and circuit breaker.
    pub guard: Guard,
    pub deadline: Duration,
    pub mapping: MappingOptions,
    /// Count disclosure control for callers who are not its own staff.
    pub control: CountControl,
    /// Distinct questions per caller and project where it de-identifies or counts.
    pub budget: BudgetConfig,
}

/// Connects to `partners` at once and probes what each supports (see
/// [`Connector::check`]), each within `timeout`. The measured capabilities
/// are kept by the connectors and drive push-down.
pub async fn check_partners(partners: &[Arc<Partner>], timeout: Duration) -> Vec<PartnerCheck> {
    join_all(partners.iter().map(|partner| async move {
        let outcome = match tokio::time::timeout(timeout, partner.connector.check()).await {
            Ok(Ok(latency)) => Ok(latency),
            Ok(Err(error)) => Err(CheckFailure::Failed(error)),
            Err(_) => Err(CheckFailure::TimedOut),
        };
        PartnerCheck {
            partner: Arc::clone(partner),
            outcome,
        }
    }))
    .await
}

impl Partner {
    /// Asks this partner `query` under `grant`: not at all where the grant
    /// refuses it, on the released (de-identified) view where there is one,
    /// through the cache, the guard and the deadline. The answer is this
    /// partner's alone; counts and records are disclosed from it by
    /// [`PartnerSearch`].
    pub(crate) async fn answer(
        self: Arc<Self>,
        query: &StudyQuery,
        grant: Grant,
        asking: &Asking<'_>,
    ) -> PartnerSearch {
        let partner = self;
        let started = asking.started;
        let deadline = started + partner.deadline;
        let mut cached = false;
        // Where the partner releases a de-identified view (records or
        // counts), the query is evaluated on that view: the partner is
        // asked a widened query and its answer narrowed on released
        // values, so nothing the caller may not see decides a match.
        // Only a question the partner can answer is charged to the
        // caller's budget there.
        let asked = match (&grant.disclosure, &grant.deidentifier) {
            (Disclosure::Denied { reasons }, _) => Err(Failure::Denied(reasons.clone())),
            (_, Some(deid)) => deid
                .asked(query)
                .map_err(Failure::Withheld)
                .and_then(|widened| {
                    asking
                        .budgets
                        .charge(
                            partner.budget,
                            asking.caller,
                            asking.project,
                            &partner.id,
                            asking.question,
                        )
                        .map(|()| Some(widened))
                        .map_err(Failure::OverBudget)
                }),
            (_, None) => Ok(None),
        };
        let result = match asked {
            Err(failure) => Err(failure),
            Ok(widened) => {
                let asked = widened.as_ref().unwrap_or(query);
                let key = CacheKey::new(
                    asking.caller,
                    (&partner.id, partner.generation),
                    asked,
                    asking.project,
                    &grant.disclosure,
                );
                let search = guarded(
                    &partner,
                    "search",
                    deadline,
                    partner.connector.search(asked),
                );
                // A caller joining another's search still keeps its own deadline.
                let answer = timeout_at(deadline, asking.cache.get_or_search(key, search))
                    .await
                    .unwrap_or((Err(Failure::Timeout), false));
                cached = answer.1;
                let narrowing = grant.deidentifier.as_ref().filter(|d| d.narrows(query));
                answer.0.map(|outcome| match narrowing {
                    Some(deid) => Arc::new(SearchOutcome {
                        studies: outcome
                            .studies
                            .iter()
                            .filter(|study| deid.released_match(query, study))
                            .cloned()
                            .collect(),
                        truncated: outcome.truncated,
                    }),
                    None => outcome,
                })
            }
        };
        if let Err(failure) = &result {
            log_failure(&partner.id, failure, "search");
        }
        PartnerSearch {
            partner,
            grant,
            cell_keys: asking.cell_keys.clone(),
            deadline,
            started,
            elapsed: started.elapsed(),
            result,
            cached,
            detail_failure: None,
        }
    }

    /// A number no other build of a partner in this process has.
    pub fn next_generation() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// How one partner answered a connection check.
#[derive(Debug)]
pub struct PartnerCheck {
    pub partner: Arc<Partner>,
    /// The partner's latency, or why it could not be checked.
    pub outcome: Result<Duration, CheckFailure>,
}

/// Why a partner's check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckFailure {
    #[error("no answer within the check's time limit")]
    TimedOut,
    #[error(transparent)]
    Failed(ConnectorError),
}

impl CheckFailure {
    /// A stable code, as partner statuses use.
    pub fn code(&self) -> &'static str {
        match self {
            CheckFailure::TimedOut => "PARTNER_TIMEOUT",
            CheckFailure::Failed(error) => error.code(),
        }
    }
}

impl PartnerCheck {
    /// Whether the partner's store answered at all.
    pub fn reachable(&self) -> bool {
        !matches!(
            &self.outcome,
            Err(CheckFailure::TimedOut | CheckFailure::Failed(ConnectorError::Unreachable(_)))
        )
    }

    /// Whether the store accepted meshgate's credentials: `None` when the
    /// check ended before that could be told.
    pub fn authenticated(&self) -> Option<bool> {
        match &self.outcome {
            Ok(_) => Some(true),
            Err(CheckFailure::Failed(ConnectorError::Unauthorized(_))) => Some(false),
            Err(_) => None,
        }
    }
}

/// What the policies decided for one partner in one query.
#[derive(Debug, Clone)]
pub struct Grant {
    pub disclosure: Disclosure,
    /// Present unless the disclosure is IDENTIFIED or DENIED: what leaves
    /// the partner is pseudonymous (records only when DEIDENTIFIED).
    pub deidentifier: Option<Deidentifier>,
}

impl Grant {
    pub(crate) fn denied(reason: &str) -> Grant {
        Grant {
            disclosure: Disclosure::Denied {
                reasons: vec![reason.to_owned()],
            },
            deidentifier: None,
        }
    }

    /// The partner's full count control applies where counts are all it
    /// discloses; where it releases records, only the threshold (the
    /// records show their number); its own staff reading identified
    /// records see exact counts.
    fn control(&self, partner: &Partner) -> CountControl {
        match self.disclosure {
            Disclosure::Identified => CountControl::NONE,
            Disclosure::Deidentified(_) => partner.control.threshold_only(),
            Disclosure::CountsOnly(_) | Disclosure::Denied { .. } => partner.control,
        }
    }
}

/// Why a partner did not answer.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    Timeout,
    Connector(ConnectorError),
    Denied(Vec<String>),
    /// Not called: the partner's circuit breaker is open.
    CircuitOpen,
    /// Not called: the query filters on attributes the partner's view removes.
    Withheld(Withheld),
    /// Not called: the caller spent the partner's query budget.
    OverBudget(Exhausted),
}

/// One partner's answer to the search phase.
#[derive(Debug)]
pub(crate) struct PartnerSearch {
    partner: Arc<Partner>,
    grant: Grant,
    cell_keys: CellKeys,
    deadline: Instant,
    started: Instant,
    /// Time spent on this partner so far (search, then series for the page).
    elapsed: Duration,
    /// Shared with the cache: never changed, only read.
    result: Result<Arc<SearchOutcome>, Failure>,
    /// Whether the search's answer came from the cache.
    cached: bool,
    /// Set when the detail phase failed after the search succeeded.
    detail_failure: Option<Failure>,
}

impl PartnerSearch {
    /// This partner's studies on a page (`bucket`: their places in the
    /// page and the studies) as they leave it: with their series and
    /// instances when `with_series` (from the cache where kept under the
    /// same decision, else from the partner within its deadline), then
    /// de-identified under its grant. A failure to load series is kept for
    /// the status; the studies are released without them.
    pub(crate) async fn details(
        &mut self,
        bucket: Vec<(usize, Study)>,
        with_series: bool,
        cache: &AnswerCache,
        caller: &Caller,
        project: &str,
    ) -> Vec<(usize, FoundStudy)> {
        if bucket.is_empty() || !with_series {
            return self.release_all(bucket);
        }
        let (positions, mut studies): (Vec<usize>, Vec<Study>) = bucket.into_iter().unzip();
        let key = |study: &Study| {
            CacheKey::series(
                caller,
                (&self.partner.id, self.partner.generation),
                &study.uid,
                project,
                &self.grant.disclosure,
            )
        };
        let mut missing = Vec::new();
        for (index, study) in studies.iter_mut().enumerate() {
            match cache.series(&key(study)).await {
                Some(series) => study.set_series(Vec::clone(&series)),
                None => missing.push(index),
            }
        }
        let mut to_load: Vec<Study> = missing
            .iter()
            .filter_map(|&index| studies.get_mut(index).map(std::mem::take))
            .collect();
        let failure = if to_load.is_empty() {
            None
        } else {
            guarded(
                &self.partner,
                "series",
                self.deadline,
                self.partner.connector.load_series(&mut to_load),
            )
            .await
            .err()
        };
        if let Some(failure) = &failure {
            log_failure(&self.partner.id, failure, "series");
        } else {
            for study in &to_load {
                cache.keep_series(key(study), study.series.clone()).await;
            }
        }
        for (index, study) in missing.into_iter().zip(to_load) {
            if let Some(slot) = studies.get_mut(index) {
                *slot = study;
            }
        }
        self.detail_failure = failure;
        self.elapsed = self.started.elapsed();
        self.release_all(positions.into_iter().zip(studies).collect())
    }

    /// Studies of this partner's as they leave it: de-identified under the
    /// grant's profile, unless the grant is to read them identified.
    fn release_all(&self, studies: Vec<(usize, Study)>) -> Vec<(usize, FoundStudy)> {
        studies
            .into_iter()
            .map(|(position, study)| {
                let found = match &self.grant.deidentifier {
                    Some(deid) => FoundStudy {
                        partner: Arc::clone(&self.partner),
                        deidentification: Some((deid.profile().clone(), deid.shift_basis(&study))),
                        study: deid.study(&study),
                    },
                    None => FoundStudy {
                        partner: Arc::clone(&self.partner),
                        study,
                        deidentification: None,
                    },
                };
                (position, found)
            })
            .collect()
    }

    /// The partner's matching studies, when it answered (before
    /// de-identification: only for ordering through [`Self::order_key`]
    /// and for the page to be released through [`Self::details`]).
    pub(crate) fn studies(&self) -> &[Study] {
        self.result
            .as_ref()
            .map(|outcome| outcome.studies.as_slice())
            .unwrap_or_default()
    }

    /// Where `study` sits in the merged order, from what leaves the partner
    /// only (pseudonymous UID and shifted date where de-identified).
    pub(crate) fn order_key(&self, study: &Study) -> crate::federation::SortKey {
        match &self.grant.deidentifier {
            Some(deid) => {
                let (uid, date, time) = deid.order_fields(study);
                crate::federation::SortKey::new(&self.partner.id, uid, date, time)
            }
            None => crate::federation::SortKey::of(&self.partner.id, study),
        }
    }

    /// The count as it may be disclosed, when the partner answered.
    pub(crate) fn disclosed(&self) -> Option<DisclosedCount> {
        let outcome = self.result.as_ref().ok()?;
        let control = self.grant.control(&self.partner);
        let cell = if control.perturbation > 0 {
            self.cell_keys.cell(
                &self.partner.id,
                outcome.studies.iter().map(|s| s.uid.as_str()),
            )
        } else {
            Default::default()
        };
        Some(control.disclose(saturating_u32(outcome.studies.len()), cell))
    }

    /// Whether this partner's records go into the merged result.
    pub(crate) fn releases_records(&self) -> bool {
        self.grant.disclosure.releases_records()
            && self.disclosed().is_some_and(|c| !c.is_suppressed())
    }
}

/// A study in the merged result, with where it came from and how it was
/// de-identified (`None`: identified).
#[derive(Debug, Clone)]
pub struct FoundStudy {
    pub partner: Arc<Partner>,
    pub study: Study,
    pub deidentification: Option<(Profile, ShiftBasis)>,
}

fn level(disclosure: &Disclosure) -> DisclosureLevel {
    match disclosure {
        Disclosure::Denied { .. } => DisclosureLevel::Denied,
        Disclosure::CountsOnly(_) => DisclosureLevel::CountsOnly,
        Disclosure::Deidentified(_) => DisclosureLevel::Deidentified,
        Disclosure::Identified => DisclosureLevel::Identified,
    }
}

pub(crate) fn report(search: &PartnerSearch) -> PartnerReport {
    let latency_ms =
        saturating_u32(usize::try_from(search.elapsed.as_millis()).unwrap_or(usize::MAX));
    let disclosed = search.disclosed();
    let mut status = PartnerReport {
        partner: search.partner.id.clone(),
        status: PartnerOutcome::Ok,
        latency_ms,
        disclosure: level(&search.grant.disclosure),
        deidentification_profile: match &search.grant.disclosure {
            Disclosure::Deidentified(profile) => Some(profile.name()),
            _ => None,
        },
        count: disclosed.and_then(DisclosedCount::value),
        count_disclosure: disclosed.map(|count| match count {
            DisclosedCount::Exact(_) => CountDisclosure::Exact,
            DisclosedCount::Approximate(_) => CountDisclosure::Approximate,
            DisclosedCount::Suppressed => CountDisclosure::Suppressed,
        }),
        reasons: Vec::new(),
        code: None,
        message: None,
        cached: search.cached,
    };
    match (&search.result, &search.detail_failure) {
        (Ok(outcome), None) => {
            if outcome.truncated {
                status.status = PartnerOutcome::Truncated;
                status.code = Some("PARTNER_RESULT_CAP".to_owned());
                status.message = Some(
                    "the partner's store caps results per query; there may be more matching studies"
                        .to_owned(),
                );
            }
        }
        (Ok(_), Some(failure)) => {
            let (outcome, code, message) = describe(failure);
            status.status = outcome;
            status.code = Some(code);
            status.message = Some(format!(
                "{message}; its studies on this page are listed without series"
            ));
        }
        (Err(failure), _) => {
            let (outcome, code, message) = describe(failure);
            status.status = outcome;
            status.code = Some(code);
            status.message = Some(message);
            if let Failure::Denied(reasons) = failure {
                status.reasons = reasons.clone();
            }
        }
    }
    status
}

/// Calls a partner through its guard: not at all while its breaker is
/// open, after waiting for a call slot, within `deadline`; the outcome
/// feeds the breaker (only the partner's own faults count against it).
async fn guarded<T>(
    partner: &Partner,
    phase: &'static str,
    deadline: Instant,
    call: impl Future<Output = Result<T, ConnectorError>>,
) -> Result<T, Failure> {
    let span = tracing::info_span!(
        "partner call",
        otel.kind = "client",
        partner = %partner.id,
        phase,
        status = tracing::field::Empty,
        code = tracing::field::Empty,
    );
    let result = guarded_call(partner, deadline, call)
        .instrument(span.clone())
        .await;
    let (status, code) = match &result {
        Ok(_) => (PartnerOutcome::Ok, None),
        Err(failure) => {
            let (status, code, _) = describe(failure);
            (status, Some(code))
        }
    };
    span.record("status", outcome_name(status));
    if let Some(code) = code {
        span.record("code", code.as_str());
    }
    result
}

/// The call itself, through the guard; see [`guarded`].
async fn guarded_call<T>(
    partner: &Partner,
    deadline: Instant,
    call: impl Future<Output = Result<T, ConnectorError>>,
) -> Result<T, Failure> {
    let _admission = match partner.guard.admit(deadline).await {
        Ok(admission) => admission,
        Err(refusal) => {
            let failure = match refusal {
                Refusal::CircuitOpen => Failure::CircuitOpen,
                Refusal::Busy => Failure::Timeout,
            };
            METRICS.partner(&partner.id, outcome_name(describe(&failure).0), None);
            return Err(failure);
        }
    };
    let started = Instant::now();
    let result = match timeout_at(deadline, call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(Failure::Connector(error)),
        Err(_) => Err(Failure::Timeout),
    };
    partner.guard.record(match &result {
        Ok(_) => true,
        Err(Failure::Connector(error)) => error.fault() != Fault::Upstream,
        Err(_) => false,
    });
    let outcome = match &result {
        Ok(_) => PartnerOutcome::Ok,
        Err(failure) => describe(failure).0,
    };
    METRICS.partner(&partner.id, outcome_name(outcome), Some(started.elapsed()));
    result
}

/// A status as metrics label it, e.g. `CIRCUIT_OPEN`.
fn outcome_name(outcome: PartnerOutcome) -> &'static str {
    match outcome {
        PartnerOutcome::Ok => "OK",
        PartnerOutcome::Truncated => "TRUNCATED",
        PartnerOutcome::Timeout => "TIMEOUT",
        PartnerOutcome::Unavailable => "UNAVAILABLE",
        PartnerOutcome::Error => "ERROR",
        PartnerOutcome::Denied => "DENIED",
        PartnerOutcome::CircuitOpen => "CIRCUIT_OPEN",
        PartnerOutcome::Withheld => "WITHHELD",
        PartnerOutcome::BudgetExhausted => "BUDGET_EXHAUSTED",
    }
}

fn describe(failure: &Failure) -> (PartnerOutcome, String, String) {
    match failure {
        Failure::CircuitOpen => (
            PartnerOutcome::CircuitOpen,
            "PARTNER_CIRCUIT_OPEN".to_owned(),
            "the partner failed repeatedly and is not being called for now".to_owned(),
        ),
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
        Failure::Denied(_) => (
            PartnerOutcome::Denied,
            "POLICY_DENIED".to_owned(),
            "the partner's policies refuse this query; see reasons".to_owned(),
        ),
        Failure::Withheld(withheld) => (
            PartnerOutcome::Withheld,
            Withheld::CODE.to_owned(),
            withheld.to_string(),
        ),
        Failure::OverBudget(exhausted) => (
            PartnerOutcome::BudgetExhausted,
            Exhausted::CODE.to_owned(),
            exhausted.to_string(),
        ),
    }
}

fn log_failure(partner: &str, failure: &Failure, phase: &'static str) {
    match failure {
        Failure::Timeout => tracing::warn!(partner, phase, "partner timed out"),
        Failure::Connector(error) => {
            tracing::warn!(partner, phase, code = error.code(), %error, "partner failed")
        }
        Failure::Denied(_) => tracing::debug!(partner, "partner not asked: denied by policy"),
        Failure::CircuitOpen => {
            tracing::debug!(partner, phase, "partner not asked: circuit breaker open")
        }
        Failure::Withheld(_) => {
            tracing::debug!(partner, "partner not asked: filter on a removed attribute")
        }
        Failure::OverBudget(_) => {
            tracing::info!(
                partner,
                "partner not asked: the caller's query budget is spent"
            )
        }
    }
}

pub(crate) fn saturating_u32(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partner_report_travels_as_json_and_comes_back_equal() {
        let report = PartnerReport {
            partner: "north".into(),
            status: PartnerOutcome::Truncated,
            latency_ms: 42,
            disclosure: DisclosureLevel::CountsOnly,
            deidentification_profile: None,
            count: Some(130),
            count_disclosure: Some(CountDisclosure::Approximate),
            reasons: Vec::new(),
            code: Some("PARTNER_RESULT_CAP".into()),
            message: Some("capped".into()),
            cached: true,
        };
        let wire = serde_json::to_string(&report).unwrap();
        assert!(wire.contains(r#""status":"TRUNCATED""#), "{wire}");
        let back: PartnerReport = serde_json::from_str(&wire).unwrap();
        assert_eq!(back, report);
    }
}
