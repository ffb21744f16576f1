//! The GraphQL resolvers, and the one place errors get their stable codes.

use async_graphql::{
    Context, EmptyMutation, EmptySubscription, ErrorExtensions, ID, Json, Object, Schema,
};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use meshgate_policies::deid::{AGE_CAP, ShiftBasis};
use meshgate_policies::{AdminAction, Authorizer, Deidentifier, MasterKey};
use meshgate_schema::api::{
    CohortCount, Deidentification, ImagingStudyConnection, ImagingStudyNode, PageInfo, Partner,
    PatientSummary, StudyFilter,
};
use meshgate_schema::fhir::{imaging_study, started_text};
use meshgate_schema::principal::ActiveSnapshot;
use meshgate_schema::{Principal, QueryError, StudyQuery};

use crate::audit::view::{AuditEvent, AuditEventConnection, AuditFilter, AuditOutcome};
use crate::audit::{AuditLog, Scope, Selection};
use crate::budget::QueryBudgetUse;
use crate::config::ServerProfile;
use crate::cursor::{self, Binding, CursorError};
use crate::federation::{Federation, Grants, SortKey};
use crate::partner::{FoundStudy, Grant};
use crate::request::{AuditedAccess, AuditedPartner, OverBudget, RequestContext};

/// Studies per page unless `first` says otherwise.
pub const DEFAULT_PAGE_SIZE: i32 = 20;
/// Most studies one page may ask for.
pub const MAX_PAGE_SIZE: i32 = 500;

pub type MeshgateSchema = Schema<QueryRoot, EmptyMutation, EmptySubscription>;

/// What the resolvers work with.
#[derive(Debug, Clone)]
pub struct Services {
    pub federation: Federation,
    pub authorizer: Arc<Authorizer>,
    pub pseudonym_key: MasterKey,
    pub audit: Arc<AuditLog>,
    /// One permit per study being fetched and answered (`[server]
    /// max_studies_in_flight`).
    pub studies_in_flight: Arc<tokio::sync::Semaphore>,
}

