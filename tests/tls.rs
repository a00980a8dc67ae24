//! wss:// upstream with a private CA via `upstream.ca_file` (rcgen certificate, ring provider).

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use support::*;
use wsgate::client::{Client, ClientError, create_body};
use wsgate::mock::{MockConfig, MockUpstream};

/// A self-signed certificate for 127.0.0.1 and localhost.
fn self_signed() -> rcgen::CertifiedKey<rcgen::KeyPair> {
    rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .unwrap()
}

/// The error `Gateway::new` gives for this config (it needs a runtime for its reaper).
fn start_error(config: wsgate::Config, secrets: wsgate::config::Secrets) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        wsgate::Gateway::new(config, secrets)
            .err()
            .expect("a start error")
            .to_string()
    })
}

struct TlsMock {
    mock: MockUpstream,
    ca_pem: String,
}

async fn tls_mock() -> TlsMock {
    init(); // installs the ring provider explicitly
    let ck = self_signed();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let mock = MockUpstream::start(MockConfig {
        tls: Some(Arc::new(server)),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    assert!(mock.url().starts_with("wss://127.0.0.1:"));
    TlsMock {
        mock,
        ca_pem: ck.cert.pem(),
    }
}

#[tokio::test]
async fn wss_upstream_with_ca_file_works() {
    let t = tls_mock().await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &t.ca_pem).unwrap();
    let gw = start_gateway(&t.mock, &["acct-a"], |c| {
        c.upstream.ca_file = Some(ca.clone())
    })
    .await;
    let conv = unique("tls");
    let mut c = gw.connect(&conv).await;
    let turn = c
        .turn(&create_body(Some(&conv), "over TLS", None))
        .await
        .unwrap();
    assert!(turn.is_completed());
    assert_eq!(t.mock.accepted(), 1);
    c.close().await;
    gw.stop().await;
}

#[tokio::test]
async fn untrusted_upstream_certificate_fails_clearly() {
    let t = tls_mock().await;
    let gw = start_gateway(&t.mock, &["acct-a"], |_| {}).await;
    let conv = unique("untrusted");
    match Client::connect(&gw.url(), &gw.codex_headers(&conv)).await {
        Err(ClientError::Refused { status, body }) => {
            assert_eq!(status, 502);
            assert!(body.contains("upstream_tls_failed"), "{body}");
            assert!(body.to_lowercase().contains("certificate"), "{body}");
        }
        other => panic!("expected HTTP 502, got {:?}", other.map(|_| ())),
    }
    assert_eq!(t.mock.accepted(), 0);
    assert_eq!(
        gw.gateway.pool_stats().total,
        0,
        "the failed dial released its slot"
    );
    assert_eq!(log_lines(&["upstream dial failed", "certificate"]).len(), 1);
    gw.stop().await;
}

#[test]
fn bad_ca_file_is_a_start_error() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, "not a certificate").unwrap();
    let (mut config, secrets) = config("wss://127.0.0.1:1/v1/responses", &["acct-a"]);
    config.upstream.ca_file = Some(ca);
    let err = start_error(config, secrets);
    assert!(err.contains("ca_file"), "{err}");
}

#[tokio::test]
async fn tls_listener_serves_wss_clients() {
    init();
    let ck = self_signed();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mock = MockUpstream::start(MockConfig::default()).await.unwrap();
    let handshake_timeout = Duration::from_millis(500);
    let gw = start_gateway(&mock, &["acct-a"], |c| {
        c.tls = Some(wsgate::config::TlsConfig {
            cert_file: cert.clone(),
            key_file: key.clone(),
        });
        c.limits.handshake_timeout = handshake_timeout;
    })
    .await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let client_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let conv = unique("wss");
    let url = format!("wss://127.0.0.1:{}/v1/responses", gw.addr.port());
    let mut c = Client::connect_tls(&url, &gw.codex_headers(&conv), client_tls.clone())
        .await
        .unwrap();
    assert!(
        c.turn(&create_body(Some(&conv), "over wss", None))
            .await
            .unwrap()
            .is_completed()
    );
    c.close().await;
    // Plain ws:// to the TLS port does not get a session.
    assert!(
        Client::connect(&gw.url(), &gw.codex_headers(&unique("plain")))
            .await
            .is_err()
    );
    // A silent TCP client does not block others from completing their handshake.
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let silent_since = Instant::now();
    let mut c2 = Client::connect_tls(&url, &gw.codex_headers(&conv), client_tls.clone())
        .await
        .unwrap();
    assert!(
        c2.turn(&create_body(Some(&conv), "still served", None))
            .await
            .unwrap()
            .is_completed()
    );
    // ... and is disconnected at the handshake deadline.
    assert!(
        closed_within(&mut silent, Duration::from_secs(5))
            .await
            .is_some(),
        "silent TCP client closed"
    );
    assert!(silent_since.elapsed() >= handshake_timeout - Duration::from_millis(50));
    // So is a client that finishes TLS but never sends its HTTP request.
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(client_tls)
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mute_since = Instant::now();
    assert!(
        closed_within(&mut tls, Duration::from_secs(5))
            .await
            .is_some(),
        "mute TLS client closed"
    );
    assert!(mute_since.elapsed() >= handshake_timeout - Duration::from_millis(50));
    c2.close().await;
    gw.assert_quiescent("tls listener").await;
    gw.stop().await;
}

#[test]
fn bad_listener_certificate_is_a_start_error() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, "nope").unwrap();
    std::fs::write(&key, "nope").unwrap();
    let (mut config, secrets) = config("ws://127.0.0.1:1/v1/responses", &["acct-a"]);
    config.tls = Some(wsgate::config::TlsConfig {
        cert_file: cert,
        key_file: key,
    });
    let err = start_error(config, secrets);
    assert!(err.contains("tls.cert_file"), "{err}");
}
