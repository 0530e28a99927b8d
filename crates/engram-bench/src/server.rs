//! The server under test: spawned from the built `engram` binary or already running, its
//! memory read from /proc, its database recreated for a clean run.

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use sea_orm::{ConnectionTrait, Database};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

pub type Failure = Box<dyn std::error::Error + Send + Sync>;

/// An `engram serve` process of the bench's own; killed when dropped.
pub struct SpawnedServer {
    child: Child,
    pub address: SocketAddr,
}

impl SpawnedServer {
    /// Starts `engram serve` on a free loopback port and waits for its `engram serving` line.
    pub fn start(
        binary: &Path,
        database_url: &str,
        env: &[(String, String)],
    ) -> Result<Self, Failure> {
        let mut child = Command::new(binary)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--database-url",
                database_url,
            ])
            .env("RUST_LOG", "warn,engram_server=info")
            .envs(env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| format!("cannot start {}: {error}", binary.display()))?;
        let stderr = child.stderr.take().expect("piped stderr");
        let (found, address) = std::sync::mpsc::channel();
        // Keeps draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("engram serving")
                    && let Some(at) = line.split("address=").nth(1)
                {
                    let at = at
                        .trim_matches('"')
                        .split_whitespace()
                        .next()
                        .unwrap_or_default();
                    let _ = found.send(at.to_owned());
                } else if line.contains("WARN") || line.contains("ERROR") {
                    eprintln!("server: {line}");
                }
            }
        });
        let address = match address.recv_timeout(Duration::from_secs(120)) {
            Ok(address) => address.parse()?,
            Err(_) => {
                let _ = child.kill();
                return Err("the server did not report its address within 120 s".into());
            }
        };
        Ok(Self { child, address })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for SpawnedServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Opens `count` HTTP/2 connections, each its own TCP connection.
pub async fn connect(address: SocketAddr, count: usize) -> Result<Vec<Channel>, Failure> {
    let endpoint = Channel::from_shared(format!("http://{address}"))?;
    let mut channels = Vec::with_capacity(count);
    for _ in 0..count {
        channels.push(endpoint.connect().await?);
    }
    Ok(channels)
}

/// Waits until readiness is SERVING (the schema is migrated and the database answers).
pub async fn wait_ready(channel: &Channel) -> Result<(), Failure> {
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..600 {
        let ready = health
            .check(HealthCheckRequest {
                service: "readiness".to_owned(),
            })
            .await
            .is_ok_and(|reply| reply.into_inner().status == ServingStatus::Serving as i32);
        if ready {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err("the server did not become ready within 60 s".into())
}

/// Resident memory of a process from /proc: (now, peak) in MiB.
pub fn resident_mib(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .map(|kib| kib / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Ticks a second in /proc (USER_HZ: 100 in Linux's user ABI on x86 and ARM).
const TICKS_A_SECOND: f64 = 100.0;

/// CPU time (user and system, all threads) of a process from /proc, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    cpu_ticks(&stat).map(|ticks| ticks as f64 / TICKS_A_SECOND)
}

/// utime + stime of a /proc/PID/stat line; the command name before them is in parentheses
/// and may hold spaces and parentheses itself.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(user + system)
}

/// Time of all the machine's cores from /proc/stat, in ticks: how much of it they idled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CoreTicks {
    /// Idle, waiting for I/O included.
    pub idle: u64,
    pub all: u64,
}

impl CoreTicks {
    pub fn now() -> Option<Self> {
        core_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    pub fn since(self, earlier: Self) -> Self {
        Self {
            idle: self.idle.saturating_sub(earlier.idle),
            all: self.all.saturating_sub(earlier.all),
        }
    }

    pub fn add(self, other: Self) -> Self {
        Self {
            idle: self.idle + other.idle,
            all: self.all + other.all,
        }
    }

    /// Share of the time the cores idled.
    pub fn idle_share(self) -> Option<f64> {
        (self.all > 0).then(|| self.idle as f64 / self.all as f64)
    }

    /// Seconds the cores were busy, every process's work together.
    pub fn busy_seconds(self) -> f64 {
        self.all.saturating_sub(self.idle) as f64 / TICKS_A_SECOND
    }
}

/// The first line of /proc/stat: user, nice, system, idle, iowait, irq, softirq and steal
/// ticks of all cores together (the guest fields after them are already counted in user).
fn core_ticks(stat: &str) -> Option<CoreTicks> {
    let fields = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = fields
        .split_whitespace()
        .take(8)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    Some(CoreTicks {
        idle: ticks.get(3)? + ticks.get(4)?,
        all: ticks.iter().sum(),
    })
}

/// The 1-minute load average, to set beside every figure.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".to_owned())
}

/// Starts from an empty database: removes a SQLite file (and its WAL), or drops and creates
/// a PostgreSQL database through the server's `postgres` database.
pub async fn recreate_database(url: &str) -> Result<(), Failure> {
    if let Some(path) = sqlite_path(url) {
        for suffix in ["", "-wal", "-shm"] {
            let file = format!("{path}{suffix}");
            match std::fs::remove_file(&file) {
                Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                    return Err(format!("cannot remove {file}: {error}").into());
                }
                _ => {}
            }
        }
        return Ok(());
    }
    let (server, name) = url
        .split('?')
        .next()
        .and_then(|base| base.rsplit_once('/'))
        .ok_or("a PostgreSQL URL names its database: postgres://USER@HOST:PORT/DATABASE")?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err("the bench database name must be letters, digits and _".into());
    }
    let admin = Database::connect(format!("{server}/postgres")).await?;
    admin
        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .await?;
    admin
        .execute_unprepared(&format!("CREATE DATABASE {name}"))
        .await?;
    Ok(())
}

pub fn sqlite_path(url: &str) -> Option<&str> {
    let path = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    Some(path.split('?').next().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_add_user_and_system_time_after_any_command_name() {
        let stat = "4242 (engram (a b)) S 1 4242 4242 0 -1 4194304 1510 0 0 0 731 96 0 0 20 0 9 0";
        assert_eq!(cpu_ticks(stat), Some(731 + 96));
        assert_eq!(cpu_ticks("4242 (engram) S 1"), None, "too short");
    }

    #[test]
    fn core_ticks_count_iowait_as_idle_and_leave_guest_time_out() {
        let stat = "cpu  100 5 40 800 20 3 2 30 7 0\ncpu0 50 2 20 400 10 1 1 15 3 0\n";
        let ticks = core_ticks(stat).expect("a cpu line");
        assert_eq!(
            ticks,
            CoreTicks {
                idle: 820,
                all: 1000
            }
        );
        let later = CoreTicks {
            idle: 870,
            all: 1200,
        };
        assert_eq!(later.since(ticks).idle_share(), Some(0.25));
        assert_eq!(later.since(ticks).busy_seconds(), 1.5);
        assert_eq!(core_ticks("cpu0 1 2 3 4 5\n"), None, "no all-core line");
        assert_eq!(CoreTicks::default().idle_share(), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        // Busy for 200 ms of wall time: a fixed count of iterations is optimised away in a
        // release build and leaves less than the 10 ms a tick counts.
        let started = std::time::Instant::now();
        let mut spent = 1u64;
        while started.elapsed() < Duration::from_millis(200) {
            spent = std::hint::black_box(spent.wrapping_mul(31) ^ 7);
        }
        let seconds = cpu_seconds(std::process::id()).expect("/proc/self/stat is readable");
        assert!(seconds > 0.0, "{seconds}");
    }
}
