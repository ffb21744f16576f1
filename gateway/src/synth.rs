//! Synthetic partners: seeded, realistic-looking DICOM Part-10 studies plus a
//! ground-truth manifest, so demos and tests have data with real variety and
//! tests can compute expected answers without going through the query path.
//!
//! Every identifier is synthetic: names come from short lists, IDs and
//! accession numbers from the seeded generator, UIDs are `2.25.` UUID-derived.

use std::io::Write;
use std::path::{Path, PathBuf};

use dicom_core::{DataElement, PrimitiveValue, VR, smallvec::SmallVec};
use dicom_dictionary_std::{tags, uids};
use dicom_object::{InMemDicomObject, meta::FileMetaTableBuilder};
use meshgate_schema::dicom::format_date;
use meshgate_schema::study::age_in_years;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::{Date, Duration, Time, macros::date};

/// The file, next to the `dicom/` folder, that lists every study.
pub const MANIFEST_FILE: &str = "manifest.jsonl";
/// The folder, below the output folder, that holds the DICOM files.
pub const DICOM_DIR: &str = "dicom";

/// One study as synthesised: every attribute a filter can use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestRow {
    pub study_uid: String,
    pub patient_id: String,
    pub patient_sex: String,
    pub patient_birth_date: Date,
    pub patient_age: u16,
    pub study_date: Date,
    pub study_time: Time,
    pub accession_number: String,
    pub description: String,
    pub modalities: Vec<String>,
    pub body_parts: Vec<String>,
    pub number_of_series: u32,
    pub number_of_instances: u32,
    /// Modality and body part of each series, in series order.
    pub series: Vec<ManifestSeries>,
}

/// What a filter can ask of one series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestSeries {
    pub modality: String,
    pub body_part: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("could not write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not encode a DICOM file: {0}")]
    Dicom(String),
}

/// What `synth` needs to know.
#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub partner: String,
    pub studies: usize,
    pub seed: u64,
}

struct Exam {
    modality: &'static str,
    sop_class: &'static str,
    body_part: &'static str,
    description: &'static str,
    series: &'static [&'static str],
    lateral: bool,
}

