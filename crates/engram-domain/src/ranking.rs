//! Effective importance: the reference design's 30-day half-life decay plus an access boost.

use std::cmp::Ordering;

use chrono::{DateTime, Utc};

const HALF_LIFE_DAYS: f64 = 30.0;
/// The seed's ln(2), rounded as it wrote it, so rankings match the Python system.
#[allow(
    clippy::approx_constant,
    reason = "the reference design's rounded value, kept on purpose"
)]
const LN_2_AS_IN_SEED: f64 = 0.693147;
const BOOST_PER_ACCESS: f64 = 0.02;
const MAX_ACCESS_BOOST: f64 = 0.2;
const MICROS_PER_DAY: i64 = 86_400_000_000;

/// `importance * e^(-ln2/30 * age_days) + min(0.2, 0.02 * access_count)`, clamped to [0, 1].
/// Age counts whole days rounded down, like Python's `timedelta.days`.
pub fn effective_importance(
    importance: f64,
    created_at: DateTime<Utc>,
    access_count: i64,
    now: DateTime<Utc>,
) -> f64 {
    let age_micros = (now - created_at).num_microseconds().unwrap_or(i64::MAX);
    effective_importance_at_age(importance, age_micros, access_count)
}

/// [`effective_importance`] of a memory `age_micros` old: for a caller that keeps creation
/// times as microseconds, which is cheaper than subtracting calendar times.
pub fn effective_importance_at_age(importance: f64, age_micros: i64, access_count: i64) -> f64 {
    let age_days = age_micros.div_euclid(MICROS_PER_DAY) as f64;
    let decay = (-(LN_2_AS_IN_SEED / HALF_LIFE_DAYS) * age_days).exp();
    let access_boost = MAX_ACCESS_BOOST.min(access_count.max(0) as f64 * BOOST_PER_ACCESS);
    (importance * decay + access_boost).clamp(0.0, 1.0)
}

/// A memory as the ranking sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked<'a> {
    pub id: &'a str,
    pub created_at: DateTime<Utc>,
    pub effective_importance: f64,
}

/// Most important first; ties go to the newer memory, then to the id, so order is stable.
pub fn by_rank(a: &Ranked<'_>, b: &Ranked<'_>) -> Ordering {
    b.effective_importance
        .total_cmp(&a.effective_importance)
        .then_with(|| by_recency((a.created_at, a.id), (b.created_at, b.id)))
}

/// Newer first, then by id: how `by_rank` breaks ties, given (created_at, id).
pub fn by_recency(a: (DateTime<Utc>, &str), b: (DateTime<Utc>, &str)) -> Ordering {
    b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1))
}

pub fn rank_descending(memories: &mut [Ranked<'_>]) {
    memories.sort_by(by_rank);
}

/// Keeps the first `limit` items in `order`, sorted: a selection, then a sort of those
/// only, which is what a top-ten read of a full session needs.
pub fn keep_first<T>(items: &mut Vec<T>, limit: usize, order: impl Fn(&T, &T) -> Ordering) {
    if limit == 0 {
        items.clear();
        return;
    }
    if items.len() > limit {
        items.select_nth_unstable_by(limit - 1, &order);
        items.truncate(limit);
    }
    items.sort_by(order);
}

/// The ids to evict so that at most `cap` memories remain: the least important, oldest first.
pub fn choose_evictions<'a>(memories: &[Ranked<'a>], cap: usize) -> Vec<&'a str> {
    let mut ranked = memories.to_vec();
    rank_descending(&mut ranked);
    ranked.iter().skip(cap).map(|memory| memory.id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Duration, TimeZone};

    fn at(days: i64, hours: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap()
            + Duration::days(days)
            + Duration::hours(hours)
    }

    #[test]
    fn a_fresh_memory_keeps_its_importance() {
        assert_eq!(effective_importance(0.5, at(0, 0), 0, at(0, 23)), 0.5);
    }

    #[test]
    fn thirty_days_halve_it_with_the_seed_constant() {
        let value = effective_importance(0.8, at(0, 0), 0, at(30, 5));
        assert!(
            (value - 0.8 * (-LN_2_AS_IN_SEED).exp()).abs() < 1e-12,
            "{value}"
        );
    }

    #[test]
    fn age_counts_whole_days_rounded_down_like_python() {
        assert_eq!(
            effective_importance(1.0, at(0, 0), 0, at(1, 23)),
            effective_importance(1.0, at(0, 0), 0, at(1, 0))
        );
        // A creation time in the future (clock skew) is -1 day in Python, which boosts.
        assert!(effective_importance(0.5, at(0, 1), 0, at(0, 0)) > 0.5);
    }

    #[test]
    fn access_boost_is_two_points_per_access_up_to_twenty() {
        let base = effective_importance(0.3, at(0, 0), 0, at(0, 0));
        assert!((effective_importance(0.3, at(0, 0), 3, at(0, 0)) - base - 0.06).abs() < 1e-12);
        assert!((effective_importance(0.3, at(0, 0), 50, at(0, 0)) - base - 0.2).abs() < 1e-12);
        assert_eq!(effective_importance(0.95, at(0, 0), 50, at(0, 0)), 1.0);
    }

    #[test]
    fn keep_first_matches_a_full_sort_cut_short() {
        // Many equal importances and creation times, so the tie-breakers decide.
        let ids: Vec<String> = (0..60).map(|n| format!("m{:02}", (n * 37) % 60)).collect();
        let memories: Vec<Ranked> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| Ranked {
                id,
                created_at: at((n % 3) as i64, 0),
                effective_importance: (n % 7) as f64 / 10.0,
            })
            .collect();
        let mut sorted = memories.clone();
        rank_descending(&mut sorted);
        for limit in [0, 1, 10, 59, 60, 100] {
            let mut kept = memories.clone();
            keep_first(&mut kept, limit, by_rank);
            assert_eq!(kept, sorted[..limit.min(60)], "limit {limit}");
        }
    }

    #[test]
    fn evicts_least_important_then_oldest() {
        let memories = [
            Ranked {
                id: "keep-high",
                created_at: at(0, 0),
                effective_importance: 0.9,
            },
            Ranked {
                id: "old-low",
                created_at: at(0, 0),
                effective_importance: 0.1,
            },
            Ranked {
                id: "new-low",
                created_at: at(1, 0),
                effective_importance: 0.1,
            },
            Ranked {
                id: "mid",
                created_at: at(0, 0),
                effective_importance: 0.5,
            },
        ];
        assert_eq!(choose_evictions(&memories, 2), vec!["new-low", "old-low"]);
        assert_eq!(choose_evictions(&memories, 3), vec!["old-low"]);
        assert!(choose_evictions(&memories, 4).is_empty());
    }
}
