//! A study as every connector reports it: study-level attributes, and its
//! series and instances once they have been fetched.

use std::collections::HashMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use time::{Date, Time, UtcOffset};

use crate::dicom::{
    DicomAttributes, parse_age_years, parse_date, parse_time, parse_utc_offset, tags,
};

/// The acquisition modalities a cohort filter can name (DICOM CID 29).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
pub enum Modality {
    /// Computed tomography
    Ct,
    /// Magnetic resonance
    Mr,
    /// Computed radiography
    Cr,
    /// Digital radiography
    Dx,
    /// Ultrasound
    Us,
    /// Positron emission tomography
    Pt,
    /// Mammography
    Mg,
    /// Nuclear medicine
    Nm,
    /// X-ray angiography
    Xa,
    /// Radio fluoroscopy
    Rf,
}

impl Modality {
    pub const ALL: [Modality; 10] = [
        Modality::Ct,
        Modality::Mr,
        Modality::Cr,
        Modality::Dx,
        Modality::Us,
        Modality::Pt,
        Modality::Mg,
        Modality::Nm,
        Modality::Xa,
        Modality::Rf,
    ];

    /// The DICOM code string.
    pub fn code(self) -> &'static str {
        match self {
            Modality::Ct => "CT",
            Modality::Mr => "MR",
            Modality::Cr => "CR",
            Modality::Dx => "DX",
            Modality::Us => "US",
            Modality::Pt => "PT",
            Modality::Mg => "MG",
            Modality::Nm => "NM",
            Modality::Xa => "XA",
            Modality::Rf => "RF",
        }
    }

    /// The modality for a DICOM code string, if it is one a filter can name.
    pub fn from_code(code: &str) -> Option<Modality> {
        Modality::ALL.into_iter().find(|m| m.code() == code)
    }
}

impl fmt::Display for Modality {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Patient's sex as DICOM (0010,0040) records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
pub enum PatientSex {
    Female,
    Male,
    Other,
}

impl PatientSex {
    /// The DICOM code string (`F`, `M`, `O`).
    pub fn code(self) -> &'static str {
        match self {
            PatientSex::Female => "F",
            PatientSex::Male => "M",
            PatientSex::Other => "O",
        }
    }

    pub fn from_code(code: &str) -> Option<PatientSex> {
        match code {
            "F" => Some(PatientSex::Female),
            "M" => Some(PatientSex::Male),
            "O" => Some(PatientSex::Other),
            _ => None,
        }
    }
}

/// One study, as reported by a partner.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Study {
    pub uid: String,
    pub patient_id: Option<String>,
    pub patient_name: Option<String>,
    pub patient_sex: Option<PatientSex>,
    pub patient_birth_date: Option<Date>,
    /// Patient's Age (0010,1010) in whole years, when the partner records it.
    pub patient_age: Option<u16>,
    pub date: Option<Date>,
    pub time: Option<Time>,
    pub timezone_offset: Option<UtcOffset>,
    pub accession_number: Option<String>,
    pub description: Option<String>,
    /// Modalities in Study (0008,0061), de-duplicated and sorted.
    pub modalities: Vec<String>,
    /// Body parts examined across the study's series, when known.
    pub body_parts: Vec<String>,
    pub number_of_series: Option<u32>,
    pub number_of_instances: Option<u32>,
    /// Empty until the series have been fetched.
    pub series: Vec<Series>,
}

/// One series of a study.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Series {
    pub uid: String,
    pub number: Option<u32>,
    pub modality: Option<String>,
    pub description: Option<String>,
    pub body_part: Option<String>,
    pub laterality: Option<String>,
    pub date: Option<Date>,
    pub time: Option<Time>,
    pub number_of_instances: Option<u32>,
    pub instances: Vec<Instance>,
}

/// One SOP instance of a series.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Instance {
    pub uid: String,
    pub sop_class: Option<String>,
    pub number: Option<u32>,
}

impl Study {
    /// Reads the study-level attributes; series are added separately.
    /// Returns `None` when the Study Instance UID is missing.
    pub fn from_attributes(attributes: &impl DicomAttributes) -> Option<Study> {
        let mut modalities = attributes.texts(tags::MODALITIES_IN_STUDY);
        modalities.sort();
        modalities.dedup();
        Some(Study {
            uid: attributes.text(tags::STUDY_INSTANCE_UID)?,
            patient_id: attributes.text(tags::PATIENT_ID),
            patient_name: attributes.text(tags::PATIENT_NAME),
            patient_sex: attributes
                .text(tags::PATIENT_SEX)
                .and_then(|code| PatientSex::from_code(&code)),
            patient_birth_date: attributes
                .text(tags::PATIENT_BIRTH_DATE)
                .and_then(|v| parse_date(&v)),
            patient_age: attributes
                .text(tags::PATIENT_AGE)
                .and_then(|v| parse_age_years(&v)),
            date: attributes
                .text(tags::STUDY_DATE)
                .and_then(|v| parse_date(&v)),
            time: attributes
                .text(tags::STUDY_TIME)
                .and_then(|v| parse_time(&v)),
            timezone_offset: attributes
                .text(tags::TIMEZONE_OFFSET_FROM_UTC)
                .and_then(|v| parse_utc_offset(&v)),
            accession_number: attributes.text(tags::ACCESSION_NUMBER),
            description: attributes.text(tags::STUDY_DESCRIPTION),
            modalities,
            body_parts: Vec::new(),
            number_of_series: attributes.unsigned(tags::NUMBER_OF_STUDY_RELATED_SERIES),
            number_of_instances: attributes.unsigned(tags::NUMBER_OF_STUDY_RELATED_INSTANCES),
            series: Vec::new(),
        })
    }

