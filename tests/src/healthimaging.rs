//! A stand-in for AWS HealthImaging's native API, built from its documented
//! request and response shapes, over a synthetic partner's DICOM files.
//!
//! What it enforces, as the service documents it:
//! - `POST /datastore/{datastoreId}/searchImageSets?maxResults=&nextToken=`:
//!   `maxResults` 1–50 (else `400 ValidationException`); the body is the
//!   `SearchCriteria` structure itself (the service model binds
//!   `searchCriteria` to the payload): `{}` or `{"filters": [one filter],
//!   "sort": …}`, any other member refused with `400 ValidationException`
//!   (a wrapper the service ignored would scan the whole store), where a filter is
//!   `EQUAL` with one value or `BETWEEN` with two, each value one of
//!   `DICOMPatientId`, `DICOMAccessionNumber`, `DICOMStudyId`,
//!   `DICOMStudyInstanceUID`, `DICOMSeriesInstanceUID`,
//!   `DICOMStudyDateAndTime` (`{DICOMStudyDate, DICOMStudyTime}`),
//!   `createdAt`, `updatedAt`; results sorted by `updatedAt`, newest first;
//!   an opaque `nextToken` valid only for the same search;
//!   `imageSetsMetadataSummaries` with `DICOMTags` (study attributes, plus
//!   one of the image set's series).
//! - `POST /datastore/{id}/imageSet/{imageSetId}/getImageSetMetadata?version=`:
//!   the image set's keyword-keyed metadata (`Patient`, `Study`, `Series`,
//!   `Instances`), gzipped, with `Content-Encoding: gzip`.
//! - Every request SigV4-signed for `medical-imaging` (checked with AWS's
//!   own library); an unknown data store is `404 ResourceNotFoundException`.
//! - Throttling: every `throttle_every`-th request is `429
//!   ThrottlingException`, without `Retry-After` (the service sends none).
//!
//! Studies with several series are split over several image sets (series
//! alternating), as happens when a study arrives in several imports; and
//! every fifth study has a conflicting import kept as a non-primary image
//! set (`isPrimary: false`: another description, an extra series), newest
//! of all, as HealthImaging keeps imports that conflict with primary data.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::Path as FsPath;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::cloud::{AWS_DATASTORE, serve, sigv4_valid};

/// Attributes kept per level of the metadata document, by keyword.
const PATIENT: &[&str] = &["PatientID", "PatientName", "PatientBirthDate", "PatientSex"];
const STUDY: &[&str] = &[
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "PatientAge",
];
const SERIES: &[&str] = &[
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "SeriesNumber",
    "SeriesDescription",
    "Laterality",
    "SeriesDate",
    "SeriesTime",
];
const INSTANCE: &[&str] = &["SOPInstanceUID", "SOPClassUID", "InstanceNumber"];
/// Written as JSON numbers, as the service writes IS values.
const NUMBERS: &[&str] = &["SeriesNumber", "InstanceNumber"];

/// Keyword-keyed attributes of one level (patient, study, series, instance).
type Attributes = Map<String, Value>;
/// A series' attributes and its instances' (by SOP Instance UID).
type SeriesEntry = (Attributes, BTreeMap<String, Attributes>);
/// A validated search filter: operator and (attribute, value) pairs.
type Filter = (String, Vec<(String, Value)>);

/// One image set: part (or all) of one study.
#[derive(Debug, Clone)]
struct ImageSet {
    id: String,
    version: u64,
    created_at: u64,
    updated_at: u64,
    patient: Map<String, Value>,
    study: Map<String, Value>,
    series: BTreeMap<String, SeriesEntry>,
    /// `false` for a conflicting import.
    primary: bool,
}

#[derive(Debug)]
struct Inner {
    secret: String,
    image_sets: Vec<ImageSet>,
    throttle_every: u32,
    requests: AtomicU32,
    searches: AtomicU32,
    metadata_reads: AtomicU32,
    throttled: AtomicU32,
    refused: AtomicU32,
    summaries: AtomicU32,
}

/// A running HealthImaging stand-in.
#[derive(Debug, Clone)]
pub struct HealthImagingStandIn {
    inner: Arc<Inner>,
    /// Where it listens, e.g. `http://127.0.0.1:1234`.
    pub root: String,
}

