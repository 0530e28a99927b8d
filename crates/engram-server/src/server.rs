//! The process: serve MemoryService, health and reflection until shutdown, with the
//! readiness watcher (which also migrates) and the sweeper running beside it.

use std::future::Future;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use engram_proto::memory::v1::memory_service_server::MemoryServiceServer;
use engram_proto::toolconfig::v1::tool_config_service_server::ToolConfigServiceServer;
use sea_orm::{DatabaseConnection, DbErr};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::readiness::{self, READINESS_SERVICE};
use crate::service::MemoryApi;
use crate::settings::Settings;
use crate::store::{self, MemoryStore, Policy};
use crate::telemetry::RpcObservabilityLayer;

/// How often readiness re-checks the database.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot open the database: {0}")]
    Connect(#[source] DbErr),
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("{0}")]
    Metrics(String),
    #[error(transparent)]
    ToolConfig(#[from] crate::toolconfig::SecretError),
}

/// Brings the schema up to date (the binary's `migrate` and `serve` both use this): under
/// the PostgreSQL migration lock, adopting a database of the Python system first.
pub async fn apply_migrations(db: &DatabaseConnection) -> Result<(), DbErr> {
    migration::migrate_up(db).await
}

pub fn policy(settings: &Settings) -> Policy {
    Policy {
        max_entries: settings.memory_max_entries as usize,
        similarity_max_distance: settings.similarity_max_distance,
        soft_delete_retention: ChronoDuration::days(i64::from(settings.soft_delete_retention_days)),
        cleanup_after: ChronoDuration::days(i64::from(settings.memory_cleanup_days)),
    }
}

/// Serves on `listener` until `shutdown` completes. Then readiness turns NOT_SERVING,
/// after `shutdown_drain_seconds` new calls are refused, and in-flight calls get
/// `shutdown_timeout_seconds` to finish.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let tool_config = crate::toolconfig::ToolConfigApi::start(&settings).await?;
    let db = store::connect(&settings.database_url, settings.database_max_connections)
        .await
        .map_err(StartError::Connect)?;
    if let Some(address) = settings.metrics_listen {
        crate::telemetry::serve_metrics(address).map_err(StartError::Metrics)?;
    }
    let store = MemoryStore::new(db.clone(), policy(&settings));

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<MemoryServiceServer<MemoryApi>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let (ready_flag, ready) = tokio::sync::watch::channel(false);
    let background = [
        tokio::spawn(readiness::watch(
            db,
            health.clone(),
            ready_flag,
            settings.migrate_on_start,
            READINESS_INTERVAL,
        )),
        tokio::spawn(crate::sweeper::run(
            store.clone(),
            ready,
            Duration::from_secs(u64::from(settings.sweep_interval_seconds)),
        )),
    ];

    let drain = Duration::from_secs(u64::from(settings.shutdown_drain_seconds));
    let (accepting, accepting_changes) = tokio::sync::watch::channel(true);
    tokio::spawn(async move {
        shutdown.await;
        for task in &background {
            task.abort();
        }
        health
            .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
            .await;
        health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        health
            .set_not_serving::<MemoryServiceServer<MemoryApi>>()
            .await;
        tracing::info!(
            drain_seconds = drain.as_secs(),
            "shutting down: readiness NOT_SERVING"
        );
        tokio::time::sleep(drain).await;
        let _ = accepting.send(false);
    });
    let stopped_accepting = move || {
        let mut changes = accepting_changes.clone();
        async move {
            let _ = changes.wait_for(|accepting| !accepting).await;
        }
    };

    let address = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    tracing::info!(%address, "engram serving");
    let server = tonic::transport::Server::builder()
        // Clients reconnect now and then, so new replicas behind a Kubernetes Service get
        // their share of long-lived HTTP/2 connections; the grace lets calls finish.
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .layer(RpcObservabilityLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(MemoryServiceServer::new(MemoryApi::new(store, &settings)))
        .add_service(ToolConfigServiceServer::new(tool_config))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped_accepting());
    let finish = Duration::from_secs(u64::from(settings.shutdown_timeout_seconds));
    let result = tokio::select! {
        result = server => result,
        () = async { stopped_accepting().await; tokio::time::sleep(finish).await } => {
            tracing::warn!(timeout_seconds = finish.as_secs(), "in-flight calls did not finish in time; stopping anyway");
            Ok(())
        }
    };
    tracing::info!("engram stopped");
    Ok(result?)
}