/// Builds the schema. Each request is executed with the [`Services`] of the
/// snapshot it runs on (and its [`RequestContext`]). In production the API
/// does not describe itself: no introspection, and no "did you mean"
/// suggestions in validation errors.
pub fn schema(profile: ServerProfile) -> MeshgateSchema {
    let builder = Schema::build(QueryRoot, EmptyMutation, EmptySubscription);
    match profile {
        ServerProfile::Production => builder.disable_introspection().disable_suggestions(),
        ServerProfile::Development => builder,
    }
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
    #[error("project '{0}' is not a registered consortium project")]
    UnknownProject(String),
    #[error("a valid bearer token is required")]
    Unauthenticated,
    #[error("internal error")]
    Internal,
    #[error("the audit log cannot be read; try again later")]
    AuditUnavailable,
    #[error("{0}")]
    OverBudget(#[from] OverBudget),
    #[error("the gateway is answering as many studies as it can hold; try again shortly")]
    Overloaded,
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::InvalidFilter(_) => QueryError::CODE,
            ApiError::InvalidPageSize(_) => "INVALID_PAGE_SIZE",
            ApiError::InvalidCursor(_) => "INVALID_CURSOR",
            ApiError::UnknownProject(_) => "UNKNOWN_PROJECT",
            ApiError::Unauthenticated => "UNAUTHENTICATED",
            ApiError::Internal => "INTERNAL_SERVER_ERROR",
            ApiError::AuditUnavailable => "AUDIT_UNAVAILABLE",
            ApiError::OverBudget(_) => "REQUEST_BUDGET_EXCEEDED",
            ApiError::Overloaded => "OVERLOADED",
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
    /// a time, with each partner's status. `project` is the approved research
    /// project the query serves; each partner's policies decide what it
    /// discloses for it.
    async fn imaging_studies(
        &self,
        ctx: &Context<'_>,
        project: String,
        filter: Option<StudyFilter>,
        #[graphql(default_with = "DEFAULT_PAGE_SIZE")] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<ImagingStudyConnection> {
        Self::imaging_studies_page(ctx, project, filter, first, after)
            .await
            .map_err(|e| e.extend())
    }

    /// How many studies match the filter, per partner as each may disclose
    /// it, and in total.
    async fn cohort_count(
        &self,
        ctx: &Context<'_>,
        project: String,
        filter: Option<StudyFilter>,
    ) -> async_graphql::Result<CohortCount> {
        Self::cohort(ctx, project, filter)
            .await
            .map_err(|e| e.extend())
    }

    /// Audited operations the caller may see, newest first: governance
    /// every one; a partner admin those that involved its partner (Cedar
    /// action `ViewAudit` per partner); everyone their own.
    async fn audit_events(
        &self,
        ctx: &Context<'_>,
        filter: Option<AuditFilter>,
        #[graphql(default = 50)] first: i32,
        after: Option<String>,
    ) -> async_graphql::Result<AuditEventConnection> {
        Self::audit_page(ctx, filter.unwrap_or_default(), first, after)
            .await
            .map_err(|e| e.extend())
    }

    /// Query budgets in use at or above `atLeast` (a fraction of their
    /// limit; default 0.8), fullest first: governance sees every caller's; a
    /// partner admin those at its partner; everyone their own.
    async fn query_budgets(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 0.8)] at_least: f64,
    ) -> async_graphql::Result<Vec<QueryBudgetUse>> {
        let principal = principal(ctx).map_err(|e| e.extend())?;
        let services = services(ctx).map_err(|e| e.extend())?;
        let scope = audit_scope(services, principal);
        Ok(services
            .federation
            .budgets()
            .in_use(at_least)
            .into_iter()
            .filter(|usage| {
                scope.as_ref().is_none_or(|scope| {
                    (usage.issuer == principal.issuer && usage.subject == principal.subject)
                        || scope.partners.contains(&usage.partner)
                })
            })
            .collect())
    }

    /// The caller, as the gateway sees them.
    async fn me(&self, ctx: &Context<'_>) -> async_graphql::Result<Principal> {
        principal(ctx).cloned().map_err(|e| e.extend())
    }

    /// The consortium's partners and what their connectors can do.
    async fn partners(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<Partner>> {
        principal(ctx).map_err(|e| e.extend())?;
        let federation = &services(ctx).map_err(|e| e.extend())?.federation;
        let snapshot = ctx
            .data_opt::<ActiveSnapshot>()
            .map(|s| s.0.clone())
            .unwrap_or_default();
        Ok(federation
            .partners()
            .iter()
            .map(|p| Partner {
                id: ID(p.id.clone()),
                name: p.name.clone(),
                connector_kind: p.connector.kind(),
                capabilities: p.connector.capabilities(),
                snapshot: snapshot.clone(),
            })
            .collect())
    }
}

impl QueryRoot {
    async fn audit_page(
        ctx: &Context<'_>,
        filter: AuditFilter,
        first: i32,
        after: Option<String>,
    ) -> Result<AuditEventConnection, ApiError> {
        let principal = principal(ctx)?;
        let services = services(ctx)?;
        let first = i64::from(first);
        if !(1..=i64::from(MAX_PAGE_SIZE)).contains(&first) {
            return Err(ApiError::InvalidPageSize(first as i32));
        }
        let before = match after {
            None => None,
            Some(cursor) => Some(
                cursor
                    .strip_prefix("seq:")
                    .and_then(|n| n.parse::<i64>().ok())
                    .ok_or(ApiError::InvalidCursor(CursorError::Malformed))?,
            ),
        };
        let selection = audit_selection(services, principal, filter, before);
        let mut rows = services
            .audit
            .store()
            .select(&selection, first + 1)
            .await
            .map_err(|_| ApiError::AuditUnavailable)?;
        let has_next_page = rows.len() as i64 > first;
        rows.truncate(first as usize);
        Ok(AuditEventConnection {
            end_cursor: rows.last().map(|row| format!("seq:{}", row.seq)),
            nodes: rows.iter().map(AuditEvent::from).collect(),
            has_next_page,
        })
    }
}

