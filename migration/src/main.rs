//! The migration crate's own command line, for operators without the `engram` binary:
//! `migration [up|down|status]` against `DATABASE_URL` (`up` by default). `up` and `down`
//! are the same as `engram migrate up|down`: locked, and adopting databases of the
//! Python system.

use std::process::ExitCode;

use migration::sea_orm::Database;
use migration::{Migrator, MigratorTrait};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let action = std::env::args().nth(1).unwrap_or_else(|| "up".to_owned());
    let Ok(url) = std::env::var("DATABASE_URL") else {
        eprintln!("migration: set DATABASE_URL (sqlite://PATH?mode=rwc or postgres://...)");
        return ExitCode::from(2);
    };
    let db = match Database::connect(&url).await {
        Ok(db) => db,
        Err(error) => {
            eprintln!("migration: cannot connect to the database: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match action.as_str() {
        "up" => migration::migrate_up(&db).await,
        "down" => migration::migrate_down(&db).await,
        "status" => Migrator::status(&db).await,
        other => {
            eprintln!("migration: unknown command {other:?}; use up, down or status");
            return ExitCode::from(2);
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("migration: {action} failed: {error}");
            ExitCode::FAILURE
        }
    }
}
