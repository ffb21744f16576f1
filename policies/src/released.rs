//! What a query may distinguish at a partner that de-identifies or only
//! counts: every filter is evaluated on the values that partner releases
//! (its view), never on the originals the profile removes or modifies.
//! Otherwise a researcher could bisect date ranges to undo every date
//! shift, split `90+` by age ranges, or read removed descriptions back one
//! word at a time.
//!
//! Per attribute, under a view profile:
//!
//! | filter | evaluated on | without the option |
//! |---|---|---|
//! | `studyDate` | the shifted date (*retain longitudinal … modified dates*) | not evaluated: withheld |
//! | `patientAge` | the released age, 90 and over as one `90+` bucket, which a range matches when it reaches 90 (*retain patient characteristics*) | withheld |
//! | `patientSex` | sex (*retain patient characteristics*) | withheld |
//! | `description` | — (the Basic Profile removes descriptions) | withheld under every profile |
//! | `studyInstanceUids` | the pseudonymous UIDs | — |
//! | `modalities`, `bodyPart` | kept by the profile: the values themselves | — |
//!
//! Time of day is never released beside a de-identified date, so nothing
//! filters on it. A partner whose view removes an attribute the query
//! filters on is not asked at all: its records and count are withheld for
//! that query rather than filtered on hidden data.

use meshgate_schema::capabilities::FilterKind;
use meshgate_schema::query::{AgeRange, DateRange};
use meshgate_schema::{Study, StudyQuery};
use time::Duration;

use crate::deid::{AGE_CAP, DeidOption, Deidentifier, MAX_SHIFT_DAYS, Profile};

/// A query that filters on attributes the partner's view removes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "this partner's de-identification profile ({profile}) removes {}, so the query is not evaluated there; its records and count are withheld",
    names(.removed)
)]
pub struct Withheld {
    pub profile: String,
    /// The filters on removed attributes, in filter order.
    pub removed: Vec<FilterKind>,
}

impl Withheld {
    /// The stable code of a partner status for a withheld query.
    pub const CODE: &'static str = "FILTER_ON_REMOVED_ATTRIBUTE";
}

fn names(kinds: &[FilterKind]) -> String {
    kinds
        .iter()
        .map(|kind| match kind {
            FilterKind::Modality => "modality",
            FilterKind::BodyPart => "body part",
            FilterKind::StudyDate => "study dates",
            FilterKind::Description => "descriptions",
            FilterKind::PatientSex => "patient sex",
            FilterKind::PatientAge => "patient age",
            FilterKind::StudyUid => "original UIDs",
        })
        .collect::<Vec<_>>()
        .join(" and ")
}

/// Whether `profile` releases the attribute `kind` filters on.
pub fn releases(profile: &Profile, kind: FilterKind) -> bool {
    match kind {
        FilterKind::Modality | FilterKind::BodyPart | FilterKind::StudyUid => true,
        FilterKind::Description => false,
        FilterKind::StudyDate => profile.has(DeidOption::RetainLongitudinalModifiedDates),
        FilterKind::PatientSex | FilterKind::PatientAge => {
            profile.has(DeidOption::RetainPatientCharacteristics)
        }
    }
}

impl Deidentifier {
    /// What to ask the partner so that every study whose *released* values
    /// match is found: UIDs dropped (they are pseudonyms), date ranges
    /// widened by the largest shift, age ranges that reach 90 opened
    /// upwards. The answer is then narrowed by [`Deidentifier::released_match`].
    pub fn asked(&self, query: &StudyQuery) -> Result<StudyQuery, Withheld> {
        let removed: Vec<FilterKind> = query
            .filters_used()
            .into_iter()
            .filter(|kind| !releases(self.profile(), *kind))
            .collect();
        if !removed.is_empty() {
            return Err(Withheld {
                profile: self.profile().name(),
                removed,
            });
        }
        Ok(StudyQuery {
            study_uids: Default::default(),
            // Released = original - shift, shift in 1..=MAX_SHIFT_DAYS days.
            study_date: query.study_date.map(|range| DateRange {
                from: range.from.and_then(|d| d.checked_add(Duration::days(1))),
                to: range
                    .to
                    .and_then(|d| d.checked_add(Duration::days(MAX_SHIFT_DAYS.into()))),
            }),
            patient_age: query.patient_age.map(|range| {
                if reaches_cap(&range) {
                    AgeRange {
                        min: range.min.map(|min| min.min(AGE_CAP)),
                        max: None,
                    }
                } else {
                    range
                }
            }),
            ..query.clone()
        })
    }

    /// Whether the released form of `study` (found by [`Deidentifier::asked`])
    /// matches `query`: the shifted date, the capped age and the pseudonymous
    /// UID are checked; every other filter is evaluated on values the
    /// profile keeps as they are.
    pub fn released_match(&self, query: &StudyQuery, study: &Study) -> bool {
        let date = query.study_date.is_none_or(|range| {
            self.released_date(study)
                .is_some_and(|date| range.contains(date))
        });
        let age = query.patient_age.is_none_or(|range| {
            study.age_at_study().is_some_and(|age| {
                if age >= AGE_CAP {
                    reaches_cap(&range)
                } else {
                    range.contains(age)
                }
            })
        });
        let uid = query.study_uids.is_empty() || query.study_uids.contains(&self.uid(&study.uid));
        date && age && uid
    }

