//! Who sees what, end to end: three real Orthanc partners under the shipped
//! example policies. North releases de-identified records with shifted
//! dates and patient characteristics, south only counts, east (a dataset for
//! health research only) refuses the general-research `demo` project and
//! serves `lung-cancer` under the strictest profile.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::{BTreeMap, BTreeSet};

use meshgate_tests::{Cohort, Gateway, GroundTruth, OrthancPartner, Policies};
use serde_json::{Value, json};
use time::Date;

const PAGE_QUERY: &str = r#"
query Page($project: String!, $filter: StudyFilter, $after: String) {
  imagingStudies(project: $project, filter: $filter, first: 25, after: $after) {
    nodes {
      studyInstanceUid partner started description modalities
      patient { reference sex age }
      deidentification { profile options datesShiftedPerStudy }
      fhir
    }
    pageInfo { hasNextPage endCursor }
    totalCount
    partners { partner status disclosure deidentificationProfile count countDisclosure reasons code cached }
  }
}"#;

const COUNT_QUERY: &str = r#"
query Count($project: String!, $filter: StudyFilter) {
  cohortCount(project: $project, filter: $filter) {
    total totalIsLowerBound
    partners { partner status disclosure count countDisclosure reasons cached }
  }
}"#;

struct Consortium {
    gateway: Gateway,
    truth: GroundTruth,
    partners: Vec<OrthancPartner>,
}

impl Consortium {
    /// Bytes the gateway has sent to each partner so far.
    fn bytes_sent(&self) -> Vec<u64> {
        self.partners.iter().map(|p| p.proxy.bytes_sent()).collect()
    }
}

async fn consortium() -> Consortium {
    let mut truth = GroundTruth::default();
    let mut partners = Vec::new();
    let mut config = String::new();
    for (id, studies, seed) in [("north", 60, 11), ("south", 45, 12), ("east", 50, 13)] {
        let partner = OrthancPartner::start(id, studies, seed).await;
        config.push_str(&partner.table(10_000, None));
        truth.add(&partner.data);
        partners.push(partner);
    }
    Consortium {
        gateway: Gateway::start_with(&config, Policies::Examples).await,
        truth,
        partners,
    }
}

/// Every page of a query: the nodes, the last page's partner statuses, and
/// every raw response body.
async fn all_pages(
    gateway: &Gateway,
    project: &str,
    filter: Value,
) -> (Vec<Value>, Value, Vec<u8>) {
    let mut nodes = Vec::new();
    let mut raw = Vec::new();
    let mut after = Value::Null;
    loop {
        let (status, bytes) = gateway
            .post_raw(
                Some(&gateway.token),
                PAGE_QUERY,
                json!({"project": project, "filter": filter, "after": after}),
            )
            .await;
        assert_eq!(status, 200);
        raw.extend_from_slice(&bytes);
        let body: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(body.get("errors").is_none(), "{body}");
        let page = &body["data"]["imagingStudies"];
        nodes.extend(page["nodes"].as_array().unwrap().iter().cloned());
        if page["pageInfo"]["hasNextPage"] != true {
            return (nodes, page["partners"].clone(), raw);
        }
        after = page["pageInfo"]["endCursor"].clone();
    }
}

fn status<'a>(statuses: &'a Value, partner: &str) -> &'a Value {
    statuses
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["partner"] == partner)
        .unwrap()
}

