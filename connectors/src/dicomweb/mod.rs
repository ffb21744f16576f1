//! A DICOMweb QIDO-RS connector.
//!
//! Searches at study level with what the backend can filter pushed down,
//! asks series level where a filter needs it (body part), filters the rest
//! after fetching, and pages with `limit`/`offset` until the backend has no
//! more — never trusting a short page to mean the end, since some backends
//! cap pages silently. Backend differences live in [`Profile`].

pub mod config;
mod probe;
mod profile;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use meshgate_schema::dicom::{DicomAttributes, Tag, format_date, tags};
use meshgate_schema::study::assemble_series;
use meshgate_schema::{
    Capabilities, ConnectorKind, FilterKind, Modality, PagingStyle, Series, Study, StudyQuery,
};
use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::aws_credentials::AwsCredentialProvider;
use crate::token::TokenProvider;
use crate::{Connector, ConnectorError, SearchOutcome, Secret, http};
pub use profile::{Profile, TextMatch, wildcard_pattern};
pub use reqwest::Url;

type DicomJson = Map<String, Value>;

/// How the connector authenticates to the DICOMweb service.
#[derive(Debug, Clone, Default)]
pub enum Auth {
    #[default]
    None,
    Basic {
        username: String,
        password: Secret,
    },
    Bearer {
        token: Secret,
    },
    /// OAuth2 access tokens, refreshed before expiry and once more when the
    /// service answers 401.
    Tokens(Arc<TokenProvider>),
    /// AWS Signature Version 4 for `service` in `region`.
    SigV4 {
        credentials: Arc<AwsCredentialProvider>,
        region: String,
        service: &'static str,
    },
}

/// Everything a DICOMweb connector needs to know about its partner.
#[derive(Debug, Clone)]
pub struct DicomWebSettings {
    /// The QIDO-RS base URL, e.g. `http://pacs.example.org/dicom-web/`.
    pub base_url: Url,
    pub profile: Profile,
    pub auth: Auth,
    /// Page size to ask for; clamped to the profile's maximum.
    pub page_size: Option<u32>,
    /// How many series/instance look-ups run at once when loading details.
    pub detail_concurrency: usize,
    /// The most results the backend returns for one search, when the
    /// operator knows it caps them (overrides the profile's cap). Reaching
    /// it makes the partner's status TRUNCATED.
    pub max_results: Option<u32>,
}

/// A partner reached over DICOMweb.
#[derive(Debug)]
pub struct DicomWebConnector {
    settings: DicomWebSettings,
    client: reqwest::Client,
    page_size: u32,
    /// What the last capability probe measured, if one ran.
    measured: RwLock<Option<probe::Measured>>,
    /// Retries this partner may be sent.
    retries: http::RetryBudget,
    /// Body parts read from instance metadata, by series UID, where the
    /// backend does not return them at series level (Azure).
    body_parts: moka::future::Cache<String, Option<String>>,
}

/// The most series whose body part one search reads from instance
/// metadata (two requests each, then cached); beyond it the partner's
/// answer is `TRUNCATED`.
const MAX_BODY_PART_LOOKUPS: usize = 2_000;

/// The study-level attributes asked for beyond the QIDO-RS defaults.
const STUDY_FIELDS: &[Tag] = &[
    tags::STUDY_DESCRIPTION,
    tags::PATIENT_AGE,
    tags::PATIENT_BIRTH_DATE,
    tags::PATIENT_SEX,
    tags::NUMBER_OF_STUDY_RELATED_SERIES,
    tags::NUMBER_OF_STUDY_RELATED_INSTANCES,
];
const SERIES_FIELDS: &[Tag] = &[
    tags::SERIES_DESCRIPTION,
    tags::BODY_PART_EXAMINED,
    tags::LATERALITY,
    tags::SERIES_DATE,
    tags::SERIES_TIME,
    tags::NUMBER_OF_SERIES_RELATED_INSTANCES,
];
const INSTANCE_FIELDS: &[Tag] = &[
    tags::SERIES_INSTANCE_UID,
    tags::SOP_CLASS_UID,
    tags::INSTANCE_NUMBER,
];
/// More UIDs than this in one URL are split (or filtered after fetching).
const MAX_UIDS_IN_URL: usize = 50;
/// Up to this many studies matched at series level are fetched by UID;
/// beyond it one study-level search is cheaper.
const MAX_STUDIES_BY_UID: usize = 500;

