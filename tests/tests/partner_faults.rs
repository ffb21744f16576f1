//! One failing partner never fails the query: a stopped Orthanc is reported
//! UNAVAILABLE and a partner slower than its deadline TIMEOUT, while the
//! other partners' answers stay complete.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::time::{Duration, Instant};

use meshgate_tests::{
    Cohort, Gateway, GroundTruth, Orthanc, SyntheticPartner, TcpProxy, dicomweb_partner,
    files_partner,
};
use serde_json::{Value, json};

const QUERY: &str = r#"
query Page($first: Int!) {
  imagingStudies(project: "ground-truth", first: $first) {
    nodes { partner studyInstanceUid }
    totalCount
    partners { partner status count code message latencyMs }
  }
  cohortCount(project: "ground-truth") { total complete partners { partner status count } }
}"#;

fn status<'a>(data: &'a Value, field: &str, partner: &str) -> &'a Value {
    data[field]["partners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["partner"] == partner)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_orthanc_is_unavailable_and_the_other_partners_answer_completely() {
    let (up, down, archive) = (
        SyntheticPartner::new("up", 20, 5),
        SyntheticPartner::new("down", 20, 6),
        SyntheticPartner::new("files", 15, 7),
    );
    let up_server = Orthanc::start("up").await;
    up_server.load(&up).await;
    let mut down_server = Orthanc::start("down").await;
    down_server.load(&down).await;
    let gateway = Gateway::start(&format!(
        "{}{}{}",
        dicomweb_partner("up", &up_server.dicomweb_url(), 5_000, None),
        dicomweb_partner("down", &down_server.dicomweb_url(), 5_000, None),
        files_partner("files", &archive.dicom_dir()),
    ))
    .await;
    down_server.stop();

    let data = gateway.query(QUERY, json!({"first": 100})).await;
    let down_status = status(&data, "imagingStudies", "down");
    assert_eq!(down_status["status"], "UNAVAILABLE", "{down_status}");
    assert_eq!(down_status["code"], "PARTNER_UNREACHABLE");
    assert!(down_status["count"].is_null());
    assert_eq!(
        status(&data, "cohortCount", "down")["status"],
        "UNAVAILABLE"
    );
    assert_eq!(data["cohortCount"]["complete"], false);

    let mut truth = GroundTruth::default();
    truth.add(&up);
    truth.add(&archive);
    let expected = truth.answer(&Cohort::default());
    let returned: Vec<(String, String)> = data["imagingStudies"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["partner"].as_str().unwrap().to_owned(),
                n["studyInstanceUid"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(returned, expected);
    assert_eq!(data["cohortCount"]["total"], expected.len());
    for partner in ["up", "files"] {
        assert_eq!(status(&data, "imagingStudies", partner)["status"], "OK");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_slower_than_its_deadline_times_out_and_the_answer_still_arrives_in_time() {
    let (slow, archive) = (
        SyntheticPartner::new("slow", 15, 8),
        SyntheticPartner::new("files", 15, 9),
    );
    let server = Orthanc::start("slow").await;
    server.load(&slow).await;
    // Every request to the slow partner is held back for three seconds.
    let proxy = TcpProxy::start(
        format!("127.0.0.1:{}", server.port).parse().unwrap(),
        Duration::from_secs(3),
    )
    .await;
    let deadline = Duration::from_millis(800);
    let gateway = Gateway::start(&format!(
        "{}{}",
        dicomweb_partner("slow", &proxy.url(), deadline.as_millis() as u64, None),
        files_partner("files", &archive.dicom_dir()),
    ))
    .await;

    let started = Instant::now();
    let data = gateway.query(QUERY, json!({"first": 50})).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed < deadline + Duration::from_millis(500),
        "the answer took {elapsed:?}"
    );

    let slow_status = status(&data, "imagingStudies", "slow");
    assert_eq!(slow_status["status"], "TIMEOUT", "{slow_status}");
    assert_eq!(slow_status["code"], "PARTNER_TIMEOUT");
    assert!(slow_status["latencyMs"].as_u64().unwrap() >= deadline.as_millis() as u64 - 5);
    let files_status = status(&data, "imagingStudies", "files");
    assert_eq!(files_status["status"], "OK");
    assert_eq!(files_status["count"], 15);
    assert_eq!(
        data["imagingStudies"]["nodes"].as_array().unwrap().len(),
        15
    );
    assert!(proxy.bytes_sent() > 0, "the slow partner was asked");
}
