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

use meshgate_tests::{Gateway, GroundTruth, OrthancPartner, Policies, released};
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
    partners { partner status disclosure count countDisclosure reasons code cached }
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

/// A researcher's token from the consortium's issuer.
fn researcher(
    gateway: &Gateway,
    sub: &str,
    institution: &str,
    projects: &[&str],
    permissions: &[&str],
) -> String {
    gateway.issuer.token(
        &json!({"sub": sub, "institution": institution, "roles": ["researcher"],
                "projects": projects, "permissions": permissions}),
        std::time::Duration::from_secs(300),
    )
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
    // A cohort with a small count at some partner and a disclosed one
    // elsewhere: studies up to the end of some year, by the dates the
    // partners release (shifted; east releases none, so it is not asked).
    // Small: 1 to 7, which even the largest noise (+2) keeps below 10.
    let (filter, small_partner, true_count) = (2003..=2025)
        .flat_map(|year| [true, false].map(|up_to| (year, up_to)))
        .flat_map(|(year, up_to)| [None, Some("F"), Some("M")].map(|sex| (year, up_to, sex)))
        .find_map(|(year, up_to, sex)| {
            let (first, last) = (
                Date::from_calendar_date(year, time::Month::January, 1).unwrap(),
                Date::from_calendar_date(year, time::Month::December, 31).unwrap(),
            );
            let inside = |d: Date| if up_to { d <= last } else { d >= first };
            let count = |p: &str| {
                c.truth
                    .rows()
                    .filter(|(partner, row)| {
                        partner == p
                            && sex.is_none_or(|s| row.patient_sex == s)
                            && inside(released("lung-cancer", partner, row).1)
                    })
                    .count()
            };
            let small = ["north", "south"]
                .into_iter()
                .find(|p| (1..8).contains(&count(p)))?;
            let large = ["north", "south"].into_iter().any(|p| count(p) >= 12);
            let mut filter = json!({"studyDate": if up_to {
                json!({"to": last.to_string()})
            } else {
                json!({"from": first.to_string()})
            }});
            if let Some(sex) = sex {
                filter["patientSex"] = json!(if sex == "F" { "FEMALE" } else { "MALE" });
            }
            large.then(|| (filter, small, count(small)))
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
    let slice_with = |key: &str, value: Value| {
        let mut slice = filter.clone();
        slice[key] = value;
        slice
    };
    for slice in [
        slice_with("modalities", json!(["CT", "MR"])),
        slice_with("bodyPart", json!("CHEST")),
        slice_with("patientAge", json!({"min": 18})),
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
    // Counted over the dates south's view releases (shifted).
    let truth = |year: i32| {
        c.truth
            .rows()
            .filter(|(partner, row)| {
                partner == "south" && released("lung-cancer", partner, row).1.year() <= year
            })
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
async fn no_caller_is_answered_from_or_told_of_another_callers_cached_answer() {
    let c = consortium().await;
    let token = |sub: &str, institution: &str, permissions: &[&str]| {
        researcher(&c.gateway, sub, institution, &["demo"], permissions)
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

    // The same decision for another caller: still asked again, so neither
    // `cached` nor the latency tells her that a colleague asked the same
    // question a moment ago. She sees the same pseudonyms.
    let (status, count, uids, asked) = ask(&colleague).await;
    assert_eq!(
        asked,
        (true, true),
        "a cached answer was served to another caller"
    );
    assert_eq!(count["cached"], false);
    assert_eq!(status["disclosure"], "DEIDENTIFIED");
    assert_eq!(uids, pseudonyms);
    let (_, count, _, asked) = ask(&colleague).await;
    assert_eq!(asked, (false, false), "her own repeat is cached");
    assert_eq!(count["cached"], true);

    let metrics = c.gateway.metrics().await;
    assert!(
        metrics.contains("meshgate_cache_lookups_total{result=\"hit\"} "),
        "{metrics}"
    );
}

/// North's count for `filter` in lung-cancer: exact (it releases records),
/// `None` when suppressed or not given.
async fn north_count(gateway: &Gateway, filter: Value) -> Option<u64> {
    let mut filter = filter;
    filter["partners"] = json!(["north"]);
    let data = gateway
        .query(
            COUNT_QUERY,
            json!({"project": "lung-cancer", "filter": filter}),
        )
        .await;
    status(&data["cohortCount"]["partners"], "north")["count"].as_u64()
}

fn day(text: &str) -> Date {
    Date::parse(
        &text[..10],
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .unwrap()
}

/// The smallest date `d` in `lo..=hi` for which `inside(d)` holds, by
/// bisection (`inside` is assumed monotone, as the attacker assumes it).
async fn bisect<F: AsyncFn(Date) -> bool>(mut lo: Date, mut hi: Date, inside: F) -> Date {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if inside(mid).await {
            hi = mid;
        } else {
            lo = mid + time::Duration::days(1);
        }
    }
    lo
}

#[tokio::test]
async fn date_range_bisection_at_a_deidentifying_partner_recovers_only_the_shifted_dates() {
    let c = consortium().await;
    // The attacker lists north's records (pseudonymous UIDs, shifted dates),
    // then locates each study in time by bisecting date ranges around it,
    // with eleven "anchor" studies in the set so that north's count (exact,
    // threshold 10) says whether the target is inside: 12 or 11.
    let (nodes, _, _) = all_pages(&c.gateway, "lung-cancer", json!({"partners": ["north"]})).await;
    let mut shown: Vec<(String, Date)> = nodes
        .iter()
        .map(|n| {
            (
                n["studyInstanceUid"].as_str().unwrap().to_owned(),
                day(n["started"].as_str().unwrap()),
            )
        })
        .collect();
    shown.sort_by_key(|(_, date)| *date);
    let early: Vec<String> = shown.iter().take(11).map(|(u, _)| u.clone()).collect();
    let late: Vec<String> = shown
        .iter()
        .rev()
        .take(11)
        .map(|(u, _)| u.clone())
        .collect();
    // Anchors stay inside every range probed, whichever dates are filtered on.
    let margin = time::Duration::days(1100);
    let floor = shown[10].1 + margin;
    let ceiling = shown[shown.len() - 11].1 - margin;
    let targets: Vec<(String, Date)> = shown
        .iter()
        .filter(|(_, d)| *d > floor && *d < ceiling)
        .take(8)
        .cloned()
        .collect();
    assert!(targets.len() >= 4, "only {} targets", targets.len());
    let true_dates: BTreeMap<String, Date> = c
        .truth
        .rows()
        .filter(|(p, _)| p == "north")
        .map(|(p, row)| (released("lung-cancer", p, row).0, row.study_date))
        .collect();

    // Bisect where every anchor is inside, by true or shifted dates.
    let (lo, hi) = (floor, shown[shown.len() - 11].1 - time::Duration::days(1));
    let mut queries = 0;
    for (target, shown_date) in &targets {
        let with = |anchors: &[String]| {
            let mut uids = anchors.to_vec();
            uids.push(target.clone());
            uids
        };
        // Up to d: is the target at or before d?
        let until = bisect(lo, hi, async |d: Date| {
            let n = north_count(
                &c.gateway,
                json!({"studyInstanceUids": with(&early), "studyDate": {"to": d.to_string()}}),
            )
            .await;
            n == Some(12)
        })
        .await;
        // The complement: from d on, is the target outside?
        let from = bisect(lo, hi, async |d: Date| {
            let n = north_count(
                &c.gateway,
                json!({"studyInstanceUids": with(&late), "studyDate": {"from": (d + time::Duration::days(1)).to_string()}}),
            )
            .await;
            n == Some(11)
        })
        .await;
        // An overlapping window around the inferred day holds it.
        let window = north_count(
            &c.gateway,
            json!({"studyInstanceUids": with(&early), "studyDate": {"from": shown[0].1.to_string(), "to": until.to_string()}}),
        )
        .await;
        queries += 2 * 14 + 1;
        assert_eq!(until, from, "the range and its complement agree");
        assert_eq!(window, Some(12));
        assert_eq!(
            until, *shown_date,
            "the attack inferred a date that is not the one released"
        );
        assert_ne!(
            Some(&until),
            true_dates.get(target),
            "the attack recovered a true study date"
        );
    }
    println!(
        "date bisection: {} studies located at their shifted dates only, about {queries} queries",
        targets.len()
    );
}

#[tokio::test]
async fn age_range_bisection_cannot_split_90_plus() {
    let c = consortium().await;
    let (nodes, _, _) = all_pages(&c.gateway, "lung-cancer", json!({"partners": ["north"]})).await;
    let age_of = |n: &Value| n["patient"]["age"].as_str().unwrap().to_owned();
    let young: Vec<String> = nodes
        .iter()
        .filter(|n| age_of(n) != "90+" && age_of(n).parse::<u16>().unwrap() < 80)
        .take(11)
        .map(|n| n["studyInstanceUid"].as_str().unwrap().to_owned())
        .collect();
    let old: Vec<String> = nodes
        .iter()
        .filter(|n| age_of(n) == "90+")
        .map(|n| n["studyInstanceUid"].as_str().unwrap().to_owned())
        .collect();
    let true_ages: BTreeMap<String, u16> = c
        .truth
        .rows()
        .filter(|(p, _)| p == "north")
        .map(|(p, row)| (released("lung-cancer", p, row).0, row.patient_age))
        .collect();
    assert!(
        old.iter().any(|u| true_ages[u] > 90),
        "the synthetic north has a patient older than 90"
    );
    // For every upper bound from 90 to 105, each 90+ study is inside or
    // outside together with all the others: nothing splits the bucket.
    for target in &old {
        let mut inside = BTreeSet::new();
        for max in 88..=105 {
            let mut uids = young.clone();
            uids.push(target.clone());
            let n = north_count(
                &c.gateway,
                json!({"studyInstanceUids": uids, "patientAge": {"min": 0, "max": max}}),
            )
            .await;
            assert!(matches!(n, Some(11 | 12)), "{n:?}");
            inside.insert((max, n == Some(12)));
        }
        let answers: BTreeSet<bool> = inside
            .iter()
            .filter(|(max, _)| *max >= 90)
            .map(|(_, i)| *i)
            .collect();
        assert_eq!(
            answers,
            BTreeSet::from([true]),
            "an age range split 90+ (true age {})",
            true_ages[target]
        );
        assert!(inside.contains(&(89, false)));
    }
}

#[tokio::test]
async fn a_description_filter_at_a_partner_that_removes_descriptions_releases_nothing_from_them() {
    let c = consortium().await;
    // Basic Profile (east) and north's profile both remove descriptions: the
    // partners are not asked, and their answers are the same whatever the
    // words, so nothing depends on the removed text.
    let before = c.bytes_sent();
    let mut answers = Vec::new();
    for word in ["chest", "zzz-nothing-matches", "ct"] {
        let (nodes, statuses, _) =
            all_pages(&c.gateway, "lung-cancer", json!({"description": word})).await;
        assert!(nodes.is_empty(), "{} records released", nodes.len());
        let count = c
            .gateway
            .query(
                COUNT_QUERY,
                json!({"project": "lung-cancer", "filter": {"description": word}}),
            )
            .await;
        let mut seen = Vec::new();
        for partner in ["north", "south", "east"] {
            for s in [
                status(&statuses, partner),
                status(&count["cohortCount"]["partners"], partner),
            ] {
                assert_eq!(s["status"], "WITHHELD", "{s}");
                assert_eq!(s["count"], Value::Null);
                seen.push((partner, s["code"].clone(), s["countDisclosure"].clone()));
            }
        }
        assert!(
            seen.iter()
                .all(|(_, code, _)| code == "FILTER_ON_REMOVED_ATTRIBUTE")
        );
        answers.push(seen);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(
        before,
        c.bytes_sent(),
        "a partner was asked about descriptions"
    );
}

#[tokio::test]
async fn threshold_bisection_at_a_counts_only_partner_recovers_no_study_date() {
    let c = consortium().await;
    // The attack that recovered suppressed cells: for a start date s, find
    // the first end t at which south's count for [s, t] is shown rather than
    // suppressed. With suppression decided on the true count over true
    // dates, t is exactly the date of the 10th study from s. The attacker
    // probes every date any south study has, true or shifted.
    let rows: Vec<(Date, Date)> = c
        .truth
        .rows()
        .filter(|(p, _)| p == "south")
        .map(|(p, row)| (row.study_date, released("lung-cancer", p, row).1))
        .collect();
    let mut true_dates: Vec<Date> = rows.iter().map(|(t, _)| *t).collect();
    true_dates.sort();
    let mut grid: Vec<Date> = rows.iter().flat_map(|(t, s)| [*t, *s]).collect();
    grid.sort();
    grid.dedup();
    let shown = async |from: Date, to: Date| {
        let data = c
            .gateway
            .query(
                COUNT_QUERY,
                json!({"project": "lung-cancer", "filter": {"partners": ["south"],
                       "studyDate": {"from": from.to_string(), "to": to.to_string()}}}),
            )
            .await;
        status(&data["cohortCount"]["partners"], "south")["count"].is_u64()
    };
    let (mut attempts, mut recovered, mut queries) = (0, 0, 0);
    for start in true_dates.iter().step_by(3) {
        // The 10th study from `start` by true date, which the attack is after.
        let Some(tenth) = true_dates.iter().filter(|d| *d >= start).nth(9) else {
            continue;
        };
        let candidates: Vec<Date> = grid.iter().copied().filter(|d| d >= start).collect();
        let (mut lo, mut hi) = (0, candidates.len() - 1);
        while lo < hi {
            let mid = (lo + hi) / 2;
            queries += 1;
            if shown(*start, candidates[mid]).await {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        attempts += 1;
        recovered += usize::from(candidates[lo] == *tenth);
    }
    println!(
        "threshold bisection at south: {recovered} of {attempts} attempts found the 10th study's true date, {queries} queries"
    );
    assert!(attempts >= 8, "only {attempts} attempts");
    // A guess from the probe grid lands on a true date about half the time;
    // on the 10th study's date only by chance.
    assert!(
        recovered * 5 <= attempts,
        "{recovered} of {attempts} true dates recovered"
    );
}

#[tokio::test]
async fn a_token_from_another_trusted_issuer_claiming_norths_staff_gets_no_more_than_an_unknown_institution()
 {
    let c = consortium().await;
    let me = "{ me { issuer institution roles projects permissions } }";
    let claims = |institution: &str| {
        json!({"sub": "claimant", "institution": institution, "roles": ["researcher", "governance"],
               "projects": ["demo"], "permissions": ["north:identified-access"]})
    };
    let hour = std::time::Duration::from_secs(3600);
    // The consortium's issuer is trusted for north's staff; a partner's
    // issuer, trusted only for its own researchers, is not.
    let genuine = c
        .gateway
        .issuer
        .token(&claims("northfield-university-hospital"), hour);
    let forged = c
        .gateway
        .partner_issuer
        .token(&claims("northfield-university-hospital"), hour);
    let unknown = c
        .gateway
        .partner_issuer
        .token(&claims("no-such-institution"), hour);

    let variables = json!({"project": "demo", "filter": {"partners": ["north"]}});
    let mut answers = Vec::new();
    for token in [&genuine, &forged, &unknown] {
        let (code, page) = c
            .gateway
            .post_as(Some(token), PAGE_QUERY, variables.clone())
            .await;
        assert_eq!(code, 200, "{page}");
        let (_, who) = c.gateway.post_as(Some(token), me, json!({})).await;
        let north = status(&page["data"]["imagingStudies"]["partners"], "north").clone();
        answers.push((north["disclosure"].clone(), who["data"]["me"].clone()));
    }
    assert_eq!(answers[0].0, "IDENTIFIED", "the genuine staff token");
    assert_eq!(
        answers[1].0, answers[2].0,
        "the forged claim must get what an unknown institution gets"
    );
    assert_eq!(answers[1].0, "DEIDENTIFIED");
    let forged_me = &answers[1].1;
    assert_eq!(forged_me["issuer"], c.gateway.partner_issuer.issuer());
    assert_eq!(forged_me["institution"], Value::Null);
    assert_eq!(
        forged_me["roles"],
        json!(["RESEARCHER"]),
        "governance dropped"
    );
    assert_eq!(forged_me["permissions"], json!([]));
    assert_eq!(forged_me["projects"], json!(["demo"]));

    // The same issuer's token for the institution it is trusted for keeps it.
    let own = c
        .gateway
        .partner_issuer
        .token(&claims(meshgate_tests::PARTNER_ISSUER_INSTITUTION), hour);
    let (_, who) = c.gateway.post_as(Some(&own), me, json!({})).await;
    assert_eq!(
        who["data"]["me"]["institution"],
        meshgate_tests::PARTNER_ISSUER_INSTITUTION
    );
}

#[tokio::test]
async fn cursors_tampered_with_or_replayed_by_another_caller_or_in_another_project_are_refused() {
    let c = consortium().await;
    let token = |sub: &str, institution: &str, permissions: &[&str]| {
        researcher(
            &c.gateway,
            sub,
            institution,
            &["demo", "lung-cancer"],
            permissions,
        )
    };
    let staff = token(
        "north-staff",
        "northfield-university-hospital",
        &["north:identified-access"],
    );
    let researcher = token("researcher", "westfield-university", &[]);
    let first_page = async |who: &str, project: &str| {
        let (_, body) = c
            .gateway
            .post_as(
                Some(who),
                PAGE_QUERY,
                json!({"project": project, "filter": {"partners": ["north"]}}),
            )
            .await;
        body["data"]["imagingStudies"]["pageInfo"]["endCursor"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let next = async |who: &str, project: &str, after: &str| {
        let (_, body) = c
            .gateway
            .post_as(
                Some(who),
                PAGE_QUERY,
                json!({"project": project, "filter": {"partners": ["north"]}, "after": after}),
            )
            .await;
        body
    };
    let refused = |body: &Value| body["errors"][0]["extensions"]["code"] == "INVALID_CURSOR";

    // North's staff reads identified records: their cursor holds an original UID.
    let identified = first_page(&staff, "demo").await;
    let mine = first_page(&researcher, "demo").await;
    assert!(!refused(&next(&staff, "demo", &identified).await));
    assert!(!refused(&next(&researcher, "demo", &mine).await));

    let before = c.bytes_sent();
    // Replayed by another caller (whose decision differs, too).
    assert!(refused(&next(&researcher, "demo", &identified).await));
    assert!(refused(&next(&staff, "demo", &mine).await));
    // Replayed in another project by the caller it was issued to.
    assert!(refused(&next(&researcher, "lung-cancer", &mine).await));
    // Tampered with: another position under the same tag, or another tag.
    let (body, tag) = mine.split_once('.').unwrap();
    let mut position: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, body).unwrap(),
    )
    .unwrap();
    position["u"] = json!("2.25.1");
    let edited = format!(
        "{}.{tag}",
        base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            serde_json::to_vec(&position).unwrap()
        )
    );
    assert!(refused(&next(&researcher, "demo", &edited).await));
    let (_, other_tag) = identified.split_once('.').unwrap();
    assert!(refused(
        &next(&researcher, "demo", &format!("{body}.{other_tag}")).await
    ));
    assert_eq!(before, c.bytes_sent(), "a refused cursor reached a partner");
}

#[tokio::test]
async fn the_query_budget_stops_a_bisection_run_and_governance_sees_it_in_the_audit_log() {
    // North alone, with a budget of 40 distinct questions an hour.
    let north = OrthancPartner::start("north", 40, 11).await;
    let table = north.table(10_000, None).replace(
        "[partners.connector]",
        "budget = { questions = 40, window_hours = 1 }\n[partners.connector]",
    );
    let gateway = Gateway::start_with(&table, Policies::Examples).await;
    let hour = std::time::Duration::from_secs(3600);
    let governance = gateway.issuer.token(
        &json!({"sub": "auditor", "institution": "consortium-office", "roles": ["governance"]}),
        hour,
    );
    let north_status = async |token: &str, filter: Value| {
        let (_, body) = gateway
            .post_as(
                Some(token),
                COUNT_QUERY,
                json!({"project": "lung-cancer", "filter": filter}),
            )
            .await;
        assert!(body.get("errors").is_none(), "{body}");
        status(&body["data"]["cohortCount"]["partners"], "north").clone()
    };
    // The attacker walks a date range day by day (a bisection needs fewer
    // questions per study but many studies; the budget counts them alike).
    let start = Date::from_calendar_date(2015, time::Month::January, 1).unwrap();
    let mut answered = 0;
    let mut stopped = None;
    for day in 0..200 {
        let to = start + time::Duration::days(day);
        let s = north_status(&gateway.token, json!({"studyDate": {"to": to.to_string()}})).await;
        if s["status"] == "BUDGET_EXHAUSTED" {
            stopped = Some(s);
            break;
        }
        assert_eq!(s["status"], "OK", "{s}");
        answered += 1;
    }
    let stopped = stopped.expect("the budget stopped the run");
    assert_eq!(answered, 40);
    assert_eq!(stopped["code"], "QUERY_BUDGET_EXHAUSTED");
    assert_eq!(stopped["count"], Value::Null);
    println!("query budget: a date walk at north was stopped after {answered} questions");
    // A question already asked is still answered: it reveals nothing new.
    let again = north_status(
        &gateway.token,
        json!({"studyDate": {"to": start.to_string()}}),
    )
    .await;
    assert_eq!(again["status"], "OK");
    // Another researcher has a budget of her own.
    let colleague = gateway.issuer.token(
        &json!({"sub": "colleague", "institution": "westfield-university",
                "roles": ["researcher"], "projects": ["lung-cancer"]}),
        hour,
    );
    let hers = north_status(&colleague, json!({"studyDate": {"to": "2020-01-01"}})).await;
    assert_eq!(hers["status"], "OK");

    // Governance sees who reached the budget, and the refusal in the log.
    let (_, body) = gateway
        .post_as(
            Some(&governance),
            "{ queryBudgets(atLeast: 0.9) { subject project partner used limit windowEnds } }",
            json!({}),
        )
        .await;
    let budgets = body["data"]["queryBudgets"].as_array().unwrap();
    assert_eq!(budgets.len(), 1, "{body}");
    assert_eq!(
        (
            &budgets[0]["subject"],
            &budgets[0]["partner"],
            &budgets[0]["used"],
            &budgets[0]["limit"]
        ),
        (
            &json!("e2e-researcher"),
            &json!("north"),
            &json!(40),
            &json!(40)
        )
    );
    let (_, body) = gateway
        .post_as(
            Some(&governance),
            r#"{ auditEvents(filter: {subject: "e2e-researcher"}, first: 5) {
                 nodes { accesses { partners { partner status } } } } }"#,
            json!({}),
        )
        .await;
    let statuses: Vec<&Value> = body["data"]["auditEvents"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| &n["accesses"][0]["partners"][0]["status"])
        .collect();
    assert!(
        statuses.contains(&&json!("BUDGET_EXHAUSTED")),
        "the refusal is audited: {body}"
    );
    // A researcher sees only her own budget.
    let (_, body) = gateway
        .post_as(
            Some(&colleague),
            "{ queryBudgets(atLeast: 0) { subject } }",
            json!({}),
        )
        .await;
    assert_eq!(
        body["data"]["queryBudgets"],
        json!([{"subject": "colleague"}])
    );
}
