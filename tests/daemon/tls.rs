//! HTTPS with a certificate made inside the test: a request over TLS with the
//! test's CA succeeds; plain HTTP to the TLS port fails cleanly and harms no
//! one else.

use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::common::*;

struct Pki {
    ca_pem: String,
    cert_pem: String,
    key_pem: String,
}

/// A CA and a certificate for 127.0.0.1 and localhost signed by it.
fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem(),
    }
}

fn connector(ca_pem: &str) -> TlsConnector {
    let mut roots = RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

/// One HTTP/1.1 request over TLS; the whole answer as text.
async fn https(addr: &str, ca_pem: &str, request: &str) -> String {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector(ca_pem)
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out))
        .await
        .expect("an answer within 10 s")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn https_with_the_tests_ca_works_and_plain_http_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &p.key_pem).unwrap();
    let d = Daemon::start_with(
        &demo_models(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    assert!(d.http.starts_with("https://"), "{}", d.http);
    let addr = d.http.trim_start_matches("https://").to_string();
    let answer = https(
        &addr,
        &p.ca_pem,
        "GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"ready\":true"), "{answer}");
    let body = r#"{"user_id": 42, "k": 3}"#;
    let answer = https(
        &addr,
        &p.ca_pem,
        &format!(
            "POST /v1/models/demo/recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"items\""), "{answer}");

    // Plain HTTP to the TLS port: an error for that client, promptly.
    let started = std::time::Instant::now();
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
        .get(format!("http://{addr}/readyz"))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP must not be answered: {plain:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused promptly"
    );
    // A client that does not trust the certificate fails its handshake.
    let other = pki();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let refused = connector(&other.ca_pem)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await;
    assert!(
        refused.is_err(),
        "a certificate from another CA is not trusted"
    );
    // The daemon kept serving.
    let answer = https(
        &addr,
        &p.ca_pem,
        "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_missing_or_mismatched_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki();
    let q = pki();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &q.key_pem).unwrap();
    let models = demo_models();
    let models = models.to_str().unwrap();
    let base = ["--models", models, "--http", "127.0.0.1:0", "--uds", ""];
    let out = serve_output(&[&base[..], &["--tls-cert", cert.to_str().unwrap()]].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls_cert and tls_key go together"), "{err}");
    let out = serve_output(
        &[
            &base[..],
            &[
                "--tls-cert",
                cert.to_str().unwrap(),
                "--tls-key",
                key.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("do not go together"), "{err}");
}

/// Over TLS, the same edges: a 10 MB body written before reading gets its
/// 413; a client that never finishes its handshake, or finishes it and sends
/// half a head, is closed after the header timeout; a
/// connection beyond `--max-connections` is closed at once (no handshake is
/// spent on refusing it), and the served ones keep working.
#[tokio::test]
async fn tls_slow_clients_are_closed_and_the_cap_closes_the_extra_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let p = pki();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, &p.cert_pem).unwrap();
    std::fs::write(&key, &p.key_pem).unwrap();
    let d = Daemon::start_with(
        &demo_models(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--header-timeout-ms",
            "1000",
            "--max-connections",
            "3",
        ],
    );
    let addr = d.http.trim_start_matches("https://").to_string();
    let header = Duration::from_millis(1000);
    let late = header + Duration::from_millis(1200);
    // A 10 MB body written whole before reading gets its 413 over TLS too.
    {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = connector(&p.ca_pem).connect(name, tcp).await.unwrap();
        let body = vec![b' '; 10 << 20];
        let head = format!(
            "POST /v1/models/demo/recommend HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), tls.write_all(&body))
            .await
            .expect("writing 10 MB over TLS timed out")
            .expect("writing 10 MB over TLS before reading");
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 413"), "10 MB over TLS: {text}");
        assert!(text.contains("too_large"), "10 MB over TLS: {text}");
    }
    // No handshake at all.
    let mut silent = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let since = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let closed = tokio::time::timeout(late, async {
        while !matches!(silent.read(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "a silent TLS client still open after {late:?}"
    );
    assert!(since.elapsed() + Duration::from_millis(50) >= header);
    // A handshake, then half a head.
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = connector(&p.ca_pem).connect(name, tcp).await.unwrap();
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let since = std::time::Instant::now();
    let closed = tokio::time::timeout(late, async {
        while !matches!(tls.read(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "half a head over TLS still open after {late:?}"
    );
    assert!(since.elapsed() + Duration::from_millis(50) >= header);

    // Three held connections (each kept busy so the header timeout spares
    // it: a head, answered, then the next within the timeout), a fourth
    // closed at once.
    let mut held = Vec::new();
    for _ in 0..3 {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        held.push(connector(&p.ca_pem).connect(name, tcp).await.unwrap());
    }
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = std::time::Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while !matches!(extra.read(&mut buf).await, Ok(0) | Err(_)) {}
    })
    .await;
    assert!(
        closed.is_ok() && started.elapsed() < header,
        "the connection over the cap was not closed at once ({:?})",
        started.elapsed()
    );
    for tls in &mut held {
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "a held TLS connection: {text}"
        );
    }
}
