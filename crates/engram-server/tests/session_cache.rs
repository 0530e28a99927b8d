//! RetrieveMemories and FindSimilarMemories answer from a cache of whole sessions. It must
//! never show what the database no longer holds: a replica's own changes at once, another
//! replica's (PostgreSQL) once its notification arrives, well within the cache's ten-second
//! age limit. And one SQLite file is served by one process only.

mod common;

use std::time::Duration;

use common::{Backend, TestServer, eventually, memory, store_request};
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use sea_orm::ConnectionTrait;
use tonic::transport::Channel;

on_both_backends!(
    retrieve_follows_every_change_of_the_session,
    retrieve_follows_merges_and_evictions,
);

async fn store(
    client: &mut MemoryServiceClient<Channel>,
    content: &str,
    importance: f64,
) -> pb::StoreMemoryResponse {
    let memory = pb::Memory {
        importance: Some(importance),
        ..memory(content)
    };
    client
        .store_memory(store_request("cached", memory))
        .await
        .expect("store")
        .into_inner()
}

async fn stored(
    client: &mut MemoryServiceClient<Channel>,
    content: &str,
    importance: f64,
) -> pb::Memory {
    store(client, content, importance)
        .await
        .memory
        .expect("memory")
}

async fn retrieved(client: &mut MemoryServiceClient<Channel>) -> Vec<pb::Memory> {
    client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/cached".to_owned(),
            // More than the cap: every live memory the session has.
            page_size: 20,
            ..Default::default()
        })
        .await
        .expect("retrieve")
        .into_inner()
        .memories
}

async fn contents(client: &mut MemoryServiceClient<Channel>) -> Vec<String> {
    retrieved(client)
        .await
        .into_iter()
        .map(|memory| memory.content)
        .collect()
}

async fn similar(client: &mut MemoryServiceClient<Channel>, content: &str) -> Vec<String> {
    client
        .find_similar_memories(pb::FindSimilarMemoriesRequest {
            parent: "sessions/cached".to_owned(),
            content: content.to_owned(),
            max_distance: Some(0),
        })
        .await
        .expect("find similar")
        .into_inner()
        .similar_memories
        .into_iter()
        .map(|similar| similar.memory.expect("memory").content)
        .collect()
}

async fn reimportance(client: &mut MemoryServiceClient<Channel>, name: &str, importance: f64) {
    client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: name.to_owned(),
                importance: Some(importance),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["importance".to_owned()],
            }),
        })
        .await
        .expect("update");
}

async fn delete(client: &mut MemoryServiceClient<Channel>, name: &str) {
    client
        .delete_memory(pb::DeleteMemoryRequest {
            name: name.to_owned(),
            etag: String::new(),
        })
        .await
        .expect("delete");
}

