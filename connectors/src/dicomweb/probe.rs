//! Measuring what a DICOMweb backend supports, with a handful of small
//! QIDO-RS requests against the studies it holds, so that push-down follows
//! what the backend does rather than what its profile assumes.
//!
//! Each feature is only recorded as supported when the backend both
//! returns what it should and leaves out what it should: a backend that
//! ignores a parameter must not look as if it honoured it. What cannot be
//! told (too few studies, no description to match) stays unknown, and the
//! profile's assumption is used for it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshgate_schema::dicom::{DicomAttributes, tags};
use meshgate_schema::{ProbeFinding, ProbedFeature};
use reqwest::StatusCode;

use super::{DicomJson, DicomWebConnector, include_fields};
use crate::ConnectorError;

/// What a probe found; `None` where it could not tell.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Measured {
    pub limit: Option<bool>,
    pub offset: Option<bool>,
    pub wildcard: Option<bool>,
    pub uid_lists: Option<bool>,
    pub empty_no_content: Option<bool>,
    pub study_modality: Option<bool>,
    pub modality_lists: Option<bool>,
    pub modality_paging: Option<bool>,
    pub modality_first_page: Option<bool>,
    /// The most rows one page was measured to return in full: a page
    /// shorter than this is the end of the results, whatever the backend
    /// caps pages at.
    pub full_page: Option<u32>,
}

impl Measured {
    pub fn findings(&self) -> Vec<ProbeFinding> {
        [
            (ProbedFeature::Limit, self.limit),
            (ProbedFeature::Offset, self.offset),
            (ProbedFeature::Wildcard, self.wildcard),
            (ProbedFeature::UidLists, self.uid_lists),
            (ProbedFeature::EmptyResultNoContent, self.empty_no_content),
            (ProbedFeature::StudyLevelModality, self.study_modality),
            (ProbedFeature::ModalityLists, self.modality_lists),
            (ProbedFeature::ModalityPaging, self.modality_paging),
            (ProbedFeature::ModalityFirstPage, self.modality_first_page),
        ]
        .into_iter()
        .map(|(feature, supported)| ProbeFinding { feature, supported })
        .collect()
    }
}

/// Modalities to test against, one of which a study will lack.
const MODALITIES: [&str; 8] = ["CT", "MR", "US", "CR", "DX", "MG", "NM", "PT"];
/// A UID nobody has: `2.25.` and a UUID of zeros but one bit.
const NOBODYS_UID: &str = "2.25.1";

fn uid(row: &DicomJson) -> Option<String> {
    row.text(tags::STUDY_INSTANCE_UID)
}

fn has(rows: &Option<Vec<DicomJson>>, wanted: &str) -> bool {
    rows.as_ref()
        .is_some_and(|rows| rows.iter().any(|row| uid(row).as_deref() == Some(wanted)))
}

fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A request the backend refused as a client error means "not supported";
/// any other failure ends the probe.
fn lenient(
    answer: Result<Vec<DicomJson>, ConnectorError>,
) -> Result<Option<Vec<DicomJson>>, ConnectorError> {
    match answer {
        Ok(rows) => Ok(Some(rows)),
        Err(ConnectorError::UpstreamStatus(status)) if (400..500).contains(&status) => Ok(None),
        Err(error) => Err(error),
    }
}

