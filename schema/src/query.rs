//! The normalised cohort filter: built once from the GraphQL input,
//! validated, and then the single value every connector receives.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::Date;

use crate::capabilities::FilterKind;
use crate::study::{Modality, PatientSex, Study};

/// Most study UIDs one filter may name.
pub const MAX_STUDY_UIDS: usize = 1000;
/// Longest description needle.
pub const MAX_DESCRIPTION_LEN: usize = 64;

/// An inclusive range of study dates; either end may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DateRange {
    pub from: Option<Date>,
    pub to: Option<Date>,
}

impl DateRange {
    pub fn contains(&self, date: Date) -> bool {
        self.from.is_none_or(|from| date >= from) && self.to.is_none_or(|to| date <= to)
    }
}

/// An inclusive range of ages in whole years; either end may be open.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgeRange {
    pub min: Option<u16>,
    pub max: Option<u16>,
}

impl AgeRange {
    pub fn contains(&self, age: u16) -> bool {
        self.min.is_none_or(|min| age >= min) && self.max.is_none_or(|max| age <= max)
    }
}

/// A validated, normalised cohort filter. Every part that is set must hold
/// for a study to match; an empty filter matches every study.
///
/// Its JSON form is the wire form between processes; what arrives is
/// checked by the same rules as a GraphQL filter (and refused otherwise).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "Unchecked")]
pub struct StudyQuery {
    /// The study has a series of one of these modalities (empty: any).
    pub modalities: BTreeSet<Modality>,
    /// Body Part Examined of a series, upper case. With `modalities`, the
    /// same series must match both.
    pub body_part: Option<String>,
    pub study_date: Option<DateRange>,
    /// Case-insensitive substring of the study description, lower case.
    pub description: Option<String>,
    pub patient_sex: Option<PatientSex>,
    /// Age at the time of the study.
    pub patient_age: Option<AgeRange>,
    pub study_uids: BTreeSet<String>,
    /// Partner ids to ask (empty: all). Resolved by the gateway, not connectors.
    pub partners: BTreeSet<String>,
}

/// A [`StudyQuery`] as it arrives, before its checks.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Unchecked {
    modalities: BTreeSet<Modality>,
    body_part: Option<String>,
    study_date: Option<DateRange>,
    description: Option<String>,
    patient_sex: Option<PatientSex>,
    patient_age: Option<AgeRange>,
    study_uids: BTreeSet<String>,
    partners: BTreeSet<String>,
}

impl TryFrom<Unchecked> for StudyQuery {
    type Error = QueryError;

    fn try_from(wire: Unchecked) -> Result<StudyQuery, QueryError> {
        if let Some(DateRange {
            from: Some(from),
            to: Some(to),
        }) = wire.study_date
            && from > to
        {
            return Err(QueryError::InvertedDateRange { from, to });
        }
        if let Some(range) = wire.patient_age {
            let (min, max) = (range.min.unwrap_or(0), range.max.unwrap_or(150));
            if min.max(max) > 150 {
                return Err(QueryError::AgeOutOfRange(i32::from(min.max(max))));
            }
            if min > max {
                return Err(QueryError::InvertedAgeRange {
                    min: i32::from(min),
                    max: i32::from(max),
                });
            }
        }
        let normalised = |text: Option<&String>, check: fn(&str) -> Result<String, QueryError>| {
            text.map(|t| {
                check(t).and_then(|n| {
                    if &n == t {
                        Ok(n)
                    } else {
                        Err(QueryError::NotNormalised)
                    }
                })
            })
            .transpose()
        };
        Ok(StudyQuery {
            modalities: wire.modalities,
            body_part: normalised(wire.body_part.as_ref(), body_part)?,
            study_date: wire.study_date,
            description: normalised(wire.description.as_ref(), description)?,
            patient_sex: wire.patient_sex,
            patient_age: wire.patient_age,
            study_uids: study_uids(wire.study_uids)?,
            partners: wire.partners,
        })
    }
}

/// A body part as a filter names it: trimmed, upper case, 1 to 16 of
/// A–Z, 0–9, space or underscore.
fn body_part(part: &str) -> Result<String, QueryError> {
    let part = part.trim().to_ascii_uppercase();
    let valid = !part.is_empty()
        && part.len() <= 16
        && part
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == ' ' || c == '_');
    valid.then_some(part).ok_or(QueryError::InvalidBodyPart)
}