async fn retrieve_follows_every_change_of_the_session(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut client = server.client.clone();
    let email = stored(&mut client, "prefers email over phone", 0.4).await;
    let shipped = stored(&mut client, "order 1234 shipped on monday", 0.9).await;
    let first = retrieved(&mut client).await;
    assert_eq!(
        first
            .iter()
            .map(|memory| memory.content.as_str())
            .collect::<Vec<_>>(),
        ["order 1234 shipped on monday", "prefers email over phone"]
    );
    assert_eq!(first[0].access_count, 1);

    // Access tracking goes on in the cache, and GetMemory (from the database) agrees.
    let second = retrieved(&mut client).await;
    assert_eq!(second[0].access_count, 2);
    let got = client
        .get_memory(pb::GetMemoryRequest {
            name: shipped.name.clone(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got, second[0], "Retrieve and Get show the same memory");

    reimportance(&mut client, &email.name, 1.0).await;
    assert_eq!(
        contents(&mut client).await,
        ["prefers email over phone", "order 1234 shipped on monday"],
        "an update reorders at once"
    );

    delete(&mut client, &shipped.name).await;
    assert_eq!(contents(&mut client).await, ["prefers email over phone"]);
    assert!(
        similar(&mut client, "order 1234 shipped on monday")
            .await
            .is_empty()
    );

    client
        .undelete_memory(pb::UndeleteMemoryRequest {
            name: shipped.name.clone(),
        })
        .await
        .expect("undelete");
    assert_eq!(
        contents(&mut client).await.len(),
        2,
        "undeleted memory is back"
    );
    assert_eq!(
        similar(&mut client, "order 1234 shipped on monday").await,
        ["order 1234 shipped on monday"]
    );

    stored(&mut client, "wants a refund for order 1234", 0.7).await;
    assert_eq!(
        contents(&mut client).await.len(),
        3,
        "a new store shows at once"
    );

    client
        .purge_memories(pb::PurgeMemoriesRequest {
            parent: "sessions/cached".to_owned(),
            filter: "*".to_owned(),
            force: true,
        })
        .await
        .expect("purge");
    assert!(
        contents(&mut client).await.is_empty(),
        "a purge empties it at once"
    );
    server.stop().await;
}

/// Stores that merge into a cached memory or evict one from a full session show at once.
async fn retrieve_follows_merges_and_evictions(backend: Backend) {
    let server = TestServer::start_with(backend, |settings| settings.memory_max_entries = 10).await;
    let mut client = server.client.clone();
    for n in 0..10 {
        stored(
            &mut client,
            &format!("fact number {n} about the account"),
            0.5,
        )
        .await;
    }
    assert_eq!(retrieved(&mut client).await.len(), 10, "cached at the cap");

    let merged = stored(&mut client, "FACT number 3 about the account!", 0.95).await;
    let top = retrieved(&mut client).await;
    assert_eq!(top.len(), 10, "a merge adds no memory");
    assert_eq!(top[0].name, merged.name, "the merge raised it to the top");
    assert_eq!(top[0].importance, Some(0.95));

    let newest = store(&mut client, "asked for a callback tomorrow", 0.9).await;
    let [evicted] = newest.evicted_memories.as_slice() else {
        panic!("one memory evicted, got {:?}", newest.evicted_memories);
    };
    let top = retrieved(&mut client).await;
    assert_eq!(top.len(), 10);
    assert_eq!(
        top[1].name,
        newest.memory.expect("memory").name,
        "shows at once"
    );
    assert!(
        top.iter().all(|memory| &memory.name != evicted),
        "the evicted memory is gone at once"
    );
    server.stop().await;
}

/// SQLite has one writer, so a store changes a cached session in place: the next Retrieve
/// needs no query. A count raised behind the service's back stays unseen until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_keeps_its_sqlite_session_cached() {
    let server = TestServer::start(Backend::Sqlite).await;
    let mut client = server.client.clone();
    stored(&mut client, "prefers email over phone", 0.6).await;
    assert_eq!(retrieved(&mut client).await[0].access_count, 1);
    let db = sea_orm::Database::connect(server.database.url())
        .await
        .expect("connect");
    db.execute_unprepared("UPDATE memories SET access_count = access_count + 1000")
        .await
        .expect("raise the count");
    stored(&mut client, "order 1234 shipped on monday", 0.9).await;
    let after = retrieved(&mut client).await;
    assert_eq!(after.len(), 2, "the new memory is in the cached session");
    assert_eq!(after[1].content, "prefers email over phone");
    assert_eq!(
        after[1].access_count, 2,
        "served from the cache, not reloaded"
    );
    server.stop().await;
}

/// The SQLite writer remembers what its last group left live in each session, so the next
/// store of the session need not read it. Changes made beside the writer must not be missed:
/// a memory deleted through another connection is no near-duplicate of the next store, and
/// once undeleted it counts toward the cap again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sqlite_writer_sees_what_changed_beside_it() {
    let server =
        TestServer::start_with(Backend::Sqlite, |settings| settings.memory_max_entries = 10).await;
    let mut client = server.client.clone();
    let similar_names = |response: &pb::StoreMemoryResponse| -> Vec<String> {
        response
            .similar_memories
            .iter()
            .map(|similar| similar.memory.as_ref().expect("memory").name.clone())
            .collect()
    };
    let kept = stored(&mut client, "customer 0 prefers 0 deliveries", 0.9).await;
    for n in 1..9 {
        stored(
            &mut client,
            &format!("order {n}00{n} shipped on day {n}"),
            0.3,
        )
        .await;
    }

    delete(&mut client, &kept.name).await;
    let while_deleted = store(&mut client, "customer 0 prefers 0 deliverys", 0.3).await;
    assert!(
        !similar_names(&while_deleted).contains(&kept.name),
        "a deleted memory is no near-duplicate"
    );
    assert!(
        while_deleted.evicted_memories.is_empty(),
        "nine live of ten"
    );

    client
        .undelete_memory(pb::UndeleteMemoryRequest {
            name: kept.name.clone(),
        })
        .await
        .expect("undelete");
    let after = store(&mut client, "asked for a callback tomorrow", 0.3).await;
    assert_eq!(
        after.evicted_memories.len(),
        1,
        "eleven live of ten: one goes"
    );
    assert_eq!(retrieved(&mut client).await.len(), 10);
    server.stop().await;
}

