//! The background sweep: expired, purgeable and stale memories leave the database.

use std::time::Duration;

use chrono::Utc;

use crate::store::MemoryStore;

/// Sweeps every `interval` while the service is ready, until the task is dropped. Failures are logged and retried on the
/// next tick: a sweep only deletes what is already invisible or due, so a missed one is harmless.
pub async fn run(
    store: MemoryStore,
    ready: tokio::sync::watch::Receiver<bool>,
    interval: Duration,
) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        // Only on a current schema: a replica that starts before the migration must not sweep.
        if !*ready.borrow() {
            continue;
        }
        match store.sweep(Utc::now()).await {
            Ok(report) => {
                for (kind, count) in [
                    ("expired", report.expired),
                    ("purged_deleted", report.purged_deleted),
                    ("stale", report.stale),
                    ("request_log", report.request_log),
                ] {
                    metrics::counter!("engram_sweeper_deleted_total", "kind" => kind)
                        .increment(count);
                }
                tracing::debug!(
                    expired = report.expired,
                    purged_deleted = report.purged_deleted,
                    stale = report.stale,
                    request_log = report.request_log,
                    "sweep finished"
                )
            }
            Err(error) => tracing::warn!(%error, "sweep failed; retrying next interval"),
        }
    }
}
