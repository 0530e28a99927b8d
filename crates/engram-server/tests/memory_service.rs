//! MemoryService end to end: a real server, a real database (SQLite and PostgreSQL), the
//! generated client. Each test runs on both backends.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Backend, TestServer, field_violations, memory, reason, store_request};
use engram_domain::text;
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use sea_orm::ConnectionTrait;
use tonic::Code;
use tonic::transport::Channel;

on_both_backends!(
    stores_and_gets_a_memory_with_python_identical_hashes,
    deduplicates_equal_content_and_merges,
    concurrent_identical_stores_make_one_row,
    soft_delete_undelete_and_purge,
    expired_memories_vanish_at_once_and_the_sweeper_removes_them,
    lists_in_pages_with_opaque_tokens,
    retrieves_by_effective_importance_and_tracks_access,
    retrieval_breaks_ties_newest_first_then_by_name,
    session_cap_evicts_the_least_important_even_under_concurrency,
    rejects_bad_input_naming_the_field,
    updates_with_mask_and_etag,
    reports_near_duplicates,
    batch_store_is_all_or_nothing,
    request_id_replays_the_first_response,
    a_store_failing_in_the_database_fails_alone_and_leaves_nothing,
    counted_accesses_reach_the_database_between_stores,
    the_sweeper_purges_memories_neither_stored_nor_retrieved_for_the_cleanup_days,
);

