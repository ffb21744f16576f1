//! Partners assembled from their configuration, and their connection
//! checks: the capability probe at start-up and after a reload, repeated
//! for a partner that did not answer until it does.

use std::sync::Arc;
use std::time::Duration;

use meshgate_connectors::ConnectorError;
use meshgate_schema::fhir::MappingOptions;

use crate::app::StartError;
use crate::config::{LoadedConfig, parse_utc_offset};
use crate::partner::{Partner, PartnerCheck, check_partners};
use crate::protection::Guard;

/// How long start-up (and a reload) waits for each new partner's
/// capability probe.
pub const STARTUP_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Probes `partners` (each within [`STARTUP_CHECK_TIMEOUT`]) so that
/// measured capabilities drive push-down from their first query, and logs
/// the outcome. A partner that cannot be checked is still served, on its
/// profile's assumptions; one that did not answer at all is probed again
/// until it does (one that answered — refused credentials, throttled —
/// needs its operator, not more requests).
pub async fn check_and_watch(partners: &[Arc<Partner>]) -> Vec<PartnerCheck> {
    let checks = check_partners(partners, STARTUP_CHECK_TIMEOUT).await;
    for check in &checks {
        match &check.outcome {
            Ok(latency) => tracing::info!(
                partner = %check.partner.id,
                latency_ms = latency.as_millis() as u64,
                measured = check.partner.connector.capabilities().measured,
                "partner checked"
            ),
            Err(failure) => {
                tracing::warn!(
                    partner = %check.partner.id,
                    code = failure.code(),
                    "partner could not be checked; using its profile's assumed capabilities"
                );
                if !check.reachable() {
                    tokio::spawn(recheck(Arc::downgrade(&check.partner)));
                }
            }
        }
    }
    checks
}

/// The first pause before probing again a partner that could not be
/// checked (at start-up or after a reload); pauses double up to
/// [`RECHECK_MAX_PAUSE`].
pub const RECHECK_FIRST_PAUSE: Duration = Duration::from_secs(2);
pub const RECHECK_MAX_PAUSE: Duration = Duration::from_secs(300);

/// Probes a partner that could not be reached again, with growing pauses,
/// until it answers: a partner that comes back gets its measured
/// capabilities without a restart. Ends when the partner is no longer in
/// use (removed or changed by a reload, or the gateway stopped).
async fn recheck(partner: std::sync::Weak<Partner>) {
    let mut pause = RECHECK_FIRST_PAUSE;
    loop {
        tokio::time::sleep(pause).await;
        let Some(partner) = partner.upgrade() else {
            return;
        };
        if let Ok(Ok(_)) =
            tokio::time::timeout(STARTUP_CHECK_TIMEOUT, partner.connector.check()).await
        {
            tracing::info!(partner = %partner.id, "partner checked after it came back");
            return;
        }
        pause = (pause * 2).min(RECHECK_MAX_PAUSE);
    }
}

/// Builds partner `index` of `loaded` as configured: its connector (as its
/// kind read it, credentials resolved), guard, deadline and disclosure
/// settings.
pub async fn build_partner(loaded: &LoadedConfig, index: usize) -> Result<Partner, StartError> {
    let partner = &loaded.config.partners[index];
    let id = partner.id.get_ref().clone();
    let failed = |source| StartError::Connector {
        partner: id.clone(),
        source,
    };
    let connector = partner
        .connector_config()
        .ok_or_else(|| failed(ConnectorError::Config("the connector was not read".into())))?
        .build()
        .await
        .map_err(failed)?;
    Ok(Partner {
        generation: Partner::next_generation(),
        name: partner.name.clone(),
        connector,
        guard: Guard::new(partner.protection),
        deadline: partner.deadline(),
        control: partner.count_control(),
        budget: partner.budget,
        mapping: MappingOptions {
            utc_offset: partner
                .utc_offset
                .as_ref()
                .and_then(|o| parse_utc_offset(o.get_ref())),
        },
        id,
    })
}