impl HealthImagingStandIn {
    /// Serves the DICOM files under `dicom_dir` as data store
    /// [`AWS_DATASTORE`], accepting requests signed with `secret`.
    pub async fn start(dicom_dir: &FsPath, secret: &str, throttle_every: u32) -> Self {
        let image_sets = image_sets(dicom_dir);
        let inner = Arc::new(Inner {
            secret: secret.to_owned(),
            image_sets,
            throttle_every: throttle_every.max(1),
            requests: AtomicU32::new(0),
            searches: AtomicU32::new(0),
            metadata_reads: AtomicU32::new(0),
            throttled: AtomicU32::new(0),
            refused: AtomicU32::new(0),
            summaries: AtomicU32::new(0),
        });
        let app = Router::new()
            .route("/datastore/{id}/searchImageSets", post(search))
            .route(
                "/datastore/{id}/imageSet/{image_set}/getImageSetMetadata",
                post(metadata),
            )
            .with_state(Arc::clone(&inner));
        let root = serve(app).await;
        HealthImagingStandIn { inner, root }
    }

    /// Image sets in the data store.
    pub fn image_sets(&self) -> usize {
        self.inner.image_sets.len()
    }

    /// Non-primary image sets (conflicting imports).
    pub fn non_primary(&self) -> usize {
        self.inner.image_sets.iter().filter(|s| !s.primary).count()
    }

    /// Studies stored in more than one primary image set.
    pub fn split_studies(&self) -> usize {
        let mut per_study: BTreeMap<&str, usize> = BTreeMap::new();
        for set in self.inner.image_sets.iter().filter(|s| s.primary) {
            if let Some(uid) = set.study.get("StudyInstanceUID").and_then(Value::as_str) {
                *per_study.entry(uid).or_default() += 1;
            }
        }
        per_study.values().filter(|n| **n > 1).count()
    }

    pub fn requests(&self) -> u32 {
        self.inner.requests.load(Ordering::SeqCst)
    }
    pub fn searches(&self) -> u32 {
        self.inner.searches.load(Ordering::SeqCst)
    }
    pub fn metadata_reads(&self) -> u32 {
        self.inner.metadata_reads.load(Ordering::SeqCst)
    }
    pub fn throttled(&self) -> u32 {
        self.inner.throttled.load(Ordering::SeqCst)
    }
    /// Image set summaries sent by searches.
    pub fn summaries(&self) -> u32 {
        self.inner.summaries.load(Ordering::SeqCst)
    }
    pub fn refused(&self) -> u32 {
        self.inner.refused.load(Ordering::SeqCst)
    }
}

/// Reads every DICOM file below `dir` into image sets.
fn image_sets(dir: &FsPath) -> Vec<ImageSet> {
    type Study = (Attributes, Attributes, BTreeMap<String, SeriesEntry>);
    let mut studies: BTreeMap<String, Study> = BTreeMap::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).unwrap_or_else(|e| panic!("{e}")) {
            let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            let object = dicom_object::OpenFileOptions::new()
                .read_until(dicom_dictionary_std::tags::PIXEL_DATA)
                .open_file(&path)
                .unwrap_or_else(|e| panic!("{e}"));
            let level = |keywords: &[&str]| -> Map<String, Value> {
                keywords
                    .iter()
                    .filter_map(|keyword| {
                        let element = object.element_by_name(keyword).ok()?;
                        let text = element.to_str().ok()?;
                        let text = text.trim_end_matches(['\0', ' ']).to_owned();
                        let value = if NUMBERS.contains(keyword) {
                            text.trim().parse::<u64>().map(Value::from).ok()?
                        } else {
                            Value::String(text)
                        };
                        Some(((*keyword).to_owned(), value))
                    })
                    .collect()
            };
            let study = level(STUDY);
            let series = level(SERIES);
            let instance = level(INSTANCE);
            let key = |map: &Map<String, Value>, name: &str| {
                map.get(name)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned()
            };
            let (study_uid, series_uid, instance_uid) = (
                key(&study, "StudyInstanceUID"),
                key(&series, "SeriesInstanceUID"),
                key(&instance, "SOPInstanceUID"),
            );
            let entry = studies
                .entry(study_uid)
                .or_insert_with(|| (level(PATIENT), study, BTreeMap::new()));
            entry
                .2
                .entry(series_uid)
                .or_insert_with(|| (series, BTreeMap::new()))
                .1
                .insert(instance_uid, instance);
        }
    }
    let mut sets = Vec::new();
    for (index, (_, (patient, study, series))) in studies.into_iter().enumerate() {
        // Every third study with several series arrives in two imports.
        let parts = if series.len() > 1 && index % 3 == 0 {
            2
        } else {
            1
        };
        for part in 0..parts {
            let n = sets.len() as u64 + 1;
            sets.push(ImageSet {
                id: format!("{:032x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                version: 1 + (n % 3),
                created_at: 1_700_000_000 + n * 60,
                // Not in study order, so sorting by it means something.
                updated_at: 1_700_000_000 + (n * 7919) % 100_000,
                patient: patient.clone(),
                study: study.clone(),
                series: series
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| i % parts == part)
                    .map(|(_, (uid, s))| (uid.clone(), s.clone()))
                    .collect(),
                primary: true,
            });
        }
        if index % 5 == 1
            && let Some((series_uid, (attributes, instances))) = series.iter().next()
        {
            // A re-import with regenerated series and instance UIDs and
            // another description: kept apart as non-primary.
            let n = sets.len() as u64 + 1;
            let mut conflicting_study = study.clone();
            conflicting_study.insert("StudyDescription".into(), json!("CONFLICTING IMPORT"));
            let mut attributes = attributes.clone();
            let copy_uid = format!("{series_uid}.9");
            attributes.insert("SeriesInstanceUID".into(), json!(copy_uid));
            let instances = instances
                .iter()
                .map(|(uid, instance)| {
                    let mut instance = instance.clone();
                    instance.insert("SOPInstanceUID".into(), json!(format!("{uid}.9")));
                    (format!("{uid}.9"), instance)
                })
                .collect();
            sets.push(ImageSet {
                id: format!("{:032x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                version: 1,
                created_at: 1_800_000_000 + n * 60,
                updated_at: 1_800_000_000 + n,
                patient: patient.clone(),
                study: conflicting_study,
                series: BTreeMap::from([(copy_uid, (attributes, instances))]),
                primary: false,
            });
        }
    }
    sets
}

