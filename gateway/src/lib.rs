//! The meshgate gateway: one GraphQL API over a research consortium's
//! imaging stores.
//!
//! A query's path through this crate, and where to start reading:
//! 0. [`registry`]: the [`registry::Snapshot`] in force — partners (built by
//!    [`assemble`]), policies and issuers — which the request keeps to the
//!    end, whatever reloads happen meanwhile;
//! 1. [`app`]: `POST /graphql` — the bearer token is verified by [`auth`]
//!    (no valid token: 401 and nothing else), the request is parsed and
//!    executed, and the audit record is written before the response leaves
//!    (its failure fails the request);
//! 2. [`graphql`]: resolvers turn the GraphQL filter into one
//!    [`meshgate_schema::StudyQuery`], ask the policies
//!    ([`meshgate_policies::Authorizer`]) what each partner may disclose for
//!    the project, and give every error its stable code;
//! 3. [`federation`](mod@federation): every permitted partner is asked at
//!    once through its own path ([`partner`]: connector, cache, guard and
//!    deadline, count disclosure control, de-identification, status); what
//!    they release is merged newest first and paged by [`cursor`];
//! 4. [`request`]: who is asking and what was accessed, for the audit record.
//!
//! [`config`] reads the TOML configuration, [`synth`] writes synthetic
//! partners, [`demo`] runs a three-partner gateway on local data with a
//! [`dev_issuer`] for tokens.

pub mod admission;
pub mod app;
pub mod assemble;
pub mod audit;
pub mod auth;
pub mod budget;
pub mod cache;
pub mod checks;
pub mod config;
pub mod cursor;
pub mod demo;
pub mod dev_issuer;
pub mod federation;
pub mod graphql;
pub mod limits;
pub mod metrics;
pub mod partner;
pub mod protection;
pub mod registry;
pub mod request;
pub mod server;
pub mod synth;
pub mod telemetry;

pub use app::{Gateway, build_app, start};
pub use config::{Config, ConfigError, LoadedConfig, ProcessEnvironment};
pub use server::run;
