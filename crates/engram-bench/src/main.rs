//! engram-bench: drives a running Engram (or one it spawns) with realistic MemoryService
//! calls and reports, per RPC, throughput, p50/p99/p999 latency and the ratio to the gRPC
//! ceiling: grpc.health.v1 Health/Check on the same server, connections and concurrency, in
//! slices that alternate with each scenario's.
//!
//!     cargo build --release -p engram-server -p engram-bench
//!     target/release/engram-bench --spawn-server --recreate-database \
//!         --database-url 'sqlite:///tmp/engram-bench/engram.db?mode=rwc'

mod load;
mod seed;
mod server;
mod workload;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use engram_proto::memory::v1 as pb;
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use load::{Call, Ceiling, Measured, Shape};
use server::{Failure, SpawnedServer};
use workload::Random;

#[derive(Parser)]
#[command(
    name = "engram-bench",
    about = "Load generator for Engram's MemoryService, measured against the gRPC ceiling"
)]
struct Cli {
    /// Address of a running server (loopback only), e.g. 127.0.0.1:50051.
    #[arg(long, conflicts_with = "spawn_server")]
    target: Option<SocketAddr>,
    /// Start `engram serve` on a free loopback port for the run (needs --database-url).
    #[arg(long, requires = "database_url")]
    spawn_server: bool,
    /// The engram binary to spawn; defaults to `engram` beside this binary.
    #[arg(long)]
    engram_bin: Option<PathBuf>,
    /// The server's database: for --spawn-server, for --recreate-database and for seeding
    /// the million-memory table (the scale scenario).
    #[arg(long)]
    database_url: Option<String>,
    /// Empty the database first: delete the SQLite file, or drop and create the PostgreSQL database.
    #[arg(long, requires = "database_url")]
    recreate_database: bool,
    /// Extra environment of the spawned server, KEY=VALUE (repeatable).
    #[arg(long = "server-env", value_parser = key_value)]
    server_env: Vec<(String, String)>,
    /// PID of a running server, to read its resident memory from /proc.
    #[arg(long)]
    server_pid: Option<u32>,
    /// HTTP/2 connections (each its own TCP connection).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Calls in flight at once, spread over the connections.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Seconds of load before recording starts, per scenario.
    #[arg(long, default_value_t = 3)]
    warmup_seconds: u64,
    /// Seconds recorded per scenario, and as many of the ceiling beside it.
    #[arg(long, default_value_t = 10)]
    duration_seconds: u64,
    /// Slices of each scenario, each followed by a slice of the ceiling (1 s of warm-up each).
    #[arg(long, default_value_t = 5)]
    slices: u32,
    /// Scenarios to run, in this order.
    #[arg(long, value_delimiter = ',', default_values_t = [Scenario::Retrieve, Scenario::Store, Scenario::Scale])]
    scenarios: Vec<Scenario>,
    /// Sessions the StoreMemory load spreads over.
    #[arg(long, default_value_t = 10_000)]
    store_sessions: u64,
    /// Sessions of 100 memories each that RetrieveMemories reads (10 make 1,000 memories).
    #[arg(long, default_value_t = 10)]
    retrieve_sessions: u64,
    /// Memories in the table for the scale scenario's second RetrieveMemories measurement.
    #[arg(long, default_value_t = 1_000_000)]
    scale_total: u64,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// StoreMemory over many sessions: new facts, repeated facts, markup, metadata.
    Store,
    /// RetrieveMemories: top 10 of 100 memories a session, access tracking on.
    Retrieve,
    /// RetrieveMemories again once the table holds --scale-total memories (seeded by SQL).
    Scale,
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scenario::Store => "store",
            Scenario::Retrieve => "retrieve",
            Scenario::Scale => "scale",
        })
    }
}