#[tokio::test]
async fn each_partner_discloses_what_its_policy_allows_and_nothing_identifying_leaves() {
    let c = consortium().await;

    // lung-cancer: north and east release de-identified records, south counts.
    let (nodes, statuses, raw) = all_pages(&c.gateway, "lung-cancer", json!({})).await;
    let north = status(&statuses, "north");
    assert_eq!(
        (
            north["disclosure"].as_str(),
            north["deidentificationProfile"].as_str()
        ),
        (
            Some("DEIDENTIFIED"),
            Some("basic+retain-longitudinal-modified-dates+retain-patient-characteristics")
        )
    );
    assert_eq!(status(&statuses, "south")["disclosure"], "COUNTS_ONLY");
    // South only counts, so its count is perturbed: close to 45, never exact by promise.
    let south = status(&statuses, "south");
    assert_eq!(south["countDisclosure"], "APPROXIMATE");
    assert!(
        south["count"].as_u64().unwrap().abs_diff(45) <= 2,
        "{south}"
    );
    assert_eq!(
        status(&statuses, "east")["deidentificationProfile"],
        "basic"
    );
    let by_partner = |p: &str| nodes.iter().filter(|n| n["partner"] == p).count();
    assert_eq!(
        (by_partner("north"), by_partner("south"), by_partner("east")),
        (60, 0, 50)
    );

    // No identifier from the partners' DICOM files appears anywhere in the bytes.
    let text = String::from_utf8(raw).unwrap();
    let mut checked = 0;
    for partner in c.partners.iter().map(|p| &p.data) {
        for value in partner.identifiers() {
            assert!(!text.contains(&value), "{} leaked {value}", partner.id);
            checked += 1;
        }
    }
    assert!(checked > 1000, "only {checked} identifiers checked");

    for node in &nodes {
        let uid = node["studyInstanceUid"].as_str().unwrap();
        assert!(uid.starts_with("2.25.") && uid.len() <= 44, "{uid}");
        assert!(node["description"].is_null());
        assert!(
            node["patient"]["reference"]
                .as_str()
                .unwrap()
                .starts_with("pt-")
        );
        let security = node["fhir"]["meta"]["security"].as_array().unwrap();
        assert!(security.iter().any(|c| c["code"] == "PSEUDED"));
        assert!(security.iter().any(|c| c["code"] == "113100"));
        if node["partner"] == "east" {
            // The strictest profile: no dates, no sex, no age.
            assert!(node["started"].is_null() && node["fhir"]["started"].is_null());
            assert!(node["patient"]["sex"].is_null() && node["patient"]["age"].is_null());
        } else {
            assert!(security.iter().any(|c| c["code"] == "113107"));
            assert!(node["started"].is_string());
            let age = node["patient"]["age"].as_str().unwrap();
            assert!(age == "90+" || age.parse::<u16>().unwrap() < 90, "{age}");
        }
    }

    // demo: east refuses with a reason the researcher can act on, and is not asked.
    let (_, statuses, _) = all_pages(&c.gateway, "demo", json!({})).await;
    let east = status(&statuses, "east");
    assert_eq!(
        (east["status"].as_str(), east["code"].as_str()),
        (Some("DENIED"), Some("POLICY_DENIED"))
    );
    assert!(
        east["reasons"][0]
            .as_str()
            .unwrap()
            .contains("project demo is not approved for east's dataset"),
        "{east}"
    );
}

