//! The tools' API keys, resolved from their references at start-up.

use super::seed_env::SeedEnv;
use super::settings::{TOOLS_TABLE, ToolSettings};
use crate::secrets::{Secret, SecretError, SecretResolver};

/// The API keys of the tools, by setting key (`crm_api_key`, ...).
#[derive(Debug)]
pub struct ApiKeys(Vec<(&'static str, Secret)>);

impl ApiKeys {
    /// Resolves every configured reference (see `SecretResolver::resolve`).
    pub async fn resolve(settings: &ToolSettings) -> Result<Self, SecretError> {
        let resolver = SecretResolver::default();
        let mut keys = Vec::new();
        for (key, reference) in settings.api_keys() {
            let setting = format!("{TOOLS_TABLE}.{key}");
            let variable = SeedEnv::variable(&setting);
            keys.push((key, resolver.resolve(&setting, &variable, reference).await?));
        }
        Ok(Self(keys))
    }

    pub fn get(&self, key: &str) -> Option<&Secret> {
        self.0
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, secret)| secret)
    }
}
