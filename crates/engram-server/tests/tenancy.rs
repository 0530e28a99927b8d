//! Tenants: session ids are scoped by tenant, another tenant's memory is NOT_FOUND, and
//! deletes and purges leave audit records without content. On SQLite and PostgreSQL.

mod common;

use common::{Backend, TestServer, memory, reason, store_request, with_token};
use engram_domain::entity::audit_event;
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use engram_server::auth::parse_token_list;
use sea_orm::{Database, EntityTrait, QueryOrder};
use sha2::{Digest, Sha256};
use tonic::Code;

const ACME_AGENT: &str = "acme-agent-token-quince";
const ACME_ADMIN: &str = "acme-admin-token-medlar";
const GLOBEX_AGENT: &str = "globex-agent-token-loquat";
const SECRET_FACT: &str = "Card ending 4242 expires in March";

on_both_backends!(
    tenants_sharing_a_session_id_never_see_each_other,
    deletes_and_purges_are_audited_without_content,
);

async fn start(backend: Backend) -> TestServer {
    TestServer::start_with(backend, |settings| {
        settings.auth_tokens = parse_token_list(&format!(
            "acme:agent:{ACME_AGENT};acme:admin:{ACME_ADMIN};globex:agent:{GLOBEX_AGENT}"
        ))
        .expect("token list");
    })
    .await
}

fn client(server: &TestServer, token: &str) -> MemoryServiceClient<common::Authorized> {
    MemoryServiceClient::new(with_token(server.channel.clone(), Some(token)))
}

fn named(name: &str) -> pb::GetMemoryRequest {
    pb::GetMemoryRequest {
        name: name.to_owned(),
    }
}

