//! Secrets (tool API keys, bearer tokens): the reference an operator configures and the
//! secret it currently stands for. A secret is a `SecretString` from the moment it is read;
//! nothing here formats one, and no error repeats what was configured.

use std::path::{Path, PathBuf};

use secrecy::SecretString;
use secrecy::zeroize::Zeroize;
use serde::{Deserialize, Deserializer, de};

/// Where a secret comes from: the reference design's forms plus Kubernetes Secret files.
#[derive(Debug, Clone)]
pub enum SecretReference {
    /// The key itself; refused when ENVIRONMENT=production.
    Literal(SecretString),
    /// `env://VAR`: the environment variable VAR.
    Env(String),
    /// `file:///path`: a file, e.g. a mounted Kubernetes Secret; re-read on every use.
    File(PathBuf),
    /// `secretsmanager://aws/NAME`: the SecretString of an AWS Secrets Manager secret.
    SecretsManager(String),
}

impl SecretReference {
    /// Blank text is no key, as in the reference design.
    pub fn parse(text: String) -> Result<Option<Self>, String> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        if let Some(variable) = text.strip_prefix("env://") {
            if variable.is_empty() {
                return Err("an env:// reference needs a variable: env://VAR".to_owned());
            }
            return Ok(Some(SecretReference::Env(variable.to_owned())));
        }
        if let Some(path) = text.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err("a file:// reference needs an absolute path: file:///path".to_owned());
            }
            return Ok(Some(SecretReference::File(PathBuf::from(path))));
        }
        if let Some(rest) = text.strip_prefix("secretsmanager://") {
            return match rest.strip_prefix("aws/") {
                Some(name) if !name.is_empty() => {
                    Ok(Some(SecretReference::SecretsManager(name.to_owned())))
                }
                _ => Err(
                    "a secretsmanager:// reference must be secretsmanager://aws/NAME".to_owned(),
                ),
            };
        }
        Ok(Some(SecretReference::Literal(SecretString::from(text))))
    }

    pub fn deserialize_optional<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Self>, D::Error> {
        Self::parse(String::deserialize(deserializer)?).map_err(de::Error::custom)
    }
}

/// A secret as the service sees it after start-up.
#[derive(Debug)]
pub enum Secret {
    /// Not configured, or a reference that stands for nothing (an unset variable).
    Unset,
    /// Read once at start-up: a literal, an environment variable or a Secrets Manager secret.
    Fixed(SecretString),
    /// A file read on every use, so a rotated Kubernetes Secret takes effect at once. The files
    /// are tiny and read only when a tool is asked for; comparing modification times instead
    /// could miss a same-size rewrite within the file system's timestamp granularity.
    File { setting: String, path: PathBuf },
}

impl Secret {
    /// The key now; `None` when it is unset, empty or (for a file) unreadable.
    pub async fn current(&self) -> Option<SecretString> {
        match self {
            Secret::Unset => None,
            Secret::Fixed(key) => Some(key.clone()),
            Secret::File { setting, path } => match read_key_file(path).await {
                Ok(key) => key,
                Err(error) => {
                    tracing::warn!(setting, path = %path.display(), %error, "cannot read the secret file; it counts as unset");
                    None
                }
            },
        }
    }

    pub async fn is_set(&self) -> bool {
        self.current().await.is_some()
    }
}

