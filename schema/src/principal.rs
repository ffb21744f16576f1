//! Who is asking: the verified caller as every part of meshgate sees it.

use serde::{Deserialize, Serialize};

/// What a caller does in the consortium.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "graphql", derive(async_graphql::Enum))]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Queries cohorts under approved research projects.
    Researcher,
    /// Looks after one partner institution's connectors and policies.
    PartnerAdmin,
    /// Approves connectors and projects, audits access.
    Governance,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Researcher, Role::PartnerAdmin, Role::Governance];

    /// The role's name in tokens and policies.
    pub fn name(self) -> &'static str {
        match self {
            Role::Researcher => "researcher",
            Role::PartnerAdmin => "partner_admin",
            Role::Governance => "governance",
        }
    }

    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// Who asks: a token's issuer and subject together, so the same subject
/// from another issuer is another caller. Caches and query budgets are
/// kept per caller.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Caller {
    pub issuer: String,
    pub subject: String,
}

/// A caller whose bearer token was verified, as the gateway sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[cfg_attr(
    feature = "graphql",
    derive(async_graphql::SimpleObject),
    graphql(complex)
)]
pub struct Principal {
    /// The token's issuer.
    pub issuer: String,
    /// The token's subject.
    pub subject: String,
    /// The caller's institution, when the token names one.
    pub institution: Option<String>,
    /// Sorted, without duplicates.
    pub roles: Vec<Role>,
    /// Research projects the caller is approved for (ids), sorted.
    pub projects: Vec<String>,
    /// Data-use permissions granted to the caller, sorted.
    pub permissions: Vec<String>,
}

/// The content hash of the configuration and policies a request runs on,
/// given to the GraphQL executor with each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveSnapshot(pub String);

#[cfg(feature = "graphql")]
#[async_graphql::ComplexObject]
impl Principal {
    /// The content hash of the configuration and policies (without secret
    /// values) that decide this request: the same hash its audit record
    /// names.
    async fn snapshot(&self, ctx: &async_graphql::Context<'_>) -> Option<String> {
        ctx.data_opt::<ActiveSnapshot>().map(|s| s.0.clone())
    }
}

impl Principal {
    /// Who asks.
    pub fn caller(&self) -> Caller {
        Caller {
            issuer: self.issuer.clone(),
            subject: self.subject.clone(),
        }
    }

    /// The caller as one string (issuer, a line break, subject): the
    /// principal's Cedar entity id.
    pub fn key(&self) -> String {
        format!("{}\n{}", self.issuer, self.subject)
    }
}
