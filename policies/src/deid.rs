//! De-identification of studies before they leave a partner's part of a
//! query: the DICOM PS3.15 Annex E Basic Application Level Confidentiality
//! Profile, applied to what an ImagingStudy carries, with three of its options.
//!
//! What the Basic Profile does here:
//! - Study, series and instance UIDs become keyed pseudonyms (`2.25.<decimal>`);
//!   SOP Class UIDs are kept.
//! - The patient reference becomes a keyed pseudonym; name, ID, birth date,
//!   accession number and every description are removed.
//! - Dates and times are removed, unless *Retain Longitudinal Temporal
//!   Information with Modified Dates* applies: then every date of a patient
//!   is shifted by the same number of days (intervals are kept). Time of
//!   day is never released: to the second, beside a shifted date, it is a
//!   key that links a released study back to the original.
//! - Sex and age are removed, unless *Retain Patient Characteristics*
//!   applies: then sex and age in whole years are kept, ages of 90 and over
//!   reported as 90.
//! - Modality, body part, laterality, SOP class, numbers and counts are kept.
//!
//! Pseudonyms are HMAC-SHA256 under one key per project, derived from the
//! gateway's master key: stable within a project (and across partners for
//! the same UID), unlinkable across projects. Each kind of pseudonym (UID,
//! patient, date shift) uses its own label.

use std::collections::BTreeSet;
use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use meshgate_schema::fhir::SecurityLabel;
use meshgate_schema::{Instance, Series, Study};
use sha2::Sha256;
use time::{Date, Duration, Time};

type HmacSha256 = Hmac<Sha256>;

/// Oldest age reported as such; older patients are reported as this age ("90+").
pub const AGE_CAP: u16 = 90;

/// Largest date shift, in days (shifts go back 1 to this many days).
pub const MAX_SHIFT_DAYS: u32 = 1095;

/// An option of the Basic Application Level Confidentiality Profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeidOption {
    /// Retain Longitudinal Temporal Information with Modified Dates (DCM 113107).
    RetainLongitudinalModifiedDates,
    /// Retain Patient Characteristics (DCM 113108).
    RetainPatientCharacteristics,
    /// Retain Device Identity (DCM 113109).
    RetainDeviceIdentity,
}

impl DeidOption {
    pub const ALL: [DeidOption; 3] = [
        DeidOption::RetainLongitudinalModifiedDates,
        DeidOption::RetainPatientCharacteristics,
        DeidOption::RetainDeviceIdentity,
    ];

    /// The option's name in policies and responses.
    pub fn name(self) -> &'static str {
        match self {
            DeidOption::RetainLongitudinalModifiedDates => "retain-longitudinal-modified-dates",
            DeidOption::RetainPatientCharacteristics => "retain-patient-characteristics",
            DeidOption::RetainDeviceIdentity => "retain-device-identity",
        }
    }

    fn label(self) -> SecurityLabel {
        match self {
            DeidOption::RetainLongitudinalModifiedDates => SecurityLabel::dcm(
                "113107",
                "Retain Longitudinal Temporal Information Modified Dates Option",
            ),
            DeidOption::RetainPatientCharacteristics => {
                SecurityLabel::dcm("113108", "Retain Patient Characteristics Option")
            }
            DeidOption::RetainDeviceIdentity => {
                SecurityLabel::dcm("113109", "Retain Device Identity Option")
            }
        }
    }
}

/// A de-identification profile: the Basic Profile and a set of its options.
/// On the wire, its name (`basic+retain-device-identity`), parsed back.
#[derive(Debug, Clone, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Profile {
    options: BTreeSet<DeidOption>,
}

/// A profile text named something this gateway does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown de-identification option '{0}': use 'basic' and any of retain-longitudinal-modified-dates, retain-patient-characteristics, retain-device-identity"
)]
pub struct UnknownOption(pub String);

impl From<Profile> for String {
    fn from(profile: Profile) -> String {
        profile.name()
    }
}

