//! `meshgate demo`: three synthetic partners on local files, the example
//! policies, a development token issuer, one gateway.
//!
//! The example policies make the three partners answer differently: north
//! releases de-identified records (shifted dates, patient characteristics),
//! south only counts, and east — whose dataset is limited to health,
//! medical or biomedical research — refuses the general-research `demo`
//! project but serves the `lung-cancer` project under the strictest profile.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::RngCore;
use serde_json::json;

use crate::config::{Config, ConfigError, Environment, LoadedConfig};
use crate::dev_issuer::{DEV_AUDIENCE, DevIssuer};
use crate::synth::{DICOM_DIR, MANIFEST_FILE, SynthError, SynthSpec, synthesise};

/// A demo partner: id, name, institution, UTC offset, seed, DUO data-use
/// permission.
#[derive(Debug)]
pub struct DemoPartner {
    pub id: &'static str,
    pub name: &'static str,
    pub institution: &'static str,
    pub utc_offset: &'static str,
    pub seed: u64,
    pub data_use: &'static str,
}

pub const DEMO_PARTNERS: [DemoPartner; 3] = [
    DemoPartner {
        id: "north",
        name: "Northfield University Hospital",
        institution: "northfield-university-hospital",
        utc_offset: "+01:00",
        seed: 11,
        data_use: "DUO:0000042",
    },
    DemoPartner {
        id: "south",
        name: "Southport Clinic",
        institution: "southport-clinic",
        utc_offset: "+00:00",
        seed: 22,
        data_use: "DUO:0000042",
    },
    DemoPartner {
        id: "east",
        name: "Eastbrook Imaging Institute",
        institution: "eastbrook-imaging-institute",
        utc_offset: "+02:00",
        seed: 33,
        data_use: "DUO:0000006",
    },
];

/// The demo's projects: id, title, DUO purposes.
pub const DEMO_PROJECTS: [(&str, &str, &str); 2] = [
    ("demo", "meshgate demo (general research)", "DUO:0000042"),
    (
        "lung-cancer",
        "Lung cancer screening outcomes (health/medical/biomedical research)",
        "DUO:0000006",
    ),
];

/// The example policies, written next to the demo's configuration.
pub const EXAMPLE_POLICIES: [(&str, &str); 6] = [
    (
        "consortium/access.cedar",
        include_str!("../../policies/examples/consortium/access.cedar"),
    ),
    (
        "consortium/administration.cedar",
        include_str!("../../policies/examples/consortium/administration.cedar"),
    ),
    (
        "consortium/data-use.cedar",
        include_str!("../../policies/examples/consortium/data-use.cedar"),
    ),
    (
        "partners/north.cedar",
        include_str!("../../policies/examples/partners/north.cedar"),
    ),
    (
        "partners/south.cedar",
        include_str!("../../policies/examples/partners/south.cedar"),
    ),
    (
        "partners/east.cedar",
        include_str!("../../policies/examples/partners/east.cedar"),
    ),
];

/// A cohort query worth trying first.
pub const SAMPLE_QUERY: &str = r#"{
  me { subject institution roles projects }
  cohortCount(project: "demo", filter: {modalities: [CT, MR], bodyPart: "CHEST",
              studyDate: {from: "2018-01-01", to: "2022-12-31"}}) {
    total totalIsLowerBound
    partners { partner status disclosure count countDisclosure reasons }
  }
  imagingStudies(project: "demo", first: 5, filter: {modalities: [CT, MR], bodyPart: "CHEST"}) {
    nodes { partner studyInstanceUid started modalities patient { reference sex age }
            deidentification { profile } fhir }
    pageInfo { hasNextPage endCursor }
    partners { partner status disclosure deidentificationProfile count reasons }
  }
}"#;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Synth(#[from] SynthError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("could not write {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
}

/// Where the demo's token issuer is.
#[derive(Debug, Clone)]
pub struct DemoIssuer {
    pub issuer: String,
    pub jwks_url: String,
}

impl From<&DevIssuer> for DemoIssuer {
    fn from(issuer: &DevIssuer) -> Self {
        DemoIssuer {
            issuer: issuer.issuer().to_owned(),
            jwks_url: issuer.jwks_url(),
        }
    }
}

