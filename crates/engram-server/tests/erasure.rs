//! GDPR erasure on SQLite: after a session is purged, no file of the database (main file,
//! write-ahead log, shared memory) still holds its text, although SQLite keeps deleted bytes
//! in free pages unless told otherwise.

mod common;

use common::{Backend, TestServer, memory, store_request};
use engram_proto::memory::v1 as pb;

const PURGED: &str = "erasure-canary-quokka-7f3a";
const KEPT: &str = "bystander-canary-ibex-2c9d";

fn database_files_contain(path: &std::path::Path, needle: &str) -> bool {
    ["", "-wal", "-shm"].iter().any(|suffix| {
        let file = std::path::PathBuf::from(format!("{}{suffix}", path.display()));
        std::fs::read(&file).is_ok_and(|bytes| {
            bytes
                .windows(needle.len())
                .any(|window| window == needle.as_bytes())
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_session_removes_its_text_from_the_database_files() {
    let mut server = TestServer::start(Backend::Sqlite).await;
    let path = server.database.sqlite_path().expect("a SQLite database");
    for index in 0..20 {
        let content = format!("{PURGED} fact number {index} about this customer");
        server
            .client
            .store_memory(store_request("erase-me", memory(&content)))
            .await
            .expect("store");
    }
    server
        .client
        .store_memory(store_request("keep-me", memory(KEPT)))
        .await
        .expect("store");
    assert!(
        database_files_contain(&path, PURGED),
        "the canary is on disk before the purge"
    );

    let purged = server
        .client
        .purge_memories(pb::PurgeMemoriesRequest {
            parent: "sessions/erase-me".to_owned(),
            filter: "*".to_owned(),
            force: true,
        })
        .await
        .expect("purge")
        .into_inner();
    assert_eq!(purged.purge_count, 20);

    assert!(
        !database_files_contain(&path, PURGED),
        "purged text is gone from every database file"
    );
    assert!(
        database_files_contain(&path, KEPT),
        "other sessions' text stays"
    );
    server.stop().await;
}