const EXAMS: &[Exam] = &[
    Exam {
        modality: "CT",
        sop_class: uids::CT_IMAGE_STORAGE,
        body_part: "CHEST",
        description: "CT Chest with contrast",
        series: &[
            "Topogram",
            "Axial 5mm",
            "Axial 1mm lung",
            "Coronal MPR",
            "Sagittal MPR",
        ],
        lateral: false,
    },
    Exam {
        modality: "CT",
        sop_class: uids::CT_IMAGE_STORAGE,
        body_part: "CHEST",
        description: "CT THORAX LOW DOSE SCREENING",
        series: &["Scout", "Axial 1.25mm", "MIP"],
        lateral: false,
    },
    Exam {
        modality: "CT",
        sop_class: uids::CT_IMAGE_STORAGE,
        body_part: "HEAD",
        description: "CT Head without contrast",
        series: &["Scout", "Axial brain", "Axial bone"],
        lateral: false,
    },
    Exam {
        modality: "CT",
        sop_class: uids::CT_IMAGE_STORAGE,
        body_part: "ABDOMEN",
        description: "CT Abdomen Pelvis with contrast",
        series: &["Scout", "Portal venous", "Delayed", "Coronal MPR"],
        lateral: false,
    },
    Exam {
        modality: "MR",
        sop_class: uids::MR_IMAGE_STORAGE,
        body_part: "BRAIN",
        description: "MRI Brain with and without contrast",
        series: &[
            "Localizer",
            "T1 SAG",
            "T2 AX",
            "FLAIR AX",
            "DWI",
            "T1 AX POST",
        ],
        lateral: false,
    },
    Exam {
        modality: "MR",
        sop_class: uids::MR_IMAGE_STORAGE,
        body_part: "KNEE",
        description: "MR Knee without contrast",
        series: &["Localizer", "PD FS COR", "PD SAG", "T1 COR"],
        lateral: true,
    },
    Exam {
        modality: "MR",
        sop_class: uids::MR_IMAGE_STORAGE,
        body_part: "CHEST",
        description: "MR Cardiac function",
        series: &["Localizer", "Cine SSFP SA", "Cine 4CH", "LGE SA"],
        lateral: false,
    },
    Exam {
        modality: "MR",
        sop_class: uids::MR_IMAGE_STORAGE,
        body_part: "LSPINE",
        description: "MR Lumbar spine",
        series: &["Localizer", "T2 SAG", "T1 SAG", "T2 AX"],
        lateral: false,
    },
    Exam {
        modality: "CR",
        sop_class: uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
        body_part: "CHEST",
        description: "XR Chest 2 views",
        series: &["PA", "Lateral"],
        lateral: false,
    },
    Exam {
        modality: "CR",
        sop_class: uids::COMPUTED_RADIOGRAPHY_IMAGE_STORAGE,
        body_part: "HAND",
        description: "XR Hand 3 views",
        series: &["PA", "Oblique", "Lateral"],
        lateral: true,
    },
    Exam {
        modality: "DX",
        sop_class: uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        body_part: "CHEST",
        description: "Chest X-ray portable AP",
        series: &["AP"],
        lateral: false,
    },
    Exam {
        modality: "DX",
        sop_class: uids::DIGITAL_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        body_part: "KNEE",
        description: "XR Knee standing",
        series: &["AP", "Lateral"],
        lateral: true,
    },
    Exam {
        modality: "US",
        sop_class: uids::ULTRASOUND_IMAGE_STORAGE,
        body_part: "ABDOMEN",
        description: "US Abdomen complete",
        series: &["Liver", "Gallbladder", "Kidneys"],
        lateral: false,
    },
    Exam {
        modality: "US",
        sop_class: uids::ULTRASOUND_IMAGE_STORAGE,
        body_part: "NECK",
        description: "Ultrasound thyroid",
        series: &["Thyroid"],
        lateral: false,
    },
    Exam {
        modality: "PT",
        sop_class: uids::POSITRON_EMISSION_TOMOGRAPHY_IMAGE_STORAGE,
        body_part: "WHOLEBODY",
        description: "PET/CT FDG whole body",
        series: &["PET AC", "PET NAC"],
        lateral: false,
    },
    Exam {
        modality: "MG",
        sop_class: uids::DIGITAL_MAMMOGRAPHY_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        body_part: "BREAST",
        description: "Screening mammogram bilateral",
        series: &["CC", "MLO"],
        lateral: true,
    },
    Exam {
        modality: "MG",
        sop_class: uids::DIGITAL_MAMMOGRAPHY_X_RAY_IMAGE_STORAGE_FOR_PRESENTATION,
        body_part: "BREAST",
        description: "Diagnostic mammogram",
        series: &["CC", "MLO", "Spot compression"],
        lateral: true,
    },
    Exam {
        modality: "NM",
        sop_class: uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
        body_part: "WHOLEBODY",
        description: "NM Bone scan whole body",
        series: &["Anterior", "Posterior"],
        lateral: false,
    },
    Exam {
        modality: "NM",
        sop_class: uids::NUCLEAR_MEDICINE_IMAGE_STORAGE,
        body_part: "HEART",
        description: "NM Myocardial perfusion rest/stress",
        series: &["Rest", "Stress"],
        lateral: false,
    },
];

const FAMILY_NAMES: &[&str] = &[
    "Smith",
    "Jansen",
    "Garcia",
    "Muller",
    "Rossi",
    "Kowalski",
    "Novak",
    "Dubois",
    "Silva",
    "Johansson",
    "Nielsen",
    "OBrien",
    "Papadopoulos",
    "Horvath",
    "Virtanen",
    "Costa",
    "Weber",
    "Moreau",
    "Fischer",
    "Bakker",
    "Lopez",
    "Schmidt",
    "Martin",
    "Andersen",
];
const GIVEN_NAMES_F: &[&str] = &[
    "Anna", "Maria", "Sofia", "Emma", "Olivia", "Eva", "Julia", "Lena", "Clara", "Ines", "Hanna",
    "Marta",
];
const GIVEN_NAMES_M: &[&str] = &[
    "Jan", "Lucas", "Pieter", "Marco", "Tomas", "Louis", "Erik", "Jonas", "David", "Mateo", "Karl",
    "Noah",
];
const DEVICES: &[(&str, &str)] = &[
    ("SIEMENS", "SOMATOM Force"),
    ("SIEMENS", "MAGNETOM Vida"),
    ("GE MEDICAL SYSTEMS", "Revolution CT"),
    ("GE MEDICAL SYSTEMS", "SIGNA Premier"),
    ("Philips", "Ingenia"),
    ("Philips", "IQon Spectral CT"),
    ("Canon Medical Systems", "Aquilion ONE"),
    ("FUJIFILM Corporation", "FDR D-EVO"),
    ("HOLOGIC, Inc.", "Selenia Dimensions"),
];

