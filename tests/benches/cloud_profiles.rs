//! Per cloud profile: requests and wall time of cohort queries over one
//! partner of 2,000 studies, against the same queries on the same Orthanc
//! reached directly (the `orthanc` profile), measured in the same run.
//!
//! `cargo bench -p meshgate-tests --bench cloud_profiles` (takes a few
//! minutes: 2,000 studies are synthesised and loaded into Orthanc first).
//! Set `MESHGATE_BENCH_STUDIES` for another size.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "a benchmark fails loudly"
)]

use std::time::{Duration, Instant};

use meshgate_tests::cloud::{
    AWS_ACCESS_KEY_ID, AWS_DATASTORE, AWS_REGION, AZURE_CLIENT_ID, AZURE_PARTITION, AZURE_TENANT,
    Cloud, CloudStandIn,
};
use meshgate_tests::healthimaging::HealthImagingStandIn;
use meshgate_tests::{Gateway, Orthanc, SyntheticPartner, dicomweb_partner};
use serde_json::{Value, json};

const RUNS: usize = 3;
const COUNT_QUERY: &str = r#"
query Count($filter: StudyFilter) {
  cohortCount(project: "ground-truth", filter: $filter) { total partners { partner status code count } }
}"#;
const PAGE: &str = r#"
query Page($filter: StudyFilter) {
  imagingStudies(project: "ground-truth", filter: $filter, first: 20) {
    nodes { studyInstanceUid fhir }
    partners { partner status code count }
  }
}"#;