async fn listed(client: &mut MemoryServiceClient<common::Authorized>) -> Vec<String> {
    client
        .list_memories(pb::ListMemoriesRequest {
            parent: "sessions/shared".to_owned(),
            show_deleted: true,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner()
        .memories
        .into_iter()
        .map(|memory| memory.name)
        .collect()
}

async fn tenants_sharing_a_session_id_never_see_each_other(backend: Backend) {
    let server = start(backend).await;
    let mut acme = client(&server, ACME_AGENT);
    let mut globex = client(&server, GLOBEX_AGENT);
    let request_id = uuid::Uuid::new_v4().to_string();

    // The same content in the same session id: two memories, neither a duplicate.
    let mut stored = Vec::new();
    for (tenant, client) in [("acme", &mut acme), ("globex", &mut globex)] {
        let mut request = store_request("shared", memory(SECRET_FACT));
        // Even a request_id one tenant used is another tenant's to use.
        request.request_id = request_id.clone();
        let response = client
            .store_memory(request)
            .await
            .unwrap_or_else(|status| panic!("{tenant} stores: {status:?}"))
            .into_inner();
        assert!(!response.deduplicated, "{tenant}'s memory is its own");
        assert!(
            response.similar_memories.is_empty(),
            "{tenant} sees no near-duplicate"
        );
        stored.push(response.memory.unwrap().name);
    }
    let (acme_name, globex_name) = (stored[0].clone(), stored[1].clone());
    assert_ne!(acme_name, globex_name);

    for (own, other, client) in [
        (&acme_name, &globex_name, &mut acme),
        (&globex_name, &acme_name, &mut globex),
    ] {
        assert_eq!(
            &client
                .get_memory(named(own))
                .await
                .unwrap()
                .into_inner()
                .name,
            own
        );
        let refusals = [
            client.get_memory(named(other)).await.unwrap_err(),
            client
                .delete_memory(pb::DeleteMemoryRequest {
                    name: other.clone(),
                    etag: String::new(),
                })
                .await
                .unwrap_err(),
            client
                .undelete_memory(pb::UndeleteMemoryRequest {
                    name: other.clone(),
                })
                .await
                .unwrap_err(),
            client
                .update_memory(pb::UpdateMemoryRequest {
                    memory: Some(pb::Memory {
                        name: other.clone(),
                        importance: Some(0.9),
                        ..Default::default()
                    }),
                    update_mask: None,
                })
                .await
                .unwrap_err(),
        ];
        for refusal in refusals {
            assert_eq!(
                (refusal.code(), reason(&refusal).as_str()),
                (Code::NotFound, "MEMORY_NOT_FOUND"),
                "{refusal:?}"
            );
        }
        assert_eq!(listed(client).await, vec![own.clone()]);
        let retrieved = client
            .retrieve_memories(pb::RetrieveMemoriesRequest {
                parent: "sessions/shared".to_owned(),
                min_importance: Some(0.0),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .memories;
        assert_eq!(
            retrieved.iter().map(|m| &m.name).collect::<Vec<_>>(),
            vec![own]
        );
        let similar = client
            .find_similar_memories(pb::FindSimilarMemoriesRequest {
                parent: "sessions/shared".to_owned(),
                content: SECRET_FACT.to_owned(),
                max_distance: None,
            })
            .await
            .unwrap()
            .into_inner()
            .similar_memories;
        assert_eq!(
            similar
                .iter()
                .map(|near| near.memory.as_ref().unwrap().name.clone())
                .collect::<Vec<_>>(),
            vec![own.clone()]
        );
    }

    // An admin's purge across sessions reaches its own tenant only.
    let mut acme_admin = client(&server, ACME_ADMIN);
    let purged = acme_admin
        .purge_memories(pb::PurgeMemoriesRequest {
            parent: "sessions/-".to_owned(),
            filter: "*".to_owned(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(purged.purge_count, 1);
    assert_eq!(purged.purge_sample, vec![acme_name.clone()]);
    assert!(listed(&mut acme).await.is_empty());
    assert_eq!(listed(&mut globex).await, vec![globex_name]);
    server.stop().await;
}

async fn deletes_and_purges_are_audited_without_content(backend: Backend) {
    let server = start(backend).await;
    let mut agent = client(&server, ACME_AGENT);
    let mut admin = client(&server, ACME_ADMIN);
    let mut names = Vec::new();
    for content in [SECRET_FACT, "Prefers the night shift"] {
        let stored = agent
            .store_memory(store_request("shared", memory(content)))
            .await
            .unwrap()
            .into_inner();
        names.push(stored.memory.unwrap().name);
    }
    agent
        .delete_memory(pb::DeleteMemoryRequest {
            name: names[0].clone(),
            etag: String::new(),
        })
        .await
        .unwrap();
    // A dry run removes nothing and is not a purge.
    let purge = |force| pb::PurgeMemoriesRequest {
        parent: "sessions/shared".to_owned(),
        filter: "*".to_owned(),
        force,
    };
    admin.purge_memories(purge(false)).await.unwrap();
    agent.purge_memories(purge(true)).await.unwrap();
    // A refused delete changes nothing and records nothing.
    let mut globex = client(&server, GLOBEX_AGENT);
    globex
        .delete_memory(pb::DeleteMemoryRequest {
            name: names[1].clone(),
            etag: String::new(),
        })
        .await
        .unwrap_err();

    let db = Database::connect(server.database.url()).await.unwrap();
    let events = audit_event::Entity::find()
        .order_by_asc(audit_event::Column::CreatedAt)
        .all(&db)
        .await
        .unwrap();
    let agent_principal = format!(
        "token:{}",
        &Sha256::digest(ACME_AGENT.as_bytes())
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect::<String>()[..12]
    );
    let summary: Vec<(&str, &str, &str, &str, &str, i64)> = events
        .iter()
        .map(|event| {
            (
                event.tenant_id.as_str(),
                event.principal.as_str(),
                event.action.as_str(),
                event.resource.as_str(),
                event.filter.as_str(),
                event.affected,
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                "acme",
                agent_principal.as_str(),
                "DeleteMemory",
                names[0].as_str(),
                "",
                1
            ),
            (
                "acme",
                agent_principal.as_str(),
                "PurgeMemories",
                "sessions/shared",
                "*",
                2
            ),
        ]
    );
    for event in &events {
        assert!(event.created_at <= chrono::Utc::now());
        assert!(
            !format!("{event:?}").contains("4242"),
            "no content in audit records"
        );
        assert!(
            !format!("{event:?}").contains(ACME_AGENT),
            "no token in audit records"
        );
    }
    db.close().await.unwrap();
    server.stop().await;
}
