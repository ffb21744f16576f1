//! What travels with each request: who asks, and what must be audited.
//!
//! Authentication (OIDC bearer tokens → [`Principal`]), per-partner policy
//! decisions and the durable audit log arrive in later changes; these are
//! the seams they plug into. Until then, every request is unauthenticated
//! ([`RequestContext::principal`] is `None`), every partner is asked, and
//! audit records go to the structured log.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use meshgate_schema::api::{PartnerOutcome, PartnerStatus};
use serde::Serialize;

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub subject: String,
    pub institution: Option<String>,
    pub roles: Vec<String>,
}

/// Per-request data the resolvers see.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client: Option<SocketAddr>,
    /// `None` until authentication is configured.
    pub principal: Option<Principal>,
    /// What the resolvers did, for the audit record.
    pub trail: Arc<Mutex<Vec<AuditedAccess>>>,
}

impl RequestContext {
    pub fn new(request_id: String, client: Option<SocketAddr>) -> RequestContext {
        RequestContext {
            request_id,
            client,
            principal: None,
            trail: Arc::default(),
        }
    }

    /// Notes one data access for the audit record.
    pub fn note(&self, access: AuditedAccess) {
        match self.trail.lock() {
            Ok(mut trail) => trail.push(access),
            Err(poisoned) => poisoned.into_inner().push(access),
        }
    }

    /// The audit record of this request; it failed if any error code is given.
    pub fn audit_record(&self, operation: Option<String>, error_codes: Vec<String>) -> AuditRecord {
        let accesses = match self.trail.lock() {
            Ok(trail) => trail.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        AuditRecord {
            request_id: self.request_id.clone(),
            client: self.client.map(|c| c.ip().to_string()),
            subject: self.principal.as_ref().map(|p| p.subject.clone()),
            operation,
            outcome: if error_codes.is_empty() {
                "success"
            } else {
                "failure"
            },
            error_codes,
            accesses,
        }
    }
}

/// One resolver's access to partner data: the filter's fingerprint (never
/// its values) and what each partner disclosed.
#[derive(Debug, Clone, Serialize)]
pub struct AuditedAccess {
    pub field: &'static str,
    pub filter_fingerprint: String,
    pub partners: Vec<AuditedPartner>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditedPartner {
    pub partner: String,
    pub status: PartnerOutcome,
    pub count: Option<u32>,
}

impl AuditedPartner {
    pub fn from_status(status: &PartnerStatus) -> AuditedPartner {
        AuditedPartner {
            partner: status.partner.to_string(),
            status: status.status,
            count: status.count,
        }
    }
}

/// One request's audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub request_id: String,
    pub client: Option<String>,
    pub subject: Option<String>,
    pub operation: Option<String>,
    pub outcome: &'static str,
    pub error_codes: Vec<String>,
    pub accesses: Vec<AuditedAccess>,
}

/// Where audit records go. A failed write fails the request closed.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError>;
}

#[derive(Debug, thiserror::Error)]
#[error("the audit log cannot be written")]
pub struct AuditError;

/// Writes audit records to the structured log (target `meshgate::audit`).
/// Records hold no patient data, filter values, tokens or credentials.
#[derive(Debug, Default)]
pub struct LogAuditSink;

impl AuditSink for LogAuditSink {
    fn record(&self, record: &AuditRecord) -> Result<(), AuditError> {
        let json = serde_json::to_string(record).map_err(|_| AuditError)?;
        tracing::info!(target: "meshgate::audit", record = %json, "audit");
        Ok(())
    }
}
