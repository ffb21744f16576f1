//! Per-partner decisions over Cedar policies.
//!
//! Two policy sets decide each query: the consortium's, and the partner's
//! own. An action is allowed only when both allow it, so a partner's
//! policies can only narrow what the consortium allows. Cedar denies by
//! default; any evaluation error also denies. Administration actions
//! (audit, connectors) are decided by the consortium's policies alone.
//!
//! For one partner, the decision is the most disclosing query action both
//! sets allow: IDENTIFIED (`ReadIdentifiedStudies`), DEIDENTIFIED
//! (`SearchDeidentifiedStudies`, under the profile named by the permitting
//! policies' `@deidentification` annotation — the partner's, else the
//! consortium's, else the Basic Profile; several are intersected), COUNTS_ONLY
//! (`CountStudies`, whose counts are computed over the view the permitting
//! policies' `@deidentification` profile describes, so a count answers only
//! what that profile's records would show), or DENIED with the `@reason` annotations of the forbid
//! policies that decided it (`{project}` and `{partner}` are filled in).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy::{
    Authorizer as CedarAuthorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, RestrictedExpression, Schema, ValidationMode,
    Validator,
};
use meshgate_schema::Principal;

use crate::deid::Profile;

/// The Cedar schema every policy is validated against.
pub const CEDAR_SCHEMA: &str = include_str!("../meshgate.cedarschema");

const REASON: &str = "reason";
const DEIDENTIFICATION: &str = "deidentification";

/// A policy file.
#[derive(Debug, Clone)]
pub struct PolicyFile {
    pub path: PathBuf,
    pub text: String,
}

impl PolicyFile {
    pub fn read(path: &Path) -> Result<PolicyFile, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|error| PolicyError {
            file: path.to_owned(),
            line: None,
            message: format!("cannot read the policy file: {}", error.kind()),
        })?;
        Ok(PolicyFile {
            path: path.to_owned(),
            text,
        })
    }
}

/// A registered research project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectFacts {
    pub id: String,
    /// DUO codes for the project's research purpose.
    pub purposes: Vec<String>,
    pub commercial: bool,
    pub ethics_approved: bool,
}

/// What policies know about a partner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartnerFacts {
    pub id: String,
    pub institution: String,
    /// The dataset's DUO data-use permission.
    pub data_use: String,
    /// DUO data-use modifiers.
    pub data_use_modifiers: Vec<String>,
}

/// Everything the authorizer is built from.
#[derive(Debug, Clone, Default)]
pub struct PolicyConfig {
    pub consortium: Vec<PolicyFile>,
    /// Each partner with its own policy files.
    pub partners: Vec<(PartnerFacts, Vec<PolicyFile>)>,
    pub projects: Vec<ProjectFacts>,
}

/// A policy that cannot be used, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub message: String,
}

/// What one partner discloses for one query (on the wire: `{"level":
/// "DEIDENTIFIED", "with": "basic"}` and the like).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "level", content = "with", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Disclosure {
    Denied {
        reasons: Vec<String>,
    },
    /// Counts only, computed over the view this profile releases.
    CountsOnly(Profile),
    Deidentified(Profile),
    Identified,
}

impl Disclosure {
    /// The stable name used in the API and audit records.
    pub fn name(&self) -> &'static str {
        match self {
            Disclosure::Denied { .. } => "DENIED",
            Disclosure::CountsOnly(_) => "COUNTS_ONLY",
            Disclosure::Deidentified(_) => "DEIDENTIFIED",
            Disclosure::Identified => "IDENTIFIED",
        }
    }

    /// The decision with its profile, e.g. `DEIDENTIFIED:basic+…`: what
    /// keys a cached answer or binds a cursor to one decision.
    pub fn label(&self) -> String {
        match self.view() {
            Some(profile) => format!("{}:{}", self.name(), profile.name()),
            None => self.name().to_owned(),
        }
    }

    /// Whether study records (not only counts) may be returned.
    pub fn releases_records(&self) -> bool {
        matches!(self, Disclosure::Deidentified(_) | Disclosure::Identified)
    }

    /// The profile of the view filters are evaluated on: what a
    /// de-identifying partner releases, or what a counts-only partner's
    /// counts are computed over. `None` when the caller sees original
    /// values (IDENTIFIED) or nothing (DENIED).
    pub fn view(&self) -> Option<&Profile> {
        match self {
            Disclosure::CountsOnly(profile) | Disclosure::Deidentified(profile) => Some(profile),
            Disclosure::Identified | Disclosure::Denied { .. } => None,
        }
    }
}

