//! Authentication, roles, limits and the secure defaults, on the real binary.

mod common;

use std::time::Duration;

use common::{Backend, EngramProcess, TestDatabase, eventually, memory, store_request, with_token};
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use engram_proto::toolconfig::v1 as tools;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

const AGENT_TOKEN: &str = "agent-token-marmalade";
const ADMIN_TOKEN: &str = "admin-token-periwinkle";
const ROTATED_TOKEN: &str = "admin-token-tangerine";

/// A channel to the server once it reports ready, as a client behind a probe would see it.
async fn channel(server: &EngramProcess) -> Channel {
    let address = server.address;
    assert!(
        eventually(Duration::from_secs(30), || async move {
            common::readiness(address).await == Some(common::SERVING)
        })
        .await
    );
    Channel::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

fn reason(status: &tonic::Status) -> String {
    status
        .get_error_details()
        .error_info()
        .map(|info| info.reason.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_decide_tenant_and_role_and_rotate_without_restart() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let secrets = tempfile::tempdir().unwrap();
    let admin_file = secrets.path().join("admin-token");
    std::fs::write(&admin_file, format!("{ADMIN_TOKEN}\n")).unwrap();
    let tokens = format!(
        "acme:agent:env://ACME_TOKEN;ops:admin:file://{}",
        admin_file.display()
    );
    let server = EngramProcess::serve(
        database.url(),
        &[
            ("ENGRAM_AUTH_TOKENS", &tokens),
            ("ACME_TOKEN", AGENT_TOKEN),
            ("RUST_LOG", "debug"),
        ],
    );
    let channel = channel(&server).await;

    let mut anonymous = MemoryServiceClient::new(with_token(channel.clone(), None));
    let refused = anonymous
        .store_memory(store_request("s1", memory("no token")))
        .await
        .unwrap_err();
    assert_eq!(
        (refused.code(), reason(&refused).as_str()),
        (Code::Unauthenticated, "MISSING_CREDENTIALS")
    );
    let mut forger =
        MemoryServiceClient::new(with_token(channel.clone(), Some("agent-token-marmaladE")));
    let forged = forger
        .store_memory(store_request("s1", memory("bad token")))
        .await
        .unwrap_err();
    assert_eq!(
        (forged.code(), reason(&forged).as_str()),
        (Code::Unauthenticated, "INVALID_TOKEN")
    );

    let mut agent = MemoryServiceClient::new(with_token(channel.clone(), Some(AGENT_TOKEN)));
    agent
        .store_memory(store_request("s1", memory("stored by an agent")))
        .await
        .expect("agents store");
    let everywhere = pb::PurgeMemoriesRequest {
        parent: "sessions/-".to_owned(),
        filter: "state = EXPIRED".to_owned(),
        force: false,
    };
    let denied = agent.purge_memories(everywhere.clone()).await.unwrap_err();
    assert_eq!(
        (denied.code(), reason(&denied).as_str()),
        (Code::PermissionDenied, "ADMIN_ROLE_REQUIRED")
    );
    let mut agent_tools = tools::tool_config_service_client::ToolConfigServiceClient::new(
        with_token(channel.clone(), Some(AGENT_TOKEN)),
    );
    assert_eq!(
        agent_tools
            .list_tools(tools::ListToolsRequest::default())
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );

    let mut admin = MemoryServiceClient::new(with_token(channel.clone(), Some(ADMIN_TOKEN)));
    admin
        .purge_memories(everywhere.clone())
        .await
        .expect("admins purge across sessions");
    let mut admin_tools = tools::tool_config_service_client::ToolConfigServiceClient::new(
        with_token(channel.clone(), Some(ADMIN_TOKEN)),
    );
    assert!(
        !admin_tools
            .list_tools(tools::ListToolsRequest::default())
            .await
            .expect("admins read tools")
            .into_inner()
            .tools
            .is_empty()
    );

    // Health and reflection stay open for probes and grpcurl.
    assert_eq!(
        common::readiness(server.address).await,
        Some(common::SERVING)
    );

    // A rotated token file takes effect without a restart.
    std::fs::write(&admin_file, ROTATED_TOKEN).unwrap();
    let rotated = eventually(Duration::from_secs(15), || {
        let channel = channel.clone();
        async move {
            let mut old = MemoryServiceClient::new(with_token(channel.clone(), Some(ADMIN_TOKEN)));
            let mut new = MemoryServiceClient::new(with_token(channel, Some(ROTATED_TOKEN)));
            old.purge_memories(pb::PurgeMemoriesRequest {
                parent: "sessions/-".into(),
                filter: "*".into(),
                force: false,
            })
            .await
            .is_err()
                && new
                    .purge_memories(pb::PurgeMemoriesRequest {
                        parent: "sessions/-".into(),
                        filter: "*".into(),
                        force: false,
                    })
                    .await
                    .is_ok()
        }
    })
    .await;
    assert!(rotated, "the old token stops and the new one works");

    let log = server.log();
    for secret in [AGENT_TOKEN, ADMIN_TOKEN, ROTATED_TOKEN] {
        assert!(!log.contains(secret), "a token leaked into the log");
        for status in [&refused, &forged, &denied] {
            assert!(!status.message().contains(secret));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_beyond_loopback_needs_authentication_or_an_explicit_flag() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_engram"))
        .args([
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--database-url",
            database.url(),
        ])
        .env_remove("ENGRAM_AUTH_TOKENS")
        .output()
        .expect("run engram");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("refusing to serve on 0.0.0.0")
            && stderr.contains("--allow-unauthenticated"),
        "{stderr}"
    );

    // The explicit flag starts it; only its loopback side is ever called.
    let mut open = EngramProcess::spawn(
        &[
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--allow-unauthenticated",
            "--database-url",
            database.url(),
        ],
        &[],
    );
    let port = open.address.port();
    assert!(
        eventually(Duration::from_secs(30), || async move {
            common::readiness(([127, 0, 0, 1], port).into()).await == Some(common::SERVING)
        })
        .await
    );
    let mut client = MemoryServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .expect("connect on loopback");
    client
        .store_memory(store_request("s1", memory("open on purpose")))
        .await
        .expect("store");
    open.terminate();
    assert!(open.wait(Duration::from_secs(30)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_refuse_with_resource_exhausted_and_reflection_can_be_off() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let server = EngramProcess::serve(
        database.url(),
        &[
            ("ENGRAM_RATE_LIMIT_PER_SECOND", "1"),
            ("ENGRAM_RATE_LIMIT_BURST", "3"),
            ("ENGRAM_REFLECTION", "false"),
            ("ENGRAM_MAX_MESSAGE_BYTES", "2048"),
        ],
    );
    let mut client = MemoryServiceClient::new(channel(&server).await);
    let mut refusals = Vec::new();
    for index in 0..6 {
        if let Err(status) = client
            .store_memory(store_request("limited", memory(&format!("memory {index}"))))
            .await
        {
            refusals.push(status);
        }
    }
    assert!(
        !refusals.is_empty(),
        "a burst of 3 at 1/s cannot admit 6 calls at once"
    );
    for status in &refusals {
        assert_eq!(
            (status.code(), reason(status).as_str()),
            (Code::ResourceExhausted, "RATE_LIMITED")
        );
        let delay = status
            .get_error_details()
            .retry_info()
            .and_then(|info| info.retry_delay)
            .expect("RetryInfo");
        assert!(
            delay > Duration::ZERO && delay <= Duration::from_secs(1),
            "{delay:?}"
        );
    }

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let oversized = client
        .store_memory(store_request("limited", memory(&"x".repeat(4096))))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::OutOfRange, "{oversized:?}");

    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel(&server).await,
        );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let answer = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await;
    assert_eq!(
        answer.map(|_| ()).unwrap_err().code(),
        Code::Unimplemented,
        "reflection is off"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_over_its_concurrency_is_shed_not_queued() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let server = EngramProcess::serve(
        database.url(),
        &[("ENGRAM_MAX_CONCURRENT_REQUESTS_PER_CONNECTION", "1")],
    );
    let client = MemoryServiceClient::new(channel(&server).await);
    let calls: Vec<_> = (0..200)
        .map(|index| {
            let mut client = client.clone();
            tokio::spawn(async move {
                client
                    .store_memory(store_request(
                        &format!("shed-{index}"),
                        memory("concurrent"),
                    ))
                    .await
            })
        })
        .collect();
    let mut shed = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => {}
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                shed += 1;
            }
        }
    }
    assert!(
        shed > 0,
        "200 calls at once on one connection with a limit of 1"
    );
}
