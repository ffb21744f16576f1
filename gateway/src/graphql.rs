//! The GraphQL resolvers, and the one place errors get their stable codes.

use async_graphql::{
    Context, EmptyMutation, EmptySubscription, ErrorExtensions, ID, Json, Object, Schema,
};
use meshgate_schema::api::{
    CohortCount, ImagingStudyConnection, ImagingStudyNode, PageInfo, Partner, StudyFilter,
};
use meshgate_schema::fhir::{imaging_study, started_text};
use meshgate_schema::{QueryError, StudyQuery};

use crate::cursor::{self, CursorError};
use crate::federation::{Federation, SortKey};
use crate::request::{AuditedAccess, AuditedPartner, RequestContext};

/// Studies per page unless `first` says otherwise.
pub const DEFAULT_PAGE_SIZE: i32 = 20;
/// Most studies one page may ask for.
pub const MAX_PAGE_SIZE: i32 = 500;

pub type MeshgateSchema = Schema<QueryRoot, EmptyMutation, EmptySubscription>;

/// Builds the schema over a federation of partners.
pub fn schema(federation: Federation) -> MeshgateSchema {
    Schema::build(QueryRoot, EmptyMutation, EmptySubscription)
        .data(federation)
        .finish()
}

/// The committed SDL text for this schema.
pub fn sdl() -> String {
    Schema::build(QueryRoot, EmptyMutation, EmptySubscription)
        .finish()
        .sdl()
}

/// Errors a client can see. Each has a stable `extensions.code`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidFilter(#[from] QueryError),
    #[error("first must be between 1 and {MAX_PAGE_SIZE}, got {0}")]
    InvalidPageSize(i32),
    #[error("{0}")]
    InvalidCursor(#[from] CursorError),
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidFilter(_) => QueryError::CODE,
            ApiError::InvalidPageSize(_) => "INVALID_PAGE_SIZE",
            ApiError::InvalidCursor(_) => "INVALID_CURSOR",
            ApiError::Internal => "INTERNAL_SERVER_ERROR",
        }
    }
}

// Not `From<ApiError>`: async-graphql converts anything `Display` with a
// blanket impl that drops the code, so resolvers convert explicitly, once.
impl ErrorExtensions for ApiError {
    fn extend(&self) -> async_graphql::Error {
        let code = self.code();
        async_graphql::Error::new(self.to_string()).extend_with(|_, e| e.set("code", code))
    }
}

#[derive(Debug)]
pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// Studies matching the filter across partners, newest first, a page at
    /// a time, with each partner's status.
    async fn imaging_studies(
        &self,
        ctx: &Context<'_>,
        filter: Option<StudyFilter>,
        #[graphql(default_with = "DEFAULT_PAGE_SIZE")] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<ImagingStudyConnection> {
        Self::imaging_studies_page(ctx, filter, first, after)
            .await
            .map_err(|e| e.extend())
    }

    /// How many studies match the filter, in total and per partner.
    async fn cohort_count(
        &self,
        ctx: &Context<'_>,
        filter: Option<StudyFilter>,
    ) -> async_graphql::Result<CohortCount> {
        Self::cohort(ctx, filter).await.map_err(|e| e.extend())
    }

    /// The consortium's partners and what their connectors can do.
    async fn partners(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Partner>> {
        let federation = federation(ctx).map_err(|e| e.extend())?;
        Ok(federation
            .partners()
            .iter()
            .map(|p| Partner {
                id: ID(p.id.clone()),
                name: p.name.clone(),
                connector_kind: p.connector.kind(),
                capabilities: p.connector.capabilities(),
            })
            .collect())
    }
}

fn federation<'a>(ctx: &Context<'a>) -> Result<&'a Federation, ApiError> {
    ctx.data::<Federation>().map_err(|_| ApiError::Internal)
}

impl QueryRoot {
    fn query(federation: &Federation, filter: Option<StudyFilter>) -> Result<StudyQuery, ApiError> {
        let query = StudyQuery::try_from(filter.unwrap_or_default())?;
        if let Some(unknown) = query
            .partners
            .iter()
            .find(|id| !federation.partners().iter().any(|p| &p.id == *id))
        {
            return Err(QueryError::UnknownPartner(unknown.clone()).into());
        }
        Ok(query)
    }

    async fn imaging_studies_page(
        ctx: &Context<'_>,
        filter: Option<StudyFilter>,
        first: i32,
        after: Option<String>,
    ) -> Result<ImagingStudyConnection, ApiError> {
        let federation = federation(ctx)?;
        let query = Self::query(federation, filter)?;
        if !(1..=MAX_PAGE_SIZE).contains(&first) {
            return Err(ApiError::InvalidPageSize(first));
        }
        let fingerprint = query.fingerprint();
        let after = after
            .map(|c| cursor::decode(&c, &fingerprint))
            .transpose()?;
        let first = usize::try_from(first).map_err(|_| ApiError::InvalidPageSize(first))?;

        let page = federation.page(&query, first, after.as_ref()).await;
        if let Ok(request) = ctx.data::<RequestContext>() {
            request.note(AuditedAccess {
                field: "imagingStudies",
                filter_fingerprint: fingerprint.clone(),
                partners: page
                    .statuses
                    .iter()
                    .map(AuditedPartner::from_status)
                    .collect(),
            });
        }
        let end_cursor = page.studies.last().map(|found| {
            cursor::encode(&SortKey::of(&found.partner.id, &found.study), &fingerprint)
        });
        let nodes = page
            .studies
            .iter()
            .map(|found| {
                let options = found.partner.mapping;
                let study = &found.study;
                Ok(ImagingStudyNode {
                    study_instance_uid: study.uid.clone(),
                    partner: ID(found.partner.id.clone()),
                    connector_kind: found.partner.connector.kind(),
                    started: started_text(study, &options),
                    modalities: study.modalities.clone(),
                    body_parts: study.body_parts.clone(),
                    description: study.description.clone(),
                    number_of_series: study.number_of_series,
                    number_of_instances: study.number_of_instances,
                    fhir: Json(imaging_study(study, &options).map_err(|error| {
                        tracing::error!(%error, "FHIR mapping failed");
                        ApiError::Internal
                    })?),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        Ok(ImagingStudyConnection {
            nodes,
            page_info: PageInfo {
                has_next_page: page.has_next_page,
                end_cursor,
            },
            total_count: page.total,
            partners: page.statuses,
        })
    }

    async fn cohort(
        ctx: &Context<'_>,
        filter: Option<StudyFilter>,
    ) -> Result<CohortCount, ApiError> {
        let federation = federation(ctx)?;
        let query = Self::query(federation, filter)?;
        let (total, partners) = federation.count(&query).await;
        if let Ok(request) = ctx.data::<RequestContext>() {
            request.note(AuditedAccess {
                field: "cohortCount",
                filter_fingerprint: query.fingerprint(),
                partners: partners.iter().map(AuditedPartner::from_status).collect(),
            });
        }
        let complete = partners
            .iter()
            .all(|s| s.status == meshgate_schema::PartnerOutcome::Ok);
        Ok(CohortCount {
            total,
            complete,
            partners,
        })
    }
}
