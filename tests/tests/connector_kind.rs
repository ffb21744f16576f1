//! A connector kind added from outside meshgate's crates: its own module
//! (settings, checks, construction, the connector) and one line adding it
//! to the kinds a configuration is read with. Here a partner whose studies
//! are listed in a JSON-lines manifest (the synthesiser's), answering the
//! cohort cases like a files partner holding the DICOM files themselves.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use meshgate_tests::{
    Gateway, GroundTruth, Policies, SyntheticPartner,
    cohort_counts_and_every_page_equal_the_ground_truth, files_partner,
};

/// `kind = "manifest"`: studies listed one JSON object a line.
mod manifest {
    use std::path::PathBuf;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use async_trait::async_trait;
    use meshgate_connectors::kind::{self, ConnectorConfig, Invalid, Kind, Setting};
    use meshgate_connectors::{Connector, ConnectorError, SearchOutcome};
    use meshgate_gateway::synth::ManifestRow;
    use meshgate_schema::study::PatientSex;
    use meshgate_schema::{
        Capabilities, ConnectorKind, FilterKind, PagingStyle, Series, Study, StudyQuery,
    };

    pub const KIND: Kind = Kind {
        name: "manifest",
        read,
    };

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Settings {
        path: PathBuf,
    }

    fn read(
        table: toml::Value,
        setting: &dyn Setting,
    ) -> Result<Box<dyn ConnectorConfig>, Invalid> {
        let mut settings: Settings = kind::typed(table)?;
        settings.path = setting.path(&settings.path);
        if settings.path.extension().is_none_or(|e| e != "jsonl") {
            return Err(Invalid::at(&["path"], "path must name a .jsonl file"));
        }
        Ok(Box::new(settings))
    }

    #[async_trait]
    impl ConnectorConfig for Settings {
        async fn build(&self) -> Result<Arc<dyn Connector>, ConnectorError> {
            let text = tokio::fs::read_to_string(&self.path)
                .await
                .map_err(|e| ConnectorError::Storage(e.kind().to_string()))?;
            let studies = text
                .lines()
                .map(|line| serde_json::from_str::<ManifestRow>(line).map(study))
                .collect::<Result<_, _>>()
                .map_err(|_| ConnectorError::BadResponse)?;
            Ok(Arc::new(Manifest { studies }))
        }
    }

    fn study(row: ManifestRow) -> Study {
        Study {
            patient_id: Some(row.patient_id),
            patient_sex: PatientSex::from_code(&row.patient_sex),
            patient_birth_date: Some(row.patient_birth_date),
            patient_age: Some(row.patient_age),
            date: Some(row.study_date),
            time: Some(row.study_time),
            accession_number: Some(row.accession_number),
            description: Some(row.description),
            modalities: row.modalities,
            body_parts: row.body_parts,
            number_of_series: Some(row.number_of_series),
            number_of_instances: Some(row.number_of_instances),
            series: row
                .series
                .into_iter()
                .enumerate()
                .map(|(n, series)| Series {
                    uid: format!("{}.{}", row.study_uid, n + 1),
                    number: u32::try_from(n + 1).ok(),
                    modality: Some(series.modality),
                    body_part: Some(series.body_part),
                    ..Series::default()
                })
                .collect(),
            uid: row.study_uid,
            ..Study::default()
        }
    }

    #[derive(Debug)]
    struct Manifest {
        studies: Vec<Study>,
    }

    #[async_trait]
    impl Connector for Manifest {
        fn kind(&self) -> ConnectorKind {
            ConnectorKind::Files
        }

        fn capabilities(&self) -> Capabilities {
            Capabilities::declared(FilterKind::ALL.to_vec(), PagingStyle::None, None, None)
        }

        async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError> {
            Ok(SearchOutcome {
                studies: self
                    .studies
                    .iter()
                    .filter(|study| query.matches(study))
                    .cloned()
                    .collect(),
                truncated: false,
            })
        }

        async fn check(&self) -> Result<Duration, ConnectorError> {
            Ok(Instant::now().elapsed())
        }

        async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
            for study in studies {
                if let Some(found) = self.studies.iter().find(|s| s.uid == study.uid) {
                    study.clone_from(found);
                }
            }
            Ok(())
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connector_kind_from_another_crate_needs_its_module_and_one_line() {
    let north = SyntheticPartner::new("north", 40, 91);
    let south = SyntheticPartner::new("south", 40, 92);
    let mut truth = GroundTruth::default();
    truth.add(&north);
    truth.add(&south);
    let tables = format!(
        "{}[[partners]]\nid = \"south\"\nname = \"South (manifest)\"\nconnector = {{ kind = \"manifest\", path = {:?} }}\n",
        files_partner("north", &north.dicom_dir()),
        south
            .dir
            .path()
            .join("manifest.jsonl")
            .display()
            .to_string()
    );

    let mut kinds = meshgate_connectors::kind::builtin();
    kinds.push(manifest::KIND); // the one line

    let gateway = Gateway::start_with_kinds(&tables, Policies::GroundTruth, &kinds).await;
    cohort_counts_and_every_page_equal_the_ground_truth(&gateway, &truth, ["north", "south"]).await;
}
