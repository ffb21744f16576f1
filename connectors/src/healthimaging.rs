//! AWS HealthImaging through its native API.
//!
//! A data store holds *image sets*, not studies: one study can be spread
//! over several image sets (one per import, or per series). The connector
//! searches with `SearchImageSets`, pushing down the most selective filter
//! the service accepts (a study UID, else the study date range; it takes
//! one), follows `nextToken` until the service has no more, groups image
//! sets by Study Instance UID, drops groups the search summaries already
//! rule out, and reads each remaining image set's metadata
//! (`GetImageSetMetadata`, gzipped keyword-keyed JSON) with bounded
//! concurrency for what only series carry: modalities and body parts.
//! Every request is SigV4-signed for `medical-imaging`; throttling (429) is
//! waited out a few times, within the partner's deadline.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use meshgate_schema::dicom::{KeywordJson, format_date};
use meshgate_schema::{
    Capabilities, ConnectorKind, FilterKind, Instance, PagingStyle, Series, Study, StudyQuery,
};
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::aws_credentials::AwsCredentialProvider;
use crate::sigv4::HEALTHIMAGING_SERVICE;
use crate::{Connector, ConnectorError, SearchOutcome, http};

/// Everything the native connector needs to know about its data store.
#[derive(Debug, Clone)]
pub struct HealthImagingSettings {
    /// The API root: [`default_endpoint`] unless a test or a VPC endpoint
    /// says otherwise.
    pub endpoint: Url,
    pub region: String,
    pub datastore_id: String,
    pub credentials: Arc<AwsCredentialProvider>,
    /// How many image sets' metadata are read at once.
    pub detail_concurrency: usize,
}

/// The native API's root in `region`.
pub fn default_endpoint(region: &str) -> String {
    format!("https://runtime-medical-imaging.{region}.amazonaws.com")
}

/// `SearchImageSets` returns at most this many image sets per page.
pub const MAX_RESULTS: u32 = 50;
/// Up to this many study UIDs are searched one by one; more, and one
/// search of everything is filtered here instead.
const MAX_UID_SEARCHES: usize = 50;
/// Searches for single study UIDs sent at once.
const UID_SEARCH_CONCURRENCY: usize = 4;
/// The most an image set's metadata may take once decompressed. A larger
/// one is refused rather than read (a compressed body can expand a
/// thousandfold).
const MAX_METADATA_BYTES: u64 = 64 << 20;
/// The widest study date range, for open-ended ranges: `BETWEEN` needs two
/// bounds. The lower one is the smallest valid DA value rather than a
/// plausible first date, so that no study is ever left out.
const EARLIEST: &str = "00010101";
const LATEST: &str = "99991231";

/// A data store reached through the native HealthImaging API.
#[derive(Debug)]
pub struct HealthImagingConnector {
    settings: HealthImagingSettings,
    client: reqwest::Client,
    /// Retries this partner may be sent.
    retries: http::RetryBudget,
}

/// One page of `SearchImageSets`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SearchPage {
    #[serde(default)]
    image_sets_metadata_summaries: Vec<Summary>,
    #[serde(default)]
    next_token: Option<String>,
}

/// One image set as the search describes it.
#[derive(Debug, Clone, Deserialize)]
struct Summary {
    #[serde(rename = "imageSetId")]
    image_set_id: String,
    #[serde(default)]
    version: Option<u64>,
    /// `false` for an import that conflicted with the store's primary
    /// image sets (kept apart until someone resolves it); absent from
    /// stores older than the flag, whose sets are all primary.
    #[serde(rename = "isPrimary", default)]
    is_primary: Option<bool>,
    #[serde(rename = "DICOMTags", default)]
    tags: Map<String, Value>,
}

/// `GetImageSetMetadata`'s document, as far as meshgate reads it.
#[derive(Debug, Default, Deserialize)]
struct ImageSetMetadata {
    #[serde(rename = "Patient", default)]
    patient: Level,
    #[serde(rename = "Study", default)]
    study: StudyLevel,
}

