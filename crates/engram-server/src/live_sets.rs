//! SQLite: what the group-commit writer's last group left live in each session it wrote, so
//! the next group of those sessions need not read them again (a store's near-duplicate check
//! compares it with every live memory of its session, and reading them was the largest part
//! of a group's time, growing with the session).
//!
//! Exact, not eventually right: SQLite has one writer per file and this process is it, but
//! the pool's connections write too (updates, deletes, undeletes, purges, the sweeper). Each of
//! their commits moves `PRAGMA data_version` as the writer's connection sees it, and the
//! writer reads that version inside its transaction, where nobody else can commit, before it
//! trusts anything remembered: another version forgets everything. The version is only
//! comparable on the same connection, so a new writer connection forgets everything too.
//! Importance and access counts are not remembered (the access flusher changes counts without
//! moving the version): a group that may evict reads its sessions whole.

use chrono::{DateTime, Utc};
use lru::LruCache;

use crate::session_cache::SessionKey;

/// A live memory as the session cap counts it and the near-duplicate check compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sketch {
    pub id: String,
    pub semantic_hash: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
}

impl Sketch {
    pub fn is_visible_at(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|at| at > now)
    }
}

/// Where the remembered sets stand: the writer connection they belong to and the database
/// version they were true at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// False on a connection the writer has not marked yet: a new one.
    pub marked_connection: bool,
    pub data_version: i64,
}

pub struct LiveSets {
    sessions: LruCache<SessionKey, Entry>,
    bytes: usize,
    budget_bytes: usize,
    version: Option<i64>,
}

struct Entry {
    live: Vec<Sketch>,
    bytes: usize,
}

impl LiveSets {
    /// Remembers at most `budget_bytes` (0: nothing), least recently written sessions first out.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            sessions: LruCache::unbounded(),
            bytes: 0,
            budget_bytes,
            version: None,
        }
    }

    /// Inside the writer's transaction, before any `take`: forgets everything unless the
    /// database and the connection are the ones the remembered sets were written at.
    pub fn at_version(&mut self, version: Version) {
        if !version.marked_connection || self.version != Some(version.data_version) {
            self.forget_everything();
        }
        self.version = Some(version.data_version);
    }

    fn forget_everything(&mut self) {
        self.sessions.clear();
        self.bytes = 0;
        self.version = None;
    }

    /// Takes the session's live set out, if remembered and if at most `room` more memories
    /// keep it within `cap` at `now` (past the cap the group evicts by rank, which needs the
    /// session read whole). It is remembered again only once the group has committed.
    pub fn take(
        &mut self,
        key: &SessionKey,
        now: DateTime<Utc>,
        room: usize,
        cap: usize,
    ) -> Option<Vec<Sketch>> {
        let entry = self.sessions.pop(key)?;
        self.bytes -= entry.bytes;
        let visible = entry
            .live
            .iter()
            .filter(|sketch| sketch.is_visible_at(now))
            .count();
        (visible + room <= cap).then_some(entry.live)
    }

    /// After a commit: the session's live set as the group left it.
    pub fn remember(&mut self, key: SessionKey, mut live: Vec<Sketch>) {
        live.shrink_to_fit();
        let bytes = entry_bytes(&key, &live);
        if bytes > self.budget_bytes {
            return;
        }
        if let Some(replaced) = self.sessions.put(key, Entry { live, bytes }) {
            self.bytes -= replaced.bytes;
        }
        self.bytes += bytes;
        while self.bytes > self.budget_bytes {
            let (_, evicted) = self.sessions.pop_lru().expect("bytes are of entries");
            self.bytes -= evicted.bytes;
        }
    }

    #[cfg(test)]
    fn remembered(&self) -> usize {
        self.sessions.len()
    }
}