impl TryFrom<String> for Profile {
    type Error = UnknownOption;

    fn try_from(name: String) -> Result<Profile, UnknownOption> {
        Profile::parse(&name)
    }
}

impl Profile {
    /// The Basic Profile without options: the strictest.
    pub fn basic() -> Profile {
        Profile::default()
    }

    pub fn with(options: impl IntoIterator<Item = DeidOption>) -> Profile {
        Profile {
            options: options.into_iter().collect(),
        }
    }

    /// Parses `basic` followed by option names, separated by spaces or `+`
    /// (the form [`Profile::name`] writes).
    pub fn parse(text: &str) -> Result<Profile, UnknownOption> {
        let mut options = BTreeSet::new();
        for word in text.split(|c: char| c == '+' || c.is_whitespace()) {
            if word.is_empty() || word == "basic" {
                continue;
            }
            let option = DeidOption::ALL
                .into_iter()
                .find(|o| o.name() == word)
                .ok_or_else(|| UnknownOption(word.to_owned()))?;
            options.insert(option);
        }
        Ok(Profile { options })
    }

    pub fn has(&self, option: DeidOption) -> bool {
        self.options.contains(&option)
    }

    pub fn options(&self) -> impl Iterator<Item = DeidOption> + '_ {
        self.options.iter().copied()
    }

    /// What two profiles both allow: the stricter combination.
    pub fn intersect(&self, other: &Profile) -> Profile {
        Profile {
            options: self.options.intersection(&other.options).copied().collect(),
        }
    }

    /// `basic`, then `+option` for each option, e.g.
    /// `basic+retain-patient-characteristics`.
    pub fn name(&self) -> String {
        let mut name = "basic".to_owned();
        for option in &self.options {
            name.push('+');
            name.push_str(option.name());
        }
        name
    }

    /// FHIR `meta.security` labels: pseudonymised, the Basic Profile and each option.
    pub fn security_labels(&self) -> Vec<SecurityLabel> {
        let mut labels = vec![
            SecurityLabel::observation_value("PSEUDED", "pseudonymized"),
            SecurityLabel::dcm("113100", "Basic Application Confidentiality Profile"),
        ];
        labels.extend(self.options.iter().map(|o| o.label()));
        labels
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The gateway's master pseudonymisation key (from a config secret). Never
/// printed; project keys are derived from it.
#[derive(Clone)]
pub struct MasterKey(Vec<u8>);

impl MasterKey {
    /// At least 32 bytes of key material.
    pub fn new(material: &[u8]) -> Result<MasterKey, WeakKey> {
        if material.len() < 32 {
            return Err(WeakKey);
        }
        Ok(MasterKey(material.to_vec()))
    }

    /// The keys of studies for count perturbation (the same in every project).
    pub fn cell_keys(&self) -> crate::disclosure::CellKeys {
        crate::disclosure::CellKeys::new(hmac(&self.0, &[b"meshgate cell keys v1"]))
    }

    /// A keyed tag over `parts` for `purpose` (e.g. authenticating page
    /// cursors), under a key derived for that purpose alone.
    pub fn tag(&self, purpose: &str, parts: &[&[u8]]) -> [u8; 32] {
        hmac(
            &hmac(&self.0, &[b"meshgate tag key v1", purpose.as_bytes()]),
            parts,
        )
    }

    /// The key for one project's pseudonyms.
    pub fn project_key(&self, project: &str) -> ProjectKey {
        ProjectKey(hmac(
            &self.0,
            &[b"meshgate project key v1", project.as_bytes()],
        ))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the pseudonymisation key must be at least 32 bytes")]
pub struct WeakKey;

/// One project's pseudonymisation key.
#[derive(Clone)]
pub struct ProjectKey([u8; 32]);

impl fmt::Debug for ProjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProjectKey(<redacted>)")
    }
}

/// What the dates of a de-identified study were shifted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShiftBasis {
    /// One shift for all of the patient's studies at this partner.
    Patient,
    /// The partner recorded no patient ID: the shift is per study, so
    /// intervals between the patient's studies are not kept.
    Study,
    /// Dates were removed.
    None,
}