/// Synthesises any demo partner missing under `data`, writes the example
/// policies and a pseudonymisation key (first run only), and returns the
/// demo configuration (also written to `data/meshgate.toml`).
pub fn prepare(
    data: &Path,
    listen: SocketAddr,
    studies: usize,
    issuer: &DemoIssuer,
    env: &dyn Environment,
) -> Result<LoadedConfig, DemoError> {
    let write = |path: &Path, text: &[u8]| -> Result<(), DemoError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DemoError::Io(parent.to_owned(), e))?;
        }
        std::fs::write(path, text).map_err(|e| DemoError::Io(path.to_owned(), e))
    };
    // Keys are readable by their owner only.
    let write_private = |path: &Path, text: &[u8]| -> Result<(), DemoError> {
        crate::audit::write_key_file(path, text).map_err(|e| DemoError::Io(path.to_owned(), e))
    };
    for (name, text) in EXAMPLE_POLICIES {
        write(&data.join("policies").join(name), text.as_bytes())?;
    }
    let key_file = data.join("pseudonym.key");
    if !key_file.exists() {
        let mut key = [0_u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut key);
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        write_private(&key_file, hex.as_bytes())?;
    }
    let checkpoint_key = data.join("audit-checkpoint-key.pem");
    if !checkpoint_key.exists() {
        write_private(
            &checkpoint_key,
            crate::audit::new_checkpoint_key_pem()?.as_bytes(),
        )?;
    }
    let quoted = |text: String| toml::Value::String(text).to_string();
    let mut toml = format!(
        "# Written by `meshgate demo`. DEVELOPMENT ONLY: tokens come from a local issuer.\n\
         listen = \"{listen}\"\n\n\
         [auth]\n[[auth.issuers]]\nissuer = {issuer}\naudiences = [\"{DEV_AUDIENCE}\"]\njwks_url = {jwks}\nalgorithms = [\"EdDSA\"]\n\
         # What this issuer's tokens may assert; any other claim is dropped.\n\
         trusted_for = {{ institutions = [{institutions}], roles = [\"*\"], projects = [\"*\"], permissions = [\"north:identified-access\"] }}\n\n\
         [policies]\nconsortium = [\"policies/consortium\"]\n\n\
         [deidentification]\nkey = {key}\n\n\
         [audit]\nstore = \"sqlite:audit.db\"\ncheckpoint_key = {checkpoint_key}\ncheckpoint_file = \"audit-checkpoints.jsonl\"\n\n\
         [server]\nprofile = \"development\"   # introspection on, for GraphiQL\n",
        issuer = quoted(issuer.issuer.clone()),
        jwks = quoted(issuer.jwks_url.clone()),
        // Paths are relative to the configuration file, which lives in `data`.
        key = quoted("${file:pseudonym.key}".to_owned()),
        checkpoint_key = quoted("${file:audit-checkpoint-key.pem}".to_owned()),
        institutions = DEMO_PARTNERS
            .iter()
            .map(|p| p.institution)
            .chain([RESEARCHER_INSTITUTION, GOVERNANCE_INSTITUTION])
            .map(|i| quoted(i.to_owned()))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for (id, title, purpose) in DEMO_PROJECTS {
        let _ = write!(
            toml,
            "\n[[projects]]\nid = \"{id}\"\ntitle = \"{title}\"\npurposes = [\"{purpose}\"]\nethics_approved = true\n"
        );
    }
    for partner in &DEMO_PARTNERS {
        let dir = data.join(partner.id);
        if !dir.join(MANIFEST_FILE).exists() {
            tracing::info!(partner = partner.id, studies, "synthesising demo partner");
            synthesise(
                &SynthSpec {
                    partner: partner.id.to_owned(),
                    studies,
                    seed: partner.seed,
                },
                &dir,
            )?;
        }
        let _ = write!(
            toml,
            "\n[[partners]]\nid = \"{id}\"\nname = \"{name}\"\ninstitution = \"{institution}\"\nutc_offset = \"{offset}\"\ndeadline_ms = 3000\ndata_use = {{ permission = \"{data_use}\" }}\npolicies = [\"policies/partners/{id}.cedar\"]\nconnector = {{ kind = \"files\", path = {path} }}\n",
            id = partner.id,
            name = partner.name,
            institution = partner.institution,
            offset = partner.utc_offset,
            data_use = partner.data_use,
            path = quoted(format!("{}/{DICOM_DIR}", partner.id)),
        );
    }
    let file = data.join("meshgate.toml");
    write(&file, toml.as_bytes())?;
    Ok(Config::from_toml(&toml, &file, env)?)
}

/// The institution of the demo's researcher, who works at no partner.
const RESEARCHER_INSTITUTION: &str = "westfield-university";
/// The institution of the demo's governance user.
const GOVERNANCE_INSTITUTION: &str = "consortium-office";

/// Ready-made tokens for the demo's three kinds of user.
pub fn tokens(issuer: &DevIssuer, ttl: Duration) -> Vec<(&'static str, String)> {
    vec![
        (
            "researcher (westfield-university; projects demo and lung-cancer)",
            issuer.token(
                &json!({
                    "sub": "demo-researcher",
                    "institution": RESEARCHER_INSTITUTION,
                    "roles": ["researcher"],
                    "projects": ["demo", "lung-cancer"],
                }),
                ttl,
            ),
        ),
        (
            "partner admin (northfield-university-hospital)",
            issuer.token(
                &json!({
                    "sub": "demo-north-admin",
                    "institution": "northfield-university-hospital",
                    "roles": ["partner_admin"],
                }),
                ttl,
            ),
        ),
        (
            "governance",
            issuer.token(
                &json!({
                    "sub": "demo-governance",
                    "institution": GOVERNANCE_INSTITUTION,
                    "roles": ["governance"],
                }),
                ttl,
            ),
        ),
    ]
}