/// The administration actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAction {
    ViewAudit,
    RegisterConnector,
    ApproveConnector,
}

impl AdminAction {
    pub fn name(self) -> &'static str {
        match self {
            AdminAction::ViewAudit => "ViewAudit",
            AdminAction::RegisterConnector => "RegisterConnector",
            AdminAction::ApproveConnector => "ApproveConnector",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum QueryAction {
    Count,
    SearchDeidentified,
    ReadIdentified,
}

impl QueryAction {
    fn name(self) -> &'static str {
        match self {
            QueryAction::Count => "CountStudies",
            QueryAction::SearchDeidentified => "SearchDeidentifiedStudies",
            QueryAction::ReadIdentified => "ReadIdentifiedStudies",
        }
    }
}

/// Decides, for a principal and a project, what each partner discloses.
#[derive(Debug)]
pub struct Authorizer {
    consortium: PolicySet,
    partners: HashMap<String, PolicySet>,
    projects: HashMap<String, ProjectFacts>,
    /// Each project's entity.
    project_entities: HashMap<String, Entity>,
    /// Each partner's entity with its dataset and institution.
    partner_entities: HashMap<String, Vec<Entity>>,
    /// The action hierarchy (`CountStudies in QueryStudies`, ...).
    actions: Entities,
    cedar: CedarAuthorizer,
}

/// The outcome of one policy set for one request.
#[derive(Debug)]
enum Verdict {
    Allow(Vec<PolicyId>),
    /// Denied; the forbid policies that decided it (none: nothing permitted).
    Deny(Vec<PolicyId>),
}

impl Authorizer {
    /// Loads and strictly validates every policy; the first bad one is an error.
    pub fn new(config: &PolicyConfig) -> Result<Authorizer, PolicyError> {
        let schema = Schema::from_str(CEDAR_SCHEMA).map_err(|error| PolicyError {
            file: PathBuf::from("meshgate.cedarschema"),
            line: None,
            message: error.to_string(),
        })?;
        let consortium = load_set(&schema, "consortium", &config.consortium)?;
        let mut partners = HashMap::new();
        for (facts, files) in &config.partners {
            let policies = load_set(&schema, &facts.id, files)?;
            partners.insert(facts.id.clone(), policies);
        }
        let projects: HashMap<String, ProjectFacts> = config
            .projects
            .iter()
            .map(|p| (p.id.clone(), p.clone()))
            .collect();
        let config_error = |message: String| PolicyError {
            file: PathBuf::from("configuration"),
            line: None,
            message,
        };
        let (partner_entities, project_entities) = static_entities(config).map_err(config_error)?;
        // Check the entities against the schema once, at start-up; requests
        // then only add the caller, built by the same code every time.
        Entities::from_entities(
            partner_entities
                .values()
                .flatten()
                .chain(project_entities.values())
                .map(|entity| (entity.uid().to_string(), entity.clone()))
                .collect::<BTreeMap<String, Entity>>()
                .into_values(),
            Some(&schema),
        )
        .map_err(|error| {
            config_error(format!(
                "partners and projects do not fit the Cedar schema: {error}"
            ))
        })?;
        let actions = schema
            .action_entities()
            .map_err(|error| config_error(error.to_string()))?;
        Ok(Authorizer {
            consortium,
            partners,
            projects,
            project_entities,
            partner_entities,
            actions,
            cedar: CedarAuthorizer::new(),
        })
    }

    pub fn has_project(&self, project: &str) -> bool {
        self.projects.contains_key(project)
    }

    /// How many policies are loaded (consortium and all partners).
    pub fn policy_count(&self) -> usize {
        self.consortium.policies().count()
            + self
                .partners
                .values()
                .map(|p| p.policies().count())
                .sum::<usize>()
    }