/// The file's content without surrounding whitespace (files often end in a newline).
async fn read_key_file(path: &Path) -> std::io::Result<Option<SecretString>> {
    let mut contents = tokio::fs::read_to_string(path).await?;
    let key = contents.trim();
    let key = (!key.is_empty()).then(|| SecretString::from(key));
    contents.zeroize();
    Ok(key)
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read {setting} ({variable}) from file {path}: {source}")]
    File {
        setting: String,
        variable: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load {setting} ({variable}) from AWS Secrets Manager secret {name}: {reason}")]
    SecretsManager {
        setting: String,
        variable: String,
        name: String,
        reason: String,
    },
}

/// Resolves references into secrets, connecting to AWS Secrets Manager at most once.
#[derive(Default)]
pub struct SecretResolver {
    secrets_manager: tokio::sync::OnceCell<aws::SecretsManager>,
}

impl SecretResolver {
    /// The secret `reference` (configured as `setting`, from the environment as `variable`)
    /// stands for. An unset variable is a warning (the secret counts as unset); an unreadable
    /// file or a Secrets Manager failure is an error that stops start-up.
    pub async fn resolve(
        &self,
        setting: &str,
        variable: &str,
        reference: Option<&SecretReference>,
    ) -> Result<Secret, SecretError> {
        Ok(match reference {
            None => Secret::Unset,
            Some(SecretReference::Literal(literal)) => {
                tracing::warn!(setting, "using a literal secret (development only)");
                Secret::Fixed(literal.clone())
            }
            Some(SecretReference::Env(name)) => from_environment(setting, name),
            Some(SecretReference::File(path)) => from_file(setting, variable, path).await?,
            Some(SecretReference::SecretsManager(name)) => {
                let client = self
                    .secrets_manager
                    .get_or_init(aws::SecretsManager::connect)
                    .await;
                from_secrets_manager(setting, variable, client, name).await?
            }
        })
    }
}

/// Checks the file once so a wrong path stops start-up; later reads may find it rotated.
async fn from_file(setting: &str, variable: &str, path: &Path) -> Result<Secret, SecretError> {
    if let Err(source) = read_key_file(path).await {
        return Err(SecretError::File {
            setting: setting.to_owned(),
            variable: variable.to_owned(),
            path: path.to_owned(),
            source,
        });
    }
    tracing::info!(setting, path = %path.display(), "secret read from a file on every use");
    Ok(Secret::File {
        setting: setting.to_owned(),
        path: path.to_owned(),
    })
}

async fn from_secrets_manager(
    setting: &str,
    variable: &str,
    client: &aws::SecretsManager,
    name: &str,
) -> Result<Secret, SecretError> {
    let key = client
        .fetch(name)
        .await
        .map_err(|reason| SecretError::SecretsManager {
            setting: setting.to_owned(),
            variable: variable.to_owned(),
            name: name.to_owned(),
            reason,
        })?;
    tracing::info!(
        setting,
        secret = name,
        "secret loaded from AWS Secrets Manager"
    );
    Ok(Secret::Fixed(key))
}

fn from_environment(setting: &str, variable: &str) -> Secret {
    match std::env::var(variable) {
        Ok(value) if !value.is_empty() => {
            tracing::info!(
                setting,
                variable,
                "secret loaded from an environment variable"
            );
            Secret::Fixed(SecretString::from(value))
        }
        _ => {
            tracing::warn!(
                setting,
                variable,
                "environment variable not set; the secret counts as unset"
            );
            Secret::Unset
        }
    }
}

#[cfg(feature = "aws-secrets-manager")]
mod aws {
    use std::time::Duration;

    use aws_config::BehaviorVersion;
    use aws_config::timeout::TimeoutConfig;
    use aws_sdk_secretsmanager::Client;
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    use secrecy::SecretString;

    /// Bounds a start-up that waits on an unresponsive endpoint.
    const OPERATION_TIMEOUT: Duration = Duration::from_secs(30);

    pub struct SecretsManager(Client);

    impl SecretsManager {
        /// Configured as every AWS SDK is: region, credential chain and AWS_ENDPOINT_URL from
        /// the environment; TLS by rustls on ring.
        pub async fn connect() -> Self {
            let http_client = aws_smithy_http_client::Builder::new()
                .tls_provider(Provider::Rustls(CryptoMode::Ring))
                .build_https();
            let config = aws_config::defaults(BehaviorVersion::latest())
                .http_client(http_client)
                .timeout_config(
                    TimeoutConfig::builder()
                        .operation_timeout(OPERATION_TIMEOUT)
                        .build(),
                )
                .load()
                .await;
            Self(Client::new(&config))
        }

        pub async fn fetch(&self, name: &str) -> Result<SecretString, String> {
            let output = self
                .0
                .get_secret_value()
                .secret_id(name)
                .send()
                .await
                .map_err(|error| error_chain(&error))?;
            output
                .secret_string()
                .map(SecretString::from)
                .ok_or_else(|| {
                    "the secret has no SecretString (binary secrets are not supported)".to_owned()
                })
        }
    }

    /// The error and its causes on one line, each said once (the SDK's own context display
    /// appends the raw response).
    fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
        let mut parts: Vec<String> = Vec::new();
        let mut next = Some(error);
        while let Some(error) = next {
            let text = error.to_string();
            if parts.last().is_none_or(|last| !last.contains(&text)) {
                parts.push(text);
            }
            next = error.source();
        }
        parts.join(": ")
    }
}

#[cfg(not(feature = "aws-secrets-manager"))]
mod aws {
    use secrecy::SecretString;

    pub struct SecretsManager;

    impl SecretsManager {
        pub async fn connect() -> Self {
            SecretsManager
        }

        pub async fn fetch(&self, _name: &str) -> Result<SecretString, String> {
            Err("this engram was built without the aws-secrets-manager feature".to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    fn parse(text: &str) -> Result<Option<SecretReference>, String> {
        SecretReference::parse(text.to_owned())
    }

    #[test]
    fn references_follow_their_prefix() {
        assert!(parse("  ").unwrap().is_none());
        assert!(
            matches!(parse("env://CRM_KEY"), Ok(Some(SecretReference::Env(v))) if v == "CRM_KEY")
        );
        assert!(
            matches!(parse("file:///run/secrets/crm"), Ok(Some(SecretReference::File(p))) if p == Path::new("/run/secrets/crm"))
        );
        assert!(
            matches!(parse("secretsmanager://aws/crm-key"), Ok(Some(SecretReference::SecretsManager(n))) if n == "crm-key")
        );
        assert!(matches!(
            parse("sk-live-123"),
            Ok(Some(SecretReference::Literal(_)))
        ));
        for malformed in [
            "env://",
            "file://relative",
            "secretsmanager://gcp/x",
            "secretsmanager://aws/",
        ] {
            assert!(parse(malformed).is_err(), "{malformed}");
        }
    }

    #[test]
    fn debug_never_shows_a_literal_key() {
        let reference = parse("sk-live-do-not-print").unwrap().unwrap();
        let shown = format!(
            "{reference:?} {:?}",
            Secret::Fixed(SecretString::from("sk-live-do-not-print"))
        );
        assert!(!shown.contains("sk-live-do-not-print"), "{shown}");
    }

    #[tokio::test]
    async fn a_file_key_follows_the_file() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("crm");
        std::fs::write(&path, "first-key\n").unwrap();
        let key = Secret::File {
            setting: "tools.crm_api_key".to_owned(),
            path: path.clone(),
        };
        assert_eq!(key.current().await.unwrap().expose_secret(), "first-key");
        std::fs::write(&path, "second-key").unwrap();
        assert_eq!(key.current().await.unwrap().expose_secret(), "second-key");
        std::fs::write(&path, " \n").unwrap();
        assert!(key.current().await.is_none());
        std::fs::remove_file(&path).unwrap();
        assert!(!key.is_set().await);
    }
}