struct Patient {
    id: String,
    name: String,
    sex: &'static str,
    birth: Date,
}

/// Writes `spec.studies` studies into `out/dicom/` and their manifest into
/// `out/manifest.jsonl`. The same spec always writes the same data.
pub fn synthesise(spec: &SynthSpec, out: &Path) -> Result<Vec<ManifestRow>, SynthError> {
    let mut rng = ChaCha8Rng::seed_from_u64(partner_seed(&spec.partner, spec.seed));
    let prefix: String = spec
        .partner
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(3)
        .collect::<String>()
        .to_ascii_uppercase();
    let patient_count = (spec.studies * 2 / 3).max(1);
    let patients: Vec<Patient> = (0..patient_count)
        .map(|_| {
            let sex = match rng.gen_range(0..100) {
                0..49 => "F",
                49..98 => "M",
                _ => "O",
            };
            let given = if sex == "M" {
                GIVEN_NAMES_M
            } else {
                GIVEN_NAMES_F
            };
            let family = FAMILY_NAMES.choose(&mut rng).copied().unwrap_or("Doe");
            let first = given.choose(&mut rng).copied().unwrap_or("Alex");
            Patient {
                id: format!("{prefix}{:07}", rng.gen_range(0..10_000_000)),
                name: format!(
                    "{}^{}",
                    family.to_ascii_uppercase(),
                    first.to_ascii_uppercase()
                ),
                sex,
                birth: date!(1925 - 01 - 01) + Duration::days(rng.gen_range(0..(90 * 365))),
            }
        })
        .collect();

    let dicom_root = out.join(DICOM_DIR);
    let mut rows = Vec::with_capacity(spec.studies);
    for study_index in 0..spec.studies {
        let patient = patients
            .get(rng.gen_range(0..patients.len()))
            .ok_or_else(|| SynthError::Dicom("no patients to choose from".into()))?;
        let exam = loop {
            let exam = &EXAMS[rng.gen_range(0..EXAMS.len())];
            // Mammography is offered to women in these partners' programmes.
            if exam.modality != "MG" || patient.sex == "F" {
                break exam;
            }
        };
        let earliest = date!(2005 - 01 - 01).max(patient.birth + Duration::days(30));
        let span = (date!(2025 - 12 - 31) - earliest).whole_days().max(1);
        let study_date = earliest + Duration::days(rng.gen_range(0..=span));
        let study_time = Time::from_hms(
            rng.gen_range(7..20),
            rng.gen_range(0..60),
            rng.gen_range(0..60),
        )
        .unwrap_or(Time::MIDNIGHT);
        let age = age_in_years(patient.birth, study_date).unwrap_or(0);
        let (manufacturer, model) = DEVICES[rng.gen_range(0..DEVICES.len())];
        let study_uid = uid(&mut rng);
        let accession = format!("{prefix}A{:08}", rng.gen_range(0..100_000_000));
        // A PET study always has its PET series after the attenuation CT.
        let fewest = if exam.modality == "PT" { 2 } else { 1 };
        let series_count = rng.gen_range(fewest..=exam.series.len().clamp(fewest, 6));
        let mut modalities: Vec<String> = Vec::new();
        let mut body_parts = vec![exam.body_part.to_owned()];
        let mut instance_total = 0u32;
        let mut series_rows = Vec::with_capacity(series_count);
        let study_dir = dicom_root.join(format!("study{study_index:05}"));
        for series_index in 0..series_count {
            // PET studies come with their attenuation-correction CT.
            let (modality, sop_class, description) = if exam.modality == "PT" && series_index == 0 {
                ("CT", uids::CT_IMAGE_STORAGE, "CT AC whole body")
            } else {
                (
                    exam.modality,
                    exam.sop_class,
                    exam.series[series_index % exam.series.len()],
                )
            };
            series_rows.push(ManifestSeries {
                modality: modality.to_owned(),
                body_part: exam.body_part.to_owned(),
            });
            if !modalities.iter().any(|m| m == modality) {
                modalities.push(modality.to_owned());
            }
            let series_uid = uid(&mut rng);
            let laterality = exam
                .lateral
                .then(|| if rng.gen_bool(0.5) { "L" } else { "R" });
            let instances = rng.gen_range(1..=4u32);
            instance_total += instances;
            let series_time =
                Time::from_hms(study_time.hour(), study_time.minute(), study_time.second())
                    .ok()
                    .map(|t| t + Duration::minutes(i64::try_from(series_index).unwrap_or(0) * 3))
                    .unwrap_or(study_time);
            for instance_number in 1..=instances {
                let mut elements = vec![
                    text(tags::SOP_CLASS_UID, VR::UI, sop_class),
                    text(tags::SOP_INSTANCE_UID, VR::UI, &uid(&mut rng)),
                    text(tags::STUDY_DATE, VR::DA, &format_date(study_date)),
                    text(tags::SERIES_DATE, VR::DA, &format_date(study_date)),
                    text(tags::STUDY_TIME, VR::TM, &dicom_time(study_time)),
                    text(tags::SERIES_TIME, VR::TM, &dicom_time(series_time)),
                    text(tags::ACCESSION_NUMBER, VR::SH, &accession),
                    text(tags::MODALITY, VR::CS, modality),
                    text(tags::MANUFACTURER, VR::LO, manufacturer),
                    text(
                        tags::INSTITUTION_NAME,
                        VR::LO,
                        &format!("{} Hospital", spec.partner),
                    ),
                    text(tags::STUDY_DESCRIPTION, VR::LO, exam.description),
                    text(tags::SERIES_DESCRIPTION, VR::LO, description),
                    text(tags::MANUFACTURER_MODEL_NAME, VR::LO, model),
                    text(tags::PATIENT_NAME, VR::PN, &patient.name),
                    text(tags::PATIENT_ID, VR::LO, &patient.id),
                    text(
                        tags::PATIENT_BIRTH_DATE,
                        VR::DA,
                        &format_date(patient.birth),
                    ),
                    text(tags::PATIENT_SEX, VR::CS, patient.sex),
                    text(tags::PATIENT_AGE, VR::AS, &format!("{age:03}Y")),
                    text(tags::BODY_PART_EXAMINED, VR::CS, exam.body_part),
                    text(tags::STUDY_INSTANCE_UID, VR::UI, &study_uid),
                    text(tags::SERIES_INSTANCE_UID, VR::UI, &series_uid),
                    text(tags::STUDY_ID, VR::SH, &format!("{}", study_index + 1)),
                    text(
                        tags::SERIES_NUMBER,
                        VR::IS,
                        &format!("{}", series_index + 1),
                    ),
                    text(tags::INSTANCE_NUMBER, VR::IS, &format!("{instance_number}")),
                    DataElement::new(tags::SAMPLES_PER_PIXEL, VR::US, PrimitiveValue::from(1u16)),
                    text(tags::PHOTOMETRIC_INTERPRETATION, VR::CS, "MONOCHROME2"),
                    DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(8u16)),
                    DataElement::new(tags::COLUMNS, VR::US, PrimitiveValue::from(8u16)),
                    DataElement::new(tags::BITS_ALLOCATED, VR::US, PrimitiveValue::from(16u16)),
                    DataElement::new(tags::BITS_STORED, VR::US, PrimitiveValue::from(12u16)),
                    DataElement::new(tags::HIGH_BIT, VR::US, PrimitiveValue::from(11u16)),
                    DataElement::new(
                        tags::PIXEL_REPRESENTATION,
                        VR::US,
                        PrimitiveValue::from(0u16),
                    ),
                ];
                if let Some(side) = laterality {
                    elements.push(text(tags::LATERALITY, VR::CS, side));
                }
                let pixels: SmallVec<[u16; 2]> =
                    (0..64).map(|_| rng.gen_range(0..4096u16)).collect();
                elements.push(DataElement::new(
                    tags::PIXEL_DATA,
                    VR::OW,
                    PrimitiveValue::U16(pixels),
                ));
                let file = InMemDicomObject::from_element_iter(elements)
                    .with_meta(
                        FileMetaTableBuilder::new()
                            .transfer_syntax(uids::EXPLICIT_VR_LITTLE_ENDIAN),
                    )
                    .map_err(|e| SynthError::Dicom(e.to_string()))?;
                let dir = study_dir.join(format!("series{:02}", series_index + 1));
                std::fs::create_dir_all(&dir).map_err(|source| SynthError::Io {
                    path: dir.clone(),
                    source,
                })?;
                let path = dir.join(format!("{instance_number:04}.dcm"));
                file.write_to_file(&path)
                    .map_err(|e| SynthError::Dicom(e.to_string()))?;
            }
        }
        modalities.sort();
        body_parts.sort();
        rows.push(ManifestRow {
            study_uid,
            patient_id: patient.id.clone(),
            patient_sex: patient.sex.to_owned(),
            patient_birth_date: patient.birth,
            patient_age: age,
            study_date,
            study_time,
            accession_number: accession,
            description: exam.description.to_owned(),
            modalities,
            body_parts,
            number_of_series: u32::try_from(series_count).unwrap_or(u32::MAX),
            number_of_instances: instance_total,
            series: series_rows,
        });
    }
    write_manifest(&rows, &out.join(MANIFEST_FILE))?;
    Ok(rows)
}

