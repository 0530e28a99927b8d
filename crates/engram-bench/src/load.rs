//! Closed-loop load: `concurrency` callers spread over the connections, each sending its next
//! call when the last one answers. Calls that start during the warm-up are not recorded.
//! A scenario alternates with its ceiling in slices, so both see the same machine.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tonic::transport::Channel;

use crate::server::{CoreTicks, cpu_seconds};

/// One call: the connection to use and a serial number that varies the request.
pub type Call = Arc<
    dyn Fn(Channel, u64) -> Pin<Box<dyn Future<Output = Result<(), tonic::Status>> + Send>>
        + Send
        + Sync,
>;

#[derive(Clone, Copy)]
pub struct Shape {
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// The server's process, whose CPU time is read beside the client's.
    pub server_pid: Option<u32>,
}

/// What one scenario measured.
pub struct Measured {
    pub ok: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub seconds: f64,
    /// Latency of successful calls, in microseconds.
    pub latency: Histogram<u64>,
    /// CPU seconds the server and this client used while calls were recorded.
    pub server_cpu: Option<f64>,
    pub client_cpu: Option<f64>,
    /// The machine's core time over the same span, and how much of it idled.
    pub cores: Option<CoreTicks>,
}

/// What a scenario is divided by: the ceiling's calls a second and the machine's CPU a call.
#[derive(Debug, Clone, Copy)]
pub struct Ceiling {
    pub per_second: f64,
    pub cpu_micros: Option<f64>,
}

impl Measured {
    pub fn as_ceiling(&self) -> Ceiling {
        Ceiling {
            per_second: self.per_second(),
            cpu_micros: self.machine_cpu_micros(),
        }
    }

    /// CPU microseconds a call of every process on the machine: the server's, the bench's,
    /// PostgreSQL's, and the little that others run meanwhile.
    pub fn machine_cpu_micros(&self) -> Option<f64> {
        self.cpu_micros_per_call(Some(self.cores?.busy_seconds()))
    }

    /// The largest share of the ceiling this load could reach with every core busy: the
    /// ceiling's machine CPU a call over this load's.
    pub fn cpu_cap(&self, ceiling: &Ceiling) -> Option<f64> {
        Some(ceiling.cpu_micros? / self.machine_cpu_micros()?)
    }

