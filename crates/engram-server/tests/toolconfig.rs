//! engram.toolconfig.v1.ToolConfigService end to end. Settings come from the environment,
//! which is global to a process, so every case starts the real `engram` binary with a
//! cleared environment plus what it needs, reads its address from the `engram serving` log
//! line and captures everything it prints: secrets must appear nowhere in it, nor in
//! responses or errors. The Secrets Manager case runs against a local moto server (found
//! through ENGRAM_TEST_MOTO_SERVER or `.tools/moto/bin/moto_server`, which
//! `scripts/checks/40-toolconfig.sh` installs).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use engram_proto::toolconfig::v1 as pb;
use engram_proto::toolconfig::v1::tool_config_service_client::ToolConfigServiceClient;
use serde_json::{Value, json};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// Only guards against a hung process; no assertion depends on timing.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Extra arguments for `engram serve`, e.g. `--config FILE`.
type Args<'a> = &'a [&'a str];

struct Engram {
    child: Child,
    address: SocketAddr,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    _directory: tempfile::TempDir,
}

/// How a start ended: serving, or exited (settings or secrets refused).
enum Started {
    Serving(Engram),
    Exited { code: Option<i32>, output: String },
}

fn start(env: &[(&str, &str)], args: Args) -> Started {
    let directory = tempfile::tempdir().expect("temp dir");
    let database_url = format!(
        "sqlite://{}?mode=rwc",
        directory.path().join("engram.db").display()
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_engram"))
        .env_clear()
        // Debug logs too: a secret must not show up at any level.
        .envs([("RUST_LOG", "debug"), ("NO_COLOR", "1")])
        .envs(env.iter().copied())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--database-url",
            &database_url,
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn engram");
    let output = Arc::new(Mutex::new(String::new()));
    let (lines, received) = mpsc::channel::<String>();
    let readers = vec![
        capture(child.stdout.take().expect("stdout"), &output, lines.clone()),
        capture(child.stderr.take().expect("stderr"), &output, lines),
    ];
    loop {
        match received.recv_timeout(HANG_GUARD) {
            Ok(line) => {
                if let Some(address) = serving_address(&line) {
                    return Started::Serving(Engram {
                        child,
                        address,
                        output,
                        readers,
                        _directory: directory,
                    });
                }
            }
            // Both streams closed: the process is gone.
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait for engram");
                for reader in readers {
                    reader.join().expect("output reader");
                }
                let output = output.lock().expect("output").clone();
                return Started::Exited {
                    code: status.code(),
                    output,
                };
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!(
                    "engram neither served nor exited; output:\n{}",
                    output.lock().expect("output")
                );
            }
        }
    }
}

fn capture(
    stream: impl Read + Send + 'static,
    output: &Arc<Mutex<String>>,
    lines: mpsc::Sender<String>,
) -> JoinHandle<()> {
    let output = Arc::clone(output);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            {
                let mut output = output.lock().expect("output");
                output.push_str(&line);
                output.push('\n');
            }
            let _ = lines.send(line);
        }
    })
}

/// Log lines may carry terminal colours; the address is read from the plain text.
fn strip_ansi(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    plain
}

fn serving_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("engram serving")?..];
    let value = &rest[rest.find("address=")? + "address=".len()..];
    value
        .split_whitespace()
        .next()?
        .trim_matches('"')
        .parse()
        .ok()
}

fn serve(env: &[(&str, &str)], args: Args) -> Engram {
    match start(env, args) {
        Started::Serving(engram) => engram,
        Started::Exited { code, output } => {
            panic!("engram exited with {code:?} instead of serving:\n{output}")
        }
    }
}

/// Starts engram expecting it to refuse to start; returns the error line it printed.
fn refused(env: &[(&str, &str)], args: Args) -> String {
    let (code, output) = match start(env, args) {
        Started::Exited { code, output } => (code, output),
        Started::Serving(engram) => {
            let output = engram.stop();
            panic!("engram served with {env:?} but should have refused:\n{output}")
        }
    };
    assert!(
        matches!(code, Some(code) if code != 0),
        "exit code {code:?}:\n{output}"
    );
    assert!(
        !output.contains("panicked") && !output.to_lowercase().contains("backtrace"),
        "a panic instead of a message:\n{output}"
    );
    let errors: Vec<&str> = output
        .lines()
        .filter(|line| line.starts_with("engram: "))
        .collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{output}");
    errors[0].to_owned()
}

impl Engram {
    async fn client(&self) -> ToolConfigServiceClient<Channel> {
        ToolConfigServiceClient::connect(format!("http://{}", self.address))
            .await
            .expect("connect to engram")
    }

    async fn tools(&self, enabled_only: bool) -> Vec<pb::Tool> {
        self.client()
            .await
            .list_tools(pb::ListToolsRequest { enabled_only })
            .await
            .expect("ListTools")
            .into_inner()
            .tools
    }