/// Requests and rows a backend has served so far.
type Counter<'a> = Box<dyn Fn() -> (u32, u32) + 'a>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let studies: usize = std::env::var("MESHGATE_BENCH_STUDIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let data = SyntheticPartner::new("bench", studies, 41);
    let orthanc = Orthanc::start("bench").await;
    let loading = Instant::now();
    orthanc.load(&data).await;
    eprintln!(
        "loaded {studies} studies into Orthanc in {:?}",
        loading.elapsed()
    );

    let dir = tempfile::tempdir().unwrap();
    let azure_secret = dir.path().join("azure");
    std::fs::write(&azure_secret, "azure-secret").unwrap();
    let aws_secret = dir.path().join("aws");
    std::fs::write(&aws_secret, "aws-secret").unwrap();
    let hour = Duration::from_secs(3600);
    let google = CloudStandIn::start(Cloud::Gcp, orthanc.port, hour, "").await;
    let azure = CloudStandIn::start(Cloud::Azure, orthanc.port, hour, "azure-secret").await;
    let amazon =
        CloudStandIn::start(Cloud::Aws { cap: 10_000 }, orthanc.port, hour, "aws-secret").await;
    let native = HealthImagingStandIn::start(&data.dicom_dir(), "aws-secret", u32::MAX).await;

    let partner = |kind: &str, body: String| {
        format!(
            "[[partners]]\nid = \"p\"\nname = \"{kind}\"\nutc_offset = \"+01:00\"\ndeadline_ms = 120000\n[partners.connector]\n{body}\n"
        )
    };
    let aws_credentials = format!(
        "credentials = {{ kind = \"static\", access_key_id = \"{AWS_ACCESS_KEY_ID}\", secret_access_key = \"${{file:{}}}\" }}",
        aws_secret.display()
    );
    let profiles: Vec<(&str, String, Counter<'_>)> = vec![
        (
            "orthanc (baseline)",
            dicomweb_partner("p", &orthanc.dicomweb_url(), 120_000, None),
            Box::new(|| (0, 0)),
        ),
        (
            "gcp",
            partner(
                "gcp",
                format!(
                    "kind = \"gcp\"\nproject = \"p\"\nlocation = \"l\"\ndataset = \"d\"\ndicom_store = \"s\"\nendpoint = \"{root}/v1\"\ncredentials = {{ kind = \"metadata_server\", url = \"{root}/computeMetadata/v1/instance/service-accounts/default/token\" }}",
                    root = google.root
                ),
            ),
            Box::new(|| (google.requests(), google.rows())),
        ),
        (
            "azure",
            partner(
                "azure",
                format!(
                    "kind = \"azure\"\nworkspace = \"w\"\nservice = \"s\"\npartition = \"{AZURE_PARTITION}\"\nendpoint = \"{root}\"\ncredentials = {{ kind = \"client_secret\", tenant = \"{AZURE_TENANT}\", client_id = \"{AZURE_CLIENT_ID}\", secret = \"${{file:{secret}}}\", authority = \"{root}\" }}",
                    root = azure.root,
                    secret = azure_secret.display()
                ),
            ),
            Box::new(|| (azure.requests(), azure.rows())),
        ),
        (
            "aws (DICOMweb)",
            partner(
                "aws",
                format!(
                    "kind = \"aws\"\nregion = \"{AWS_REGION}\"\ndatastore_id = \"{AWS_DATASTORE}\"\nendpoint = \"{root}\"\n{aws_credentials}",
                    root = amazon.root
                ),
            ),
            Box::new(|| (amazon.requests(), amazon.rows())),
        ),
        (
            "aws (native HealthImaging)",
            partner(
                "aws",
                format!(
                    "kind = \"aws\"\napi = \"native\"\nregion = \"{AWS_REGION}\"\ndatastore_id = \"{AWS_DATASTORE}\"\nendpoint = \"{root}\"\n{aws_credentials}",
                    root = native.root
                ),
            ),
            Box::new(|| (native.requests(), native.summaries())),
        ),
    ];
    let chest = json!({"modalities": ["CT", "MR"], "bodyPart": "CHEST",
                       "studyDate": {"from": "2018-01-01", "to": "2022-12-31"}});
    let women = json!({"patientSex": "FEMALE", "patientAge": {"min": 50, "max": 70}});
    let queries: [(&str, &str, &Value); 3] = [
        ("count: CT/MR chest 2018-2022", COUNT_QUERY, &chest),
        ("count: women 50-70", COUNT_QUERY, &women),
        (
            "first page of 20, FHIR: CT/MR chest 2018-2022",
            PAGE,
            &chest,
        ),
    ];
    println!(
        "| profile | query | median ms | ratio to orthanc | requests | rows/summaries | matches |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut baseline = Vec::new();
    for (name, table, counter) in &profiles {
        let gateway = Gateway::start(table).await;
        for (index, (label, query, filter)) in queries.iter().enumerate() {
            // Answers are cached per caller: every run is a new caller, so
            // every run asks the backend.
            let caller = |run: usize| {
                gateway.issuer.token(
                    &json!({"sub": format!("bench-{index}-{run}"), "roles": ["researcher"], "projects": ["ground-truth"]}),
                    std::time::Duration::from_secs(600),
                )
            };
            // One warm-up, so connection set-up and tokens are not measured.
            // Its requests are shown where later runs need fewer (what the
            // connector caches itself: Azure's series body parts).
            let (first_before, _) = counter();
            gateway
                .post_as(Some(&caller(RUNS)), query, json!({"filter": filter}))
                .await;
            let (requests_before, rows_before) = counter();
            let first = (requests_before - first_before) as usize;
            let mut times = Vec::new();
            let mut matches = Value::Null;
            for run in 0..RUNS {
                let token = caller(run);
                let started = Instant::now();
                let (_, body) = gateway
                    .post_as(Some(&token), query, json!({"filter": filter}))
                    .await;
                times.push(started.elapsed());
                let answer = &body["data"];
                let statuses = answer
                    .pointer("/cohortCount/partners")
                    .or_else(|| answer.pointer("/imagingStudies/partners"))
                    .unwrap();
                assert_eq!(statuses[0]["status"], "OK", "{name}: {answer}");
                matches = statuses[0]["count"].clone();
            }
            times.sort();
            let median = times[RUNS / 2].as_secs_f64() * 1000.0;
            let (requests, rows) = counter();
            let per_run = |after: u32, before: u32| (after - before) as usize / RUNS;
            if baseline.len() <= index {
                baseline.push(median);
            }
            let (requests, rows) = if name.starts_with("orthanc") {
                ("-".to_owned(), "-".to_owned())
            } else {
                let later = per_run(requests, requests_before);
                (
                    if first > later {
                        format!("{later} (first run {first})")
                    } else {
                        later.to_string()
                    },
                    per_run(rows, rows_before).to_string(),
                )
            };
            println!(
                "| {name} | {label} | {median:.0} | {:.2} | {requests} | {rows} | {matches} |",
                median / baseline[index]
            );
        }
    }
}
