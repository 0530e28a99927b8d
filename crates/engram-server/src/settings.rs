//! Engram's settings: compiled defaults < TOML file < environment < command-line flags,
//! validated once at start-up. Memory settings keep the reference design's names, defaults
//! and bounds, and are read from the same environment variables; so do its tool settings
//! (`tools`, see `crate::toolconfig::settings`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

pub use crate::telemetry::LogFormat;
use crate::toolconfig::seed_env::{EnvKind, SeedEnv};
use crate::toolconfig::settings::{TOOLS_TABLE, ToolSettings};

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Memory for whole sessions kept for RetrieveMemories and FindSimilarMemories, in MiB
    /// (0: every call reads the database).
    pub session_cache_mib: u32,
    /// Apply pending migrations at start (turn off when a Kubernetes Job runs them).
    pub migrate_on_start: bool,
    /// Address of the Prometheus `/metrics` endpoint; none serves no metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// `text` or `json` logs on stderr.
    pub log_format: LogFormat,
    /// Seconds between SIGTERM (readiness NOT_SERVING) and refusing new calls.
    pub shutdown_drain_seconds: u32,
    /// Seconds in-flight calls get to finish after that before the process exits anyway.
    pub shutdown_timeout_seconds: u32,
    /// Bearer tokens, each mapped to a tenant and a role; none leaves the service open.
    /// From the TOML file's `[[auth_tokens]]` or ENGRAM_AUTH_TOKENS (`TENANT:ROLE:REF;...`).
    #[serde(default, skip_serializing)]
    pub auth_tokens: Vec<crate::auth::TokenSetting>,
    /// Client certificates (common name -> tenant and role), when a client CA is configured.
    /// From the TOML file's `[[auth_clients]]` or ENGRAM_AUTH_CLIENTS (`CN:TENANT:ROLE;...`).
    #[serde(default, skip_serializing)]
    pub auth_clients: Vec<crate::auth::ClientSetting>,
    /// PEM certificate chain and private key: serve TLS (rustls) instead of plaintext.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA of client certificates: require mutual TLS.
    pub tls_client_ca_file: Option<PathBuf>,
    /// Serve on a non-loopback address without authentication (refused otherwise).
    pub allow_unauthenticated: bool,
    /// Serve gRPC server reflection (v1 and v1alpha) for grpcurl and similar tools.
    pub reflection: bool,
    /// Largest request or response message, in bytes.
    pub max_message_bytes: u32,
    /// Longest a call may run before it is cancelled, in seconds.
    pub request_timeout_seconds: u32,
    /// Calls in flight per connection; further ones are shed with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests_per_connection: u32,
    /// Calls a second per tenant (0: no limit); over it, RESOURCE_EXHAUSTED with RetryInfo.
    pub rate_limit_per_second: u32,
    /// Calls a tenant may make at once above its rate.
    pub rate_limit_burst: u32,
    /// The deployment (`ENVIRONMENT`); `production` refuses literal API keys.
    pub environment: String,
    /// The reference design's tool settings: the `[tools]` table, its names in the environment.
    /// Not serialized: its defaults come from `ToolSettings::default` field by field.
    #[serde(default, skip_serializing)]
    pub tools: ToolSettings,
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
            session_cache_mib: 64,
            migrate_on_start: true,
            metrics_listen: None,
            log_format: LogFormat::Text,
            shutdown_drain_seconds: 0,
            shutdown_timeout_seconds: 25,
            auth_tokens: Vec::new(),
            auth_clients: Vec::new(),
            tls_cert_file: None,
            tls_key_file: None,
            tls_client_ca_file: None,
            allow_unauthenticated: false,
            reflection: true,
            max_message_bytes: 4 * 1024 * 1024,
            request_timeout_seconds: 30,
            max_concurrent_requests_per_connection: 256,
            rate_limit_per_second: 0,
            rate_limit_burst: 100,
            environment: "development".to_owned(),
            tools: ToolSettings::default(),
        }
    }
}

/// Settings read from the environment under the reference design's names, unprefixed and
/// parsed as it parses them (the tool settings too: `ToolSettings::env_settings`).
const UNPREFIXED_ENV: [(&str, EnvKind); 6] = [
    ("database_url", EnvKind::Text),
    ("environment", EnvKind::Text),
    ("memory_max_entries", EnvKind::Integer),
    ("memory_ttl_hours", EnvKind::Integer),
    ("memory_cleanup_days", EnvKind::Integer),
    ("memory_importance_threshold", EnvKind::Number),
];
/// Engram's own settings, read from `ENGRAM_`-prefixed variables.
const PREFIXED_ENV: [&str; 22] = [
    "tls_cert_file",
    "tls_key_file",
    "tls_client_ca_file",
    "allow_unauthenticated",
    "reflection",
    "max_message_bytes",
    "request_timeout_seconds",
    "max_concurrent_requests_per_connection",
    "rate_limit_per_second",
    "rate_limit_burst",
    "migrate_on_start",
    "metrics_listen",
    "log_format",
    "shutdown_drain_seconds",
    "shutdown_timeout_seconds",
    "listen",
    "similarity_max_distance",
    "soft_delete_retention_days",
    "sweep_interval_seconds",
    "database_max_connections",
    "session_cache_mib",
    "database_url",
];

