//! `meshgate demo`: three synthetic partners on local files, one gateway.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::config::{Config, ConfigError, Environment, LoadedConfig};
use crate::synth::{DICOM_DIR, MANIFEST_FILE, SynthError, SynthSpec, synthesise};

/// The demo's partners: id, name, UTC offset, seed.
pub const DEMO_PARTNERS: [(&str, &str, &str, u64); 3] = [
    ("north", "Northfield University Hospital", "+01:00", 11),
    ("south", "Southport Clinic", "+00:00", 22),
    ("east", "Eastbrook Imaging Institute", "+02:00", 33),
];

/// A cohort query worth trying first.
pub const SAMPLE_QUERY: &str = r#"{
  cohortCount(filter: {modalities: [CT, MR], bodyPart: "CHEST",
                       studyDate: {from: "2018-01-01", to: "2022-12-31"}}) {
    total
    partners { partner status count latencyMs }
  }
  imagingStudies(first: 5, filter: {modalities: [CT, MR], bodyPart: "CHEST",
                                    studyDate: {from: "2018-01-01", to: "2022-12-31"}}) {
    nodes { partner started modalities description numberOfSeries fhir }
    pageInfo { hasNextPage endCursor }
    partners { partner status count latencyMs }
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
}

/// Synthesises any demo partner missing under `data` and returns the demo
/// configuration (also written to `data/meshgate.toml` for reference).
pub fn prepare(
    data: &Path,
    listen: SocketAddr,
    studies: usize,
    env: &dyn Environment,
) -> Result<LoadedConfig, DemoError> {
    let mut toml = format!("# Written by `meshgate demo`.\nlisten = \"{listen}\"\n");
    for (id, name, offset, seed) in DEMO_PARTNERS {
        let dir = data.join(id);
        if !dir.join(MANIFEST_FILE).exists() {
            tracing::info!(partner = id, studies, "synthesising demo partner");
            synthesise(
                &SynthSpec {
                    partner: id.to_owned(),
                    studies,
                    seed,
                },
                &dir,
            )?;
        }
        let path = dir.join(DICOM_DIR);
        let _ = write!(
            toml,
            "\n[[partners]]\nid = \"{id}\"\nname = \"{name}\"\nutc_offset = \"{offset}\"\ndeadline_ms = 3000\nconnector = {{ kind = \"files\", path = {path} }}\n",
            path = toml::Value::String(path.display().to_string()),
        );
    }
    let file = data.join("meshgate.toml");
    std::fs::write(&file, &toml).map_err(|e| DemoError::Io(file.clone(), e))?;
    Ok(Config::from_toml(&toml, &file, env)?)
}
