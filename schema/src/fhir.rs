//! DICOM → FHIR R4 ImagingStudy, following the DICOM mapping table of the
//! FHIR ImagingStudy page. Built with fhir-sdk's R4B types (R4B ImagingStudy
//! JSON is valid R4 JSON) and returned as JSON; the gateway never parses FHIR.

use fhir_sdk::r4b::codes::{IdentifierUse, ImagingStudyStatus};
use fhir_sdk::r4b::resources::{ImagingStudy, ImagingStudySeries, ImagingStudySeriesInstance};
use fhir_sdk::r4b::types::{CodeableConcept, Coding, Identifier, Meta, Reference};
use fhir_sdk::{BuilderError, DateTime, Instant};
use time::{Date, PrimitiveDateTime, Time, UtcOffset};

use crate::study::{Series, Study};

const DICOM_UID_SYSTEM: &str = "urn:dicom:uid";
const DCM_SYSTEM: &str = "http://dicom.nema.org/resources/ontology/DCM";
const SNOMED_SYSTEM: &str = "http://snomed.info/sct";
const RFC3986_SYSTEM: &str = "urn:ietf:rfc:3986";
const V2_0203_SYSTEM: &str = "http://terminology.hl7.org/CodeSystem/v2-0203";
const V3_OBSERVATION_VALUE_SYSTEM: &str =
    "http://terminology.hl7.org/CodeSystem/v3-ObservationValue";

/// A `meta.security` label: how a resource was de-identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecurityLabel {
    pub system: &'static str,
    pub code: &'static str,
    pub display: &'static str,
}

impl SecurityLabel {
    /// A DICOM (DCM) code, e.g. a de-identification profile or option.
    pub const fn dcm(code: &'static str, display: &'static str) -> SecurityLabel {
        SecurityLabel {
            system: DCM_SYSTEM,
            code,
            display,
        }
    }

    /// An HL7 v3 ObservationValue code, e.g. `PSEUDED`.
    pub const fn observation_value(code: &'static str, display: &'static str) -> SecurityLabel {
        SecurityLabel {
            system: V3_OBSERVATION_VALUE_SYSTEM,
            code,
            display,
        }
    }
}

/// The mapping could not build a resource (a bug, not bad data).
#[derive(Debug, thiserror::Error)]
#[error("could not build the FHIR ImagingStudy: {0}")]
pub struct MappingError(String);

impl From<BuilderError> for MappingError {
    fn from(error: BuilderError) -> Self {
        MappingError(error.to_string())
    }
}

/// Per-partner facts the mapping needs.
#[derive(Debug, Clone, Copy, Default)]
pub struct MappingOptions {
    /// The partner's UTC offset, used for dateTimes when the data set has no
    /// Timezone Offset From UTC. Without either, only the date is given.
    pub utc_offset: Option<UtcOffset>,
}

/// The FHIR dateTime for a DICOM date and time: with a time part only when a
/// UTC offset is known, since FHIR requires one there.
pub fn started(
    date: Option<Date>,
    time: Option<Time>,
    offset: Option<UtcOffset>,
) -> Option<DateTime> {
    let date = date?;
    match (time, offset) {
        (Some(time), Some(offset)) => Some(DateTime::DateTime(Instant(
            PrimitiveDateTime::new(date, time).assume_offset(offset),
        ))),
        _ => Some(DateTime::Date(fhir_sdk::Date::Date(date))),
    }
}

/// `started` as FHIR JSON text.
pub fn started_text(study: &Study, options: &MappingOptions) -> Option<String> {
    let value = started(
        study.date,
        study.time,
        study.timezone_offset.or(options.utc_offset),
    )?;
    serde_json::to_value(value)
        .ok()?
        .as_str()
        .map(str::to_owned)
}

