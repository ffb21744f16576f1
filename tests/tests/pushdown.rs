//! What a connector pushes down to a real Orthanc finds exactly what
//! filtering the partner's whole study list locally finds, for filter
//! values drawn from the archive's own data with the quirks real archives
//! have: `/`, `&`, `+`, `%`, `#`, parentheses and spaces in descriptions,
//! non-ASCII letters, mixed and lower case, lower-case and missing body
//! parts. A value the backend cannot receive intact must widen the search,
//! never empty it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::collections::{BTreeSet, HashMap};

use dicom_core::{DataElement, PrimitiveValue, VR};
use dicom_dictionary_std::tags;
use meshgate_connectors::Connector;
use meshgate_connectors::dicomweb::{Auth, DicomWebConnector, DicomWebSettings, Profile, Url};
use meshgate_schema::api::StudyFilter;
use meshgate_schema::{Study, StudyQuery};
use meshgate_tests::{Orthanc, SyntheticPartner};

const DESCRIPTIONS: [&str; 10] = [
    "PET/CT",
    "CT Abdomen/Pelvis",
    "CT CHEST W/O CONTRAST",
    "Übersicht Thorax",
    "MR Knie rechts (nativ)",
    "CR chest PA+lat",
    "US 50% Doppler",
    "ct head #2",
    "Röntgen Hand & Handgelenk",
    "MRI brain w\\o = baseline?",
];

const BODY_PARTS: [Option<&str>; 6] = [
    Some("CHEST"),
    Some("chest"),
    Some("Abdomen"),
    Some("LEFT KNEE"),
    Some("head"),
    None,
];

/// Gives every study one of [`DESCRIPTIONS`] and every series one of
/// [`BODY_PARTS`], as UTF-8.
fn make_quirky(partner: &SyntheticPartner) {
    let mut studies: HashMap<String, usize> = HashMap::new();
    let mut series: HashMap<String, usize> = HashMap::new();
    for path in partner.dicom_files() {
        let mut object = dicom_object::open_file(&path).unwrap();
        let text = |tag| {
            object
                .element(tag)
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches(['\0', ' '])
                .to_owned()
        };
        let (study, one) = (
            text(tags::STUDY_INSTANCE_UID),
            text(tags::SERIES_INSTANCE_UID),
        );
        let next = studies.len();
        let description = DESCRIPTIONS[*studies.entry(study).or_insert(next) % DESCRIPTIONS.len()];
        let next = series.len();
        let part = BODY_PARTS[*series.entry(one).or_insert(next) % BODY_PARTS.len()];
        let put = |object: &mut dicom_object::DefaultDicomObject, tag, vr, value: &str| {
            object.put(DataElement::new(tag, vr, PrimitiveValue::from(value)));
        };
        put(
            &mut object,
            tags::SPECIFIC_CHARACTER_SET,
            VR::CS,
            "ISO_IR 192",
        );
        put(&mut object, tags::STUDY_DESCRIPTION, VR::LO, description);
        match part {
            Some(part) => put(&mut object, tags::BODY_PART_EXAMINED, VR::CS, part),
            None => {
                object.remove_element(tags::BODY_PART_EXAMINED);
            }
        }
        object.write_to_file(&path).unwrap();
    }
}

/// A connector to `url` under `profile`, probed as at start-up.
async fn probed(url: &str, profile: Profile) -> DicomWebConnector {
    let connector = DicomWebConnector::new(DicomWebSettings {
        base_url: Url::parse(url).unwrap(),
        profile,
        auth: Auth::None,
        page_size: None,
        detail_concurrency: 4,
        max_results: None,
    })
    .unwrap();
    connector.check().await.unwrap();
    connector
}

fn query(filter: StudyFilter) -> StudyQuery {
    StudyQuery::try_from(filter).unwrap()
}

