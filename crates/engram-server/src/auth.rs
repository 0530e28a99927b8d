//! Who is calling. Bearer tokens, configured as secret references, are kept only as SHA-256
//! digests and compared in constant time; each maps to a tenant and a role. Under mutual TLS
//! a verified client certificate's common name maps to a tenant and a role the same way.
//! With neither configured the service is open and every caller is the default tenant's
//! admin (the embedded default on loopback). Refused calls never echo the credential.

use std::num::NonZeroU32;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use secrecy::ExposeSecret;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::ERROR_DOMAIN;
use crate::secrets::{Secret, SecretError, SecretReference, SecretResolver};

/// The tenant of legacy rows and of callers when authentication is off.
pub const DEFAULT_TENANT: &str = "default";
/// Longest bearer token accepted; longer values are refused unread.
const TOKEN_MAX_LEN: usize = 4096;
/// How often file-backed tokens are re-read, so a rotated Secret takes effect.
pub const TOKEN_REFRESH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and writes memories of its tenant.
    Agent,
    /// Also purges across sessions and reads tool configuration.
    Admin,
}

/// The authenticated caller, put in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub tenant: String,
    pub role: Role,
    /// Who, for audit records and never secret: `token:` and the first 12 hex digits of the
    /// token's SHA-256, `certificate:` and the client certificate's common name, or
    /// `unauthenticated`.
    pub principal: String,
}

/// One configured token: `[[auth_tokens]]` in the TOML file, or in ENGRAM_AUTH_TOKENS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSetting {
    #[serde(deserialize_with = "required_reference")]
    pub token: SecretReference,
    pub tenant: String,
    pub role: Role,
}

fn required_reference<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<SecretReference, D::Error> {
    SecretReference::deserialize_optional(deserializer)?
        .ok_or_else(|| serde::de::Error::custom("token must not be empty"))
}

/// One client certificate identity: `[[auth_clients]]` in the TOML file, or ENGRAM_AUTH_CLIENTS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSetting {
    pub common_name: String,
    pub tenant: String,
    pub role: Role,
}

/// Parses ENGRAM_AUTH_CLIENTS: `COMMON_NAME:TENANT:ROLE` entries separated by `;`.
pub fn parse_client_list(raw: &str) -> Result<Vec<ClientSetting>, String> {
    entries(raw)
        .map(|(index, [common_name, tenant, role])| {
            Ok(ClientSetting {
                common_name: common_name.to_owned(),
                tenant: tenant.to_owned(),
                role: parse_role(index, role)?,
            })
        })
        .collect()
}

/// The non-empty `;`-separated entries of a list setting, each split in three at `:`.
fn entries(raw: &str) -> impl Iterator<Item = (usize, [&str; 3])> + '_ {
    raw.split(';')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .enumerate()
        .map(|(index, entry)| {
            let mut parts = entry.splitn(3, ':');
            (
                index,
                [
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                    parts.next().unwrap_or(""),
                ],
            )
        })
}

fn parse_role(index: usize, role: &str) -> Result<Role, String> {
    match role {
        "agent" => Ok(Role::Agent),
        "admin" => Ok(Role::Admin),
        _ => Err(format!("entry {}: role must be agent or admin", index + 1)),
    }
}

/// Parses ENGRAM_AUTH_TOKENS: `TENANT:ROLE:REFERENCE` entries separated by `;`, e.g.
/// `acme:agent:file:///var/run/secrets/engram/acme;ops:admin:env://ENGRAM_ADMIN_TOKEN`.
pub fn parse_token_list(raw: &str) -> Result<Vec<TokenSetting>, String> {
    entries(raw)
        .map(|(index, [tenant, role, reference])| {
            let role = parse_role(index, role)?;
            let token = SecretReference::parse(reference.to_owned())
                .map_err(|why| format!("entry {}: {why}", index + 1))?
                .ok_or_else(|| format!("entry {}: the token reference is empty", index + 1))?;
            Ok(TokenSetting {
                token,
                tenant: tenant.to_owned(),
                role,
            })
        })
        .collect()
}

/// Tenants name rows and rate-limit buckets: short, plain identifiers.
pub fn validate_tenant(tenant: &str) -> Result<(), String> {
    let plain = tenant
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if (1..=64).contains(&tenant.len()) && plain {
        Ok(())
    } else {
        Err(format!(
            "tenant {tenant:?} must be 1 to 64 ASCII letters, digits, '_' or '-'"
        ))
    }
}

struct Grant {
    digest: [u8; 32],
    caller: Caller,
}

pub struct Authenticator {
    sources: Vec<(Secret, Caller)>,
    clients: Vec<(String, Caller)>,
    grants: RwLock<Vec<Grant>>,
    limiter: Option<DefaultKeyedRateLimiter<String>>,
}

