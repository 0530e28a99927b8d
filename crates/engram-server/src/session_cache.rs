//! Whole live memories of recently read sessions, so RetrieveMemories and FindSimilarMemories
//! answer the next turn of a conversation without a database round trip.
//!
//! The database stays the truth. Every write of this process drops the sessions it touched
//! after its commit and before it answers, so a replica reads its own writes; on PostgreSQL
//! other replicas' writes arrive as notifications (`crate::store::listen_for_changes`). A load
//! that overlapped a write or an uncached access of its session is used once and not kept
//! (generations, striped by session), and no entry is older than `max_age`: that bounds what a
//! lost notification or another replica's access counts can leave stale.

use std::cell::OnceCell;
use std::collections::HashSet;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use engram_domain::entity::memory as row;
use engram_domain::etag;
use engram_domain::ranking::{self, by_recency};
use lru::LruCache;

use crate::access::{Accesses, Tracked};

/// A session of a tenant.
pub type SessionKey = (String, String);

/// Generations are kept per stripe of sessions, not per session, so they take fixed memory.
const STRIPES: usize = 4096;

pub struct SessionCache {
    inner: Mutex<Inner>,
    budget_bytes: usize,
    max_age: Duration,
}

struct Inner {
    sessions: LruCache<SessionKey, Entry>,
    bytes: usize,
    generations: Box<[u64; STRIPES]>,
    /// False while changes of other replicas may go unseen: nothing is served or kept.
    serving: bool,
}

struct Entry {
    /// In recency order (`in_recency_order`).
    memories: Vec<CachedMemory>,
    bytes: usize,
    loaded_at: Instant,
}

/// A cached memory and, once retrieved, its encoding without access tracking
/// (`View::untracked_encoding`): the next turns return the same memories again, and building
/// and encoding them was a quarter of a retrieval's server CPU. Only access tracking changes a
/// cached row in place, and the encoding leaves it out; any other change replaces the row,
/// and the encoding with it.
pub struct CachedMemory {
    row: row::Model,
    untracked_encoding: OnceCell<Vec<u8>>,
    /// `created_at` in microseconds since the epoch, for ranking every turn.
    created_micros: i64,
}

impl CachedMemory {
    fn new(row: row::Model) -> Self {
        Self {
            created_micros: row.created_at.timestamp_micros(),
            row,
            untracked_encoding: OnceCell::new(),
        }
    }

    /// Its effective importance at `now_micros`. Engram keeps times to the microsecond, so
    /// this is `ranking::effective_importance` at that time, without calendar arithmetic.
    pub fn effective_importance_at(&self, now_micros: i64) -> f64 {
        ranking::effective_importance_at_age(
            self.row.importance,
            now_micros - self.created_micros,
            i64::from(self.row.access_count),
        )
    }

    /// Its encoding without access tracking, made by `encode` the first time.
    pub fn untracked_encoding(&self, encode: impl FnOnce(&row::Model) -> Vec<u8>) -> &[u8] {
        self.untracked_encoding.get_or_init(|| encode(&self.row))
    }
}

/// Newest first, then by id (`by_recency`): the order every session's memories are kept and
/// handed out in, so a ranking can break its ties by position.
fn in_recency_order(a: &row::Model, b: &row::Model) -> std::cmp::Ordering {
    by_recency((a.created_at, &a.id), (b.created_at, &b.id))
}

impl Deref for CachedMemory {
    type Target = row::Model;

    fn deref(&self) -> &row::Model {
        &self.row
    }
}

impl Tracked for CachedMemory {
    fn id(&self) -> &str {
        &self.row.id
    }

    fn add_accesses(&mut self, accesses: Accesses) {
        self.row.add_accesses(accesses);
    }
}

/// Taken before a load: the load is kept only if its session's stripe has not moved since.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    stripe: usize,
    generation: u64,
}

impl SessionCache {
    /// A cache of at most `budget_bytes` (0: caches nothing). It serves from the start when
    /// this process sees every write (SQLite), or from `resume` on (PostgreSQL).
    pub fn new(budget_bytes: usize, max_age: Duration, serving: bool) -> Self {
        Self {
            inner: Mutex::new(Inner {
                sessions: LruCache::unbounded(),
                bytes: 0,
                generations: Box::new([0; STRIPES]),
                serving: serving && budget_bytes > 0,
            }),
            budget_bytes,
            max_age,
        }
    }