/// The audit entries `principal` asks for with `filter`, within what they
/// may read, older than `before` when paging.
pub fn audit_selection(
    services: &Services,
    principal: &Principal,
    filter: AuditFilter,
    before: Option<i64>,
) -> Selection {
    Selection {
        scope: audit_scope(services, principal),
        subject: filter.subject,
        institution: filter.institution,
        project: filter.project,
        partner: filter.partner,
        outcome: filter.outcome.map(|o| match o {
            AuditOutcome::Success => "success".to_owned(),
            AuditOutcome::Failure => "failure".to_owned(),
        }),
        from: filter.from,
        to: filter.to,
        before,
    }
}

/// Which audit entries `principal` may read: `None` for all of them (the
/// consortium's policies allow `ViewAudit` on every partner), otherwise
/// their own and those involving the partners the policies allow.
fn audit_scope(services: &Services, principal: &Principal) -> Option<Scope> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let partners: Vec<String> = services
        .federation
        .partners()
        .iter()
        .map(|p| p.id.clone())
        .collect();
    let allowed: Vec<String> = partners
        .iter()
        .filter(|id| {
            services
                .authorizer
                .allows(principal, AdminAction::ViewAudit, id, now)
        })
        .cloned()
        .collect();
    if !partners.is_empty() && allowed.len() == partners.len() {
        return None;
    }
    Some(Scope {
        own: Some((principal.issuer.clone(), principal.subject.clone())),
        partners: allowed,
    })
}

fn services<'a>(ctx: &Context<'a>) -> Result<&'a Services, ApiError> {
    ctx.data::<Services>().map_err(|_| ApiError::Internal)
}

fn principal<'a>(ctx: &Context<'a>) -> Result<&'a Principal, ApiError> {
    ctx.data::<RequestContext>()
        .ok()
        .and_then(|request| request.principal.as_ref())
        .ok_or(ApiError::Unauthenticated)
}

/// Asks the policies what each partner the query asks may disclose.
fn grants(services: &Services, principal: &Principal, project: &str, query: &StudyQuery) -> Grants {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or_default();
    let partners = services
        .federation
        .asked(query)
        .iter()
        .map(|partner| {
            let disclosure = services
                .authorizer
                .decide(principal, project, &partner.id, now);
            let deidentifier = disclosure.view().map(|profile| {
                Deidentifier::new(
                    services.pseudonym_key.project_key(project),
                    profile.clone(),
                    &partner.id,
                )
            });
            (
                partner.id.clone(),
                Grant {
                    disclosure,
                    deidentifier,
                },
            )
        })
        .collect();
    Grants {
        partners,
        cell_keys: services.pseudonym_key.cell_keys(),
        project: project.to_owned(),
        caller: principal.caller(),
    }
}

fn node(found: &FoundStudy) -> Result<ImagingStudyNode, ApiError> {
    let options = found.partner.mapping;
    let study = &found.study;
    let labels = found
        .deidentification
        .as_ref()
        .map(|(profile, _)| profile.security_labels())
        .unwrap_or_default();
    let age = study
        .age_at_study()
        .map(|age| match &found.deidentification {
            Some(_) if age >= AGE_CAP => format!("{AGE_CAP}+"),
            _ => age.to_string(),
        });
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
        patient: PatientSummary {
            reference: study.patient_id.clone(),
            sex: study.patient_sex,
            age,
        },
        deidentification: found.deidentification.as_ref().map(|(profile, basis)| {
            Deidentification {
                profile: profile.name(),
                options: profile.options().map(|o| o.name().to_owned()).collect(),
                dates_shifted_per_study: *basis == ShiftBasis::Study,
            }
        }),
        fhir: Json(imaging_study(study, &options, &labels).map_err(|error| {
            tracing::error!(%error, "FHIR mapping failed");
            ApiError::Internal
        })?),
    })
}