impl Authenticator {
    /// Resolves every token reference (an unreadable file stops start-up).
    pub async fn start(
        tokens: &[TokenSetting],
        clients: &[ClientSetting],
        rate_limit: Option<Quota>,
    ) -> Result<Arc<Self>, SecretError> {
        let resolver = SecretResolver::default();
        let mut sources = Vec::with_capacity(tokens.len());
        for (index, token) in tokens.iter().enumerate() {
            let setting = format!("auth_tokens[{index}]");
            let secret = resolver
                .resolve(&setting, "ENGRAM_AUTH_TOKENS", Some(&token.token))
                .await?;
            sources.push((
                secret,
                Caller {
                    tenant: token.tenant.clone(),
                    role: token.role,
                    principal: String::new(),
                },
            ));
        }
        let authenticator = Arc::new(Self {
            sources,
            clients: clients
                .iter()
                .map(|client| {
                    (
                        client.common_name.clone(),
                        Caller {
                            tenant: client.tenant.clone(),
                            role: client.role,
                            principal: format!("certificate:{}", client.common_name),
                        },
                    )
                })
                .collect(),
            grants: RwLock::new(Vec::new()),
            limiter: rate_limit.map(RateLimiter::keyed),
        });
        authenticator.refresh().await;
        Ok(authenticator)
    }

    /// True when tokens or client certificates are configured (and so required).
    pub fn is_enforcing(&self) -> bool {
        !self.sources.is_empty() || !self.clients.is_empty()
    }

    /// Re-reads the token sources (file-backed ones may have been rotated).
    pub async fn refresh(&self) {
        let mut grants = Vec::with_capacity(self.sources.len());
        for (secret, caller) in &self.sources {
            if let Some(token) = secret.current().await {
                let digest: [u8; 32] = Sha256::digest(token.expose_secret().as_bytes()).into();
                let fingerprint: String = digest[..6]
                    .iter()
                    .map(|byte| format!("{byte:02x}"))
                    .collect();
                grants.push(Grant {
                    digest,
                    caller: Caller {
                        principal: format!("token:{fingerprint}"),
                        ..caller.clone()
                    },
                });
            }
        }
        *self.grants.write().expect("token table lock") = grants;
    }

    /// The caller of a request: its verified client certificate when it presented one (TLS
    /// has checked it against the client CA), else its bearer token; or UNAUTHENTICATED.
    pub fn authenticate(
        &self,
        metadata: &MetadataMap,
        client_certificate: Option<&[u8]>,
    ) -> Result<Caller, Status> {
        if !self.is_enforcing() {
            return Ok(Caller {
                tenant: DEFAULT_TENANT.to_owned(),
                role: Role::Admin,
                principal: "unauthenticated".to_owned(),
            });
        }
        if let Some(certificate) = client_certificate {
            let name = common_name(certificate);
            return self
                .clients
                .iter()
                .find(|(common_name, _)| Some(common_name.as_str()) == name.as_deref())
                .map(|(_, caller)| caller.clone())
                .ok_or_else(|| {
                    refusal(
                        Code::Unauthenticated,
                        "UNKNOWN_CLIENT_CERTIFICATE",
                        "the client certificate names no known client",
                    )
                });
        }
        let token = bearer_token(metadata)?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let grants = self.grants.read().expect("token table lock");
        // Every grant is compared, each in constant time, whether or not one matched.
        let mut matched = None;
        for grant in grants.iter() {
            if bool::from(grant.digest.ct_eq(&digest)) {
                matched = Some(grant.caller.clone());
            }
        }
        matched.ok_or_else(|| {
            refusal(
                Code::Unauthenticated,
                "INVALID_TOKEN",
                "the bearer token is not valid",
            )
        })
    }

    /// Applies the caller's tenant rate limit: RESOURCE_EXHAUSTED with RetryInfo when over it.
    pub fn admit(&self, caller: &Caller) -> Result<(), Status> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        limiter.check_key(&caller.tenant).map_err(|not_until| {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            let mut details = ErrorDetails::with_error_info(
                "RATE_LIMITED",
                ERROR_DOMAIN,
                [("tenant".to_owned(), caller.tenant.clone())],
            );
            details.set_retry_info(Some(wait.max(Duration::from_millis(1))));
            Status::with_error_details(
                Code::ResourceExhausted,
                "the tenant's request rate limit is reached; retry later",
                details,
            )
        })
    }
}

/// The per-tenant quota: `per_second` requests a second with bursts of `burst`; 0 is no limit.
pub fn quota(per_second: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(per_second)?;
    Some(Quota::per_second(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(rate)))
}

/// The subject common name of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let name = certificate
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_owned();
    Some(name)
}

fn bearer_token(metadata: &MetadataMap) -> Result<&str, Status> {
    let missing = || {
        refusal(
            Code::Unauthenticated,
            "MISSING_CREDENTIALS",
            "an authorization: Bearer token is required",
        )
    };
    let value = metadata
        .get("authorization")
        .ok_or_else(missing)?
        .to_str()
        .map_err(|_| missing())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(missing)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.len() > TOKEN_MAX_LEN {
        return Err(missing());
    }
    Ok(token)
}

