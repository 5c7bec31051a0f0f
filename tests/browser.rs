//! A real browser: headless Chromium opens more than six `EventSource`s to one TLS origin — the
//! HTTP/1.1 per-host limit would hang the seventh — and every one of them receives an event
//! published from the page. The page reports back to a small server run by the test.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STREAMS: usize = 8;

fn chromium() -> String {
    for c in ["chromium", "chromium-browser", "google-chrome"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {c}")])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return c.to_string();
        }
    }
    panic!("no Chromium found: install it (scripts/test.sh installs Debian's chromium)");
}

fn page(gateway: u16, token: &str, publisher: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="out">starting</pre><script>
const N = {STREAMS};
const base = "https://localhost:{gateway}";
let opened = 0, received = 0;
function report(what) {{ fetch("/result?" + what).catch(() => {{}}); }}
function publish() {{
  fetch(base + "/publish", {{
    method: "POST",
    headers: {{ "Authorization": "Bearer {publisher}", "Content-Type": "application/json" }},
    body: JSON.stringify({{ channel: "browser", event: "ping", data: "hello" }})
  }}).then(r => report("published=" + r.status)).catch(e => report("publish_error=" + encodeURIComponent(e)));
}}
for (let i = 0; i < N; i++) {{
  const es = new EventSource(base + "/events?channel=browser&access_token={token}");
  es.onopen = () => {{ opened++; if (opened === N) {{ report("opened=" + N); publish(); }} }};
  es.onerror = () => report("error=" + i);
  es.addEventListener("ping", e => {{
    received++;
    document.getElementById("out").textContent = "received " + received;
    if (received === N) report("received=" + N);
  }});
}}
</script></body></html>"#
    )
}

/// Serves the page on `/`, and records `/result?…` reports.
async fn page_server(html: String, reports: Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let html = html.clone();
            let reports = reports.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = if let Some(q) = path.strip_prefix("/result?") {
                    reports.lock().unwrap().push(q.to_string());
                    String::new()
                } else {
                    html
                };
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test]
async fn a_browser_holds_more_than_six_streams_to_one_origin() {
    let dir = std::env::temp_dir().join(format!(
        "sse-gateway-browser-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_TLS_CERT_FILE", cert.to_str().unwrap()),
        ("SSE_GATEWAY_TLS_KEY_FILE", key.to_str().unwrap()),
        ("SSE_GATEWAY_CORS_ORIGINS", "*"),
        ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "16"),
    ]);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let html = page(
        gw.client.port(),
        &client_token("alice", &["browser"]),
        &publisher_token(),
    );
    let port = page_server(html, reports.clone()).await;

    let profile = dir.join("profile");
    let mut browser = Command::new(chromium())
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("http://127.0.0.1:{port}/"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start Chromium");

    let deadline = Instant::now() + Duration::from_secs(60);
    let wanted = format!("received={STREAMS}");
    let outcome = loop {
        let seen = reports.lock().unwrap().clone();
        if seen.contains(&wanted) {
            break Ok(seen);
        }
        if Instant::now() > deadline {
            break Err(seen);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // While the browser still holds its streams: they share HTTP/2 connections.
    let conns = http(gw.admin, "GET", "/connections?user=alice", &[], b"")
        .await
        .json();
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let seen = outcome.unwrap_or_else(|seen| {
        panic!("the page did not receive on all {STREAMS} streams; it reported {seen:?}")
    });
    assert!(seen.iter().any(|r| r == "published=202"), "{seen:?}");
    let list = conns["connections"].as_array().unwrap();
    assert_eq!(list.len(), STREAMS, "{conns}");
    assert!(list.iter().all(|c| c["protocol"] == "HTTP/2"), "{conns}");
}
