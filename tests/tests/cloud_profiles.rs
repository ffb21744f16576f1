//! The Google Cloud, Azure and AWS HealthImaging DICOMweb profiles, end to
//! end: the same cohort cases as the Orthanc suite, through stand-ins that
//! behave as those services are documented to (URL layout, OAuth2 tokens
//! that expire, SigV4 signatures checked with AWS's own library, page
//! limits, `204` empties, repeated rows, throttling), each in front of a
//! real Orthanc holding a synthetic partner.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::path::Path;
use std::time::Duration;

use meshgate_gateway::synth::ManifestRow;
use meshgate_tests::cloud::{
    AWS_ACCESS_KEY_ID, AWS_DATASTORE, AWS_REGION, AZURE_CLIENT_ID, AZURE_PARTITION, AZURE_TENANT,
    Cloud, CloudStandIn,
};
use meshgate_tests::healthimaging::HealthImagingStandIn;
use meshgate_tests::{
    Gateway, GroundTruth, Orthanc, SyntheticPartner,
    cohort_counts_and_every_page_equal_the_ground_truth, walk,
};
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cloud_profiles_answer_the_cohort_cases_like_the_ground_truth() {
    let mut truth = GroundTruth::default();
    let google_data = SyntheticPartner::new("google", 60, 21);
    let azure_data = SyntheticPartner::new("azure", 50, 22);
    let google_orthanc = Orthanc::start("google").await;
    google_orthanc.load(&google_data).await;
    let azure_orthanc = Orthanc::start("azure").await;
    azure_orthanc.load(&azure_data).await;
    let amazon_data = SyntheticPartner::new("amazon", 40, 23);
    let amazon_orthanc = Orthanc::start("amazon").await;
    amazon_orthanc.load(&amazon_data).await;
    truth.add(&google_data);
    truth.add(&azure_data);
    truth.add(&amazon_data);

    // Two-second tokens: they expire, and are refreshed, during the run.
    let lifetime = Duration::from_secs(2);
    let google = CloudStandIn::start(Cloud::Gcp, google_orthanc.port, lifetime, "").await;
    let secret_dir = tempfile::tempdir().unwrap();
    // The Azure partner runs under a workload identity: a federated token
    // in a file the platform rotates (rotated below, mid-run).
    let federated_file = secret_dir.path().join("azure-federated-token");
    std::fs::write(&federated_file, "federated-token-one\n").unwrap();
    let aws_secret_file = secret_dir.path().join("aws-secret-access-key");
    std::fs::write(&aws_secret_file, "aws-test-secret-access-key\n").unwrap();
    let amazon = CloudStandIn::start(
        Cloud::Aws { cap: 10_000 },
        amazon_orthanc.port,
        lifetime,
        "aws-test-secret-access-key",
    )
    .await;
    let azure = CloudStandIn::start(
        Cloud::Azure,
        azure_orthanc.port,
        lifetime,
        "azure-test-client-secret",
    )
    .await;

    // No answer cache: the second run below must reach the stand-ins.
    let config = format!(
        r#"
[cache]
ttl_seconds = 0

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
credentials = {{ kind = "metadata_server", url = "{google}/computeMetadata/v1/instance/service-accounts/default/token" }}

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
credentials = {{ kind = "workload_identity", tenant = "{AZURE_TENANT}", client_id = "{AZURE_CLIENT_ID}", token_file = "{federated}", authority = "{azure}" }}

[[partners]]
id = "amazon"
name = "AWS partner"
utc_offset = "+01:00"
deadline_ms = 20000
[partners.connector]
kind = "aws"
region = "{AWS_REGION}"
datastore_id = "{AWS_DATASTORE}"
endpoint = "{amazon}"
page_size = 9
credentials = {{ kind = "static", access_key_id = "{AWS_ACCESS_KEY_ID}", secret_access_key = "${{file:{aws_secret}}}" }}
"#,
        google = google.root,
        azure = azure.root,
        amazon = amazon.root,
        federated = federated_file.display(),
        aws_secret = aws_secret_file.display(),
    );
    azure.trust_federated_token("federated-token-one");
    let gateway = Gateway::start(&config).await;
    // Body-part cohorts included: Azure can neither match nor return body
    // parts in a search, so they are read from instance metadata.
    cohort_counts_and_every_page_equal_the_ground_truth(&gateway, &truth, ["google", "azure"])
        .await;

    // The platform rotates the federated token; Entra ID trusts only the
    // new one, and the next token fetch reads it from the file.
    std::fs::write(&federated_file, "federated-token-two\n").unwrap();
    azure.trust_federated_token("federated-token-two");
    // And studies are being added meanwhile, so Azure's pages repeat the
    // previous page's last row, as it documents.
    azure.repeat_rows_across_pages(true);
    tokio::time::sleep(lifetime).await;
    cohort_counts_and_every_page_equal_the_ground_truth(&gateway, &truth, ["google", "azure"])
        .await;
    // Nothing the services document as unsupported was sent (Google's
    // refusals are the probe measuring UID lists and study-level
    // modality, which Google then does not get).
    assert_eq!(azure.unsupported(), 0, "Azure was sent an unsupported key");
    assert_eq!(amazon.unsupported(), 0, "AWS was sent an unsupported key");
    assert!(azure.throttled() > 0, "Azure answered busy (503)");

    // The start-up probe measured each service, through its auth: Azure
    // answers "no matches" with 204, the others with `[]`.
    let data = gateway
        .query(
            "{ partners { id capabilities { measured probe { feature supported } } } }",
            json!({}),
        )
        .await;
    for partner in data["partners"].as_array().unwrap() {
        let capabilities = &partner["capabilities"];
        assert_eq!(capabilities["measured"], true, "{partner}");
        let no_content = capabilities["probe"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["feature"] == "EMPTY_RESULT_NO_CONTENT")
            .unwrap()["supported"]
            .clone();
        assert_eq!(no_content, json!(partner["id"] == "azure"), "{partner}");
    }

    assert_eq!(amazon.refused(), 0, "every SigV4 signature verified");
    assert!(amazon.requests() > 0);
    // The stand-in does refuse what AWS would: a signature made with the
    // wrong secret, and a request signed too long ago.
    let url = reqwest::Url::parse(&format!(
        "{}/datastore/{AWS_DATASTORE}/studies",
        amazon.root
    ))
    .unwrap();
    for (secret, age) in [("not-the-secret", 0), ("aws-test-secret-access-key", 600)] {
        let headers = meshgate_connectors::sigv4::sign(
            "GET",
            &url,
            &[],
            b"",
            &meshgate_connectors::sigv4::AwsCredentials {
                access_key_id: AWS_ACCESS_KEY_ID.into(),
                secret_access_key: meshgate_connectors::Secret::new(secret),
                session_token: None,
            },
            meshgate_connectors::sigv4::Scope {
                region: AWS_REGION,
                service: "medical-imaging",
                time: time::OffsetDateTime::now_utc() - time::Duration::seconds(age),
            },
        );
        let mut request = reqwest::Client::new().get(url.clone());
        for (name, value) in headers {
            request = request.header(name, value);
        }
        assert_eq!(
            request.send().await.unwrap().status(),
            403,
            "{secret}, {age} s old"
        );
    }
    for (name, cloud) in [("google", &google), ("azure", &azure), ("amazon", &amazon)] {
        if name != "amazon" {
            assert!(cloud.tokens_issued() >= 2, "{name}: tokens were refreshed");
        }
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

/// A native HealthImaging partner's `[[partners]]` table.
fn healthimaging_partner(
    id: &str,
    stand_in: &HealthImagingStandIn,
    datastore: &str,
    secret: &Path,
) -> String {
    format!(
        r#"
[[partners]]
id = "{id}"
name = "{id}"
utc_offset = "+01:00"
deadline_ms = 20000
[partners.connector]
kind = "aws"
api = "native"
region = "{AWS_REGION}"
datastore_id = "{datastore}"
endpoint = "{root}"
credentials = {{ kind = "static", access_key_id = "{AWS_ACCESS_KEY_ID}", secret_access_key = "${{file:{secret}}}" }}
"#,
        root = stand_in.root,
        secret = secret.display(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthimaging_native_api_answers_the_cohort_cases_like_the_ground_truth() {
    let harbour_data = SyntheticPartner::new("harbour", 60, 31);
    let meadow_data = SyntheticPartner::new("meadow", 45, 32);
    let mut truth = GroundTruth::default();
    truth.add(&harbour_data);
    truth.add(&meadow_data);
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("aws-secret-access-key");
    std::fs::write(&secret, "aws-test-secret-access-key\n").unwrap();
    let key = "aws-test-secret-access-key";
    let harbour = HealthImagingStandIn::start(&harbour_data.dicom_dir(), key, 29).await;
    let meadow = HealthImagingStandIn::start(&meadow_data.dicom_dir(), key, 31).await;
    assert!(harbour.split_studies() >= 5, "some studies span image sets");
    assert!(
        harbour.non_primary() >= 5,
        "some studies have a conflicting, non-primary import"
    );
    let config = [
        healthimaging_partner("harbour", &harbour, AWS_DATASTORE, &secret),
        healthimaging_partner("meadow", &meadow, AWS_DATASTORE, &secret),
    ]
    .concat();
    let gateway = Gateway::start(&config).await;
    cohort_counts_and_every_page_equal_the_ground_truth(&gateway, &truth, ["harbour", "meadow"])
        .await;
    // Series come from the image sets' metadata, all parts of a split study.
    let (_, resources) = walk(&gateway, &json!({}), 200).await;
    let by_uid: std::collections::HashMap<&str, &ManifestRow> = truth
        .rows()
        .map(|(_, row)| (row.study_uid.as_str(), row))
        .collect();
    for resource in &resources {
        let uid = resource["identifier"][0]["value"]
            .as_str()
            .unwrap()
            .trim_start_matches("urn:oid:");
        let row = by_uid[uid];
        // Never from a non-primary (conflicting) import.
        assert_ne!(resource["description"], "CONFLICTING IMPORT", "{uid}");
        assert_eq!(resource["numberOfSeries"], row.number_of_series, "{uid}");
        assert_eq!(
            resource["numberOfInstances"], row.number_of_instances,
            "{uid}"
        );
    }
    for (name, stand_in) in [("harbour", &harbour), ("meadow", &meadow)] {
        assert_eq!(
            stand_in.refused(),
            0,
            "{name}: every SigV4 signature verified"
        );
        assert!(stand_in.throttled() > 0, "{name}: throttling was answered");
        println!(
            "{name}: {} image sets ({} studies split), {} requests: {} searches, {} metadata reads, {} throttled",
            stand_in.image_sets(),
            stand_in.split_studies(),
            stand_in.requests(),
            stand_in.searches(),
            stand_in.metadata_reads(),
            stand_in.throttled()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_stores_refused_credentials_and_throttling_are_told_apart() {
    let data = SyntheticPartner::new("ridge", 12, 33);
    let key = "aws-test-secret-access-key";
    let secret_dir = tempfile::tempdir().unwrap();
    let right = secret_dir.path().join("right");
    std::fs::write(&right, key).unwrap();
    let wrong = secret_dir.path().join("wrong");
    std::fs::write(&wrong, "not-the-secret").unwrap();
    let healthy = HealthImagingStandIn::start(&data.dicom_dir(), key, 1000).await;
    let always_throttled = HealthImagingStandIn::start(&data.dicom_dir(), key, 1).await;
    let config = [
        healthimaging_partner("ridge", &healthy, AWS_DATASTORE, &right),
        healthimaging_partner(
            "moved",
            &healthy,
            "fedcba9876543210fedcba9876543210",
            &right,
        ),
        healthimaging_partner("locked", &healthy, AWS_DATASTORE, &wrong),
        healthimaging_partner("busy", &always_throttled, AWS_DATASTORE, &right),
    ]
    .concat();
    let gateway = Gateway::start(&config).await;
    let throttled_before = always_throttled.throttled();
    let data = gateway
        .query(
            r#"query { cohortCount(project: "ground-truth") { total complete partners { partner status code } } }"#,
            json!({}),
        )
        .await;
    let statuses: Vec<(String, String, Value)> = data["cohortCount"]["partners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partner"].as_str().unwrap().to_owned(),
                p["status"].as_str().unwrap().to_owned(),
                p["code"].clone(),
            )
        })
        .collect();
    let expect = |partner: &str, status: &str, code: Value| {
        assert!(
            statuses.contains(&(partner.to_owned(), status.to_owned(), code.clone())),
            "{partner}: expected {status} {code} in {statuses:?}"
        );
    };
    expect("ridge", "OK", Value::Null);
    expect("moved", "ERROR", json!("PARTNER_STORE_NOT_FOUND"));
    expect("locked", "ERROR", json!("PARTNER_AUTH_FAILED"));
    expect("busy", "UNAVAILABLE", json!("PARTNER_THROTTLED"));
    assert_eq!(data["cohortCount"]["total"], 12);
    assert_eq!(data["cohortCount"]["complete"], false);
    // Throttled requests were tried again a few times, then given up on.
    assert_eq!(always_throttled.throttled() - throttled_before, 4);
    // Asked again and again, the partner gets retries only while its retry
    // budget lasts: four more queries send it 9 requests, not 16.
    let throttled_before = always_throttled.throttled();
    for _ in 0..4 {
        gateway
            .query(
                r#"query { cohortCount(project: "ground-truth", filter: {partners: ["busy"]}) { total } }"#,
                json!({}),
            )
            .await;
    }
    assert_eq!(always_throttled.throttled() - throttled_before, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_record_cap_is_reported_as_truncated_not_hidden() {
    let data = SyntheticPartner::new("capped", 40, 34);
    let orthanc = Orthanc::start("capped").await;
    orthanc.load(&data).await;
    let key = "aws-test-secret-access-key";
    // The stand-in returns at most 30 records per search, as AWS does
    // 10,000; the partner is configured with the same cap.
    let stand_in = CloudStandIn::start(
        Cloud::Aws { cap: 30 },
        orthanc.port,
        Duration::from_secs(60),
        key,
    )
    .await;
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("aws-secret-access-key");
    std::fs::write(&secret, key).unwrap();
    let config = format!(
        r#"
[[partners]]
id = "capped"
name = "Capped"
deadline_ms = 20000
[partners.connector]
kind = "aws"
region = "{AWS_REGION}"
datastore_id = "{AWS_DATASTORE}"
endpoint = "{root}"
page_size = 9
max_results = 30
credentials = {{ kind = "static", access_key_id = "{AWS_ACCESS_KEY_ID}", secret_access_key = "${{file:{secret}}}" }}
"#,
        root = stand_in.root,
        secret = secret.display(),
    );
    let gateway = Gateway::start(&config).await;
    let data = gateway
        .query(
            r#"query { cohortCount(project: "ground-truth") { total totalIsLowerBound complete partners { status count } } }"#,
            json!({}),
        )
        .await;
    let count = &data["cohortCount"];
    assert_eq!(count["partners"][0]["status"], "TRUNCATED", "{data}");
    assert_eq!(count["total"], 30, "{data}");
    assert_eq!(count["complete"], false, "{data}");
}
