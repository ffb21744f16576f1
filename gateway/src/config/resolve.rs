//! What loading resolves beyond the typed sections: the audit store and
//! its checkpoint key, the trusted issuers, and the policies with their
//! partners and projects.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::Secret;
use meshgate_policies::{PartnerFacts, PolicyConfig, PolicyFile, ProjectFacts};
use meshgate_schema::Role;

use toml::Spanned;

use crate::audit::{AuditSettings, StoreLocation};
use crate::auth::{
    Allowed, ClaimNames, DEFAULT_ALGORITHMS, DEFAULT_TOKEN_TYPES, IssuerSettings, Trust,
};

use super::*;

/// Resolves `[audit]`: the store's location and the checkpoint key.
pub(super) fn audit_settings(
    section: &AuditSection,
    base: &Path,
    text: &str,
    env: &dyn Environment,
    located: &Locate<'_>,
) -> Result<AuditSettings, ConfigError> {
    let at = |name: &str| span_at(text, &[Key::Name("audit"), Key::Name(name)]);
    let store = section.store.trim();
    let postgres = |url: &str| url.starts_with("postgres://") || url.starts_with("postgresql://");
    let location = if let Some(path) = store.strip_prefix("sqlite:") {
        let path = path.trim_start_matches("//");
        if path.is_empty() {
            return Err(located(at("store"), "sqlite: needs a file path".into()));
        }
        StoreLocation::Sqlite(base.join(path))
    } else if store.starts_with("${") {
        let url = resolve_secret(&SecretRef(store.to_owned()), base, env)
            .map_err(|message| located(at("store"), message))?;
        if !postgres(url.expose()) {
            return Err(located(
                at("store"),
                "the referenced store must be a postgres:// URL".into(),
            ));
        }
        StoreLocation::Postgres(url)
    } else if postgres(store) {
        let authority = store.split('/').nth(2).unwrap_or_default();
        let credentials = authority
            .rsplit_once('@')
            .map(|(c, _)| c)
            .unwrap_or_default();
        if credentials.contains(':') || store.contains("password=") {
            return Err(located(
                at("store"),
                "a PostgreSQL URL with a password must be a reference: ${env:NAME} or ${file:PATH}"
                    .into(),
            ));
        }
        StoreLocation::Postgres(Secret::new(store))
    } else {
        return Err(located(
            at("store"),
            "store must be sqlite:PATH or a postgres:// URL".into(),
        ));
    };
    let pem = resolve_secret(&section.checkpoint_key, base, env)
        .map_err(|message| located(at("checkpoint_key"), message))?;
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let signing_key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.expose().trim()).map_err(|_| {
        located(
            at("checkpoint_key"),
            "checkpoint_key must be an Ed25519 private key in PKCS#8 PEM (openssl genpkey -algorithm ed25519)".into(),
        )
    })?;
    Ok(AuditSettings {
        store: location,
        signing_key: Arc::new(signing_key),
        checkpoint_every_records: i64::from(section.checkpoint_every_records.max(1)),
        checkpoint_every: Duration::from_secs(section.checkpoint_every_seconds.max(1)),
        checkpoint_file: section.checkpoint_file.as_ref().map(|p| base.join(p)),
    })
}