/// Maps a study (with whatever series it carries) to an ImagingStudy;
/// `security` labels say how it was de-identified (none: as recorded).
pub fn imaging_study(
    study: &Study,
    options: &MappingOptions,
    security: &[SecurityLabel],
) -> Result<serde_json::Value, MappingError> {
    let offset = study.timezone_offset.or(options.utc_offset);
    let mut identifiers = vec![Some(
        Identifier::builder()
            .r#use(IdentifierUse::Official)
            .system(DICOM_UID_SYSTEM.to_owned())
            .value(format!("urn:oid:{}", study.uid))
            .build()?,
    )];
    if let Some(accession) = &study.accession_number {
        identifiers.push(Some(
            Identifier::builder()
                .r#use(IdentifierUse::Usual)
                .r#type(
                    CodeableConcept::builder()
                        .coding(vec![Some(coding(V2_0203_SYSTEM, "ACSN", None)?)])
                        .build()?,
                )
                .value(accession.clone())
                .build()?,
        ));
    }
    let mut subject = Reference::builder().r#type("Patient".to_owned());
    if let Some(patient_id) = &study.patient_id {
        subject = subject.identifier(Identifier::builder().value(patient_id.clone()).build()?);
    } else {
        subject = subject.display("unknown patient".to_owned());
    }
    let modality = study
        .modalities
        .iter()
        .map(|code| coding(DCM_SYSTEM, code, None).map(Some))
        .collect::<Result<Vec<_>, _>>()?;
    let series = study
        .series
        .iter()
        .map(|series| imaging_study_series(series, offset).map(Some))
        .collect::<Result<Vec<_>, _>>()?;

    let mut builder = ImagingStudy::builder()
        .identifier(identifiers)
        .status(ImagingStudyStatus::Available)
        .modality(modality)
        .subject(subject.build()?)
        .series(series);
    if let Some(started) = started(study.date, study.time, offset) {
        builder = builder.started(started);
    }
    if !security.is_empty() {
        let labels = security
            .iter()
            .map(|l| coding(l.system, l.code, Some(l.display)).map(Some))
            .collect::<Result<Vec<_>, _>>()?;
        builder = builder.meta(Meta::builder().security(labels).build()?);
    }
    if let Some(count) = study.number_of_series {
        builder = builder.number_of_series(count);
    }
    if let Some(count) = study.number_of_instances {
        builder = builder.number_of_instances(count);
    }
    if let Some(description) = &study.description {
        builder = builder.description(description.clone());
    }
    let resource = builder.build()?;
    serde_json::to_value(&resource).map_err(|e| MappingError(e.to_string()))
}

fn imaging_study_series(
    series: &Series,
    offset: Option<UtcOffset>,
) -> Result<ImagingStudySeries, MappingError> {
    let modality = coding(DCM_SYSTEM, series.modality.as_deref().unwrap_or("OT"), None)?;
    let instances = series
        .instances
        .iter()
        .map(|instance| {
            let mut builder = ImagingStudySeriesInstance::builder()
                .uid(instance.uid.clone())
                .sop_class(coding(
                    RFC3986_SYSTEM,
                    &format!(
                        "urn:oid:{}",
                        instance.sop_class.as_deref().unwrap_or_default()
                    ),
                    None,
                )?);
            if let Some(number) = instance.number {
                builder = builder.number(number);
            }
            Ok(Some(builder.build()?))
        })
        .collect::<Result<Vec<_>, MappingError>>()?;
    let mut builder = ImagingStudySeries::builder()
        .uid(series.uid.clone())
        .modality(modality)
        .instance(instances);
    if let Some(number) = series.number {
        builder = builder.number(number);
    }
    if let Some(description) = &series.description {
        builder = builder.description(description.clone());
    }
    if let Some(count) = series.number_of_instances {
        builder = builder.number_of_instances(count);
    }
    if let Some(part) = &series.body_part {
        builder = builder.body_site(body_site(part)?);
    }
    if let Some(laterality) = series.laterality.as_deref().and_then(laterality) {
        builder = builder.laterality(laterality?);
    }
    if let Some(started) = started(series.date, series.time, offset) {
        builder = builder.started(started);
    }
    Ok(builder.build()?)
}

fn coding(system: &str, code: &str, display: Option<&str>) -> Result<Coding, MappingError> {
    let mut builder = Coding::builder()
        .system(system.to_owned())
        .code(code.to_owned());
    if let Some(display) = display {
        builder = builder.display(display.to_owned());
    }
    Ok(builder.build()?)
}

/// Body Part Examined defined terms → SNOMED CT (DICOM PS3.16 Annex L).
/// An unmapped term is kept as display text rather than invented as a code.
fn body_site(term: &str) -> Result<Coding, MappingError> {
    let known = match term {
        "HEAD" => Some(("69536005", "Head")),
        "BRAIN" => Some(("12738006", "Brain")),
        "NECK" => Some(("45048000", "Neck")),
        "CHEST" => Some(("51185008", "Chest")),
        "ABDOMEN" => Some(("818983003", "Abdomen")),
        "PELVIS" => Some(("816092008", "Pelvis")),
        "BREAST" => Some(("76752008", "Breast")),
        "HEART" => Some(("80891009", "Heart")),
        "CSPINE" => Some(("122494005", "Cervical spine")),
        "LSPINE" => Some(("122496007", "Lumbar spine")),
        "KNEE" => Some(("72696002", "Knee")),
        "SHOULDER" => Some(("16982005", "Shoulder")),
        "HIP" => Some(("29836001", "Hip")),
        "HAND" => Some(("85562004", "Hand")),
        "WHOLEBODY" => Some(("38266002", "Entire body")),
        _ => None,
    };
    match known {
        Some((code, display)) => coding(SNOMED_SYSTEM, code, Some(display)),
        None => Ok(Coding::builder().display(term.to_owned()).build()?),
    }
}

/// Laterality (0020,0060) → SNOMED CT.
fn laterality(value: &str) -> Option<Result<Coding, MappingError>> {
    let (code, display) = match value {
        "R" => ("24028007", "Right"),
        "L" => ("7771000", "Left"),
        "B" => ("51440002", "Right and left"),
        _ => return None,
    };
    Some(coding(SNOMED_SYSTEM, code, Some(display)))
}
