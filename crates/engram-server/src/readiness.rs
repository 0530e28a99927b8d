//! Readiness follows the database: SERVING only while it answers and its schema is current,
//! so a replica never serves an old schema while a migration Job runs, and drops out of
//! the load balancer during an outage, coming back by itself. Liveness (`""`) never
//! depends on the database.

use std::time::Duration;

use engram_proto::memory::v1::memory_service_server::MemoryServiceServer;
use migration::{Migrator, MigratorTrait};
use sea_orm::{DatabaseConnection, DbBackend};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::service::MemoryApi;

/// Health service name that readiness probes ask for.
pub const READINESS_SERVICE: &str = "readiness";

/// Polls the database every `interval`, applying pending migrations first when asked to,
/// and reports readiness to the health service and to `ready_flag` (which the sweeper
/// follows). Runs until the task is dropped.
pub async fn watch(
    db: DatabaseConnection,
    health: HealthReporter,
    ready_flag: tokio::sync::watch::Sender<bool>,
    migrate: bool,
    interval: Duration,
) {
    let mut migrated = !migrate;
    let mut was_ready = None;
    loop {
        if !migrated {
            match crate::server::apply_migrations(&db).await {
                Ok(()) => migrated = true,
                Err(error) => tracing::warn!(%error, "migrations not applied yet; retrying"),
            }
        }
        let ready = migrated
            && match schema_is_current(&db).await {
                Ok(()) => true,
                Err(why) => {
                    // Once per outage, not every interval.
                    if was_ready != Some(false) {
                        tracing::warn!(%why, "readiness check failed");
                    }
                    false
                }
            };
        if was_ready != Some(ready) {
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            health.set_service_status(READINESS_SERVICE, status).await;
            if ready {
                health.set_serving::<MemoryServiceServer<MemoryApi>>().await;
            } else {
                health
                    .set_not_serving::<MemoryServiceServer<MemoryApi>>()
                    .await;
            }
            ready_flag.send_replace(ready);
            tracing::info!(ready, "readiness changed");
            was_ready = Some(ready);
        }
        record_pool_use(&db);
        tokio::time::sleep(interval).await;
    }
}

/// Reachable, and every migration this binary knows is applied; if not, why.
async fn schema_is_current(db: &DatabaseConnection) -> Result<(), String> {
    db.ping().await.map_err(|error| format!("ping: {error}"))?;
    let pending = Migrator::get_pending_migrations_read_only(db)
        .await
        .map_err(|error| format!("reading the applied migrations: {error}"))?;
    match pending.len() {
        0 => Ok(()),
        count => Err(format!("{count} migrations not applied")),
    }
}

fn record_pool_use(db: &DatabaseConnection) {
    let (size, idle) = match db.get_database_backend() {
        DbBackend::Postgres => {
            let pool = db.get_postgres_connection_pool();
            (pool.size(), pool.num_idle())
        }
        DbBackend::Sqlite => {
            let pool = db.get_sqlite_connection_pool();
            (pool.size(), pool.num_idle())
        }
        _ => return,
    };
    metrics::gauge!("engram_db_pool_connections", "state" => "idle").set(idle as f64);
    metrics::gauge!("engram_db_pool_connections", "state" => "busy")
        .set(f64::from(size) - idle as f64);
}
