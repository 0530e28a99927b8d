//! SIGKILL under a store load: every store the server acknowledged is there after a restart.
//! Stores are grouped into shared transactions (group commit) and answered only after their
//! group committed; a kill between the two must cost unanswered calls only.

mod common;

use std::time::Duration;

use common::{Backend, EngramProcess, TestDatabase, memory, store_request};
use engram_proto::memory::v1 as pb;

/// Concurrent writers: enough to make groups of several calls.
const WRITERS: usize = 16;

async fn acknowledged_stores_survive_sigkill(backend: Backend) {
    let database = TestDatabase::create(backend).await;
    let url = database.url().to_owned();
    let mut server = EngramProcess::serve(&url, &[]);
    let client = server.client().await;
    let writers: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for turn in 0u32.. {
                    // A session per store: the session cap never evicts what is counted. Every
                    // fifth store repeats the one before with more importance: a merge.
                    let repeat = turn % 5 == 4;
                    let original = if repeat { turn - 1 } else { turn };
                    let request = store_request(
                        &format!("crash-{writer}-{original}"),
                        pb::Memory {
                            importance: Some(if repeat { 0.9 } else { 0.5 }),
                            ..memory(&format!("fact {writer} {original}"))
                        },
                    );
                    match client.store_memory(request).await {
                        Ok(reply) => acknowledged.push(reply.into_inner()),
                        Err(_) => return acknowledged,
                    }
                }
                unreachable!()
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    server.child.kill().expect("SIGKILL");
    let status = server.wait(Duration::from_secs(10));
    assert!(!status.success(), "killed, not exited: {status:?}");

    let mut acknowledged = Vec::new();
    for writer in writers {
        acknowledged.extend(writer.await.expect("writer"));
    }
    assert!(
        acknowledged.len() > WRITERS * 4,
        "the load ran ({} stores)",
        acknowledged.len()
    );
    assert!(
        acknowledged.iter().any(|reply| reply.deduplicated),
        "merges were acknowledged too"
    );

    let restarted = EngramProcess::serve(&url, &[]);
    let mut client = restarted.client().await;
    for reply in &acknowledged {
        let stored = reply.memory.as_ref().expect("memory");
        let found = client
            .get_memory(pb::GetMemoryRequest {
                name: stored.name.clone(),
            })
            .await
            .unwrap_or_else(|status| panic!("{} lost: {status:?}", stored.name))
            .into_inner();
        assert_eq!(found.content, stored.content, "{}", stored.name);
        assert!(
            found.importance >= stored.importance,
            "{}: an acknowledged merge is kept",
            stored.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_keeps_every_acknowledged_store_through_sigkill() {
    acknowledged_stores_survive_sigkill(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_keeps_every_acknowledged_store_through_sigkill() {
    acknowledged_stores_survive_sigkill(Backend::Postgres).await;
}