    async fn tool(&self, id: &str) -> pb::Tool {
        self.client()
            .await
            .get_tool(pb::GetToolRequest {
                name: format!("tools/{id}"),
            })
            .await
            .expect("GetTool")
            .into_inner()
    }

    /// Stops the process and returns everything it printed.
    fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for reader in self.readers.drain(..) {
            reader.join().expect("output reader");
        }
        self.output.lock().expect("output").clone()
    }
}

/// The tool's config as JSON, numbers as f64 (a Struct holds no integers).
fn config(tool: &pb::Tool) -> Value {
    let config = tool.config.clone().expect("config");
    json_of_struct(config)
}

fn json_of_struct(value: prost_types::Struct) -> Value {
    Value::Object(
        value
            .fields
            .into_iter()
            .map(|(key, value)| (key, json_of_value(value)))
            .collect(),
    )
}

fn json_of_value(value: prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(flag)) => json!(flag),
        Some(Kind::NumberValue(number)) => json!(number),
        Some(Kind::StringValue(text)) => json!(text),
        Some(Kind::ListValue(list)) => list.values.into_iter().map(json_of_value).collect(),
        Some(Kind::StructValue(object)) => json_of_struct(object),
    }
}

/// Expected JSON with every number as f64, to compare with a Struct.
fn floats(value: Value) -> Value {
    match value {
        Value::Number(number) => json!(number.as_f64().expect("number")),
        Value::Array(items) => items.into_iter().map(floats).collect(),
        Value::Object(object) => Value::Object(
            object
                .into_iter()
                .map(|(key, value)| (key, floats(value)))
                .collect(),
        ),
        other => other,
    }
}

fn find<'a>(tools: &'a [pb::Tool], id: &str) -> &'a pb::Tool {
    let name = format!("tools/{id}");
    tools
        .iter()
        .find(|tool| tool.name == name)
        .unwrap_or_else(|| panic!("{name} missing from {tools:?}"))
}

fn assert_hidden(text: &str, secrets: &[&str]) {
    for secret in secrets {
        assert!(
            !text.contains(secret),
            "secret {secret:?} leaked into:\n{text}"
        );
    }
}

fn default_keywords() -> Value {
    json!({"urgent": 1.0, "emergency": 1.0, "complaint": 0.9, "legal": 0.9,
           "lawsuit": 1.0, "manager": 0.8, "supervisor": 0.8})
}

fn default_extensions() -> Value {
    json!([
        ".pdf", ".docx", ".doc", ".txt", ".md", ".csv", ".xlsx", ".xls", ".json", ".xml", ".jpg",
        ".jpeg", ".png"
    ])
}

#[tokio::test]
async fn defaults_follow_the_reference_design() {
    let engram = serve(&[], &[]);
    let tools = engram.tools(false).await;
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "tools/rag",
            "tools/memory",
            "tools/escalation",
            "tools/attachment",
            "tools/crm",
            "tools/billing",
            "tools/inventory"
        ]
    );
    let expected = [
        (
            "rag",
            true,
            json!({"chunk_size": 500, "chunk_overlap": 50, "search_k": 5,
                   "similarity_threshold": 0.7, "cache_enabled": true, "cache_ttl": 3600}),
        ),
        (
            "memory",
            true,
            json!({"max_entries": 100, "ttl_hours": 24, "cleanup_days": 30,
                   "importance_threshold": 0.3}),
        ),
        (
            "escalation",
            true,
            json!({"confidence_threshold": 0.7, "keywords": default_keywords(),
                   "notification_enabled": false, "notification_email": null,
                   "notification_webhook": null}),
        ),
        (
            "attachment",
            true,
            json!({"max_file_size": 10_485_760, "allowed_extensions": default_extensions(),
                   "chunk_for_rag": true, "temp_cleanup_hours": 24}),
        ),
        (
            "crm",
            false,
            json!({"api_endpoint": null, "timeout": 10, "max_retries": 3}),
        ),
        ("billing", false, json!({"api_endpoint": null})),
        ("inventory", false, json!({"api_endpoint": null})),
    ];
    for (id, enabled, expected_config) in expected {
        let tool = find(&tools, id);
        assert_eq!(tool.enabled, enabled, "{id}");
        assert_eq!(config(tool), floats(expected_config), "{id}");
        assert!(!tool.api_key_set, "{id}");
        assert!(tool.warnings.is_empty(), "{id}: {:?}", tool.warnings);
        assert_eq!(&engram.tool(id).await, tool, "GetTool {id}");
    }
    let enabled: Vec<String> = engram
        .tools(true)
        .await
        .into_iter()
        .map(|tool| tool.name)
        .collect();
    assert_eq!(
        enabled,
        [
            "tools/rag",
            "tools/memory",
            "tools/escalation",
            "tools/attachment"
        ]
    );
    engram.stop();
}