    /// What `partner` discloses to `principal` for `project`, decided at
    /// `now` (seconds since the Unix epoch).
    pub fn decide(
        &self,
        principal: &Principal,
        project: &str,
        partner: &str,
        now: i64,
    ) -> Disclosure {
        let deny = |reason: String| Disclosure::Denied {
            reasons: vec![reason],
        };
        let Some(partner_policies) = self.partners.get(partner) else {
            return deny(format!("partner {partner} has no policies"));
        };
        if !self.projects.contains_key(project) {
            return deny(format!("project {project} is not a registered project"));
        }
        let entities = match self.entities_for(principal, Some(project), partner) {
            Ok(entities) => entities,
            Err(message) => {
                tracing::warn!(%message, "the principal does not fit the Cedar schema: deny");
                return deny("your identity could not be evaluated by policy".to_owned());
            }
        };
        let evaluate = |action: QueryAction, set: &PolicySet| -> Verdict {
            match request(principal, action.name(), partner, Some(project), now) {
                Ok(request) => self.evaluate(&request, set, &entities),
                Err(message) => {
                    tracing::warn!(%message, "request does not fit the Cedar schema: deny");
                    Verdict::Deny(Vec::new())
                }
            }
        };
        let both = |action: QueryAction| {
            (
                evaluate(action, &self.consortium),
                evaluate(action, partner_policies),
            )
        };

        if let (Verdict::Allow(_), Verdict::Allow(_)) = both(QueryAction::ReadIdentified) {
            return Disclosure::Identified;
        }
        let profile = |consortium: &[PolicyId], own: &[PolicyId]| {
            self.profile_of(partner_policies, own)
                .or_else(|| self.profile_of(&self.consortium, consortium))
                .unwrap_or_else(Profile::basic)
        };
        if let (Verdict::Allow(consortium), Verdict::Allow(own)) =
            both(QueryAction::SearchDeidentified)
        {
            return Disclosure::Deidentified(profile(&consortium, &own));
        }
        match both(QueryAction::Count) {
            (Verdict::Allow(consortium), Verdict::Allow(own)) => {
                Disclosure::CountsOnly(profile(&consortium, &own))
            }
            (consortium, own) => {
                let mut reasons = Vec::new();
                let fill = |text: &str| {
                    text.replace("{project}", project)
                        .replace("{partner}", partner)
                };
                for (verdict, set, whose) in [
                    (consortium, &self.consortium, "the consortium".to_owned()),
                    (own, partner_policies, format!("partner {partner}")),
                ] {
                    if let Verdict::Deny(forbids) = verdict {
                        let stated: Vec<String> = forbids
                            .iter()
                            .filter_map(|id| set.policy(id).and_then(|p| p.annotation(REASON)))
                            .map(fill)
                            .collect();
                        if stated.is_empty() {
                            reasons.push(format!(
                                "no policy of {whose} permits queries for project {project} by you"
                            ));
                        } else {
                            reasons.extend(stated);
                        }
                    }
                }
                reasons.sort();
                reasons.dedup();
                Disclosure::Denied { reasons }
            }
        }
    }

    /// Whether the consortium's policies allow an administration action on a partner.
    pub fn allows(
        &self,
        principal: &Principal,
        action: AdminAction,
        partner: &str,
        now: i64,
    ) -> bool {
        let request = request(principal, action.name(), partner, None, now);
        let (Ok(request), Ok(entities)) = (request, self.entities_for(principal, None, partner))
        else {
            return false;
        };
        matches!(
            self.evaluate(&request, &self.consortium, &entities),
            Verdict::Allow(_)
        )
    }

    fn evaluate(&self, request: &Request, set: &PolicySet, entities: &Entities) -> Verdict {
        let response = self.cedar.is_authorized(request, set, entities);
        let errors: Vec<String> = response
            .diagnostics()
            .errors()
            .map(|error| match error {
                cedar_policy::AuthorizationError::PolicyEvaluationError(e) => {
                    e.policy_id().to_string()
                }
            })
            .collect();
        if !errors.is_empty() {
            // A policy that cannot be evaluated must not let anything through.
            tracing::warn!(policies = ?errors, "policy evaluation failed: deny");
            return Verdict::Deny(Vec::new());
        }
        let determining: Vec<PolicyId> = response.diagnostics().reason().cloned().collect();
        match response.decision() {
            Decision::Allow => Verdict::Allow(determining),
            Decision::Deny => Verdict::Deny(determining),
        }
    }

