//! Group commit of stores. Every StoreMemory and BatchStoreMemories call of the process joins
//! a queue; a writer takes whatever has queued up, writes it in ONE transaction (one commit,
//! a handful of statements for the whole group) and answers each caller only once that
//! transaction is committed, so every acknowledged store is on disk. Under load the group
//! grows by itself; a lone call is a group of one and waits for nobody. SQLite has one writer,
//! PostgreSQL a few (`Tables::concurrent_groups`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use engram_domain::memory::NewMemory;
use engram_domain::names::SessionId;
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::MemoryError;
use crate::store::{RequestRecord, StoreOutcome, Tables};

/// Most calls in one group, and most memories (a batch call brings up to 100).
const MAX_GROUP_CALLS: usize = 256;
const MAX_GROUP_MEMORIES: usize = 512;
/// Calls that may wait for the writer; beyond it callers wait to queue (backpressure).
const QUEUE_CAPACITY: usize = 4096;

/// One store call waiting for its group to commit.
pub struct PendingStore {
    pub tenant: String,
    pub session: SessionId,
    pub memories: Vec<NewMemory>,
    pub now: DateTime<Utc>,
    pub record: Option<RequestRecord>,
    pub reply: Box<dyn Reply>,
}

/// The caller's side of a pending store: receives its outcomes, or its response when that
/// is kept with the request_id, after the commit.
pub trait Reply: Send + Sync {
    /// Takes the outcomes (again if the group is retried call by call); when `keep` is set,
    /// builds the response and returns its encoding.
    fn receive(&mut self, outcomes: Vec<StoreOutcome>, keep: bool) -> Option<Vec<u8>>;
    /// Takes the kept response of an earlier call with the same request_id.
    fn replay(&mut self, kept: &[u8]) -> Result<(), MemoryError>;
    /// Sends the answer (the response or the outcomes), or the failure, to the caller.
    fn finish(self: Box<Self>, failure: Option<MemoryError>);
    /// The caller went away (deadline, cancel) before its group was written.
    fn is_abandoned(&self) -> bool;
}

struct TypedReply<R, F> {
    respond: Arc<F>,
    answer: Option<Answer<R>>,
    caller: oneshot::Sender<Answered<R>>,
}

/// What a caller receives once its group committed. A response kept with a request_id is
/// built inside the transaction; any other is built by the caller from its outcomes, off the
/// one writer every store waits for.
enum Answer<R> {
    Built(R),
    Outcomes(Vec<StoreOutcome>),
}

type Answered<R> = Result<Answer<R>, MemoryError>;

impl<R, F> Reply for TypedReply<R, F>
where
    R: prost::Message + Default + Send + Sync + 'static,
    F: Fn(Vec<StoreOutcome>) -> R + Send + Sync + 'static,
{
    fn receive(&mut self, outcomes: Vec<StoreOutcome>, keep: bool) -> Option<Vec<u8>> {
        if !keep {
            self.answer = Some(Answer::Outcomes(outcomes));
            return None;
        }
        let response = (self.respond)(outcomes);
        let encoded = response.encode_to_vec();
        self.answer = Some(Answer::Built(response));
        Some(encoded)
    }

    fn replay(&mut self, kept: &[u8]) -> Result<(), MemoryError> {
        let response = R::decode(kept).map_err(|error| {
            MemoryError::Internal(sea_orm::DbErr::Custom(format!(
                "undecodable kept response: {error}"
            )))
        })?;
        self.answer = Some(Answer::Built(response));
        Ok(())
    }

    fn finish(self: Box<Self>, failure: Option<MemoryError>) {
        let result = match (failure, self.answer) {
            (Some(failure), _) => Err(failure),
            (None, Some(answer)) => Ok(answer),
            (None, None) => Err(MemoryError::Internal(sea_orm::DbErr::Custom(
                "a store finished without a response".to_owned(),
            ))),
        };
        // The caller may have gone (deadline, cancel): what committed stays committed.
        let _ = self.caller.send(result);
    }

    fn is_abandoned(&self) -> bool {
        self.caller.is_closed()
    }
}

/// The queue of the process's stores; cheap to clone.
#[derive(Clone)]
pub struct StoreQueue {
    sender: mpsc::Sender<PendingStore>,
}

impl StoreQueue {
    /// Starts the writers and the access flusher; they stop when the last queue handle is
    /// dropped.
    pub fn start(tables: Tables) -> Self {
        let (sender, receiver) = mpsc::channel(QUEUE_CAPACITY);
        let receiver = Arc::new(Mutex::new(receiver));
        let writers = tables.concurrent_groups();
        // A thread of their own: a group makes several trips to its connection, and a writer
        // woken among busy request handlers would wait its turn after every one.
        std::thread::Builder::new()
            .name("engram-writer".to_owned())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the writer's runtime");
                runtime.block_on(async move {
                    let mut running = tokio::task::JoinSet::new();
                    running.spawn(tables.access_flusher());
                    for _ in 0..writers {
                        running.spawn(write_groups(tables.clone(), receiver.clone()));
                    }
                    // The flusher ends once the last `Tables` is gone.
                    drop(tables);
                    while running.join_next().await.is_some() {}
                });
            })
            .expect("the writer's thread");
        Self { sender }
    }

    /// Queues a store and waits until its group committed (or failed).
    pub async fn store<R, F>(
        &self,
        tenant: String,
        session: SessionId,
        memories: Vec<NewMemory>,
        now: DateTime<Utc>,
        record: Option<RequestRecord>,
        respond: F,
    ) -> Result<R, MemoryError>
    where
        R: prost::Message + Default + Send + Sync + 'static,
        F: Fn(Vec<StoreOutcome>) -> R + Send + Sync + 'static,
    {
        let (caller, answer) = oneshot::channel();
        let respond = Arc::new(respond);
        let pending = PendingStore {
            tenant,
            session,
            memories,
            now,
            record,
            reply: Box::new(TypedReply {
                respond: respond.clone(),
                answer: None,
                caller,
            }),
        };
        let stopped = || {
            MemoryError::Unavailable(sea_orm::DbErr::Custom(
                "the store writer stopped".to_owned(),
            ))
        };
        self.sender.send(pending).await.map_err(|_| stopped())?;
        match answer.await.map_err(|_| stopped())?? {
            Answer::Built(response) => Ok(response),
            Answer::Outcomes(outcomes) => Ok(respond(outcomes)),
        }
    }
}