    /// The patient's age in whole years at the time of the study: Patient's
    /// Age when recorded, otherwise computed from the birth and study dates.
    pub fn age_at_study(&self) -> Option<u16> {
        if let Some(age) = self.patient_age {
            return Some(age);
        }
        let (birth, study) = (self.patient_birth_date?, self.date?);
        age_in_years(birth, study)
    }

    /// Attaches fetched series, and brings the study-level summary (counts,
    /// modalities, body parts) in line with them.
    pub fn set_series(&mut self, mut series: Vec<Series>) {
        series.sort_by(|a, b| a.number.cmp(&b.number).then_with(|| a.uid.cmp(&b.uid)));
        for one in &mut series {
            one.instances
                .sort_by(|a, b| a.number.cmp(&b.number).then_with(|| a.uid.cmp(&b.uid)));
        }
        let mut modalities: Vec<String> =
            series.iter().filter_map(|s| s.modality.clone()).collect();
        modalities.append(&mut self.modalities);
        modalities.sort();
        modalities.dedup();
        self.modalities = modalities;
        let mut body_parts: Vec<String> =
            series.iter().filter_map(|s| s.body_part.clone()).collect();
        body_parts.sort();
        body_parts.dedup();
        self.body_parts = body_parts;
        self.number_of_series = Some(u32::try_from(series.len()).unwrap_or(u32::MAX));
        let instances: u32 = series
            .iter()
            .map(|s| s.number_of_instances.unwrap_or_default())
            .sum();
        self.number_of_instances = Some(instances);
        self.series = series;
    }
}

/// Whole years from `birth` to `on`; `None` if `on` precedes `birth`.
pub fn age_in_years(birth: Date, on: Date) -> Option<u16> {
    let mut years = on.year() - birth.year();
    if (u8::from(on.month()), on.day()) < (u8::from(birth.month()), birth.day()) {
        years -= 1;
    }
    u16::try_from(years).ok()
}

impl Series {
    /// Reads series-level attributes. Returns `None` without a Series Instance UID.
    pub fn from_attributes(attributes: &impl DicomAttributes) -> Option<Series> {
        Some(Series {
            uid: attributes.text(tags::SERIES_INSTANCE_UID)?,
            number: attributes.unsigned(tags::SERIES_NUMBER),
            modality: attributes.text(tags::MODALITY),
            description: attributes.text(tags::SERIES_DESCRIPTION),
            body_part: attributes
                .text(tags::BODY_PART_EXAMINED)
                .map(|v| v.to_ascii_uppercase()),
            laterality: attributes.text(tags::LATERALITY),
            date: attributes
                .text(tags::SERIES_DATE)
                .and_then(|v| parse_date(&v)),
            time: attributes
                .text(tags::SERIES_TIME)
                .and_then(|v| parse_time(&v)),
            number_of_instances: attributes.unsigned(tags::NUMBER_OF_SERIES_RELATED_INSTANCES),
            instances: Vec::new(),
        })
    }
}

/// Groups instance rows under their series rows (QIDO-RS series- and
/// instance-level answers for one study) by Series Instance UID.
pub fn assemble_series<A: DicomAttributes>(series_rows: &[A], instance_rows: &[A]) -> Vec<Series> {
    let mut instances: HashMap<String, Vec<Instance>> = HashMap::new();
    for row in instance_rows {
        if let (Some(series_uid), Some(instance)) = (
            row.text(tags::SERIES_INSTANCE_UID),
            Instance::from_attributes(row),
        ) {
            instances.entry(series_uid).or_default().push(instance);
        }
    }
    series_rows
        .iter()
        .filter_map(Series::from_attributes)
        .map(|mut series| {
            series.instances = instances.remove(&series.uid).unwrap_or_default();
            if series.number_of_instances.is_none() {
                series.number_of_instances = u32::try_from(series.instances.len()).ok();
            }
            series
        })
        .collect()
}

impl Instance {
    /// Reads instance-level attributes. Returns `None` without a SOP Instance UID.
    pub fn from_attributes(attributes: &impl DicomAttributes) -> Option<Instance> {
        Some(Instance {
            uid: attributes.text(tags::SOP_INSTANCE_UID)?,
            sop_class: attributes.text(tags::SOP_CLASS_UID),
            number: attributes.unsigned(tags::INSTANCE_NUMBER),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::date;

    #[test]
    fn age_counts_whole_years_up_to_the_day_before_the_birthday() {
        assert_eq!(
            age_in_years(date!(1960 - 05 - 10), date!(2020 - 05 - 09)),
            Some(59)
        );
        assert_eq!(
            age_in_years(date!(1960 - 05 - 10), date!(2020 - 05 - 10)),
            Some(60)
        );
        assert_eq!(
            age_in_years(date!(2020 - 05 - 10), date!(2019 - 05 - 10)),
            None
        );
    }

    #[test]
    fn recorded_patient_age_wins_over_the_computed_one() {
        let study = Study {
            patient_age: Some(41),
            patient_birth_date: Some(date!(1960 - 01 - 01)),
            date: Some(date!(2020 - 01 - 01)),
            ..Study::default()
        };
        assert_eq!(study.age_at_study(), Some(41));
    }
}