#[tokio::test]
async fn pseudonyms_are_stable_within_a_project_unlinkable_across_projects_and_keep_intervals() {
    let c = consortium().await;
    let north = json!({"partners": ["north"]});
    let uids = |nodes: &[Value]| -> Vec<String> {
        nodes
            .iter()
            .map(|n| n["studyInstanceUid"].as_str().unwrap().to_owned())
            .collect()
    };
    let (first, _, _) = all_pages(&c.gateway, "lung-cancer", north.clone()).await;
    let (again, _, _) = all_pages(&c.gateway, "lung-cancer", north.clone()).await;
    assert_eq!(
        uids(&first),
        uids(&again),
        "same project, same pseudonyms, same order"
    );
    let (other, _, _) = all_pages(&c.gateway, "demo", north).await;
    assert_eq!(other.len(), first.len());
    let a: BTreeSet<String> = uids(&first).into_iter().collect();
    let b: BTreeSet<String> = uids(&other).into_iter().collect();
    assert!(
        a.is_disjoint(&b),
        "pseudonyms must not link across projects"
    );
    // Studies are found again by their pseudonymous UIDs (12: at least the
    // partner's threshold, below which it releases nothing), never by their
    // original ones.
    let wanted: Vec<String> = uids(&first).into_iter().take(12).collect();
    let (found, _, _) = all_pages(
        &c.gateway,
        "lung-cancer",
        json!({"partners": ["north"], "studyInstanceUids": wanted}),
    )
    .await;
    let mut found = uids(&found);
    found.sort();
    let mut expected = wanted.clone();
    expected.sort();
    assert_eq!(found, expected);
    let original: Vec<String> = c
        .truth
        .rows()
        .filter(|(partner, _)| partner == "north")
        .take(12)
        .map(|(_, row)| row.study_uid.clone())
        .collect();
    let (found, statuses_by_original, _) = all_pages(
        &c.gateway,
        "lung-cancer",
        json!({"partners": ["north"], "studyInstanceUids": original}),
    )
    .await;
    assert!(found.is_empty(), "original UIDs must not match");
    assert_eq!(
        status(&statuses_by_original, "north")["countDisclosure"],
        "SUPPRESSED"
    );

    let patients = |nodes: &[Value]| -> BTreeSet<String> {
        nodes
            .iter()
            .map(|n| n["patient"]["reference"].as_str().unwrap().to_owned())
            .collect()
    };
    assert!(patients(&first).is_disjoint(&patients(&other)));

    // Each patient's studies keep their intervals: the shifted dates of a
    // pseudonymous patient are a real patient's dates moved by one constant.
    let shown = dates_by_patient(first.iter().map(|n| {
        (
            n["patient"]["reference"].as_str().unwrap().to_owned(),
            Date::parse(
                &n["started"].as_str().unwrap()[..10],
                time::macros::format_description!("[year]-[month]-[day]"),
            )
            .unwrap(),
        )
    }));
    let truth = dates_by_patient(
        c.truth
            .rows()
            .filter(|(partner, _)| partner == "north")
            .map(|(_, row)| (row.patient_id.clone(), row.study_date)),
    );
    assert_eq!(shown.len(), truth.len(), "one pseudonym per patient");
    let mut several = 0;
    for dates in shown.values().filter(|d| d.len() > 1) {
        let kept = truth.values().any(|real| {
            real.len() == dates.len() && {
                let shift = dates[0] - real[0];
                (-1095..=-1).contains(&shift.whole_days())
                    && real.iter().zip(dates).all(|(r, d)| *d - *r == shift)
            }
        });
        assert!(
            kept,
            "no patient has the dates {dates:?} shifted by one constant"
        );
        several += 1;
    }
    assert!(several >= 5, "only {several} patients with several studies");
}

fn dates_by_patient(rows: impl Iterator<Item = (String, Date)>) -> BTreeMap<String, Vec<Date>> {
    let mut patients: BTreeMap<String, Vec<Date>> = BTreeMap::new();
    for (patient, date) in rows {
        patients.entry(patient).or_default().push(date);
    }
    for dates in patients.values_mut() {
        dates.sort();
    }
    patients
}

#[tokio::test]
async fn small_counts_are_suppressed_and_cannot_be_recovered_by_subtraction_repetition_or_slicing()
{
    let c = consortium().await;
    // A cohort with a small (1-9) count at some partner and a disclosed one
    // elsewhere: studies up to the end of some year.
    let (filter, small_partner, true_count) = (2005..=2025)
        .find_map(|year| {
            let answer = c.truth.answer(&Cohort {
                to: Some(Date::from_calendar_date(year, time::Month::December, 31).unwrap()),
                ..Cohort::default()
            });
            let count = |p: &str| answer.iter().filter(|(partner, _)| partner == p).count();
            let small = ["north", "south", "east"]
                .into_iter()
                .find(|p| (1..10).contains(&count(p)))?;
            let large = ["north", "south", "east"]
                .into_iter()
                .any(|p| count(p) >= 10);
            large.then(|| {
                (
                    json!({"studyDate": {"to": format!("{year}-12-31")}}),
                    small,
                    count(small),
                )
            })
        })
        .expect("the synthetic partners have a small cell");
    let count = |body: Value| body["cohortCount"].clone();
    let answer = count(
        c.gateway
            .query(
                COUNT_QUERY,
                json!({"project": "lung-cancer", "filter": filter}),
            )
            .await,
    );
    let suppressed = status(&answer["partners"], small_partner);
    assert_eq!(suppressed["count"], Value::Null, "{answer}");
    assert_eq!(suppressed["countDisclosure"], "SUPPRESSED");
    assert_eq!(answer["totalIsLowerBound"], true);
    let others: u64 = answer["partners"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["partner"] != small_partner)
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    let total = answer["total"].as_u64().unwrap();
    assert_eq!(total - others, 0, "total minus the others reveals nothing");
    assert_ne!(total - others, true_count as u64);

    // Repeating gives the same answer.
    let repeated = count(
        c.gateway
            .query(
                COUNT_QUERY,
                json!({"project": "lung-cancer", "filter": filter}),
            )
            .await,
    );
    let counts = |a: &Value| -> Vec<(Value, Value)> {
        a["partners"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["count"].clone(), s["countDisclosure"].clone()))
            .collect()
    };
    assert_eq!(counts(&answer), counts(&repeated));
    assert_eq!(answer["total"], repeated["total"]);

    // Slicing the cohort never shows the small partner's count either.
    let to = filter["studyDate"]["to"].clone();
    for slice in [
        json!({"studyDate": {"to": to}, "patientSex": "FEMALE"}),
        json!({"studyDate": {"to": to}, "patientSex": "MALE"}),
        json!({"studyDate": {"to": to}, "modalities": ["CT", "MR"]}),
    ] {
        let slice = count(
            c.gateway
                .query(
                    COUNT_QUERY,
                    json!({"project": "lung-cancer", "filter": slice}),
                )
                .await,
        );
        assert_eq!(
            status(&slice["partners"], small_partner)["count"],
            Value::Null
        );
    }

    // Nor does listing records: a suppressed partner releases none.
    let (nodes, statuses, _) = all_pages(&c.gateway, "lung-cancer", filter).await;
    assert!(nodes.iter().all(|n| n["partner"] != small_partner));
    assert_eq!(status(&statuses, small_partner)["count"], Value::Null);
}

