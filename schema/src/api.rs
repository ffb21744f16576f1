//! The GraphQL API's input and output types. The resolvers that produce them
//! live in the gateway; the committed SDL is `schema/meshgate.graphql`.

use async_graphql::{
    ID, InputObject, InputValueError, InputValueResult, Json, Scalar, ScalarType, SimpleObject,
    Value,
};
use time::Date;
use time::macros::format_description;

use crate::capabilities::Capabilities;
use crate::report::{ConnectorKind, PartnerReport};
use crate::study::{Modality, PatientSex};

/// A calendar date, `YYYY-MM-DD`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IsoDate(pub Date);

/// A calendar date in ISO 8601 form, `YYYY-MM-DD`.
#[Scalar(name = "Date")]
impl ScalarType for IsoDate {
    fn parse(value: Value) -> InputValueResult<Self> {
        let Value::String(text) = &value else {
            return Err(InputValueError::expected_type(value));
        };
        // DICOM dates are years 0001 to 9999; anything else cannot be
        // asked of a partner (a sign would reach it as `-0010101`).
        Date::parse(text, format_description!("[year]-[month]-[day]"))
            .ok()
            .filter(|date| (1..=9999).contains(&date.year()) && text.len() == 10)
            .map(IsoDate)
            .ok_or_else(|| {
                InputValueError::custom("expected a date as YYYY-MM-DD, year 0001 to 9999")
            })
    }

    fn to_value(&self) -> Value {
        Value::String(
            self.0
                .format(format_description!("[year]-[month]-[day]"))
                .unwrap_or_default(),
        )
    }
}

/// An inclusive range of study dates; leave an end out to leave it open.
#[derive(InputObject, Debug, Clone, Default)]
#[graphql(name = "DateRange")]
pub struct DateRangeInput {
    pub from: Option<IsoDate>,
    pub to: Option<IsoDate>,
}

/// An inclusive range of ages in whole years at the time of the study.
#[derive(InputObject, Debug, Clone, Default)]
#[graphql(name = "AgeRange")]
pub struct AgeRangeInput {
    pub min: Option<i32>,
    pub max: Option<i32>,
}

/// A cohort filter. Every part given must hold; an empty filter matches
/// every study.
#[derive(InputObject, Debug, Clone, Default)]
pub struct StudyFilter {
    /// The study has a series of one of these modalities.
    pub modalities: Option<Vec<Modality>>,
    /// Body Part Examined of a series (DICOM defined term, e.g. CHEST). Given
    /// with `modalities`, one series must match both: "CT or MR of the chest".
    pub body_part: Option<String>,
    pub study_date: Option<DateRangeInput>,
    /// Case-insensitive text the study description contains.
    pub description: Option<String>,
    pub patient_sex: Option<PatientSex>,
    /// Patient's age in whole years at the time of the study.
    pub patient_age: Option<AgeRangeInput>,
    /// Study Instance UIDs as results show them: at a partner that
    /// de-identifies (or only counts) for the project, its pseudonyms —
    /// original UIDs match nothing there.
    pub study_instance_uids: Option<Vec<String>>,
    /// Ask only these partners (by id).
    pub partners: Option<Vec<ID>>,
}

/// How a study was de-identified.
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct Deidentification {
    /// The profile's name: `basic` and its options, e.g.
    /// `basic+retain-longitudinal-modified-dates`.
    pub profile: String,
    /// The DICOM PS3.15 Annex E options applied.
    pub options: Vec<String>,
    /// True when dates were shifted per study rather than per patient (the
    /// partner recorded no patient ID): intervals between a patient's
    /// studies are then not kept.
    pub dates_shifted_per_study: bool,
}

/// What a study discloses about its patient.
#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct PatientSummary {
    /// The patient's ID, or a pseudonym (stable within a project) when de-identified.
    pub reference: Option<String>,
    pub sex: Option<PatientSex>,
    /// Age in whole years at the study; `90+` for 90 and over when de-identified.
    pub age: Option<String>,
}

/// A study in a result, with its provenance and the full FHIR resource.
#[derive(SimpleObject, Debug, Clone)]
#[graphql(name = "ImagingStudy")]
pub struct ImagingStudyNode {
    /// The Study Instance UID, or its pseudonym when de-identified.
    pub study_instance_uid: String,
    /// The partner that holds the study.
    pub partner: ID,
    pub connector_kind: ConnectorKind,
    /// Study date and time (FHIR dateTime), when known.
    pub started: Option<String>,
    pub modalities: Vec<String>,
    pub body_parts: Vec<String>,
    pub description: Option<String>,
    pub number_of_series: Option<u32>,
    pub number_of_instances: Option<u32>,
    pub patient: PatientSummary,
    /// How the study was de-identified; absent for identified records.
    pub deidentification: Option<Deidentification>,
    /// The study as a FHIR R4 ImagingStudy resource.
    pub fhir: Json<serde_json::Value>,
}

#[derive(SimpleObject, Debug, Clone, PartialEq, Eq)]
pub struct PageInfo {
    pub has_next_page: bool,
    /// Pass as `after` to get the next page.
    pub end_cursor: Option<String>,
}

/// A page of studies across partners, newest first.
#[derive(SimpleObject, Debug, Clone)]
pub struct ImagingStudyConnection {
    pub nodes: Vec<ImagingStudyNode>,
    pub page_info: PageInfo,
    /// Studies that can be paged through: those of partners that answered
    /// and release records.
    pub total_count: u32,
    pub partners: Vec<PartnerReport>,
}

/// How many studies match, in total and per partner.
#[derive(SimpleObject, Debug, Clone)]
pub struct CohortCount {
    /// The sum of the disclosed per-partner counts.
    pub total: u32,
    /// True when some partner's count was suppressed: the true total may be larger.
    pub total_is_lower_bound: bool,
    /// True when some partner's count was perturbed or rounded.
    pub total_is_approximate: bool,
    /// True when every partner asked answered completely.
    pub complete: bool,
    pub partners: Vec<PartnerReport>,
}

/// A partner of the consortium and its connector.
#[derive(SimpleObject, Debug, Clone)]
pub struct Partner {
    pub id: ID,
    pub name: String,
    pub connector_kind: ConnectorKind,
    pub capabilities: Capabilities,
    /// The content hash of the configuration and policies in force that
    /// this partner belongs to (the same for every partner of one answer).
    pub snapshot: String,
}
