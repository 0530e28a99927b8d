//! Engram MemoryService from Rust, with the tonic client that engram-proto generates.
//!
//! Stores two memories, gets one, retrieves them ranked, lists them a page at a time, deletes and
//! undeletes one, and reads the google.rpc.BadRequest of a rejected request. Exits non-zero as soon
//! as a step does not behave as documented, so CI runs it as a test.
//!
//!     cargo run -p engram-example-rust -- --target 127.0.0.1:50051

use std::process::ExitCode;

use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use engram_proto::memory::v1::{
    ContentType, DeleteMemoryRequest, GetMemoryRequest, ListMemoriesRequest, Memory,
    RetrieveMemoriesRequest, StoreMemoryRequest, UndeleteMemoryRequest,
};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};
use tonic_types::StatusExt;
use uuid::Uuid;

type Failure = Box<dyn std::error::Error>;
type Client = MemoryServiceClient<InterceptedService<Channel, CallMetadata>>;

/// Metadata added to every call: a W3C traceparent (one trace, a new parent span per call) and,
/// when ENGRAM_TOKEN is set, the bearer token (required by a server configured with
/// auth_tokens).
#[derive(Clone)]
struct CallMetadata {
    trace_id: String,
    authorization: Option<MetadataValue<Ascii>>,
}

impl CallMetadata {
    fn from_env() -> Result<Self, Failure> {
        let authorization = match std::env::var("ENGRAM_TOKEN") {
            Ok(token) if !token.is_empty() => Some(format!("Bearer {token}").parse()?),
            _ => None,
        };
        Ok(Self {
            trace_id: Uuid::new_v4().simple().to_string(),
            authorization,
        })
    }
}

impl Interceptor for CallMetadata {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let span_id = Uuid::new_v4().simple().to_string();
        let traceparent = format!("00-{}-{}-01", self.trace_id, &span_id[..16]);
        let traceparent = traceparent
            .parse()
            .map_err(|_| Status::internal("traceparent is not ASCII"))?;
        request.metadata_mut().insert("traceparent", traceparent);
        if let Some(authorization) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", authorization.clone());
        }
        Ok(request)
    }
}

fn expect(condition: bool, what: &str) -> Result<(), Failure> {
    if condition { Ok(()) } else { Err(what.into()) }
}

async fn store(
    client: &mut Client,
    session: &str,
    content: &str,
    content_type: ContentType,
    importance: f64,
) -> Result<Memory, Failure> {
    let response = client
        .store_memory(StoreMemoryRequest {
            parent: session.to_owned(),
            memory: Some(Memory {
                content: content.to_owned(),
                content_type: content_type as i32,
                importance: Some(importance),
                ..Memory::default()
            }),
            request_id: Uuid::new_v4().to_string(),
        })
        .await?
        .into_inner();
    expect(
        !response.deduplicated,
        &format!("a new memory is not deduplicated: {content:?}"),
    )?;
    let memory = response.memory.ok_or("StoreMemory returns the memory")?;
    expect(
        memory.name.starts_with(&format!("{session}/memories/")),
        "name is under the session",
    )?;
    println!(
        "stored    {} importance={}",
        memory.name,
        memory.importance.unwrap_or_default()
    );
    Ok(memory)
}

async fn list_page(
    client: &mut Client,
    session: &str,
    page_token: String,
) -> Result<(Vec<String>, String), Failure> {
    let page = client
        .list_memories(ListMemoriesRequest {
            parent: session.to_owned(),
            page_size: 1,
            page_token,
            ..ListMemoriesRequest::default()
        })
        .await?
        .into_inner();
    let names = page
        .memories
        .into_iter()
        .map(|memory| memory.name)
        .collect();
    Ok((names, page.next_page_token))
}