fn key_value(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// Memories in each retrieval session: a full session at the default cap.
const MEMORIES_PER_RETRIEVE_SESSION: u64 = 100;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two workers: the client shares the machine with the server, as an agent back end would.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("engram-bench: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    if let (Some(url), true) = (&cli.database_url, cli.recreate_database) {
        server::recreate_database(url).await?;
    }
    let spawned = if cli.spawn_server {
        let binary = match &cli.engram_bin {
            Some(binary) => binary.clone(),
            None => std::env::current_exe()?.with_file_name("engram"),
        };
        let url = cli.database_url.as_deref().expect("required by clap");
        Some(SpawnedServer::start(&binary, url, &cli.server_env)?)
    } else {
        None
    };
    let address = match (&spawned, cli.target) {
        (Some(server), _) => server.address,
        (None, Some(target)) => target,
        (None, None) => return Err("give --target ADDRESS or --spawn-server".into()),
    };
    if !address.ip().is_loopback() {
        return Err("only loopback addresses may be load-tested".into());
    }
    let pid = spawned.as_ref().map(SpawnedServer::pid).or(cli.server_pid);
    let channels = server::connect(address, cli.connections.max(1)).await?;
    server::wait_ready(&channels[0]).await?;

    let shape = Shape {
        concurrency: cli.concurrency.max(1),
        warmup: Duration::from_secs(cli.warmup_seconds),
        duration: Duration::from_secs(cli.duration_seconds),
        server_pid: pid,
    };
    // Sessions of this run only, so a reused database does not skew the retrieval sessions.
    let prefix = format!("bench{}", std::process::id());
    println!(
        "engram-bench: server {address}, {} connections, {} in flight, {} s warm-up + {} s per scenario",
        channels.len(),
        shape.concurrency,
        cli.warmup_seconds,
        cli.duration_seconds
    );
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model()
    );
    let wants = |scenario| cli.scenarios.contains(&scenario);
    if wants(Scenario::Retrieve) || wants(Scenario::Scale) {
        seed_retrieval_sessions(&channels, &prefix, cli.retrieve_sessions).await?;
    }

    let mut report = Report::new(pid);
    let mut ceilings: Option<Measured> = None;
    let mut measure = async |call: Call| {
        let (measured, ceiling) =
            load::alternate(&channels, &shape, call, health_check(), cli.slices).await;
        let beside = ceiling.as_ceiling();
        match &mut ceilings {
            Some(all) => all.add(ceiling),
            None => ceilings = Some(ceiling),
        }
        (measured, beside)
    };
    let retrieve = retrieve_call(&prefix, cli.retrieve_sessions);
    let mut retrieve_small = None;
    for scenario in &cli.scenarios {
        match scenario {
            Scenario::Retrieve => {
                let rows = table_size(cli.database_url.as_deref()).await;
                let (measured, ceiling) = measure(retrieve.clone()).await;
                report.line("RetrieveMemories", &measured, &ceiling, rows);
                retrieve_small = Some((measured.millis_at(0.5), rows));
            }
            Scenario::Store => {
                let (measured, ceiling) =
                    measure(store_call(prefix.clone(), cli.store_sessions)).await;
                report.line("StoreMemory", &measured, &ceiling, None);
            }
            Scenario::Scale => {
                let url = cli
                    .database_url
                    .as_deref()
                    .ok_or("the scale scenario seeds through --database-url")?;
                let started = std::time::Instant::now();
                let added = seed::fill_to(url, cli.scale_total).await?;
                println!(
                    "seeded {added} filler memories by SQL in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                let rows = table_size(Some(url)).await;
                let (measured, ceiling) = measure(retrieve.clone()).await;
                report.line("RetrieveMemories (scaled)", &measured, &ceiling, rows);
                if let Some((small_p50, small_rows)) = retrieve_small {
                    println!(
                        "RetrieveMemories p50: {small_p50:.3} ms at {} memories, {:.3} ms at {} memories: {:.2} x",
                        small_rows.map_or("?".to_owned(), |n| n.to_string()),
                        measured.millis_at(0.5),
                        rows.map_or("?".to_owned(), |n| n.to_string()),
                        measured.millis_at(0.5) / small_p50
                    );
                }
            }
        }
    }
    if let Some(all) = ceilings {
        report.line("Health/Check (ceiling)", &all, &all.as_ceiling(), None);
    }
    report.memory();
    Ok(())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned())
}

async fn table_size(url: Option<&str>) -> Option<u64> {
    let db = sea_orm::Database::connect(url?).await.ok()?;
    seed::count(&db).await.ok()
}