#[derive(Debug, Default, Deserialize)]
struct Level {
    #[serde(rename = "DICOM", default)]
    dicom: Map<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
struct StudyLevel {
    #[serde(rename = "DICOM", default)]
    dicom: Map<String, Value>,
    #[serde(rename = "Series", default)]
    series: BTreeMap<String, SeriesLevel>,
}

#[derive(Debug, Default, Deserialize)]
struct SeriesLevel {
    #[serde(rename = "DICOM", default)]
    dicom: Map<String, Value>,
    #[serde(rename = "Instances", default)]
    instances: BTreeMap<String, Level>,
}

/// Filters the search summaries can answer: they carry study-level
/// attributes, not series.
const ANSWERED_BY_SUMMARIES: [FilterKind; 5] = [
    FilterKind::StudyDate,
    FilterKind::PatientSex,
    FilterKind::PatientAge,
    FilterKind::Description,
    FilterKind::StudyUid,
];

impl HealthImagingConnector {
    pub fn new(settings: HealthImagingSettings) -> Result<HealthImagingConnector, ConnectorError> {
        if settings.datastore_id.is_empty()
            || !settings
                .datastore_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(ConnectorError::Config(
                "datastore_id must be letters and digits".into(),
            ));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(4))
            .user_agent(concat!("meshgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| ConnectorError::Config("the HTTP client could not be set up".into()))?;
        Ok(HealthImagingConnector {
            settings,
            client,
            retries: http::RetryBudget::default(),
        })
    }

    fn url(&self, path: &str, params: &[(&str, &str)]) -> Result<Url, ConnectorError> {
        let mut url = self
            .settings
            .endpoint
            .join(&format!("datastore/{}/{path}", self.settings.datastore_id))
            .map_err(|_| {
                ConnectorError::Config("the HealthImaging endpoint is not valid".into())
            })?;
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        Ok(url)
    }

    /// One signed POST, throttling waited out a few times.
    async fn post(&self, url: &Url, body: &[u8]) -> Result<http::Answer, ConnectorError> {
        let mut throttled = 0;
        self.retries.request();
        loop {
            let credentials = self.settings.credentials.credentials().await?;
            // Both operations only read, so a transport failure is retried.
            let answer = http::send_idempotent(&self.retries, || {
                let request = self
                    .client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.to_vec());
                http::sigv4_signed(
                    request,
                    "POST",
                    url,
                    body,
                    &credentials,
                    &self.settings.region,
                    HEALTHIMAGING_SERVICE,
                )
            })
            .await?;
            match http::throttle_wait(&answer, throttled, &self.retries) {
                Some(wait) => {
                    throttled += 1;
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "throttled; waiting");
                    tokio::time::sleep(wait).await;
                }
                None => return Ok(answer),
            }
        }
    }

    /// Every image set matching one search criterion (`None`: all), page
    /// by page.
    async fn search_image_sets(
        &self,
        criterion: Option<&Value>,
    ) -> Result<Vec<Summary>, ConnectorError> {
        // `searchCriteria` is the request's payload (the service model
        // binds it to the body), so the body is the criteria themselves.
        let body = match criterion {
            Some(filter) => json!({"filters": [filter]}),
            None => json!({}),
        };
        let body = serde_json::to_vec(&body).map_err(|_| ConnectorError::BadResponse)?;
        let mut found = Vec::new();
        let mut next_token: Option<String> = None;
        let max_results = MAX_RESULTS.to_string();
        loop {
            let mut params = vec![("maxResults", max_results.as_str())];
            if let Some(token) = &next_token {
                params.push(("nextToken", token.as_str()));
            }
            let url = self.url("searchImageSets", &params)?;
            let answer = self.post(&url, &body).await?;
            if answer.status == StatusCode::NOT_FOUND {
                return Err(ConnectorError::StoreNotFound);
            }
            if let Some(error) = http::status_error(answer.status) {
                return Err(error);
            }
            let page: SearchPage =
                serde_json::from_slice(&answer.body).map_err(|_| ConnectorError::BadResponse)?;
            // Primary image sets only: a non-primary one is a conflicting
            // import whose attributes the partner has not accepted.
            found.extend(
                page.image_sets_metadata_summaries
                    .into_iter()
                    .filter(|summary| summary.is_primary != Some(false)),
            );
            match page.next_token.filter(|token| !token.is_empty()) {
                // A token that does not move on would page for ever.
                Some(token) if next_token.as_ref() == Some(&token) => {
                    return Err(ConnectorError::BadResponse);
                }
                Some(token) => next_token = Some(token),
                None => return Ok(found),
            }
        }
    }

