//! Traces and metrics from the real binary: spans reach an OTLP receiver on loopback with
//! the caller's trace as parent and database spans beneath, /metrics answers, and neither
//! carries memory content or the caller's token.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, EngramProcess, TestDatabase, eventually, memory, store_request};
use engram_proto::memory::v1 as pb;
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN_ID: &str = "00f067aa0ba902b7";
// Words that cannot appear by chance in hex ids or timestamps.
const CONTENT: &str = "The customer's pineapple passphrase is zebraquartz";
const TOKEN: &str = "Bearer token-walrusvelvet";

/// The receiver's Python (scripts/checks/70-telemetry.sh installs it), or
/// ENGRAM_TEST_OTLP_PYTHON.
fn receiver_python() -> PathBuf {
    std::env::var_os("ENGRAM_TEST_OTLP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/otlp/bin/python");
            assert!(
                python.exists(),
                "no OTLP receiver: run scripts/checks/70-telemetry.sh (or scripts/test.sh) first"
            );
            python
        })
}

struct Receiver {
    child: std::process::Child,
    port: u16,
    spans_file: PathBuf,
    _directory: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        use std::io::BufRead;
        let directory = tempfile::tempdir().expect("temp dir");
        let spans_file = directory.path().join("spans.jsonl");
        let mut child = std::process::Command::new(receiver_python())
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/otlp_sink.py"))
            .arg(&spans_file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the OTLP receiver");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("port");
        Self {
            child,
            port: line.trim().parse().expect("receiver port"),
            spans_file,
            _directory: directory,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.spans_file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("span JSON"))
            .collect()
    }

    fn raw(&self) -> String {
        std::fs::read_to_string(&self.spans_file).unwrap_or_default()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn attribute<'a>(span: &'a Value, key: &str) -> Option<&'a Value> {
    span["attributes"]
        .as_array()?
        .iter()
        .find(|attribute| attribute["key"] == key)
        .map(|attribute| &attribute["value"])
}

fn scrape(address: std::net::SocketAddr) -> String {
    let mut stream = std::net::TcpStream::connect(address).expect("metrics port");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spans_and_metrics_describe_calls_without_their_content() {
    let receiver = Receiver::start();
    let database = TestDatabase::create(Backend::Sqlite).await;
    let metrics_address = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("address");
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let metrics_listen = metrics_address.to_string();
    let mut server = EngramProcess::serve(
        database.url(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("ENGRAM_METRICS_LISTEN", &metrics_listen),
            ("RUST_LOG", "debug"),
        ],
    );
    let mut client = server.client().await;
    let mut request = tonic::Request::new(store_request("traced", memory(CONTENT)));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{TRACE_ID}-{CALLER_SPAN_ID}-01")
            .parse()
            .unwrap(),
    );
    request
        .metadata_mut()
        .insert("authorization", TOKEN.parse().unwrap());
    client.store_memory(request).await.expect("store");
    let rejected = client
        .store_memory(store_request("../etc", memory(CONTENT)))
        .await
        .expect_err("bad session");
    assert_eq!(rejected.code(), tonic::Code::InvalidArgument);
    client
        .retrieve_memories(pb::RetrieveMemoriesRequest {
            parent: "sessions/traced".to_owned(),
            ..Default::default()
        })
        .await
        .expect("retrieve");

    let metrics = scrape(metrics_address);
    assert!(metrics.contains("200 OK"), "{metrics}");
    for expected in [
        r#"engram_grpc_requests_total{method="engram.memory.v1.MemoryService/StoreMemory",code="Ok"} 1"#,
        r#"engram_grpc_requests_total{method="engram.memory.v1.MemoryService/StoreMemory",code="InvalidArgument"} 1"#,
        r#"engram_grpc_errors_total{method="engram.memory.v1.MemoryService/StoreMemory"} 1"#,
        "engram_grpc_request_duration_seconds_bucket",
        r#"engram_db_pool_connections{state="idle"}"#,
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected} in:\n{metrics}"
        );
    }

    server.terminate();
    assert!(server.wait(Duration::from_secs(30)).success());
    let exported = eventually(Duration::from_secs(10), || async {
        receiver
            .spans()
            .iter()
            .any(|span| span["name"] == "engram.memory.v1.MemoryService/RetrieveMemories")
    })
    .await;
    assert!(
        exported,
        "spans reach the receiver; engram log:\n{}",
        server.log()
    );

    let spans = receiver.spans();
    let store = spans
        .iter()
        .find(|span| {
            span["name"] == "engram.memory.v1.MemoryService/StoreMemory"
                && span["traceId"] == TRACE_ID
        })
        .expect("the StoreMemory span joins the caller's trace");
    assert_eq!(
        store["parentSpanId"], CALLER_SPAN_ID,
        "its parent is the caller's span"
    );
    assert_eq!(store["kind"], "SPAN_KIND_SERVER");
    assert_eq!(
        attribute(store, "rpc.system").and_then(|v| v["stringValue"].as_str()),
        Some("grpc")
    );
    assert_eq!(
        attribute(store, "rpc.method").and_then(|v| v["stringValue"].as_str()),
        Some("StoreMemory")
    );
    assert_eq!(
        attribute(store, "rpc.grpc.status_code").and_then(|v| v["intValue"].as_str()),
        Some("0")
    );
    assert_eq!(
        store["resource"]["attributes"][0]["value"]["stringValue"]
            .as_str()
            .map(|_| ()),
        Some(())
    );
    // Reads run in the call's own task: their database spans are its children. (Stores are
    // written by the group-commit writer, one transaction for many calls.)
    let retrieve = spans
        .iter()
        .find(|span| span["name"] == "engram.memory.v1.MemoryService/RetrieveMemories")
        .expect("the RetrieveMemories span");
    let database_calls: Vec<&Value> = spans
        .iter()
        .filter(|span| {
            span["parentSpanId"] == retrieve["spanId"] && attribute(span, "db.system").is_some()
        })
        .collect();
    assert!(
        !database_calls.is_empty(),
        "database calls are child spans of the RPC span"
    );
    assert!(
        database_calls
            .iter()
            .all(|span| attribute(span, "db.statement").is_none()),
        "statements are not recorded"
    );

    let everything = receiver.raw() + &server.log();
    for secret in ["pineapple", "zebraquartz", "walrusvelvet"] {
        assert!(
            !everything.contains(secret),
            "{secret:?} leaked into spans or logs:\n{}",
            everything
                .lines()
                .filter(|line| line.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}