#[tokio::test]
async fn every_setting_is_read_from_the_environment() {
    let engram = serve(
        &[
            ("ENABLE_RAG_TOOL", "off"),
            ("ENABLE_MEMORY_TOOL", "0"),
            ("ENABLE_ESCALATION_TOOL", "No"),
            ("ENABLE_ATTACHMENT_TOOL", "FALSE"),
            ("ENABLE_CRM_TOOL", "yes"),
            ("ENABLE_BILLING_TOOL", "1"),
            ("ENABLE_INVENTORY_TOOL", "On"),
            ("RAG_CHUNK_SIZE", "800"),
            ("RAG_CHUNK_OVERLAP", " 100 "),
            // pydantic-settings matches names in any case.
            ("rag_search_k", "7"),
            ("RAG_SIMILARITY_THRESHOLD", "0.55"),
            ("RAG_CACHE_ENABLED", "f"),
            ("RAG_CACHE_TTL", "120"),
            ("MEMORY_MAX_ENTRIES", "250"),
            ("MEMORY_TTL_HOURS", "48"),
            ("MEMORY_CLEANUP_DAYS", "90"),
            ("MEMORY_IMPORTANCE_THRESHOLD", "0.35"),
            ("ESCALATION_CONFIDENCE_THRESHOLD", "0.65"),
            ("ESCALATION_KEYWORDS", "refund=0.5"),
            ("ESCALATION_NOTIFICATION_ENABLED", "t"),
            ("ESCALATION_NOTIFICATION_EMAIL", "oncall@example.com"),
            (
                "ESCALATION_NOTIFICATION_WEBHOOK",
                "https://hooks.example.com/x?a=1",
            ),
            ("ATTACHMENT_MAX_FILE_SIZE", "2048"),
            ("ATTACHMENT_ALLOWED_EXTENSIONS", ".pdf,.txt"),
            ("ATTACHMENT_CHUNK_FOR_RAG", "n"),
            ("ATTACHMENT_TEMP_CLEANUP_HOURS", "6"),
            ("CRM_API_ENDPOINT", "https://crm.example.com"),
            ("CRM_API_KEY", "sk-crm-literal-4f1d"),
            ("CRM_TIMEOUT", "30"),
            ("CRM_MAX_RETRIES", "0"),
            ("BILLING_API_ENDPOINT", "https://billing.example.com"),
            ("BILLING_API_KEY", "sk-billing-literal-9c2e"),
            ("INVENTORY_API_ENDPOINT", "https://inventory.example.com"),
            ("INVENTORY_API_KEY", "sk-inventory-literal-07ab"),
        ],
        &[],
    );
    let tools = engram.tools(false).await;
    let expected = [
        (
            "rag",
            false,
            json!({"chunk_size": 800, "chunk_overlap": 100, "search_k": 7,
                   "similarity_threshold": 0.55, "cache_enabled": false, "cache_ttl": 120}),
        ),
        (
            "memory",
            false,
            json!({"max_entries": 250, "ttl_hours": 48, "cleanup_days": 90,
                   "importance_threshold": 0.35}),
        ),
        (
            "escalation",
            false,
            json!({"confidence_threshold": 0.65, "keywords": {"refund": 0.5},
                   "notification_enabled": true, "notification_email": "oncall@example.com",
                   "notification_webhook": "https://hooks.example.com/x?a=1"}),
        ),
        (
            "attachment",
            false,
            json!({"max_file_size": 2048, "allowed_extensions": [".pdf", ".txt"],
                   "chunk_for_rag": false, "temp_cleanup_hours": 6}),
        ),
        (
            "crm",
            true,
            json!({"api_endpoint": "https://crm.example.com", "timeout": 30, "max_retries": 0}),
        ),
        (
            "billing",
            true,
            json!({"api_endpoint": "https://billing.example.com"}),
        ),
        (
            "inventory",
            true,
            json!({"api_endpoint": "https://inventory.example.com"}),
        ),
    ];
    for (id, enabled, expected_config) in expected {
        let tool = find(&tools, id);
        assert_eq!(tool.enabled, enabled, "{id}");
        assert_eq!(config(tool), floats(expected_config), "{id}");
        assert!(tool.warnings.is_empty(), "{id}: {:?}", tool.warnings);
    }
    for id in ["crm", "billing", "inventory"] {
        assert!(find(&tools, id).api_key_set, "{id}");
    }
    let enabled: Vec<String> = engram
        .tools(true)
        .await
        .into_iter()
        .map(|tool| tool.name)
        .collect();
    assert_eq!(enabled, ["tools/crm", "tools/billing", "tools/inventory"]);
    let secrets = [
        "sk-crm-literal-4f1d",
        "sk-billing-literal-9c2e",
        "sk-inventory-literal-07ab",
    ];
    assert_hidden(&format!("{tools:?}"), &secrets);
    let output = engram.stop();
    assert!(
        output.contains("using a literal secret (development only)"),
        "{output}"
    );
    assert_hidden(&output, &secrets);
}