async fn stores_and_gets_a_memory_with_python_identical_hashes(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let before = std::time::SystemTime::now();
    let stored = server
        .client
        .store_memory(store_request(
            "user-123",
            pb::Memory {
                content: "User prefers  EMAIL communication!!".to_owned(),
                content_type: pb::ContentType::Preference as i32,
                metadata: Some(prost_types::Struct {
                    fields: [(
                        "source".to_owned(),
                        prost_types::Value {
                            kind: Some(prost_types::value::Kind::StringValue("chat".to_owned())),
                        },
                    )]
                    .into(),
                }),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(!stored.deduplicated);
    let created = stored.memory.unwrap();
    assert!(
        created.name.starts_with("sessions/user-123/memories/"),
        "{}",
        created.name
    );
    assert_eq!(created.content, "User prefers EMAIL communication!!");
    assert_eq!(
        created.content_hash,
        text::content_hash("User prefers EMAIL communication!!")
    );
    // The hash ignores case, spacing and trailing punctuation, as the Python system's did.
    assert_eq!(
        created.content_hash,
        text::content_hash("user prefers email communication")
    );
    assert_eq!(
        created.semantic_hash,
        text::format_semantic_hash(text::semantic_hash(&created.content))
    );
    assert_eq!(created.importance, Some(0.5));
    assert_eq!(created.effective_importance, 0.5);
    assert_eq!(created.content_type, pb::ContentType::Preference as i32);
    assert!(!created.etag.is_empty());
    let Some(pb::memory::Expiration::ExpireTime(expire_time)) = created.expiration else {
        panic!("expire_time always set")
    };
    let ttl = expire_time.seconds
        - before
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
    assert!(
        (24 * 3600 - 5..=24 * 3600 + 5).contains(&ttl),
        "default TTL is memory_ttl_hours=24, got {ttl}s"
    );

    let fetched = server
        .client
        .get_memory(pb::GetMemoryRequest {
            name: created.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fetched, created);

    let other_session = server
        .client
        .get_memory(pb::GetMemoryRequest {
            name: created.name.replace("user-123", "user-456"),
        })
        .await
        .unwrap_err();
    assert_eq!(other_session.code(), Code::NotFound);
    assert_eq!(reason(&other_session), "MEMORY_NOT_FOUND");

    let unspecified = server
        .client
        .store_memory(store_request("user-123", memory("plain context")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        unspecified.memory.unwrap().content_type,
        pb::ContentType::Context as i32
    );
    server.stop().await;
}

async fn deduplicates_equal_content_and_merges(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let first = pb::Memory {
        importance: Some(0.4),
        metadata: Some(struct_of(&[("a", "1"), ("b", "1")])),
        expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
            seconds: 7200,
            nanos: 0,
        })),
        ..memory("Hello World!!!")
    };
    let created = server
        .client
        .store_memory(store_request("s1", first))
        .await
        .unwrap()
        .into_inner()
        .memory
        .unwrap();
    let again = pb::Memory {
        importance: Some(0.9),
        metadata: Some(struct_of(&[("b", "2"), ("c", "3")])),
        expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
            seconds: 3600,
            nanos: 0,
        })),
        ..memory("  hello   WORLD ")
    };
    let reply = server
        .client
        .store_memory(store_request("s1", again))
        .await
        .unwrap()
        .into_inner();
    assert!(reply.deduplicated);
    let merged = reply.memory.unwrap();
    assert_eq!(merged.name, created.name);
    assert_eq!(
        merged.content, "Hello World!!!",
        "the first phrasing is kept"
    );
    assert_eq!(merged.importance, Some(0.9), "the higher importance wins");
    assert_eq!(
        merged.metadata,
        Some(struct_of(&[("a", "1"), ("b", "2"), ("c", "3")]))
    );
    assert_eq!(
        merged.expiration, created.expiration,
        "the later expiry wins"
    );
    assert_ne!(merged.etag, created.etag);
    assert_eq!(
        read_back(&mut server, &merged.name).await,
        merged,
        "the merge is what the database holds"
    );

    // A different content type is a different memory; so is another session.
    let fact = pb::Memory {
        content_type: pb::ContentType::Fact as i32,
        ..memory("hello world")
    };
    assert!(
        !server
            .client
            .store_memory(store_request("s1", fact))
            .await
            .unwrap()
            .into_inner()
            .deduplicated
    );
    assert!(
        !server
            .client
            .store_memory(store_request("s2", memory("hello world")))
            .await
            .unwrap()
            .into_inner()
            .deduplicated
    );

    // Storing the content of a soft-deleted memory restores it.
    server
        .client
        .delete_memory(pb::DeleteMemoryRequest {
            name: created.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let revived = server
        .client
        .store_memory(store_request("s1", memory("HELLO WORLD")))
        .await
        .unwrap()
        .into_inner();
    assert!(revived.deduplicated);
    let revived = revived.memory.unwrap();
    assert_eq!(revived.name, created.name);
    assert_eq!(revived.delete_time, None);
    assert_eq!(read_back(&mut server, &revived.name).await, revived);
    server.stop().await;
}

/// A memory as GetMemory reads it from the database (stores update the retrieval cache
/// from what they wrote, so only a read like this one sees what the writer stored).
async fn read_back(server: &mut TestServer, name: &str) -> pb::Memory {
    server
        .client
        .get_memory(pb::GetMemoryRequest {
            name: name.to_owned(),
        })
        .await
        .expect("the memory reads back")
        .into_inner()
}

/// PostgreSQL reads a group's twins from the snapshot its insert starts from. A twin that
/// another transaction commits while the insert waits for it is not in that snapshot: the
/// store still merges into it, also alone in its group (where a failed group is not retried).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twin_committed_while_the_insert_waits_is_merged_into() {
    use sea_orm::TransactionTrait;
    let mut server = TestServer::start(Backend::Postgres).await;
    let original = stored(&mut server, "first", memory("Prefers email over phone")).await;
    let db = sea_orm::Database::connect(server.database.url())
        .await
        .expect("a second connection");
    let other = db.begin().await.expect("a transaction of its own");
    other
        .execute_unprepared(
            "INSERT INTO memories (id, tenant_id, session_id, content_type, content, \
               content_hash, semantic_hash, metadata, importance, expires_at, created_at, \
               updated_at) \
             SELECT '00000000-0000-7000-8000-000000000001', tenant_id, 'late', content_type, \
               content, content_hash, semantic_hash, metadata, importance, expires_at, \
               created_at, updated_at \
             FROM memories WHERE session_id = 'first'",
        )
        .await
        .expect("the twin, not committed yet");

    let mut client = server.client.clone();
    let store = tokio::spawn(async move {
        client
            .store_memory(store_request("late", memory("Prefers email over phone")))
            .await
    });
    let waiting = common::eventually(Duration::from_secs(10), || {
        let db = db.clone();
        async move {
            let row = db
                .query_one_raw(sea_orm::Statement::from_string(
                    sea_orm::DbBackend::Postgres,
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE datname = current_database() AND wait_event_type = 'Lock' \
                       AND query LIKE '%INSERT INTO memories%'",
                ))
                .await
                .expect("pg_stat_activity")
                .expect("a row");
            row.try_get_by_index::<i64>(0).expect("a count") > 0
        }
    })
    .await;
    assert!(waiting, "the store never waited for the uncommitted twin");
    other.commit().await.expect("the twin committed");

    let reply = store
        .await
        .expect("the call")
        .expect("merged into the twin, not failed")
        .into_inner();
    assert!(reply.deduplicated, "the twin was found");
    let merged = reply.memory.expect("memory");
    assert_eq!(
        merged.name,
        "sessions/late/memories/00000000-0000-7000-8000-000000000001"
    );
    assert_eq!(merged.content, original.content);
    server.stop().await;
}