fn write_manifest(rows: &[ManifestRow], path: &Path) -> Result<(), SynthError> {
    let io = |source| SynthError::Io {
        path: path.to_owned(),
        source,
    };
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for row in rows {
        let line = serde_json::to_string(row).map_err(|e| SynthError::Dicom(e.to_string()))?;
        writeln!(file, "{line}").map_err(io)?;
    }
    file.flush().map_err(io)
}

/// Reads a manifest written by [`synthesise`].
pub fn read_manifest(path: &Path) -> Result<Vec<ManifestRow>, SynthError> {
    let io = |source| SynthError::Io {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(io)?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line).map_err(|e| SynthError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            })
        })
        .collect()
}

fn partner_seed(partner: &str, seed: u64) -> u64 {
    let digest = Sha256::new()
        .chain_update(partner.as_bytes())
        .chain_update(seed.to_le_bytes())
        .finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(digest.get(..8).unwrap_or(&[0; 8]));
    u64::from_le_bytes(bytes)
}

/// A `2.25.` UID from 128 random bits shaped as a version-4 UUID.
fn uid(rng: &mut ChaCha8Rng) -> String {
    let mut value: u128 = rng.r#gen();
    value = (value & !(0xF << 76)) | (0x4 << 76);
    value = (value & !(0x3 << 62)) | (0x2 << 62);
    format!("2.25.{value}")
}

fn dicom_time(time: Time) -> String {
    format!("{:02}{:02}{:02}", time.hour(), time.minute(), time.second())
}

fn text(tag: dicom_core::Tag, vr: VR, value: &str) -> DataElement<InMemDicomObject> {
    DataElement::new(tag, vr, PrimitiveValue::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_writes_the_same_partner_and_another_partner_differs() {
        let (a, b, c) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let spec = SynthSpec {
            partner: "north".into(),
            studies: 5,
            seed: 7,
        };
        let first = synthesise(&spec, a.path()).unwrap();
        let again = synthesise(&spec, b.path()).unwrap();
        let other = synthesise(
            &SynthSpec {
                partner: "south".into(),
                ..spec
            },
            c.path(),
        )
        .unwrap();
        assert_eq!(first, again);
        assert_ne!(first, other);
        assert_eq!(read_manifest(&a.path().join(MANIFEST_FILE)).unwrap(), first);
    }

    #[test]
    fn synthetic_uids_are_valid_dicom_uids() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..100 {
            let uid = uid(&mut rng);
            assert!(meshgate_schema::query::is_dicom_uid(&uid), "{uid}");
            assert!(uid.len() <= 44);
        }
    }
}
