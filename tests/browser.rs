//! A real browser: headless Chromium opens more than six `EventSource`s to one TLS origin — the
//! HTTP/1.1 per-host limit would hang the seventh — and every one of them receives an event
//! published from the page. The page reports back to a small server run by the test.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::browser::{chromium, page_server};
use support::*;

const STREAMS: usize = 8;
const T: Duration = Duration::from_secs(10);

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

/// A page that opens one `EventSource` to the gateway whose port is the URL's fragment, with
/// its cookie and no error handling of its own; its application refreshes the session cookie
/// every second (`/token`), and it reports what it sees (for the test only).
fn cookie_page(channel: &str) -> String {
    format!(
        r#"<!doctype html><html><body><pre id="out">starting</pre><script>
function report(what) {{ fetch("/result?" + what).catch(() => {{}}); }}
setInterval(() => fetch("/token").catch(() => {{}}), 1000);
fetch("/token").then(() => {{
  const gateway = "http://127.0.0.1:" + location.hash.slice(1);
  const es = new EventSource(gateway + "/events?channel={channel}", {{ withCredentials: true }});
  const seen = [];
  es.onopen = () => report("open");
  es.onmessage = (e) => {{ seen.push(e.data); report("seen=" + seen.join(",")); }};
  es.addEventListener("gateway.disconnected", () => report("disconnected"));
  setInterval(() => report("state=" + es.readyState), 300);
}});
</script></body></html>"#
    )
}

/// Serves `page` (with the session cookie `sse_token` minted by `mint`); its port.
async fn serve_page(
    page: String,
    mint: support::browser::Mint,
    reports: &Arc<Mutex<Vec<String>>>,
) -> u16 {
    support::browser::app_server(page, reports.clone(), Some(("sse_token".into(), mint))).await
}

/// Opens the page on `page_port` in Chromium, pointed at `gateway`, until `step` says done
/// (it sees the reports so far); the reports then.
async fn watch_page(
    page_port: u16,
    gateway: &Gateway,
    reports: &Arc<Mutex<Vec<String>>>,
    within: Duration,
    mut step: impl FnMut(&[String]) -> bool,
) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!(
        "sse-gateway-cookie-{}-{}",
        std::process::id(),
        free_port()
    ));
    let mut browser = chromium(&dir.join("profile"))
        .arg(format!(
            "http://127.0.0.1:{page_port}/#{}",
            gateway.client.port()
        ))
        .spawn()
        .expect("start Chromium");
    let deadline = Instant::now() + within;
    let seen = loop {
        let seen = reports.lock().unwrap().clone();
        if step(&seen) || Instant::now() > deadline {
            break seen;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let _ = browser.kill();
    let _ = browser.wait();
    let _ = std::fs::remove_dir_all(&dir);
    seen
}

/// A replica that reads tokens from the `sse_token` cookie and lets the page on `page_port`
/// send it cross-origin.
fn cookie_gateway(redis: &Redis, page_port: u16) -> Gateway {
    let origin = format!("http://127.0.0.1:{page_port}");
    Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &redis.url()),
        ("SSE_GATEWAY_AUTH_COOKIE", "sse_token"),
        ("SSE_GATEWAY_CORS_ORIGINS", &origin),
        // Browsers wait retry: before reconnecting; short, so the run sees several expiries.
        ("SSE_GATEWAY_RETRY_MS", "300"),
    ])
}

#[tokio::test]
async fn a_browser_rides_token_expiries_on_its_refreshed_cookie_and_misses_nothing() {
    let redis = Redis::start();
    let mint: support::browser::Mint = Arc::new(|| {
        token(
            serde_json::json!({"sub": "web", "exp": now() + 3, "iat": now(), "channels": ["live"]}),
        )
    });
    let reports = Arc::new(Mutex::new(Vec::new()));
    let page_port = serve_page(cookie_page("live"), mint, &reports).await;
    let gw = cookie_gateway(&redis, page_port);
    gw.wait_ready(true, T).await;
    let go = Arc::new(tokio::sync::Notify::new());
    let publisher = {
        let (client, go) = (gw.client, go.clone());
        tokio::spawn(async move {
            go.notified().await;
            for i in 0..40 {
                let body = serde_json::json!({"channel": "live", "data": format!("e{i}")});
                assert_eq!(
                    publish_to(client, &publisher_token(), &body).await.status,
                    202
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let want = format!(
        "seen={}",
        (0..40)
            .map(|i| format!("e{i}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut started = false;
    let reports = watch_page(page_port, &gw, &reports, Duration::from_secs(60), |seen| {
        if !started && seen.iter().any(|r| r == "open") {
            go.notify_one();
            started = true;
        }
        seen.contains(&want)
    })
    .await;
    publisher.await.unwrap();
    let last = reports
        .iter()
        .filter(|r| r.starts_with("seen="))
        .max_by_key(|r| r.len())
        .cloned()
        .unwrap_or_default();
    assert_eq!(last, want, "every event exactly once, in order");
    let expired = gw
        .metric("sse_gateway_connections_closed_total{reason=\"token_expired\"}")
        .await;
    assert!(
        expired >= 2.0,
        "only {expired} token expiries during the run"
    );
}

#[tokio::test]
async fn a_disconnect_with_revocation_closes_a_browsers_eventsource_for_good() {
    let redis = Redis::start();
    // The application keeps handing out tokens issued before the revocation.
    let issued = now() - 10;
    let mint: support::browser::Mint = Arc::new(move || {
        token(
            serde_json::json!({"sub": "kicked", "exp": now() + 600, "iat": issued, "channels": ["k"]}),
        )
    });
    let reports = Arc::new(Mutex::new(Vec::new()));
    let page_port = serve_page(cookie_page("k"), mint, &reports).await;
    let gw = cookie_gateway(&redis, page_port);
    gw.wait_ready(true, T).await;
    let mut sent = false;
    let client = gw.client;
    let reports = watch_page(page_port, &gw, &reports, Duration::from_secs(40), |seen| {
        if !sent && seen.iter().any(|r| r == "open") {
            sent = true;
            tokio::spawn(async move {
                let ops = token(serde_json::json!({"sub": "ops", "exp": now() + 60, "publish": ["user:kicked"]}));
                let auth = format!("Bearer {ops}");
                let body = serde_json::json!({"sub": "kicked", "revoke_before": now()});
                let r = http(client, "POST", "/disconnect", &[("Authorization", &auth)], body.to_string().as_bytes()).await;
                assert_eq!(r.status, 202, "{}", r.text());
            });
        }
        // EventSource.CLOSED: it gave up for good after the 401 of its revoked token.
        seen.iter().any(|r| r == "disconnected") && seen.iter().any(|r| r == "state=2")
    })
    .await;
    assert!(reports.iter().any(|r| r == "disconnected"), "{reports:?}");
    assert!(
        reports.iter().any(|r| r == "state=2"),
        "the EventSource kept retrying: {reports:?}"
    );
}