    /// One image set's metadata; `None` if it is gone (deleted since the
    /// search found it).
    async fn metadata(
        &self,
        summary: &Summary,
    ) -> Result<Option<ImageSetMetadata>, ConnectorError> {
        // The id goes into the URL path: it must be the service's
        // alphanumeric form, whatever a misbehaving upstream sent.
        if summary.image_set_id.is_empty()
            || !summary
                .image_set_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(ConnectorError::BadResponse);
        }
        let version = summary.version.map(|v| v.to_string());
        let params: Vec<(&str, &str)> = version.iter().map(|v| ("version", v.as_str())).collect();
        let url = self.url(
            &format!("imageSet/{}/getImageSetMetadata", summary.image_set_id),
            &params,
        )?;
        let answer = self.post(&url, b"").await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if let Some(error) = http::status_error(answer.status) {
            return Err(error);
        }
        let json = decompress(&answer)?;
        serde_json::from_slice(&json)
            .map(Some)
            .map_err(|_| ConnectorError::BadResponse)
    }

    /// Reads the metadata of `image_sets` and assembles one study from
    /// each group of them, with series and instances.
    async fn studies_of(&self, groups: Vec<Vec<Summary>>) -> Result<Vec<Study>, ConnectorError> {
        let flat: Vec<(usize, Summary)> = groups
            .into_iter()
            .enumerate()
            .flat_map(|(group, sets)| sets.into_iter().map(move |set| (group, set)))
            .collect();
        let mut fetched: Vec<(usize, usize, Option<ImageSetMetadata>)> =
            stream::iter(flat.into_iter().enumerate())
                .map(|(position, (group, summary))| async move {
                    Ok::<_, ConnectorError>((position, group, self.metadata(&summary).await?))
                })
                // Unordered: one throttled read must not hold up the others.
                .buffer_unordered(self.settings.detail_concurrency.max(1))
                .try_collect()
                .await?;
        // Back in search order, so a study's attributes always come from
        // the same image set.
        fetched.sort_by_key(|(position, _, _)| *position);
        let mut by_group: BTreeMap<usize, Vec<ImageSetMetadata>> = BTreeMap::new();
        for (_, group, metadata) in fetched {
            if let Some(metadata) = metadata {
                by_group.entry(group).or_default().push(metadata);
            }
        }
        Ok(by_group
            .into_values()
            .filter_map(|sets| assemble(&sets))
            .collect())
    }
}

