//! The process: serve MemoryService, health and reflection until shutdown, with the
//! readiness watcher (which also migrates) and the sweeper running beside it.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::Duration as ChronoDuration;
use engram_proto::memory::v1::memory_service_server::MemoryServiceServer;
use engram_proto::toolconfig::v1::tool_config_service_server::ToolConfigServiceServer;
use sea_orm::{DatabaseConnection, DbErr};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic_health::ServingStatus;
use tonic_reflection::pb::{v1, v1alpha};

use crate::auth::{self, Authenticator};
use crate::readiness::{self, READINESS_SERVICE};
use crate::service::MemoryApi;
use crate::settings::Settings;
use crate::store::{self, MemoryStore, Policy};
use crate::telemetry::RpcObservabilityLayer;
use crate::write_behind::WriteBehind;

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
    Secret(#[from] crate::secrets::SecretError),
    #[error("invalid TLS setting: {0}")]
    Tls(String),
    #[error("{0}")]
    SqliteClaimed(String),
    #[error("cannot read the listen address: {0}")]
    Listen(#[source] std::io::Error),
    #[error(
        "refusing to serve on {0} without authentication: configure auth_tokens (ENGRAM_AUTH_TOKENS) \
         or set ENGRAM_ALLOW_UNAUTHENTICATED=true (--allow-unauthenticated)"
    )]
    Unauthenticated(std::net::SocketAddr),
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
    let authenticator = Authenticator::start(
        &settings.auth_tokens,
        &settings.auth_clients,
        auth::quota(settings.rate_limit_per_second, settings.rate_limit_burst),
    )
    .await?;
    let listening_on = listener.local_addr().map_err(StartError::Listen)?;
    if !listening_on.ip().is_loopback()
        && !authenticator.is_enforcing()
        && !settings.allow_unauthenticated
    {
        return Err(StartError::Unauthenticated(listening_on));
    }
    let db = store::connect(&settings.database_url, settings.database_max_connections)
        .await
        .map_err(StartError::Connect)?;
    // Held until serving ends (`connect` has made the file's directory).
    let _sqlite_claim =
        store::claim_sqlite_file(&settings.database_url).map_err(StartError::SqliteClaimed)?;
    if let Some(address) = settings.metrics_listen {
        crate::telemetry::serve_metrics(address).map_err(StartError::Metrics)?;
    }
    let cache_bytes = usize::try_from(settings.session_cache_mib).unwrap_or(usize::MAX) << 20;
    let writer = store::connect_writer(&settings.database_url, &db).map_err(StartError::Connect)?;
    let store = MemoryStore::new(db.clone(), writer, policy(&settings), cache_bytes);
    let store_at_exit = store.clone();

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(READINESS_SERVICE, ServingStatus::NotServing)
        .await;
    health
        .set_not_serving::<MemoryServiceServer<MemoryApi>>()
        .await;
    let (reflection_v1, reflection_v1alpha) = if settings.reflection {
        let (v1, v1alpha) = reflection()?;
        (Some(v1), Some(v1alpha))
    } else {
        (None, None)
    };

    let (ready_flag, ready) = tokio::sync::watch::channel(false);
    let ready_for_calls = ready.clone();
    let refresher = authenticator.clone();
    let background = [
        // File-backed tokens are re-read, so a rotated Secret takes effect without a restart.
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(auth::TOKEN_REFRESH_INTERVAL).await;
                refresher.refresh().await;
            }
        }),
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

    tracing::info!(address = %listening_on, "engram serving");
    let max_message = settings.max_message_bytes as usize;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls_config(&settings)? {
        builder = builder.tls_config(tls)?;
    }
    let server = builder
        // Clients reconnect now and then, so new replicas behind a Kubernetes Service get
        // their share of long-lived HTTP/2 connections; the grace lets calls finish.
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .timeout(Duration::from_secs(u64::from(
            settings.request_timeout_seconds,
        )))
        .concurrency_limit_per_connection(settings.max_concurrent_requests_per_connection as usize)
        .load_shed(true)
        .layer(RpcObservabilityLayer)
        .add_service(health_service)
        .add_optional_service(reflection_v1)
        .add_optional_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            MemoryServiceServer::new(MemoryApi::new(store, &settings))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
            admission(authenticator.clone(), Access::Memories(ready_for_calls)),
        ))
        .add_service(InterceptedService::new(
            ToolConfigServiceServer::new(tool_config),
            admission(authenticator, Access::AdminOnly),
        ))
        // TCP_NODELAY: Nagle would hold a response's last bytes for the client's delayed
        // ACK (40 ms a call); coalescing is `WriteBehind`'s.
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener)
                .with_nodelay(Some(true))
                .map(|accepted| accepted.map(WriteBehind::new)),
            stopped_accepting(),
        );
    let finish = Duration::from_secs(u64::from(settings.shutdown_timeout_seconds));
    let result = tokio::select! {
        result = server => result,
        () = async { stopped_accepting().await; tokio::time::sleep(finish).await } => {
            tracing::warn!(timeout_seconds = finish.as_secs(), "in-flight calls did not finish in time; stopping anyway");
            Ok(())
        }
    };
    // Accesses are written behind: the last ones go to the database before the process ends.
    if let Err(error) = store_at_exit.flush_accesses().await {
        tracing::warn!(%error, "writing the last access counts failed");
    }
    tracing::info!("engram stopped");
    Ok(result?)
}