/// What to ask the backend for one query.
#[derive(Debug)]
struct SearchPlan {
    study: Vec<(String, String)>,
    /// Series-level searches, one per modality group the backend accepts.
    series: Vec<Vec<(String, String)>>,
    /// Filter kinds the connector checks on what comes back.
    residual: BTreeSet<FilterKind>,
    /// Ask the study-level search as one first page of this many rows
    /// (a backend that cannot page `ModalitiesInStudy`): a shorter page
    /// is every match; a full one sends the query down the paged plan.
    first_page: Option<u32>,
}

impl DicomWebConnector {
    pub fn new(mut settings: DicomWebSettings) -> Result<DicomWebConnector, ConnectorError> {
        if !settings.base_url.path().ends_with('/') {
            let path = format!("{}/", settings.base_url.path());
            settings.base_url.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(settings.profile.idle_timeout())
            .user_agent(concat!("meshgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|_| ConnectorError::Config("the HTTP client could not be set up".into()))?;
        let page_size = settings
            .page_size
            .unwrap_or(settings.profile.default_page_size())
            .clamp(1, settings.profile.max_page_size());
        Ok(DicomWebConnector {
            settings,
            client,
            page_size,
            measured: RwLock::new(None),
            retries: http::RetryBudget::default(),
            body_parts: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(3600))
                .build(),
        })
    }

    fn measured(&self) -> probe::Measured {
        self.measured
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or_default()
    }

    /// Whether `StudyInstanceUID=a,b` may be sent: as measured, or as the
    /// profile documents until then.
    fn uid_lists(&self) -> bool {
        self.measured()
            .uid_lists
            .unwrap_or(self.settings.profile.uid_lists())
    }

    /// Whether `offset` pages (assumed until probed).
    fn offset_pages(&self) -> bool {
        self.measured().offset.unwrap_or(true)
    }

    /// A value to push down for a text filter: only to a backend measured
    /// (or, until probed, assumed by its profile) to match `*` wildcards
    /// case-insensitively, and only as a pattern that finds at least every
    /// match (see [`wildcard_pattern`]); the exact match is done locally.
    fn text_pattern(&self, value: &str, how: TextMatch) -> Option<String> {
        let case_insensitive = self
            .measured()
            .wildcard
            .unwrap_or(self.settings.profile.case_insensitive_wildcards());
        case_insensitive
            .then(|| wildcard_pattern(value, how))
            .flatten()
    }

    /// Whether `ModalitiesInStudy` can be asked at study level and paged.
    fn pages_modalities_in_study(&self) -> bool {
        let measured = self.measured();
        measured
            .study_modality
            .unwrap_or(self.settings.profile.study_level_modality())
            && measured
                .modality_paging
                .unwrap_or(self.settings.profile.pages_modalities_in_study())
    }

    /// Whether `ModalitiesInStudy=A,B` / `Modality=A,B` match either.
    fn modality_lists(&self) -> bool {
        self.measured()
            .modality_lists
            .unwrap_or(self.settings.profile.modality_lists())
    }

    /// The size of a first page of a `ModalitiesInStudy` search that is
    /// every match when it comes back short: only where the probe measured
    /// that the backend filters before it limits, and at most the page size
    /// it was measured to return in full (and its result cap).
    fn modality_first_page(&self) -> Option<u32> {
        let measured = self.measured();
        if measured.study_modality != Some(true) || measured.modality_first_page != Some(true) {
            return None;
        }
        let full = measured.full_page?;
        Some(self.max_results().map_or(full, |cap| cap.min(full)))
    }

    fn max_results(&self) -> Option<u32> {
        self.settings
            .max_results
            .or(self.settings.profile.max_results())
    }

    /// Fetches every row of a QIDO-RS search, page by page, de-duplicated by
    /// `key`. Returns the rows and whether the backend's result cap was hit.
    async fn search_all(
        &self,
        path: &str,
        params: &[(String, String)],
        key: Tag,
    ) -> Result<(Vec<DicomJson>, bool), ConnectorError> {
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        let mut offset: u32 = 0;
        let mut repeated_pages = 0;
        let cap = self.max_results();
        // A study-level search by study UIDs matches no more studies than
        // it names: once all are in hand there is nothing left to page for
        // (a UID lookup is one request, not one and an empty page).
        let named = (path == "studies")
            .then(|| {
                params
                    .iter()
                    .find(|(name, _)| name == "StudyInstanceUID")
                    .map(|(_, uids)| uids.split(',').count())
            })
            .flatten();
        loop {
            let limit = match cap {
                Some(cap) if offset >= cap => return Ok((rows, true)),
                Some(cap) => self.page_size.min(cap - offset),
                None => self.page_size,
            };
            let mut page_params = params.to_vec();
            page_params.push(("limit".into(), limit.to_string()));
            page_params.push(("offset".into(), offset.to_string()));
            let page = self.get_json(path, &page_params).await?;
            if page.is_empty() {
                return Ok((rows, false));
            }
            let full = page.len() >= limit as usize;
            offset = offset.saturating_add(u32::try_from(page.len()).unwrap_or(u32::MAX));
            let before = rows.len();
            for row in page {
                // Rows without the key cannot be de-duplicated or used.
                if let Some(uid) = row.text(key)
                    && seen.insert(uid)
                {
                    rows.push(row);
                }
            }
            // A study-level page shorter than one the backend was measured
            // to return in full is the last: no empty page to ask for.
            // (Measured for studies only: servers cap levels separately.)
            let short =
                path == "studies" && !full && self.measured().full_page.is_some_and(|n| limit <= n);
            if short || named.is_some_and(|n| rows.len() >= n) {
                return Ok((rows, false));
            }
            if !self.offset_pages() {
                // Measured: the backend ignores `offset`, so one page is all
                // that can be had; a full one may not be everything.
                return Ok((rows, full));
            }
            if rows.len() > before {
                repeated_pages = 0;
            } else if repeated_pages == 0 {
                // A page of rows already seen: a backend that repeats rows
                // across pages (Azure) can end on one; ask once more.
                repeated_pages = 1;
            } else {
                // Two pages in a row of rows already seen: the backend is not
                // honouring `offset`, so what lies beyond cannot be reached.
                // The level only: a path can carry a study UID, an identifier.
                let level = path.rsplit('/').next().unwrap_or_default();
                tracing::warn!(
                    level,
                    "a DICOMweb backend repeated a whole page; reporting the result as truncated"
                );
                return Ok((rows, true));
            }
        }
    }

    /// One QIDO-RS request; `204` and `200 []` both mean no rows.
    async fn get_json(
        &self,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Vec<DicomJson>, ConnectorError> {
        self.get_json_answer(path, params)
            .await
            .map(|(_, rows)| rows)
    }

    /// One QIDO-RS request: the final status and the rows.
    async fn get_json_answer(
        &self,
        path: &str,
        params: &[(String, String)],
    ) -> Result<(StatusCode, Vec<DicomJson>), ConnectorError> {
        let url = self.url(path, params)?;
        let mut token = match &self.settings.auth {
            Auth::Tokens(provider) => Some(provider.token().await?),
            _ => None,
        };
        let mut renewed = false;
        let mut throttled = 0;
        self.retries.request();
        let answer = loop {
            let answer = self.send(&url, token.as_ref()).await?;
            // Throttled: wait as asked (or back off) and try again, a few times.
            if let Some(wait) = http::throttle_wait(&answer, throttled, &self.retries) {
                throttled += 1;
                tracing::debug!(wait_ms = wait.as_millis() as u64, "throttled; waiting");
                tokio::time::sleep(wait).await;
                continue;
            }
            // A token the service no longer accepts (revoked, or expired
            // early): fetch a new one and try once more.
            if answer.status == StatusCode::UNAUTHORIZED
                && !renewed
                && let (Auth::Tokens(provider), Some(rejected)) = (&self.settings.auth, &token)
            {
                provider.invalidate(rejected).await;
                token = Some(provider.token().await?);
                renewed = true;
                tracing::debug!("access token refused; retrying once with a new one");
                continue;
            }
            break answer;
        };
        if answer.status == StatusCode::NO_CONTENT {
            return Ok((answer.status, Vec::new()));
        }
        // A top-level search answered 404: the store (or partition) is not
        // there. Below a study, 404 is about that study.
        if answer.status == StatusCode::NOT_FOUND && !path.contains('/') {
            return Err(ConnectorError::StoreNotFound);
        }
        if let Some(error) = http::status_error(answer.status) {
            return Err(error);
        }
        if answer.body.iter().all(u8::is_ascii_whitespace) {
            return Ok((answer.status, Vec::new()));
        }
        serde_json::from_slice::<Vec<DicomJson>>(&answer.body)
            .map(|rows| (answer.status, rows))
            .map_err(|_| ConnectorError::BadResponse)
    }

    fn url(&self, path: &str, params: &[(String, String)]) -> Result<Url, ConnectorError> {
        let mut text = self
            .settings
            .base_url
            .join(path)
            .map_err(|_| ConnectorError::Config("the DICOMweb URL is not valid".into()))?
            .to_string();
        for (index, (name, value)) in params.iter().enumerate() {
            text.push(if index == 0 { '?' } else { '&' });
            text.push_str(name);
            text.push('=');
            text.push_str(&self.settings.profile.encode_value(value));
        }
        Url::parse(&text)
            .map_err(|_| ConnectorError::Config("the DICOMweb URL is not valid".into()))
    }

    /// Decides what to ask the backend for a query: the study-level search,
    /// the series-level searches that answer modality and body part (which
    /// describe one series), and what the connector must check itself.
    /// Pushed-down filters are checked again locally wherever the returned
    /// attributes allow it: cheap, and it guards against lenient matching.
    fn plan(&self, query: &StudyQuery, first_page: bool) -> SearchPlan {
        // Study-level keys that both QIDO-RS levels accept.
        let mut shared = Vec::new();
        if let Some(range) = query.study_date {
            let from = range.from.map(format_date).unwrap_or_default();
            let to = range.to.map(format_date).unwrap_or_default();
            shared.push(("StudyDate".to_owned(), format!("{from}-{to}")));
        }
        if let Some(sex) = query.patient_sex
            && self.settings.profile.searches_patient_sex()
        {
            shared.push(("PatientSex".to_owned(), sex.code().to_owned()));
        }
        let uids = query.study_uids.len();
        if uids == 1 || (uids > 1 && uids <= MAX_UIDS_IN_URL && self.uid_lists()) {
            let list: Vec<&str> = query.study_uids.iter().map(String::as_str).collect();
            shared.push(("StudyInstanceUID".to_owned(), list.join(",")));
        }
        let mut study = vec![("includefield".to_owned(), include_fields(STUDY_FIELDS))];
        study.extend(shared.iter().cloned());
        if let Some(needle) = &query.description
            && let Some(pattern) = self.text_pattern(needle, TextMatch::Contains)
        {
            study.push(("StudyDescription".to_owned(), pattern));
        }
        let mut residual = query.filters_used();
        residual.remove(&FilterKind::BodyPart);

        let modalities: Vec<&str> = query.modalities.iter().map(|m| m.code()).collect();
        let listable = modalities.len() == 1 || (modalities.len() > 1 && self.modality_lists());
        // Where `ModalitiesInStudy` cannot be paged but a first page was
        // measured to hold the first matches: one study-level request.
        let first_page = (first_page
            && listable
            && query.body_part.is_none()
            && !self.pages_modalities_in_study())
        .then(|| self.modality_first_page())
        .flatten();
        let at_series_level = query.body_part.is_some()
            || (!modalities.is_empty()
                && !self.pages_modalities_in_study()
                && first_page.is_none());
        let mut series = Vec::new();
        if at_series_level {
            residual.remove(&FilterKind::Modality);
            let groups: Vec<Option<String>> = if modalities.is_empty() {
                vec![None]
            } else if self.modality_lists() {
                vec![Some(modalities.join(","))]
            } else {
                modalities.iter().map(|m| Some((*m).to_owned())).collect()
            };
            for group in groups {
                let mut params = shared.clone();
                params.push((
                    "includefield".to_owned(),
                    include_fields(&[
                        tags::STUDY_INSTANCE_UID,
                        tags::MODALITY,
                        tags::BODY_PART_EXAMINED,
                    ]),
                ));
                if let Some(group) = group {
                    params.push(("Modality".to_owned(), group));
                }
                if let Some(pattern) = query
                    .body_part
                    .as_ref()
                    .filter(|_| self.settings.profile.searches_body_part())
                    .and_then(|part| self.text_pattern(part, TextMatch::Exact))
                {
                    params.push(("BodyPartExamined".to_owned(), pattern));
                }
                series.push(params);
            }
        } else if listable {
            study.push(("ModalitiesInStudy".to_owned(), modalities.join(",")));
        }
        SearchPlan {
            study,
            series,
            residual,
            first_page,
        }
    }

    /// Runs the series-level searches; returns the matching studies' UIDs
    /// with the body parts of their matching series.
    async fn matching_series(
        &self,
        query: &StudyQuery,
        searches: &[Vec<(String, String)>],
    ) -> Result<(HashMap<String, BTreeSet<String>>, bool), ConnectorError> {
        let answers = futures::future::try_join_all(
            searches
                .iter()
                .map(|params| self.search_all("series", params, tags::SERIES_INSTANCE_UID)),
        )
        .await?;
        let mut truncated = false;
        // (study UID, series UID, body part) of series of a wanted modality.
        let mut candidates = Vec::new();
        for (rows, capped) in answers {
            truncated |= capped;
            for row in rows {
                let modality_ok = query.modalities.is_empty()
                    || row
                        .text(tags::MODALITY)
                        .and_then(|code| Modality::from_code(&code))
                        .is_some_and(|m| query.modalities.contains(&m));
                if modality_ok
                    && let (Some(study), Some(series)) = (
                        row.text(tags::STUDY_INSTANCE_UID),
                        row.text(tags::SERIES_INSTANCE_UID),
                    )
                {
                    let part = row.text(tags::BODY_PART_EXAMINED);
                    candidates.push((study, series, part));
                }
            }
        }
        if query.body_part.is_some() && !self.settings.profile.returns_series_body_part() {
            truncated |= self.read_body_parts(&mut candidates).await?;
        }
        let mut studies: HashMap<String, BTreeSet<String>> = HashMap::new();
        for (study, _, part) in candidates {
            let part = part.map(|p| p.to_ascii_uppercase());
            if query
                .body_part
                .as_ref()
                .is_none_or(|want| part.as_ref() == Some(want))
            {
                studies.entry(study).or_default().extend(part);
            }
        }
        Ok((studies, truncated))
    }

    /// Fills in the body parts of series found by a backend that does not
    /// return them at series level (Azure), from the metadata (WADO-RS) of
    /// one instance of each series: `BodyPartExamined` belongs to the
    /// General Series module, so every instance of a series carries the
    /// same value. At most [`MAX_BODY_PART_LOOKUPS`] series are read per
    /// search; the rest are dropped and the answer is reported truncated.
    async fn read_body_parts(
        &self,
        candidates: &mut Vec<(String, String, Option<String>)>,
    ) -> Result<bool, ConnectorError> {
        candidates.sort_unstable();
        candidates.dedup_by(|a, b| a.1 == b.1);
        let truncated = candidates.len() > MAX_BODY_PART_LOOKUPS;
        candidates.truncate(MAX_BODY_PART_LOOKUPS);
        let series: Vec<(String, String)> = candidates
            .iter()
            .map(|(study, series, _)| (study.clone(), series.clone()))
            .collect();
        let parts: Vec<Option<String>> = stream::iter(series)
            .map(|(study, series)| async move {
                let read = self.series_body_part(&study, &series);
                self.body_parts
                    .try_get_with(series.clone(), read)
                    .await
                    .map_err(|e| (*e).clone())
            })
            .buffered(self.settings.detail_concurrency.max(1))
            .try_collect()
            .await?;
        for (candidate, part) in candidates.iter_mut().zip(parts) {
            candidate.2 = part;
        }
        Ok(truncated)
    }

    /// The body part of one series, from its first instance's metadata.
    async fn series_body_part(
        &self,
        study: &str,
        series: &str,
    ) -> Result<Option<String>, ConnectorError> {
        let base = format!("studies/{}/series/{}", path_uid(study)?, path_uid(series)?);
        let first = self
            .get_json(
                &format!("{base}/instances"),
                &[("limit".into(), "1".into())],
            )
            .await?;
        let Some(instance) = first
            .first()
            .and_then(|row| row.text(tags::SOP_INSTANCE_UID))
        else {
            return Ok(None);
        };
        let metadata = self
            .get_json(
                &format!("{base}/instances/{}/metadata", path_uid(&instance)?),
                &[],
            )
            .await?;
        Ok(metadata
            .first()
            .and_then(|attributes| attributes.text(tags::BODY_PART_EXAMINED)))
    }

    /// Series and instances of many studies at once, where the backend was
    /// measured to match `StudyInstanceUID` lists: one series-level and one
    /// instance-level search per [`MAX_UIDS_IN_URL`] studies (paged as
    /// usual), not two requests per study.
    async fn load_series_in_bulk(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
        let mut uids: Vec<&str> = studies.iter().map(|s| s.uid.as_str()).collect();
        uids.sort_unstable();
        uids.dedup();
        let lists: Vec<String> = uids.chunks(MAX_UIDS_IN_URL).map(|c| c.join(",")).collect();
        let mut series_fields = SERIES_FIELDS.to_vec();
        series_fields.push(tags::STUDY_INSTANCE_UID);
        let mut instance_fields = INSTANCE_FIELDS.to_vec();
        instance_fields.push(tags::STUDY_INSTANCE_UID);
        let (series_fields, instance_fields) = (
            include_fields(&series_fields),
            include_fields(&instance_fields),
        );
        // (series level, or instance level; parameters)
        let searches: Vec<(bool, Vec<(String, String)>)> = lists
            .iter()
            .flat_map(|list| {
                [(true, &series_fields), (false, &instance_fields)].map(|(level, fields)| {
                    let params = vec![
                        ("StudyInstanceUID".to_owned(), list.clone()),
                        ("includefield".to_owned(), fields.clone()),
                    ];
                    (level, params)
                })
            })
            .collect();
        let answers: Vec<(bool, Vec<DicomJson>)> = stream::iter(searches)
            .map(|(series, params)| async move {
                let (level, key) = if series {
                    ("series", tags::SERIES_INSTANCE_UID)
                } else {
                    ("instances", tags::SOP_INSTANCE_UID)
                };
                let (rows, _) = self.search_all(level, &params, key).await?;
                Ok::<_, ConnectorError>((series, rows))
            })
            .buffered(self.settings.detail_concurrency.max(1))
            .try_collect()
            .await?;
        let mut by_study: HashMap<String, (Vec<DicomJson>, Vec<DicomJson>)> = HashMap::new();
        for (is_series, rows) in answers {
            for row in rows {
                let Some(study) = row.text(tags::STUDY_INSTANCE_UID) else {
                    continue;
                };
                let (series, instances) = by_study.entry(study).or_default();
                if is_series {
                    series.push(row);
                } else {
                    instances.push(row);
                }
            }
        }
        for study in studies.iter_mut() {
            let (series, instances) = by_study
                .get(&study.uid)
                .map(|(s, i)| (s.as_slice(), i.as_slice()))
                .unwrap_or_default();
            study.set_series(assemble_series(series, instances));
        }
        Ok(())
    }

    async fn series_of(&self, study_uid: &str) -> Result<Vec<Series>, ConnectorError> {
        let series_params = vec![("includefield".to_owned(), include_fields(SERIES_FIELDS))];
        let instance_params = vec![("includefield".to_owned(), include_fields(INSTANCE_FIELDS))];
        let study_uid = path_uid(study_uid)?;
        let series_path = format!("studies/{study_uid}/series");
        let instances_path = format!("studies/{study_uid}/instances");
        let ((series_rows, _), (instance_rows, _)) = futures::try_join!(
            self.search_all(&series_path, &series_params, tags::SERIES_INSTANCE_UID),
            self.search_all(&instances_path, &instance_params, tags::SOP_INSTANCE_UID),
        )?;
        Ok(assemble_series(&series_rows, &instance_rows))
    }
}

#[async_trait]
impl Connector for DicomWebConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Dicomweb
    }

    fn capabilities(&self) -> Capabilities {
        let profile = self.settings.profile;
        let mut native_filters = vec![FilterKind::StudyDate, FilterKind::StudyUid];
        if profile.searches_patient_sex() {
            native_filters.push(FilterKind::PatientSex);
        }
        if profile.searches_body_part() && self.text_pattern("x", TextMatch::Exact).is_some() {
            native_filters.push(FilterKind::BodyPart);
        }
        if self.modality_lists() {
            native_filters.push(FilterKind::Modality);
        }
        if self.text_pattern("x", TextMatch::Contains).is_some() {
            native_filters.push(FilterKind::Description);
        }
        native_filters.sort();
        let measured = *self.measured.read().unwrap_or_else(PoisonError::into_inner);
        Capabilities {
            native_filters,
            paging: PagingStyle::LimitOffset,
            max_page_size: Some(self.settings.profile.max_page_size()),
            max_results: self.max_results(),
            measured: measured.is_some(),
            probe: measured.map(|m| m.findings()).unwrap_or_default(),
        }
    }

    async fn check(&self) -> Result<Duration, ConnectorError> {
        let (measured, latency) = self.probe().await?;
        tracing::debug!(?measured, "DICOMweb capabilities measured");
        *self
            .measured
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(measured);
        Ok(latency)
    }

    async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError> {
        let mut plan = self.plan(query, true);
        let mut first_page = None;
        if let Some(limit) = plan.first_page {
            let mut params = plan.study.clone();
            params.push(("limit".into(), limit.to_string()));
            let rows = self.get_json("studies", &params).await?;
            if rows.len() < limit as usize {
                first_page = Some(rows);
            } else {
                // A full page: there may be more, and they cannot be paged.
                plan = self.plan(query, false);
            }
        }
        let (rows, truncated, matched) = if let Some(rows) = first_page {
            (rows, false, None)
        } else if plan.series.is_empty() {
            let (rows, truncated) = self
                .search_all("studies", &plan.study, tags::STUDY_INSTANCE_UID)
                .await?;
            (rows, truncated, None)
        } else {
            // Series first: usually far fewer studies match than the study-level
            // keys alone would return, so they are then fetched by UID.
            let (matched, series_truncated) = self.matching_series(query, &plan.series).await?;
            let (rows, truncated) = if matched.is_empty() {
                (Vec::new(), false)
            } else if matched.len()
                <= if self.uid_lists() {
                    MAX_STUDIES_BY_UID
                } else {
                    MAX_UIDS_IN_URL
                }
            {
                let mut uids: Vec<&String> = matched.keys().collect();
                uids.sort();
                let searches: Vec<Vec<(String, String)>> = uids
                    .chunks(if self.uid_lists() { MAX_UIDS_IN_URL } else { 1 })
                    .map(|chunk| {
                        let mut params: Vec<(String, String)> = plan
                            .study
                            .iter()
                            .filter(|(key, _)| key != "StudyInstanceUID")
                            .cloned()
                            .collect();
                        let list: Vec<&str> = chunk.iter().map(|uid| uid.as_str()).collect();
                        params.push(("StudyInstanceUID".to_owned(), list.join(",")));
                        params
                    })
                    .collect();
                let pages: Vec<(Vec<DicomJson>, bool)> = stream::iter(searches)
                    .map(|params| async move {
                        self.search_all("studies", &params, tags::STUDY_INSTANCE_UID)
                            .await
                    })
                    .buffered(4)
                    .try_collect()
                    .await?;
                let truncated = pages.iter().any(|(_, t)| *t);
                (
                    pages.into_iter().flat_map(|(rows, _)| rows).collect(),
                    truncated,
                )
            } else {
                self.search_all("studies", &plan.study, tags::STUDY_INSTANCE_UID)
                    .await?
            };
            (rows, truncated || series_truncated, Some(matched))
        };
        let mut seen = HashSet::new();
        let studies = rows
            .iter()
            .filter_map(Study::from_attributes)
            .filter(|study| seen.insert(study.uid.clone()))
            .filter_map(|mut study| {
                if let Some(matched) = &matched {
                    study.body_parts = matched.get(&study.uid)?.iter().cloned().collect();
                }
                query.matches_on(&study, &plan.residual).then_some(study)
            })
            .collect();
        Ok(SearchOutcome { studies, truncated })
    }

    async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
        if studies.len() > 1 && self.measured().uid_lists == Some(true) {
            return self.load_series_in_bulk(studies).await;
        }
        let uids: Vec<String> = studies.iter().map(|study| study.uid.clone()).collect();
        let loaded: Vec<Vec<Series>> = stream::iter(
            uids.into_iter()
                .map(|uid| async move { self.series_of(&uid).await }),
        )
        .buffered(self.settings.detail_concurrency.max(1))
        .try_collect()
        .await?;
        for (study, series) in studies.iter_mut().zip(loaded) {
            study.set_series(series);
        }
        Ok(())
    }
}

