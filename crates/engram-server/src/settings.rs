//! Engram's settings: compiled defaults < TOML file < environment < command-line flags,
//! validated once at start-up. Memory settings keep the reference design's names, defaults
//! and bounds, and are read from the same environment variables.

use std::net::SocketAddr;
use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// gRPC listen address (`ENGRAM_LISTEN`, `--listen`).
    pub listen: SocketAddr,
    /// `sqlite://PATH?mode=rwc` or `postgres://...` (`DATABASE_URL`, `--database-url`).
    pub database_url: String,
    /// Live memories per session; storing beyond it evicts the least important.
    pub memory_max_entries: u32,
    /// Time to live of a memory stored without expire_time or ttl.
    pub memory_ttl_hours: u32,
    /// Memories neither stored nor retrieved for this many days are purged by the sweeper.
    pub memory_cleanup_days: u32,
    /// Default min_importance of RetrieveMemories.
    pub memory_importance_threshold: f64,
    /// Largest SimHash Hamming distance reported as a near-duplicate on store.
    pub similarity_max_distance: u32,
    /// Days a soft-deleted memory is kept before the sweeper purges it (its purge_time).
    pub soft_delete_retention_days: u32,
    /// Seconds between sweeps for expired, purgeable and stale memories.
    pub sweep_interval_seconds: u32,
    /// Largest number of pooled database connections.
    pub database_max_connections: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            database_url: "sqlite://data/engram.db?mode=rwc".to_owned(),
            memory_max_entries: 100,
            memory_ttl_hours: 24,
            memory_cleanup_days: 30,
            memory_importance_threshold: 0.3,
            similarity_max_distance: 10,
            soft_delete_retention_days: 30,
            sweep_interval_seconds: 60,
            database_max_connections: 16,
        }
    }
}

/// Settings read from the environment under the reference design's names, unprefixed.
const UNPREFIXED_ENV: [&str; 5] = [
    "database_url",
    "memory_max_entries",
    "memory_ttl_hours",
    "memory_cleanup_days",
    "memory_importance_threshold",
];
/// Engram's own settings, read from `ENGRAM_`-prefixed variables.
const PREFIXED_ENV: [&str; 6] = [
    "listen",
    "similarity_max_distance",
    "soft_delete_retention_days",
    "sweep_interval_seconds",
    "database_max_connections",
    "database_url",
];

/// Values given as command-line flags; they override everything else.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
}

impl Settings {
    /// Loads and validates the layered settings; the error is one line for the operator.
    pub fn load(config_file: Option<&Path>, overrides: &Overrides) -> Result<Self, String> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = config_file {
            if !path.is_file() {
                return Err(format!("config file {} does not exist", path.display()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        let settings: Settings = figment
            .merge(Env::raw().only(&UNPREFIXED_ENV))
            .merge(Env::prefixed("ENGRAM_").only(&PREFIXED_ENV))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(|error| format!("invalid setting: {error}"))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The reference design's bounds (and Engram's for its own settings).
    fn validate(&self) -> Result<(), String> {
        check_range("memory_max_entries", self.memory_max_entries, 10, 1000)?;
        check_range("memory_ttl_hours", self.memory_ttl_hours, 1, 720)?;
        check_range("memory_cleanup_days", self.memory_cleanup_days, 1, 365)?;
        check_range(
            "memory_importance_threshold",
            self.memory_importance_threshold,
            0.0,
            1.0,
        )?;
        check_range(
            "similarity_max_distance",
            self.similarity_max_distance,
            0,
            64,
        )?;
        check_range(
            "soft_delete_retention_days",
            self.soft_delete_retention_days,
            1,
            365,
        )?;
        check_range(
            "sweep_interval_seconds",
            self.sweep_interval_seconds,
            1,
            86_400,
        )?;
        check_range(
            "database_max_connections",
            self.database_max_connections,
            1,
            1000,
        )?;
        let url = self.database_url.as_str();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err("invalid setting database_url (DATABASE_URL): must start with sqlite:, postgres:// or postgresql://".to_owned());
        }
        Ok(())
    }

    /// The environment variable an operator sets for `key`.
    pub fn env_name(key: &str) -> String {
        if UNPREFIXED_ENV.contains(&key) {
            key.to_ascii_uppercase()
        } else {
            format!("ENGRAM_{}", key.to_ascii_uppercase())
        }
    }
}

fn check_range<T: PartialOrd + std::fmt::Display>(
    key: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), String> {
    // `!(a <= b)` also refuses NaN.
    if min <= value && value <= max {
        return Ok(());
    }
    Err(format!(
        "invalid setting {key} ({}): {value} is out of range, must be between {min} and {max}",
        Settings::env_name(key)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_reference_design() {
        let defaults = Settings::default();
        assert_eq!(defaults.memory_max_entries, 100);
        assert_eq!(defaults.memory_ttl_hours, 24);
        assert_eq!(defaults.memory_cleanup_days, 30);
        assert_eq!(defaults.memory_importance_threshold, 0.3);
        assert_eq!(defaults.listen.to_string(), "127.0.0.1:50051");
        defaults.validate().unwrap();
    }

    #[test]
    fn bounds_name_the_variable_and_the_range() {
        let settings = Settings {
            memory_max_entries: 5,
            ..Settings::default()
        };
        let error = settings.validate().unwrap_err();
        assert!(
            error.contains("MEMORY_MAX_ENTRIES") && error.contains("between 10 and 1000"),
            "{error}"
        );
        let settings = Settings {
            memory_importance_threshold: f64::NAN,
            ..Settings::default()
        };
        assert!(
            settings
                .validate()
                .unwrap_err()
                .contains("MEMORY_IMPORTANCE_THRESHOLD")
        );
        let settings = Settings {
            similarity_max_distance: 65,
            ..Settings::default()
        };
        assert!(
            settings
                .validate()
                .unwrap_err()
                .contains("ENGRAM_SIMILARITY_MAX_DISTANCE")
        );
    }
}