#[tokio::test]
async fn a_settings_file_is_read_and_the_environment_overrides_it() {
    let directory = tempfile::tempdir().unwrap();
    let file = directory.path().join("engram.toml");
    std::fs::write(
        &file,
        r#"
memory_max_entries = 500
memory_importance_threshold = 0.45

[tools]
enable_crm_tool = true
rag_chunk_size = 1000
rag_similarity_threshold = 1
attachment_allowed_extensions = [".csv", ".json"]
crm_api_endpoint = "https://crm.example.com"
crm_api_key = "sk-crm-from-file-5b7a"
crm_timeout = 20

[tools.escalation_keywords]
breach = 1.0
cancel = 0.75
"#,
    )
    .unwrap();
    let config_file = file.to_str().unwrap();
    let engram = serve(
        &[("RAG_CHUNK_SIZE", "1500"), ("CRM_TIMEOUT", "5")],
        &["--config", config_file],
    );
    let tools = engram.tools(false).await;
    let rag = config(find(&tools, "rag"));
    assert_eq!(rag["chunk_size"], json!(1500.0), "the environment wins");
    assert_eq!(rag["similarity_threshold"], json!(1.0));
    assert_eq!(rag["search_k"], json!(5.0), "defaults fill the rest");
    let memory = config(find(&tools, "memory"));
    assert_eq!(memory["max_entries"], json!(500.0));
    assert_eq!(memory["importance_threshold"], json!(0.45));
    assert_eq!(
        config(find(&tools, "escalation"))["keywords"],
        json!({"breach": 1.0, "cancel": 0.75}),
        "a table replaces the default keywords, it does not extend them"
    );
    assert_eq!(
        config(find(&tools, "attachment"))["allowed_extensions"],
        json!([".csv", ".json"])
    );
    let crm = find(&tools, "crm");
    assert!(crm.enabled && crm.api_key_set && crm.warnings.is_empty());
    assert_eq!(
        config(crm),
        floats(json!({"api_endpoint": "https://crm.example.com", "timeout": 5, "max_retries": 3}))
    );
    assert_hidden(&format!("{tools:?}"), &["sk-crm-from-file-5b7a"]);
    assert_hidden(&engram.stop(), &["sk-crm-from-file-5b7a"]);

    // The reference design's text forms work in the file too, and a bad value names its key.
    std::fs::write(
        &file,
        "[tools]\nescalation_keywords = \"fraud=1,chargeback\"\nattachment_allowed_extensions = \".zip, .tar\"\n",
    )
    .unwrap();
    let engram = serve(&[], &["--config", config_file]);
    let escalation = config(&engram.tool("escalation").await);
    assert_eq!(
        escalation["keywords"],
        json!({"fraud": 1.0, "chargeback": 0.8})
    );
    let attachment = config(&engram.tool("attachment").await);
    assert_eq!(attachment["allowed_extensions"], json!([".zip", ".tar"]));
    engram.stop();

    std::fs::write(
        &file,
        "[tools]\nrag_search_k = \"many\"\nrag_chunk_sise = 3\n",
    )
    .unwrap();
    let error = refused(&[], &["--config", config_file]);
    assert!(
        error.contains("tools.rag_chunk_sise") && error.contains("unknown setting"),
        "{error}"
    );
    std::fs::write(&file, "[tools]\nrag_search_k = \"many\"\n").unwrap();
    let error = refused(&[], &["--config", config_file]);
    for part in ["RAG_SEARCH_K", "\"many\"", "between 1 and 20", "TOML file"] {
        assert!(error.contains(part), "{part} missing from: {error}");
    }
    // A syntax error keeps its position but never quotes the line: it may hold a key.
    std::fs::write(&file, "[tools]\ncrm_api_key = \"sk-unterminated-8d3c\n").unwrap();
    let error = refused(&[], &["--config", config_file]);
    assert!(error.contains("line 2"), "{error}");
    assert_hidden(&error, &["sk-unterminated-8d3c"]);
    std::fs::write(&file, "[tools]\ncrm_api_key = 31337\n").unwrap();
    let error = refused(&[], &["--config", config_file]);
    assert!(
        error.contains("CRM_API_KEY") && error.contains("must be a string"),
        "{error}"
    );
    assert_hidden(&error, &["31337"]);
}

/// The reference design's bounds and a value just outside each:
/// (variable, minimum, below it, maximum and above it if there is one).
type Bounds = (
    &'static str,
    &'static str,
    &'static str,
    Option<(&'static str, &'static str)>,
);