    /// Runs `use_memories` on the session's cached live memories, in recency order (it may
    /// update their access tracking), or returns the ticket for loading them.
    pub fn with_cached<R>(
        &self,
        key: &SessionKey,
        use_memories: impl FnOnce(&mut [CachedMemory]) -> R,
    ) -> Result<R, Ticket> {
        let mut inner = self.lock();
        let stripe = stripe_of(key);
        let serving = inner.serving;
        if let Some(entry) = inner.sessions.get_mut(key)
            && serving
            && entry.loaded_at.elapsed() < self.max_age
        {
            return Ok(use_memories(&mut entry.memories));
        }
        inner.remove(key);
        Err(Ticket {
            stripe,
            generation: inner.generations[stripe],
        })
    }

    /// After a load begun with `ticket`: keeps `loaded` unless its session changed meanwhile,
    /// then runs `use_memories` on what is cached now, or on `loaded` alone; in recency order.
    pub fn fill<R>(
        &self,
        key: SessionKey,
        ticket: Ticket,
        loaded: Vec<row::Model>,
        use_memories: impl FnOnce(&mut [CachedMemory]) -> R,
    ) -> R {
        let mut loaded: Vec<CachedMemory> = loaded.into_iter().map(CachedMemory::new).collect();
        loaded.sort_unstable_by(|a, b| in_recency_order(a, b));
        let mut inner = self.lock();
        if inner.serving
            && let Some(entry) = inner.sessions.get_mut(&key)
        {
            return use_memories(&mut entry.memories);
        }
        let unchanged = inner.serving && inner.generations[ticket.stripe] == ticket.generation;
        let bytes = if unchanged {
            loaded.iter().map(|memory| estimated_bytes(memory)).sum()
        } else {
            0
        };
        if !unchanged || bytes > self.budget_bytes {
            let result = use_memories(&mut loaded);
            // What `use_memories` recorded is in no entry: a load overlapping it must not be kept.
            inner.generations[ticket.stripe] += 1;
            return result;
        }
        inner.bytes += bytes;
        inner.evict_beyond(self.budget_bytes);
        let entry = inner.sessions.get_or_insert_mut(key, || Entry {
            memories: loaded,
            bytes,
            loaded_at: Instant::now(),
        });
        use_memories(&mut entry.memories)
    }

    /// The session changed (after the commit, before the writer answers).
    pub fn invalidate(&self, key: &SessionKey) {
        let mut inner = self.lock();
        inner.generations[stripe_of(key)] += 1;
        inner.remove(key);
    }

    /// The session's only writer changed it (after the commit, before answering): a cached
    /// copy takes the `written` rows and loses the `removed` ids; a load in flight is refused.
    pub fn apply(
        &self,
        key: &SessionKey,
        written: impl IntoIterator<Item = row::Model>,
        removed: &HashSet<String>,
    ) {
        let mut inner = self.lock();
        inner.generations[stripe_of(key)] += 1;
        let Some(entry) = inner.sessions.get_mut(key) else {
            return;
        };
        let written: Vec<row::Model> = written.into_iter().collect();
        entry.memories.retain(|memory| {
            !removed.contains(&memory.id) && !written.iter().any(|new| new.id == memory.id)
        });
        for memory in written {
            let at = entry
                .memories
                .partition_point(|cached| in_recency_order(cached, &memory).is_lt());
            entry.memories.insert(at, CachedMemory::new(memory));
        }
        let bytes: usize = entry
            .memories
            .iter()
            .map(|memory| estimated_bytes(memory))
            .sum();
        let before = std::mem::replace(&mut entry.bytes, bytes);
        inner.bytes = inner.bytes - before + bytes;
        inner.evict_beyond(self.budget_bytes);
    }

    /// Any session may have changed.
    pub fn invalidate_all(&self) {
        self.lock().forget_everything();
    }

    /// Changes of other replicas are seen again (a notification listener is connected).
    pub fn resume(&self) {
        let mut inner = self.lock();
        inner.forget_everything();
        inner.serving = self.budget_bytes > 0;
    }

