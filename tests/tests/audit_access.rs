//! Governance reading the audit log: who may see which events, and the
//! export as FHIR AuditEvent, validated independently.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::time::Duration;

use meshgate_gateway::demo::tokens;
use meshgate_tests::{Gateway, Policies, SyntheticPartner, files_partner, validate_fhir};
use serde_json::{Value, json};

const EVENTS: &str = r#"
query Events($filter: AuditFilter, $after: String) {
  auditEvents(filter: $filter, first: 100, after: $after) {
    nodes { sequence subject institution outcome operation errorCodes
            accesses { field project filter partners { partner status disclosure count } } }
    hasNextPage endCursor
  }
}"#;

/// Every event `token` may see (all pages), oldest last.
async fn events(gateway: &Gateway, token: &str, filter: Value) -> Vec<Value> {
    let mut all = Vec::new();
    let mut after = Value::Null;
    loop {
        let (status, body) = gateway
            .post_as(
                Some(token),
                EVENTS,
                json!({"filter": filter, "after": after}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        let page = &body["data"]["auditEvents"];
        all.extend(page["nodes"].as_array().unwrap().iter().cloned());
        if page["hasNextPage"] != true {
            return all;
        }
        after = page["endCursor"].clone();
    }
}

fn partners_of(event: &Value) -> Vec<String> {
    event["accesses"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|a| a["partners"].as_array().unwrap().iter())
        .map(|p| p["partner"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_events_are_scoped_by_policy_and_export_as_valid_fhir_audit_events() {
    let mut config = String::new();
    let mut data = Vec::new();
    for (id, seed) in [("north", 51), ("south", 52), ("east", 53)] {
        let partner = SyntheticPartner::new(id, 12, seed);
        config.push_str(&files_partner(id, &partner.dicom_dir()));
        data.push(partner);
    }
    let gateway = Gateway::start_with(&config, Policies::Examples).await;
    let ttl = Duration::from_secs(600);
    let demo = tokens(&gateway.issuer, ttl);
    let (researcher, north_admin, governance) = (&demo[0].1, &demo[1].1, &demo[2].1);
    let other_researcher = gateway.issuer.token(
        &json!({"sub": "other-researcher", "institution": "westfield-university",
                "roles": ["researcher"], "projects": ["demo"]}),
        ttl,
    );

    let count = r#"query Count($filter: StudyFilter) { cohortCount(project: "demo", filter: $filter) { total } }"#;
    for (token, partners) in [
        (researcher, json!(["north"])),
        (researcher, json!(["south"])),
        (&other_researcher, json!(["south", "east"])),
        (&other_researcher, json!(["north", "south"])),
    ] {
        let (status, body) = gateway
            .post_as(
                Some(token),
                count,
                json!({"filter": {"partners": partners, "modalities": ["CT"]}}),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    // A refused request is audited too.
    let (status, _) = gateway.post_as(Some("not-a-token"), count, json!({})).await;
    assert_eq!(status, 401);

    // Governance sees everything, including the refusal.
    let all = events(&gateway, governance, json!({})).await;
    assert!(all.len() >= 4, "{all:?}");
    assert!(
        all.iter()
            .any(|e| e["outcome"] == "FAILURE" && e["subject"].is_null())
    );
    let sequences: Vec<i64> = all
        .iter()
        .map(|e| e["sequence"].as_i64().unwrap())
        .collect();
    assert!(
        sequences.windows(2).all(|w| w[0] > w[1]),
        "newest first: {sequences:?}"
    );
    let queried = all
        .iter()
        .rev()
        .find(|e| e["subject"] == "other-researcher")
        .unwrap();
    let filter: Value =
        serde_json::from_str(queried["accesses"][0]["filter"].as_str().unwrap()).unwrap();
    assert_eq!(
        filter["partners"],
        json!(["east", "south"]),
        "the normalised query is recorded"
    );

    // A researcher sees their own events only.
    let own = events(&gateway, researcher, json!({})).await;
    assert!(own.len() >= 2);
    assert!(
        own.iter().all(|e| e["subject"] == "demo-researcher"),
        "{own:?}"
    );
    let others = events(
        &gateway,
        &other_researcher,
        json!({"subject": "demo-researcher"}),
    )
    .await;
    assert!(
        others.is_empty(),
        "a researcher cannot read others' events: {others:?}"
    );

    // A partner admin sees the events that touched its partner, and its own.
    let north = events(&gateway, north_admin, json!({})).await;
    assert!(!north.is_empty());
    for event in &north {
        assert!(
            partners_of(event).contains(&"north".to_owned())
                || event["subject"] == "demo-north-admin",
            "north's admin saw an event not involving north: {event}"
        );
    }
    // ... and of an event that touched north and south, only north's part:
    // south's decision, status and count are not north's to read.
    let both = north
        .iter()
        .find(|e| e["subject"] == "other-researcher")
        .expect("the north-and-south query is visible to north's admin");
    assert_eq!(partners_of(both), ["north"], "{both}");
    let whole = all
        .iter()
        .find(|e| e["sequence"] == both["sequence"])
        .unwrap();
    assert_eq!(
        partners_of(whole),
        ["north", "south"],
        "governance sees all"
    );
    let south_only = events(&gateway, north_admin, json!({"partner": "south"})).await;
    assert!(
        south_only
            .iter()
            .all(|e| partners_of(e).contains(&"north".to_owned())
                || e["subject"] == "demo-north-admin"),
        "{south_only:?}"
    );
    assert!(
        south_only
            .iter()
            .filter(|e| e["subject"] == "other-researcher")
            .all(|e| partners_of(e) == ["north"]),
        "another partner's events, and parts, stay hidden"
    );

    // Filters: by subject and outcome, for governance.
    let failures = events(&gateway, governance, json!({"outcome": "FAILURE"})).await;
    assert!(failures.iter().all(|e| e["outcome"] == "FAILURE"));
    let by_subject = events(&gateway, governance, json!({"subject": "other-researcher"})).await;
    assert!(
        !by_subject.is_empty()
            && by_subject
                .iter()
                .all(|e| e["subject"] == "other-researcher")
    );

    // The FHIR export, as governance: one AuditEvent per line, valid R4.
    let root = gateway.url.trim_end_matches("/graphql");
    let response = reqwest::Client::new()
        .get(format!("{root}/audit/AuditEvent.ndjson"))
        .bearer_auth(governance)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "application/fhir+ndjson"
    );
    let text = response.text().await.unwrap();
    let resources: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert!(resources.len() >= all.len());
    assert!(
        !text.contains(researcher.as_str()),
        "no token in the export"
    );
    validate_fhir("AuditEvent", &resources);
    // The researcher's export holds their own events only.
    let export = async |token: &str| {
        reqwest::Client::new()
            .get(format!("{root}/audit/AuditEvent.ndjson"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let mine = export(researcher).await;
    for line in mine.lines() {
        let event: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            event["agent"][0]["who"]["identifier"]["value"],
            "demo-researcher"
        );
    }
    // North's admin's export holds only north's part of others' events.
    let northern = export(north_admin).await;
    assert!(!northern.is_empty());
    assert!(!northern.contains("\"south\""), "{northern}");
    // Exporting was itself audited.
    let exports = events(&gateway, governance, json!({})).await;
    assert!(exports.iter().any(|e| e["operation"] == "auditExport"));
}
