//! Logs and traces. Logs go to stderr, filtered by `RUST_LOG` (default
//! `info`). With `[telemetry] otlp_traces_endpoint` set, the spans of each
//! request and each partner call are also exported over OTLP/HTTP
//! (protobuf) in batches.
//!
//! Spans carry request ids, partner ids, phases, statuses and codes: never
//! a filter value, an identifier from a partner's data, a subject or a
//! token, so a tracing backend never holds patient data or credentials.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::SdkTracerProvider;
use serde::Deserialize;
use tracing::Level;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// `[telemetry]`: where traces go.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySection {
    /// The collector's OTLP/HTTP traces URL, e.g.
    /// `http://otel-collector:4318/v1/traces`. Unset: no traces exported.
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    #[serde(default = "default_service_name")]
    pub service_name: String,
}

impl Default for TelemetrySection {
    fn default() -> Self {
        TelemetrySection {
            otlp_traces_endpoint: None,
            service_name: default_service_name(),
        }
    }
}

fn default_service_name() -> String {
    "meshgate".to_owned()
}

/// Keeps the trace exporter running; flushes what is buffered when shut
/// down.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered and stops the exporter (blocking).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(error) = provider.shutdown()
        {
            // The exporter's own failure text can carry the collector's URL.
            let reason = match error {
                OTelSdkError::InternalFailure(_) => "the exporter failed".to_owned(),
                other => other.to_string(),
            };
            eprintln!("warning: traces could not all be exported: {reason}");
        }
    }
}

/// Installs the process's log and trace subscriber.
pub fn init(section: &TelemetrySection) -> anyhow::Result<Telemetry> {
    // Colours only for a person at a terminal, not in a file or a pipe.
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")));
    let provider = match &section.otlp_traces_endpoint {
        Some(endpoint) => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(endpoint)
                .build()?;
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(
                        Resource::builder()
                            .with_service_name(section.service_name.clone())
                            .build(),
                    )
                    .build(),
            )
        }
        None => None,
    };
    // meshgate's own spans, whatever `RUST_LOG` says about logs.
    let traces = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("meshgate"))
            .with_filter(
                Targets::new()
                    .with_target("meshgate_gateway", Level::INFO)
                    .with_target("meshgate_connectors", Level::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init()?;
    Ok(Telemetry { provider })
}