    pub fn per_second(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    pub fn millis_at(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// CPU microseconds per successful call: steadier than calls/s on a machine whose
    /// speed varies from run to run.
    pub fn cpu_micros_per_call(&self, cpu_seconds: Option<f64>) -> Option<f64> {
        cpu_seconds
            .filter(|_| self.ok > 0)
            .map(|seconds| seconds * 1e6 / self.ok as f64)
    }

    /// Adds another slice of the same load.
    pub fn add(&mut self, other: Measured) {
        let sum = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.seconds += other.seconds;
        self.latency
            .add(&other.latency)
            .expect("same histogram bounds");
        self.ok = self.latency.len();
        self.server_cpu = sum(self.server_cpu, other.server_cpu);
        self.client_cpu = sum(self.client_cpu, other.client_cpu);
        self.cores = self.cores.zip(other.cores).map(|(a, b)| a.add(b));
    }
}

/// Warm-up of every slice but a scenario's first: time for what the other load left behind
/// (a checkpoint round after stores, an access flush after retrievals) to pass.
const SLICE_WARMUP: Duration = Duration::from_secs(1);

/// `call`, then `ceiling`, in turn, `slices` times, sharing `shape.duration` between a load's
/// slices. This machine's speed drifts by tens of percent within a minute; alternating every
/// few seconds lets a scenario and the ceiling it is divided by see the same drift.
pub async fn alternate(
    channels: &[Channel],
    shape: &Shape,
    call: Call,
    ceiling: Call,
    slices: u32,
) -> (Measured, Measured) {
    let slices = slices.max(1);
    let slice = Shape {
        warmup: SLICE_WARMUP,
        duration: shape.duration / slices,
        ..*shape
    };
    let first = Shape {
        warmup: shape.warmup,
        ..slice
    };
    let mut measured = run(channels, &first, call.clone(), 0).await;
    let mut beside = run(channels, &slice, ceiling.clone(), 0).await;
    for index in 1..slices {
        let first_caller = u64::from(index) * shape.concurrency as u64;
        measured.add(run(channels, &slice, call.clone(), first_caller).await);
        beside.add(run(channels, &slice, ceiling.clone(), first_caller).await);
    }
    (measured, beside)
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Callers are numbered across a load's slices (`first_caller` is the slice's first) and each
/// counts its serials from its number times 2^32, so no two calls of a load share a serial: a
/// slice of stores sends new facts, not the ones of the slice before it again as duplicates.
async fn run(channels: &[Channel], shape: &Shape, call: Call, first_caller: u64) -> Measured {
    let started = Instant::now();
    let recording_from = started + shape.warmup;
    let until = recording_from + shape.duration;
    let cpu = tokio::spawn(cpu_used_between(recording_from, until, shape.server_pid));
    let callers: Vec<_> = (0..shape.concurrency)
        .map(|caller| {
            let channel = channels[caller % channels.len()].clone();
            let call = call.clone();
            tokio::spawn(async move {
                let mut latency = histogram();
                let (mut errors, mut first_error) = (0u64, None);
                let mut serial = (first_caller + caller as u64) << 32;
                loop {
                    let sent = Instant::now();
                    if sent >= until {
                        break;
                    }
                    serial += 1;
                    let outcome = call(channel.clone(), serial).await;
                    let answered = Instant::now();
                    if sent < recording_from || answered > until {
                        continue;
                    }
                    match outcome {
                        Ok(()) => {
                            let micros = answered.duration_since(sent).as_micros() as u64;
                            latency.saturating_record(micros.max(1));
                        }
                        Err(status) => {
                            errors += 1;
                            first_error.get_or_insert_with(|| {
                                format!("{:?}: {}", status.code(), status.message())
                            });
                        }
                    }
                }
                (latency, errors, first_error)
            })
        })
        .collect();
    let mut measured = Measured {
        ok: 0,
        errors: 0,
        first_error: None,
        seconds: shape.duration.as_secs_f64(),
        latency: histogram(),
        server_cpu: None,
        client_cpu: None,
        cores: None,
    };
    for caller in callers {
        let (latency, errors, first_error) = caller.await.expect("caller task");
        measured
            .latency
            .add(&latency)
            .expect("same histogram bounds");
        measured.errors += errors;
        if measured.first_error.is_none() {
            measured.first_error = first_error;
        }
    }
    measured.ok = measured.latency.len();
    (measured.server_cpu, measured.client_cpu, measured.cores) =
        cpu.await.expect("CPU sampler task");
    measured
}

/// CPU seconds of the server and of this process between two instants, and the machine's
/// core time meanwhile.
async fn cpu_used_between(
    from: Instant,
    until: Instant,
    server: Option<u32>,
) -> (Option<f64>, Option<f64>, Option<CoreTicks>) {
    let client = std::process::id();
    let sample = || {
        (
            server.and_then(cpu_seconds),
            cpu_seconds(client),
            CoreTicks::now(),
        )
    };
    tokio::time::sleep_until(from.into()).await;
    let before = sample();
    tokio::time::sleep_until(until.into()).await;
    let after = sample();
    let used = |before: Option<f64>, after: Option<f64>| Some(after? - before?);
    (
        used(before.0, after.0),
        used(before.1, after.1),
        after
            .2
            .zip(before.2)
            .map(|(after, before)| after.since(before)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(latencies: &[u64], seconds: f64, server_cpu: Option<f64>) -> Measured {
        let mut latency = histogram();
        for &micros in latencies {
            latency.record(micros).expect("in bounds");
        }
        Measured {
            ok: latency.len(),
            errors: 1,
            first_error: None,
            seconds,
            latency,
            server_cpu,
            client_cpu: Some(seconds),
            cores: Some(CoreTicks { idle: 10, all: 100 }),
        }
    }

    #[test]
    fn slices_add_up_to_one_measurement() {
        let mut measured = slice(&[100, 200], 2.0, Some(0.5));
        measured.add(Measured {
            first_error: Some("Unavailable: gone".to_owned()),
            ..slice(&[300, 400, 500, 600], 4.0, Some(1.0))
        });
        assert_eq!(measured.ok, 6);
        assert_eq!(measured.errors, 2);
        assert_eq!(measured.per_second(), 1.0);
        assert_eq!(measured.latency.max(), 600);
        assert_eq!(
            measured.cpu_micros_per_call(measured.server_cpu),
            Some(250_000.0)
        );
        assert_eq!(measured.client_cpu, Some(6.0));
        assert_eq!(measured.first_error.as_deref(), Some("Unavailable: gone"));
        assert_eq!(measured.cores, Some(CoreTicks { idle: 20, all: 200 }));
    }

    #[test]
    fn the_cpu_cap_is_the_ceiling_machine_cpu_a_call_over_the_load_s() {
        // 8 calls while the cores were busy 90 of 100 ticks: 0.9 s, 112.5 ms a call.
        let store = slice(&[100, 200, 300, 400, 500, 600, 700, 800], 2.0, Some(0.5));
        assert_eq!(store.machine_cpu_micros(), Some(112_500.0));
        let ceiling = Ceiling {
            per_second: 40.0,
            cpu_micros: Some(22_500.0),
        };
        assert_eq!(store.cpu_cap(&ceiling), Some(0.2));
        let unknown = Ceiling {
            cpu_micros: None,
            ..ceiling
        };
        assert_eq!(store.cpu_cap(&unknown), None);
        assert_eq!(store.cpu_cap(&store.as_ceiling()), Some(1.0));
    }

    #[tokio::test]
    async fn no_two_calls_of_a_load_share_a_serial_across_its_slices() {
        let recording = |sent: Arc<std::sync::Mutex<Vec<u64>>>| -> Call {
            Arc::new(move |_, serial| {
                sent.lock().unwrap().push(serial);
                Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    Ok(())
                })
            })
        };
        let sent = Arc::default();
        let (call, ceiling) = (recording(Arc::clone(&sent)), recording(Arc::default()));
        let unused = tonic::transport::Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let shape = Shape {
            concurrency: 3,
            warmup: Duration::ZERO,
            duration: Duration::from_millis(300),
            server_pid: None,
        };

        let (measured, _) = alternate(&[unused], &shape, call, ceiling, 3).await;

        let mut serials = sent.lock().unwrap().clone();
        let calls = serials.len();
        serials.sort_unstable();
        serials.dedup();
        assert!(measured.ok > 0 && calls > 3 * 3);
        assert_eq!(serials.len(), calls, "a slice repeated serials of another");
    }

    #[test]
    fn cpu_unknown_in_one_slice_is_unknown_for_all() {
        let mut measured = slice(&[100], 1.0, Some(0.5));
        measured.add(Measured {
            cores: None,
            ..slice(&[100], 1.0, None)
        });
        assert_eq!(measured.server_cpu, None);
        assert_eq!(measured.cores, None);
        assert_eq!(measured.machine_cpu_micros(), None);
        assert_eq!(measured.cpu_micros_per_call(measured.server_cpu), None);
    }
}
