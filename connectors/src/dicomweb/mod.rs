//! A DICOMweb QIDO-RS connector.
//!
//! Searches at study level with what the backend can filter pushed down,
//! asks series level where a filter needs it (body part), filters the rest
//! after fetching, and pages with `limit`/`offset` until the backend has no
//! more — never trusting a short page to mean the end, since some backends
//! cap pages silently. Backend differences live in [`Profile`].

mod profile;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
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
use crate::sigv4::{self, Scope};
use crate::token::TokenProvider;
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
        let mut repeated_pages = 0;
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
            let before = rows.len();
            for row in page {
                // Rows without the key cannot be de-duplicated or used.
                if let Some(uid) = row.text(key)
                    && seen.insert(uid)
                {
                    rows.push(row);
                }
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
        let url = self.url(path, params)?;
        let mut token = match &self.settings.auth {
            Auth::Tokens(provider) => Some(provider.token().await?),
            _ => None,
        };
        let mut renewed = false;
        let mut throttled = 0;
        let (status, body) = loop {
            let answer = self.send(&url, token.as_ref()).await?;
            // Throttled: wait as asked (or back off) and try again, a few times.
            if answer.0 == StatusCode::TOO_MANY_REQUESTS && throttled + 1 < THROTTLED_ATTEMPTS {
                let wait = answer.1.unwrap_or(Duration::from_millis(200 << throttled));
                if wait <= MAX_RETRY_AFTER {
                    throttled += 1;
                    tracing::debug!(wait_ms = wait.as_millis() as u64, "throttled; waiting");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            // A token the service no longer accepts (revoked, or expired
            // early): fetch a new one and try once more.
            if answer.0 == StatusCode::UNAUTHORIZED
                && !renewed
                && let (Auth::Tokens(provider), Some(rejected)) = (&self.settings.auth, &token)
            {
                provider.invalidate(rejected).await;
                token = Some(provider.token().await?);
                renewed = true;
                tracing::debug!("access token refused; retrying once with a new one");
                continue;
            }
            break (answer.0, answer.2);
        };
        match status {
            StatusCode::NO_CONTENT => return Ok(Vec::new()),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                return Err(ConnectorError::Unauthorized(status.as_u16()));
            }
            StatusCode::TOO_MANY_REQUESTS => return Err(ConnectorError::Throttled),
            status if !status.is_success() => {
                return Err(ConnectorError::UpstreamStatus(status.as_u16()));
            }
            _ => {}
        }
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

    /// Decides what to ask the backend for a query: the study-level search,
    /// the series-level searches that answer modality and body part (which
    /// describe one series), and what the connector must check itself.
    /// Pushed-down filters are checked again locally wherever the returned
    /// attributes allow it: cheap, and it guards against lenient matching.
    fn plan(&self, query: &StudyQuery) -> SearchPlan {
        let profile = self.settings.profile;
        // Study-level keys that both QIDO-RS levels accept.
        let mut shared = Vec::new();
        if let Some(range) = query.study_date {
            let from = range.from.map(format_date).unwrap_or_default();
            let to = range.to.map(format_date).unwrap_or_default();
            shared.push(("StudyDate".to_owned(), format!("{from}-{to}")));
        }
        if let Some(sex) = query.patient_sex {
            shared.push(("PatientSex".to_owned(), sex.code().to_owned()));
        }
        if !query.study_uids.is_empty() && query.study_uids.len() <= MAX_UIDS_IN_URL {
            let list: Vec<&str> = query.study_uids.iter().map(String::as_str).collect();
            shared.push(("StudyInstanceUID".to_owned(), list.join(",")));
        }
        let mut study = vec![("includefield".to_owned(), include_fields(STUDY_FIELDS))];
        study.extend(shared.iter().cloned());
        if let Some(needle) = &query.description
            && let Some(pattern) = profile.contains_pattern(needle)
        {
            study.push(("StudyDescription".to_owned(), pattern));
        }
        let mut residual = query.filters_used();
        residual.remove(&FilterKind::BodyPart);

        let modalities: Vec<&str> = query.modalities.iter().map(|m| m.code()).collect();
        let at_series_level = query.body_part.is_some()
            || (!modalities.is_empty() && !profile.pages_modalities_in_study());
        let mut series = Vec::new();
        if at_series_level {
            residual.remove(&FilterKind::Modality);
            let groups: Vec<Option<String>> = if modalities.is_empty() {
                vec![None]
            } else if profile.modality_lists() {
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
                if let Some(part) = &query.body_part {
                    params.push(("BodyPartExamined".to_owned(), profile.exact_pattern(part)));
                }
                series.push(params);
            }
        } else if modalities.len() == 1 || (modalities.len() > 1 && profile.modality_lists()) {
            study.push(("ModalitiesInStudy".to_owned(), modalities.join(",")));
        }
        SearchPlan {
            study,
            series,
            residual,
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
        let mut studies: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut truncated = false;
        for (rows, capped) in answers {
            truncated |= capped;
            for row in rows {
                let modality_ok = query.modalities.is_empty()
                    || row
                        .text(tags::MODALITY)
                        .and_then(|code| Modality::from_code(&code))
                        .is_some_and(|m| query.modalities.contains(&m));
                let part = row
                    .text(tags::BODY_PART_EXAMINED)
                    .map(|p| p.to_ascii_uppercase());
                let part_ok = query
                    .body_part
                    .as_ref()
                    .is_none_or(|want| part.as_ref() == Some(want));
                if modality_ok
                    && part_ok
                    && let Some(uid) = row.text(tags::STUDY_INSTANCE_UID)
                {
                    studies.entry(uid).or_default().extend(part);
                }
            }
        }
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
        let plan = self.plan(query);
        let (rows, truncated, matched) = if plan.series.is_empty() {
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
            } else if matched.len() <= MAX_STUDIES_BY_UID {
                let mut uids: Vec<&String> = matched.keys().collect();
                uids.sort();
                let searches: Vec<Vec<(String, String)>> = uids
                    .chunks(MAX_UIDS_IN_URL)
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

fn include_fields(fields: &[Tag]) -> String {
    fields
        .iter()
        .map(|tag| tag.json_key())
        .collect::<Vec<_>>()
        .join(",")
}

impl DicomWebConnector {
    /// Sends one GET with the connector's credentials (`token` for
    /// [`Auth::Tokens`]). A pooled keep-alive connection can be closed by
    /// the server just as it is reused, and several pooled connections can
    /// go stale together. The idle timeout keeps that rare (see
    /// `Profile::idle_timeout`); what remains gets up to
    /// `TRANSPORT_ATTEMPTS` tries of this idempotent GET. Timeouts are not
    /// retried: the deadline is the caller's.
    async fn send(&self, url: &Url, token: Option<&Secret>) -> Result<Answer, ConnectorError> {
        let aws = match &self.settings.auth {
            Auth::SigV4 {
                credentials,
                region,
                service,
            } => Some((credentials.credentials().await?, region, *service)),
            _ => None,
        };
        let request = || {
            let request = self
                .client
                .get(url.clone())
                .header(reqwest::header::ACCEPT, "application/dicom+json");
            match (&self.settings.auth, token) {
                (Auth::Basic { username, password }, _) => {
                    request.basic_auth(username, Some(password.expose()))
                }
                (Auth::Bearer { token }, _) | (Auth::Tokens(_), Some(token)) => {
                    request.bearer_auth(token.expose())
                }
                (Auth::SigV4 { .. }, _) => match &aws {
                    // Signed per attempt: the signature carries the time.
                    Some((credentials, region, service)) => sigv4::sign(
                        "GET",
                        url,
                        &[],
                        b"",
                        credentials,
                        Scope {
                            region,
                            service,
                            time: time::OffsetDateTime::now_utc(),
                        },
                    )
                    .into_iter()
                    .fold(request, |request, (name, value)| {
                        request.header(name, value)
                    }),
                    None => request,
                },
                _ => request,
            }
        };
        let mut attempt = 1;
        loop {
            match fetch(request()).await {
                Ok(answer) => return Ok(answer),
                Err(error) if !error.is_timeout() && attempt < TRANSPORT_ATTEMPTS => {
                    tracing::debug!(
                        kind = transport_kind(&error),
                        attempt,
                        "retrying a QIDO-RS request"
                    );
                    attempt += 1;
                }
                Err(error) => return Err(transport_error(error)),
            }
        }
    }
}

/// How often one QIDO-RS request is tried when the transport fails.
const TRANSPORT_ATTEMPTS: u32 = 3;

/// One answer: status, `Retry-After` (seconds form) and the whole body.
type Answer = (StatusCode, Option<Duration>, bytes::Bytes);

/// Sends one request and reads its whole body.
async fn fetch(request: reqwest::RequestBuilder) -> Result<Answer, reqwest::Error> {
    let response = request.send().await?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    Ok((status, retry_after, response.bytes().await?))
}

/// How often a throttled (429) request is tried.
const THROTTLED_ATTEMPTS: u32 = 4;
/// The longest `Retry-After` waited for; longer ones end the search (the
/// partner's deadline would pass anyway).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// Transport failures, described without the URL (it carries query values).
fn transport_error(error: reqwest::Error) -> ConnectorError {
    ConnectorError::Unreachable(transport_kind(&error))
}

fn transport_kind(error: &reqwest::Error) -> &'static str {
    if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "connection failed"
    } else if error.is_body() || error.is_decode() {
        "response interrupted"
    } else {
        "request failed"
    }
}