/// Applies one profile under one project's key to one partner's studies.
#[derive(Debug, Clone)]
pub struct Deidentifier {
    key: ProjectKey,
    profile: Profile,
    partner: String,
}

impl Deidentifier {
    pub fn new(key: ProjectKey, profile: Profile, partner: &str) -> Deidentifier {
        Deidentifier {
            key,
            profile,
            partner: partner.to_owned(),
        }
    }

    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    /// The de-identified copy of a study (with whatever series it carries).
    pub fn study(&self, study: &Study) -> Study {
        let dates = self
            .profile
            .has(DeidOption::RetainLongitudinalModifiedDates);
        let shift = dates.then(|| self.day_shift(study));
        let characteristics = self.profile.has(DeidOption::RetainPatientCharacteristics);
        Study {
            uid: self.uid(&study.uid),
            patient_id: Some(self.patient(study)),
            patient_name: None,
            patient_sex: if characteristics {
                study.patient_sex
            } else {
                None
            },
            patient_birth_date: None,
            patient_age: if characteristics {
                study.age_at_study().map(|age| age.min(AGE_CAP))
            } else {
                None
            },
            date: shift.and_then(|days| study.date.and_then(|d| d.checked_add(days))),
            time: None,
            timezone_offset: None,
            accession_number: None,
            description: None,
            modalities: study.modalities.clone(),
            body_parts: study.body_parts.clone(),
            number_of_series: study.number_of_series,
            number_of_instances: study.number_of_instances,
            series: study
                .series
                .iter()
                .map(|series| self.series(series, shift))
                .collect(),
        }
    }

    /// What the de-identified study's order depends on — its pseudonymous
    /// UID and its (shifted) date; no time of day is released — without
    /// building the rest.
    pub fn order_fields(&self, study: &Study) -> (String, Option<Date>, Option<Time>) {
        (self.uid(&study.uid), self.released_date(study), None)
    }

    /// The study's date as released: shifted, or `None` when dates are removed.
    pub fn released_date(&self, study: &Study) -> Option<Date> {
        self.profile
            .has(DeidOption::RetainLongitudinalModifiedDates)
            .then(|| {
                study
                    .date
                    .and_then(|d| d.checked_add(self.day_shift(study)))
            })
            .flatten()
    }

    /// How this study's dates were treated.
    pub fn shift_basis(&self, study: &Study) -> ShiftBasis {
        if !self
            .profile
            .has(DeidOption::RetainLongitudinalModifiedDates)
        {
            ShiftBasis::None
        } else if study.patient_id.as_deref().is_some_and(|p| !p.is_empty()) {
            ShiftBasis::Patient
        } else {
            ShiftBasis::Study
        }
    }

    fn series(&self, series: &Series, shift: Option<Duration>) -> Series {
        Series {
            uid: self.uid(&series.uid),
            number: series.number,
            modality: series.modality.clone(),
            description: None,
            body_part: series.body_part.clone(),
            laterality: series.laterality.clone(),
            date: shift.and_then(|days| series.date.and_then(|d| d.checked_add(days))),
            time: None,
            number_of_instances: series.number_of_instances,
            instances: series
                .instances
                .iter()
                .map(|instance| Instance {
                    uid: self.uid(&instance.uid),
                    sop_class: instance.sop_class.clone(),
                    number: instance.number,
                })
                .collect(),
        }
    }

    /// A UID's pseudonym: `2.25.` and the decimal of 128 bits of the HMAC,
    /// with the UUID version 8 and variant bits set (at most 44 characters).
    pub fn uid(&self, uid: &str) -> String {
        let mac = hmac(&self.key.0, &[b"uid", uid.as_bytes()]);
        let mut bytes = [0_u8; 16];
        bytes.copy_from_slice(&mac[..16]);
        bytes[6] = (bytes[6] & 0x0f) | 0x80;
        bytes[8] = (bytes[8] & 0x3f) | 0x80;
        format!("2.25.{}", u128::from_be_bytes(bytes))
    }