    /// The strictest profile named by the permitting policies, if any names one.
    fn profile_of(&self, set: &PolicySet, permitting: &[PolicyId]) -> Option<Profile> {
        permitting
            .iter()
            .filter_map(|id| set.annotation(id, DEIDENTIFICATION))
            // Validated at load time: a bad profile never gets here.
            .filter_map(|text| Profile::parse(text).ok())
            .reduce(|a, b| a.intersect(&b))
    }

    /// The entities one decision can reach: the caller, the project, the
    /// partner with its dataset and institution, and the actions.
    fn entities_for(
        &self,
        principal: &Principal,
        project: Option<&str>,
        partner: &str,
    ) -> Result<Entities, String> {
        let mut entities: BTreeMap<String, Entity> = BTreeMap::new();
        let mut add = |entity: Entity| {
            entities.entry(entity.uid().to_string()).or_insert(entity);
        };
        add(user_entity(principal)?);
        if let Some(institution) = &principal.institution {
            add(Entity::new_no_attrs(
                uid("Institution", institution)?,
                HashSet::new(),
            ));
        }
        if let Some(entity) = project.and_then(|p| self.project_entities.get(p)) {
            add(entity.clone());
        }
        for entity in self.partner_entities.get(partner).into_iter().flatten() {
            add(entity.clone());
        }
        self.actions
            .clone()
            .add_entities(entities.into_values(), None)
            .map_err(|e| e.to_string())
    }
}

/// A request for `action` on `partner`, with the project in its context for
/// query actions. Not re-checked against the schema: this code builds every
/// request the same way, and a mismatch would only make policies fail to
/// evaluate, which denies.
fn request(
    principal: &Principal,
    action: &str,
    partner: &str,
    project: Option<&str>,
    now: i64,
) -> Result<Request, String> {
    let mut context = vec![("now".to_owned(), RestrictedExpression::new_long(now))];
    if let Some(project) = project {
        context.push((
            "project".to_owned(),
            RestrictedExpression::new_entity_uid(uid("Project", project)?),
        ));
    }
    Request::new(
        user_uid(principal)?,
        action_uid(action)?,
        uid("Partner", partner)?,
        Context::from_pairs(context).map_err(|e| e.to_string())?,
        None,
    )
    .map_err(|e| e.to_string())
}

fn uid(kind: &str, id: &str) -> Result<EntityUid, String> {
    let name = EntityTypeName::from_str(&format!("Meshgate::{kind}")).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(name, EntityId::new(id)))
}

fn action_uid(action: &str) -> Result<EntityUid, String> {
    let name = EntityTypeName::from_str("Meshgate::Action").map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(
        name,
        EntityId::new(action),
    ))
}

/// A caller's entity id: issuer and subject (a line break between), so the
/// same subject from two issuers is two users. Policies name a user by
/// `principal.issuer` and `principal.subject`.
fn user_uid(principal: &Principal) -> Result<EntityUid, String> {
    uid("User", &principal.key())
}

fn strings(values: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(values.iter().cloned().map(RestrictedExpression::new_string))
}

fn user_entity(principal: &Principal) -> Result<Entity, String> {
    let mut attrs = HashMap::from([
        (
            "roles".to_owned(),
            RestrictedExpression::new_set(
                principal
                    .roles
                    .iter()
                    .map(|r| RestrictedExpression::new_string(r.name().to_owned())),
            ),
        ),
        (
            "projects".to_owned(),
            RestrictedExpression::new_set(
                principal
                    .projects
                    .iter()
                    .map(|p| uid("Project", p).map(RestrictedExpression::new_entity_uid))
                    .collect::<Result<Vec<_>, _>>()?,
            ),
        ),
        ("permissions".to_owned(), strings(&principal.permissions)),
        (
            "issuer".to_owned(),
            RestrictedExpression::new_string(principal.issuer.clone()),
        ),
        (
            "subject".to_owned(),
            RestrictedExpression::new_string(principal.subject.clone()),
        ),
    ]);
    let mut parents = HashSet::new();
    if let Some(institution) = &principal.institution {
        let institution = uid("Institution", institution)?;
        attrs.insert(
            "institution".to_owned(),
            RestrictedExpression::new_entity_uid(institution.clone()),
        );
        parents.insert(institution);
    }
    Entity::new(user_uid(principal)?, attrs, parents).map_err(|e| e.to_string())
}

