//! The `engram` binary: `engram serve` (the default) and `engram migrate`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use engram_server::settings::{Overrides, Settings};
use engram_server::{server, store};
use migration::{Migrator, MigratorTrait};

// Every call allocates its request, response and rows by the dozen: mimalloc's thread-local
// free lists cost less than glibc's arenas there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "engram",
    version,
    about = "Memory service for AI customer-support agents"
)]
struct Cli {
    /// TOML settings file (below environment variables and flags).
    #[arg(long, global = true, env = "ENGRAM_CONFIG")]
    config: Option<PathBuf>,
    /// Database URL: sqlite://PATH?mode=rwc or postgres://USER@HOST/DB.
    #[arg(long, global = true)]
    database_url: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending migrations, then serve gRPC (the default command).
    Serve {
        /// Address to listen on, e.g. 127.0.0.1:50051.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Serve on a non-loopback address without authentication (refused otherwise).
        #[arg(long)]
        allow_unauthenticated: bool,
    },
    /// Run schema migrations and exit.
    Migrate {
        #[command(subcommand)]
        action: Option<MigrateAction>,
    },
}

#[derive(Subcommand, Clone, Copy)]
enum MigrateAction {
    /// Apply every pending migration (the default).
    Up,
    /// Revert the last applied migration.
    Down,
    /// List migrations and whether each is applied.
    Status,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (listen, allow_unauthenticated) = match &cli.command {
        Some(Command::Serve {
            listen,
            allow_unauthenticated,
        }) => (*listen, allow_unauthenticated.then_some(true)),
        _ => (None, None),
    };
    let overrides = Overrides {
        listen,
        database_url: cli.database_url.clone(),
        allow_unauthenticated,
    };
    let settings = match Settings::load(cli.config.as_deref(), &overrides) {
        Ok(settings) => settings,
        Err(message) => {
            eprintln!("engram: {message}");
            return ExitCode::from(2);
        }
    };
    // Declared before the runtime so it drops after it, flushing the spans still buffered.
    let _telemetry = match engram_server::telemetry::init(settings.log_format) {
        Ok(guard) => guard,
        Err(message) => {
            eprintln!("engram: {message}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let outcome = match cli.command.unwrap_or(Command::Serve {
        listen: None,
        allow_unauthenticated: false,
    }) {
        Command::Serve { .. } => runtime.block_on(serve(settings)),
        Command::Migrate { action } => {
            runtime.block_on(migrate(settings, action.unwrap_or(MigrateAction::Up)))
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("engram: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|error| format!("cannot listen on {}: {error}", settings.listen))?;
    server::serve(settings, listener, shutdown_signal())
        .await
        .map_err(|error| error.to_string())
}

async fn migrate(settings: Settings, action: MigrateAction) -> Result<(), String> {
    let db = store::connect(&settings.database_url, 1)
        .await
        .map_err(|error| format!("cannot connect to the database: {error}"))?;
    let result = match action {
        MigrateAction::Up => server::apply_migrations(&db).await,
        MigrateAction::Down => migration::migrate_down(&db).await,
        MigrateAction::Status => Migrator::status(&db).await,
    };
    result.map_err(|error| format!("migration failed: {error}"))
}

/// Resolves on SIGINT or SIGTERM (Kubernetes sends SIGTERM before it kills a pod).
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown requested; finishing in-flight requests");
}
