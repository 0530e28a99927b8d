//! The process around the service: readiness, SIGTERM under load, database outages and
//! several replicas on one PostgreSQL. These run the real `engram` binary.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{
    Backend, EngramProcess, NOT_SERVING, PrivatePostgres, SERVING, TestDatabase, eventually,
    memory, readiness, store_request,
};
use engram_proto::memory::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_calls_and_loses_nothing_acknowledged() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let url = database.url().to_owned();
    let mut server = EngramProcess::serve(&url, &[("ENGRAM_SHUTDOWN_DRAIN_SECONDS", "1")]);
    let client = server.client().await;
    let writers: Vec<_> = (0..8)
        .map(|writer| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for turn in 0.. {
                    // A session per store: the session cap must not evict what this test counts.
                    let request = store_request(
                        &format!("drain-{writer}-{turn}"),
                        memory("acknowledged before shutdown"),
                    );
                    match client.store_memory(request).await {
                        Ok(reply) => {
                            acknowledged.push(reply.into_inner().memory.expect("memory").name)
                        }
                        Err(status) => return (acknowledged, status),
                    }
                }
                unreachable!()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(800)).await;
    server.terminate();
    let address = server.address;
    assert!(
        eventually(Duration::from_secs(1), || async move {
            readiness(address).await == Some(NOT_SERVING)
        })
        .await,
        "readiness turns NOT_SERVING during the drain"
    );
    let status = server.wait(Duration::from_secs(30));
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        server.log()
    );

    let mut acknowledged = Vec::new();
    for writer in writers {
        let (names, refusal) = writer.await.expect("writer");
        assert!(
            matches!(refusal.code(), Code::Unavailable | Code::Cancelled)
                || refused_by_goaway(&refusal),
            "calls after shutdown are refused, not failed: {refusal:?}"
        );
        acknowledged.extend(names);
    }
    assert!(
        acknowledged.len() > 8,
        "the load ran ({} stores)",
        acknowledged.len()
    );

    let restarted = EngramProcess::serve(&url, &[]);
    let mut client = restarted.client().await;
    for name in &acknowledged {
        client
            .get_memory(pb::GetMemoryRequest { name: name.clone() })
            .await
            .unwrap_or_else(|status| panic!("{name} lost: {status:?}"));
    }
}

