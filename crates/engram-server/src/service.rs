//! engram.memory.v1.MemoryService: validates each request, hands it to the store, and
//! shapes the answer. Every rejection names its field; nothing half-valid reaches the store.

use chrono::{DateTime, Duration, Utc};
use engram_domain::error::{FieldViolation, Violations};
use engram_domain::filter::{parse_content_type_filter, parse_purge_filter};
use engram_domain::limits::{
    BATCH_MAX_REQUESTS, LIST_DEFAULT_PAGE_SIZE, LIST_MAX_PAGE_SIZE, RETRIEVE_DEFAULT_PAGE_SIZE,
    RETRIEVE_MAX_PAGE_SIZE, SIMHASH_MAX_DISTANCE,
};
use engram_domain::memory::ContentType;
use engram_domain::names::{
    SessionId, SessionScope, parse_memory_name, parse_session_name, parse_session_scope,
};
use engram_domain::paging::{
    PageTokenError, decode_page_token, encode_page_token, request_fingerprint,
};
use engram_domain::{expiry, text, validate};
use engram_proto::memory::v1 as pb;
use prost::Message;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::convert::{self, View};
use crate::error::MemoryError;
use crate::settings::Settings;
use crate::store::{Changes, ListQuery, MemoryStore, RequestRecord, RetrieveQuery, StoreOutcome};

pub struct MemoryApi {
    store: MemoryStore,
    default_ttl: Duration,
    importance_threshold: f64,
    similarity_max_distance: u32,
    soft_delete_retention: Duration,
}

impl MemoryApi {
    pub fn new(store: MemoryStore, settings: &Settings) -> Self {
        Self {
            store,
            default_ttl: Duration::hours(i64::from(settings.memory_ttl_hours)),
            importance_threshold: settings.memory_importance_threshold,
            similarity_max_distance: settings.similarity_max_distance,
            soft_delete_retention: Duration::days(i64::from(settings.soft_delete_retention_days)),
        }
    }

    fn view(&self, now: DateTime<Utc>) -> View {
        View {
            now,
            soft_delete_retention: self.soft_delete_retention,
        }
    }
}

/// A StoreMemoryResponse; built after the commit, inside it when kept with a request_id, so
/// it borrows nothing.
fn store_response(view: View, outcome: StoreOutcome) -> pb::StoreMemoryResponse {
    let StoreOutcome {
        memory,
        deduplicated,
        similar,
        evicted,
    } = outcome;
    pb::StoreMemoryResponse {
        memory: Some(view.memory(&memory)),
        deduplicated,
        similar_memories: view.similar(&similar),
        evicted_memories: evicted,
    }
}

/// The caller the admission interceptor authenticated.
fn caller<T>(request: &Request<T>) -> Caller {
    request
        .extensions()
        .get::<Caller>()
        .cloned()
        .expect("the admission interceptor runs first")
}

/// Database timestamps keep microseconds; so does every time Engram hands out.
fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

/// A request_id is optional; when given it must be a UUID.
fn request_record(
    field: &str,
    request_id: &str,
    request: &impl Message,
) -> Result<Option<RequestRecord>, FieldViolation> {
    if request_id.is_empty() {
        return Ok(None);
    }
    uuid::Uuid::try_parse(request_id).map_err(|_| FieldViolation::new(field, "must be a UUID"))?;
    let digest = Sha256::digest(request.encode_to_vec())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect();
    Ok(Some(RequestRecord {
        request_id: request_id.to_ascii_lowercase(),
        digest,
    }))
}

/// AIP-158: 0 means the default, larger values are coerced to the maximum, negatives refused.
fn page_size(
    field: &str,
    requested: i32,
    default: usize,
    max: usize,
) -> Result<usize, FieldViolation> {
    match usize::try_from(requested) {
        Err(_) => Err(FieldViolation::new(field, "must not be negative")),
        Ok(0) => Ok(default),
        Ok(size) => Ok(size.min(max)),
    }
}

fn invalid(violations: Violations) -> Result<(), MemoryError> {
    violations
        .into_result()
        .map_err(MemoryError::InvalidArgument)
}

fn required<T>(violations: &mut Violations, field: &str, value: Option<T>) -> Option<T> {
    if value.is_none() {
        violations.push(FieldViolation::new(field, "is required"));
    }
    value
}