/// A description needle: trimmed, lower case, 1 to
/// [`MAX_DESCRIPTION_LEN`] characters, no control characters.
fn description(text: &str) -> Result<String, QueryError> {
    let text = text.trim().to_lowercase();
    if text.is_empty()
        || text.chars().count() > MAX_DESCRIPTION_LEN
        || text.chars().any(char::is_control)
    {
        Err(QueryError::InvalidDescription)
    } else {
        Ok(text)
    }
}

/// At most [`MAX_STUDY_UIDS`] DICOM UIDs.
fn study_uids(uids: BTreeSet<String>) -> Result<BTreeSet<String>, QueryError> {
    if uids.len() > MAX_STUDY_UIDS {
        return Err(QueryError::TooManyUids);
    }
    if !uids.iter().all(|uid| is_dicom_uid(uid)) {
        return Err(QueryError::InvalidUid);
    }
    Ok(uids)
}

/// Why a filter was refused. Each maps to the stable code `INVALID_FILTER`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    #[error("studyDate.from ({from}) is after studyDate.to ({to})")]
    InvertedDateRange { from: Date, to: Date },
    #[error("patientAge.min ({min}) is greater than patientAge.max ({max})")]
    InvertedAgeRange { min: i32, max: i32 },
    #[error("patientAge bounds must be between 0 and 150, got {0}")]
    AgeOutOfRange(i32),
    #[error("bodyPart must be 1 to 16 characters of A-Z, 0-9, space or underscore")]
    InvalidBodyPart,
    #[error("description must be 1 to {MAX_DESCRIPTION_LEN} characters")]
    InvalidDescription,
    #[error("studyInstanceUids contains a value that is not a DICOM UID")]
    InvalidUid,
    #[error("studyInstanceUids names more than {MAX_STUDY_UIDS} studies")]
    TooManyUids,
    #[error("unknown partner '{0}'")]
    UnknownPartner(String),
    /// A query from another process with a value not in its normal form.
    #[error("a filter value is not in its normal form")]
    NotNormalised,
}

impl QueryError {
    /// The stable `extensions.code` of every filter error.
    pub const CODE: &'static str = "INVALID_FILTER";
}

#[cfg(feature = "graphql")]
impl TryFrom<crate::api::StudyFilter> for StudyQuery {
    type Error = QueryError;

    fn try_from(filter: crate::api::StudyFilter) -> Result<StudyQuery, QueryError> {
        let study_date = match filter.study_date {
            None => None,
            Some(range) => {
                let (from, to) = (range.from.map(|d| d.0), range.to.map(|d| d.0));
                if let (Some(from), Some(to)) = (from, to)
                    && from > to
                {
                    return Err(QueryError::InvertedDateRange { from, to });
                }
                Some(DateRange { from, to }).filter(|r| r.from.is_some() || r.to.is_some())
            }
        };
        let patient_age = match filter.patient_age {
            None => None,
            Some(range) => {
                let bound = |value: Option<i32>| -> Result<Option<u16>, QueryError> {
                    value
                        .map(|v| {
                            u16::try_from(v)
                                .ok()
                                .filter(|v| *v <= 150)
                                .ok_or(QueryError::AgeOutOfRange(v))
                        })
                        .transpose()
                };
                if let (Some(min), Some(max)) = (range.min, range.max)
                    && min > max
                {
                    return Err(QueryError::InvertedAgeRange { min, max });
                }
                Some(AgeRange {
                    min: bound(range.min)?,
                    max: bound(range.max)?,
                })
                .filter(|r| r.min.is_some() || r.max.is_some())
            }
        };
        let body_part = filter.body_part.as_deref().map(body_part).transpose()?;
        let description = filter.description.as_deref().map(description).transpose()?;
        let study_uids = study_uids(
            filter
                .study_instance_uids
                .unwrap_or_default()
                .into_iter()
                .map(|uid| uid.trim().to_owned())
                .collect(),
        )?;
        Ok(StudyQuery {
            modalities: filter.modalities.unwrap_or_default().into_iter().collect(),
            body_part,
            study_date,
            description,
            patient_sex: filter.patient_sex,
            patient_age,
            study_uids,
            partners: filter
                .partners
                .unwrap_or_default()
                .into_iter()
                .map(|id| id.to_string())
                .collect(),
        })
    }
}

/// A DICOM UID: 1 to 64 characters, dot-separated numeric components
/// without leading zeros.
pub fn is_dicom_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 64
        && uid.split('.').all(|part| {
            !part.is_empty()
                && part.chars().all(|c| c.is_ascii_digit())
                && (part == "0" || !part.starts_with('0'))
        })
}

