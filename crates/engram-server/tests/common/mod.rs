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
use tonic::service::interceptor::InterceptedService;
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
    /// Shared with the replicas started on the same database.
    pub database: std::sync::Arc<TestDatabase>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    pub async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    /// Starts a server whose settings `adjust` may change (e.g. a small cap).
    pub async fn start_with(backend: Backend, adjust: impl FnOnce(&mut Settings)) -> Self {
        let database = std::sync::Arc::new(TestDatabase::create(backend).await);
        Self::start_on(database, adjust).await
    }

    /// Another server on this one's database, as a second replica is.
    pub async fn replica(&self) -> Self {
        Self::start_on(self.database.clone(), |_| {}).await
    }

    async fn start_on(
        database: std::sync::Arc<TestDatabase>,
        adjust: impl FnOnce(&mut Settings),
    ) -> Self {
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

pub type Authorized = InterceptedService<
    Channel,
    Box<dyn FnMut(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> + Send>,
>;

/// A channel that sends `Bearer {token}` in every call's metadata (none without a token).
pub fn with_token(channel: Channel, token: Option<&str>) -> Authorized {
    let header: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
        token.map(|token| format!("Bearer {token}").parse().expect("header"));
    InterceptedService::new(
        channel,
        Box::new(move |mut request: tonic::Request<()>| {
            if let Some(header) = &header {
                request
                    .metadata_mut()
                    .insert("authorization", header.clone());
            }
            Ok(request)
        }),
    )
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

/// The `engram` binary running as its own process, its log captured.
pub struct EngramProcess {
    pub child: std::process::Child,
    pub address: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl EngramProcess {
    /// Runs `engram ARGS` with exactly `env` (plus PATH) and waits for its listen address.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_engram"))
            .args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn engram");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (found, address) = std::sync::mpsc::channel();
        for stream in [
            Box::new(child.stderr.take().expect("stderr")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().expect("stdout")),
        ] {
            let (log, found) = (log.clone(), found.clone());
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    if let Some(at) = line
                        .split("address=")
                        .nth(1)
                        .filter(|_| line.contains("engram serving"))
                    {
                        let _ = found.send(
                            at.trim_matches('"')
                                .split_whitespace()
                                .next()
                                .unwrap_or_default()
                                .to_owned(),
                        );
                    }
                    log.lock().expect("log").push_str(&(line + "\n"));
                }
            });
        }
        let address = address
            .recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!(
                    "engram did not start; its log:\n{}",
                    log.lock().expect("log")
                )
            });
        Self {
            child,
            address: address.parse().expect("listen address"),
            log,
        }
    }

    /// `engram serve` on a free loopback port over `database_url`.
    pub fn serve(database_url: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn(
            &[
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
            ],
            env,
        )
    }

    pub fn log(&self) -> String {
        self.log.lock().expect("log").clone()
    }

    /// Sends SIGTERM, as Kubernetes does before it kills a pod.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait(&mut self, limit: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "engram did not exit within {limit:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    pub async fn client(&self) -> MemoryServiceClient<Channel> {
        MemoryServiceClient::new(connect(self.address).await)
    }
}

impl Drop for EngramProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The readiness status of a server, or None when it does not answer.
pub async fn readiness(address: SocketAddr) -> Option<i32> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let reply = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "readiness".to_owned(),
        })
        .await
        .ok()?;
    Some(reply.into_inner().status)
}

pub const SERVING: i32 = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
pub const NOT_SERVING: i32 =
    tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;

/// Polls `check` every 100 ms until it holds, at most `limit`; false when it never did.
pub async fn eventually<F: std::future::Future<Output = bool>>(
    limit: std::time::Duration,
    mut check: impl FnMut() -> F,
) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    false
}

/// A PostgreSQL cluster of the test's own, which it may stop and start (outage tests).
pub struct PrivatePostgres {
    pub directory: tempfile::TempDir,
    pub port: u16,
    bin: std::path::PathBuf,
}

impl PrivatePostgres {
    pub fn start() -> Self {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.filter_map(Result::ok).map(|entry| entry.path().join("bin")).filter(|bin| bin.join("initdb").exists()).max())
            .expect("PostgreSQL server binaries under /usr/lib/postgresql (scripts/test.sh installs them)");
        let directory = tempfile::tempdir().expect("temp dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("free port")
            .local_addr()
            .expect("port")
            .port();
        let cluster = Self {
            directory,
            port,
            bin,
        };
        if is_root() {
            run(std::process::Command::new("chown")
                .args(["-R", "postgres"])
                .arg(cluster.directory.path()));
        }
        run(cluster
            .as_owner(&cluster.bin.join("initdb"))
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "-D"])
            .arg(cluster.data()));
        cluster.start_server();
        cluster
    }

    fn data(&self) -> std::path::PathBuf {
        self.directory.path().join("data")
    }

    fn as_owner(&self, program: &std::path::Path) -> std::process::Command {
        if is_root() {
            let mut command = std::process::Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(program);
            command
        } else {
            std::process::Command::new(program)
        }
    }

    pub fn start_server(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.directory.path().display()
        );
        run(self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.directory.path().join("log"))
            .args(["-w", "-o", &options, "start"]));
    }

    pub fn stop_server(&self) {
        run(self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"]));
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

fn run(command: &mut std::process::Command) {
    let output = command.output().expect("run");
    assert!(
        output.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