/// An error as the service sends it: status, `x-amzn-ErrorType`, message.
fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        [("x-amzn-errortype", kind.to_owned())],
        axum::Json(json!({"message": message})),
    )
        .into_response()
}

/// The checks every request gets: data store, signature, throttling.
fn admit(
    inner: &Inner,
    id: &str,
    uri: &axum::http::Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Option<Response> {
    let n = inner.requests.fetch_add(1, Ordering::SeqCst) + 1;
    if !sigv4_valid(&inner.secret, "POST", uri, headers, body) {
        inner.refused.fetch_add(1, Ordering::SeqCst);
        return Some(error(
            StatusCode::FORBIDDEN,
            "AccessDeniedException",
            "The request signature we calculated does not match the signature you provided.",
        ));
    }
    if id != AWS_DATASTORE {
        return Some(error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Datastore not found",
        ));
    }
    if n.is_multiple_of(inner.throttle_every) {
        inner.throttled.fetch_add(1, Ordering::SeqCst);
        return Some(error(
            StatusCode::TOO_MANY_REQUESTS,
            "ThrottlingException",
            "Rate exceeded",
        ));
    }
    None
}

fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "ValidationException", message)
}

/// Whether one image set satisfies one filter (already validated).
fn satisfies(set: &ImageSet, operator: &str, values: &[(String, Value)]) -> bool {
    let text = |map: &Map<String, Value>, name: &str| {
        map.get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let value_of = |key: &str| -> Value {
        match key {
            "DICOMPatientId" => json!(text(&set.patient, "PatientID")),
            "DICOMAccessionNumber" => json!(text(&set.study, "AccessionNumber")),
            "DICOMStudyId" => json!(text(&set.study, "StudyID")),
            "DICOMStudyInstanceUID" => json!(text(&set.study, "StudyInstanceUID")),
            "DICOMStudyDateAndTime" => json!({
                "DICOMStudyDate": text(&set.study, "StudyDate"),
                "DICOMStudyTime": text(&set.study, "StudyTime"),
            }),
            "createdAt" => json!(set.created_at),
            "updatedAt" => json!(set.updated_at),
            _ => Value::Null,
        }
    };
    let comparable = |value: &Value| -> (String, String) {
        match value {
            Value::Object(map) => (text(map, "DICOMStudyDate"), text(map, "DICOMStudyTime")),
            Value::Number(n) => (
                format!("{:020}", n.as_u64().unwrap_or_default()),
                String::new(),
            ),
            Value::String(s) => (s.clone(), String::new()),
            _ => (String::new(), String::new()),
        }
    };
    match (operator, values) {
        ("EQUAL", [(key, wanted)]) if key == "DICOMSeriesInstanceUID" => wanted
            .as_str()
            .is_some_and(|uid| set.series.contains_key(uid)),
        ("EQUAL", [(key, wanted)]) => value_of(key) == *wanted,
        ("BETWEEN", [(key, low), (_, high)]) => {
            let have = comparable(&value_of(key));
            comparable(low) <= have && have <= comparable(high)
        }
        _ => false,
    }
}

/// The one filter of a search body, validated: operator and (key, value)s.
fn parse_filter(body: &Value) -> Result<Option<Filter>, String> {
    let criteria = body
        .as_object()
        .ok_or_else(|| String::from("the body must be a SearchCriteria object"))?;
    if let Some(unknown) = criteria
        .keys()
        .find(|key| !matches!(key.as_str(), "filters" | "sort"))
    {
        return Err(format!("Unknown member '{unknown}' in SearchCriteria"));
    }
    let Some(filters) = criteria.get("filters") else {
        return Ok(None);
    };
    let filters = filters
        .as_array()
        .ok_or_else(|| String::from("filters must be a list"))?;
    let [filter] = filters.as_slice() else {
        return Err(String::from("filters accepts one filter"));
    };
    let operator = filter
        .get("operator")
        .and_then(Value::as_str)
        .ok_or_else(|| String::from("operator is required"))?;
    let values = filter
        .get("values")
        .and_then(Value::as_array)
        .ok_or_else(|| String::from("values is required"))?;
    let mut parsed = Vec::new();
    for value in values {
        let Some(map) = value.as_object().filter(|m| m.len() == 1) else {
            return Err(String::from("each value sets exactly one attribute"));
        };
        let (key, value) = map
            .iter()
            .next()
            .ok_or_else(|| String::from("empty value"))?;
        let known = matches!(
            key.as_str(),
            "DICOMPatientId"
                | "DICOMAccessionNumber"
                | "DICOMStudyId"
                | "DICOMStudyInstanceUID"
                | "DICOMSeriesInstanceUID"
                | "DICOMStudyDateAndTime"
                | "createdAt"
                | "updatedAt"
        );
        if !known {
            return Err(format!("unknown search attribute {key}"));
        }
        parsed.push((key.clone(), value.clone()));
    }
    let shape_ok = match operator {
        "EQUAL" => parsed.len() == 1 && parsed[0].0 != "DICOMStudyDateAndTime",
        "BETWEEN" => {
            parsed.len() == 2
                && parsed[0].0 == parsed[1].0
                && matches!(
                    parsed[0].0.as_str(),
                    "DICOMStudyDateAndTime" | "createdAt" | "updatedAt"
                )
        }
        _ => false,
    };
    if !shape_ok {
        return Err(String::from("EQUAL takes one value and BETWEEN two bounds"));
    }
    Ok(Some((operator.to_owned(), parsed)))
}

async fn search(
    State(inner): State<Arc<Inner>>,
    Path(id): Path<String>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    if let Some(refused) = admit(&inner, &id, &uri, &headers, &body) {
        return refused;
    }
    inner.searches.fetch_add(1, Ordering::SeqCst);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let max_results = match param("maxResults").map(|v| v.parse::<usize>()) {
        None => 50,
        Some(Ok(n)) if (1..=50).contains(&n) => n,
        Some(_) => return invalid("maxResults must be between 1 and 50"),
    };
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return invalid("the body is not JSON");
    };
    let filter = match parse_filter(&request) {
        Ok(filter) => filter,
        Err(message) => return invalid(&message),
    };
    // The token names the search it continues, so it cannot be replayed
    // on another.
    let fingerprint = format!(
        "{:x}",
        body.iter()
            .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(*b)))
    );
    let offset = match param("nextToken") {
        None => 0,
        Some(token) => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(token)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok());
            match decoded.as_deref().and_then(|t| t.split_once(':')) {
                Some((offset, print)) if print == fingerprint => match offset.parse() {
                    Ok(offset) => offset,
                    Err(_) => return invalid("invalid nextToken"),
                },
                _ => return invalid("invalid nextToken"),
            }
        }
    };
    let mut matching: Vec<&ImageSet> = inner
        .image_sets
        .iter()
        .filter(|set| {
            filter
                .as_ref()
                .is_none_or(|(operator, values)| satisfies(set, operator, values))
        })
        .collect();
    matching.sort_by(|a, b| b.updated_at.cmp(&a.updated_at).then(a.id.cmp(&b.id)));
    let page: Vec<Value> = matching
        .iter()
        .skip(offset)
        .take(max_results)
        .map(|set| summary(set))
        .collect();
    inner.summaries.fetch_add(
        u32::try_from(page.len()).unwrap_or(u32::MAX),
        Ordering::SeqCst,
    );
    let mut answer = json!({
        "imageSetsMetadataSummaries": page,
        "sort": {"sortField": "updatedAt", "sortOrder": "DESC"},
    });
    if offset + max_results < matching.len() {
        let token = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{fingerprint}", offset + max_results));
        answer["nextToken"] = json!(token);
    }
    axum::Json(answer).into_response()
}