/// Fills the retrieval sessions with 100 memories each, a batch per session.
async fn seed_retrieval_sessions(
    channels: &[Channel],
    prefix: &str,
    sessions: u64,
) -> Result<(), Failure> {
    let mut client = MemoryServiceClient::new(channels[0].clone());
    let mut random = Random::new(7);
    for session in 0..sessions {
        let parent = workload::session_name(&format!("{prefix}-recall"), session);
        client
            .batch_store_memories(workload::seed_batch(
                &mut random,
                parent,
                MEMORIES_PER_RETRIEVE_SESSION,
            ))
            .await?;
    }
    Ok(())
}

fn health_check() -> Call {
    Arc::new(|channel, _| {
        Box::pin(async move {
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map(drop)
        })
    })
}

fn store_call(prefix: String, sessions: u64) -> Call {
    Arc::new(move |channel, serial| {
        let request = workload::store_request(&mut Random::new(serial), &prefix, sessions, serial);
        Box::pin(async move {
            MemoryServiceClient::new(channel)
                .store_memory(request)
                .await
                .map(drop)
        })
    })
}

fn retrieve_call(prefix: &str, sessions: u64) -> Call {
    let prefix = format!("{prefix}-recall");
    Arc::new(move |channel, serial| {
        let request = pb::RetrieveMemoriesRequest {
            parent: workload::session_name(&prefix, Random::new(serial).below(sessions)),
            page_size: 10,
            ..Default::default()
        };
        Box::pin(async move {
            let reply = MemoryServiceClient::new(channel)
                .retrieve_memories(request)
                .await?;
            if reply.get_ref().memories.len() == 10 {
                Ok(())
            } else {
                Err(tonic::Status::data_loss("fewer than 10 memories retrieved"))
            }
        })
    })
}

/// The printed table: one line per scenario with the ceiling measured beside it, the share
/// of the ceiling its CPU a call allows, the machine's idle time while it was recorded and
/// the load average when it was printed; last, the ceiling over all its slices.
struct Report {
    pid: Option<u32>,
}

impl Report {
    fn new(pid: Option<u32>) -> Self {
        println!(
            "{:<28} {:>9} {:>7} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>9} {:>7} {:>7} {:>6} {:>5}  memories",
            "rpc",
            "calls/s",
            "x ceil",
            "cpu cap",
            "ceil/s",
            "p50 ms",
            "p99 ms",
            "p999 ms",
            "errors",
            "rss MiB",
            "srv us",
            "cli us",
            "idle %",
            "load"
        );
        Self { pid }
    }

    fn line(&mut self, name: &str, measured: &Measured, ceiling: &Ceiling, rows: Option<u64>) {
        let rss = self
            .pid
            .and_then(server::resident_mib)
            .map_or("?".to_owned(), |(now, _)| format!("{now:.0}"));
        let cpu = |seconds| {
            measured
                .cpu_micros_per_call(seconds)
                .map_or("?".to_owned(), |micros| format!("{micros:.1}"))
        };
        let (server_cpu, client_cpu) = (cpu(measured.server_cpu), cpu(measured.client_cpu));
        let cap = measured
            .cpu_cap(ceiling)
            .map_or("?".to_owned(), |cap| format!("{cap:.3}"));
        let idle = measured
            .cores
            .and_then(|cores| cores.idle_share())
            .map_or("?".to_owned(), |idle| format!("{:.1}", idle * 100.0));
        println!(
            "{name:<28} {:>9.0} {:>7.3} {cap:>7} {:>8.0} {:>8.3} {:>8.3} {:>8.3} {:>7} {rss:>9} {server_cpu:>7} {client_cpu:>7} {idle:>6} {:>5}  {}",
            measured.per_second(),
            measured.per_second() / ceiling.per_second,
            ceiling.per_second,
            measured.millis_at(0.5),
            measured.millis_at(0.99),
            measured.millis_at(0.999),
            measured.errors,
            server::load_average(),
            rows.map_or(String::new(), |n| n.to_string()),
        );
        if let Some(error) = &measured.first_error {
            println!("  first error: {error}");
        }
    }

    fn memory(&self) {
        if let Some((now, peak)) = self.pid.and_then(server::resident_mib) {
            println!("server memory: VmRSS {now:.0} MiB, VmHWM (peak) {peak:.0} MiB");
        }
    }
}