    /// The patient's pseudonym at this partner (patient IDs are only unique
    /// within an institution). Falls back to the study when no ID is recorded.
    fn patient(&self, study: &Study) -> String {
        let mac = hmac(&self.key.0, &[b"patient", &self.patient_key(study)]);
        let mut text = String::from("pt-");
        for byte in &mac[..12] {
            text.push_str(&format!("{byte:02x}"));
        }
        text
    }

    fn patient_key(&self, study: &Study) -> Vec<u8> {
        let mut key = self.partner.as_bytes().to_vec();
        key.push(0);
        match study.patient_id.as_deref().filter(|p| !p.is_empty()) {
            Some(patient) => {
                key.extend_from_slice(b"patient:");
                key.extend_from_slice(patient.as_bytes());
            }
            None => {
                key.extend_from_slice(b"study:");
                key.extend_from_slice(study.uid.as_bytes());
            }
        }
        key
    }

    /// The patient's date shift: 1 to [`MAX_SHIFT_DAYS`] days back.
    fn day_shift(&self, study: &Study) -> Duration {
        let mac = hmac(&self.key.0, &[b"date-shift", &self.patient_key(study)]);
        let value = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
        Duration::days(-1 - i64::from(value % MAX_SHIFT_DAYS))
    }
}

/// HMAC-SHA256 over length-prefixed parts (so no two inputs collide).
pub(crate) fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => return [0; 32],
    };
    for part in parts {
        mac.update(&u64::try_from(part.len()).unwrap_or(u64::MAX).to_be_bytes());
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]
    use super::*;
    use meshgate_schema::PatientSex;
    use time::macros::{date, time};

    fn master() -> MasterKey {
        MasterKey::new(&[7_u8; 32]).unwrap()
    }

    fn deid(project: &str, profile: Profile) -> Deidentifier {
        Deidentifier::new(master().project_key(project), profile, "north")
    }

    fn study(uid: &str, patient: Option<&str>, on: time::Date) -> Study {
        Study {
            uid: uid.into(),
            patient_id: patient.map(str::to_owned),
            patient_name: Some("DOE^JANE".into()),
            patient_sex: Some(PatientSex::Female),
            patient_birth_date: Some(date!(1930 - 03 - 01)),
            date: Some(on),
            time: Some(time!(10:30)),
            accession_number: Some("ACC123".into()),
            description: Some("CT chest for Jane Doe".into()),
            modalities: vec!["CT".into()],
            series: vec![Series {
                uid: format!("{uid}.1"),
                description: Some("axial".into()),
                date: Some(on),
                instances: vec![Instance {
                    uid: format!("{uid}.1.1"),
                    sop_class: Some("1.2.840.10008.5.1.4.1.1.2".into()),
                    number: Some(1),
                }],
                ..Series::default()
            }],
            ..Study::default()
        }
    }

    #[test]
    fn basic_profile_removes_identifiers_dates_and_characteristics() {
        let out = deid("p1", Profile::basic()).study(&study(
            "1.2.3",
            Some("MRN1"),
            date!(2020 - 05 - 01),
        ));
        assert!(
            out.uid.starts_with("2.25.") && out.uid.len() <= 44,
            "{}",
            out.uid
        );
        assert!(out.patient_id.as_deref().unwrap().starts_with("pt-"));
        assert_eq!(
            (
                out.patient_name,
                out.patient_birth_date,
                out.accession_number,
                out.description
            ),
            (None, None, None, None)
        );
        assert_eq!(
            (out.date, out.time, out.patient_sex, out.patient_age),
            (None, None, None, None)
        );
        let series = &out.series[0];
        assert_eq!((series.description.clone(), series.date), (None, None));
        assert_ne!(series.instances[0].uid, "1.2.3.1.1");
        assert_eq!(
            series.instances[0].sop_class.as_deref(),
            Some("1.2.840.10008.5.1.4.1.1.2")
        );
        assert_eq!(out.modalities, ["CT"]);
    }

    #[test]
    fn pseudonymous_uids_are_stable_in_a_project_and_differ_across_projects() {
        let a = deid("p1", Profile::basic());
        assert_eq!(a.uid("1.2.3"), deid("p1", Profile::basic()).uid("1.2.3"));
        assert_ne!(a.uid("1.2.3"), deid("p2", Profile::basic()).uid("1.2.3"));
        assert_ne!(a.uid("1.2.3"), a.uid("1.2.4"));
        let value: u128 = a.uid("1.2.3")["2.25.".len()..].parse().unwrap();
        assert_eq!((value >> 76) & 0xf, 8, "UUID version 8");
        assert_eq!((value >> 62) & 0x3, 0b10, "RFC 4122 variant");
    }

    #[test]
    fn modified_dates_shift_all_of_a_patients_studies_by_the_same_days() {
        let d = deid(
            "p1",
            Profile::with([DeidOption::RetainLongitudinalModifiedDates]),
        );
        let first = d.study(&study("1.1", Some("MRN1"), date!(2019 - 01 - 10)));
        let second = d.study(&study("1.2", Some("MRN1"), date!(2021 - 07 - 04)));
        let gap = date!(2021 - 07 - 04) - date!(2019 - 01 - 10);
        assert_eq!(second.date.unwrap() - first.date.unwrap(), gap);
        assert_ne!(first.date, Some(date!(2019 - 01 - 10)));
        assert_eq!(first.series[0].date, first.date);
        assert_eq!(first.time, None, "no time of day beside a shifted date");
        assert_eq!(
            d.shift_basis(&study("1.1", Some("MRN1"), date!(2019 - 01 - 10))),
            ShiftBasis::Patient
        );
        assert_eq!(
            d.shift_basis(&study("1.1", None, date!(2019 - 01 - 10))),
            ShiftBasis::Study
        );
    }

    #[test]
    fn patient_characteristics_keep_sex_and_cap_age_at_90() {
        let d = deid(
            "p1",
            Profile::with([DeidOption::RetainPatientCharacteristics]),
        );
        let out = d.study(&study("1.1", Some("MRN1"), date!(2024 - 01 - 10)));
        assert_eq!(out.patient_sex, Some(PatientSex::Female));
        assert_eq!(
            out.patient_age,
            Some(AGE_CAP),
            "93 years old is reported as 90+"
        );
        let young = d.study(&study("1.1", Some("MRN1"), date!(1990 - 01 - 10)));
        assert_eq!(young.patient_age, Some(59));
    }

    #[test]
    fn profiles_parse_from_their_names_and_refuse_unknown_options() {
        let profile = Profile::parse("basic retain-patient-characteristics").unwrap();
        assert_eq!(profile.name(), "basic+retain-patient-characteristics");
        assert_eq!(Profile::parse(&profile.name()).unwrap(), profile);
        assert!(Profile::parse("basic retain-everything").is_err());
        let both = Profile::with(DeidOption::ALL);
        assert_eq!(both.intersect(&profile), profile);
    }

    #[test]
    fn order_fields_are_those_of_the_full_deidentified_study() {
        for profile in [Profile::basic(), Profile::with(DeidOption::ALL)] {
            let d = deid("p1", profile);
            for patient in [Some("MRN1"), None] {
                let original = study("1.2.3", patient, date!(2020 - 05 - 01));
                let full = d.study(&original);
                assert_eq!(d.order_fields(&original), (full.uid, full.date, full.time));
            }
        }
    }

    #[test]
    fn keys_never_print() {
        assert_eq!(format!("{:?}", master()), "MasterKey(<redacted>)");
        assert!(MasterKey::new(b"short").is_err());
    }
}
