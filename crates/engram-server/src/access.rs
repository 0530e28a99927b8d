//! Access tracking written behind. RetrieveMemories counts accesses in memory; a background
//! task adds them to the database about once a second, a few statements per flush instead of
//! an UPDATE per call. Reads of this process add the counts not yet written, so a client sees
//! every access at once.
//!
//! A crash (SIGKILL, power loss) loses at most the accesses of the last interval: counts in
//! `access_count` and `last_accessed` times. Never a memory: stores are written through and
//! acknowledged after commit. Other replicas see a replica's accesses once it has flushed them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use sea_orm::DbErr;
use tokio::sync::Notify;

/// Accesses of one memory not yet in the database.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accesses {
    pub count: u32,
    pub last: DateTime<Utc>,
}

impl Accesses {
    /// `count` with these accesses added (saturating: a counter never wraps).
    pub fn added_to(self, count: i32) -> i32 {
        count.saturating_add(i32::try_from(self.count).unwrap_or(i32::MAX))
    }

    fn add(&mut self, other: Accesses) {
        self.count = self.count.saturating_add(other.count);
        self.last = self.last.max(other.last);
    }
}

/// A row that carries access tracking columns.
pub trait Tracked {
    fn id(&self) -> &str;
    fn add_accesses(&mut self, accesses: Accesses);
}

impl Tracked for engram_domain::entity::memory::Model {
    fn id(&self) -> &str {
        &self.id
    }

    fn add_accesses(&mut self, accesses: Accesses) {
        self.access_count = accesses.added_to(self.access_count);
        self.last_accessed = Some(
            self.last_accessed
                .map_or(accesses.last, |last| last.max(accesses.last)),
        );
    }
}

#[derive(Default)]
struct Counts {
    /// Recorded since the last flush began.
    pending: HashMap<String, Accesses>,
    /// Handed to the flush that is writing them now.
    flushing: HashMap<String, Accesses>,
    /// Odd while a flush commits: database reads then may or may not include it.
    epoch: u64,
}

impl Counts {
    fn unwritten(&self, id: &str) -> Option<Accesses> {
        match (self.pending.get(id), self.flushing.get(id)) {
            (Some(pending), Some(flushing)) => {
                let mut total = *pending;
                total.add(*flushing);
                Some(total)
            }
            (one, other) => one.or(other).copied(),
        }
    }
}

#[derive(Default)]
pub struct AccessTracker {
    counts: Mutex<Counts>,
    committed: Notify,
}

