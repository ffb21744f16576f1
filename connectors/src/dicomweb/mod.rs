//! A DICOMweb QIDO-RS connector.
//!
//! Searches at study level with what the backend can filter pushed down,
//! asks series level where a filter needs it (body part), filters the rest
//! after fetching, and pages with `limit`/`offset` until the backend has no
//! more — never trusting a short page to mean the end, since some backends
//! cap pages silently. Backend differences live in [`Profile`].

mod profile;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt, stream};
use meshgate_schema::dicom::{DicomAttributes, Tag, format_date, tags};
use meshgate_schema::study::assemble_series;
use meshgate_schema::{
    Capabilities, ConnectorKind, FilterKind, PagingStyle, Series, Study, StudyQuery,
};
use reqwest::StatusCode;
use serde_json::{Map, Value};

use crate::{Connector, ConnectorError, SearchOutcome, Secret};
pub use profile::Profile;
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
}

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
/// More UIDs than this are filtered after fetching instead of in the URL.
const MAX_UIDS_IN_URL: usize = 100;

impl DicomWebConnector {
    pub fn new(mut settings: DicomWebSettings) -> Result<DicomWebConnector, ConnectorError> {
        if !settings.base_url.path().ends_with('/') {
            let path = format!("{}/", settings.base_url.path());
            settings.base_url.set_path(&path);
        }
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
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
        })
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
        let cap = self.max_results();
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
            offset = offset.saturating_add(u32::try_from(page.len()).unwrap_or(u32::MAX));
            for row in page {
                // Rows without the key cannot be de-duplicated or used.
                if let Some(uid) = row.text(key)
                    && seen.insert(uid)
                {
                    rows.push(row);
                }
            }
        }
    }

    /// One QIDO-RS request; `204` and `200 []` both mean no rows.
    async fn get_json(
        &self,
        path: &str,
        params: &[(String, String)],
    ) -> Result<Vec<DicomJson>, ConnectorError> {
        let url = self.url(path, params)?;
        let mut request = self
            .client
            .get(url)
            .header(reqwest::header::ACCEPT, "application/dicom+json");
        request = match &self.settings.auth {
            Auth::None => request,
            Auth::Basic { username, password } => {
                request.basic_auth(username, Some(password.expose()))
            }
            Auth::Bearer { token } => request.bearer_auth(token.expose()),
        };
        let response = request.send().await.map_err(transport_error)?;
        match response.status() {
            StatusCode::NO_CONTENT => return Ok(Vec::new()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ConnectorError::Unauthorized(response.status().as_u16()));
            }
            status if !status.is_success() => {
                return Err(ConnectorError::UpstreamStatus(status.as_u16()));
            }
            _ => {}
        }
        let body = response.bytes().await.map_err(transport_error)?;
        if body.iter().all(u8::is_ascii_whitespace) {
            return Ok(Vec::new());
        }
        serde_json::from_slice::<Vec<DicomJson>>(&body).map_err(|_| ConnectorError::BadResponse)
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

    /// The study-level parameters for what this backend filters natively,
    /// and the filter kinds the connector must check itself. Pushed-down
    /// filters are checked again locally where the returned attributes allow
    /// it (cheap, and it guards against lenient backend matching); body part
    /// is answered exactly by [`Self::studies_with_body_part`].
    fn study_params(&self, query: &StudyQuery) -> (Vec<(String, String)>, BTreeSet<FilterKind>) {
        let profile = self.settings.profile;
        let mut params = vec![("includefield".to_owned(), include_fields(STUDY_FIELDS))];
        let mut residual = query.filters_used();
        residual.remove(&FilterKind::BodyPart);
        if let Some(range) = query.study_date {
            let from = range.from.map(format_date).unwrap_or_default();
            let to = range.to.map(format_date).unwrap_or_default();
            params.push(("StudyDate".into(), format!("{from}-{to}")));
        }
        if let Some(sex) = query.patient_sex {
            params.push(("PatientSex".into(), sex.code().into()));
        }
        if let Some(list) = self.study_level_modalities(query) {
            params.push(("ModalitiesInStudy".into(), list));
        }
        if !query.study_uids.is_empty() && query.study_uids.len() <= MAX_UIDS_IN_URL {
            let list: Vec<&str> = query.study_uids.iter().map(String::as_str).collect();
            params.push(("StudyInstanceUID".into(), list.join(",")));
        }
        if let Some(needle) = &query.description
            && let Some(pattern) = profile.contains_pattern(needle)
        {
            params.push(("StudyDescription".into(), pattern));
        }
        (params, residual)
    }

    /// `ModalitiesInStudy` for the study-level search, when the backend
    /// can page through it.
    fn study_level_modalities(&self, query: &StudyQuery) -> Option<String> {
        let profile = self.settings.profile;
        let pushable = match query.modalities.len() {
            0 => false,
            1 => profile.pages_modalities_in_study(),
            _ => profile.pages_modalities_in_study() && profile.modality_lists(),
        };
        pushable.then(|| modality_list(query))
    }

    /// Series-level searches that narrow the study list: body part always
    /// (a series attribute), modality where the study level cannot page it.
    /// Each yields the UIDs of studies with a matching series.
    fn series_constraints(&self, query: &StudyQuery) -> Vec<(Tag, String)> {
        let profile = self.settings.profile;
        let mut constraints = Vec::new();
        if let Some(part) = &query.body_part {
            constraints.push((tags::BODY_PART_EXAMINED, part.clone()));
        }
        if !query.modalities.is_empty()
            && self.study_level_modalities(query).is_none()
            && (query.modalities.len() == 1 || profile.modality_lists())
        {
            constraints.push((tags::MODALITY, modality_list(query)));
        }
        constraints
    }

    /// The UIDs of studies with a series whose `tag` matches `value` (a
    /// comma-separated list for modality; exactly, for body part).
    async fn studies_with_series(
        &self,
        tag: Tag,
        value: &str,
    ) -> Result<(HashSet<String>, bool), ConnectorError> {
        let exact = tag == tags::BODY_PART_EXAMINED;
        let pattern = if exact {
            self.settings.profile.exact_pattern(value)
        } else {
            value.to_owned()
        };
        let params = vec![
            (keyword(tag).to_owned(), pattern),
            (
                "includefield".to_owned(),
                include_fields(&[tags::STUDY_INSTANCE_UID, tag]),
            ),
        ];
        let (rows, truncated) = self
            .search_all("series", &params, tags::SERIES_INSTANCE_UID)
            .await?;
        let studies = rows
            .iter()
            .filter(|row| {
                !exact
                    || row
                        .text(tag)
                        .is_some_and(|found| found.eq_ignore_ascii_case(value))
            })
            .filter_map(|row| row.text(tags::STUDY_INSTANCE_UID))
            .collect();
        Ok((studies, truncated))
    }

    async fn series_of(&self, study_uid: &str) -> Result<Vec<Series>, ConnectorError> {
        let series_params = vec![("includefield".to_owned(), include_fields(SERIES_FIELDS))];
        let instance_params = vec![("includefield".to_owned(), include_fields(INSTANCE_FIELDS))];
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
        let mut native_filters = vec![
            FilterKind::StudyDate,
            FilterKind::PatientSex,
            FilterKind::StudyUid,
            FilterKind::BodyPart,
        ];
        let profile = self.settings.profile;
        if profile.modality_lists() {
            native_filters.push(FilterKind::Modality);
        }
        if profile.contains_pattern("x").is_some() {
            native_filters.push(FilterKind::Description);
        }
        native_filters.sort();
        Capabilities {
            native_filters,
            paging: PagingStyle::LimitOffset,
            max_page_size: Some(self.settings.profile.max_page_size()),
            max_results: self.max_results(),
        }
    }

    async fn search(&self, query: &StudyQuery) -> Result<SearchOutcome, ConnectorError> {
        let (params, residual) = self.study_params(query);
        let constraints = self.series_constraints(query);
        let studies = self.search_all("studies", &params, tags::STUDY_INSTANCE_UID);
        let narrowing = futures::future::try_join_all(
            constraints
                .iter()
                .map(|(tag, value)| self.studies_with_series(*tag, value)),
        );
        let ((rows, mut truncated), narrowing) = futures::try_join!(studies, narrowing)?;
        truncated |= narrowing.iter().any(|(_, t)| *t);
        let studies = rows
            .iter()
            .filter_map(Study::from_attributes)
            .filter(|study| narrowing.iter().all(|(uids, _)| uids.contains(&study.uid)))
            .map(|mut study| {
                if let Some(part) = &query.body_part {
                    study.body_parts = vec![part.clone()];
                }
                study
            })
            .filter(|study| query.matches_on(study, &residual))
            .collect();
        Ok(SearchOutcome { studies, truncated })
    }

    async fn load_series(&self, studies: &mut [Study]) -> Result<(), ConnectorError> {
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

fn modality_list(query: &StudyQuery) -> String {
    query
        .modalities
        .iter()
        .map(|m| m.code())
        .collect::<Vec<_>>()
        .join(",")
}

/// The DICOM keyword of an attribute used as a series-level constraint.
fn keyword(tag: Tag) -> &'static str {
    if tag == tags::BODY_PART_EXAMINED {
        "BodyPartExamined"
    } else {
        "Modality"
    }
}

fn include_fields(fields: &[Tag]) -> String {
    fields
        .iter()
        .map(|tag| tag.json_key())
        .collect::<Vec<_>>()
        .join(",")
}

/// Transport failures, described without the URL (it carries query values).
fn transport_error(error: reqwest::Error) -> ConnectorError {
    if error.is_timeout() {
        ConnectorError::Unreachable("timed out")
    } else if error.is_connect() {
        ConnectorError::Unreachable("connection failed")
    } else if error.is_body() || error.is_decode() {
        ConnectorError::Unreachable("response interrupted")
    } else {
        ConnectorError::Unreachable("request failed")
    }
}
