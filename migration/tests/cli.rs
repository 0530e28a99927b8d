//! The crate's own command line against DATABASE_URL (SQLite).

use std::process::{Command, Output};

fn migration(action: &str, database_url: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migration"))
        .arg(action)
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .output()
        .expect("run the migration binary")
}

fn log(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn up_status_and_down_work_against_database_url() {
    let directory = tempfile::tempdir().expect("temporary directory");
    let url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("engram.db").display()
    );

    let up = migration("up", &url);
    assert!(up.status.success(), "{}", log(&up));
    let status = migration("status", &url);
    assert!(
        log(&status).contains("Migration 'm20261124_000005_lean_indexes'... Applied"),
        "{}",
        log(&status)
    );
    let down = migration("down", &url);
    assert!(down.status.success(), "{}", log(&down));
    let status = migration("status", &url);
    assert!(
        log(&status).contains("Migration 'm20261124_000005_lean_indexes'... Pending")
            && log(&status).contains("Migration 'm20261124_000004_tenancy'... Applied"),
        "{}",
        log(&status)
    );

    let unknown = migration("sideways", &url);
    assert_eq!(unknown.status.code(), Some(2), "{}", log(&unknown));
}
