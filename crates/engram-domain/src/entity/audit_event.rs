//! The `audit_events` table: who deleted or purged what, when, and how many memories.
//! Never content.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "audit_events")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub tenant_id: String,
    /// The token fingerprint or client certificate that made the call.
    pub principal: String,
    /// The RPC: `DeleteMemory` or `PurgeMemories`.
    pub action: String,
    /// The resource name or parent the call named.
    #[sea_orm(column_type = "Text")]
    pub resource: String,
    /// The purge filter, empty for a delete.
    #[sea_orm(column_type = "Text")]
    pub filter: String,
    /// Memories deleted (soft) or purged.
    pub affected: i64,
    pub created_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
