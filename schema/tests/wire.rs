//! The wire forms of a query and of studies: what one process sends
//! another (a hub and a partner node) comes back equal, and a query that
//! breaks the filter rules is refused on arrival, not trusted.

#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use meshgate_schema::study::{Instance, Modality, PatientSex, Series};
use meshgate_schema::{Study, StudyQuery};
use serde_json::json;
use time::macros::{date, offset, time};

#[test]
fn a_query_travels_as_json_and_comes_back_equal() {
    let query = StudyQuery {
        modalities: [Modality::Ct, Modality::Mr].into(),
        body_part: Some("CHEST".into()),
        study_date: Some(meshgate_schema::query::DateRange {
            from: Some(date!(2018 - 01 - 01)),
            to: None,
        }),
        description: Some("thorax".into()),
        patient_sex: Some(PatientSex::Female),
        patient_age: Some(meshgate_schema::query::AgeRange {
            min: Some(50),
            max: Some(70),
        }),
        study_uids: ["1.2.840.113619.2.55".to_owned()].into(),
        partners: ["north".to_owned()].into(),
    };
    let wire = serde_json::to_string(&query).unwrap();
    assert_eq!(serde_json::from_str::<StudyQuery>(&wire).unwrap(), query);
    assert_eq!(
        serde_json::from_str::<StudyQuery>(&serde_json::to_string(&StudyQuery::default()).unwrap())
            .unwrap(),
        StudyQuery::default()
    );
}

#[test]
fn a_query_that_breaks_the_filter_rules_is_refused_on_arrival() {
    let valid = serde_json::to_value(StudyQuery::default()).unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut query = valid.clone();
        query[key] = value;
        serde_json::from_value::<StudyQuery>(query)
    };
    assert!(with("body_part", json!("CHEST")).is_ok());
    for (key, value) in [
        ("body_part", json!("chest")),
        ("body_part", json!("CHEST/../X")),
        ("description", json!("  Thorax ")),
        ("study_uids", json!(["1.2.3", "not-a-uid"])),
        (
            "study_date",
            json!({"from": "2022-01-01", "to": "2021-01-01"}),
        ),
        ("patient_age", json!({"min": 70, "max": 50})),
        ("patient_age", json!({"min": 0, "max": 400})),
        ("unexpected", json!(true)),
    ] {
        assert!(with(key, value.clone()).is_err(), "{key}: {value}");
    }
    let too_many: Vec<String> = (0..1001).map(|n| format!("1.2.{n}")).collect();
    assert!(with("study_uids", json!(too_many)).is_err());
}

#[test]
fn a_study_with_its_series_travels_as_json_and_comes_back_equal() {
    let study = Study {
        uid: "1.2.3".into(),
        patient_id: Some("P1".into()),
        patient_sex: Some(PatientSex::Male),
        date: Some(date!(2021 - 03 - 04)),
        time: Some(time!(10:30)),
        timezone_offset: Some(offset!(+1)),
        modalities: vec!["CT".into()],
        series: vec![Series {
            uid: "1.2.3.1".into(),
            modality: Some("CT".into()),
            instances: vec![Instance::default()],
            ..Series::default()
        }],
        ..Study::default()
    };
    let wire = serde_json::to_string(&study).unwrap();
    assert_eq!(serde_json::from_str::<Study>(&wire).unwrap(), study);
}
