//! engram.toolconfig.v1.ToolConfigService: the tools as configured, read only. API keys are
//! resolved at start-up (file keys on every call); responses only say whether one is set.

use engram_domain::error::FieldViolation;
use engram_proto::toolconfig::v1 as pb;
use tonic::{Request, Response, Status};

use super::catalog::{ToolCatalog, ToolId};
use super::error::ToolConfigError;
use super::secrets::ApiKeys;
use crate::convert::struct_from_json;
use crate::secrets::SecretError;
use crate::settings::Settings;

/// Longest tool id a name may carry (ids are short words; this only bounds input).
const TOOL_ID_MAX_LEN: usize = 63;

pub struct ToolConfigApi {
    catalog: ToolCatalog,
    api_keys: ApiKeys,
}

impl ToolConfigApi {
    /// Resolves the API keys (an unreadable file or a Secrets Manager failure stops start-up)
    /// and logs each tool's configuration warnings once.
    pub async fn start(settings: &Settings) -> Result<Self, SecretError> {
        let catalog = ToolCatalog::new(settings);
        let api_keys = ApiKeys::resolve(catalog.settings()).await?;
        let api = Self { catalog, api_keys };
        for tool in ToolId::ALL {
            for warning in api.tool(tool).await.warnings {
                tracing::warn!(tool = tool.id(), warning, "tool configuration");
            }
        }
        Ok(api)
    }

    async fn tool(&self, tool: ToolId) -> pb::Tool {
        let api_key = tool
            .api_key_setting()
            .and_then(|setting| self.api_keys.get(setting));
        let api_key_set = match api_key {
            Some(api_key) => api_key.is_set().await,
            None => false,
        };
        pb::Tool {
            name: format!("tools/{}", tool.id()),
            enabled: self.catalog.enabled(tool),
            config: Some(struct_from_json(&self.catalog.config(tool))),
            api_key_set,
            warnings: self.catalog.warnings(tool, api_key_set),
        }
    }
}

/// `tools/{tool_id}`: a malformed name is INVALID_ARGUMENT, an unknown tool NOT_FOUND.
fn parse_tool_name(name: &str) -> Result<ToolId, ToolConfigError> {
    let well_formed = name.strip_prefix("tools/").filter(|id| {
        !id.is_empty()
            && id.len() <= TOOL_ID_MAX_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
    });
    let Some(id) = well_formed else {
        return Err(ToolConfigError::InvalidArgument(vec![FieldViolation::new(
            "name",
            "must be tools/{tool_id}, the id being 1 to 63 lowercase letters, digits, - or _",
        )]));
    };
    ToolId::from_id(id).ok_or_else(|| ToolConfigError::NotFound {
        name: name.to_owned(),
    })
}

#[tonic::async_trait]
impl pb::tool_config_service_server::ToolConfigService for ToolConfigApi {
    async fn list_tools(
        &self,
        request: Request<pb::ListToolsRequest>,
    ) -> Result<Response<pb::ListToolsResponse>, Status> {
        let pb::ListToolsRequest { enabled_only } = request.into_inner();
        let mut tools = Vec::new();
        for tool in ToolId::ALL {
            if !enabled_only || self.catalog.enabled(tool) {
                tools.push(self.tool(tool).await);
            }
        }
        Ok(Response::new(pb::ListToolsResponse { tools }))
    }

    async fn get_tool(
        &self,
        request: Request<pb::GetToolRequest>,
    ) -> Result<Response<pb::Tool>, Status> {
        let pb::GetToolRequest { name } = request.into_inner();
        let tool = parse_tool_name(&name)?;
        Ok(Response::new(self.tool(tool).await))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names_are_checked_before_they_are_looked_up() {
        assert_eq!(parse_tool_name("tools/crm").unwrap(), ToolId::Crm);
        assert!(matches!(
            parse_tool_name("tools/weather"),
            Err(ToolConfigError::NotFound { .. })
        ));
        for malformed in [
            "crm",
            "tools/",
            "tools/crm/x",
            "tools/CRM",
            "tools/a b",
            "/tools/crm",
        ] {
            assert!(
                matches!(
                    parse_tool_name(malformed),
                    Err(ToolConfigError::InvalidArgument(_))
                ),
                "{malformed}"
            );
        }
        assert!(matches!(
            parse_tool_name(&format!("tools/{}", "a".repeat(64))),
            Err(ToolConfigError::InvalidArgument(_))
        ));
    }
}
