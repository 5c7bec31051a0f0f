//! A real browser: headless Chromium opens more than six `EventSource`s to one TLS origin — the
//! HTTP/1.1 per-host limit would hang the seventh — and every one of them receives an event
//! published from the page. The page reports back to a small server run by the test.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::browser::{chromium, page_server};
use support::*;

const STREAMS: usize = 8;

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
    let mut browser = chromium(&profile)
        .arg("--ignore-certificate-errors")
        .arg(format!("http://127.0.0.1:{port}/"))
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
