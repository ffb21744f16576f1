//! The Google Cloud and Azure DICOMweb profiles, end to end: the same cohort
//! cases as the Orthanc suite, through stand-ins that behave as those
//! services are documented to (URL layout, OAuth2 tokens that expire, page
//! limits, `204` empties, repeated rows, throttling), each in front of a
//! real Orthanc holding a synthetic partner.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::time::Duration;

use meshgate_tests::cloud::{AZURE_CLIENT_ID, AZURE_PARTITION, AZURE_TENANT, Cloud, CloudStandIn};
use meshgate_tests::{
    Gateway, GroundTruth, Orthanc, SyntheticPartner,
    cohort_counts_and_every_page_equal_the_ground_truth,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloud_profiles_answer_the_cohort_cases_like_the_ground_truth() {
    let mut truth = GroundTruth::default();
    let google_data = SyntheticPartner::new("google", 60, 21);
    let azure_data = SyntheticPartner::new("azure", 50, 22);
    let google_orthanc = Orthanc::start("google").await;
    google_orthanc.load(&google_data).await;
    let azure_orthanc = Orthanc::start("azure").await;
    azure_orthanc.load(&azure_data).await;
    truth.add(&google_data);
    truth.add(&azure_data);

    // Two-second tokens: they expire, and are refreshed, during the run.
    let lifetime = Duration::from_secs(2);
    let google = CloudStandIn::start(Cloud::Gcp, google_orthanc.port, lifetime, "").await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret_file = secret_dir.path().join("azure-client-secret");
    std::fs::write(&secret_file, "azure-test-client-secret\n").unwrap();
    let azure = CloudStandIn::start(
        Cloud::Azure,
        azure_orthanc.port,
        lifetime,
        "azure-test-client-secret",
    )
    .await;

    let config = format!(
        r#"
[[partners]]
id = "google"
name = "Google Cloud partner"
utc_offset = "+01:00"
deadline_ms = 20000
[partners.connector]
kind = "gcp"
project = "meshgate-tests"
location = "europe-west4"
dataset = "consortium"
dicom_store = "google"
endpoint = "{google}/v1"
page_size = 25
credentials = {{ kind = "metadata_server", url = "{google}/computeMetadata/v1/token" }}

[[partners]]
id = "azure"
name = "Azure partner"
utc_offset = "+01:00"
deadline_ms = 20000
[partners.connector]
kind = "azure"
workspace = "meshgate"
service = "tests"
partition = "{AZURE_PARTITION}"
endpoint = "{azure}"
page_size = 7
credentials = {{ kind = "client_secret", tenant = "{AZURE_TENANT}", client_id = "{AZURE_CLIENT_ID}", secret = "${{file:{secret}}}", authority = "{azure}" }}
"#,
        google = google.root,
        azure = azure.root,
        secret = secret_file.display(),
    );
    let gateway = Gateway::start(&config).await;
    cohort_counts_and_every_page_equal_the_ground_truth(&gateway, &truth, ["google", "azure"])
        .await;

    for (name, cloud) in [("google", &google), ("azure", &azure)] {
        assert!(cloud.tokens_issued() >= 2, "{name}: tokens were refreshed");
        assert!(cloud.throttled() > 0, "{name}: throttling was answered");
        println!(
            "{name}: {} requests, {} tokens, {} throttled, {} refused",
            cloud.requests(),
            cloud.tokens_issued(),
            cloud.throttled(),
            cloud.refused()
        );
    }
}