/// An image set as `SearchImageSets` describes it.
fn summary(set: &ImageSet) -> Value {
    let mut tags = Map::new();
    for (from, to) in [
        ("PatientID", "DICOMPatientId"),
        ("PatientName", "DICOMPatientName"),
        ("PatientBirthDate", "DICOMPatientBirthDate"),
        ("PatientSex", "DICOMPatientSex"),
    ] {
        if let Some(value) = set.patient.get(from) {
            tags.insert(to.to_owned(), value.clone());
        }
    }
    for (from, to) in [
        ("StudyInstanceUID", "DICOMStudyInstanceUID"),
        ("StudyDate", "DICOMStudyDate"),
        ("StudyTime", "DICOMStudyTime"),
        ("AccessionNumber", "DICOMAccessionNumber"),
        ("StudyID", "DICOMStudyId"),
        ("StudyDescription", "DICOMStudyDescription"),
    ] {
        if let Some(value) = set.study.get(from) {
            tags.insert(to.to_owned(), value.clone());
        }
    }
    let instances: usize = set.series.values().map(|(_, i)| i.len()).sum();
    tags.insert(
        "DICOMNumberOfStudyRelatedSeries".into(),
        json!(set.series.len()),
    );
    tags.insert(
        "DICOMNumberOfStudyRelatedInstances".into(),
        json!(instances),
    );
    if let Some((first, _)) = set.series.values().next() {
        for (from, to) in [
            ("SeriesInstanceUID", "DICOMSeriesInstanceUID"),
            ("Modality", "DICOMSeriesModality"),
            ("BodyPartExamined", "DICOMSeriesBodyPart"),
            ("SeriesNumber", "DICOMSeriesNumber"),
        ] {
            if let Some(value) = first.get(from) {
                tags.insert(to.to_owned(), value.clone());
            }
        }
    }
    json!({
        "imageSetId": set.id,
        "version": set.version,
        "createdAt": set.created_at,
        "updatedAt": set.updated_at,
        "isPrimary": set.primary,
        "DICOMTags": tags,
    })
}

