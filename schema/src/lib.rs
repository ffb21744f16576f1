//! The meshgate domain: what a cohort query is, what a study is, and how a
//! study becomes a FHIR R4 ImagingStudy.
//!
//! Everything here is pure — no network, no async I/O — so that connectors,
//! the gateway and tests share one definition of each concept.
//!
//! Where to start reading:
//! - [`query::StudyQuery`]: the normalised cohort filter, the single value that
//!   travels from the GraphQL resolver down to every connector;
//! - [`study::Study`]: a study as every connector reports it, built from DICOM
//!   attributes through [`dicom::DicomAttributes`];
//! - [`fhir::imaging_study`]: the DICOM → FHIR ImagingStudy mapping;
//! - [`principal::Principal`]: the verified caller;
//! - [`report`]: how a partner's part in a query ended and what it disclosed;
//! - `api` (feature `graphql`, which the gateway turns on): the GraphQL
//!   input and output types; the committed SDL is `schema/meshgate.graphql`.
//!   Without the feature nothing here depends on async-graphql, so
//!   connectors and policies do not compile against the API technology.
//!
//! Queries, studies and reports are serde types: their JSON is the wire
//! form between processes, and a query that arrives is checked by the same
//! rules as a GraphQL filter.

#[cfg(feature = "graphql")]
pub mod api;
pub mod capabilities;
pub mod dicom;
pub mod fhir;
pub mod principal;
pub mod query;
pub mod report;
pub mod study;

pub use capabilities::{Capabilities, FilterKind, PagingStyle, ProbeFinding, ProbedFeature};
pub use principal::{Caller, Principal, Role};
pub use query::{AgeRange, DateRange, QueryError, StudyQuery};
pub use report::{ConnectorKind, CountDisclosure, DisclosureLevel, PartnerOutcome, PartnerReport};
pub use study::{Instance, Modality, PatientSex, Series, Study};