    /// Changes of other replicas may go unseen: serve nothing from memory until `resume`.
    pub fn suspend(&self) {
        let mut inner = self.lock();
        inner.forget_everything();
        inner.serving = false;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("session cache")
    }
}

impl Inner {
    /// Drops the least recently used sessions until the cache holds at most `budget` bytes.
    fn evict_beyond(&mut self, budget: usize) {
        while self.bytes > budget {
            let (_, evicted) = self.sessions.pop_lru().expect("bytes are of entries");
            self.bytes -= evicted.bytes;
        }
    }

    fn remove(&mut self, key: &SessionKey) {
        if let Some(entry) = self.sessions.pop(key) {
            self.bytes -= entry.bytes;
        }
    }

    fn forget_everything(&mut self) {
        self.sessions.clear();
        self.bytes = 0;
        for generation in self.generations.iter_mut() {
            *generation += 1;
        }
    }
}

fn stripe_of(key: &SessionKey) -> usize {
    let mut hasher = DefaultHasher::new();
    key.hash(&mut hasher);
    // The remainder is below STRIPES, so it fits a usize.
    (hasher.finish() % STRIPES as u64) as usize
}

/// Roughly what a cached memory occupies: the struct, its strings, its metadata (its JSON
/// text length twice over for the tree's allocations), and once retrieved its encoding: those
/// strings and that text again, and `ENCODING_EXTRA`.
fn estimated_bytes(memory: &row::Model) -> usize {
    let row::Model {
        id,
        tenant_id,
        session_id,
        content_type,
        content,
        content_hash,
        semantic_hash,
        metadata,
        ..
    } = memory;
    let encoded_text = id.len()
        + session_id.len()
        + content.len()
        + content_hash.len()
        + semantic_hash.as_ref().map_or(0, String::len);
    let metadata_text = metadata.to_string().len();
    std::mem::size_of::<CachedMemory>()
        + tenant_id.len()
        + content_type.len()
        + 2 * encoded_text
        + 3 * metadata_text
        + ENCODING_EXTRA
}