async fn concurrent_identical_stores_make_one_row(backend: Backend) {
    let server = TestServer::start(backend).await;
    let stores = (0..32).map(|_| {
        let mut client = server.client.clone();
        tokio::spawn(async move {
            client
                .store_memory(store_request(
                    "race",
                    memory("The customer's order number is 4411"),
                ))
                .await
                .map(|r| r.into_inner())
        })
    });
    let replies: Vec<pb::StoreMemoryResponse> = futures_join(stores)
        .await
        .into_iter()
        .map(|reply| reply.expect("no store fails under the race"))
        .collect();
    let names: HashSet<String> = replies
        .iter()
        .map(|reply| reply.memory.as_ref().unwrap().name.clone())
        .collect();
    assert_eq!(names.len(), 1, "every store returns the same memory");
    assert_eq!(
        replies.iter().filter(|reply| !reply.deduplicated).count(),
        1,
        "exactly one store created it"
    );
    let mut client = server.client.clone();
    let listed = client
        .list_memories(list("race"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.memories.len(), 1);
    server.stop().await;
}

async fn soft_delete_undelete_and_purge(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let keep = stored(&mut server, "gdpr", memory("keeps this one")).await;
    let gone = stored(&mut server, "gdpr", memory("deletes this one")).await;

    let deleted = server
        .client
        .delete_memory(pb::DeleteMemoryRequest {
            name: gone.name.clone(),
            etag: gone.etag.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let (delete_time, purge_time) = (deleted.delete_time.unwrap(), deleted.purge_time.unwrap());
    assert_eq!(
        purge_time.seconds - delete_time.seconds,
        30 * 86_400,
        "purge_time is delete_time + 30 days"
    );
    assert_eq!(
        server
            .client
            .get_memory(pb::GetMemoryRequest {
                name: gone.name.clone()
            })
            .await
            .unwrap()
            .into_inner(),
        deleted
    );

    let live = server
        .client
        .list_memories(list("gdpr"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(names(&live.memories), vec![keep.name.clone()]);
    let all = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            show_deleted: true,
            ..list("gdpr")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.memories.len(), 2);

    let twice = server
        .client
        .delete_memory(pb::DeleteMemoryRequest {
            name: gone.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(twice.code(), Code::FailedPrecondition);
    let live_undelete = server
        .client
        .undelete_memory(pb::UndeleteMemoryRequest {
            name: keep.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(live_undelete.code(), Code::AlreadyExists);
    let restored = server
        .client
        .undelete_memory(pb::UndeleteMemoryRequest {
            name: gone.name.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(restored.delete_time, None);
    assert_eq!(restored.purge_time, None);

    server
        .client
        .delete_memory(pb::DeleteMemoryRequest {
            name: gone.name.clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    let dry_run = purge(
        &mut server.client,
        "sessions/gdpr",
        "state = DELETED",
        false,
    )
    .await;
    assert_eq!(
        (dry_run.purge_count, dry_run.purge_sample.clone()),
        (1, vec![gone.name.clone()])
    );
    assert!(
        server
            .client
            .get_memory(pb::GetMemoryRequest {
                name: gone.name.clone()
            })
            .await
            .is_ok(),
        "a dry run deletes nothing"
    );
    assert_eq!(
        purge(&mut server.client, "sessions/gdpr", "state = DELETED", true)
            .await
            .purge_count,
        1
    );
    let purged = server
        .client
        .get_memory(pb::GetMemoryRequest {
            name: gone.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(purged.code(), Code::NotFound);
    assert_eq!(
        server
            .client
            .undelete_memory(pb::UndeleteMemoryRequest {
                name: gone.name.clone()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Erasure of a whole session leaves other sessions alone.
    let bystander = stored(&mut server, "other", memory("not erased")).await;
    assert_eq!(
        purge(&mut server.client, "sessions/gdpr", "*", true)
            .await
            .purge_count,
        1
    );
    assert!(
        server
            .client
            .list_memories(pb::ListMemoriesRequest {
                show_deleted: true,
                ..list("gdpr")
            })
            .await
            .unwrap()
            .into_inner()
            .memories
            .is_empty()
    );
    assert!(
        server
            .client
            .get_memory(pb::GetMemoryRequest {
                name: bystander.name
            })
            .await
            .is_ok()
    );
    server.stop().await;
}

async fn expired_memories_vanish_at_once_and_the_sweeper_removes_them(backend: Backend) {
    let mut server =
        TestServer::start_with(backend, |settings| settings.sweep_interval_seconds = 1).await;
    let short = pb::Memory {
        expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
            seconds: 1,
            nanos: 0,
        })),
        importance: Some(0.9),
        ..memory("short lived")
    };
    let short = stored(&mut server, "ttl", short).await;
    let lasting = stored(
        &mut server,
        "ttl",
        pb::Memory {
            importance: Some(0.9),
            ..memory("stays")
        },
    )
    .await;
    assert_eq!(retrieve(&mut server, "ttl").await.len(), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let gone = server
        .client
        .get_memory(pb::GetMemoryRequest {
            name: short.name.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    assert_eq!(
        names(
            &server
                .client
                .list_memories(list("ttl"))
                .await
                .unwrap()
                .into_inner()
                .memories
        ),
        vec![lasting.name.clone()]
    );
    assert_eq!(
        names(&retrieve(&mut server, "ttl").await),
        vec![lasting.name.clone()]
    );

    // The sweeper (every second here) deletes the row itself: a purge of expired finds none.
    let swept = common::eventually(Duration::from_secs(5), || {
        let mut client = server.client.clone();
        async move {
            let dry_run = purge(&mut client, "sessions/ttl", "state = EXPIRED", false).await;
            dry_run.purge_count == 0
        }
    })
    .await;
    assert!(swept, "the sweeper removes expired memories");
    server.stop().await;
}

async fn lists_in_pages_with_opaque_tokens(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let mut created = Vec::new();
    for index in 0..25 {
        let kind = if index % 5 == 0 {
            pb::ContentType::Fact
        } else {
            pb::ContentType::Context
        };
        created.push(
            stored(
                &mut server,
                "pages",
                pb::Memory {
                    content_type: kind as i32,
                    ..memory(&format!("memory number {index}"))
                },
            )
            .await
            .name,
        );
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = server
            .client
            .list_memories(pb::ListMemoriesRequest {
                page_size: 10,
                page_token: token.clone(),
                ..list("pages")
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        seen.extend(names(&page.memories));
        if page.next_page_token.is_empty() {
            break;
        }
        assert!(!page.next_page_token.contains("pages"), "tokens are opaque");
        token = page.next_page_token;
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, created, "every memory once, oldest first");

    let facts = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            filter: "content_type = FACT".to_owned(),
            ..list("pages")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(facts.memories.len(), 5);

    let first = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            page_size: 10,
            ..list("pages")
        })
        .await
        .unwrap()
        .into_inner();
    let changed = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            page_token: first.next_page_token.clone(),
            filter: "content_type = FACT".to_owned(),
            ..list("pages")
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&changed), vec!["page_token"]);
    let forged = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            page_token: "eyJpZCI6MX0".to_owned(),
            ..list("pages")
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&forged), vec!["page_token"]);
    let negative = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            page_size: -1,
            ..list("pages")
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&negative), vec!["page_size"]);
    let bad_filter = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            filter: "content_type = SECRET".to_owned(),
            ..list("pages")
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&bad_filter), vec!["filter"]);
    let huge = server
        .client
        .list_memories(pb::ListMemoriesRequest {
            page_size: i32::MAX,
            ..list("pages")
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        huge.memories.len(),
        25,
        "oversized pages are coerced, not refused"
    );
    server.stop().await;
}

async fn retrieves_by_effective_importance_and_tracks_access(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    for (content, importance, kind) in [
        ("low importance note", 0.2, pb::ContentType::Context),
        ("medium importance note", 0.5, pb::ContentType::Fact),
        ("high importance note", 0.9, pb::ContentType::Preference),
        ("top importance note", 1.0, pb::ContentType::Fact),
    ] {
        stored(
            &mut server,
            "rank",
            pb::Memory {
                importance: Some(importance),
                content_type: kind as i32,
                metadata: Some(awkward_metadata()),
                ..memory(content)
            },
        )
        .await;
    }
    let ranked = retrieve(&mut server, "rank").await;
    // Retrieval reads rows its own way (one JSON array on SQLite): every field is what Get
    // reads, access tracking included, down to the last bit of a number.
    for retrieved in &ranked {
        let got = server
            .client
            .get_memory(pb::GetMemoryRequest {
                name: retrieved.name.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let without_decay = |memory: &pb::Memory| pb::Memory {
            effective_importance: 0.0,
            ..memory.clone()
        };
        assert_eq!(without_decay(retrieved), without_decay(&got));
        assert_eq!(got.metadata, Some(awkward_metadata()));
    }
    let contents: Vec<&str> = ranked.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        contents,
        vec![
            "top importance note",
            "high importance note",
            "medium importance note"
        ],
        "0.2 is below the 0.3 threshold"
    );
    assert!(
        ranked
            .iter()
            .all(|m| m.access_count == 1 && m.last_access_time.is_some())
    );

    let again = retrieve(&mut server, "rank").await;
    assert!(again.iter().all(|m| m.access_count == 2));
    // Two accesses add 0.04 to the medium one (0.5 -> 0.54).
    let medium = again
        .iter()
        .find(|m| m.content.starts_with("medium"))
        .unwrap();
    assert!(
        (medium.effective_importance - 0.54).abs() < 1e-9,
        "{}",
        medium.effective_importance
    );

    let only_facts = server
        .client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/rank".to_owned(),
            content_types: vec![pb::ContentType::Fact as i32],
            min_importance: Some(0.0),
            page_size: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        only_facts
            .memories
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>(),
        vec!["top importance note"]
    );

    let everything = server
        .client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/rank".to_owned(),
            min_importance: Some(0.0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(everything.memories.len(), 4);
    let bad = server
        .client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/rank".to_owned(),
            min_importance: Some(f64::NAN),
            content_types: vec![42],
            page_size: -3,
        })
        .await
        .unwrap_err();
    assert_eq!(
        field_violations(&bad),
        vec!["page_size", "min_importance", "content_types[0]"]
    );
    server.stop().await;
}

/// Equal effective importances rank the newer memory first, then the lower name; a batch
/// shares one creation time, so its order is the names'. Checked on a session loaded into
/// the cache, then changed by a store.
async fn retrieval_breaks_ties_newest_first_then_by_name(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let fact = |content: &str| pb::Memory {
        importance: Some(0.5),
        ..memory(content)
    };
    stored(&mut server, "ties", fact("oldest single fact")).await;
    let batch = (0..6).map(|n| store_request("ties", fact(&format!("batched fact {n}"))));
    server
        .client
        .batch_store_memories(pb::BatchStoreMemoriesRequest {
            parent: "sessions/ties".to_owned(),
            requests: batch.collect(),
            request_id: String::new(),
        })
        .await
        .expect("batch store");
    // Loads the session without counting an access (no preference is stored).
    let none = server
        .client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/ties".to_owned(),
            content_types: vec![pb::ContentType::Preference as i32],
            ..Default::default()
        })
        .await
        .expect("retrieve preferences");
    assert!(none.into_inner().memories.is_empty());
    stored(&mut server, "ties", fact("newest single fact")).await;

    // All eight fit in the default page of ten.
    let ranked = retrieve(&mut server, "ties").await;
    assert_eq!(ranked.len(), 8);
    let mut expected = ranked.clone();
    expected.sort_by(|a, b| {
        let created = |memory: &pb::Memory| {
            let at = memory.create_time.expect("create_time");
            (at.seconds, at.nanos)
        };
        created(b).cmp(&created(a)).then(a.name.cmp(&b.name))
    });
    assert_eq!(names(&ranked), names(&expected));
    assert_eq!(ranked[0].content, "newest single fact");
    assert_eq!(ranked[7].content, "oldest single fact");
    server.stop().await;
}

async fn session_cap_evicts_the_least_important_even_under_concurrency(backend: Backend) {
    let mut server =
        TestServer::start_with(backend, |settings| settings.memory_max_entries = 10).await;
    let mut names_by_importance = Vec::new();
    for index in 0..10 {
        let importance = 0.05 * f64::from(index) + 0.3;
        names_by_importance.push(
            stored(
                &mut server,
                "cap",
                pb::Memory {
                    importance: Some(importance),
                    ..memory(&format!("capped {index}"))
                },
            )
            .await
            .name,
        );
    }
    let reply = server
        .client
        .store_memory(store_request(
            "cap",
            pb::Memory {
                importance: Some(0.99),
                ..memory("the eleventh")
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reply.evicted_memories,
        vec![names_by_importance[0].clone()],
        "the least important goes"
    );
    assert_eq!(
        server
            .client
            .list_memories(list("cap"))
            .await
            .unwrap()
            .into_inner()
            .memories
            .len(),
        10
    );

    // Every store in a burst races the others; the cap must hold after each burst, and the
    // evictions reported must account for every memory beyond it.
    let mut evicted = HashSet::new();
    for round in 0..4 {
        let stores = (0..24).map(|index| {
            let mut client = server.client.clone();
            tokio::spawn(async move {
                let content = format!("burst memory {round} {index}");
                client
                    .store_memory(store_request(
                        "burst",
                        pb::Memory {
                            importance: Some(0.5),
                            ..memory(&content)
                        },
                    ))
                    .await
            })
        });
        for reply in futures_join(stores).await {
            evicted.extend(
                reply
                    .expect("every concurrent store succeeds")
                    .into_inner()
                    .evicted_memories,
            );
        }
        let live = server
            .client
            .list_memories(list("burst"))
            .await
            .unwrap()
            .into_inner()
            .memories
            .len();
        assert_eq!(live, 10, "the cap holds after burst {round}");
        assert_eq!(
            evicted.len(),
            24 * (round + 1) - 10,
            "each eviction is reported once"
        );
    }
    let listed = server
        .client
        .list_memories(list("burst"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        listed.memories.len(),
        10,
        "the cap holds under concurrent stores"
    );
    server.stop().await;
}

async fn rejects_bad_input_naming_the_field(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    // The reference design's checklist: SQL injection and path traversal in session ids.
    for payload in [
        "user'; DROP TABLE memories;--",
        "1' OR '1'='1",
        "admin'--",
        "' UNION SELECT * FROM users--",
        "../../../etc/passwd",
        "..\\..\\..\\windows\\system32",
        "~/../../etc/shadow",
    ] {
        let status = server
            .client
            .store_memory(store_request(payload, memory("test")))
            .await
            .unwrap_err();
        assert_eq!(field_violations(&status), vec!["parent"], "{payload}");
        assert!(
            !status.message().contains(payload),
            "errors do not echo input"
        );
    }
    // XSS: sanitized, or rejected when nothing is left.
    for payload in [
        "<script>alert('xss')</script>",
        "<img src=x onerror=alert(1)>",
    ] {
        let status = server
            .client
            .store_memory(store_request("xss", memory(payload)))
            .await
            .unwrap_err();
        assert_eq!(
            field_violations(&status),
            vec!["memory.content"],
            "{payload}"
        );
    }
    let cleaned = stored(
        &mut server,
        "xss",
        memory("javascript:alert(1) <b>bold</b>"),
    )
    .await;
    assert_eq!(cleaned.content, "alert(1) bold");
    let nul = stored(
        &mut server,
        "xss",
        memory("Test\x00with\x00null\x00bytes   and    extra     spaces"),
    )
    .await;
    assert_eq!(nul.content, "Test with null bytes and extra spaces");

    let many = server
        .client
        .store_memory(pb::StoreMemoryRequest {
            parent: "sessions/ok".to_owned(),
            memory: Some(pb::Memory {
                content: String::new(),
                importance: Some(f64::NAN),
                content_type: 99,
                metadata: Some(struct_of(&[("bad key", "x")])),
                expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
                    seconds: -5,
                    nanos: 0,
                })),
                ..Default::default()
            }),
            request_id: "not-a-uuid".to_owned(),
        })
        .await
        .unwrap_err();
    let mut fields = field_violations(&many);
    fields.sort();
    assert_eq!(
        fields,
        vec![
            "memory.content",
            "memory.content_type",
            "memory.importance",
            "memory.metadata",
            "memory.ttl",
            "request_id"
        ]
    );

    let missing = server
        .client
        .store_memory(pb::StoreMemoryRequest {
            parent: "sessions/ok".to_owned(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&missing), vec!["memory"]);
    let oversized = server
        .client
        .store_memory(store_request("ok", memory(&"x".repeat(70_000))))
        .await
        .unwrap_err();
    assert_eq!(field_violations(&oversized), vec!["memory.content"]);
    for name in [
        "",
        "sessions/ok",
        "sessions/ok/memories/1; DROP TABLE memories",
        "sessions/../memories/x",
    ] {
        let status = server
            .client
            .get_memory(pb::GetMemoryRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(field_violations(&status), vec!["name"], "{name}");
    }
    let purge_all = server
        .client
        .purge_memories(pb::PurgeMemoriesRequest {
            parent: "sessions/ok".to_owned(),
            filter: "1=1; DROP TABLE memories".to_owned(),
            force: true,
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&purge_all), vec!["filter"]);
    // Nothing was stored by any rejected request.
    assert!(
        server
            .client
            .list_memories(list("ok"))
            .await
            .unwrap()
            .into_inner()
            .memories
            .is_empty()
    );
    server.stop().await;
}

async fn updates_with_mask_and_etag(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let original = stored(&mut server, "upd", memory("likes green tea")).await;
    let other = stored(&mut server, "upd", memory("likes black coffee")).await;
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        })
    };

    let updated = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                importance: Some(0.8),
                content: "ignored".to_owned(),
                etag: original.etag.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["importance"]),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(updated.importance, Some(0.8));
    assert_eq!(
        updated.content, "likes green tea",
        "fields outside the mask stay"
    );
    assert_ne!(updated.etag, original.etag);

    let stale = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                importance: Some(0.1),
                etag: original.etag.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["importance"]),
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    let stale_delete = server
        .client
        .delete_memory(pb::DeleteMemoryRequest {
            name: original.name.clone(),
            etag: original.etag.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(stale_delete.code(), Code::Aborted);

    let rewritten = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                content: "Likes <i>jasmine</i> tea".to_owned(),
                ..Default::default()
            }),
            update_mask: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rewritten.content, "Likes jasmine tea");
    assert_eq!(
        rewritten.content_hash,
        text::content_hash("likes jasmine tea")
    );

    let collision = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                content: "LIKES BLACK COFFEE.".to_owned(),
                ..Default::default()
            }),
            update_mask: mask(&["content"]),
        })
        .await
        .unwrap_err();
    assert_eq!(collision.code(), Code::AlreadyExists);
    assert_eq!(reason(&collision), "MEMORY_CONTENT_EXISTS");
    assert!(collision.metadata().is_empty() || !collision.message().contains("coffee"));
    let _ = other;

    let unknown_path = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                ..Default::default()
            }),
            update_mask: mask(&["content_type"]),
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&unknown_path), vec!["update_mask"]);
    let extended = server
        .client
        .update_memory(pb::UpdateMemoryRequest {
            memory: Some(pb::Memory {
                name: original.name.clone(),
                expiration: Some(pb::memory::Expiration::Ttl(prost_types::Duration {
                    seconds: 30 * 86_400,
                    nanos: 0,
                })),
                ..Default::default()
            }),
            update_mask: mask(&["ttl"]),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(pb::memory::Expiration::ExpireTime(at)) = extended.expiration else {
        panic!("expire_time")
    };
    assert!(at.seconds > rewritten.create_time.unwrap().seconds + 29 * 86_400);
    server.stop().await;
}

async fn reports_near_duplicates(backend: Backend) {
    let mut server =
        TestServer::start_with(backend, |settings| settings.similarity_max_distance = 16).await;
    let base = "the customer prefers email contact about billing issues on weekdays";
    let near = "the customer prefers email contact about billing issues on weekends";
    let original = stored(&mut server, "near", memory(base)).await;
    let expected = text::hamming_distance(text::semantic_hash(base), text::semantic_hash(near));
    assert!(
        expected <= 16,
        "the fixture is a near-duplicate ({expected})"
    );
    let reply = server
        .client
        .store_memory(store_request("near", memory(near)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        !reply.deduplicated,
        "near-duplicates are flagged, not merged"
    );
    assert_eq!(reply.similar_memories.len(), 1);
    assert_eq!(
        reply.similar_memories[0].memory.as_ref().unwrap().name,
        original.name
    );
    assert_eq!(reply.similar_memories[0].distance as u32, expected);

    let found = server
        .client
        .find_similar_memories(pb::FindSimilarMemoriesRequest {
            parent: "sessions/near".to_owned(),
            content: base.to_owned(),
            max_distance: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        found.similar_memories.len(),
        1,
        "distance 0 finds only the same fingerprint"
    );
    assert_eq!(found.similar_memories[0].distance, 0);
    let bad = server
        .client
        .find_similar_memories(pb::FindSimilarMemoriesRequest {
            parent: "sessions/near".to_owned(),
            content: " ".to_owned(),
            max_distance: Some(65),
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&bad), vec!["content", "max_distance"]);
    server.stop().await;
}

async fn batch_store_is_all_or_nothing(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let item = |content: &str| pb::StoreMemoryRequest {
        memory: Some(memory(content)),
        ..Default::default()
    };
    let rejected = server
        .client
        .batch_store_memories(pb::BatchStoreMemoriesRequest {
            parent: "sessions/batch".to_owned(),
            requests: vec![
                item("first fine"),
                item("<script>x</script>"),
                item("third fine"),
            ],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        field_violations(&rejected),
        vec!["requests[1].memory.content"]
    );
    assert!(
        server
            .client
            .list_memories(list("batch"))
            .await
            .unwrap()
            .into_inner()
            .memories
            .is_empty(),
        "nothing stored half-way"
    );

    let stored = server
        .client
        .batch_store_memories(pb::BatchStoreMemoriesRequest {
            parent: "sessions/batch".to_owned(),
            requests: vec![item("first fine"), item("second fine"), item("FIRST FINE!")],
            request_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let flags: Vec<bool> = stored.responses.iter().map(|r| r.deduplicated).collect();
    assert_eq!(flags, vec![false, false, true]);
    assert_eq!(
        stored.responses[0].memory.as_ref().unwrap().name,
        stored.responses[2].memory.as_ref().unwrap().name
    );
    let too_many = server
        .client
        .batch_store_memories(pb::BatchStoreMemoriesRequest {
            parent: "sessions/batch".to_owned(),
            requests: vec![],
            request_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&too_many), vec!["requests"]);
    server.stop().await;
}

async fn request_id_replays_the_first_response(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let request_id = uuid::Uuid::new_v4().to_string();
    let request = pb::StoreMemoryRequest {
        request_id: request_id.clone(),
        ..store_request("idem", memory("retry me"))
    };
    let first = server
        .client
        .store_memory(request.clone())
        .await
        .unwrap()
        .into_inner();
    let retry = server
        .client
        .store_memory(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        first, retry,
        "a retry gets the first response, deduplicated=false included"
    );
    assert!(!retry.deduplicated);
    let reused = server
        .client
        .store_memory(pb::StoreMemoryRequest {
            request_id,
            ..store_request("idem", memory("something else"))
        })
        .await
        .unwrap_err();
    assert_eq!(field_violations(&reused), vec!["request_id"]);
    assert_eq!(
        server
            .client
            .list_memories(list("idem"))
            .await
            .unwrap()
            .into_inner()
            .memories
            .len(),
        1
    );
    server.stop().await;
}

/// A database error in one call of a store group (a trigger refusing a row here) rolls back
/// the group; its other calls are then written on their own, once each.
async fn a_store_failing_in_the_database_fails_alone_and_leaves_nothing(backend: Backend) {
    let server = TestServer::start(backend).await;
    let db = sea_orm::Database::connect(server.database.url())
        .await
        .expect("a second connection");
    let refuse = match backend {
        Backend::Sqlite => vec![
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON memories \
             WHEN NEW.content LIKE 'poison%' BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
        ],
        Backend::Postgres => vec![
            "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.content LIKE 'poison%' THEN RAISE EXCEPTION 'refused by the test'; END IF; \
             RETURN NEW; END $$",
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON memories \
             FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
        ],
    };
    for statement in refuse {
        db.execute_unprepared(statement).await.expect("the trigger");
    }

    let calls = (0..40).map(|call| {
        let mut client = server.client.clone();
        let content = if call == 20 {
            "poison pill".to_owned()
        } else {
            format!("fine fact {call}")
        };
        tokio::spawn(async move {
            let request = store_request(&format!("group-{}", call % 5), memory(&content));
            (content, client.store_memory(request).await)
        })
    });
    let mut written = 0;
    for (content, outcome) in futures_join(calls).await {
        match outcome {
            Ok(response) => {
                let response = response.into_inner();
                assert!(!content.starts_with("poison"), "the refused row was stored");
                assert!(
                    !response.deduplicated,
                    "{content}: written twice, so the failed group kept it"
                );
                written += 1;
            }
            Err(status) => {
                assert_eq!(content, "poison pill", "{content} failed: {status:?}");
                assert_eq!(status.code(), Code::Internal);
                assert!(!status.message().contains("poison"), "content in the error");
            }
        }
    }
    assert_eq!(written, 39);
    let rows = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT COUNT(*) AS n FROM memories",
        ))
        .await
        .expect("count")
        .expect("a row")
        .try_get::<i64>("", "n")
        .expect("n");
    assert_eq!(
        rows, 39,
        "one row per written call, none of the refused one"
    );
    server.stop().await;
}

/// Accesses are counted in memory and written behind by the flusher, which shares the
/// writer's connection on SQLite: the counts reach the table while stores go on beside them.
async fn counted_accesses_reach_the_database_between_stores(backend: Backend) {
    let mut server = TestServer::start(backend).await;
    let db = sea_orm::Database::connect(server.database.url())
        .await
        .expect("a second connection");
    stored(&mut server, "counted", memory("prefers email over phone")).await;
    for _ in 0..3 {
        assert_eq!(retrieve(&mut server, "counted").await.len(), 1);
    }
    let count_in_table = || async {
        db.query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT access_count AS n FROM memories \
             WHERE session_id = 'counted' AND last_accessed IS NOT NULL",
        ))
        .await
        .expect("read the count")
        .map(|row| row.try_get::<i32>("", "n").expect("n"))
    };
    let mut written = None;
    for attempt in 0..100 {
        // Stores keep the writer busy while the flusher waits for its turn.
        stored(&mut server, "beside", memory(&format!("fact {attempt}"))).await;
        written = count_in_table().await;
        if written.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(written, Some(3), "three accesses written within 5 s");
    server.stop().await;
}

/// Memories neither stored nor retrieved within `memory_cleanup_days` (30) leave with the
/// sweep, and only those: one retrieved yesterday stays however old it is.
async fn the_sweeper_purges_memories_neither_stored_nor_retrieved_for_the_cleanup_days(
    backend: Backend,
) {
    use engram_domain::entity::memory as row;
    use sea_orm::sea_query::Expr;
    use sea_orm::{ColumnTrait, EntityTrait, QueryFilter};

    let mut server =
        TestServer::start_with(backend, |settings| settings.sweep_interval_seconds = 1).await;
    let db = sea_orm::Database::connect(server.database.url())
        .await
        .expect("a second connection");
    let now = chrono::Utc::now();
    let days_ago = |days| now - chrono::Duration::days(days);
    // (content, stored, last retrieved, purged)
    let memories = [
        (
            "stored 40 days ago, never retrieved",
            days_ago(40),
            None,
            true,
        ),
        (
            "last retrieved 40 days ago",
            days_ago(60),
            Some(days_ago(40)),
            true,
        ),
        (
            "stored long ago, retrieved yesterday",
            days_ago(60),
            Some(days_ago(1)),
            false,
        ),
        (
            "stored 29 days ago, never retrieved",
            days_ago(29),
            None,
            false,
        ),
        ("stored today", now, None, false),
    ];
    let mut kept = Vec::new();
    for (content, created, accessed, purged) in memories {
        let memory = stored(&mut server, "aging", memory(content)).await;
        let id = memory.name.rsplit('/').next().expect("a memory id");
        let aged = row::Entity::update_many()
            .col_expr(row::Column::CreatedAt, Expr::value(created))
            .col_expr(row::Column::LastAccessed, Expr::value(accessed))
            .filter(row::Column::Id.eq(id))
            .exec(&db)
            .await
            .expect("aged");
        assert_eq!(aged.rows_affected, 1);
        if !purged {
            kept.push(memory.name);
        }
    }
    kept.sort();

    let listed = || {
        let mut client = server.client.clone();
        async move {
            let page = client.list_memories(list("aging")).await.expect("list");
            let mut found = names(&page.into_inner().memories);
            found.sort();
            found
        }
    };
    // Sweeps run every second; the listing after the wait shows what stayed either way.
    common::eventually(Duration::from_secs(5), || {
        let (found, kept) = (listed(), &kept);
        async move { found.await == *kept }
    })
    .await;
    assert_eq!(listed().await, kept, "within 5 s of sweeps every second");
    server.stop().await;
}

// --- helpers -------------------------------------------------------------------------------

async fn stored(server: &mut TestServer, session: &str, memory: pb::Memory) -> pb::Memory {
    server
        .client
        .store_memory(store_request(session, memory))
        .await
        .expect("store")
        .into_inner()
        .memory
        .expect("memory")
}

async fn retrieve(server: &mut TestServer, session: &str) -> Vec<pb::Memory> {
    server
        .client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: format!("sessions/{session}"),
            ..Default::default()
        })
        .await
        .expect("retrieve")
        .into_inner()
        .memories
}

async fn purge(
    client: &mut MemoryServiceClient<Channel>,
    parent: &str,
    filter: &str,
    force: bool,
) -> pb::PurgeMemoriesResponse {
    client
        .purge_memories(pb::PurgeMemoriesRequest {
            parent: parent.to_owned(),
            filter: filter.to_owned(),
            force,
        })
        .await
        .expect("purge")
        .into_inner()
}

fn list(session: &str) -> pb::ListMemoriesRequest {
    pb::ListMemoriesRequest {
        parent: format!("sessions/{session}"),
        ..Default::default()
    }
}

fn names(memories: &[pb::Memory]) -> Vec<String> {
    memories.iter().map(|memory| memory.name.clone()).collect()
}

/// Metadata whose numbers, nesting and text a careless decoder would change.
fn awkward_metadata() -> prost_types::Struct {
    use prost_types::value::Kind;
    let value = |kind| prost_types::Value { kind: Some(kind) };
    let mut metadata = struct_of(&[("note", "quote \" slash \\ é 😀")]);
    for (key, kind) in [
        ("ratio", Kind::NumberValue(0.1 + 0.2)),
        ("big", Kind::NumberValue(9_007_199_254_740_991.0)),
        ("tiny", Kind::NumberValue(5e-324)),
        (
            "tags",
            Kind::ListValue(prost_types::ListValue {
                values: vec![value(Kind::BoolValue(true)), value(Kind::NullValue(0))],
            }),
        ),
    ] {
        metadata.fields.insert(key.to_owned(), value(kind));
    }
    metadata
}

fn struct_of(pairs: &[(&str, &str)]) -> prost_types::Struct {
    prost_types::Struct {
        fields: pairs
            .iter()
            .map(|(key, value)| {
                (
                    (*key).to_owned(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue((*value).to_owned())),
                    },
                )
            })
            .collect(),
    }
}

async fn futures_join<T>(tasks: impl Iterator<Item = tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut results = Vec::new();
    for task in tasks.collect::<Vec<_>>() {
        results.push(task.await.expect("task"));
    }
    results
}
