//! What a connector's backend can do by itself.

use serde::Serialize;

/// A kind of cohort filter, as far as push-down is concerned.
#[derive(
    async_graphql::Enum, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize,
)]
pub enum FilterKind {
    Modality,
    BodyPart,
    StudyDate,
    Description,
    PatientSex,
    PatientAge,
    StudyUid,
}

impl FilterKind {
    pub const ALL: [FilterKind; 7] = [
        FilterKind::Modality,
        FilterKind::BodyPart,
        FilterKind::StudyDate,
        FilterKind::Description,
        FilterKind::PatientSex,
        FilterKind::PatientAge,
        FilterKind::StudyUid,
    ];
}

/// How a backend pages through results.
#[derive(async_graphql::Enum, Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PagingStyle {
    /// Everything is answered locally in one step.
    None,
    /// `limit` / `offset` query parameters (QIDO-RS).
    LimitOffset,
}

/// What a connector's backend can do itself; everything else the connector
/// does after fetching.
#[derive(async_graphql::SimpleObject, Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Filters the backend applies natively (pushed down).
    pub native_filters: Vec<FilterKind>,
    pub paging: PagingStyle,
    /// The largest page the backend returns, if it caps pages.
    pub max_page_size: Option<u32>,
    /// The most results the backend returns for one query, if it caps them;
    /// hitting the cap makes the partner's status TRUNCATED.
    pub max_results: Option<u32>,
}
