//! TLS on the client port: ALPN picks HTTP/2, many streams share one connection, a reset
//! stream frees its slot, HTTP/1.1 still works, and a new certificate is picked up on SIGHUP.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{crypto, ClientConfig, RootCertStore};

const T: Duration = Duration::from_secs(10);

struct Certs {
    dir: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl Certs {
    fn new() -> (Self, CertificateDer<'static>) {
        let dir = std::env::temp_dir().join(format!(
            "sse-gateway-tls-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let certs = Certs {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            dir,
        };
        let der = certs.write_new();
        (certs, der)
    }

    /// Writes a fresh self-signed certificate for localhost; its DER.
    fn write_new(&self) -> CertificateDer<'static> {
        let generated =
            rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
                .unwrap();
        std::fs::write(&self.cert, generated.cert.pem()).unwrap();
        std::fs::write(&self.key, generated.signing_key.serialize_pem()).unwrap();
        generated.cert.der().clone()
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn connect(
    addr: std::net::SocketAddr,
    trust: &[CertificateDer<'static>],
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = RootCertStore::empty();
    for c in trust {
        roots.add(c.clone()).unwrap();
    }
    let mut config =
        ClientConfig::builder_with_provider(Arc::new(crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake")
}

async fn read_until(body: &mut Incoming, buf: &mut Vec<u8>, needle: &[u8]) -> bool {
    let deadline = tokio::time::Instant::now() + T;
    while !buf.windows(needle.len()).any(|w| w == needle) {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    buf.extend_from_slice(d);
                }
            }
            _ => return false,
        }
    }
    true
}

fn events_request(tok: &str) -> hyper::Request<Full<Bytes>> {
    hyper::Request::get("https://localhost/events?channel=tls")
        .header("authorization", format!("Bearer {tok}"))
        .body(Full::default())
        .unwrap()
}

fn publish_request(data: &str) -> hyper::Request<Full<Bytes>> {
    let body = serde_json::json!({"channel": "tls", "data": data}).to_string();
    hyper::Request::post("https://localhost/publish")
        .header("authorization", format!("Bearer {}", publisher_token()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

#[tokio::test]
async fn tls_offers_http2_and_reloads_its_certificate() {
    let (certs, first) = Certs::new();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_TLS_CERT_FILE", certs.cert.to_str().unwrap()),
        ("SSE_GATEWAY_TLS_KEY_FILE", certs.key.to_str().unwrap()),
        ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "64"),
    ]);
    let tok = client_token("alice", &["tls"]);

    // ALPN picks h2; 50 streams over that one connection all receive a broadcast.
    let tls = connect(
        gw.client,
        std::slice::from_ref(&first),
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..50 {
        let resp = sender.send_request(events_request(&tok)).await.unwrap();
        assert_eq!(resp.status(), 200);
        bodies.push((resp.into_body(), Vec::new()));
    }
    let conns = http(gw.admin, "GET", "/connections?user=alice", &[], b"")
        .await
        .json();
    assert_eq!(conns["total"], 50);
    assert_eq!(conns["connections"][0]["protocol"], "HTTP/2");
    let r = sender
        .send_request(publish_request("secure"))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    for (body, buf) in &mut bodies {
        assert!(read_until(body, buf, b"data: secure\n").await);
    }
    // A stream reset by the client frees its slot at once.
    bodies.truncate(49);
    let deadline = Instant::now() + T;
    while gw.metric("sse_gateway_connections").await != 49.0 {
        assert!(Instant::now() < deadline, "reset stream not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // HTTP/1.1 over TLS still works for clients that do not speak h2.
    let tls = connect(gw.client, std::slice::from_ref(&first), &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let resp = h1.send_request(events_request(&tok)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), hyper::Version::HTTP_11);

    // A rotated certificate is served after SIGHUP, without a restart; old streams stay.
    let second = certs.write_new();
    gw.signal("HUP");
    let deadline = Instant::now() + T;
    loop {
        let tls = connect(gw.client, &[first.clone(), second.clone()], &[b"h2"]).await;
        let presented = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        if presented == second {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(gw.metric("sse_gateway_connections").await, 50.0);
    assert!(gw.logs.lock().unwrap().contains("TLS certificate reloaded"));
}

#[test]
fn unusable_certificate_files_stop_start_up_naming_the_setting() {
    let (certs, _) = Certs::new();
    std::fs::write(&certs.key, "not a key").unwrap();
    let r = Gateway::try_start(&[
        ("SSE_GATEWAY_JWT_SECRET", SECRET),
        ("SSE_GATEWAY_TLS_CERT_FILE", certs.cert.to_str().unwrap()),
        ("SSE_GATEWAY_TLS_KEY_FILE", certs.key.to_str().unwrap()),
    ]);
    let (code, _) = r.err().expect("start-up refused");
    assert_eq!(code, Some(2));
}

#[tokio::test]
async fn a_failed_certificate_reload_is_retried_until_it_succeeds() {
    let (certs, _) = Certs::new();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_TLS_CERT_FILE", certs.cert.to_str().unwrap()),
        ("SSE_GATEWAY_TLS_KEY_FILE", certs.key.to_str().unwrap()),
    ]);
    // A rotation caught half-way: the certificate file is garbage for a moment.
    std::fs::write(&certs.cert, "-----BEGIN CERTIFICATE-----\ntruncated").unwrap();
    let mtime = |p: &std::path::Path| std::fs::metadata(p).unwrap().modified().unwrap();
    let stamps = [
        (&certs.cert, mtime(&certs.cert)),
        (&certs.key, mtime(&certs.key)),
    ];
    gw.signal("HUP");
    let deadline = Instant::now() + T;
    while !gw.logs.lock().unwrap().contains("reload failed") {
        assert!(Instant::now() < deadline, "the bad file was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The good content lands without changing the modification time again.
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    std::fs::write(&certs.cert, generated.cert.pem()).unwrap();
    std::fs::write(&certs.key, generated.signing_key.serialize_pem()).unwrap();
    for (f, stamp) in stamps {
        std::fs::File::options()
            .write(true)
            .open(f)
            .unwrap()
            .set_modified(stamp)
            .unwrap();
    }
    let deadline = Instant::now() + T;
    while !gw.logs.lock().unwrap().contains("TLS certificate reloaded") {
        assert!(
            Instant::now() < deadline,
            "the failed reload was never retried"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
