//! Logs, traces and metrics. Traces go to an OTLP/gRPC collector when the standard
//! `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` variables name one; metrics are served for
//! Prometheus on their own port. No span, log line or metric carries memory content,
//! a token or a secret: RPC spans record the method and status, database spans the
//! operation, never the statement's values.

use std::future::Future;
use std::io::IsTerminal;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Libraries whose debug or trace logs quote what they process (the HTML parser logs the
/// text it sanitizes, HTTP/2 and SQL drivers log frames and statements): capped whatever
/// `RUST_LOG` asks, so no memory content or token reaches logs or span events.
const PAYLOAD_LOGGING_TARGETS: [&str; 7] = [
    "html5ever=off",
    "markup5ever=off",
    "ammonia=off",
    "h2=info",
    "hyper=info",
    "tonic=info",
    "sqlx=warn",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flushes buffered spans when dropped; keep it alive for the life of the process.
pub struct TelemetryGuard {
    tracer_provider: Option<SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.tracer_provider.take()
            && let Err(error) = provider.shutdown()
        {
            eprintln!("engram: flushing traces failed: {error}");
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filtering (default `info`), text or JSON
/// logs on stderr, and the OpenTelemetry layer when an OTLP endpoint is configured.
pub fn init(log_format: LogFormat) -> Result<TelemetryGuard, String> {
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let mut filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    for directive in PAYLOAD_LOGGING_TARGETS {
        filter = filter.add_directive(directive.parse().expect("a valid directive"));
    }
    let logs = match log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let tracer_provider = otlp_configured().then(tracer_provider).transpose()?;
    let traces = tracer_provider
        .as_ref()
        .map(|provider| tracing_opentelemetry::layer().with_tracer(provider.tracer("engram")));
    tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(traces)
        .try_init()
        .map_err(|error| format!("cannot install logging: {error}"))?;
    Ok(TelemetryGuard { tracer_provider })
}

fn otlp_configured() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED")
        .is_ok_and(|value| value.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|value| value == "none");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// The SDK's batch processor exports from a plain thread; the tonic exporter needs a Tokio
/// reactor, so it runs on a small runtime of its own.
fn tracer_provider() -> Result<SdkTracerProvider, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the trace exporter runtime: {error}"))?;
    let exporter = {
        let _context = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
            .map_err(|error| format!("invalid OTLP exporter settings: {error}"))?
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service_name())
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(ExporterOnOwnRuntime { exporter, runtime })
        .with_resource(resource)
        .build())
}

/// `OTEL_SERVICE_NAME`, or `engram`.
fn service_name() -> String {
    std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "engram".to_owned())
}

#[derive(Debug)]
struct ExporterOnOwnRuntime {
    exporter: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Runtime,
}

impl SpanExporter for ExporterOnOwnRuntime {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        // Called from the batch processor's own thread, never from inside a runtime.
        std::future::ready(self.runtime.block_on(self.exporter.export(batch)))
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.exporter.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.exporter.set_resource(resource);
    }
}

/// Serves Prometheus metrics at `http://ADDRESS/metrics`.
pub fn serve_metrics(address: std::net::SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(address)
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ])
        .map_err(|error| format!("invalid metric buckets: {error}"))?
        .install()
        .map_err(|error| format!("cannot serve metrics on {address}: {error}"))
}

/// A tower layer giving every gRPC call a span (parented by the caller's W3C
/// `traceparent`) and the request, error and latency metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct RpcObservabilityLayer;

impl<S> tower::Layer<S> for RpcObservabilityLayer {
    type Service = RpcObservability<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcObservability { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcObservability<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, RequestBody, ResponseBody> tower::Service<http::Request<RequestBody>>
    for RpcObservability<S>
where
    S: tower::Service<http::Request<RequestBody>, Response = http::Response<ResponseBody>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, context: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(context)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let path = request.uri().path().trim_start_matches('/').to_owned();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        let span = tracing::info_span!(
            "grpc.request",
            otel.name = %path,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);
        let started = Instant::now();
        let response = self.inner.call(request);
        let recorded = span.clone();
        Box::pin(
            async move {
                let response = response.await;
                // Unary errors come trailers-only, with grpc-status in the headers; a
                // response without it carries OK in its trailers.
                let code = match &response {
                    Ok(response) => response
                        .headers()
                        .get("grpc-status")
                        .and_then(|value| value.to_str().ok())
                        .and_then(|value| value.parse::<i32>().ok())
                        .unwrap_or(0),
                    Err(_) => tonic::Code::Unknown as i32,
                };
                recorded.record("rpc.grpc.status_code", code);
                let code_name = format!("{:?}", tonic::Code::from_i32(code));
                metrics::counter!("engram_grpc_requests_total", "method" => path.clone(), "code" => code_name).increment(1);
                if code != 0 {
                    metrics::counter!("engram_grpc_errors_total", "method" => path.clone()).increment(1);
                }
                metrics::histogram!("engram_grpc_request_duration_seconds", "method" => path)
                    .record(started.elapsed().as_secs_f64());
                response
            }
            .instrument(span),
        )
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|key| key.as_str()).collect()
    }
}