/// The call never reached the service: the GOAWAY of the server's graceful shutdown refused
/// its stream, so it is safe to retry. tonic's client reports that as INTERNAL "h2 protocol
/// error" (grpc-java once did the same and now says UNAVAILABLE: grpc/grpc-java#1355).
fn refused_by_goaway(status: &tonic::Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(h2) = error.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        }
        source = error.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_a_database_outage_and_calls_get_unavailable() {
    let cluster = PrivatePostgres::start();
    let server = EngramProcess::serve(&cluster.url(), &[]);
    let mut client = server.client().await;
    client
        .store_memory(store_request("outage", memory("before the outage")))
        .await
        .expect("store while up");

    cluster.stop_server();
    let address = server.address;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            readiness(address).await == Some(NOT_SERVING)
        })
        .await,
        "readiness turns NOT_SERVING while the database is down"
    );
    let mut request = tonic::Request::new(store_request("outage", memory("during the outage")));
    request.set_timeout(Duration::from_secs(8));
    let started = std::time::Instant::now();
    let refused = client
        .store_memory(request)
        .await
        .expect_err("no database, no store");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered before the deadline"
    );
    assert!(!refused.message().contains("during the outage"));

    cluster.start_server();
    assert!(
        eventually(Duration::from_secs(20), || async move {
            readiness(address).await == Some(SERVING)
        })
        .await,
        "readiness recovers by itself; log:\n{}",
        server.log()
    );
    client
        .store_memory(store_request("outage", memory("after the outage")))
        .await
        .expect("store after recovery");
    let listed = client
        .list_memories(pb::ListMemoriesRequest {
            parent: "sessions/outage".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.memories.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_waits_for_the_schema_when_a_job_migrates() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url().to_owned();
    let server = EngramProcess::serve(&url, &[("ENGRAM_MIGRATE_ON_START", "false")]);
    let address = server.address;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        readiness(address).await,
        Some(NOT_SERVING),
        "no schema yet: not ready"
    );
    let mut early = engram_proto::memory::v1::memory_service_client::MemoryServiceClient::connect(
        format!("http://{address}"),
    )
    .await
    .expect("connect");
    let refused = early
        .store_memory(store_request("early", memory("before the schema")))
        .await
        .expect_err("not ready");
    assert_eq!(
        refused.code(),
        Code::Unavailable,
        "calls before the schema is current are UNAVAILABLE: {refused:?}"
    );
    let migrate = std::process::Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(["migrate", "--database-url", &url])
        .output()
        .expect("engram migrate");
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    assert!(
        eventually(Duration::from_secs(10), || async move {
            readiness(address).await == Some(SERVING)
        })
        .await,
        "ready once the schema is current"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_on_one_postgres_make_one_row_and_sweep_safely() {
    let database = TestDatabase::create(Backend::Postgres).await;
    let url = database.url().to_owned();
    // Started together: each migrates at start, and all three sweep every second.
    let replicas: Vec<EngramProcess> = std::thread::scope(|scope| {
        let spawned: Vec<_> = (0..3)
            .map(|_| {
                let url = url.clone();
                scope.spawn(move || {
                    EngramProcess::serve(&url, &[("ENGRAM_SWEEP_INTERVAL_SECONDS", "1")])
                })
            })
            .collect();
        spawned
            .into_iter()
            .map(|replica| replica.join().expect("replica"))
            .collect()
    });
    let mut clients = Vec::new();
    for replica in &replicas {
        clients.push(replica.client().await);
    }

    let stores = (0..30).map(|index| {
        let mut client = clients[index % 3].clone();
        tokio::spawn(async move {
            client
                .store_memory(store_request(
                    "shared",
                    memory("Customer is on the premium plan"),
                ))
                .await
        })
    });
    let mut names = HashSet::new();
    let mut created = 0;
    for store in stores {
        let reply = store.await.expect("task").expect("store").into_inner();
        created += usize::from(!reply.deduplicated);
        names.insert(reply.memory.expect("memory").name);
    }
    assert_eq!(
        (names.len(), created),
        (1, 1),
        "one memory, created once, through three replicas"
    );

    let short = pb::Memory {
        expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        })),
        ..memory("expires soon")
    };
    clients[0]
        .store_memory(store_request("shared", short))
        .await
        .expect("store");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut client = clients[1].clone();
    let swept = eventually(Duration::from_secs(10), || {
        let mut client = client.clone();
        async move {
            let purge = pb::PurgeMemoriesRequest {
                parent: "sessions/shared".to_owned(),
                filter: "state = EXPIRED".to_owned(),
                force: false,
            };
            client
                .purge_memories(purge)
                .await
                .is_ok_and(|reply| reply.into_inner().purge_count == 0)
        }
    })
    .await;
    assert!(swept, "a replica's sweeper removed the expired memory");
    let listed = client
        .list_memories(pb::ListMemoriesRequest {
            parent: "sessions/shared".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.memories.len(), 1);
    for replica in &replicas {
        let log = replica.log();
        assert!(
            !log.contains("ERROR") && !log.contains("sweep failed") && !log.contains("panicked"),
            "replica log:\n{log}"
        );
    }
}

/// The checkpoint sequence in the header of SQLite's write-ahead log: it goes up each time
/// the log starts over from its first frame (None before the log has a header). Reads the
/// header only: the log this test guards against runs to hundreds of megabytes.
fn write_ahead_log_sequence(wal: &std::path::Path) -> Option<u32> {
    use std::io::Read;
    let mut header = [0u8; 16];
    std::fs::File::open(wal)
        .ok()?
        .read_exact(&mut header)
        .ok()?;
    Some(u32::from_be_bytes(header[12..16].try_into().ok()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_write_ahead_log_starts_over_under_stores_that_never_pause() {
    let database = TestDatabase::create(Backend::Sqlite).await;
    let wal = database
        .sqlite_path()
        .expect("a SQLite file")
        .with_extension("db-wal");
    let server = EngramProcess::serve(database.url(), &[]);
    let client = server.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // More callers than a group takes at once in a debug build: the writer never idles.
    let writers: Vec<_> = (0..32)
        .map(|writer| {
            let (mut client, stop) = (client.clone(), stop.clone());
            tokio::spawn(async move {
                let mut stored = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let request = store_request(
                        &format!("wal-{writer}-{}", stored / 50),
                        memory(&format!("fact {stored} of writer {writer}")),
                    );
                    client.store_memory(request).await.expect("store");
                    stored += 1;
                }
                stored
            })
        })
        .collect();
    let wal_path = wal.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let wal = wal_path.clone();
            async move { write_ahead_log_sequence(&wal).is_some() }
        })
        .await,
        "the stores reach the write-ahead log"
    );
    let first = write_ahead_log_sequence(&wal).expect("a header");
    let started_over = eventually(Duration::from_secs(20), || {
        let wal = wal.clone();
        async move { write_ahead_log_sequence(&wal).is_some_and(|now| now != first) }
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut stored = 0;
    for writer in writers {
        stored += writer.await.expect("writer");
    }
    assert!(
        started_over,
        "the log never started over during {stored} stores; it grows without end"
    );
}
