//! When a memory expires: the client's expire_time or ttl, else the configured default TTL.

use chrono::{DateTime, Duration, Utc};

use crate::error::FieldViolation;
use crate::limits::EXPIRATION_MAX_DAYS;

/// What a request asked for (AIP-214's `oneof expiration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiration {
    At(DateTime<Utc>),
    After(Duration),
}

/// The expiry to store: after `now`, no further than the documented maximum.
pub fn resolve(
    field_prefix: &str,
    requested: Option<Expiration>,
    default_ttl: Duration,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, FieldViolation> {
    let latest = now + Duration::days(EXPIRATION_MAX_DAYS);
    let too_far = format!("must be within {EXPIRATION_MAX_DAYS} days");
    match requested {
        None => Ok(now + default_ttl),
        Some(Expiration::After(ttl)) => {
            let field = format!("{field_prefix}ttl");
            if ttl <= Duration::zero() {
                return Err(FieldViolation::new(field, "must be positive"));
            }
            match now.checked_add_signed(ttl) {
                Some(at) if at <= latest => Ok(at),
                _ => Err(FieldViolation::new(field, too_far)),
            }
        }
        Some(Expiration::At(at)) => {
            let field = format!("{field_prefix}expire_time");
            if at <= now {
                Err(FieldViolation::new(field, "must be in the future"))
            } else if at > latest {
                Err(FieldViolation::new(field, too_far))
            } else {
                Ok(at)
            }
        }
    }
}

/// Visible means not expired: an expiry at or before `now` hides the memory at once.
pub fn is_expired(expires_at: Option<DateTime<Utc>>, now: DateTime<Utc>) -> bool {
    expires_at.is_some_and(|at| at <= now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_ttl_applies_when_nothing_is_asked() {
        let now = Utc::now();
        assert_eq!(
            resolve("memory.", None, Duration::hours(24), now),
            Ok(now + Duration::hours(24))
        );
    }

    #[test]
    fn ttl_and_expire_time_are_bounded() {
        let now = Utc::now();
        let ttl = |d| {
            resolve(
                "memory.",
                Some(Expiration::After(d)),
                Duration::hours(1),
                now,
            )
        };
        assert_eq!(ttl(Duration::minutes(5)), Ok(now + Duration::minutes(5)));
        assert_eq!(ttl(Duration::zero()).unwrap_err().field, "memory.ttl");
        assert!(ttl(Duration::days(EXPIRATION_MAX_DAYS + 1)).is_err());
        let at = |t| resolve("memory.", Some(Expiration::At(t)), Duration::hours(1), now);
        assert_eq!(
            at(now - Duration::seconds(1)).unwrap_err().field,
            "memory.expire_time"
        );
        assert!(at(now + Duration::days(EXPIRATION_MAX_DAYS + 1)).is_err());
        assert_eq!(at(now + Duration::days(2)), Ok(now + Duration::days(2)));
    }

    #[test]
    fn expiry_is_inclusive_of_now() {
        let now = Utc::now();
        assert!(is_expired(Some(now), now));
        assert!(!is_expired(Some(now + Duration::microseconds(1)), now));
        assert!(!is_expired(None, now));
    }
}