/// What a memory's encoding holds besides its strings and metadata: the name's fixed parts,
/// the etag, three times, two numbers and the fields' keys and lengths, and its Vec; about.
const ENCODING_EXTRA: usize = 19 + etag::ETAG_LEN + 3 * 14 + 9 + 2 + 16 + 24;

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;

    fn memory(id: &str, content: &str) -> row::Model {
        let now = Utc::now();
        row::Model {
            id: id.to_owned(),
            tenant_id: "t".to_owned(),
            session_id: "s".to_owned(),
            content_type: "fact".to_owned(),
            content: content.to_owned(),
            content_hash: String::new(),
            semantic_hash: None,
            metadata: serde_json::json!({}),
            importance: 0.5,
            expires_at: None,
            access_count: 0,
            last_accessed: None,
            created_at: now,
            updated_at: now,
            deleted_at: None,
        }
    }

    fn key(session: &str) -> SessionKey {
        ("t".to_owned(), session.to_owned())
    }

    fn ids(memories: &[CachedMemory]) -> Vec<String> {
        memories.iter().map(|memory| memory.id.clone()).collect()
    }

    fn one_access() -> Accesses {
        Accesses {
            count: 1,
            last: Utc::now(),
        }
    }

    fn cache() -> SessionCache {
        SessionCache::new(1 << 20, Duration::from_secs(60), true)
    }

    /// The ticket of a session that is not cached (panics if it is).
    fn miss(cache: &SessionCache, session: &str) -> Ticket {
        cache
            .with_cached(&key(session), |_| ())
            .expect_err("not cached")
    }

    fn is_cached(cache: &SessionCache, session: &str) -> bool {
        cache.with_cached(&key(session), |_| ()).is_ok()
    }

    /// Loads `memories` for a session that is not cached, as a miss does.
    fn load(cache: &SessionCache, session: &str, memories: Vec<row::Model>) {
        let ticket = miss(cache, session);
        cache.fill(key(session), ticket, memories, |_| ());
    }

    #[test]
    fn a_filled_session_is_served_until_invalidated() {
        let cache = cache();
        let ticket = cache
            .with_cached(&key("s"), |m| ids(m))
            .expect_err("empty cache");
        let served = cache.fill(key("s"), ticket, vec![memory("a", "x")], |m| ids(m));
        assert_eq!(served, ["a"]);
        assert_eq!(
            cache.with_cached(&key("s"), |m| ids(m)).ok(),
            Some(vec!["a".to_owned()])
        );
        cache.invalidate(&key("s"));
        assert!(!is_cached(&cache, "s"));
    }

    #[test]
    fn a_load_overlapping_a_write_is_used_once_not_kept() {
        let cache = cache();
        let ticket = miss(&cache, "s");
        cache.invalidate(&key("s"));
        let served = cache.fill(key("s"), ticket, vec![memory("old", "x")], |m| ids(m));
        assert_eq!(served, ["old"], "the caller still gets its own load");
        assert!(!is_cached(&cache, "s"), "not kept");
    }

    #[test]
    fn updates_made_through_the_cache_persist() {
        let cache = cache();
        let ticket = miss(&cache, "s");
        cache.fill(key("s"), ticket, vec![memory("a", "x")], |m| {
            m[0].add_accesses(one_access())
        });
        cache
            .with_cached(&key("s"), |m| m[0].add_accesses(one_access()))
            .expect("cached");
        let count = cache
            .with_cached(&key("s"), |m| m[0].access_count)
            .expect("cached");
        assert_eq!(count, 2);
    }

    #[test]
    fn a_load_overlapping_an_uncached_access_is_not_kept() {
        let cache = cache();
        let early = miss(&cache, "s");
        cache.invalidate(&key("s"));
        let late = miss(&cache, "s");
        // The early load is refused; the accesses it records are in no entry...
        cache.fill(key("s"), early, vec![memory("a", "x")], |m| {
            m[0].add_accesses(one_access())
        });
        // ...and the late load may have read the database before they were recorded.
        cache.fill(key("s"), late, vec![memory("a", "x")], |_| ());
        assert!(!is_cached(&cache, "s"), "not kept");
    }

    #[test]
    fn the_writer_changes_a_cached_session_in_place() {
        let cache = cache();
        let ticket = miss(&cache, "s");
        let (kept, evicted) = (memory("kept", "x"), memory("evicted", "y"));
        cache.fill(key("s"), ticket, vec![kept.clone(), evicted], |_| ());
        let in_flight = miss(&cache, "other");
        let merged = row::Model {
            access_count: 3,
            ..kept
        };
        let removed = HashSet::from(["evicted".to_owned()]);
        cache.apply(&key("s"), [merged, memory("new", "z")], &removed);
        let cached = cache
            .with_cached(&key("s"), |m| (ids(m), m[1].access_count))
            .expect("still cached");
        assert_eq!(cached, (vec!["new".to_owned(), "kept".to_owned()], 3));
        // A load of a session the writer did not touch is kept unless it shares the stripe.
        let other_kept = stripe_of(&key("other")) != stripe_of(&key("s"));
        cache.fill(key("other"), in_flight, vec![], |_| ());
        assert_eq!(is_cached(&cache, "other"), other_kept);
    }

    #[test]
    fn a_session_is_kept_and_served_newest_first_then_by_id() {
        let cache = cache();
        let at = |id: &str, minute: i64| row::Model {
            created_at: chrono::DateTime::UNIX_EPOCH + chrono::Duration::minutes(minute),
            ..memory(id, id)
        };
        load(
            &cache,
            "s",
            vec![at("b", 1), at("a", 2), at("d", 1), at("c", 1)],
        );
        let merged = row::Model {
            importance: 0.9,
            ..at("c", 1)
        };
        cache.apply(
            &key("s"),
            [at("e", 3), merged, at("bb", 1), at("0", 0)],
            &HashSet::from(["d".to_owned()]),
        );
        let served = cache.with_cached(&key("s"), |m| ids(m)).expect("cached");
        assert_eq!(served, ["e", "a", "b", "bb", "c", "0"]);
    }

    #[test]
    fn a_cached_effective_importance_is_the_rankings() {
        let now = chrono::DateTime::from_timestamp_micros(1_796_000_000_123_456).unwrap();
        for (age_micros, access_count) in [
            (0, 0),
            (86_400_000_000 - 1, 3),
            (40 * 86_400_000_000 + 7, 12),
        ] {
            let created_at = now - chrono::Duration::microseconds(age_micros);
            let cached = CachedMemory::new(row::Model {
                importance: 0.7,
                access_count,
                created_at,
                ..memory("a", "x")
            });
            assert_eq!(
                cached.effective_importance_at(now.timestamp_micros()),
                ranking::effective_importance(0.7, created_at, i64::from(access_count), now),
                "{age_micros} us old"
            );
        }
    }

    #[test]
    fn a_cached_encoding_is_that_of_the_row_cached_now() {
        let cache = cache();
        let original = memory("a", "x");
        load(&cache, "s", vec![original.clone()]);
        let encode = |row: &row::Model| etag::memory_etag(row).into_bytes();
        let cached_encoding = |cache: &SessionCache| {
            cache
                .with_cached(&key("s"), |m| m[0].untracked_encoding(encode).to_vec())
                .expect("cached")
        };
        assert_eq!(cached_encoding(&cache), encode(&original));
        cache
            .with_cached(&key("s"), |m| m[0].add_accesses(one_access()))
            .expect("cached");
        let accessed = cache
            .with_cached(&key("s"), |m| {
                m[0].untracked_encoding(|_| unreachable!()).to_vec()
            })
            .expect("cached");
        assert_eq!(accessed, encode(&original), "accesses keep it");
        let changed = row::Model {
            importance: 0.9,
            ..original.clone()
        };
        cache.apply(&key("s"), [changed.clone()], &HashSet::new());
        assert_ne!(encode(&changed), encode(&original));
        assert_eq!(cached_encoding(&cache), encode(&changed));
    }

    #[test]
    fn a_write_refuses_a_load_in_flight_for_its_session() {
        let cache = cache();
        let ticket = miss(&cache, "s");
        cache.apply(&key("s"), [memory("new", "z")], &HashSet::new());
        cache.fill(key("s"), ticket, vec![memory("old", "x")], |_| ());
        assert!(!is_cached(&cache, "s"), "the older load is not kept");
    }

    #[test]
    fn the_budget_evicts_the_least_recently_used_session() {
        let one = estimated_bytes(&memory("a", "xxxx"));
        let cache = SessionCache::new(2 * one, Duration::from_secs(60), true);
        for session in ["s1", "s2", "s3"] {
            load(&cache, session, vec![memory("a", "xxxx")]);
        }
        assert!(!is_cached(&cache, "s1"), "oldest evicted");
        assert!(is_cached(&cache, "s3"));
    }

    #[test]
    fn a_session_larger_than_the_budget_is_used_once_and_refuses_overlapping_loads() {
        let one = estimated_bytes(&memory("a", "xxxx"));
        let cache = SessionCache::new(one, Duration::from_secs(60), true);
        let overlapping = miss(&cache, "s");
        let too_big = vec![memory("a", "xxxx"), memory("b", "yyyy")];
        load(&cache, "s", too_big);
        assert!(!is_cached(&cache, "s"), "larger than the budget");
        // Its accesses went to no entry: a load that overlapped them is not kept either.
        cache.fill(key("s"), overlapping, vec![memory("a", "xxxx")], |_| ());
        assert!(!is_cached(&cache, "s"));
    }

    #[test]
    fn an_old_entry_is_loaded_again() {
        let cache = SessionCache::new(1 << 20, Duration::ZERO, true);
        load(&cache, "s", vec![memory("a", "x")]);
        assert!(!is_cached(&cache, "s"));
    }

    #[test]
    fn a_suspended_cache_serves_and_keeps_nothing_until_resumed() {
        let cache = SessionCache::new(1 << 20, Duration::from_secs(60), false);
        load(&cache, "s", vec![memory("a", "x")]);
        assert!(!is_cached(&cache, "s"));
        cache.resume();
        load(&cache, "s", vec![memory("a", "x")]);
        assert!(is_cached(&cache, "s"));
        cache.suspend();
        assert!(!is_cached(&cache, "s"));
    }
}