#[tokio::test]
async fn a_caller_without_the_project_is_denied_by_every_partner_and_none_is_asked() {
    let c = consortium().await;
    let outsider = c.gateway.issuer.token(
        &json!({"sub": "outsider", "roles": ["researcher"], "projects": ["lung-cancer"]}),
        std::time::Duration::from_secs(300),
    );
    let before: Vec<u64> = c.bytes_sent();
    let (status_code, body) = c
        .gateway
        .post_as(Some(&outsider), COUNT_QUERY, json!({"project": "demo"}))
        .await;
    assert_eq!(status_code, 200);
    let partners = body["data"]["cohortCount"]["partners"].as_array().unwrap();
    assert!(partners.iter().all(|s| s["status"] == "DENIED"), "{body}");
    assert!(
        partners.iter().all(|s| {
            s["reasons"].as_array().unwrap().iter().any(|r| {
                r.as_str()
                    .unwrap()
                    .contains("not approved for project demo")
            })
        }),
        "{body}"
    );
    let after: Vec<u64> = c.bytes_sent();
    assert_eq!(before, after, "a denied partner was asked");
    assert_eq!(body["data"]["cohortCount"]["total"], 0);
}

#[tokio::test]
async fn counts_only_counts_are_the_same_for_the_same_studies_and_do_not_difference_exactly() {
    let c = consortium().await;
    let south = |filter: Value| {
        let gateway = &c.gateway;
        async move {
            let data = gateway
                .query(
                    COUNT_QUERY,
                    json!({"project": "lung-cancer", "filter": filter}),
                )
                .await;
            let status = status(&data["cohortCount"]["partners"], "south").clone();
            assert_eq!(status["disclosure"], "COUNTS_ONLY");
            status["count"].as_u64()
        }
    };
    // Two phrasings of the same set of studies get the same count.
    assert_eq!(
        south(json!({})).await,
        south(json!({"studyDate": {"from": "1990-01-01"}})).await
    );

    // Nested cohorts ("up to year Y" and "up to year Y - 1") carry their own
    // noise, so their difference recovers the studies of year Y only by chance.
    let truth = |year: i32| {
        c.truth
            .rows()
            .filter(|(partner, row)| partner == "south" && row.study_date.year() <= year)
            .count() as u64
    };
    let (mut pairs, mut exact) = (0, 0);
    let mut previous: Option<(i32, u64)> = None;
    for year in 2005..=2025 {
        let Some(count) = south(json!({"studyDate": {"to": format!("{year}-12-31")}})).await else {
            continue;
        };
        assert!(count.abs_diff(truth(year)) <= 2);
        if let Some((before, before_count)) = previous.filter(|(y, _)| *y == year - 1) {
            pairs += 1;
            exact += usize::from(count.wrapping_sub(before_count) == truth(year) - truth(before));
        }
        previous = Some((year, count));
    }
    assert!(pairs >= 8, "only {pairs} nested pairs");
    assert!(
        exact * 2 < pairs,
        "{exact} of {pairs} differences were exact"
    );
}