const BOUNDS: [Bounds; 14] = [
    ("RAG_CHUNK_SIZE", "100", "99", Some(("2000", "2001"))),
    ("RAG_CHUNK_OVERLAP", "0", "-1", Some(("500", "501"))),
    ("RAG_SEARCH_K", "1", "0", Some(("20", "21"))),
    (
        "RAG_SIMILARITY_THRESHOLD",
        "0",
        "-0.01",
        Some(("1", "1.01")),
    ),
    ("RAG_CACHE_TTL", "60", "59", None),
    ("MEMORY_MAX_ENTRIES", "10", "9", Some(("1000", "1001"))),
    ("MEMORY_TTL_HOURS", "1", "0", Some(("720", "721"))),
    ("MEMORY_CLEANUP_DAYS", "1", "0", Some(("365", "366"))),
    (
        "MEMORY_IMPORTANCE_THRESHOLD",
        "0",
        "-0.01",
        Some(("1", "1.01")),
    ),
    (
        "ESCALATION_CONFIDENCE_THRESHOLD",
        "0",
        "-0.01",
        Some(("1", "1.01")),
    ),
    ("ATTACHMENT_MAX_FILE_SIZE", "1024", "1023", None),
    ("ATTACHMENT_TEMP_CLEANUP_HOURS", "1", "0", None),
    ("CRM_TIMEOUT", "1", "0", None),
    ("CRM_MAX_RETRIES", "0", "-1", None),
];

#[tokio::test]
async fn bounds_follow_the_reference_design() {
    for (variable, min, below, max) in BOUNDS {
        let bound = match max {
            Some((max, _)) => format!("between {min} and {max}"),
            None => format!("at least {min}"),
        };
        let outside = std::iter::once(below).chain(max.map(|(_, above)| above));
        for value in outside {
            let error = refused(&[(variable, value)], &[]);
            for part in [variable, value, bound.as_str()] {
                assert!(error.contains(part), "{part} missing from: {error}");
            }
        }
    }
    // The bounds themselves are accepted.
    let at_min: Vec<(&str, &str)> = BOUNDS.iter().map(|(v, min, _, _)| (*v, *min)).collect();
    let engram = serve(&at_min, &[]);
    let tools = engram.tools(false).await;
    assert_eq!(config(find(&tools, "rag"))["chunk_size"], json!(100.0));
    assert_eq!(config(find(&tools, "rag"))["cache_ttl"], json!(60.0));
    assert_eq!(config(find(&tools, "crm"))["max_retries"], json!(0.0));
    assert_eq!(
        config(find(&tools, "memory"))["importance_threshold"],
        json!(0.0)
    );
    assert_eq!(
        config(find(&tools, "attachment"))["max_file_size"],
        json!(1024.0)
    );
    engram.stop();
    let at_max: Vec<(&str, &str)> = BOUNDS
        .iter()
        .filter_map(|(v, _, _, max)| Some((*v, max.as_ref()?.0)))
        .collect();
    let engram = serve(&at_max, &[]);
    let tools = engram.tools(false).await;
    assert_eq!(config(find(&tools, "rag"))["chunk_size"], json!(2000.0));
    assert_eq!(config(find(&tools, "rag"))["chunk_overlap"], json!(500.0));
    assert_eq!(config(find(&tools, "memory"))["ttl_hours"], json!(720.0));
    assert_eq!(
        config(find(&tools, "escalation"))["confidence_threshold"],
        json!(1.0)
    );
    engram.stop();
}