/// The body of a metadata answer, gunzipped when it is gzip (the service
/// says so in `Content-Encoding`; the magic bytes are checked too).
fn decompress(answer: &http::Answer) -> Result<Vec<u8>, ConnectorError> {
    let gzipped = answer
        .content_encoding
        .as_deref()
        .is_some_and(|e| e.eq_ignore_ascii_case("gzip"))
        || answer.body.starts_with(&[0x1f, 0x8b]);
    if !gzipped {
        return Ok(answer.body.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(answer.body.as_ref())
        .take(MAX_METADATA_BYTES + 1)
        .read_to_end(&mut out)
        .map_err(|_| ConnectorError::BadResponse)?;
    if out.len() as u64 > MAX_METADATA_BYTES {
        tracing::warn!(
            limit_bytes = MAX_METADATA_BYTES,
            "an image set's metadata is larger than meshgate reads"
        );
        return Err(ConnectorError::BadResponse);
    }
    Ok(out)
}

/// A study's attributes as a search summary gives them (`DICOMTags`,
/// `DICOM`-prefixed keywords). Series-level tags in a summary describe one
/// of the image set's series only, so they are left out.
fn study_from_summary(summary: &Summary) -> Option<Study> {
    let mut attributes = Map::new();
    for (key, value) in &summary.tags {
        let Some(keyword) = key.strip_prefix("DICOM") else {
            continue;
        };
        if keyword.starts_with("Series") || keyword.starts_with("NumberOf") {
            continue;
        }
        let keyword = match keyword {
            "PatientId" => "PatientID",
            "StudyId" => "StudyID",
            other => other,
        };
        attributes.insert(keyword.to_owned(), value.clone());
    }
    Study::from_attributes(&KeywordJson(&attributes))
}

/// One study from the metadata of the image sets that hold it: study
/// attributes from the first, series and instances from all of them.
fn assemble(image_sets: &[ImageSetMetadata]) -> Option<Study> {
    let first = image_sets.first()?;
    let mut attributes = first.patient.dicom.clone();
    attributes.extend(first.study.dicom.clone());
    let mut study = Study::from_attributes(&KeywordJson(&attributes))?;
    let mut series: BTreeMap<&str, (Series, BTreeMap<&str, Instance>)> = BTreeMap::new();
    for image_set in image_sets {
        for (uid, level) in &image_set.study.series {
            let mut dicom = level.dicom.clone();
            dicom
                .entry("SeriesInstanceUID")
                .or_insert_with(|| Value::String(uid.clone()));
            let Some(parsed) = Series::from_attributes(&KeywordJson(&dicom)) else {
                continue;
            };
            let (_, instances) = series
                .entry(uid.as_str())
                .or_insert((parsed, BTreeMap::new()));
            for (instance_uid, instance) in &level.instances {
                let mut dicom = instance.dicom.clone();
                dicom
                    .entry("SOPInstanceUID")
                    .or_insert_with(|| Value::String(instance_uid.clone()));
                if let Some(parsed) = Instance::from_attributes(&KeywordJson(&dicom)) {
                    instances.insert(instance_uid.as_str(), parsed);
                }
            }
        }
    }
    study.set_series(
        series
            .into_values()
            .map(|(series, instances)| Series {
                number_of_instances: u32::try_from(instances.len()).ok(),
                instances: instances.into_values().collect(),
                ..series
            })
            .collect(),
    );
    Some(study)
}

/// The one search criterion to send for `query`, and the filter kind it
/// pushes down. Study UIDs are the most selective (one search each), then
/// the date range.
fn criteria(query: &StudyQuery) -> (Vec<Option<Value>>, Option<FilterKind>) {
    if !query.study_uids.is_empty() && query.study_uids.len() <= MAX_UID_SEARCHES {
        let searches = query
            .study_uids
            .iter()
            .map(|uid| {
                Some(json!({"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": uid}]}))
            })
            .collect();
        return (searches, Some(FilterKind::StudyUid));
    }
    if let Some(range) = query.study_date {
        let from = range.from.map(format_date);
        let to = range.to.map(format_date);
        let bound = |date: Option<String>, default: &str, time: &str| {
            json!({"DICOMStudyDateAndTime": {
                "DICOMStudyDate": date.unwrap_or_else(|| default.to_owned()),
                "DICOMStudyTime": time,
            }})
        };
        let filter = json!({"operator": "BETWEEN", "values": [
            bound(from, EARLIEST, "000000"),
            bound(to, LATEST, "235959.999999"),
        ]});
        return (vec![Some(filter)], Some(FilterKind::StudyDate));
    }
    (vec![None], None)
}

