//! Policy tests as data: TOML files of cases (principal, action, partner,
//! project, expected decision), run by `meshgate policy test` and by CI.
//!
//! ```toml
//! [[case]]
//! name = "an HMB dataset refuses a general-research project"
//! roles = ["researcher"]
//! institution = "westfield"
//! projects = ["demo"]
//! partner = "east"
//! project = "demo"
//! expect = "DENIED"
//! reason = "health/medical/biomedical"   # a reason must contain this
//!
//! [[case]]
//! name = "governance may view any partner's audit events"
//! roles = ["governance"]
//! action = "ViewAudit"
//! partner = "north"
//! expect = "ALLOW"
//! ```

use std::path::{Path, PathBuf};

use meshgate_schema::{Principal, Role};
use serde::Deserialize;

use crate::authorizer::{AdminAction, Authorizer, Disclosure};

/// One file of cases.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    #[serde(rename = "case")]
    pub cases: Vec<Case>,
}

/// One expected decision.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    pub name: String,
    #[serde(default = "default_subject")]
    pub subject: String,
    #[serde(default)]
    pub institution: Option<String>,
    #[serde(default)]
    pub roles: Vec<Role>,
    #[serde(default)]
    pub projects: Vec<String>,
    #[serde(default)]
    pub permissions: Vec<String>,
    /// `query` (the default: a per-partner query decision) or an
    /// administration action: `ViewAudit`, `RegisterConnector`, `ApproveConnector`.
    #[serde(default = "default_action")]
    pub action: String,
    pub partner: String,
    /// Required for `query`.
    #[serde(default)]
    pub project: Option<String>,
    /// `DENIED`, `COUNTS_ONLY`, `DEIDENTIFIED`, `IDENTIFIED` for `query`;
    /// `ALLOW` or `DENY` for administration actions.
    pub expect: String,
    /// For `DEIDENTIFIED` (and `COUNTS_ONLY`, whose counts are computed over
    /// that profile's view): the profile's name, e.g.
    /// `basic+retain-patient-characteristics`.
    #[serde(default)]
    pub profile: Option<String>,
    /// For `DENIED`: text one of the reasons must contain.
    #[serde(default)]
    pub reason: Option<String>,
    /// Seconds since the Unix epoch the decision is made at (default: now).
    #[serde(default)]
    pub now: Option<i64>,
}

fn default_subject() -> String {
    "policy-test-user".to_owned()
}

fn default_action() -> String {
    "query".to_owned()
}

/// A case that was run.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub file: PathBuf,
    pub name: String,
    /// `None` when it passed; otherwise what was decided instead.
    pub failure: Option<String>,
}

/// Reads every `*.toml` file of cases in a folder (sorted), or one file.
pub fn load(path: &Path) -> Result<Vec<(PathBuf, CaseFile)>, String> {
    let mut files = Vec::new();
    if path.is_dir() {
        let entries = std::fs::read_dir(path)
            .map_err(|e| format!("{}: cannot read the folder: {}", path.display(), e.kind()))?;
        for entry in entries.flatten() {
            let file = entry.path();
            if file.extension().is_some_and(|e| e == "toml") {
                files.push(file);
            }
        }
        files.sort();
    } else {
        files.push(path.to_owned());
    }
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| format!("{}: cannot read: {}", file.display(), e.kind()))?;
            let cases: CaseFile = toml::from_str(&text)
                .map_err(|e| format!("{}: {}", file.display(), e.message()))?;
            Ok((file, cases))
        })
        .collect()
}

/// Runs every case against the authorizer.
pub fn run(authorizer: &Authorizer, files: &[(PathBuf, CaseFile)], now: i64) -> Vec<CaseResult> {
    files
        .iter()
        .flat_map(|(file, cases)| {
            cases.cases.iter().map(move |case| CaseResult {
                file: file.clone(),
                name: case.name.clone(),
                failure: check(authorizer, case, now).err(),
            })
        })
        .collect()
}

fn check(authorizer: &Authorizer, case: &Case, now: i64) -> Result<(), String> {
    let mut principal = Principal {
        issuer: "policy-test".to_owned(),
        subject: case.subject.clone(),
        institution: case.institution.clone(),
        roles: case.roles.clone(),
        projects: case.projects.clone(),
        permissions: case.permissions.clone(),
    };
    principal.roles.sort();
    principal.roles.dedup();
    let now = case.now.unwrap_or(now);
    let admin = match case.action.as_str() {
        "query" => None,
        "ViewAudit" => Some(AdminAction::ViewAudit),
        "RegisterConnector" => Some(AdminAction::RegisterConnector),
        "ApproveConnector" => Some(AdminAction::ApproveConnector),
        other => return Err(format!("unknown action '{other}'")),
    };
    if let Some(action) = admin {
        let decided = if authorizer.allows(&principal, action, &case.partner, now) {
            "ALLOW"
        } else {
            "DENY"
        };
        return if decided == case.expect {
            Ok(())
        } else {
            Err(format!("expected {}, decided {decided}", case.expect))
        };
    }
    let project = case
        .project
        .as_deref()
        .ok_or_else(|| "a query case needs a project".to_owned())?;
    let decision = authorizer.decide(&principal, project, &case.partner, now);
    if decision.name() != case.expect {
        return Err(format!(
            "expected {}, decided {}",
            case.expect,
            describe(&decision)
        ));
    }
    if let (Some(expected), Some(profile)) = (&case.profile, decision.view())
        && profile.name() != *expected
    {
        return Err(format!(
            "expected profile {expected}, decided {}",
            profile.name()
        ));
    }
    if let (Some(expected), Disclosure::Denied { reasons }) = (&case.reason, &decision)
        && !reasons.iter().any(|r| r.contains(expected.as_str()))
    {
        return Err(format!(
            "expected a reason containing '{expected}', got {reasons:?}"
        ));
    }
    Ok(())
}

/// A decision as a person reads it.
pub fn describe(decision: &Disclosure) -> String {
    match decision {
        Disclosure::Denied { reasons } => format!("DENIED ({})", reasons.join("; ")),
        Disclosure::Deidentified(profile) => format!("DEIDENTIFIED ({profile})"),
        Disclosure::CountsOnly(profile) => format!("COUNTS_ONLY (over the {profile} view)"),
        other => other.name().to_owned(),
    }
}