/// One writer: takes the next group from the queue and writes it, until the queue closes.
async fn write_groups(tables: Tables, queue: Arc<Mutex<mpsc::Receiver<PendingStore>>>) {
    let mut held_over: Option<PendingStore> = None;
    let mut checkpointed = Instant::now();
    loop {
        let group = {
            let mut receiver = queue.lock().await;
            match next_group(&mut receiver, &mut held_over).await {
                Some(group) => group,
                None => return,
            }
        };
        write_group(&tables, group).await;
        // Between groups, when due, until one leaves the log fully copied.
        if tables.checkpoint_due(checkpointed.elapsed()) && tables.checkpoint().await {
            checkpointed = Instant::now();
        }
    }
}

/// Whatever has queued up, at least one call (None once the queue is closed).
async fn next_group(
    receiver: &mut mpsc::Receiver<PendingStore>,
    held_over: &mut Option<PendingStore>,
) -> Option<Vec<PendingStore>> {
    let first = match held_over.take() {
        Some(pending) => pending,
        None => receiver.recv().await?,
    };
    let mut memories = first.memories.len();
    let mut request_ids: HashSet<String> = first
        .record
        .iter()
        .map(|record| record.request_id.clone())
        .collect();
    let mut group = vec![first];
    while group.len() < MAX_GROUP_CALLS {
        let Ok(next) = receiver.try_recv() else { break };
        // Nobody waits for it (a cancelled call may or may not take effect): under
        // overload, work for callers that are still there.
        if next.reply.is_abandoned() {
            continue;
        }
        // A retry of a call in this group must see that call committed: next group.
        let repeats_a_request = next
            .record
            .as_ref()
            .is_some_and(|record| !request_ids.insert(record.request_id.clone()));
        if repeats_a_request || memories + next.memories.len() > MAX_GROUP_MEMORIES {
            *held_over = Some(next);
            break;
        }
        memories += next.memories.len();
        group.push(next);
    }
    Some(group)
}

/// Writes a group and answers its callers. When the group's transaction fails, each call is
/// written again on its own, so one bad call cannot fail the others; when the database is
/// unavailable, retrying alone cannot help and every call gets UNAVAILABLE at once.
async fn write_group(tables: &Tables, mut group: Vec<PendingStore>) {
    let started = std::time::Instant::now();
    let result = tables.write_group(&mut group).await;
    tracing::debug!(
        calls = group.len(),
        micros = started.elapsed().as_micros() as u64,
        "group written"
    );
    match result {
        Ok(failures) => {
            for (pending, failure) in group.into_iter().zip(failures) {
                pending.reply.finish(failure);
            }
        }
        Err(error) if group.len() == 1 => {
            let pending = group.pop().expect("one call");
            pending.reply.finish(Some(error));
        }
        Err(MemoryError::Unavailable(error)) => {
            for pending in group {
                let failure = sea_orm::DbErr::Custom(format!("database unavailable: {error}"));
                pending
                    .reply
                    .finish(Some(MemoryError::Unavailable(failure)));
            }
        }
        Err(_) => {
            for pending in group {
                Box::pin(write_group(tables, vec![pending])).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use prost::Message;
    use prost_types::Timestamp;

    use super::*;

    /// A reply whose response counts the outcomes it was built from; `built` counts builds.
    fn counting_reply(
        built: Arc<AtomicUsize>,
    ) -> (Box<dyn Reply>, oneshot::Receiver<Answered<Timestamp>>) {
        let (caller, answer) = oneshot::channel();
        let respond = move |outcomes: Vec<StoreOutcome>| {
            built.fetch_add(1, Ordering::SeqCst);
            Timestamp {
                seconds: outcomes.len() as i64,
                nanos: 0,
            }
        };
        let reply = TypedReply {
            respond: Arc::new(respond),
            answer: None,
            caller,
        };
        (Box::new(reply), answer)
    }

    #[test]
    fn the_writer_builds_no_response_that_is_not_kept() {
        let built = Arc::new(AtomicUsize::new(0));
        let (mut reply, mut answer) = counting_reply(built.clone());
        assert_eq!(reply.receive(Vec::new(), false), None);
        reply.finish(None);
        assert_eq!(built.load(Ordering::SeqCst), 0);
        match answer.try_recv() {
            Ok(Ok(Answer::Outcomes(_))) => {}
            _ => panic!("the caller should receive the outcomes"),
        }
    }

    #[test]
    fn a_kept_response_is_built_and_encoded_inside_the_transaction() {
        let built = Arc::new(AtomicUsize::new(0));
        let (mut reply, mut answer) = counting_reply(built.clone());
        let encoded = reply.receive(Vec::new(), true).expect("kept");
        reply.finish(None);
        assert_eq!(built.load(Ordering::SeqCst), 1);
        let kept = Timestamp::decode(encoded.as_slice()).expect("an encoded response");
        match answer.try_recv() {
            Ok(Ok(Answer::Built(response))) => assert_eq!(response, kept),
            _ => panic!("the caller should receive the built response"),
        }
    }
}