impl DicomWebConnector {
    /// Measures the backend; errors only when it cannot be asked at all.
    /// Also returns how long the first request took.
    pub(super) async fn probe(&self) -> Result<(Measured, Duration), ConnectorError> {
        let mut measured = Measured::default();
        let fields = include_fields(&[tags::STUDY_DESCRIPTION, tags::MODALITIES_IN_STUDY]);
        let started = Instant::now();
        let first = self
            .get_json(
                "studies",
                &params(&[("includefield", &fields), ("limit", "10")]),
            )
            .await?;
        let latency = started.elapsed();
        measured.limit = match first.len() {
            0..=9 => None,
            10 => Some(true),
            _ => Some(false),
        };
        let (status, rows) = self
            .get_json_answer("studies", &params(&[("StudyInstanceUID", NOBODYS_UID)]))
            .await?;
        measured.empty_no_content = rows.is_empty().then_some(status == StatusCode::NO_CONTENT);

        // A page as large as searches ask for: the rows that come back are
        // a page size the backend returns in full.
        if measured.limit == Some(true) {
            let page = self.page_size.to_string();
            let rows = self
                .get_json("studies", &params(&[("limit", &page)]))
                .await?;
            measured.full_page = u32::try_from(rows.len()).ok().filter(|n| *n > 0);
        }

        let uids: Vec<String> = first.iter().filter_map(uid).collect();
        if let [a, b, ..] = uids.as_slice() {
            // The third row, not the second: a backend that repeats the
            // previous page's last row (Azure) does honour `offset`.
            if uids.len() >= 3 {
                let third = self
                    .get_json("studies", &params(&[("limit", "1"), ("offset", "2")]))
                    .await?;
                measured.offset = Some(third.first().and_then(uid).is_some_and(|u| &u != a));
            }
            let both = lenient(
                self.get_json(
                    "studies",
                    &params(&[("StudyInstanceUID", &format!("{a},{b}"))]),
                )
                .await,
            )?;
            measured.uid_lists = Some(has(&both, a) && has(&both, b) && !has(&both, NOBODYS_UID));
        }

        // Wildcards: a word of a stored description, in the other case.
        let described = first.iter().find_map(|row| {
            let description = row.text(tags::STUDY_DESCRIPTION)?;
            let word = description
                .split(|c: char| !c.is_ascii_alphanumeric())
                .find(|w| w.len() >= 3 && w.bytes().any(|b| b.is_ascii_alphabetic()))?;
            Some((uid(row)?, word.to_owned()))
        });
        if let Some((study, word)) = described {
            let flipped = if word.bytes().any(|b| b.is_ascii_uppercase()) {
                word.to_ascii_lowercase()
            } else {
                word.to_ascii_uppercase()
            };
            let matching = format!("*{flipped}*");
            let rows = lenient(
                self.get_json(
                    "studies",
                    &params(&[
                        ("StudyInstanceUID", &study),
                        ("StudyDescription", &matching),
                    ]),
                )
                .await,
            )?;
            let other = lenient(
                self.get_json(
                    "studies",
                    &params(&[
                        ("StudyInstanceUID", &study),
                        ("StudyDescription", "*qqzqqz*"),
                    ]),
                )
                .await,
            )?;
            measured.wildcard = Some(has(&rows, &study) && !has(&other, &study));
        }

        // Study-level modality: the study's own matches, one it lacks not.
        // The most frequent modality of the first rows, so that paging can
        // be tried on it too.
        let mut frequency: BTreeMap<String, usize> = BTreeMap::new();
        for row in &first {
            for modality in row.texts(tags::MODALITIES_IN_STUDY) {
                *frequency.entry(modality).or_default() += 1;
            }
        }
        let common = frequency
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(m, _)| m.clone());
        let with_modality = common.and_then(|modality| {
            first.iter().find_map(|row| {
                let modalities = row.texts(tags::MODALITIES_IN_STUDY);
                if !modalities.contains(&modality) {
                    return None;
                }
                let lacking = MODALITIES
                    .iter()
                    .find(|m| !modalities.iter().any(|have| have == *m))?;
                Some((uid(row)?, modality.clone(), *lacking))
            })
        });
        if let Some((study, modality, lacking)) = with_modality {
            let ask = |value: String| {
                let study = study.clone();
                async move {
                    lenient(
                        self.get_json(
                            "studies",
                            &params(&[("StudyInstanceUID", &study), ("ModalitiesInStudy", &value)]),
                        )
                        .await,
                    )
                }
            };
            let own = ask(modality.clone()).await?;
            let other = ask(lacking.to_owned()).await?;
            let study_modality = has(&own, &study) && !has(&other, &study);
            measured.study_modality = Some(study_modality);
            if study_modality {
                let list = ask(format!("{lacking},{modality}")).await?;
                measured.modality_lists = Some(has(&list, &study));
                // Paging: single-row pages at offsets 0 and 2 must be two
                // different matches.
                let page = |offset: &'static str, limit: &'static str| {
                    let modality = modality.clone();
                    async move {
                        self.get_json(
                            "studies",
                            &params(&[
                                ("ModalitiesInStudy", &modality),
                                ("limit", limit),
                                ("offset", offset),
                            ]),
                        )
                        .await
                    }
                };
                // As for `offset` above: the third match, not the second.
                let several = page("0", "10").await?;
                if several.len() >= 3 {
                    let first_page = page("0", "1").await?;
                    let second_page = page("2", "1").await?;
                    let one = first_page.first().and_then(uid);
                    let two = second_page.first().and_then(uid);
                    measured.modality_paging = Some(one.is_some() && two.is_some() && one != two);
                }
            }
        }
        if measured.study_modality == Some(true) {
            measured.modality_first_page = self.first_page_holds_first_matches(&first).await?;
        }
        Ok((measured, latency))
    }

    /// Whether a first page of a `ModalitiesInStudy` search holds the first
    /// matches rather than the matches among the first studies. Take a
    /// modality `c` of the first studies have, with one lacking it among
    /// the first `c`: asked for `c` rows, a backend that filters before it
    /// limits returns `c` (there are at least that many), one that limits
    /// first returns fewer.
    async fn first_page_holds_first_matches(
        &self,
        first: &[DicomJson],
    ) -> Result<Option<bool>, ConnectorError> {
        let has_modality = |row: &DicomJson, modality: &str| {
            row.texts(tags::MODALITIES_IN_STUDY)
                .iter()
                .any(|m| m == modality)
        };
        let test = MODALITIES.iter().find_map(|modality| {
            let count = first.iter().filter(|r| has_modality(r, modality)).count();
            let lacking_early = first[..count].iter().any(|r| !has_modality(r, modality));
            (count > 0 && lacking_early).then_some((*modality, count))
        });
        let Some((modality, count)) = test else {
            return Ok(None);
        };
        let rows = self
            .get_json(
                "studies",
                &params(&[
                    ("ModalitiesInStudy", modality),
                    ("limit", &count.to_string()),
                ]),
            )
            .await?;
        let only_matches = rows.iter().all(|row| has_modality(row, modality));
        Ok(Some(rows.len() == count && only_matches))
    }
}