async fn metadata(
    State(inner): State<Arc<Inner>>,
    Path((id, image_set)): Path<(String, String)>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    Query(query): Query<Vec<(String, String)>>,
    body: Bytes,
) -> Response {
    if let Some(refused) = admit(&inner, &id, &uri, &headers, &body) {
        return refused;
    }
    inner.metadata_reads.fetch_add(1, Ordering::SeqCst);
    let Some(set) = inner.image_sets.iter().find(|s| s.id == image_set) else {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Image set not found",
        );
    };
    if let Some((_, version)) = query.iter().find(|(k, _)| k == "version")
        && version.parse::<u64>().ok() != Some(set.version)
    {
        return error(
            StatusCode::NOT_FOUND,
            "ResourceNotFoundException",
            "Image set version not found",
        );
    }
    let series: Map<String, Value> = set
        .series
        .iter()
        .map(|(uid, (dicom, instances))| {
            let instances: Map<String, Value> = instances
                .iter()
                .map(|(uid, dicom)| (uid.clone(), json!({"DICOM": dicom, "ImageFrames": []})))
                .collect();
            (uid.clone(), json!({"DICOM": dicom, "Instances": instances}))
        })
        .collect();
    let document = json!({
        "SchemaVersion": "1.1",
        "DatastoreID": AWS_DATASTORE,
        "ImageSetID": set.id,
        "Patient": {"DICOM": set.patient},
        "Study": {"DICOM": set.study, "Series": series},
    });
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let bytes = serde_json::to_vec(&document).unwrap_or_default();
    if encoder.write_all(&bytes).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Ok(gzipped) = encoder.finish() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CONTENT_ENCODING, "gzip"),
        ],
        gzipped,
    )
        .into_response()
}
