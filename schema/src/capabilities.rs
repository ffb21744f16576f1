//! What a connector's backend can do by itself.

use serde::Serialize;

/// A kind of cohort filter, as far as push-down is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
pub enum PagingStyle {
    /// Everything is answered locally in one step.
    None,
    /// `limit` / `offset` query parameters (QIDO-RS).
    LimitOffset,
    /// An opaque token from each page that asks for the next
    /// (AWS HealthImaging `nextToken`).
    NextToken,
}

/// What a connector's backend can do itself; everything else the connector
/// does after fetching.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct Capabilities {
    /// Filters the backend applies natively (pushed down).
    pub native_filters: Vec<FilterKind>,
    pub paging: PagingStyle,
    /// The largest page the backend returns, if it caps pages.
    pub max_page_size: Option<u32>,
    /// The most results the backend returns for one query, if it caps them;
    /// hitting the cap makes the partner's status TRUNCATED.
    pub max_results: Option<u32>,
    /// Whether the above were measured by probing the backend (DICOMweb),
    /// rather than declared by the connector kind and profile.
    pub measured: bool,
    /// What the last probe found, feature by feature (empty if never probed).
    pub probe: Vec<ProbeFinding>,
}

impl Capabilities {
    /// Capabilities declared by a connector that is not probed.
    pub fn declared(
        native_filters: Vec<FilterKind>,
        paging: PagingStyle,
        max_page_size: Option<u32>,
        max_results: Option<u32>,
    ) -> Capabilities {
        Capabilities {
            native_filters,
            paging,
            max_page_size,
            max_results,
            measured: false,
            probe: Vec::new(),
        }
    }
}

/// A QIDO-RS behaviour the capability probe measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
pub enum ProbedFeature {
    /// `limit` caps the rows returned.
    Limit,
    /// `offset` skips rows (paging works).
    Offset,
    /// `*text*` matches StudyDescription case-insensitively.
    Wildcard,
    /// `StudyInstanceUID=a,b` matches either UID.
    UidLists,
    /// How "no matches" is answered: supported = `204 No Content`,
    /// not supported = `200` with `[]`.
    EmptyResultNoContent,
    /// `ModalitiesInStudy` filters at study level.
    StudyLevelModality,
    /// `ModalitiesInStudy=A,B` matches either modality.
    ModalityLists,
    /// `ModalitiesInStudy` combined with `offset` returns later pages.
    ModalityPaging,
    /// A first page of a `ModalitiesInStudy` search holds the first
    /// matches (the backend filters before it limits), so a first page
    /// shorter than the page size the backend was measured to return in
    /// full is every match: one request where paging is broken.
    ModalityFirstPage,
}

/// What the probe found for one feature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::SimpleObject))]
pub struct ProbeFinding {
    pub feature: ProbedFeature,
    /// `null` when the store holds too little to tell; the profile's
    /// assumption is then used.
    pub supported: Option<bool>,
}