/// Reflection v1 and v1alpha (grpcurl speaks only v1alpha) over every Engram and health proto.
#[allow(
    clippy::type_complexity,
    reason = "the reflection services' own opaque types"
)]
fn reflection() -> Result<
    (
        v1::server_reflection_server::ServerReflectionServer<
            impl v1::server_reflection_server::ServerReflection,
        >,
        v1alpha::server_reflection_server::ServerReflectionServer<
            impl v1alpha::server_reflection_server::ServerReflection,
        >,
    ),
    StartError,
> {
    let v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(engram_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    Ok((v1, v1alpha))
}

/// Who may call a service, and when.
#[derive(Clone)]
enum Access {
    /// Memory calls need the database: refused as UNAVAILABLE until readiness says so.
    Memories(tokio::sync::watch::Receiver<bool>),
    /// Admins only, whatever the database does.
    AdminOnly,
}

/// Authenticates each call (tokens, then the tenant's rate limit) and hands the caller to
/// the service in the request's extensions.
fn admission(
    authenticator: Arc<Authenticator>,
    access: Access,
) -> impl FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Clone {
    move |mut request: tonic::Request<()>| {
        let certificates = request.peer_certs();
        let client_certificate = certificates
            .as_deref()
            .and_then(|chain| chain.first())
            .map(|der| der.as_ref());
        let caller = authenticator.authenticate(request.metadata(), client_certificate)?;
        match &access {
            Access::Memories(ready) if !*ready.borrow() => return Err(not_ready()),
            Access::Memories(_) => {}
            Access::AdminOnly => auth::require_admin(&caller)?,
        }
        authenticator.admit(&caller)?;
        request.extensions_mut().insert(caller);
        Ok(request)
    }
}

/// A call that reached a replica before its database or schema is ready: retry elsewhere.
fn not_ready() -> tonic::Status {
    crate::error::status(
        tonic::Code::Unavailable,
        "the service is not ready: its database is unreachable or its schema is not current"
            .to_owned(),
        "NOT_READY",
        Default::default(),
        Vec::new(),
    )
}

/// The TLS identity, and the client CA that makes it mutual, when the settings name them.
fn tls_config(
    settings: &Settings,
) -> Result<Option<tonic::transport::ServerTlsConfig>, StartError> {
    let (Some(cert_file), Some(key_file)) = (&settings.tls_cert_file, &settings.tls_key_file)
    else {
        return Ok(None);
    };
    let read = |path: &std::path::PathBuf| {
        std::fs::read(path)
            .map_err(|error| StartError::Tls(format!("cannot read {}: {error}", path.display())))
    };
    let identity = tonic::transport::Identity::from_pem(read(cert_file)?, read(key_file)?);
    let mut config = tonic::transport::ServerTlsConfig::new().identity(identity);
    if let Some(ca_file) = &settings.tls_client_ca_file {
        config = config.client_ca_root(tonic::transport::Certificate::from_pem(read(ca_file)?));
    }
    Ok(Some(config))
}