/// PERMISSION_DENIED unless the caller is an admin.
pub fn require_admin(caller: &Caller) -> Result<(), Status> {
    match caller.role {
        Role::Admin => Ok(()),
        Role::Agent => Err(refusal(
            Code::PermissionDenied,
            "ADMIN_ROLE_REQUIRED",
            "this call needs the admin role",
        )),
    }
}

fn refusal(code: Code, reason: &str, message: &str) -> Status {
    crate::error::status(
        code,
        message.to_owned(),
        reason,
        Default::default(),
        Vec::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(value: &str) -> MetadataMap {
        let mut metadata = MetadataMap::new();
        metadata.insert("authorization", value.parse().unwrap());
        metadata
    }

    async fn authenticator() -> Arc<Authenticator> {
        let tokens = parse_token_list("acme:agent:tok-acme-123; ops:admin:tok-ops-456").unwrap();
        Authenticator::start(&tokens, &[], None).await.unwrap()
    }

    impl Authenticator {
        fn authenticate_token(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
            self.authenticate(metadata, None)
        }
    }

    #[tokio::test]
    async fn tokens_map_to_tenants_and_roles() {
        let auth = authenticator().await;
        assert_eq!(
            auth.authenticate_token(&metadata("Bearer tok-acme-123"))
                .unwrap(),
            Caller {
                tenant: "acme".into(),
                role: Role::Agent,
                // The first 6 bytes of SHA-256("tok-acme-123") (sha256sum).
                principal: "token:2c1c2fd8b035".into(),
            }
        );
        assert_eq!(
            auth.authenticate_token(&metadata("bearer tok-ops-456"))
                .unwrap()
                .role,
            Role::Admin
        );
        for bad in [
            "Bearer tok-acme-12",
            "Basic tok-acme-123",
            "Bearer ",
            "tok-acme-123",
        ] {
            let status = auth.authenticate_token(&metadata(bad)).unwrap_err();
            assert_eq!(status.code(), Code::Unauthenticated, "{bad}");
            assert!(!status.message().contains("tok-"), "no token in errors");
        }
        assert_eq!(
            auth.authenticate_token(&MetadataMap::new())
                .unwrap_err()
                .code(),
            Code::Unauthenticated
        );
    }

    #[tokio::test]
    async fn without_tokens_everyone_is_the_default_admin() {
        let auth = Authenticator::start(&[], &[], None).await.unwrap();
        assert_eq!(
            auth.authenticate_token(&MetadataMap::new()).unwrap(),
            Caller {
                tenant: DEFAULT_TENANT.into(),
                role: Role::Admin,
                principal: "unauthenticated".into(),
            }
        );
    }

    #[tokio::test]
    async fn the_rate_limit_refuses_with_retry_info_per_tenant() {
        let auth = Authenticator::start(&[], &[], quota(1, 2)).await.unwrap();
        let acme = Caller {
            tenant: "acme".into(),
            role: Role::Agent,
            principal: "token:acme".into(),
        };
        let other = Caller {
            tenant: "other".into(),
            ..acme.clone()
        };
        assert!(auth.admit(&acme).is_ok() && auth.admit(&acme).is_ok());
        let refused = auth.admit(&acme).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(
            refused
                .get_error_details()
                .retry_info()
                .and_then(|info| info.retry_delay)
                .is_some()
        );
        assert!(auth.admit(&other).is_ok(), "each tenant has its own bucket");
    }

    #[test]
    fn token_lists_are_parsed_strictly() {
        let tokens =
            parse_token_list("acme:agent:file:///run/secrets/acme;ops:admin:env://OPS").unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(matches!(&tokens[0].token, SecretReference::File(path) if path.ends_with("acme")));
        for bad in ["acme:agent", "acme:root:x", "acme:agent:env://"] {
            assert!(parse_token_list(bad).is_err(), "{bad}");
        }
        let clients = parse_client_list("acme-agent:acme:agent").unwrap();
        assert_eq!(
            (
                clients[0].common_name.as_str(),
                clients[0].tenant.as_str(),
                clients[0].role
            ),
            ("acme-agent", "acme", Role::Agent)
        );
        assert!(parse_client_list("acme-agent:acme").is_err());
        assert!(validate_tenant("acme-1").is_ok());
        assert!(validate_tenant("../x").is_err() && validate_tenant("").is_err());
    }

    #[test]
    fn agents_are_not_admins() {
        assert_eq!(
            require_admin(&Caller {
                tenant: "a".into(),
                role: Role::Agent,
                principal: "token:a".into(),
            })
            .unwrap_err()
            .code(),
            Code::PermissionDenied
        );
        assert!(
            require_admin(&Caller {
                tenant: "a".into(),
                role: Role::Admin,
                principal: "token:a".into(),
            })
            .is_ok()
        );
    }
}
