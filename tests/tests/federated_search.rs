//! Federated study search end to end: three real Orthanc partners (each
//! loaded with its own synthetic partner) and one files partner, queried
//! through the real gateway over HTTP, checked against the synthesiser's
//! ground truth.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use meshgate_tests::{
    Cohort, Gateway, GroundTruth, OrthancPartner, PAGE_QUERY, SyntheticPartner,
    cohort_counts_and_every_page_equal_the_ground_truth, files_partner, validate_imaging_studies,
    walk,
};
use serde_json::{Value, json};
use time::macros::date;

struct Consortium {
    gateway: Gateway,
    truth: GroundTruth,
    orthancs: Vec<OrthancPartner>,
    _archive: SyntheticPartner,
}

impl Consortium {
    /// Bytes the gateway has sent to each Orthanc partner so far.
    fn bytes_sent(&self) -> Vec<u64> {
        self.orthancs.iter().map(|p| p.proxy.bytes_sent()).collect()
    }
}

async fn consortium() -> Consortium {
    let mut truth = GroundTruth::default();
    let mut orthancs = Vec::new();
    let mut config = String::new();
    for (id, studies, seed, page_size) in [
        ("north", 60, 1, Some(25)),
        ("south", 45, 2, None),
        ("east", 50, 3, Some(7)),
    ] {
        // Every DICOMweb partner is reached through a proxy that counts bytes,
        // so tests can prove no partner was called.
        let partner = OrthancPartner::start(id, studies, seed).await;
        config.push_str(&partner.table(10_000, page_size));
        truth.add(&partner.data);
        orthancs.push(partner);
    }
    let archive = SyntheticPartner::new("west", 40, 4);
    config.push_str(&files_partner("west", &archive.dicom_dir()));
    truth.add(&archive);
    Consortium {
        gateway: Gateway::start(&config).await,
        truth,
        orthancs,
        _archive: archive,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn federated_search_over_real_orthanc_partners() {
    let consortium = consortium().await;
    cohort_counts_and_every_page_equal_the_ground_truth(
        &consortium.gateway,
        &consortium.truth,
        ["north", "west"],
    )
    .await;
    paging_by_seven_returns_every_study_exactly_once_in_order(&consortium).await;
    every_returned_study_validates_as_fhir_r4_imaging_study(&consortium).await;
    a_page_loads_series_in_bulk_and_only_when_its_selection_shows_them(&consortium).await;
    a_modality_cohort_costs_one_request_per_partner_when_its_matches_fit_a_page(&consortium).await;
    invalid_input_is_refused_with_a_stable_code_and_no_partner_is_called(&consortium).await;
    partners_are_listed_with_their_connector_capabilities(&consortium).await;
}

async fn paging_by_seven_returns_every_study_exactly_once_in_order(c: &Consortium) {
    let cohort = Cohort {
        from: Some(date!(2012 - 01 - 01)),
        ..Cohort::default()
    };
    let (studies, _) = walk(&c.gateway, &cohort.filter(), 7).await;
    let expected = c.truth.answer(&cohort);
    assert!(expected.len() > 30);
    let unique: std::collections::HashSet<_> = studies.iter().collect();
    assert_eq!(unique.len(), studies.len(), "a study appeared twice");
    assert_eq!(studies, expected);
}

async fn every_returned_study_validates_as_fhir_r4_imaging_study(c: &Consortium) {
    let (studies, resources) = walk(&c.gateway, &json!({}), 100).await;
    assert_eq!(resources.len(), studies.len());
    for resource in &resources {
        assert!(
            !resource["series"].as_array().unwrap().is_empty(),
            "series are loaded: {resource}"
        );
    }
    validate_imaging_studies(&resources);
}

async fn a_modality_cohort_costs_one_request_per_partner_when_its_matches_fit_a_page(
    c: &Consortium,
) {
    let requests = || -> Vec<u64> { c.orthancs.iter().map(|p| p.proxy.requests()).collect() };
    for (i, modalities) in [json!(["CT"]), json!(["MR"]), json!(["CT", "MR"])]
        .into_iter()
        .enumerate()
    {
        // A fresh caller each time: cached answers are per caller.
        let who = c.gateway.issuer.token(
            &json!({"sub": format!("plan-{i}"), "roles": ["researcher"], "projects": ["ground-truth"]}),
            std::time::Duration::from_secs(300),
        );
        let before = requests();
        let (_, body) = c
            .gateway
            .post_as(
                Some(&who),
                "query($f: StudyFilter) { cohortCount(project: \"ground-truth\", filter: $f) { complete partners { partner status } } }",
                json!({"f": {"modalities": modalities, "partners": ["south"]}}),
            )
            .await;
        let count = &body["data"]["cohortCount"];
        assert_eq!(count["complete"], true, "{body}");
        let made: Vec<u64> = requests().iter().zip(&before).map(|(a, b)| a - b).collect();
        // South (45 studies, pages of 1,000): one study-level request, not
        // a series-level search and then the studies by UID. Its answer is
        // checked against the ground truth with every other cohort.
        assert_eq!(made, [0, 1, 0], "{modalities}: requests per partner");
    }
}

async fn a_page_loads_series_in_bulk_and_only_when_its_selection_shows_them(c: &Consortium) {
    // Fresh callers: cached answers are per caller, so each is asked anew.
    let token = |sub: &str| {
        c.gateway.issuer.token(
            &json!({"sub": sub, "roles": ["researcher"], "projects": ["ground-truth"]}),
            std::time::Duration::from_secs(300),
        )
    };
    let requests = || -> Vec<u64> { c.orthancs.iter().map(|p| p.proxy.requests()).collect() };
    let ask = async |who: &str, selection: &str| {
        let before = requests();
        let query = format!(
            "{{ imagingStudies(project: \"ground-truth\", first: 200, filter: {{partners: [\"north\", \"south\", \"east\"]}}) {{ nodes {{ partner studyInstanceUid {selection} }} partners {{ partner status }} }} }}"
        );
        let (_, body) = c.gateway.post_as(Some(who), &query, json!({})).await;
        let page = &body["data"]["imagingStudies"];
        assert!(
            page["partners"]
                .as_array()
                .unwrap()
                .iter()
                .all(|s| s["status"] == "OK"),
            "{page}"
        );
        let after = requests();
        let made: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        (page["nodes"].as_array().unwrap().clone(), made)
    };
    let (_, without) = ask(&token("uids-only"), "").await;
    let (nodes, with) = ask(&token("with-fhir"), "fhir").await;
    // 155 studies over three partners: two requests per study would be 310.
    assert_eq!(nodes.len(), 155);
    // North pages by 25 rows, east by 7: their requests are pages, not studies.
    for ((partner, without), with) in ["north", "south", "east"].iter().zip(&without).zip(&with) {
        let studies = nodes.iter().filter(|n| n["partner"] == *partner).count() as u64;
        println!(
            "{partner}: series and instances of {studies} studies in {} requests",
            with - without
        );
        if *partner != "east" {
            assert!(
                with - without < studies / 2,
                "{partner}: {studies} studies' series took {} requests",
                with - without
            );
        }
    }
    // South pages by 1,000: its 45 studies' series and instances are two
    // searches (each ending on an empty page).
    assert!(
        with[1] - without[1] <= 4,
        "south: {:?} vs {:?}",
        with,
        without
    );
    // FHIR selected through a fragment still gets its series.
    let (_, body) = c
        .gateway
        .post_as(
            Some(&token("through-a-fragment")),
            "query { imagingStudies(project: \"ground-truth\", first: 5) { nodes { ...Resource } } }
             fragment Resource on ImagingStudy { ... on ImagingStudy { fhir } }",
            json!({}),
        )
        .await;
    let resources = body["data"]["imagingStudies"]["nodes"].as_array().unwrap();
    assert_eq!(resources.len(), 5, "{body}");
    assert!(
        resources.iter().all(|n| n["fhir"]["series"]
            .as_array()
            .is_some_and(|s| !s.is_empty())),
        "{body}"
    );
    // Bulk-loaded series are each study's own.
    let rows: std::collections::HashMap<String, (u32, u32)> = c
        .truth
        .rows()
        .map(|(_, row)| {
            (
                row.study_uid.clone(),
                (row.number_of_series, row.number_of_instances),
            )
        })
        .collect();
    for node in &nodes {
        let fhir = &node["fhir"];
        let uid = node["studyInstanceUid"].as_str().unwrap();
        let series = fhir["series"].as_array().unwrap();
        let instances: usize = series
            .iter()
            .map(|s| s["instance"].as_array().map_or(0, Vec::len))
            .sum();
        assert_eq!((series.len() as u32, instances as u32), rows[uid], "{uid}");
    }
}

async fn invalid_input_is_refused_with_a_stable_code_and_no_partner_is_called(c: &Consortium) {
    let before: Vec<u64> = c.bytes_sent();
    let cases = [
        (
            json!({"filter": {"modalities": ["XYZ"]}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"patientSex": "UNKNOWN"}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"studyDate": {"from": "2019-02-30"}}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"studyDate": {"from": "-001-01-01"}}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"studyDate": {"to": "0000-12-31"}}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"studyDate": {"to": "+10000-01-01"}}, "first": 5}),
            "GRAPHQL_VALIDATION_FAILED",
        ),
        (
            json!({"filter": {"studyDate": {"from": "2022-01-01", "to": "2018-01-01"}}, "first": 5}),
            "INVALID_FILTER",
        ),
        (
            json!({"filter": {"patientAge": {"min": 70, "max": 50}}, "first": 5}),
            "INVALID_FILTER",
        ),
        (
            json!({"filter": {"bodyPart": "CHEST*"}, "first": 5}),
            "INVALID_FILTER",
        ),
        (
            json!({"filter": {"studyInstanceUids": ["1.2.3*"]}, "first": 5}),
            "INVALID_FILTER",
        ),
        (
            json!({"filter": {"partners": ["nowhere"]}, "first": 5}),
            "INVALID_FILTER",
        ),
        (json!({"first": -1}), "INVALID_PAGE_SIZE"),
        (json!({"first": 0}), "INVALID_PAGE_SIZE"),
        (json!({"first": 100000}), "INVALID_PAGE_SIZE"),
        (
            json!({"first": 5, "after": "not-a-cursor"}),
            "INVALID_CURSOR",
        ),
        (json!({"first": 5, "after": "eyJ2IjoxfQ"}), "INVALID_CURSOR"),
    ];
    for (variables, code) in cases {
        let (_, body) = c.gateway.post(PAGE_QUERY, variables.clone()).await;
        assert_eq!(
            body["errors"][0]["extensions"]["code"], code,
            "{variables}: {body}"
        );
        assert!(
            body["data"].is_null() || body["data"]["imagingStudies"].is_null(),
            "{body}"
        );
    }
    let after_invalid: Vec<u64> = c.bytes_sent();
    assert_eq!(
        after_invalid, before,
        "an invalid request reached a partner"
    );
    // A cursor from one filter is refused for another.
    let data = c
        .gateway
        .query(
            PAGE_QUERY,
            json!({"filter": {"modalities": ["CT"]}, "first": 1}),
        )
        .await;
    let cursor = data["imagingStudies"]["pageInfo"]["endCursor"].clone();
    let before_other = c.bytes_sent();
    let (_, body) = c
        .gateway
        .post(
            PAGE_QUERY,
            json!({"filter": {"modalities": ["MR"]}, "first": 1, "after": cursor}),
        )
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"], "INVALID_CURSOR",
        "{body}"
    );
    assert_eq!(c.bytes_sent(), before_other);
    // Malformed GraphQL never reaches execution.
    let (status, body) = c
        .gateway
        .post(
            "{ imagingStudies(project: \"ground-truth\", first: 5) { nodes { ",
            json!({}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body["errors"][0]["extensions"]["code"],
        "GRAPHQL_PARSE_FAILED"
    );
    let (_, body) = c
        .gateway
        .post(
            "{ cohortCount(project: \"ground-truth\") { totl } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body["errors"][0]["extensions"]["code"],
        "GRAPHQL_VALIDATION_FAILED"
    );

    assert_eq!(
        c.bytes_sent(),
        before_other,
        "an invalid request reached a partner"
    );
}