pub(super) fn issuers(
    config: &Config,
    text: &str,
    located: &Locate<'_>,
) -> Result<Vec<IssuerSettings>, ConfigError> {
    if config.auth.issuers.is_empty() {
        return Err(located(
            None,
            "no [[auth.issuers]] are configured: meshgate has no anonymous access".into(),
        ));
    }
    config
        .auth
        .issuers
        .iter()
        .enumerate()
        .map(|(index, issuer)| {
            let at = |key: &str| {
                span_at(
                    text,
                    &[Key::Name("auth"), Key::Name("issuers"), Key::Index(index), Key::Name(key)],
                )
            };
            let jwks_url = reqwest::Url::parse(issuer.jwks_url.get_ref())
                .ok()
                .filter(|url| {
                    url.scheme() == "https"
                        || (url.scheme() == "http"
                            && url.host_str().is_some_and(|host| {
                                host == "localhost"
                                    || host
                                        .trim_start_matches('[')
                                        .trim_end_matches(']')
                                        .parse::<std::net::IpAddr>()
                                        .is_ok_and(|ip| ip.is_loopback())
                            }))
                })
                .ok_or_else(|| {
                    located(
                        Some(issuer.jwks_url.span()),
                        "jwks_url must be an https:// URL (http:// only on a loopback address)"
                            .into(),
                    )
                })?;
            if issuer.audiences.is_empty() || issuer.audiences.iter().any(String::is_empty) {
                return Err(located(at("audiences"), "give at least one non-empty audience".into()));
            }
            if issuer.leeway_seconds > 300 {
                return Err(located(at("leeway_seconds"), "leeway_seconds must be at most 300".into()));
            }
            if issuer.max_token_lifetime_seconds == 0 {
                return Err(located(
                    at("max_token_lifetime_seconds"),
                    "max_token_lifetime_seconds must be at least 1".into(),
                ));
            }
            let algorithms = match &issuer.algorithms {
                None => DEFAULT_ALGORITHMS.to_vec(),
                Some(names) => names
                    .get_ref()
                    .iter()
                    .map(|name| {
                        jsonwebtoken::Algorithm::from_str(name)
                            .ok()
                            .filter(|alg| DEFAULT_ALGORITHMS.contains(alg))
                            .ok_or_else(|| {
                                located(
                                    Some(names.span()),
                                    format!("algorithm '{name}' is not allowed: use asymmetric algorithms (RS256, PS256, ES256, EdDSA, ...)"),
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            };
            if algorithms.is_empty() {
                return Err(located(at("algorithms"), "give at least one algorithm".into()));
            }
            let trust = &issuer.trusted_for;
            if let Some(role) = trust
                .roles
                .iter()
                .find(|r| *r != "*" && Role::from_name(r).is_none())
            {
                return Err(located(
                    at("trusted_for"),
                    format!("unknown role '{role}' in trusted_for.roles: use researcher, partner_admin, governance or \"*\""),
                ));
            }
            Ok(IssuerSettings {
                issuer: issuer.issuer.clone(),
                audiences: issuer.audiences.clone(),
                jwks_url,
                algorithms,
                token_types: issuer.token_types.clone().unwrap_or_else(|| {
                    DEFAULT_TOKEN_TYPES.iter().map(|t| (*t).to_owned()).collect()
                }),
                leeway: Duration::from_secs(issuer.leeway_seconds),
                require_nbf: issuer.require_nbf,
                max_lifetime: Duration::from_secs(issuer.max_token_lifetime_seconds),
                claims: ClaimNames {
                    institution: issuer.claims.institution.clone(),
                    roles: issuer.claims.roles.clone(),
                    projects: issuer.claims.projects.clone(),
                    permissions: issuer.claims.permissions.clone(),
                },
                trust: Trust {
                    institutions: Allowed::of(&trust.institutions),
                    roles: Allowed::of(&trust.roles),
                    projects: Allowed::of(&trust.projects),
                    permissions: Allowed::of(&trust.permissions),
                },
                refresh_interval: Duration::from_secs(issuer.jwks_refresh_interval_seconds),
                max_key_age: Duration::from_secs(issuer.jwks_max_age_seconds.max(1)),
            })
        })
        .collect()
}

/// A GA4GH DUO code: `DUO:` and seven digits.
pub(super) fn is_duo_code(code: &str) -> bool {
    code.strip_prefix("DUO:")
        .is_some_and(|digits| digits.len() == 7 && digits.bytes().all(|b| b.is_ascii_digit()))
}

pub(super) fn policy_config(
    config: &Config,
    base: &Path,
    located: &Locate<'_>,
) -> Result<PolicyConfig, ConfigError> {
    let duo = |code: &Spanned<String>| {
        if is_duo_code(code.get_ref()) {
            Ok(code.get_ref().clone())
        } else {
            Err(located(
                Some(code.span()),
                format!("'{}' is not a GA4GH DUO code (DUO:0000042)", code.get_ref()),
            ))
        }
    };
    let mut seen = std::collections::HashSet::new();
    let mut projects = Vec::new();
    for project in &config.projects {
        let id = project.id.get_ref();
        if id.is_empty() || !seen.insert(id.clone()) {
            return Err(located(
                Some(project.id.span()),
                format!("project id '{id}' is empty or used twice"),
            ));
        }
        projects.push(ProjectFacts {
            id: id.clone(),
            purposes: project.purposes.iter().map(duo).collect::<Result<_, _>>()?,
            commercial: project.commercial,
            ethics_approved: project.ethics_approved,
        });
    }
    let mut partners = Vec::new();
    for partner in &config.partners {
        let facts = PartnerFacts {
            id: partner.id.get_ref().clone(),
            institution: partner.institution.clone(),
            data_use: duo(&partner.data_use.permission)?,
            data_use_modifiers: partner
                .data_use
                .modifiers
                .iter()
                .map(duo)
                .collect::<Result<_, _>>()?,
        };
        partners.push((facts, policy_files(&partner.policies, base)?));
    }
    Ok(PolicyConfig {
        consortium: policy_files(&config.policies.consortium, base)?,
        partners,
        projects,
    })
}

/// Reads policy files; a folder stands for its `*.cedar` files, sorted.
/// Relative paths are relative to the configuration file.
pub(super) fn policy_files(paths: &[PathBuf], base: &Path) -> Result<Vec<PolicyFile>, ConfigError> {
    let unreadable = |path: &Path, error: std::io::Error| ConfigError {
        file: path.to_owned(),
        line: None,
        column: None,
        message: format!("cannot read policies: {}", error.kind()),
    };
    let mut files = Vec::new();
    for path in paths {
        let path = base.join(path);
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&path)
                .map_err(|e| unreadable(&path, e))?
                .flatten()
                .map(|entry| entry.path())
                .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
                .collect();
            found.sort();
            for file in found {
                files.push(PolicyFile::read(&file).map_err(policy_error)?);
            }
        } else {
            files.push(PolicyFile::read(&path).map_err(policy_error)?);
        }
    }
    Ok(files)
}

pub(super) fn policy_error(error: meshgate_policies::PolicyError) -> ConfigError {
    ConfigError {
        file: error.file,
        line: error.line,
        column: None,
        message: error.message,
    }
}