impl AccessTracker {
    /// Counts one access of each memory at `now`.
    pub fn record<'a>(&self, ids: impl IntoIterator<Item = &'a str>, now: DateTime<Utc>) {
        let mut counts = self.counts.lock().expect("access counts");
        for id in ids {
            let access = Accesses {
                count: 1,
                last: now,
            };
            counts
                .pending
                .entry(id.to_owned())
                .and_modify(|accesses| accesses.add(access))
                .or_insert(access);
        }
    }

    /// Runs a database read and adds the accesses it cannot see yet. A read that overlaps
    /// a flush's commit runs again, so no access is missed or counted twice (a seqlock).
    pub async fn read<T: Tracked, F, Fut>(&self, mut read: F) -> Result<Vec<T>, DbErr>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Vec<T>, DbErr>>,
    {
        loop {
            let before = self.stable_epoch().await;
            let mut rows = read().await?;
            if self.add_unwritten(before, &mut rows) {
                return Ok(rows);
            }
        }
    }

    /// Adds the accesses that rows read since `epoch` (see [`Self::stable_epoch`]) cannot
    /// see yet; false, and nothing added, when a flush committed meanwhile: read again.
    pub fn add_unwritten<T: Tracked>(&self, epoch: u64, rows: &mut [T]) -> bool {
        let counts = self.counts.lock().expect("access counts");
        if counts.epoch != epoch {
            return false;
        }
        for row in rows {
            if let Some(accesses) = counts.unwritten(row.id()) {
                row.add_accesses(accesses);
            }
        }
        true
    }

    /// The epoch once no flush is committing: what a read about to start sees.
    pub async fn stable_epoch(&self) -> u64 {
        loop {
            let committed = self.committed.notified();
            let epoch = self.counts.lock().expect("access counts").epoch;
            if epoch.is_multiple_of(2) {
                return epoch;
            }
            committed.await;
        }
    }

    /// Hands the pending accesses to a flush; None when there is nothing to write.
    pub fn begin_flush(&self) -> Option<Vec<(String, Accesses)>> {
        let mut counts = self.counts.lock().expect("access counts");
        if counts.pending.is_empty() || !counts.flushing.is_empty() {
            return None;
        }
        let taken = std::mem::take(&mut counts.pending);
        counts.flushing = taken.clone();
        Some(taken.into_iter().collect())
    }

    /// Marks the flush's commit as under way: reads from now on wait for its outcome.
    pub fn committing(&self) {
        self.counts.lock().expect("access counts").epoch += 1;
    }

    /// Ends the flush begun last: written, or given back to be written with the next one.
    pub fn end_flush(&self, written: bool) {
        let mut counts = self.counts.lock().expect("access counts");
        let flushed = std::mem::take(&mut counts.flushing);
        if !written {
            for (id, accesses) in flushed {
                counts
                    .pending
                    .entry(id)
                    .and_modify(|pending| pending.add(accesses))
                    .or_insert(accesses);
            }
        }
        if counts.epoch % 2 == 1 {
            counts.epoch += 1;
        }
        drop(counts);
        self.committed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq)]
    struct Row(String, u32);

    impl Tracked for Row {
        fn id(&self) -> &str {
            &self.0
        }
        fn add_accesses(&mut self, accesses: Accesses) {
            self.1 += accesses.count;
        }
    }

    fn at(second: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(second, 0).expect("a time")
    }

    #[tokio::test]
    async fn reads_add_pending_and_flushing_accesses_once() {
        let tracker = AccessTracker::default();
        tracker.record(["a", "b", "a"], at(1));
        let flushed = tracker.begin_flush().expect("something to flush");
        assert_eq!(flushed.len(), 2);
        tracker.record(["a"], at(2));
        let rows = tracker
            .read(|| async { Ok(vec![Row("a".into(), 10), Row("c".into(), 0)]) })
            .await
            .unwrap();
        assert_eq!(rows, vec![Row("a".into(), 13), Row("c".into(), 0)]);

        tracker.committing();
        tracker.end_flush(true);
        let rows = tracker
            .read(|| async { Ok(vec![Row("a".into(), 12)]) })
            .await
            .unwrap();
        assert_eq!(
            rows,
            vec![Row("a".into(), 13)],
            "written counts are not added again"
        );
    }

    #[tokio::test]
    async fn a_failed_flush_gives_its_accesses_back() {
        let tracker = AccessTracker::default();
        tracker.record(["a"], at(1));
        tracker.begin_flush().expect("something to flush");
        tracker.record(["a"], at(3));
        tracker.end_flush(false);
        let flushed = tracker.begin_flush().expect("given back");
        assert_eq!(
            flushed,
            vec![(
                "a".to_owned(),
                Accesses {
                    count: 2,
                    last: at(3)
                }
            )]
        );
    }

    #[tokio::test]
    async fn a_read_overlapping_a_commit_runs_again() {
        let tracker = std::sync::Arc::new(AccessTracker::default());
        tracker.record(["a"], at(1));
        tracker.begin_flush().expect("something to flush");
        let mut attempts = 0;
        let rows = tracker
            .read(|| {
                attempts += 1;
                // The flush commits while the first read runs, after its snapshot: that read
                // saw 0 and the access has left the tracker, so only a second read is right.
                if attempts == 1 {
                    tracker.committing();
                    tracker.end_flush(true);
                }
                let stored = if attempts == 1 { 0 } else { 1 };
                async move { Ok(vec![Row("a".into(), stored)]) }
            })
            .await
            .unwrap();
        assert_eq!(attempts, 2);
        assert_eq!(rows, vec![Row("a".into(), 1)]);
    }
}