/// What an entry takes, allocator rounding and the LRU's node included (measured as the
/// process's RSS against the budget under the StoreMemory benchmark).
fn entry_bytes((tenant, session): &SessionKey, live: &[Sketch]) -> usize {
    const ENTRY_OVERHEAD: usize = 160;
    const ALLOCATION_OVERHEAD: usize = 16;
    ENTRY_OVERHEAD
        + tenant.capacity()
        + session.capacity()
        + 2 * ALLOCATION_OVERHEAD
        + live
            .iter()
            .map(|sketch| {
                std::mem::size_of::<Sketch>() + sketch.id.capacity() + ALLOCATION_OVERHEAD
            })
            .sum::<usize>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(seconds: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + seconds, 0).unwrap()
    }

    fn key(session: &str) -> SessionKey {
        ("default".to_owned(), session.to_owned())
    }

    fn sketches(count: usize, expires_at: Option<DateTime<Utc>>) -> Vec<Sketch> {
        (0..count)
            .map(|index| Sketch {
                id: format!("{index:036}"),
                semantic_hash: Some(index as u64),
                created_at: at(0),
                expires_at,
            })
            .collect()
    }

    const MARKED: Version = Version {
        marked_connection: true,
        data_version: 7,
    };

    fn holding(session: &str, live: Vec<Sketch>) -> LiveSets {
        let mut sets = LiveSets::new(1 << 20);
        sets.at_version(MARKED);
        sets.remember(key(session), live);
        sets
    }

    #[test]
    fn gives_back_what_the_last_group_left() {
        let mut sets = holding("a", sketches(3, None));
        sets.at_version(MARKED);
        assert_eq!(sets.take(&key("a"), at(1), 1, 100), Some(sketches(3, None)));
        // Taken out until the next commit remembers it again.
        assert_eq!(sets.take(&key("a"), at(1), 1, 100), None);
        assert_eq!(sets.take(&key("b"), at(1), 1, 100), None);
    }

    #[test]
    fn another_version_or_connection_forgets_everything() {
        let mut sets = holding("a", sketches(3, None));
        sets.at_version(Version {
            data_version: 8,
            ..MARKED
        });
        assert_eq!(sets.take(&key("a"), at(1), 1, 100), None);

        let mut sets = holding("a", sketches(3, None));
        sets.at_version(Version {
            marked_connection: false,
            ..MARKED
        });
        assert_eq!(sets.take(&key("a"), at(1), 1, 100), None);

        let mut sets = holding("a", sketches(3, None));
        sets.forget_everything();
        sets.at_version(MARKED);
        assert_eq!(sets.take(&key("a"), at(1), 1, 100), None);
    }

    #[test]
    fn a_group_that_may_evict_reads_the_session_whole() {
        let mut sets = holding("a", sketches(10, None));
        assert_eq!(sets.take(&key("a"), at(1), 1, 10), None);
        let mut sets = holding("a", sketches(10, None));
        assert!(sets.take(&key("a"), at(1), 0, 10).is_some());
        // Memories that expired by `now` do not count toward the cap.
        let mut sets = holding("a", sketches(10, Some(at(0) + Duration::seconds(5))));
        assert!(sets.take(&key("a"), at(6), 10, 10).is_some());
    }

    #[test]
    fn stays_within_its_budget_dropping_the_least_recently_written() {
        let one = entry_bytes(&key("s0"), &sketches(4, None));
        let mut sets = LiveSets::new(one * 3);
        sets.at_version(MARKED);
        for session in 0..5 {
            sets.remember(key(&format!("s{session}")), sketches(4, None));
        }
        assert_eq!(sets.remembered(), 3);
        assert!(sets.bytes <= one * 3);
        assert_eq!(sets.take(&key("s1"), at(1), 1, 100), None);
        assert!(sets.take(&key("s4"), at(1), 1, 100).is_some());
        // A set larger than the whole budget is not remembered.
        sets.remember(key("big"), sketches(100, None));
        assert_eq!(sets.take(&key("big"), at(1), 1, 1000), None);
    }
}