/// Filter values drawn from the archive's own values: every description
/// whole and in other case, and windows of it across its punctuation.
fn description_values() -> BTreeSet<String> {
    let mut values = BTreeSet::new();
    for description in DESCRIPTIONS {
        values.insert(description.to_owned());
        values.insert(description.to_uppercase());
        values.insert(description.to_lowercase());
        let chars: Vec<char> = description.chars().collect();
        for start in (0..chars.len()).step_by(2) {
            for len in [3, 6] {
                let window: String = chars.iter().skip(start).take(len).collect();
                if !window.trim().is_empty() {
                    values.insert(window);
                }
            }
        }
    }
    values
}

fn uids<'a>(studies: impl IntoIterator<Item = &'a Study>) -> BTreeSet<String> {
    studies.into_iter().map(|s| s.uid.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_down_filters_find_exactly_what_local_filtering_of_the_whole_archive_finds() {
    let partner = SyntheticPartner::new("quirky", 60, 21);
    make_quirky(&partner);
    let orthanc = Orthanc::start("quirky").await;
    orthanc.load(&partner).await;

    for profile in [Profile::Orthanc, Profile::Generic] {
        let connector = probed(&orthanc.dicomweb_url(), profile).await;
        // The whole archive, with every series, filtered locally.
        let mut all = connector
            .search(&StudyQuery::default())
            .await
            .unwrap()
            .studies;
        assert_eq!(all.len(), 60);
        connector.load_series(&mut all).await.unwrap();

        let mut cases: Vec<(String, StudyQuery)> = description_values()
            .into_iter()
            .map(|value| {
                let q = query(StudyFilter {
                    description: Some(value.clone()),
                    ..StudyFilter::default()
                });
                (format!("description {value:?}"), q)
            })
            .collect();
        for part in ["CHEST", "ABDOMEN", "LEFT KNEE", "HEAD", "PELVIS"] {
            let q = query(StudyFilter {
                body_part: Some(part.to_owned()),
                ..StudyFilter::default()
            });
            cases.push((format!("body part {part:?}"), q));
        }
        let (mut nonempty, mut checked) = (0, 0);
        for (label, q) in &cases {
            let pushed = uids(&connector.search(q).await.unwrap().studies);
            let local = uids(all.iter().filter(|s| q.matches(s)));
            assert_eq!(pushed, local, "{profile:?}: {label}");
            nonempty += usize::from(!local.is_empty());
            checked += 1;
        }
        assert!(
            nonempty * 2 > checked,
            "{profile:?}: only {nonempty} of {checked} values matched anything"
        );
        println!("{profile:?}: {checked} filter values, {nonempty} with matches, all exact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_by_study_uid_is_one_request_and_finds_the_study() {
    let partner = meshgate_tests::OrthancPartner::start("lookup", 12, 5).await;
    let connector = probed(&partner.proxy.url(), Profile::Orthanc).await;
    let wanted: Vec<String> = partner
        .data
        .manifest
        .iter()
        .take(3)
        .map(|row| row.study_uid.clone())
        .collect();
    for uids in [&wanted[..1], &wanted[..]] {
        let before = partner.proxy.requests();
        let found = connector
            .search(&query(StudyFilter {
                study_instance_uids: Some(uids.to_vec()),
                ..StudyFilter::default()
            }))
            .await
            .unwrap();
        assert_eq!(
            uids.iter().cloned().collect::<BTreeSet<_>>(),
            self::uids(&found.studies)
        );
        assert_eq!(partner.proxy.requests() - before, 1, "{} UIDs", uids.len());
    }
    // A UID the archive lacks still ends on an empty page, as any search.
    let before = partner.proxy.requests();
    let none = connector
        .search(&query(StudyFilter {
            study_instance_uids: Some(vec!["2.25.12345".into()]),
            ..StudyFilter::default()
        }))
        .await
        .unwrap();
    assert!(none.studies.is_empty());
    assert_eq!(partner.proxy.requests() - before, 1);
}
