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
//! - [`api`]: the GraphQL input and output types; the committed SDL is
//!   `schema/meshgate.graphql`.

pub mod api;
pub mod capabilities;
pub mod dicom;
pub mod fhir;
pub mod principal;
pub mod query;
pub mod study;

pub use api::{ConnectorKind, CountDisclosure, DisclosureLevel, PartnerOutcome};
pub use capabilities::{Capabilities, FilterKind, PagingStyle, ProbeFinding, ProbedFeature};
pub use principal::{Caller, Principal, Role};
pub use query::{AgeRange, DateRange, QueryError, StudyQuery};
pub use study::{Instance, Modality, PatientSex, Series, Study};
