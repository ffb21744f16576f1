//! Audit entries as governance reads them through GraphQL.

use async_graphql::{Enum, InputObject, SimpleObject};
use serde_json::Value;

use super::StoredEntry;

/// Whether an audited operation succeeded.
#[derive(Enum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditOutcome {
    Success,
    Failure,
}

/// Which audit events to list.
#[derive(InputObject, Debug, Clone, Default)]
pub struct AuditFilter {
    /// The token subject of whoever asked.
    pub subject: Option<String>,
    pub institution: Option<String>,
    pub project: Option<String>,
    /// Events whose query reached (or was decided for) this partner.
    pub partner: Option<String>,
    pub outcome: Option<AuditOutcome>,
    /// Recorded at or after, RFC 3339 (UTC), e.g. `2026-11-01T00:00:00Z`.
    pub from: Option<String>,
    /// Recorded at or before, RFC 3339 (UTC).
    pub to: Option<String>,
}

/// One audited operation.
#[derive(SimpleObject, Debug, Clone)]
pub struct AuditEvent {
    /// Its place in the hash chain.
    pub sequence: i64,
    pub recorded: String,
    /// SHA-256 of this entry (hex), chained to the previous one.
    pub hash: String,
    pub request_id: String,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub institution: Option<String>,
    pub roles: Vec<String>,
    pub client: Option<String>,
    pub operation: Option<String>,
    pub outcome: AuditOutcome,
    pub error_codes: Vec<String>,
    pub accesses: Vec<AuditAccess>,
    /// The content hash of the configuration and policies that decided
    /// the request (absent in records from before snapshots were named).
    pub snapshot: Option<String>,
}

/// One data access within an operation.
#[derive(SimpleObject, Debug, Clone)]
pub struct AuditAccess {
    pub field: String,
    pub project: String,
    /// The normalised filter, as JSON.
    pub filter: String,
    pub partners: Vec<AuditPartner>,
}

/// What one partner was decided to disclose, and did.
#[derive(SimpleObject, Debug, Clone)]
pub struct AuditPartner {
    pub partner: String,
    pub status: String,
    pub disclosure: String,
    pub deidentification_profile: Option<String>,
    pub count: Option<i64>,
    pub count_disclosure: Option<String>,
    /// The answer was reused from meshgate's cache.
    pub cached: bool,
}

/// A page of audit events, newest first.
#[derive(SimpleObject, Debug, Clone)]
pub struct AuditEventConnection {
    pub nodes: Vec<AuditEvent>,
    pub has_next_page: bool,
    /// Pass as `after` for the next (older) page.
    pub end_cursor: Option<String>,
}

fn text(value: &Value) -> Option<String> {
    value.as_str().map(str::to_owned)
}

fn texts(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(text)
        .collect()
}

impl From<&StoredEntry> for AuditEvent {
    fn from(entry: &StoredEntry) -> AuditEvent {
        let record: Value = serde_json::from_str(&entry.record).unwrap_or(Value::Null);
        AuditEvent {
            sequence: entry.seq,
            recorded: entry.recorded.clone(),
            hash: entry.hash.clone(),
            request_id: text(&record["request_id"]).unwrap_or_default(),
            issuer: entry.issuer.clone(),
            subject: entry.subject.clone(),
            institution: entry.institution.clone(),
            roles: texts(&record["principal"]["roles"]),
            client: text(&record["client"]),
            operation: text(&record["operation"]),
            outcome: if entry.outcome == "success" {
                AuditOutcome::Success
            } else {
                AuditOutcome::Failure
            },
            error_codes: texts(&record["error_codes"]),
            snapshot: text(&record["snapshot"]),
            accesses: record["accesses"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|access| AuditAccess {
                    field: text(&access["field"]).unwrap_or_default(),
                    project: text(&access["project"]).unwrap_or_default(),
                    filter: super::canonical_json(&access["filter"]),
                    partners: access["partners"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| AuditPartner {
                            partner: text(&p["partner"]).unwrap_or_default(),
                            status: text(&p["status"]).unwrap_or_default(),
                            disclosure: text(&p["disclosure"]).unwrap_or_default(),
                            deidentification_profile: text(&p["deidentification_profile"]),
                            count: p["count"].as_i64(),
                            count_disclosure: text(&p["count_disclosure"]),
                            cached: p["cached"].as_bool().unwrap_or(false),
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}