#[tonic::async_trait]
impl pb::memory_service_server::MemoryService for MemoryApi {
    async fn store_memory(
        &self,
        request: Request<pb::StoreMemoryRequest>,
    ) -> Result<Response<pb::StoreMemoryResponse>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let request = request.into_inner();
        let mut violations = Violations::default();
        let record = violations.check(request_record("request_id", &request.request_id, &request));
        let pb::StoreMemoryRequest {
            parent,
            memory,
            request_id: _,
        } = request;
        let session = violations.check(parse_session_name("parent", &parent));
        let memory = required(&mut violations, "memory", memory).and_then(|memory| {
            violations.check_all(convert::new_memory(
                "memory.",
                memory,
                self.default_ttl,
                now,
            ))
        });
        invalid(violations)?;
        let (Some(session), Some(memory), Some(record)) = (session, memory, record) else {
            unreachable!("validated")
        };
        let view = self.view(now);
        let response = self
            .store
            .store(
                tenant,
                session,
                vec![memory],
                now,
                record,
                move |outcomes| {
                    let outcome = outcomes.into_iter().next().expect("one outcome per memory");
                    store_response(view, outcome)
                },
            )
            .await?;
        Ok(Response::new(response))
    }

    async fn batch_store_memories(
        &self,
        request: Request<pb::BatchStoreMemoriesRequest>,
    ) -> Result<Response<pb::BatchStoreMemoriesResponse>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let request = request.into_inner();
        let mut violations = Violations::default();
        let record = violations.check(request_record("request_id", &request.request_id, &request));
        let pb::BatchStoreMemoriesRequest {
            parent,
            requests,
            request_id: _,
        } = request;
        let session = violations.check(parse_session_name("parent", &parent));
        if requests.is_empty() || requests.len() > BATCH_MAX_REQUESTS {
            violations.push(FieldViolation::new(
                "requests",
                format!("must hold 1 to {BATCH_MAX_REQUESTS} requests"),
            ));
        }
        let mut memories = Vec::with_capacity(requests.len());
        for (index, item) in requests.into_iter().take(BATCH_MAX_REQUESTS).enumerate() {
            let prefix = format!("requests[{index}].");
            let pb::StoreMemoryRequest {
                parent: item_parent,
                memory,
                request_id,
            } = item;
            if !item_parent.is_empty() && item_parent != parent {
                violations.push(FieldViolation::new(
                    format!("{prefix}parent"),
                    "must be empty or equal the batch parent",
                ));
            }
            if !request_id.is_empty() {
                violations.push(FieldViolation::new(
                    format!("{prefix}request_id"),
                    "must be empty: set request_id on the batch",
                ));
            }
            let memory =
                required(&mut violations, &format!("{prefix}memory"), memory).and_then(|memory| {
                    violations.check_all(convert::new_memory(
                        &format!("{prefix}memory."),
                        memory,
                        self.default_ttl,
                        now,
                    ))
                });
            memories.extend(memory);
        }
        invalid(violations)?;
        let (Some(session), Some(record)) = (session, record) else {
            unreachable!("validated")
        };
        let view = self.view(now);
        let response = self
            .store
            .store(tenant, session, memories, now, record, move |outcomes| {
                pb::BatchStoreMemoriesResponse {
                    responses: outcomes
                        .into_iter()
                        .map(|outcome| store_response(view, outcome))
                        .collect(),
                }
            })
            .await?;
        Ok(Response::new(response))
    }

    async fn get_memory(
        &self,
        request: Request<pb::GetMemoryRequest>,
    ) -> Result<Response<pb::Memory>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::GetMemoryRequest { name } = request.into_inner();
        let name = parse_memory_name("name", &name).map_err(MemoryError::from)?;
        let memory = self.store.get(&tenant, &name, now).await?;
        Ok(Response::new(self.view(now).memory(&memory)))
    }

    async fn list_memories(
        &self,
        request: Request<pb::ListMemoriesRequest>,
    ) -> Result<Response<pb::ListMemoriesResponse>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::ListMemoriesRequest {
            parent,
            page_size: requested_size,
            page_token,
            filter,
            show_deleted,
        } = request.into_inner();
        let mut violations = Violations::default();
        let session = violations.check(parse_session_name("parent", &parent));
        let page_size = violations.check(page_size(
            "page_size",
            requested_size,
            LIST_DEFAULT_PAGE_SIZE,
            LIST_MAX_PAGE_SIZE,
        ));
        let content_types = violations.check(
            parse_content_type_filter(&filter).map_err(|why| FieldViolation::new("filter", why)),
        );
        let fingerprint = request_fingerprint(&[
            &parent,
            &filter,
            if show_deleted { "deleted" } else { "live" },
        ]);
        let after = if page_token.is_empty() {
            None
        } else {
            violations.check(
                decode_page_token(&page_token, fingerprint).map_err(|error| {
                    FieldViolation::new(
                        "page_token",
                        match error {
                            PageTokenError::Malformed => "is not a token this service issued",
                            PageTokenError::RequestChanged => {
                                "belongs to a request with another parent, filter or show_deleted"
                            }
                        },
                    )
                }),
            )
        };
        invalid(violations)?;
        let (Some(session), Some(page_size), Some(content_types)) =
            (session, page_size, content_types)
        else {
            unreachable!("validated")
        };
        let query = ListQuery {
            tenant,
            session,
            content_types,
            show_deleted,
            page_size,
            after,
        };
        let (memories, next) = self.store.list(query, now).await?;
        let view = self.view(now);
        Ok(Response::new(pb::ListMemoriesResponse {
            memories: memories.iter().map(|memory| view.memory(memory)).collect(),
            next_page_token: next
                .map(|cursor| encode_page_token(&cursor, fingerprint))
                .unwrap_or_default(),
        }))
    }

    async fn update_memory(
        &self,
        request: Request<pb::UpdateMemoryRequest>,
    ) -> Result<Response<pb::Memory>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::UpdateMemoryRequest {
            memory,
            update_mask,
        } = request.into_inner();
        let memory = memory.ok_or_else(|| MemoryError::invalid("memory", "is required"))?;
        let mut violations = Violations::default();
        let name = violations.check(parse_memory_name("memory.name", &memory.name));
        let paths = violations
            .check(update_paths(&memory, update_mask))
            .unwrap_or_default();
        let has = |path: &str| paths.iter().any(|p| p == path);
        let mut changes = Changes::default();
        if has("content") {
            changes.content =
                violations.check(validate::content("memory.content", &memory.content));
        }
        if has("importance") {
            changes.importance = violations.check(match memory.importance {
                Some(importance) => validate::importance("memory.importance", importance),
                None => Err(FieldViolation::new(
                    "memory.importance",
                    "is required when in update_mask",
                )),
            });
        }
        if has("metadata") {
            changes.metadata = violations.check(convert::metadata(
                "memory.metadata",
                memory.metadata.clone(),
            ));
        }
        if has("expiration") {
            changes.expires_at =
                violations.check(convert::expiration("memory.", memory.expiration).and_then(
                    |requested| expiry::resolve("memory.", requested, self.default_ttl, now),
                ));
        }
        invalid(violations)?;
        let name = name.expect("validated");
        let etag = (!memory.etag.is_empty()).then_some(memory.etag.as_str());
        let updated = self
            .store
            .update(&tenant, &name, etag, changes, now)
            .await?;
        Ok(Response::new(self.view(now).memory(&updated)))
    }

    async fn delete_memory(
        &self,
        request: Request<pb::DeleteMemoryRequest>,
    ) -> Result<Response<pb::Memory>, Status> {
        let now = now();
        let caller = caller(&request);
        let pb::DeleteMemoryRequest { name, etag } = request.into_inner();
        let name = parse_memory_name("name", &name).map_err(MemoryError::from)?;
        let etag = (!etag.is_empty()).then_some(etag.as_str());
        let deleted = self.store.delete(&caller, &name, etag, now).await?;
        Ok(Response::new(self.view(now).memory(&deleted)))
    }

    async fn undelete_memory(
        &self,
        request: Request<pb::UndeleteMemoryRequest>,
    ) -> Result<Response<pb::Memory>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::UndeleteMemoryRequest { name } = request.into_inner();
        let name = parse_memory_name("name", &name).map_err(MemoryError::from)?;
        let restored = self.store.undelete(&tenant, &name, now).await?;
        Ok(Response::new(self.view(now).memory(&restored)))
    }

    async fn purge_memories(
        &self,
        request: Request<pb::PurgeMemoriesRequest>,
    ) -> Result<Response<pb::PurgeMemoriesResponse>, Status> {
        let now = now();
        let caller = caller(&request);
        let pb::PurgeMemoriesRequest {
            parent,
            filter,
            force,
        } = request.into_inner();
        let mut violations = Violations::default();
        let sessions = violations.check(parse_session_scope("parent", &parent));
        if sessions == Some(SessionScope::All) {
            auth::require_admin(&caller)?;
        }
        let scope = violations
            .check(parse_purge_filter(&filter).map_err(|why| FieldViolation::new("filter", why)));
        invalid(violations)?;
        let (Some(sessions), Some(scope)) = (sessions, scope) else {
            unreachable!("validated")
        };
        let (purge_count, purge_sample) = self
            .store
            .purge(&caller, &sessions, scope, force, now)
            .await?;
        Ok(Response::new(pb::PurgeMemoriesResponse {
            purge_count: purge_count as i64,
            purge_sample,
        }))
    }

    async fn retrieve_memories(
        &self,
        request: Request<pb::RetrieveMemoriesRequest>,
    ) -> Result<Response<pb::RetrieveMemoriesResponse>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::RetrieveMemoriesRequest {
            parent,
            content_types,
            min_importance,
            page_size: requested_size,
        } = request.into_inner();
        let mut violations = Violations::default();
        let session = violations.check(parse_session_name("parent", &parent));
        let limit = violations.check(page_size(
            "page_size",
            requested_size,
            RETRIEVE_DEFAULT_PAGE_SIZE,
            RETRIEVE_MAX_PAGE_SIZE,
        ));
        let min_importance = violations.check(validate::importance(
            "min_importance",
            min_importance.unwrap_or(self.importance_threshold),
        ));
        let content_types = violations.check(content_type_list(&content_types));
        invalid(violations)?;
        let (Some(session), Some(limit), Some(min_importance), Some(content_types)) =
            (session, limit, min_importance, content_types)
        else {
            unreachable!("validated")
        };
        let view = self.view(now);
        let mut encoded = Vec::new();
        self.store
            .retrieve(
                RetrieveQuery {
                    tenant,
                    session,
                    content_types,
                    min_importance,
                    limit,
                },
                now,
                |memory| {
                    let untracked = memory.untracked_encoding(|row| view.untracked_encoding(row));
                    view.append_retrieved_memory(memory, untracked, &mut encoded);
                },
            )
            .await?;
        Ok(Response::new(
            pb::RetrieveMemoriesResponse::from_encoded_memories(encoded),
        ))
    }

    async fn find_similar_memories(
        &self,
        request: Request<pb::FindSimilarMemoriesRequest>,
    ) -> Result<Response<pb::FindSimilarMemoriesResponse>, Status> {
        let now = now();
        let tenant = caller(&request).tenant;
        let pb::FindSimilarMemoriesRequest {
            parent,
            content,
            max_distance,
        } = request.into_inner();
        let mut violations = Violations::default();
        let session: Option<SessionId> = violations.check(parse_session_name("parent", &parent));
        let content = violations.check(validate::content("content", &content));
        let max_distance = violations.check(match max_distance {
            None => Ok(self.similarity_max_distance),
            Some(distance) => u32::try_from(distance)
                .ok()
                .filter(|distance| *distance <= SIMHASH_MAX_DISTANCE)
                .ok_or_else(|| {
                    FieldViolation::new(
                        "max_distance",
                        format!("must be between 0 and {SIMHASH_MAX_DISTANCE}"),
                    )
                }),
        });
        invalid(violations)?;
        let (Some(session), Some(content), Some(max_distance)) = (session, content, max_distance)
        else {
            unreachable!("validated")
        };
        let view = self.view(now);
        let similar_memories = self
            .store
            .find_similar(
                &tenant,
                &session,
                text::semantic_hash(&content),
                max_distance,
                now,
                |memory, distance| view.similar_memory(memory, distance),
            )
            .await?;
        Ok(Response::new(pb::FindSimilarMemoriesResponse {
            similar_memories,
        }))
    }
}

