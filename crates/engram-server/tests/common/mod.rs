//! A real Engram server on 127.0.0.1:0 over a real database, driven by the generated client.
//!
//! PostgreSQL tests create a fresh database on the server named by ENGRAM_TEST_PG_URL
//! (default postgres://postgres@127.0.0.1:5432/postgres); `scripts/test.sh` starts a private
//! cluster and sets it when none is running. They fail, never skip, when it is unreachable.

#![allow(dead_code)]

use std::net::SocketAddr;

use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use engram_server::settings::Settings;
use sea_orm::{ConnectionTrait, Database};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where a test's database lives; dropped with the test.
pub enum TestDatabase {
    Sqlite {
        _directory: tempfile::TempDir,
        url: String,
    },
    Postgres {
        admin_url: String,
        name: String,
        url: String,
    },
}

pub fn postgres_admin_url() -> String {
    std::env::var("ENGRAM_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

impl TestDatabase {
    pub async fn create(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let directory = tempfile::tempdir().expect("temp dir");
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    directory.path().join("engram.db").display()
                );
                TestDatabase::Sqlite {
                    _directory: directory,
                    url,
                }
            }
            Backend::Postgres => {
                let admin_url = postgres_admin_url();
                let name = format!("engram_test_{}", uuid::Uuid::new_v4().simple());
                let admin = Database::connect(&admin_url).await.unwrap_or_else(|error| {
                    panic!("PostgreSQL at ENGRAM_TEST_PG_URL={admin_url} is unreachable ({error}); run scripts/test.sh")
                });
                admin
                    .execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .expect("create test database");
                let url = replace_database(&admin_url, &name);
                TestDatabase::Postgres {
                    admin_url,
                    name,
                    url,
                }
            }
        }
    }

    pub fn url(&self) -> &str {
        match self {
            TestDatabase::Sqlite { url, .. } | TestDatabase::Postgres { url, .. } => url,
        }
    }

    /// The SQLite file, for tests that inspect it.
    pub fn sqlite_path(&self) -> Option<std::path::PathBuf> {
        match self {
            TestDatabase::Sqlite { _directory, .. } => Some(_directory.path().join("engram.db")),
            TestDatabase::Postgres { .. } => None,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let TestDatabase::Postgres {
            admin_url, name, ..
        } = self
        {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs inside the test's runtime: use a thread with its own.
            let _ = std::thread::spawn(move || {
                tokio::runtime::Runtime::new()
                    .expect("runtime")
                    .block_on(async {
                        if let Ok(admin) = Database::connect(&admin_url).await {
                            let _ = admin
                                .execute_unprepared(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await;
                        }
                    })
            })
            .join();
        }
    }
}

fn replace_database(url: &str, database: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(base, query)| (base, Some(query)));
    let base = base.rsplit_once('/').map_or(base, |(prefix, _)| prefix);
    match query {
        Some(query) => format!("{base}/{database}?{query}"),
        None => format!("{base}/{database}"),
    }
}

pub struct TestServer {
    pub address: SocketAddr,
    pub client: MemoryServiceClient<Channel>,
    pub channel: Channel,
    pub database: TestDatabase,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a server whose settings `adjust` may change (e.g. a small cap).
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> Self {
        let database = TestDatabase::create(backend).await;
        let mut settings = Settings {
            database_url: database.url().to_owned(),
            ..Settings::default()
        };
        adjust(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let address = listener.local_addr().expect("address");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            engram_server::server::serve(settings, listener, async {
                let _ = stop.await;
            })
            .await
            .expect("server runs");
        });
        let channel = connect(address).await;
        Self {
            address,
            client: MemoryServiceClient::new(channel.clone()),
            channel,
            database,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

/// Connects once the server listens (it migrates before it accepts calls).
async fn connect(address: SocketAddr) -> Channel {
    let endpoint = Channel::from_shared(format!("http://{address}")).expect("endpoint");
    for _ in 0..200 {
        if let Ok(channel) = endpoint.connect().await {
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            let ready = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: "readiness".to_owned(),
                })
                .await
                .is_ok_and(|reply| {
                    reply.into_inner().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
                });
            if ready {
                return channel;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("server on {address} did not become ready");
}

pub fn memory(content: &str) -> pb::Memory {
    pb::Memory {
        content: content.to_owned(),
        ..Default::default()
    }
}

pub fn store_request(session: &str, memory: pb::Memory) -> pb::StoreMemoryRequest {
    pb::StoreMemoryRequest {
        parent: format!("sessions/{session}"),
        memory: Some(memory),
        request_id: String::new(),
    }
}

/// The BadRequest field paths of a rejected call, asserting the rest of AIP-193's shape.
pub fn field_violations(status: &tonic::Status) -> Vec<String> {
    use tonic_types::StatusExt;
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let info = details.error_info().expect("ErrorInfo on every error");
    assert_eq!(info.domain, "engram.dev");
    details
        .bad_request()
        .expect("BadRequest on invalid input")
        .field_violations
        .iter()
        .map(|violation| violation.field.clone())
        .collect()
}

/// The ErrorInfo reason of a failed call.
pub fn reason(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_error_details()
        .error_info()
        .expect("ErrorInfo on every error")
        .reason
        .clone()
}

/// Runs each listed test against SQLite and against PostgreSQL.
#[macro_export]
macro_rules! on_both_backends {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test($crate::common::Backend::Postgres).await;
                }
            )*
        }
    };
}
