//! The federation executor: asks every permitted partner at once, each under
//! its own deadline, and merges what comes back in one stable order.
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
use std::time::Duration;

use async_graphql::ID;
use futures::future::join_all;
use meshgate_connectors::{Connector, ConnectorError, Fault, SearchOutcome};
use meshgate_policies::deid::ShiftBasis;
use meshgate_policies::released::Withheld;
use meshgate_policies::{
    CellKeys, CountControl, Deidentifier, DisclosedCount, Disclosure, Profile, Total,
};
use meshgate_schema::api::{CountDisclosure, DisclosureLevel, PartnerOutcome, PartnerStatus};
use meshgate_schema::fhir::MappingOptions;
use meshgate_schema::{Caller, Study, StudyQuery};
use time::{Date, PrimitiveDateTime, Time};
use tokio::time::{Instant, timeout_at};
use tracing::Instrument as _;

use crate::budget::{BudgetConfig, Exhausted, QueryBudgets};
use crate::cache::{AnswerCache, CacheKey};
use crate::metrics::METRICS;
use crate::protection::{Guard, Refusal};

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
    fn denied(reason: &str) -> Grant {
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

/// Why a partner did not answer.
#[derive(Debug, Clone)]
enum Failure {
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
struct PartnerSearch {
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
    /// The count as it may be disclosed, when the partner answered.
    fn disclosed(&self) -> Option<DisclosedCount> {
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
    fn releases_records(&self) -> bool {
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
    pub statuses: Vec<PartnerStatus>,
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

    /// Connects to every partner at once and probes what it supports.
    pub async fn check(&self, timeout: Duration) -> Vec<PartnerCheck> {
        check_partners(&self.partners, timeout).await
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
        let question = &question;
        join_all(self.asked(query).into_iter().map(|partner| async move {
            let deadline = started + partner.deadline;
            let grant = grants
                .partners
                .get(&partner.id)
                .cloned()
                .unwrap_or_else(|| Grant::denied("no policy decision was made"));
            let mut cached = false;
            // Where the partner releases a de-identified view (records or
            // counts), the query is evaluated on that view: the partner is
            // asked a widened query and its answer narrowed on released
            // values, so nothing the caller may not see decides a match.
            // Only a question the partner can answer is charged to the
            // caller's budget there.
            let asked = match (&grant.disclosure, &grant.deidentifier) {
                (Disclosure::Denied { reasons }, _) => Err(Failure::Denied(reasons.clone())),
                (_, Some(deid)) => {
                    deid.asked(query)
                        .map_err(Failure::Withheld)
                        .and_then(|widened| {
                            self.budgets
                                .charge(
                                    partner.budget,
                                    &grants.caller,
                                    &grants.project,
                                    &partner.id,
                                    question,
                                )
                                .map(|()| Some(widened))
                                .map_err(Failure::OverBudget)
                        })
                }
                (_, None) => Ok(None),
            };
            let result = match asked {
                Err(failure) => Err(failure),
                Ok(widened) => {
                    let asked = widened.as_ref().unwrap_or(query);
                    let key = CacheKey::new(
                        &grants.caller,
                        (&partner.id, partner.generation),
                        asked,
                        &grants.project,
                        &grant.disclosure,
                    );
                    let search = guarded(
                        &partner,
                        "search",
                        deadline,
                        partner.connector.search(asked),
                    );
                    // A caller joining another's search still keeps its own deadline.
                    let answer = timeout_at(deadline, self.cache.get_or_search(key, search))
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
                cell_keys: grants.cell_keys.clone(),
                deadline,
                started,
                elapsed: started.elapsed(),
                result,
                cached,
                detail_failure: None,
            }
        }))
        .await
    }

    /// How many studies match, per partner, as they may be disclosed.
    pub async fn count(&self, query: &StudyQuery, grants: &Grants) -> (Total, Vec<PartnerStatus>) {
        let searches = self.search(query, grants).await;
        let mut total = Total::default();
        for count in searches.iter().filter_map(PartnerSearch::disclosed) {
            total.add(count);
        }
        (total, searches.iter().map(status).collect())
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
            if let Ok(outcome) = &search.result {
                total += outcome.studies.len();
                for (study_index, study) in outcome.studies.iter().enumerate() {
                    // The order and the cursor see only what leaves the partner.
                    let key = match &search.grant.deidentifier {
                        Some(deid) => {
                            let (uid, date, time) = deid.order_fields(study);
                            SortKey::new(&search.partner.id, uid, date, time)
                        }
                        None => SortKey::of(&search.partner.id, study),
                    };
                    if after.is_none_or(|after| key > *after) {
                        merged.push((key, partner_index, study_index));
                    }
                }
            }
        }
        merged.sort_by(|a, b| a.0.cmp(&b.0));
        let has_next_page = merged.len() > first;
        merged.truncate(first);

        // Copy the page's studies out of each partner's (shared) answer, keeping order.
        let mut per_partner: Vec<Vec<(usize, Study)>> = vec![Vec::new(); searches.len()];
        for (position, (_, partner_index, study_index)) in merged.iter().enumerate() {
            if let Some(Ok(outcome)) = searches.get(*partner_index).map(|s| s.result.as_ref())
                && let Some(study) = outcome.studies.get(*study_index)
                && let Some(bucket) = per_partner.get_mut(*partner_index)
            {
                bucket.push((position, study.clone()));
            }
        }

        // Load series for the page, partner by partner, concurrently; series
        // cached under the same decision are reused.
        let loaded = join_all(searches.iter().zip(per_partner).map(
            |(search, bucket)| async move {
                if bucket.is_empty() || !with_series {
                    return (bucket, None, None);
                }
                let (positions, mut studies): (Vec<usize>, Vec<Study>) = bucket.into_iter().unzip();
                let key = |study: &Study| {
                    CacheKey::series(
                        &grants.caller,
                        (&search.partner.id, search.partner.generation),
                        &study.uid,
                        &grants.project,
                        &search.grant.disclosure,
                    )
                };
                let mut missing = Vec::new();
                for (index, study) in studies.iter_mut().enumerate() {
                    match self.cache.series(&key(study)).await {
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
                        &search.partner,
                        "series",
                        search.deadline,
                        search.partner.connector.load_series(&mut to_load),
                    )
                    .await
                    .err()
                };
                if let Some(failure) = &failure {
                    log_failure(&search.partner.id, failure, "series");
                } else {
                    for study in &to_load {
                        self.cache
                            .keep_series(key(study), study.series.clone())
                            .await;
                    }
                }
                for (index, study) in missing.into_iter().zip(to_load) {
                    if let Some(slot) = studies.get_mut(index) {
                        *slot = study;
                    }
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
                    let found = match &search.grant.deidentifier {
                        Some(deid) => FoundStudy {
                            partner: Arc::clone(&search.partner),
                            deidentification: Some((
                                deid.profile().clone(),
                                deid.shift_basis(&study),
                            )),
                            study: deid.study(&study),
                        },
                        None => FoundStudy {
                            partner: Arc::clone(&search.partner),
                            study,
                            deidentification: None,
                        },
                    };
                    *slot = Some(found);
                }
            }
        }
        MergedPage {
            studies: slots.into_iter().flatten().collect(),
            has_next_page,
            total: saturating_u32(total),
            statuses: searches.iter().map(status).collect(),
        }
    }
}

fn level(disclosure: &Disclosure) -> DisclosureLevel {
    match disclosure {
        Disclosure::Denied { .. } => DisclosureLevel::Denied,
        Disclosure::CountsOnly(_) => DisclosureLevel::CountsOnly,
        Disclosure::Deidentified(_) => DisclosureLevel::Deidentified,
        Disclosure::Identified => DisclosureLevel::Identified,
    }
}

fn status(search: &PartnerSearch) -> PartnerStatus {
    let latency_ms =
        saturating_u32(usize::try_from(search.elapsed.as_millis()).unwrap_or(usize::MAX));
    let disclosed = search.disclosed();
    let mut status = PartnerStatus {
        partner: ID(search.partner.id.clone()),
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
