//! What a partner's part in a query comes to: its connector kind, how
//! its part ended, and what it disclosed — shared by the partner path, the
//! API and the audit log.

/// The kind of store behind a partner's connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConnectorKind {
    /// A folder of DICOM Part-10 files.
    Files,
    /// A DICOMweb (QIDO-RS) service.
    Dicomweb,
    /// An AWS HealthImaging data store, through its native API.
    HealthImaging,
}

/// How one partner's part of a query ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PartnerOutcome {
    /// Answered completely.
    Ok,
    /// Answered, but the backend's result cap was hit: there may be more.
    Truncated,
    /// Did not answer within its deadline.
    Timeout,
    /// Could not be reached.
    Unavailable,
    /// Answered with an error.
    Error,
    /// Not asked: its policies refuse this query (see `reasons`).
    Denied,
    /// Not asked: it failed repeatedly and its circuit breaker is open.
    CircuitOpen,
    /// Not asked: the query filters on an attribute this partner's
    /// de-identification profile removes, so it cannot be evaluated on
    /// what the partner releases (code `FILTER_ON_REMOVED_ATTRIBUTE`).
    Withheld,
    /// Not asked: the caller has spent this partner's query budget for the
    /// project in the current window (code `QUERY_BUDGET_EXHAUSTED`).
    BudgetExhausted,
}

/// What a partner's policy lets it disclose for a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DisclosureLevel {
    /// Nothing.
    Denied,
    /// A count, under count disclosure control; no records.
    CountsOnly,
    /// Records de-identified under the profile its policy chose.
    Deidentified,
    /// Records as held (a partner's own staff, where its policy grants it).
    Identified,
}

/// How a partner's count was disclosed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CountDisclosure {
    /// The true count.
    Exact,
    /// Perturbed (cell-key method) and/or rounded: close to the true count,
    /// and the same whenever the same studies are counted.
    Approximate,
    /// Below the partner's threshold: not disclosed (neither the number nor
    /// whether it is zero).
    Suppressed,
}

// As the partner's path reports it: the GraphQL answer shows it (as
// `PartnerStatus`), the audit record keeps it, and a partner running its
// path elsewhere sends it back.
/// One partner's part in a query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(
    feature = "graphql",
    derive(async_graphql::SimpleObject),
    graphql(name = "PartnerStatus", complex)
)]
pub struct PartnerReport {
    /// The partner's id (`partner` in the API).
    #[cfg_attr(feature = "graphql", graphql(skip))]
    pub partner: String,
    pub status: PartnerOutcome,
    /// Time spent on this partner, in milliseconds.
    pub latency_ms: u32,
    /// What this partner's policy lets it disclose for this query.
    pub disclosure: DisclosureLevel,
    /// The de-identification profile of its records, when DEIDENTIFIED.
    pub deidentification_profile: Option<String>,
    /// Matching studies, as disclosed (see `countDisclosure`); absent when
    /// suppressed, denied or the partner did not answer.
    pub count: Option<u32>,
    pub count_disclosure: Option<CountDisclosure>,
    /// Why the partner refused, when DENIED: what to change to be allowed.
    pub reasons: Vec<String>,
    /// A stable code for what went wrong, when something did.
    pub code: Option<String>,
    /// What went wrong, for people; never upstream bodies or identifiers.
    pub message: Option<String>,
    /// True when the partner's answer was reused from meshgate's cache (at
    /// most its `ttl_seconds` old) instead of asked for again. Cached
    /// answers are the caller's own: never another caller's.
    pub cached: bool,
}

#[cfg(feature = "graphql")]
#[async_graphql::ComplexObject]
impl PartnerReport {
    /// The partner's id.
    async fn partner(&self) -> async_graphql::ID {
        async_graphql::ID(self.partner.clone())
    }
}