async fn partners_are_listed_with_their_connector_capabilities(c: &Consortium) {
    let data = c
        .gateway
        .query(
            "{ partners { id name connectorKind capabilities { nativeFilters paging maxPageSize measured probe { feature supported } } } }",
            json!({}),
        )
        .await;
    let partners = data["partners"].as_array().unwrap();
    let ids: Vec<&str> = partners.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["north", "south", "east", "west"]);
    assert_eq!(partners[0]["connectorKind"], "DICOMWEB");
    assert_eq!(partners[0]["capabilities"]["paging"], "LIMIT_OFFSET");
    // Orthanc's behaviour, as measured by the start-up probe: everything a
    // cohort search needs, except paging ModalitiesInStudy (its DICOMweb
    // plugin returns nothing past the first page), so a modality is asked
    // as one first page, or at series level when that page is full; "no
    // matches" is `200 []`, not `204`.
    for orthanc in &partners[..3] {
        let capabilities = &orthanc["capabilities"];
        assert_eq!(capabilities["measured"], true, "{orthanc}");
        let found: Vec<(String, Value)> = capabilities["probe"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                (
                    f["feature"].as_str().unwrap().to_owned(),
                    f["supported"].clone(),
                )
            })
            .collect();
        let expected: Vec<(String, Value)> = [
            ("LIMIT", true),
            ("OFFSET", true),
            ("WILDCARD", true),
            ("UID_LISTS", true),
            ("EMPTY_RESULT_NO_CONTENT", false),
            ("STUDY_LEVEL_MODALITY", true),
            ("MODALITY_LISTS", true),
            ("MODALITY_PAGING", false),
            ("MODALITY_FIRST_PAGE", true),
        ]
        .into_iter()
        .map(|(f, s)| (f.to_owned(), Value::Bool(s)))
        .collect();
        assert_eq!(found, expected, "{}", orthanc["id"]);
    }
    assert_eq!(partners[3]["connectorKind"], "FILES");
    assert_eq!(partners[3]["capabilities"]["measured"], false);
    assert_eq!(
        partners[3]["capabilities"]["nativeFilters"]
            .as_array()
            .unwrap()
            .len(),
        7
    );
}
