//! TLS and mutual TLS (rustls): a verified client certificate names the tenant; connections
//! without one, or in plaintext, get nothing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Backend, EngramProcess, TestDatabase, eventually, memory, store_request};
use engram_proto::memory::v1::memory_service_client::MemoryServiceClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    directory: tempfile::TempDir,
    ca_pem: String,
}

impl Pki {
    /// A CA, a server certificate for localhost and 127.0.0.1, and one client per name.
    fn new(clients: &[&str]) -> Self {
        let directory = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "engram test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let issue = |names: Vec<String>, common_name: &str, file: &str| {
            let mut params = CertificateParams::new(names).unwrap();
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            let key = KeyPair::generate().unwrap();
            let certificate = params.signed_by(&key, &ca).unwrap();
            std::fs::write(
                directory.path().join(format!("{file}.pem")),
                certificate.pem(),
            )
            .unwrap();
            std::fs::write(
                directory.path().join(format!("{file}.key")),
                key.serialize_pem(),
            )
            .unwrap();
        };
        issue(
            vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            "engram",
            "server",
        );
        for client in clients {
            issue(Vec::new(), client, client);
        }
        std::fs::write(directory.path().join("ca.pem"), ca.pem()).unwrap();
        Self {
            ca_pem: ca.pem(),
            directory,
        }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.directory.path().join(file)
    }

    fn identity(&self, client: &str) -> Identity {
        let read = |file: String| std::fs::read(self.path(&file)).unwrap();
        Identity::from_pem(read(format!("{client}.pem")), read(format!("{client}.key")))
    }
}

fn arg(path: &Path) -> String {
    path.display().to_string()
}

async fn tls_channel(
    address: std::net::SocketAddr,
    pki: &Pki,
    client: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .domain_name("localhost")
        .ca_certificate(Certificate::from_pem(&pki.ca_pem));
    if let Some(client) = client {
        tls = tls.identity(pki.identity(client));
    }
    Channel::from_shared(format!("https://{address}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_names_the_tenant_and_refuses_everyone_else() {
    let pki = Pki::new(&["acme-agent", "stranger"]);
    let database = TestDatabase::create(Backend::Sqlite).await;
    let server = EngramProcess::serve(
        database.url(),
        &[
            ("ENGRAM_TLS_CERT_FILE", &arg(&pki.path("server.pem"))),
            ("ENGRAM_TLS_KEY_FILE", &arg(&pki.path("server.key"))),
            ("ENGRAM_TLS_CLIENT_CA_FILE", &arg(&pki.path("ca.pem"))),
            ("ENGRAM_AUTH_CLIENTS", "acme-agent:acme:agent"),
        ],
    );
    let address = server.address;
    let ready = eventually(Duration::from_secs(30), || {
        let pki = &pki;
        async move {
            let Ok(channel) = tls_channel(address, pki, Some("acme-agent")).await else {
                return false;
            };
            MemoryServiceClient::new(channel)
                .store_memory(store_request("tls", memory("over mutual TLS")))
                .await
                .is_ok()
        }
    })
    .await;
    assert!(
        ready,
        "a known client certificate stores; log:\n{}",
        server.log()
    );

    let stranger = MemoryServiceClient::new(
        tls_channel(address, &pki, Some("stranger"))
            .await
            .expect("TLS handshake"),
    )
    .store_memory(store_request("tls", memory("unknown client")))
    .await
    .unwrap_err();
    assert_eq!(
        stranger.code(),
        tonic::Code::Unauthenticated,
        "{stranger:?}"
    );

    let anonymous = match tls_channel(address, &pki, None).await {
        Err(_) => None,
        Ok(channel) => Some(
            MemoryServiceClient::new(channel)
                .store_memory(store_request("tls", memory("no certificate")))
                .await,
        ),
    };
    assert!(
        anonymous.is_none_or(|call| call.is_err()),
        "no client certificate, no call"
    );

    let plaintext = MemoryServiceClient::connect(format!("http://{address}")).await;
    let plaintext_call = match plaintext {
        Err(_) => true,
        Ok(mut client) => client
            .store_memory(store_request("tls", memory("plaintext")))
            .await
            .is_err(),
    };
    assert!(plaintext_call, "plaintext is refused");
}