#[async_trait]
impl Connector for HealthImagingConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::HealthImaging
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::declared(
            vec![FilterKind::StudyDate, FilterKind::StudyUid],
            PagingStyle::NextToken,
            Some(MAX_RESULTS),
            None,
        )
    }

    async fn check(&self) -> Result<Duration, ConnectorError> {
        let started = std::time::Instant::now();
        let url = self.url("searchImageSets", &[("maxResults", "1")])?;
        let answer = self.post(&url, b"{}").await?;
        if answer.status == StatusCode::NOT_FOUND {
            return Err(ConnectorError::StoreNotFound);
        }
        if let Some(error) = http::status_error(answer.status) {
            return Err(error);
        }
        serde_json::from_slice::<SearchPage>(&answer.body)
            .map_err(|_| ConnectorError::BadResponse)?;
        Ok(started.elapsed())
    }

    async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError> {
        let (searches, pushed) = criteria(query);
        if let Some(kind) = pushed {
            tracing::debug!(pushed_down = ?kind, searches = searches.len(), "searching image sets");
        }
        let pages: Vec<Vec<Summary>> = stream::iter(searches)
            .map(|criterion| async move { self.search_image_sets(criterion.as_ref()).await })
            .buffered(UID_SEARCH_CONCURRENCY)
            .try_collect()
            .await?;
        // Group by study; drop a study only when none of its image sets'
        // summaries can match (they should agree, but need not).
        let used = query.filters_used();
        let from_summaries: BTreeSet<FilterKind> = ANSWERED_BY_SUMMARIES
            .into_iter()
            .filter(|kind| used.contains(kind))
            .collect();
        let mut groups: HashMap<String, (bool, Vec<Summary>)> = HashMap::new();
        let mut seen = BTreeSet::new();
        for summary in pages.into_iter().flatten() {
            if !seen.insert((summary.image_set_id.clone(), summary.version)) {
                continue;
            }
            let Some(study) = study_from_summary(&summary) else {
                continue;
            };
            let group = groups.entry(study.uid.clone()).or_default();
            group.0 |= query.matches_on(&study, &from_summaries);
            group.1.push(summary);
        }
        let mut candidates: Vec<(String, Vec<Summary>)> = groups
            .into_iter()
            .filter(|(_, (possible, _))| *possible)
            .map(|(uid, (_, sets))| (uid, sets))
            .collect();
        candidates.sort_by(|a, b| a.0.cmp(&b.0));
        let studies = self
            .studies_of(candidates.into_iter().map(|(_, sets)| sets).collect())
            .await?
            .into_iter()
            .filter(|study| query.matches(study))
            .map(|study| Study {
                series: Vec::new(),
                ..study
            })
            .collect();
        Ok(SearchOutcome {
            studies,
            truncated: false,
        })
    }

    async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
        let uids: Vec<String> = studies.iter().map(|study| study.uid.clone()).collect();
        let loaded: Vec<Option<Study>> = stream::iter(uids)
            .map(|uid| async move {
                let filter =
                    json!({"operator": "EQUAL", "values": [{"DICOMStudyInstanceUID": uid}]});
                // Only that study's sets, whatever else an answer carries.
                let sets: Vec<Summary> = self
                    .search_image_sets(Some(&filter))
                    .await?
                    .into_iter()
                    .filter(|summary| {
                        study_from_summary(summary).is_some_and(|study| study.uid == uid)
                    })
                    .collect();
                let mut found = self.studies_of(vec![sets]).await?;
                Ok::<_, ConnectorError>(found.pop())
            })
            .buffered(UID_SEARCH_CONCURRENCY)
            .try_collect()
            .await?;
        for (study, found) in studies.iter_mut().zip(loaded) {
            if let Some(found) = found {
                study.set_series(found.series);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly")]

    use super::*;

    fn summary(tags: Value) -> Summary {
        serde_json::from_value(json!({"imageSetId": "abc", "version": 1, "DICOMTags": tags}))
            .unwrap()
    }

    #[test]
    fn summaries_give_study_attributes_but_not_one_series_modality_as_the_studys() {
        let study = study_from_summary(&summary(json!({
            "DICOMStudyInstanceUID": "1.2.3",
            "DICOMPatientId": "P1",
            "DICOMPatientSex": "F",
            "DICOMStudyDate": "20200131",
            "DICOMStudyDescription": "CT CHEST",
            "DICOMSeriesModality": "CT",
            "DICOMNumberOfStudyRelatedSeries": 3,
        })))
        .unwrap();
        assert_eq!(study.uid, "1.2.3");
        assert_eq!(study.patient_id.as_deref(), Some("P1"));
        assert_eq!(study.description.as_deref(), Some("CT CHEST"));
        assert!(study.date.is_some());
        assert!(study.modalities.is_empty());
        assert_eq!(study.number_of_series, None);
    }

    #[test]
    fn a_study_split_over_image_sets_has_every_series_once() {
        let set = |series: Value| -> ImageSetMetadata {
            serde_json::from_value(json!({
                "Patient": {"DICOM": {"PatientID": "P1", "PatientSex": "M"}},
                "Study": {"DICOM": {"StudyInstanceUID": "1.2.3", "StudyDate": "20200101"},
                          "Series": series}
            }))
            .unwrap()
        };
        let study = assemble(&[
            set(
                json!({"1.2.3.1": {"DICOM": {"Modality": "CT", "SeriesNumber": 1},
                        "Instances": {"1.2.3.1.1": {"DICOM": {"InstanceNumber": 1}}}}}),
            ),
            set(
                json!({"1.2.3.2": {"DICOM": {"Modality": "MR", "BodyPartExamined": "knee"},
                        "Instances": {"1.2.3.2.1": {"DICOM": {}}, "1.2.3.2.2": {"DICOM": {}}}},
                       "1.2.3.1": {"DICOM": {"Modality": "CT"},
                        "Instances": {"1.2.3.1.1": {"DICOM": {}}}}}),
            ),
        ])
        .unwrap();
        assert_eq!(study.modalities, ["CT", "MR"]);
        assert_eq!(study.body_parts, ["KNEE"]);
        assert_eq!(study.series.len(), 2);
        assert_eq!(study.number_of_series, Some(2));
        assert_eq!(study.number_of_instances, Some(3));
    }

    #[test]
    fn open_date_ranges_are_searched_between_the_widest_bounds() {
        let query = StudyQuery {
            study_date: Some(meshgate_schema::DateRange {
                from: Some(time::macros::date!(2024 - 01 - 01)),
                to: None,
            }),
            ..StudyQuery::default()
        };
        let (searches, pushed) = criteria(&query);
        assert_eq!(pushed, Some(FilterKind::StudyDate));
        let values = &searches[0].as_ref().unwrap()["values"];
        assert_eq!(
            values[0]["DICOMStudyDateAndTime"]["DICOMStudyDate"],
            "20240101"
        );
        assert_eq!(values[1]["DICOMStudyDateAndTime"]["DICOMStudyDate"], LATEST);
    }

    #[test]
    fn a_metadata_bomb_is_refused_not_read() {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let zeros = vec![b' '; 1 << 20];
        for _ in 0..65 {
            std::io::Write::write_all(&mut encoder, &zeros).unwrap();
        }
        let body = encoder.finish().unwrap();
        assert!(body.len() < 1 << 20);
        let answer = http::Answer {
            status: StatusCode::OK,
            retry_after: None,
            content_encoding: Some("gzip".into()),
            body: body.into(),
        };
        assert!(matches!(
            decompress(&answer),
            Err(ConnectorError::BadResponse)
        ));
    }
}