/// A UID a backend returned, checked before it goes into a request path
/// (digits and dots, at most 64 characters: PS3.5 9.1), so a hostile
/// answer cannot steer a request elsewhere on the partner's server.
fn path_uid(uid: &str) -> Result<&str, ConnectorError> {
    let valid =
        !uid.is_empty() && uid.len() <= 64 && uid.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    valid.then_some(uid).ok_or(ConnectorError::BadResponse)
}

fn include_fields(fields: &[Tag]) -> String {
    fields
        .iter()
        .map(|tag| tag.json_key().to_string())
        .collect::<Vec<_>>()
        .join(",")
}

impl DicomWebConnector {
    /// Sends one GET with the connector's credentials (`token` for
    /// [`Auth::Tokens`]). A pooled keep-alive connection can be closed by
    /// the server just as it is reused; the idle timeout keeps that rare
    /// (see `Profile::idle_timeout`) and the GET is retried when it happens.
    async fn send(
        &self,
        url: &Url,
        token: Option<&Secret>,
    ) -> Result<http::Answer, ConnectorError> {
        let aws = match &self.settings.auth {
            Auth::SigV4 { credentials, .. } => Some(credentials.credentials().await?),
            _ => None,
        };
        http::send_idempotent(&self.retries, || {
            let request = self
                .client
                .get(url.clone())
                .header(reqwest::header::ACCEPT, "application/dicom+json");
            match (&self.settings.auth, token, &aws) {
                (Auth::Basic { username, password }, _, _) => {
                    request.basic_auth(username, Some(password.expose()))
                }
                (Auth::Bearer { token }, _, _) | (Auth::Tokens(_), Some(token), _) => {
                    request.bearer_auth(token.expose())
                }
                (
                    Auth::SigV4 {
                        region, service, ..
                    },
                    _,
                    Some(credentials),
                ) => http::sigv4_signed(request, "GET", url, b"", credentials, region, service),
                _ => request,
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::path_uid;

    #[test]
    fn uids_from_a_backend_cannot_steer_a_request_path() {
        assert_eq!(path_uid("1.2.840.10008.1").unwrap(), "1.2.840.10008.1");
        for hostile in [
            "",
            "../../admin",
            "1.2/../3",
            "1.2?x=1",
            "1.2%2F",
            &"1".repeat(65),
        ] {
            assert!(path_uid(hostile).is_err(), "{hostile}");
        }
    }
}
