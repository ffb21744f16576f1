//! The DICOM → FHIR ImagingStudy mapping over QIDO-RS answers captured from
//! Orthanc, compared field by field with reviewed expected resources.
//! Set `UPDATE_EXPECTED=1` to rewrite the expected files after a deliberate
//! mapping change, then review the diff.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::path::PathBuf;

use meshgate_schema::Study;
use meshgate_schema::fhir::{MappingOptions, imaging_study};
use meshgate_schema::study::assemble_series;
use serde_json::{Map, Value};
use time::UtcOffset;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn map_capture(name: &str, options: MappingOptions) -> Value {
    let capture: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap();
    let rows = |key: &str| -> Vec<Map<String, Value>> {
        serde_json::from_value(capture[key].clone()).unwrap()
    };
    let study_row: Map<String, Value> = serde_json::from_value(capture["study"].clone()).unwrap();
    let mut study = Study::from_attributes(&study_row).unwrap();
    study.set_series(assemble_series(&rows("series"), &rows("instances")));
    imaging_study(&study, &options, &[]).unwrap()
}

#[test]
fn captured_orthanc_studies_map_to_the_expected_imaging_study() {
    let cest = MappingOptions {
        utc_offset: Some(UtcOffset::from_hms(1, 0, 0).unwrap()),
    };
    let cases = [
        (
            "orthanc-ct-study.json",
            cest,
            "orthanc-ct-study.expected.json",
        ),
        (
            "orthanc-mg-study.json",
            cest,
            "orthanc-mg-study.expected.json",
        ),
        (
            "orthanc-pt-study.json",
            MappingOptions::default(),
            "orthanc-pt-study.expected.json",
        ),
    ];
    for (capture, options, expected) in cases {
        let actual = map_capture(capture, options);
        let expected_path = fixture(expected);
        if std::env::var_os("UPDATE_EXPECTED").is_some() {
            std::fs::write(
                &expected_path,
                serde_json::to_string_pretty(&actual).unwrap() + "\n",
            )
            .unwrap();
        }
        let expected: Value =
            serde_json::from_str(&std::fs::read_to_string(&expected_path).unwrap()).unwrap();
        assert_eq!(actual, expected, "{capture}");
    }
}

#[test]
fn study_uid_is_an_official_urn_oid_identifier_and_sop_classes_are_uris() {
    let resource = map_capture("orthanc-ct-study.json", MappingOptions::default());
    assert_eq!(resource["resourceType"], "ImagingStudy");
    assert_eq!(resource["status"], "available");
    let identifier = &resource["identifier"][0];
    assert_eq!(identifier["system"], "urn:dicom:uid");
    assert!(
        identifier["value"]
            .as_str()
            .unwrap()
            .starts_with("urn:oid:2.25.")
    );
    assert_eq!(
        resource["identifier"][1]["type"]["coding"][0]["code"],
        "ACSN"
    );
    let instance = &resource["series"][0]["instance"][0];
    assert_eq!(instance["sopClass"]["system"], "urn:ietf:rfc:3986");
    assert_eq!(
        instance["sopClass"]["code"],
        "urn:oid:1.2.840.10008.5.1.4.1.1.2"
    );
    assert!(!instance["uid"].as_str().unwrap().starts_with("urn:"));
}

#[test]
fn started_has_a_time_only_when_a_utc_offset_is_known() {
    let without = map_capture("orthanc-ct-study.json", MappingOptions::default());
    assert_eq!(
        without["started"].as_str().unwrap().len(),
        "2019-01-01".len()
    );
    let with = map_capture(
        "orthanc-ct-study.json",
        MappingOptions {
            utc_offset: Some(UtcOffset::from_hms(-5, 0, 0).unwrap()),
        },
    );
    assert!(
        with["started"].as_str().unwrap().ends_with("-05:00"),
        "{}",
        with["started"]
    );
}

#[test]
fn mammography_series_carry_snomed_body_site_and_laterality() {
    let resource = map_capture("orthanc-mg-study.json", MappingOptions::default());
    let series = &resource["series"][0];
    assert_eq!(series["bodySite"]["system"], "http://snomed.info/sct");
    assert_eq!(series["bodySite"]["code"], "76752008");
    let laterality = series["laterality"]["code"].as_str().unwrap();
    assert!(["24028007", "7771000"].contains(&laterality));
}

#[test]
fn counts_follow_the_series_and_instances_present() {
    let resource = map_capture("orthanc-pt-study.json", MappingOptions::default());
    let series = resource["series"].as_array().unwrap();
    assert_eq!(resource["numberOfSeries"], series.len());
    let instances: usize = series
        .iter()
        .map(|s| s["instance"].as_array().unwrap().len())
        .sum();
    assert_eq!(resource["numberOfInstances"], instances);
    // The PET study carries its attenuation-correction CT.
    let modalities: Vec<&str> = resource["modality"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["code"].as_str().unwrap())
        .collect();
    assert_eq!(modalities, ["CT", "PT"]);
}
