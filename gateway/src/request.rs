//! What travels with each request: who asks, and what must be audited.
//!
//! The principal comes from the bearer token ([`crate::auth`]); the
//! resolvers note each data access with its per-partner decisions. Audit
//! records go to the hash-chained [`crate::audit::AuditLog`] before the
//! response leaves.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use meshgate_schema::api::{CountDisclosure, DisclosureLevel, PartnerOutcome, PartnerStatus};
use meshgate_schema::{Principal, Role};
use serde::Serialize;

/// Per-request data the resolvers see.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client: Option<SocketAddr>,
    /// `None` only for requests refused before authentication succeeded.
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
            principal: self.principal.as_ref().map(|p| AuditedPrincipal {
                issuer: p.issuer.clone(),
                subject: p.subject.clone(),
                institution: p.institution.clone(),
                roles: p.roles.clone(),
            }),
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
    /// The research project the access served.
    pub project: String,
    pub filter_fingerprint: String,
    /// The normalised filter (never result data).
    pub filter: serde_json::Value,
    pub partners: Vec<AuditedPartner>,
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditedPartner {
    pub partner: String,
    pub status: PartnerOutcome,
    /// The policy decision.
    pub disclosure: DisclosureLevel,
    pub deidentification_profile: Option<String>,
    /// The count as disclosed (never a suppressed one).
    pub count: Option<u32>,
    pub count_disclosure: Option<CountDisclosure>,
    /// The answer was reused from the cache, not asked of the partner.
    pub cached: bool,
}

impl AuditedPartner {
    pub fn from_status(status: &PartnerStatus) -> AuditedPartner {
        AuditedPartner {
            partner: status.partner.to_string(),
            status: status.status,
            disclosure: status.disclosure,
            deidentification_profile: status.deidentification_profile.clone(),
            count: status.count,
            count_disclosure: status.count_disclosure,
            cached: status.cached,
        }
    }
}

/// Who asked, in an audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditedPrincipal {
    pub issuer: String,
    pub subject: String,
    pub institution: Option<String>,
    pub roles: Vec<Role>,
}

/// One request's audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub request_id: String,
    pub client: Option<String>,
    pub principal: Option<AuditedPrincipal>,
    pub operation: Option<String>,
    pub outcome: &'static str,
    pub error_codes: Vec<String>,
    pub accesses: Vec<AuditedAccess>,
}
