//! A configuration's parts, hashed: the snapshot hash audit records name,
//! and what a reload compares.

use std::path::{Path, PathBuf};

use meshgate_policies::{PolicyConfig, PolicyFile};

use super::*;

/// A configuration's parts, hashed: which rules were in force, and which
/// parts a reload changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fingerprints {
    /// SHA-256 (hex) of the configuration text and of every policy file's
    /// text, in order. Neither holds a secret value (credentials are only
    /// references), so the hash can be shown and audited.
    pub snapshot: String,
    /// Per partner id: its table without the policy facts (policies,
    /// institution, data use), plus a digest of its resolved credential, so
    /// that a rotated credential counts as a change of the partner.
    pub partners: std::collections::HashMap<String, String>,
    /// `[auth]`: the trusted issuers.
    pub auth: String,
    /// Every other top-level key but `partners`, `projects` and
    /// `policies`: the parts read at start-up only.
    pub sections: std::collections::BTreeMap<String, String>,
    /// The files and folders a change on disk to which is a reason to
    /// reload: the configuration file and the configured policy paths.
    pub watched: Vec<PathBuf>,
}

pub(super) fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    for part in parts {
        // Length-prefixed, so that no two sequences of parts hash alike.
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part);
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

impl Fingerprints {
    pub(super) fn of(
        file: &Path,
        text: &str,
        config: &Config,
        credentials: &[Vec<u8>],
        policies: &PolicyConfig,
    ) -> Fingerprints {
        let files = policies
            .consortium
            .iter()
            .map(|file| ("consortium", file))
            .chain(
                policies
                    .partners
                    .iter()
                    .flat_map(|(facts, files)| files.iter().map(|file| (facts.id.as_str(), file))),
            );
        let mut parts: Vec<&[u8]> = vec![text.as_bytes()];
        let names: Vec<(String, &PolicyFile)> = files
            .map(|(owner, file)| {
                let name = file
                    .path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                (format!("{owner}/{name}"), file)
            })
            .collect();
        for (name, file) in &names {
            parts.push(name.as_bytes());
            parts.push(file.text.as_bytes());
        }
        let raw: toml::Table = toml::from_str(text).unwrap_or_default();
        let rendered = |value: &toml::Value| toml::to_string(value).unwrap_or_default();
        let mut partners = std::collections::HashMap::new();
        if let Some(tables) = raw.get("partners").and_then(toml::Value::as_array) {
            for ((table, partner), credential) in
                tables.iter().zip(&config.partners).zip(credentials)
            {
                let mut table = table.clone();
                if let Some(table) = table.as_table_mut() {
                    for facts in ["policies", "institution", "data_use"] {
                        table.remove(facts);
                    }
                }
                partners.insert(
                    partner.id.get_ref().clone(),
                    sha256_hex(&[rendered(&table).as_bytes(), credential]),
                );
            }
        }
        let sections = raw
            .iter()
            .filter(|(key, _)| {
                !matches!(key.as_str(), "partners" | "projects" | "policies" | "auth")
            })
            .map(|(key, value)| (key.clone(), rendered(value)))
            .collect();
        let base = file.parent().unwrap_or(Path::new("."));
        let watched = std::iter::once(file.to_owned())
            .chain(
                config
                    .policies
                    .consortium
                    .iter()
                    .chain(config.partners.iter().flat_map(|p| p.policies.iter()))
                    .map(|path| base.join(path)),
            )
            .collect();
        Fingerprints {
            snapshot: sha256_hex(&parts),
            watched,
            partners,
            auth: raw.get("auth").map(rendered).unwrap_or_default(),
            sections,
        }
    }
}