    /// Whether [`Deidentifier::released_match`] can tell anything the
    /// partner's answer to [`Deidentifier::asked`] does not.
    pub fn narrows(&self, query: &StudyQuery) -> bool {
        query.study_date.is_some() || query.patient_age.is_some() || !query.study_uids.is_empty()
    }
}

/// Whether an age range matches the `90+` bucket: it reaches 90.
fn reaches_cap(range: &AgeRange) -> bool {
    range.max.is_none_or(|max| max >= AGE_CAP)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]
    use super::*;
    use crate::deid::MasterKey;
    use meshgate_schema::PatientSex;
    use time::macros::date;

    fn deid(profile: Profile) -> Deidentifier {
        Deidentifier::new(
            MasterKey::new(&[9_u8; 32]).unwrap().project_key("p1"),
            profile,
            "north",
        )
    }

    fn full() -> Profile {
        Profile::with([
            DeidOption::RetainLongitudinalModifiedDates,
            DeidOption::RetainPatientCharacteristics,
        ])
    }

    fn study(uid: &str, born: time::Date, on: time::Date) -> Study {
        Study {
            uid: uid.into(),
            patient_id: Some(format!("MRN-{uid}")),
            patient_sex: Some(PatientSex::Female),
            patient_birth_date: Some(born),
            date: Some(on),
            modalities: vec!["CT".into()],
            ..Study::default()
        }
    }

    #[test]
    fn filters_on_attributes_a_profile_removes_are_withheld() {
        let by_description = StudyQuery {
            description: Some("chest".into()),
            ..StudyQuery::default()
        };
        let by_date = StudyQuery {
            study_date: Some(DateRange {
                from: Some(date!(2019 - 01 - 01)),
                to: None,
            }),
            ..StudyQuery::default()
        };
        let by_sex = StudyQuery {
            patient_sex: Some(PatientSex::Male),
            ..StudyQuery::default()
        };
        let basic = deid(Profile::basic());
        for query in [&by_description, &by_date, &by_sex] {
            assert!(basic.asked(query).is_err(), "{query:?}");
        }
        let withheld = deid(full()).asked(&by_description).unwrap_err();
        assert_eq!(withheld.removed, [FilterKind::Description]);
        assert!(withheld.to_string().contains("removes descriptions"));
        assert!(deid(full()).asked(&by_date).is_ok());
        assert!(deid(full()).asked(&by_sex).is_ok());
    }

    #[test]
    fn a_date_range_matches_exactly_the_studies_whose_shifted_date_is_in_it() {
        let d = deid(full());
        let range = DateRange {
            from: Some(date!(2018 - 03 - 01)),
            to: Some(date!(2018 - 03 - 31)),
        };
        let query = StudyQuery {
            study_date: Some(range),
            ..StudyQuery::default()
        };
        let asked = d.asked(&query).unwrap();
        let mut matched = 0;
        for day in 0..2000 {
            let on = date!(2017 - 01 - 01) + Duration::days(day);
            let original = study(&format!("1.2.{day}"), date!(1960 - 01 - 01), on);
            let shifted = d.study(&original).date.unwrap();
            let released = range.contains(shifted);
            if released {
                assert!(
                    asked.matches(&original),
                    "the widened range must find {on} shown as {shifted}"
                );
                matched += 1;
            }
            assert_eq!(d.released_match(&query, &original), released, "{on}");
        }
        assert!(matched > 10, "only {matched} studies matched");
    }

    #[test]
    fn age_ranges_cannot_split_the_90_plus_bucket() {
        let d = deid(full());
        let on = date!(2020 - 06 - 01);
        let ages = [(91, "a"), (95, "b"), (103, "c"), (89, "d")];
        let studies: Vec<Study> = ages
            .iter()
            .map(|(age, uid)| study(uid, date!(2020 - 01 - 01) - Duration::days(366 * age), on))
            .collect();
        let matching = |min: Option<u16>, max: Option<u16>| -> Vec<&str> {
            let query = StudyQuery {
                patient_age: Some(AgeRange { min, max }),
                ..StudyQuery::default()
            };
            let asked = d.asked(&query).unwrap();
            studies
                .iter()
                .filter(|s| asked.matches(s) && d.released_match(&query, s))
                .map(|s| s.uid.as_str())
                .collect()
        };
        let bucket = ["a", "b", "c"];
        for (min, max) in [
            (Some(90), None),
            (Some(95), None),
            (Some(90), Some(94)),
            (Some(95), Some(99)),
            (Some(100), Some(150)),
        ] {
            assert_eq!(matching(min, max), bucket, "{min:?}..{max:?}");
        }
        assert_eq!(matching(Some(80), Some(89)), ["d"]);
        assert_eq!(matching(Some(89), Some(90)), ["a", "b", "c", "d"]);
    }

    #[test]
    fn pseudonymous_uids_match_and_original_ones_do_not() {
        let d = deid(full());
        let original = study("1.2.3", date!(1960 - 01 - 01), date!(2020 - 01 - 01));
        let by = |uid: String| StudyQuery {
            study_uids: [uid].into(),
            ..StudyQuery::default()
        };
        assert!(d.released_match(&by(d.uid("1.2.3")), &original));
        assert!(!d.released_match(&by("1.2.3".into()), &original));
        assert!(d.asked(&by("1.2.3".into())).unwrap().study_uids.is_empty());
    }
}
