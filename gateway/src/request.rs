//! What travels with each request: who asks, and what must be audited.
//!
//! The principal comes from the bearer token ([`crate::auth`]); the
//! resolvers note each data access with its per-partner decisions. Audit
//! records go to the hash-chained [`crate::audit::AuditLog`] before the
//! response leaves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use meshgate_schema::{CountDisclosure, DisclosureLevel, PartnerOutcome};

use meshgate_schema::PartnerReport;
use meshgate_schema::{Principal, Role};
use serde::Serialize;

use crate::limits::QueryLimits;

/// Per-request data the resolvers see.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub client: Option<SocketAddr>,
    /// `None` only for requests refused before authentication succeeded.
    pub principal: Option<Principal>,
    /// The content hash of the configuration and policies the request
    /// runs on (see [`crate::registry`]).
    pub snapshot: Option<String>,
    /// What the resolvers did, for the audit record.
    pub trail: Arc<Mutex<Vec<AuditedAccess>>>,
    /// What the request may still ask of the partners.
    pub limits: QueryLimits,
    spent: Arc<Spent>,
    /// Permits held until the request's answer is sent.
    held: Arc<Mutex<Vec<tokio::sync::OwnedSemaphorePermit>>>,
}

/// What one request has asked of the partners so far.
#[derive(Debug, Default)]
struct Spent {
    fan_outs: AtomicUsize,
    studies: AtomicUsize,
}

/// A request asked the partners for more than one request may.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "one request may ask the partners at most {fan_outs} times for at most {studies} studies in all; split it into several requests"
)]
pub struct OverBudget {
    pub fan_outs: usize,
    pub studies: usize,
}

impl RequestContext {
    pub fn new(request_id: String, client: Option<SocketAddr>) -> RequestContext {
        RequestContext {
            request_id,
            client,
            principal: None,
            snapshot: None,
            trail: Arc::default(),
            limits: QueryLimits::default(),
            spent: Arc::default(),
            held: Arc::default(),
        }
    }

    /// The permits held so far, for the answer to keep until it is sent.
    pub fn release(&self) -> Vec<tokio::sync::OwnedSemaphorePermit> {
        match self.held.lock() {
            Ok(mut held) => std::mem::take(&mut *held),
            Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
        }
    }

    /// Keeps `permit` until the last clone of this context is dropped, or
    /// it is [released](Self::release) to the answer.
    pub fn hold(&self, permit: tokio::sync::OwnedSemaphorePermit) {
        match self.held.lock() {
            Ok(mut held) => held.push(permit),
            Err(poisoned) => poisoned.into_inner().push(permit),
        }
    }

    /// Charges one fan-out to every partner, for up to `studies` studies,
    /// before it is made; refused once the request's budget is spent
    /// (aliased fields each count).
    pub fn charge(&self, studies: usize) -> Result<(), OverBudget> {
        let over = OverBudget {
            fan_outs: self.limits.max_fan_outs,
            studies: self.limits.max_studies,
        };
        let fan_outs = self.spent.fan_outs.fetch_add(1, Ordering::SeqCst) + 1;
        let asked = self.spent.studies.fetch_add(studies, Ordering::SeqCst) + studies;
        if fan_outs > self.limits.max_fan_outs || asked > self.limits.max_studies {
            return Err(over);
        }
        Ok(())
    }

    /// Notes one data access for the audit record.
    pub fn note(&self, access: AuditedAccess) {
        match self.trail.lock() {
            Ok(mut trail) => trail.push(access),
            Err(poisoned) => poisoned.into_inner().push(access),
        }
    }

    /// The audit record of this request; it failed if any error code is
    /// given. Each code is kept once, in order, with how many errors there
    /// were in all; the operation name is cut to [`MAX_OPERATION_NAME`]
    /// characters, and past [`MAX_RECORD_BYTES`] the normalised filters
    /// give way to their fingerprints, so no request can write a large
    /// record.
    pub fn audit_record(&self, operation: Option<String>, error_codes: Vec<String>) -> AuditRecord {
        let mut accesses = match self.trail.lock() {
            Ok(trail) => trail.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        let error_count = error_codes.len();
        let mut codes: Vec<String> = Vec::new();
        for code in error_codes {
            if !codes.contains(&code) {
                codes.push(code);
            }
        }
        let operation = operation.map(|name| {
            if name.chars().count() > MAX_OPERATION_NAME {
                name.chars().take(MAX_OPERATION_NAME).chain(['…']).collect()
            } else {
                name
            }
        });
        let size: usize = accesses
            .iter()
            .map(|a| serde_json::to_vec(a).map_or(0, |v| v.len()))
            .sum();
        if size > MAX_RECORD_BYTES {
            for access in &mut accesses {
                access.filter = serde_json::json!({"omitted": "too large; see filter_fingerprint"});
            }
        }
        let error_codes = codes;
        AuditRecord {
            error_count,
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
            snapshot: self.snapshot.clone(),
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
    pub fn from_report(status: &PartnerReport) -> AuditedPartner {
        AuditedPartner {
            partner: status.partner.clone(),
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
    /// Each error code once…
    pub error_codes: Vec<String>,
    /// …and how many errors there were.
    pub error_count: usize,
    pub accesses: Vec<AuditedAccess>,
    /// The content hash of the configuration and policies that decided
    /// the request (absent in records written before snapshots were named).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// Characters of a client's operation name kept in an audit record.
pub const MAX_OPERATION_NAME: usize = 128;
/// Bytes of accesses in one audit record before filters are left out.
pub const MAX_RECORD_BYTES: usize = 32 * 1024;
