//! Who may see what. Pure: no network, no async I/O.
//!
//! Where to start reading:
//! - [`authorizer::Authorizer`]: Cedar policies (the consortium's and each
//!   partner's, validated against `meshgate.cedarschema`) decide per partner
//!   whether a query is DENIED, COUNTS_ONLY, DEIDENTIFIED (under a named
//!   profile) or IDENTIFIED;
//! - [`deid::Deidentifier`]: the DICOM PS3.15 Basic Profile and its options,
//!   with keyed pseudonyms per project;
//! - [`released`]: at a partner that de-identifies or only counts, filters
//!   are evaluated on the values it releases, never on hidden originals;
//! - [`disclosure::CountControl`]: small counts are suppressed, counts-only
//!   counts perturbed by cell key and optionally rounded;
//! - [`cases`]: policy test cases as data (`meshgate policy test`).

pub mod authorizer;
pub mod cases;
pub mod deid;
pub mod disclosure;
pub mod released;

pub use authorizer::{
    AdminAction, Authorizer, Disclosure, PartnerFacts, PolicyConfig, PolicyError, PolicyFile,
    ProjectFacts,
};
pub use deid::{Deidentifier, MasterKey, Profile};
pub use disclosure::{CellKeys, CountControl, DisclosedCount, Total};
