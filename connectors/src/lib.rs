//! Connectors from meshgate to partners' imaging stores.
//!
//! Every partner is reached through one [`Connector`]: it declares what its
//! backend can filter by itself ([`Capabilities`]), pushes that down, filters
//! the rest after fetching, pages until done, and reports studies in the
//! shared domain model ([`meshgate_schema::Study`]).
//!
//! Where to start reading:
//! - [`Connector`] and [`ConnectorError`] below: the contract with the gateway;
//! - [`kind`]: connector kinds — each module below that has a `KIND` owns its
//!   `[partners.connector]` table, its checks and its construction
//!   ([`files`], [`dicomweb::config`], [`gcp`], [`azure`], [`aws`]);
//! - [`dicomweb`]: a QIDO-RS client with per-backend profiles (Orthanc, Google
//!   Cloud, Azure, AWS HealthImaging's DICOMweb API, generic);
//! - [`healthimaging`]: AWS HealthImaging's native API (image sets,
//!   grouped into studies);
//! - [`files`]: a folder of DICOM Part-10 files, indexed by header and kept
//!   fresh when files change;
//! - [`token`]: OAuth2 access tokens from cloud credential sources, refreshed
//!   before they expire.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use meshgate_schema::{Capabilities, ConnectorKind, Study, StudyQuery};

pub mod aws;
pub mod aws_credentials;
pub mod azure;
pub mod dicomweb;
mod expiring;
pub mod files;
pub mod gcp;
pub mod healthimaging;
mod http;
pub mod kind;
mod secret;
pub mod sigv4;
pub mod token;

pub use secret::Secret;

/// What a connector found for a query.
#[derive(Debug, Clone, Default)]
pub struct SearchOutcome {
    /// Matching studies, study-level attributes only, unique by UID.
    pub studies: Vec<Study>,
    /// The backend's result cap was hit: there may be more matches.
    pub truncated: bool,
}

/// One partner's imaging store, as the gateway sees it.
#[async_trait]
pub trait Connector: Send + Sync + fmt::Debug {
    fn kind(&self) -> ConnectorKind;

    /// What the backend filters and pages by itself.
    fn capabilities(&self) -> Capabilities;

    /// Every study matching `query` (all of it, not a page: the gateway
    /// merges and pages across partners).
    async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError>;

    /// Connects with the configured credentials and, where the backend can
    /// be probed (DICOMweb), measures what it supports: from then on the
    /// measured capabilities, not assumed ones, drive push-down. Returns
    /// the round trip of the first request (the partner's latency).
    async fn check(&self) -> Result<Duration, ConnectorError>;

    /// Fills in series and instances of the given studies, which came from
    /// this connector's [`Connector::search`].
    async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError>;
}

/// Whose fault a connector error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The partner's store misbehaved or could not be reached.
    Upstream,
    /// meshgate's configuration or code.
    Ours,
}

/// Why a partner could not answer. Messages are safe to show: they never
/// carry upstream bodies, URLs with query values, or credentials.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectorError {
    /// The partner's store could not be reached.
    #[error("the partner's store could not be reached ({0})")]
    Unreachable(&'static str),
    /// The partner's store refused meshgate's credentials.
    #[error("the partner's store refused meshgate's credentials (HTTP {0})")]
    Unauthorized(u16),
    /// The partner's store kept throttling requests (HTTP 429).
    #[error("the partner's store is throttling requests (HTTP 429); try again later")]
    Throttled,
    /// The partner's store (data store, DICOM store, partition) does not
    /// exist at the configured address (HTTP 404).
    #[error("the partner's store was not found at the configured address (HTTP 404)")]
    StoreNotFound,
    /// The partner's store answered with an error status.
    #[error("the partner's store answered HTTP {0}")]
    UpstreamStatus(u16),
    /// The partner's store sent a response larger than meshgate reads.
    #[error("the partner's store sent a response larger than meshgate reads")]
    ResponseTooLarge,
    /// The partner's store answered with something that is not DICOM JSON.
    #[error("the partner's store sent a response that is not valid DICOM JSON")]
    BadResponse,
    /// The partner's files could not be read.
    #[error("the partner's files could not be read: {0}")]
    Storage(String),
    /// The connector is configured wrongly.
    #[error("the connector is misconfigured: {0}")]
    Config(String),
}

impl ConnectorError {
    /// A stable code for the partner status.
    pub fn code(&self) -> &'static str {
        match self {
            ConnectorError::Unreachable(_) => "PARTNER_UNREACHABLE",
            ConnectorError::Unauthorized(_) => "PARTNER_AUTH_FAILED",
            ConnectorError::Throttled => "PARTNER_THROTTLED",
            ConnectorError::StoreNotFound => "PARTNER_STORE_NOT_FOUND",
            ConnectorError::UpstreamStatus(_) => "PARTNER_HTTP_ERROR",
            ConnectorError::BadResponse => "PARTNER_BAD_RESPONSE",
            ConnectorError::ResponseTooLarge => "PARTNER_RESPONSE_TOO_LARGE",
            ConnectorError::Storage(_) => "PARTNER_STORAGE_ERROR",
            ConnectorError::Config(_) => "CONNECTOR_MISCONFIGURED",
        }
    }

    pub fn fault(&self) -> Fault {
        match self {
            ConnectorError::Config(_) => Fault::Ours,
            _ => Fault::Upstream,
        }
    }

    /// Whether trying again later might succeed.
    pub fn retryable(&self) -> bool {
        match self {
            ConnectorError::Unreachable(_) | ConnectorError::Throttled => true,
            ConnectorError::UpstreamStatus(status) => *status >= 500,
            _ => false,
        }
    }

    /// Whether the partner could not serve the query now (vs. answered
    /// wrongly): unreachable, overloaded, or throttling meshgate.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            ConnectorError::Unreachable(_) | ConnectorError::Throttled
        ) || matches!(self, ConnectorError::UpstreamStatus(502..=504))
    }
}
