//! The `memories` table (the reference design's Memory model, version 3, with tenants).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "memories")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    /// Session ids are scoped by tenant; legacy rows belong to `default`.
    pub tenant_id: String,
    pub session_id: String,
    /// `user_info`, `preference`, `fact` or `context`.
    pub content_type: String,
    #[sea_orm(column_type = "Text")]
    pub content: String,
    pub content_hash: String,
    pub semantic_hash: Option<String>,
    pub metadata: Json,
    pub importance: f64,
    pub expires_at: Option<DateTimeUtc>,
    pub access_count: i32,
    pub last_accessed: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    pub deleted_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
