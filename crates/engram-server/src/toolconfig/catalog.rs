//! The tools and what the reference design says about each: its feature flag,
//! `get_tool_config` (without the key itself) and `validate_tool_config`.

use serde_json::{Map, Value, json};

use super::settings::ToolSettings;
use crate::settings::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolId {
    Rag,
    Memory,
    Escalation,
    Attachment,
    Crm,
    Billing,
    Inventory,
}

impl ToolId {
    /// The reference design's order (`get_enabled_tools`).
    pub const ALL: [ToolId; 7] = [
        ToolId::Rag,
        ToolId::Memory,
        ToolId::Escalation,
        ToolId::Attachment,
        ToolId::Crm,
        ToolId::Billing,
        ToolId::Inventory,
    ];

    pub fn id(self) -> &'static str {
        match self {
            ToolId::Rag => "rag",
            ToolId::Memory => "memory",
            ToolId::Escalation => "escalation",
            ToolId::Attachment => "attachment",
            ToolId::Crm => "crm",
            ToolId::Billing => "billing",
            ToolId::Inventory => "inventory",
        }
    }

    pub fn from_id(id: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|tool| tool.id() == id)
    }

    /// The tool's API key setting, if it has one.
    pub fn api_key_setting(self) -> Option<&'static str> {
        match self {
            ToolId::Crm => Some("crm_api_key"),
            ToolId::Billing => Some("billing_api_key"),
            ToolId::Inventory => Some("inventory_api_key"),
            ToolId::Rag | ToolId::Memory | ToolId::Escalation | ToolId::Attachment => None,
        }
    }
}

/// The memory tool's settings: Engram's own memory settings, the ones MemoryService applies.
#[derive(Debug, Clone, Copy)]
struct MemoryToolSettings {
    max_entries: u32,
    ttl_hours: u32,
    cleanup_days: u32,
    importance_threshold: f64,
}

/// The tool settings fixed at start-up (API keys are not here: they can change).
#[derive(Debug, Clone)]
pub struct ToolCatalog {
    tools: ToolSettings,
    memory: MemoryToolSettings,
}

impl ToolCatalog {
    pub fn new(settings: &Settings) -> Self {
        Self {
            tools: settings.tools.clone(),
            memory: MemoryToolSettings {
                max_entries: settings.memory_max_entries,
                ttl_hours: settings.memory_ttl_hours,
                cleanup_days: settings.memory_cleanup_days,
                importance_threshold: settings.memory_importance_threshold,
            },
        }
    }

    pub fn settings(&self) -> &ToolSettings {
        &self.tools
    }

    pub fn enabled(&self, tool: ToolId) -> bool {
        let tools = &self.tools;
        match tool {
            ToolId::Rag => tools.enable_rag_tool,
            ToolId::Memory => tools.enable_memory_tool,
            ToolId::Escalation => tools.enable_escalation_tool,
            ToolId::Attachment => tools.enable_attachment_tool,
            ToolId::Crm => tools.enable_crm_tool,
            ToolId::Billing => tools.enable_billing_tool,
            ToolId::Inventory => tools.enable_inventory_tool,
        }
    }

    /// The reference design's `get_tool_config`, keyed the same, minus `has_api_key`
    /// (the API reports it as `api_key_set`).
    pub fn config(&self, tool: ToolId) -> Map<String, Value> {
        let tools = &self.tools;
        match tool {
            ToolId::Rag => object([
                ("chunk_size", json!(tools.rag_chunk_size)),
                ("chunk_overlap", json!(tools.rag_chunk_overlap)),
                ("search_k", json!(tools.rag_search_k)),
                (
                    "similarity_threshold",
                    json!(tools.rag_similarity_threshold),
                ),
                ("cache_enabled", json!(tools.rag_cache_enabled)),
                ("cache_ttl", json!(tools.rag_cache_ttl)),
            ]),
            ToolId::Memory => object([
                ("max_entries", json!(self.memory.max_entries)),
                ("ttl_hours", json!(self.memory.ttl_hours)),
                ("cleanup_days", json!(self.memory.cleanup_days)),
                (
                    "importance_threshold",
                    json!(self.memory.importance_threshold),
                ),
            ]),
            ToolId::Escalation => object([
                (
                    "confidence_threshold",
                    json!(tools.escalation_confidence_threshold),
                ),
                ("keywords", json!(tools.escalation_keywords.0)),
                (
                    "notification_enabled",
                    json!(tools.escalation_notification_enabled),
                ),
                (
                    "notification_email",
                    json!(tools.escalation_notification_email),
                ),
                (
                    "notification_webhook",
                    json!(tools.escalation_notification_webhook),
                ),
            ]),
            ToolId::Attachment => object([
                ("max_file_size", json!(tools.attachment_max_file_size)),
                (
                    "allowed_extensions",
                    json!(tools.attachment_allowed_extensions.0),
                ),
                ("chunk_for_rag", json!(tools.attachment_chunk_for_rag)),
                (
                    "temp_cleanup_hours",
                    json!(tools.attachment_temp_cleanup_hours),
                ),
            ]),
            ToolId::Crm => object([
                ("api_endpoint", json!(tools.crm_api_endpoint)),
                ("timeout", json!(tools.crm_timeout)),
                ("max_retries", json!(tools.crm_max_retries)),
            ]),
            ToolId::Billing => object([("api_endpoint", json!(tools.billing_api_endpoint))]),
            ToolId::Inventory => object([("api_endpoint", json!(tools.inventory_api_endpoint))]),
        }
    }

    /// The reference design's `validate_tool_config`, with the API key as it is now.
    pub fn warnings(&self, tool: ToolId, api_key_set: bool) -> Vec<String> {
        let tools = &self.tools;
        match tool {
            ToolId::Crm if tools.enable_crm_tool => {
                service_warnings("CRM", &tools.crm_api_endpoint, api_key_set)
            }
            ToolId::Billing if tools.enable_billing_tool => {
                service_warnings("Billing", &tools.billing_api_endpoint, api_key_set)
            }
            ToolId::Inventory if tools.enable_inventory_tool => {
                service_warnings("Inventory", &tools.inventory_api_endpoint, api_key_set)
            }
            ToolId::Escalation
                if tools.escalation_notification_enabled
                    && is_blank(&tools.escalation_notification_email)
                    && is_blank(&tools.escalation_notification_webhook) =>
            {
                vec![
                    "Escalation notifications enabled but no email or webhook configured"
                        .to_owned(),
                ]
            }
            _ => Vec::new(),
        }
    }
}

fn object<const N: usize>(entries: [(&str, Value); N]) -> Map<String, Value> {
    entries
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
}

/// An enabled external-service tool needs an endpoint and a key.
fn service_warnings(label: &str, endpoint: &Option<String>, api_key_set: bool) -> Vec<String> {
    let mut warnings = Vec::new();
    if is_blank(endpoint) {
        warnings.push(format!(
            "{label} tool enabled but no API endpoint configured"
        ));
    }
    if !api_key_set {
        warnings.push(format!("{label} tool enabled but no API key configured"));
    }
    warnings
}

/// Python's `not value` for an optional string.
fn is_blank(value: &Option<String>) -> bool {
    value.as_deref().is_none_or(str::is_empty)
}