#[tokio::test]
async fn two_principals_with_different_decisions_never_see_each_others_cached_answer() {
    let c = consortium().await;
    let token = |sub: &str, institution: &str, permissions: &[&str]| {
        c.gateway.issuer.token(
            &json!({"sub": sub, "institution": institution, "roles": ["researcher"],
                    "projects": ["demo"], "permissions": permissions}),
            std::time::Duration::from_secs(300),
        )
    };
    // North's own staff with its grant read identified records; a researcher
    // elsewhere, and her colleague, get de-identified ones.
    let staff = token(
        "north-staff",
        "northfield-university-hospital",
        &["north:identified-access"],
    );
    let researcher = token("researcher", "westfield-university", &[]);
    let colleague = token("colleague", "westfield-university", &[]);
    let north_original: BTreeSet<&str> = c
        .truth
        .rows()
        .filter(|(partner, _)| partner == "north")
        .map(|(_, row)| row.study_uid.as_str())
        .collect();
    let variables = json!({"project": "demo", "filter": {"partners": ["north"]}});

    // Runs the count, then the page query as `who`; returns north's page
    // status, its count status, the UIDs the page shows and whether north
    // was sent anything for the count and for the page.
    let ask = async |who: &str| {
        let before = c.bytes_sent()[0];
        let (code, count) = c
            .gateway
            .post_as(Some(who), COUNT_QUERY, variables.clone())
            .await;
        assert_eq!(code, 200, "{count}");
        let between = c.bytes_sent()[0];
        let (_, page) = c
            .gateway
            .post_as(Some(who), PAGE_QUERY, variables.clone())
            .await;
        let asked = (between > before, c.bytes_sent()[0] > between);
        let statuses = &page["data"]["imagingStudies"]["partners"];
        let uids: BTreeSet<String> = page["data"]["imagingStudies"]["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["studyInstanceUid"].as_str().unwrap().to_owned())
            .collect();
        let counted = count["data"]["cohortCount"]["partners"][0].clone();
        (status(statuses, "north").clone(), counted, uids, asked)
    };

    let (status, count, uids, asked) = ask(&staff).await;
    assert_eq!(asked, (true, true), "the first queries must ask north");
    assert_eq!(status["disclosure"], "IDENTIFIED", "{status}");
    assert_eq!(count["cached"], false);
    assert_eq!(status["cached"], true, "the page reuses the count's search");
    assert!(!uids.is_empty() && uids.iter().all(|u| north_original.contains(u.as_str())));

    let (_, count, _, asked) = ask(&staff).await;
    assert_eq!(
        asked,
        (false, false),
        "the same principal's same queries are answered from the cache, series too"
    );
    assert_eq!(count["cached"], true);

    // A different decision for the same query: north is asked again and
    // the answer is de-identified.
    let (status, count, pseudonyms, asked) = ask(&researcher).await;
    assert_eq!(
        asked,
        (true, true),
        "a cached answer was served across decisions"
    );
    assert_eq!(status["disclosure"], "DEIDENTIFIED", "{status}");
    assert_eq!(count["cached"], false);
    assert!(!pseudonyms.is_empty());
    assert!(
        pseudonyms
            .iter()
            .all(|u| !north_original.contains(u.as_str())),
        "an original UID reached a de-identified caller"
    );

    // The same decision shares the cached answer, and sees the same pseudonyms.
    let (status, count, uids, asked) = ask(&colleague).await;
    assert_eq!(
        asked,
        (false, false),
        "the same decision should share the cached answers"
    );
    assert_eq!(count["cached"], true);
    assert_eq!(status["disclosure"], "DEIDENTIFIED");
    assert_eq!(uids, pseudonyms);

    let metrics = reqwest::get(c.gateway.url.replace("/graphql", "/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("meshgate_cache_lookups_total{result=\"hit\"} "),
        "{metrics}"
    );
}
