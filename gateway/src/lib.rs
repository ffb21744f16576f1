//! The meshgate gateway: one GraphQL API over a research consortium's
//! imaging stores.
//!
//! A query's path through this crate, and where to start reading:
//! 1. [`app`]: `POST /graphql` is parsed and executed; the audit record is
//!    written before the response leaves (and its failure fails the request);
//! 2. [`graphql`]: resolvers turn the GraphQL filter into one
//!    [`meshgate_schema::StudyQuery`] and give every error its stable code;
//! 3. [`federation`]: every partner's connector is asked at once, each under
//!    its deadline; answers are merged newest first and paged by [`cursor`];
//! 4. [`request`]: who is asking and what was accessed — the seams for
//!    authentication, policy and the durable audit log.
//!
//! [`config`] reads the TOML configuration, [`synth`] writes synthetic
//! partners, [`demo`] runs a three-partner gateway on local data.

pub mod app;
pub mod auth;
pub mod config;
pub mod cursor;
pub mod demo;
pub mod dev_issuer;
pub mod federation;
pub mod graphql;
pub mod request;
pub mod synth;

pub use app::{Gateway, build_app, federation, run, start};
pub use config::{Config, ConfigError, LoadedConfig, ProcessEnvironment};