/// Values given as command-line flags; they override everything else.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_unauthenticated: Option<bool>,
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
        let mut settings: Settings = figment
            .merge(SeedEnv::new(
                UNPREFIXED_ENV
                    .iter()
                    .map(|(key, kind)| ((*key).to_owned(), *kind))
                    .chain(ToolSettings::env_settings()),
            ))
            .merge(Env::prefixed("ENGRAM_").only(&PREFIXED_ENV))
            .merge(Serialized::defaults(overrides))
            .extract()
            .map_err(explain)?;
        // `TENANT:ROLE:REFERENCE;...` is no figment value: read it as written.
        if let Ok(raw) = std::env::var("ENGRAM_AUTH_TOKENS") {
            settings.auth_tokens = crate::auth::parse_token_list(&raw).map_err(|why| {
                format!("invalid setting auth_tokens (ENGRAM_AUTH_TOKENS): {why}")
            })?;
        }
        if let Ok(raw) = std::env::var("ENGRAM_AUTH_CLIENTS") {
            settings.auth_clients = crate::auth::parse_client_list(&raw).map_err(|why| {
                format!("invalid setting auth_clients (ENGRAM_AUTH_CLIENTS): {why}")
            })?;
        }
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
        check_range("session_cache_mib", self.session_cache_mib, 0, 16 * 1024)?;
        check_range(
            "shutdown_drain_seconds",
            self.shutdown_drain_seconds,
            0,
            300,
        )?;
        check_range(
            "shutdown_timeout_seconds",
            self.shutdown_timeout_seconds,
            1,
            600,
        )?;
        check_range(
            "max_message_bytes",
            self.max_message_bytes,
            1024,
            64 * 1024 * 1024,
        )?;
        check_range(
            "request_timeout_seconds",
            self.request_timeout_seconds,
            1,
            3600,
        )?;
        check_range(
            "max_concurrent_requests_per_connection",
            self.max_concurrent_requests_per_connection,
            1,
            100_000,
        )?;
        check_range(
            "rate_limit_per_second",
            self.rate_limit_per_second,
            0,
            1_000_000,
        )?;
        check_range("rate_limit_burst", self.rate_limit_burst, 1, 1_000_000)?;
        for (index, token) in self.auth_tokens.iter().enumerate() {
            crate::auth::validate_tenant(&token.tenant).map_err(|why| {
                format!("invalid setting auth_tokens[{index}] (ENGRAM_AUTH_TOKENS): {why}")
            })?;
        }
        for (index, client) in self.auth_clients.iter().enumerate() {
            crate::auth::validate_tenant(&client.tenant).map_err(|why| {
                format!("invalid setting auth_clients[{index}] (ENGRAM_AUTH_CLIENTS): {why}")
            })?;
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("invalid setting tls_cert_file/tls_key_file (ENGRAM_TLS_CERT_FILE, ENGRAM_TLS_KEY_FILE): set both or neither".to_owned());
        }
        if self.tls_client_ca_file.is_some() && self.tls_cert_file.is_none() {
            return Err("invalid setting tls_client_ca_file (ENGRAM_TLS_CLIENT_CA_FILE): mutual TLS needs tls_cert_file and tls_key_file".to_owned());
        }
        if !self.auth_clients.is_empty() && self.tls_client_ca_file.is_none() {
            return Err("invalid setting auth_clients (ENGRAM_AUTH_CLIENTS): client certificates need tls_client_ca_file".to_owned());
        }
        let url = self.database_url.as_str();
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err("invalid setting database_url (DATABASE_URL): must start with sqlite:, postgres:// or postgresql://".to_owned());
        }
        let production = self.environment.trim().eq_ignore_ascii_case("production");
        self.tools.validate(production)
    }

    /// The environment variable an operator sets for `key`.
    pub fn env_name(key: &str) -> String {
        let unprefixed = UNPREFIXED_ENV.iter().any(|(name, _)| *name == key);
        let tool = key
            .strip_prefix(TOOLS_TABLE)
            .is_some_and(|rest| rest.starts_with('.'));
        if unprefixed || tool {
            SeedEnv::variable(key)
        } else {
            format!("ENGRAM_{}", key.to_ascii_uppercase())
        }
    }
}

/// One line for the operator from figment's error: the setting, its variable, what is wrong
/// and, for a tool setting, what it must be. A file's syntax error keeps its position but not
/// the quoted line, which could hold an API key.
fn explain(error: figment::Error) -> String {
    let origin = match &error.metadata {
        Some(figment::Metadata {
            name,
            source: Some(source),
            ..
        }) => format!(" in {name} {source}"),
        _ => String::new(),
    };
    let key = error.path.join(".");
    if let figment::error::Kind::UnknownField(field, _) = &error.kind {
        // The path already ends in the unknown key, except at the top level.
        let key = if key.is_empty() { field } else { &key };
        return format!("unknown setting {key}{origin}");
    }
    if key.is_empty() {
        let problem = error.kind.to_string();
        let problem: Vec<&str> = problem
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !is_quoted_source_line(line))
            .collect();
        return format!("invalid settings{origin}: {}", problem.join(": "));
    }
    let problem =
        ToolSettings::explain(&key, &error.kind).unwrap_or_else(|| error.kind.to_string());
    let variable = Settings::env_name(&key);
    format!("invalid setting {key} ({variable}){origin}: {problem}")
}

/// The `12 | text` and `   |   ^` lines a TOML parser quotes.
fn is_quoted_source_line(line: &str) -> bool {
    line.trim_start_matches(|c: char| c.is_ascii_digit())
        .trim_start()
        .starts_with('|')
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