/// Content types of a RetrieveMemories filter: each must be a known, specified type.
fn content_type_list(values: &[i32]) -> Result<Vec<ContentType>, FieldViolation> {
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            let field = format!("content_types[{index}]");
            if *value == pb::ContentType::Unspecified as i32 {
                return Err(FieldViolation::new(
                    field,
                    "must be a specified content type",
                ));
            }
            convert::content_type(&field, *value)
        })
        .collect()
}

/// The fields UpdateMemory changes (AIP-134): the mask's paths (`*` is all), or without a
/// mask every field the request gives a value. `expire_time` and `ttl` both mean expiration.
fn update_paths(
    memory: &pb::Memory,
    mask: Option<prost_types::FieldMask>,
) -> Result<Vec<String>, FieldViolation> {
    const MUTABLE: [&str; 4] = ["content", "importance", "metadata", "expiration"];
    let paths = mask.map(|mask| mask.paths).unwrap_or_default();
    if paths.is_empty() {
        let given = [
            ("content", !memory.content.is_empty()),
            ("importance", memory.importance.is_some()),
            ("metadata", memory.metadata.is_some()),
            ("expiration", memory.expiration.is_some()),
        ];
        let implied: Vec<String> = given
            .iter()
            .filter(|(_, set)| *set)
            .map(|(path, _)| (*path).to_owned())
            .collect();
        if implied.is_empty() {
            return Err(FieldViolation::new(
                "update_mask",
                "names no field and the memory gives no new value",
            ));
        }
        return Ok(implied);
    }
    let mut chosen = Vec::new();
    for path in paths {
        let path = match path.as_str() {
            "*" => return Ok(MUTABLE.map(str::to_owned).to_vec()),
            "expire_time" | "ttl" | "expiration" => "expiration",
            known if MUTABLE.contains(&known) => known,
            _ => {
                return Err(FieldViolation::new(
                    "update_mask",
                    "paths may be content, importance, metadata, expire_time, ttl or *",
                ));
            }
        };
        if !chosen.iter().any(|p| p == path) {
            chosen.push(path.to_owned());
        }
    }
    Ok(chosen)
}