/// Two replicas on one PostgreSQL database: a change on one reaches the other's cache
/// through a notification, long before the cache's age limit would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_drop_what_another_replica_changed() {
    let writer = TestServer::start(Backend::Postgres).await;
    let reader = writer.replica().await;
    let (mut on_writer, on_reader) = (writer.client.clone(), reader.client.clone());
    let gone = stored(&mut on_writer, "lives at 12 Elm Street", 0.8).await;
    // The reader's cache serves once its listener is connected. Raising the count behind
    // the service's back tells when: a cached answer does not show it.
    let db = sea_orm::Database::connect(writer.database.url())
        .await
        .expect("connect");
    let cached = eventually(Duration::from_secs(10), || {
        let (mut client, db) = (on_reader.clone(), db.clone());
        async move {
            retrieved(&mut client).await;
            db.execute_unprepared("UPDATE memories SET access_count = access_count + 1000")
                .await
                .expect("raise the count");
            retrieved(&mut client).await[0].access_count < 1000
        }
    })
    .await;
    assert!(cached, "the reader's cache never served");

    delete(&mut on_writer, &gone.name).await;
    let dropped = eventually(Duration::from_secs(3), || {
        let mut client = on_reader.clone();
        async move { contents(&mut client).await.is_empty() }
    })
    .await;
    assert!(
        dropped,
        "the reader still returns a memory deleted on another replica"
    );

    stored(&mut on_writer, "moved to 3 Oak Avenue", 0.8).await;
    let seen = eventually(Duration::from_secs(3), || {
        let mut client = on_reader.clone();
        async move { contents(&mut client).await == ["moved to 3 Oak Avenue"] }
    })
    .await;
    assert!(seen, "the reader misses a memory stored on another replica");
    reader.stop().await;
    writer.stop().await;
}

/// The cache trusts that it sees every write to its SQLite file, so a second server on the
/// same file is refused with a clear message, and the file is free again once the first stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sqlite_file_is_served_by_one_process() {
    let first = TestServer::start(Backend::Sqlite).await;
    let url = first.database.url().to_owned();
    let settings = engram_server::settings::Settings {
        database_url: url.clone(),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let refused = engram_server::server::serve(settings.clone(), listener, async {})
        .await
        .expect_err("a second server on the same file");
    assert!(
        refused
            .to_string()
            .contains("another Engram process is serving this SQLite database"),
        "unclear refusal: {refused}"
    );
    first.stop().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    engram_server::server::serve(settings, listener, async {})
        .await
        .expect("the file is free once the first server stopped");
}