#[tokio::test]
async fn malformed_values_stop_start_up_with_one_clear_line() {
    let cases = [
        (
            "RAG_CHUNK_SIZE",
            "abc",
            "must be an integer between 100 and 2000",
        ),
        ("CRM_TIMEOUT", "1.5", "must be an integer at least 1"),
        (
            "RAG_SIMILARITY_THRESHOLD",
            "high",
            "must be a number between 0 and 1",
        ),
        ("ENABLE_RAG_TOOL", "maybe", "must be true or false"),
        ("MEMORY_TTL_HOURS", "soon", "expected u32"),
        ("ESCALATION_KEYWORDS", r#"{"urgent": "very"}"#, "urgent"),
        (
            "ATTACHMENT_ALLOWED_EXTENSIONS",
            "[1, 2]",
            "must be a string",
        ),
        (
            "CRM_API_KEY",
            "secretsmanager://gcp/crm",
            "secretsmanager://aws/NAME",
        ),
        ("BILLING_API_KEY", "file://relative/path", "absolute path"),
        ("INVENTORY_API_KEY", "env://", "env://VAR"),
    ];
    for (variable, value, explanation) in cases {
        let error = refused(&[(variable, value)], &[]);
        assert!(
            error.contains(variable) && error.contains(explanation),
            "{variable}={value}: {error}"
        );
    }
}

#[tokio::test]
async fn text_forms_follow_the_reference_design_parsing_rules() {
    let cases = [
        (
            r#"{"refund": 0.6, "fraud": 1}"#,
            json!({"refund": 0.6, "fraud": 1.0}),
            r#"[".pdf", ".png"]"#,
            json!([".pdf", ".png"]),
        ),
        // A missing or unparsable weight is 0.8; items are trimmed.
        (
            "refund=0.6, fraud ,angry=very",
            json!({"refund": 0.6, "fraud": 0.8, "angry": 0.8}),
            " .pdf, .png ,",
            json!([".pdf", ".png"]),
        ),
        // No keywords means the defaults; no extensions means none.
        ("", default_keywords(), "", json!([])),
        // Text that only looks like JSON is read as pairs and items.
        (
            "{refund=0.5",
            json!({"{refund": 0.5}),
            "[.pdf",
            json!(["[.pdf"]),
        ),
    ];
    for (keywords, expected_keywords, extensions, expected_extensions) in cases {
        let engram = serve(
            &[
                ("ESCALATION_KEYWORDS", keywords),
                ("ATTACHMENT_ALLOWED_EXTENSIONS", extensions),
            ],
            &[],
        );
        let escalation = config(&engram.tool("escalation").await);
        assert_eq!(escalation["keywords"], expected_keywords, "{keywords:?}");
        let attachment = config(&engram.tool("attachment").await);
        assert_eq!(
            attachment["allowed_extensions"], expected_extensions,
            "{extensions:?}"
        );
        engram.stop();
    }
}

#[tokio::test]
async fn warnings_follow_validate_tool_config() {
    let engram = serve(
        &[
            ("ENABLE_CRM_TOOL", "true"),
            ("ENABLE_BILLING_TOOL", "true"),
            ("BILLING_API_ENDPOINT", "https://billing.example.com"),
            ("ENABLE_INVENTORY_TOOL", "true"),
            ("INVENTORY_API_KEY", "sk-inventory-literal-61f0"),
            ("ESCALATION_NOTIFICATION_ENABLED", "true"),
            // Blank counts as unset, as Python's `not value` does.
            ("ESCALATION_NOTIFICATION_EMAIL", ""),
        ],
        &[],
    );
    let tools = engram.tools(false).await;
    let warnings = |id: &str| find(&tools, id).warnings.clone();
    assert_eq!(
        warnings("crm"),
        [
            "CRM tool enabled but no API endpoint configured",
            "CRM tool enabled but no API key configured"
        ]
    );
    assert_eq!(
        warnings("billing"),
        ["Billing tool enabled but no API key configured"]
    );
    assert_eq!(
        warnings("inventory"),
        ["Inventory tool enabled but no API endpoint configured"]
    );
    assert_eq!(
        warnings("escalation"),
        ["Escalation notifications enabled but no email or webhook configured"]
    );
    assert!(warnings("rag").is_empty());
    let output = engram.stop();
    assert!(
        output.contains("CRM tool enabled but no API key configured"),
        "start-up logs the warnings:\n{output}"
    );
    assert_hidden(&output, &["sk-inventory-literal-61f0"]);

    // A disabled tool has nothing to warn about; a webhook alone is enough.
    let engram = serve(
        &[
            ("ENABLE_CRM_TOOL", "false"),
            ("ESCALATION_NOTIFICATION_ENABLED", "true"),
            (
                "ESCALATION_NOTIFICATION_WEBHOOK",
                "https://hooks.example.com",
            ),
        ],
        &[],
    );
    for tool in engram.tools(false).await {
        assert!(tool.warnings.is_empty(), "{tool:?}");
    }
    engram.stop();
}

#[tokio::test]
async fn production_refuses_literal_api_keys() {
    for variable in ["CRM_API_KEY", "BILLING_API_KEY", "INVENTORY_API_KEY"] {
        let error = refused(
            &[
                ("ENVIRONMENT", "production"),
                (variable, "sk-prod-literal-2a9d"),
            ],
            &[],
        );
        assert!(
            error.contains(variable) && error.contains("production") && error.contains("env://"),
            "{error}"
        );
        assert_hidden(&error, &["sk-prod-literal-2a9d"]);
    }
    // References are fine in production, and literals outside it.
    let engram = serve(
        &[
            ("ENVIRONMENT", "production"),
            ("CRM_API_KEY", "env://CRM_KEY_FROM_VAULT"),
            ("CRM_KEY_FROM_VAULT", "sk-prod-env-77c1"),
        ],
        &[],
    );
    assert!(engram.tool("crm").await.api_key_set);
    assert_hidden(&engram.stop(), &["sk-prod-env-77c1"]);
    let engram = serve(
        &[
            ("ENVIRONMENT", "staging"),
            ("CRM_API_KEY", "sk-staging-literal-3e8b"),
        ],
        &[],
    );
    assert!(engram.tool("crm").await.api_key_set);
    assert_hidden(&engram.stop(), &["sk-staging-literal-3e8b"]);
}

#[tokio::test]
async fn env_references_resolve_or_warn() {
    let engram = serve(
        &[
            ("ENABLE_CRM_TOOL", "true"),
            ("CRM_API_ENDPOINT", "https://crm.example.com"),
            ("CRM_API_KEY", "env://ENGRAM_TEST_CRM_SECRET"),
            ("ENGRAM_TEST_CRM_SECRET", "sk-crm-env-0d4e"),
            ("ENABLE_BILLING_TOOL", "true"),
            ("BILLING_API_ENDPOINT", "https://billing.example.com"),
            ("BILLING_API_KEY", "env://ENGRAM_TEST_BILLING_UNSET"),
        ],
        &[],
    );
    let crm = engram.tool("crm").await;
    assert!(crm.api_key_set && crm.warnings.is_empty(), "{crm:?}");
    let billing = engram.tool("billing").await;
    assert!(!billing.api_key_set);
    assert_eq!(
        billing.warnings,
        ["Billing tool enabled but no API key configured"]
    );
    assert_hidden(&format!("{crm:?}"), &["sk-crm-env-0d4e"]);
    let output = engram.stop();
    let unset_warning = output
        .lines()
        .find(|line| line.contains("ENGRAM_TEST_BILLING_UNSET"))
        .unwrap_or_else(|| panic!("no warning names the unset variable:\n{output}"));
    assert!(unset_warning.contains("WARN"), "{unset_warning}");
    assert_hidden(&output, &["sk-crm-env-0d4e"]);
}

/// A Kubernetes Secret volume: `key` -> `..data/key`, `..data` -> a timestamped directory
/// that the kubelet swaps atomically on rotation.
fn kubernetes_secret_rotation(volume: &Path, version: &str, key: &str) {
    let directory = volume.join(version);
    std::fs::create_dir(&directory).unwrap();
    std::fs::write(directory.join("api-key"), key).unwrap();
    let staged = volume.join("..data_tmp");
    std::os::unix::fs::symlink(version, &staged).unwrap();
    std::fs::rename(&staged, volume.join("..data")).unwrap();
    let link = volume.join("api-key");
    if link.symlink_metadata().is_err() {
        std::os::unix::fs::symlink("..data/api-key", &link).unwrap();
    }
}

#[tokio::test]
async fn file_references_follow_the_file() {
    let secrets = tempfile::tempdir().unwrap();
    let crm_file = secrets.path().join("crm-api-key");
    std::fs::write(&crm_file, "sk-crm-file-v1-a1\n").unwrap();
    let volume = secrets.path().join("billing");
    std::fs::create_dir(&volume).unwrap();
    kubernetes_secret_rotation(&volume, "..2026_11_24_v1", "sk-billing-file-v1-b1");
    let crm_reference = format!("file://{}", crm_file.display());
    let billing_reference = format!("file://{}", volume.join("api-key").display());
    let engram = serve(
        &[
            ("ENABLE_CRM_TOOL", "true"),
            ("CRM_API_ENDPOINT", "https://crm.example.com"),
            ("CRM_API_KEY", &crm_reference),
            ("BILLING_API_KEY", &billing_reference),
        ],
        &[],
    );
    let mut responses = String::new();
    let mut crm = engram.tool("crm").await;
    assert!(crm.api_key_set && crm.warnings.is_empty(), "{crm:?}");
    responses.push_str(&format!("{crm:?}"));

    std::fs::write(&crm_file, "sk-crm-file-v2-a2").unwrap();
    crm = engram.tool("crm").await;
    assert!(crm.api_key_set, "a rewritten file still holds a key");
    responses.push_str(&format!("{crm:?}"));

    std::fs::write(&crm_file, "").unwrap();
    crm = engram.tool("crm").await;
    assert!(!crm.api_key_set, "an emptied file holds no key");
    assert_eq!(crm.warnings, ["CRM tool enabled but no API key configured"]);

    std::fs::write(&crm_file, "sk-crm-file-v3-a3").unwrap();
    crm = engram.tool("crm").await;
    assert!(crm.api_key_set && crm.warnings.is_empty(), "{crm:?}");
    responses.push_str(&format!("{crm:?}"));

    std::fs::remove_file(&crm_file).unwrap();
    assert!(
        !engram.tool("crm").await.api_key_set,
        "a removed file holds no key"
    );

    assert!(engram.tool("billing").await.api_key_set);
    kubernetes_secret_rotation(&volume, "..2026_11_24_v2", "");
    assert!(
        !engram.tool("billing").await.api_key_set,
        "the swapped-in version is empty"
    );
    kubernetes_secret_rotation(&volume, "..2026_11_24_v3", "sk-billing-file-v3-b3");
    let billing = engram.tool("billing").await;
    assert!(billing.api_key_set);
    responses.push_str(&format!("{billing:?}"));

    let keys = [
        "sk-crm-file-v1-a1",
        "sk-crm-file-v2-a2",
        "sk-crm-file-v3-a3",
        "sk-billing-file-v1-b1",
        "sk-billing-file-v3-b3",
    ];
    assert_hidden(&responses, &keys);
    let output = engram.stop();
    assert_hidden(&output, &keys);

    // A file that is missing at start-up stops it, naming the setting and the path.
    let missing = secrets.path().join("missing-key");
    let error = refused(
        &[("CRM_API_KEY", &format!("file://{}", missing.display()))],
        &[],
    );
    assert!(
        error.contains("CRM_API_KEY") && error.contains(&missing.display().to_string()),
        "{error}"
    );
}

#[tokio::test]
async fn get_tool_errors_carry_error_details() {
    let engram = serve(&[], &[]);
    let mut client = engram.client().await;
    let status = client
        .get_tool(pb::GetToolRequest {
            name: "tools/weather".to_owned(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let info = status.get_details_error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "TOOL_NOT_FOUND");
    assert_eq!(info.domain, "engram.dev");
    assert_eq!(info.metadata["resource"], "tools/weather");
    for name in ["crm", "tools/", "tools/crm/extra", "tools/CRM", ""] {
        let status = client
            .get_tool(pb::GetToolRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        let info = status.get_details_error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
        let bad_request = status.get_details_bad_request().expect("BadRequest");
        let fields: Vec<&str> = bad_request
            .field_violations
            .iter()
            .map(|violation| violation.field.as_str())
            .collect();
        assert_eq!(fields, ["name"], "{name:?}");
    }
    engram.stop();
}

#[cfg(feature = "aws-secrets-manager")]
mod secrets_manager {
    use std::net::TcpStream;
    use std::path::PathBuf;

    use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};

    use super::*;

    /// A moto server on a free loopback port, stopped on drop.
    struct Moto {
        child: Child,
        endpoint: String,
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn moto_server() -> PathBuf {
        if let Some(path) = std::env::var_os("ENGRAM_TEST_MOTO_SERVER") {
            return PathBuf::from(path);
        }
        let installed =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/moto/bin/moto_server");
        assert!(
            installed.is_file(),
            "moto_server not found: set ENGRAM_TEST_MOTO_SERVER to its path, or run \
             scripts/checks/40-toolconfig.sh, which installs it in .tools/moto"
        );
        installed
    }

    fn start_moto() -> Moto {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(moto_server())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + HANG_GUARD;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not listen"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", endpoint.to_owned()),
            ("AWS_ACCESS_KEY_ID", "testing".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    async fn create_secret(endpoint: &str, name: &str, value: &str) {
        let http_client = aws_smithy_http_client::Builder::new().build_http();
        let config = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .endpoint_url(endpoint)
            .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
            .http_client(http_client)
            .build();
        aws_sdk_secretsmanager::Client::from_conf(config)
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .expect("create secret in moto");
    }

    fn with<'a>(
        base: &'a [(&'static str, String)],
        extra: &[(&'a str, &'a str)],
    ) -> Vec<(&'a str, &'a str)> {
        base.iter()
            .map(|(key, value)| (*key, value.as_str()))
            .chain(extra.iter().copied())
            .collect()
    }

    #[tokio::test]
    async fn secrets_manager_references_load_at_start_up() {
        let moto = start_moto();
        create_secret(&moto.endpoint, "engram/crm-api-key", "sk-crm-aws-6e2f").await;
        let aws = aws_env(&moto.endpoint);

        let engram = serve(
            &with(
                &aws,
                &[
                    ("ENVIRONMENT", "production"),
                    ("ENABLE_CRM_TOOL", "true"),
                    ("CRM_API_ENDPOINT", "https://crm.example.com"),
                    ("CRM_API_KEY", "secretsmanager://aws/engram/crm-api-key"),
                ],
            ),
            &[],
        );
        let crm = engram.tool("crm").await;
        assert!(crm.api_key_set && crm.warnings.is_empty(), "{crm:?}");
        assert_hidden(&format!("{crm:?}"), &["sk-crm-aws-6e2f"]);
        let output = engram.stop();
        assert!(output.contains("engram/crm-api-key"), "{output}");
        assert_hidden(&output, &["sk-crm-aws-6e2f"]);

        let error = refused(
            &with(
                &aws,
                &[(
                    "BILLING_API_KEY",
                    "secretsmanager://aws/engram/no-such-secret",
                )],
            ),
            &[],
        );
        for part in [
            "BILLING_API_KEY",
            "engram/no-such-secret",
            "ResourceNotFoundException",
        ] {
            assert!(error.contains(part), "{part} missing from: {error}");
        }

        // Nothing listens on a port just released.
        let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .unwrap()
            .port();
        let unreachable = aws_env(&format!("http://127.0.0.1:{closed_port}"));
        let error = refused(
            &with(
                &unreachable,
                &[(
                    "INVENTORY_API_KEY",
                    "secretsmanager://aws/engram/crm-api-key",
                )],
            ),
            &[],
        );
        assert!(
            error.contains("INVENTORY_API_KEY") && error.contains("engram/crm-api-key"),
            "{error}"
        );
        drop(moto);
    }
}
