//! The process: connect, migrate, then serve MemoryService, health and reflection until
//! shutdown, with the sweeper running beside it.

use std::future::Future;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use engram_proto::memory::v1::memory_service_server::MemoryServiceServer;
use migration::{Migrator, MigratorTrait};
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic_health::ServingStatus;

use crate::service::MemoryApi;
use crate::settings::Settings;
use crate::store::{self, MemoryStore, Policy};

/// Health service name probes ask for readiness (conventions: `readiness`).
pub const READINESS_SERVICE: &str = "readiness";

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sea_orm::DbErr),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[source] sea_orm::DbErr),
    #[error("server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

pub async fn connect_and_migrate(settings: &Settings) -> Result<DatabaseConnection, StartError> {
    let db = store::connect(&settings.database_url, settings.database_max_connections)
        .await
        .map_err(StartError::Connect)?;
    Migrator::up(&db, None).await.map_err(StartError::Migrate)?;
    Ok(db)
}

pub fn policy(settings: &Settings) -> Policy {
    Policy {
        max_entries: settings.memory_max_entries as usize,
        similarity_max_distance: settings.similarity_max_distance,
        soft_delete_retention: ChronoDuration::days(i64::from(settings.soft_delete_retention_days)),
        cleanup_after: ChronoDuration::days(i64::from(settings.memory_cleanup_days)),
    }
}

/// Serves on `listener` until `shutdown` completes, then lets in-flight calls finish.
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let db = connect_and_migrate(&settings).await?;
    let store = MemoryStore::new(db, policy(&settings));

    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let sweeper = tokio::spawn(crate::sweeper::run(
        store.clone(),
        Duration::from_secs(u64::from(settings.sweep_interval_seconds)),
    ));
    health.set_serving::<MemoryServiceServer<MemoryApi>>().await;
    health.set_service_status("", ServingStatus::Serving).await;
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::Serving)
        .await;

    tracing::info!(address = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "engram serving");
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(MemoryServiceServer::new(MemoryApi::new(store, &settings)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await;
    sweeper.abort();
    tracing::info!("engram stopped");
    Ok(result?)
}