/// Charges one fan-out for `studies` to the request, before it is made.
fn charge(ctx: &Context<'_>, studies: usize) -> Result<(), ApiError> {
    match ctx.data::<RequestContext>() {
        Ok(request) => Ok(request.charge(studies)?),
        // Every request the gateway serves has its context.
        Err(_) => Err(ApiError::Internal),
    }
}

impl QueryRoot {
    fn query(
        services: &Services,
        project: &str,
        filter: Option<StudyFilter>,
    ) -> Result<StudyQuery, ApiError> {
        if !services.authorizer.has_project(project) {
            return Err(ApiError::UnknownProject(project.to_owned()));
        }
        let federation = &services.federation;
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
        project: String,
        filter: Option<StudyFilter>,
        first: i32,
        after: Option<String>,
    ) -> Result<ImagingStudyConnection, ApiError> {
        let principal = principal(ctx)?;
        let services = services(ctx)?;
        let query = Self::query(services, &project, filter)?;
        // Series and instances cost requests per partner: loaded only when
        // the selection shows them (FHIR, body parts).
        let nodes = ctx.look_ahead().field("nodes");
        let with_series = nodes.field("fhir").exists() || nodes.field("bodyParts").exists();
        if !(1..=MAX_PAGE_SIZE).contains(&first) {
            return Err(ApiError::InvalidPageSize(first));
        }
        let fingerprint = query.fingerprint();
        let first = usize::try_from(first).map_err(|_| ApiError::InvalidPageSize(first))?;
        let grants = grants(services, principal, &project, &query);
        let binding = Binding::new(
            &principal.issuer,
            &principal.subject,
            &project,
            &fingerprint,
            grants
                .partners
                .iter()
                .map(|(id, grant)| (id.clone(), grant.disclosure.label()))
                .collect(),
        );
        let key = &services.pseudonym_key;
        let after = after
            .map(|c| cursor::decode(key, &binding, &c))
            .transpose()?;

        charge(ctx, first)?;
        // Held until the answer has been sent (the request context keeps
        // it), so that memory follows the studies in flight.
        let studies = Arc::clone(&services.studies_in_flight)
            .try_acquire_many_owned(u32::try_from(first).unwrap_or(u32::MAX))
            .map_err(|_| ApiError::Overloaded)?;
        if let Ok(request) = ctx.data::<RequestContext>() {
            request.hold(studies);
        }
        let page = services
            .federation
            .page(&query, &grants, first, after.as_ref(), with_series)
            .await;
        if let Ok(request) = ctx.data::<RequestContext>() {
            request.note(AuditedAccess {
                field: "imagingStudies",
                project: project.clone(),
                filter_fingerprint: fingerprint.clone(),
                filter: serde_json::to_value(&query).unwrap_or_default(),
                partners: page
                    .statuses
                    .iter()
                    .map(AuditedPartner::from_report)
                    .collect(),
            });
        }
        let end_cursor = page.studies.last().map(|found| {
            cursor::encode(key, &binding, &SortKey::of(&found.partner.id, &found.study))
        });
        let nodes = page
            .studies
            .iter()
            .map(node)
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
        project: String,
        filter: Option<StudyFilter>,
    ) -> Result<CohortCount, ApiError> {
        let principal = principal(ctx)?;
        let services = services(ctx)?;
        let query = Self::query(services, &project, filter)?;
        let grants = grants(services, principal, &project, &query);
        charge(ctx, 0)?;
        let (total, partners) = services.federation.count(&query, &grants).await;
        if let Ok(request) = ctx.data::<RequestContext>() {
            request.note(AuditedAccess {
                field: "cohortCount",
                project,
                filter_fingerprint: query.fingerprint(),
                filter: serde_json::to_value(&query).unwrap_or_default(),
                partners: partners.iter().map(AuditedPartner::from_report).collect(),
            });
        }
        let complete = partners
            .iter()
            .all(|s| s.status == meshgate_schema::PartnerOutcome::Ok);
        Ok(CohortCount {
            total: total.value,
            total_is_lower_bound: total.lower_bound,
            total_is_approximate: total.approximate,
            complete,
            partners,
        })
    }
}