impl StudyQuery {
    /// The filter kinds this query uses.
    pub fn filters_used(&self) -> BTreeSet<FilterKind> {
        let mut used = BTreeSet::new();
        let mut add = |set: bool, kind| {
            if set {
                used.insert(kind);
            }
        };
        add(!self.modalities.is_empty(), FilterKind::Modality);
        add(self.body_part.is_some(), FilterKind::BodyPart);
        add(self.study_date.is_some(), FilterKind::StudyDate);
        add(self.description.is_some(), FilterKind::Description);
        add(self.patient_sex.is_some(), FilterKind::PatientSex);
        add(self.patient_age.is_some(), FilterKind::PatientAge);
        add(!self.study_uids.is_empty(), FilterKind::StudyUid);
        used
    }

    /// Whether `study` satisfies every part of the filter.
    pub fn matches(&self, study: &Study) -> bool {
        self.matches_on(study, &self.filters_used())
    }

    /// Whether `study` satisfies the named parts of the filter; connectors
    /// use this for what their backend could not filter itself.
    pub fn matches_on(&self, study: &Study, kinds: &BTreeSet<FilterKind>) -> bool {
        let modality = kinds.contains(&FilterKind::Modality);
        let body_part = kinds.contains(&FilterKind::BodyPart);
        if (modality || body_part) && !self.matches_series_level(study, modality, body_part) {
            return false;
        }
        kinds.iter().all(|kind| match kind {
            FilterKind::Modality | FilterKind::BodyPart => true,
            FilterKind::StudyDate => self
                .study_date
                .is_none_or(|range| study.date.is_some_and(|d| range.contains(d))),
            FilterKind::Description => self.description.as_ref().is_none_or(|needle| {
                study
                    .description
                    .as_ref()
                    .is_some_and(|d| d.to_lowercase().contains(needle.as_str()))
            }),
            FilterKind::PatientSex => self
                .patient_sex
                .is_none_or(|sex| study.patient_sex == Some(sex)),
            FilterKind::PatientAge => self
                .patient_age
                .is_none_or(|range| study.age_at_study().is_some_and(|a| range.contains(a))),
            FilterKind::StudyUid => self.study_uids.contains(&study.uid),
        })
    }

    /// Modality and body part describe one series: the study must have a
    /// series of one of the modalities *and* of the body part. With only a
    /// study-level summary (no series loaded) each is checked on its own.
    fn matches_series_level(&self, study: &Study, modality: bool, body_part: bool) -> bool {
        let modality_ok = |code: Option<&str>| {
            !modality
                || code
                    .and_then(Modality::from_code)
                    .is_some_and(|m| self.modalities.contains(&m))
        };
        // Archives store body parts in any case ("chest"); the filter is
        // upper case.
        let part_ok = |part: Option<&str>| {
            !body_part
                || self
                    .body_part
                    .as_deref()
                    .is_none_or(|want| part.is_some_and(|p| p.eq_ignore_ascii_case(want)))
        };
        if study.series.is_empty() {
            study.modalities.iter().any(|code| modality_ok(Some(code)))
                && (!body_part || study.body_parts.iter().any(|part| part_ok(Some(part))))
        } else {
            study.series.iter().any(|series| {
                modality_ok(series.modality.as_deref()) && part_ok(series.body_part.as_deref())
            })
        }
    }

    /// A stable digest of the normalised filter: equal filters, equal digest.
    /// It names no values, so it is safe in logs and cursors.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let digest = Sha256::digest(&canonical);
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }
}

// The filter's rules as the GraphQL API applies them.
#[cfg(test)]
#[cfg(feature = "graphql")]
mod tests {
    use super::*;
    use crate::api::{AgeRangeInput, DateRangeInput, IsoDate, StudyFilter};
    use time::macros::date;

    fn ct_chest_2019() -> Study {
        Study {
            uid: "1.2.3".into(),
            modalities: vec!["CT".into(), "SR".into()],
            body_parts: vec!["CHEST".into()],
            date: Some(date!(2019 - 06 - 01)),
            description: Some("CT Thorax with contrast".into()),
            patient_sex: Some(PatientSex::Female),
            patient_birth_date: Some(date!(1960 - 06 - 02)),
            ..Study::default()
        }
    }

    fn query(filter: StudyFilter) -> StudyQuery {
        StudyQuery::try_from(filter).unwrap()
    }