async fn run(target: &str) -> Result<(), Failure> {
    let call_metadata = CallMetadata::from_env()?;
    let session = format!(
        "sessions/example-rs-{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    println!(
        "target {target}, session {session}, trace {}",
        call_metadata.trace_id
    );
    let channel = Channel::from_shared(format!("http://{target}"))?
        .connect()
        .await?;
    let mut client = MemoryServiceClient::with_interceptor(channel, call_metadata);

    let preference = store(
        &mut client,
        &session,
        "Prefers email over phone",
        ContentType::Preference,
        0.8,
    )
    .await?;
    let fact = store(
        &mut client,
        &session,
        "Has a premium plan",
        ContentType::Fact,
        0.6,
    )
    .await?;

    let got = client
        .get_memory(GetMemoryRequest {
            name: preference.name.clone(),
        })
        .await?
        .into_inner();
    expect(
        got.content == "Prefers email over phone",
        "GetMemory returns the stored content",
    )?;
    expect(
        got.content_hash == preference.content_hash,
        "GetMemory returns the stored hash",
    )?;
    println!("got       {} content={:?}", got.name, got.content);

    let retrieved = client
        .retrieve_memories(RetrieveMemoriesRequest {
            parent: session.clone(),
            page_size: 10,
            ..RetrieveMemoriesRequest::default()
        })
        .await?
        .into_inner();
    let ranked: Vec<&str> = retrieved.memories.iter().map(|m| m.name.as_str()).collect();
    expect(
        ranked == [preference.name.as_str(), fact.name.as_str()],
        &format!("RetrieveMemories ranks by importance: {ranked:?}"),
    )?;
    println!("retrieved {} memories, most important first", ranked.len());

    let (first_page, next_page_token) = list_page(&mut client, &session, String::new()).await?;
    expect(
        first_page == [preference.name.clone()],
        "page 1 is the oldest memory",
    )?;
    expect(!next_page_token.is_empty(), "page 1 has a next_page_token")?;
    let (second_page, _) = list_page(&mut client, &session, next_page_token).await?;
    expect(
        second_page == [fact.name.clone()],
        "page 2 is the next memory",
    )?;
    println!("listed    2 pages of 1 memory each");

    let deleted = client
        .delete_memory(DeleteMemoryRequest {
            name: fact.name.clone(),
            etag: fact.etag.clone(),
        })
        .await?
        .into_inner();
    expect(
        deleted.delete_time.is_some(),
        "a deleted memory has a delete_time",
    )?;
    let purge_time = deleted
        .purge_time
        .ok_or("a deleted memory has a purge_time")?;
    println!("deleted   {} purge_time={purge_time}", deleted.name);

    let undeleted = client
        .undelete_memory(UndeleteMemoryRequest {
            name: fact.name.clone(),
        })
        .await?
        .into_inner();
    expect(
        undeleted.delete_time.is_none(),
        "an undeleted memory has no delete_time",
    )?;
    println!("undeleted {}", undeleted.name);

    let rejected = client
        .store_memory(StoreMemoryRequest {
            parent: "sessions/../etc/passwd".to_owned(),
            memory: Some(Memory {
                content: "x".to_owned(),
                ..Memory::default()
            }),
            ..StoreMemoryRequest::default()
        })
        .await;
    let status = match rejected {
        Ok(_) => return Err("a path as session id is rejected".into()),
        Err(status) => status,
    };
    expect(
        status.code() == Code::InvalidArgument,
        &format!("code is INVALID_ARGUMENT: {:?}", status.code()),
    )?;
    let bad_request = status
        .get_details_bad_request()
        .ok_or("the error carries a google.rpc.BadRequest")?;
    let parent = bad_request
        .field_violations
        .iter()
        .find(|violation| violation.field == "parent")
        .ok_or_else(|| {
            format!(
                "a field violation names parent: {:?}",
                bad_request.field_violations
            )
        })?;
    println!("rejected  parent: {}", parent.description);
    Ok(())
}

fn target_from_args() -> Result<String, Failure> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next(), args.next()) {
        (None, ..) => {
            Ok(std::env::var("ENGRAM_TARGET").unwrap_or_else(|_| "127.0.0.1:50051".into()))
        }
        (Some("--target"), Some(target), None) => Ok(target),
        _ => Err("usage: engram-example-rust [--target HOST:PORT]".into()),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let outcome = match target_from_args() {
        Ok(target) => run(&target).await,
        Err(usage) => Err(usage),
    };
    match outcome {
        Ok(()) => {
            println!("rust example: all steps behaved as expected");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("FAILED: {failure}");
            ExitCode::FAILURE
        }
    }
}