type StaticEntities = (HashMap<String, Vec<Entity>>, HashMap<String, Entity>);

fn static_entities(config: &PolicyConfig) -> Result<StaticEntities, String> {
    let mut partners = HashMap::new();
    for (facts, _) in &config.partners {
        let institution = uid("Institution", &facts.institution)?;
        let dataset = uid("Dataset", &facts.id)?;
        let entities = vec![
            Entity::new_no_attrs(institution.clone(), HashSet::new()),
            Entity::new(
                dataset.clone(),
                HashMap::from([
                    (
                        "permission".to_owned(),
                        RestrictedExpression::new_string(facts.data_use.clone()),
                    ),
                    ("modifiers".to_owned(), strings(&facts.data_use_modifiers)),
                ]),
                HashSet::new(),
            )
            .map_err(|e| e.to_string())?,
            Entity::new(
                uid("Partner", &facts.id)?,
                HashMap::from([
                    (
                        "institution".to_owned(),
                        RestrictedExpression::new_entity_uid(institution),
                    ),
                    (
                        "dataset".to_owned(),
                        RestrictedExpression::new_entity_uid(dataset),
                    ),
                ]),
                HashSet::new(),
            )
            .map_err(|e| e.to_string())?,
        ];
        partners.insert(facts.id.clone(), entities);
    }
    let mut projects = HashMap::new();
    for project in &config.projects {
        let entity = Entity::new(
            uid("Project", &project.id)?,
            HashMap::from([
                ("purposes".to_owned(), strings(&project.purposes)),
                (
                    "commercial".to_owned(),
                    RestrictedExpression::new_bool(project.commercial),
                ),
                (
                    "ethicsApproved".to_owned(),
                    RestrictedExpression::new_bool(project.ethics_approved),
                ),
            ]),
            HashSet::new(),
        )
        .map_err(|e| e.to_string())?;
        projects.insert(project.id.clone(), entity);
    }
    Ok((partners, projects))
}

/// Parses and strictly validates one owner's policy files into one set.
/// Policy ids are `@id` annotations where given, else `<owner>/<file>#<n>`.
fn load_set(schema: &Schema, owner: &str, files: &[PolicyFile]) -> Result<PolicySet, PolicyError> {
    let validator = Validator::new(schema.clone());
    let mut combined = PolicySet::new();
    let mut seen = HashSet::new();
    for file in files {
        let error_at = |offset: Option<usize>, message: String| PolicyError {
            file: file.path.clone(),
            line: offset.map(|o| line_of(&file.text, o)),
            message,
        };
        let parsed = PolicySet::from_str(&file.text)
            .map_err(|errors| error_at(first_offset(&errors), errors.to_string()))?;
        if let Some(template) = parsed.templates().next() {
            return Err(error_at(
                None,
                format!("templates are not supported (template {})", template.id()),
            ));
        }
        let result = validator.validate(&parsed, ValidationMode::Strict);
        if let Some(error) = result.validation_errors().next() {
            return Err(error_at(
                first_offset(error),
                format!("does not validate against the schema: {error}"),
            ));
        }
        let name = file
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        for (index, policy) in parsed.policies().enumerate() {
            let at_annotation = |value: &str| file.text.find(value).map(|o| line_of(&file.text, o));
            if let Some(profile) = policy.annotation(DEIDENTIFICATION)
                && let Err(error) = Profile::parse(profile)
            {
                return Err(PolicyError {
                    file: file.path.clone(),
                    line: at_annotation(profile),
                    message: error.to_string(),
                });
            }
            let id = match policy.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{owner}/{name}#{index}"),
            };
            if !seen.insert(id.clone()) {
                return Err(PolicyError {
                    file: file.path.clone(),
                    line: at_annotation(&id),
                    message: format!("policy id '{id}' is used twice in {owner}'s policies"),
                });
            }
            combined
                .add(policy.new_id(PolicyId::new(&id)))
                .map_err(|error| error_at(None, error.to_string()))?;
        }
    }
    Ok(combined)
}

fn first_offset(diagnostic: &dyn miette::Diagnostic) -> Option<usize> {
    diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map(|label| label.offset())
        .or_else(|| {
            diagnostic
                .related()
                .and_then(|mut related| related.next())
                .and_then(first_offset)
        })
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset).unwrap_or(text).matches('\n').count() + 1
}