    #[test]
    fn each_filter_part_matches_and_rejects() {
        let study = ct_chest_2019();
        let cases: Vec<(StudyFilter, bool)> = vec![
            (StudyFilter::default(), true),
            (
                StudyFilter {
                    modalities: Some(vec![Modality::Mr, Modality::Ct]),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    modalities: Some(vec![Modality::Mr]),
                    ..Default::default()
                },
                false,
            ),
            (
                StudyFilter {
                    body_part: Some("chest".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    body_part: Some("HEAD".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                StudyFilter {
                    description: Some("THORAX".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    description: Some("abdomen".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                StudyFilter {
                    patient_sex: Some(PatientSex::Female),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    patient_sex: Some(PatientSex::Male),
                    ..Default::default()
                },
                false,
            ),
            // Born 1960-06-02, studied 2019-06-01: 58 years old.
            (
                StudyFilter {
                    patient_age: Some(AgeRangeInput {
                        min: Some(58),
                        max: Some(58),
                    }),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    patient_age: Some(AgeRangeInput {
                        min: Some(59),
                        max: None,
                    }),
                    ..Default::default()
                },
                false,
            ),
            (
                StudyFilter {
                    study_date: Some(DateRangeInput {
                        from: Some(IsoDate(date!(2019 - 06 - 01))),
                        to: Some(IsoDate(date!(2019 - 06 - 01))),
                    }),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    study_date: Some(DateRangeInput {
                        from: Some(IsoDate(date!(2019 - 06 - 02))),
                        to: None,
                    }),
                    ..Default::default()
                },
                false,
            ),
            (
                StudyFilter {
                    study_instance_uids: Some(vec!["1.2.3".into()]),
                    ..Default::default()
                },
                true,
            ),
            (
                StudyFilter {
                    study_instance_uids: Some(vec!["1.2.4".into()]),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (filter, expected) in cases {
            let label = format!("{filter:?}");
            assert_eq!(query(filter).matches(&study), expected, "{label}");
        }
    }

    #[test]
    fn modality_and_body_part_must_hold_for_the_same_series() {
        let series = |modality: &str, part: &str| crate::Series {
            uid: format!("1.{modality}"),
            modality: Some(modality.into()),
            body_part: Some(part.into()),
            ..crate::Series::default()
        };
        let mut study = ct_chest_2019();
        study.set_series(vec![series("CT", "HEAD"), series("MR", "CHEST")]);
        let ct_chest = query(StudyFilter {
            modalities: Some(vec![Modality::Ct]),
            body_part: Some("CHEST".into()),
            ..Default::default()
        });
        let mr_chest = query(StudyFilter {
            modalities: Some(vec![Modality::Mr]),
            body_part: Some("CHEST".into()),
            ..Default::default()
        });
        let ct_only = query(StudyFilter {
            modalities: Some(vec![Modality::Ct]),
            ..Default::default()
        });
        assert!(!ct_chest.matches(&study));
        assert!(mr_chest.matches(&study));
        assert!(ct_only.matches(&study));
    }

    #[test]
    fn invalid_filters_are_refused_with_a_reason() {
        let cases: Vec<StudyFilter> = vec![
            StudyFilter {
                study_date: Some(DateRangeInput {
                    from: Some(IsoDate(date!(2022 - 01 - 01))),
                    to: Some(IsoDate(date!(2018 - 01 - 01))),
                }),
                ..Default::default()
            },
            StudyFilter {
                patient_age: Some(AgeRangeInput {
                    min: Some(70),
                    max: Some(50),
                }),
                ..Default::default()
            },
            StudyFilter {
                patient_age: Some(AgeRangeInput {
                    min: Some(-1),
                    max: None,
                }),
                ..Default::default()
            },
            StudyFilter {
                body_part: Some("CHEST*".into()),
                ..Default::default()
            },
            StudyFilter {
                body_part: Some("".into()),
                ..Default::default()
            },
            StudyFilter {
                description: Some("   ".into()),
                ..Default::default()
            },
            StudyFilter {
                study_instance_uids: Some(vec!["1.2.03".into()]),
                ..Default::default()
            },
            StudyFilter {
                study_instance_uids: Some(vec!["1.2.3*".into()]),
                ..Default::default()
            },
        ];
        for filter in cases {
            assert!(StudyQuery::try_from(filter.clone()).is_err(), "{filter:?}");
        }
    }

    #[test]
    fn equal_filters_share_a_fingerprint_and_different_ones_do_not() {
        let a = query(StudyFilter {
            modalities: Some(vec![Modality::Ct, Modality::Mr]),
            ..Default::default()
        });
        let b = query(StudyFilter {
            modalities: Some(vec![Modality::Mr, Modality::Ct, Modality::Ct]),
            ..Default::default()
        });
        let c = query(StudyFilter {
            modalities: Some(vec![Modality::Ct]),
            ..Default::default()
        });
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
