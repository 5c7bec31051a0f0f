//! Real links that break the way real ones do (SPEC §6.2): a client on its own network host
//! that goes silent — no ACK, no FIN, no RST — is released on time.

mod netlab;
mod support;

use std::time::{Duration, Instant};

use support::*;

const T: Duration = Duration::from_secs(10);

fn lab_or_skip() -> Option<netlab::Lab> {
    match netlab::Lab::new() {
        Ok(lab) => Some(lab),
        Err(why) => {
            eprintln!(
                "SKIPPED: cannot create network namespaces here ({why}); run the tests as root with iproute2 to exercise real links"
            );
            None
        }
    }
}

#[tokio::test]
async fn a_client_whose_link_goes_silent_is_released_within_heartbeat_plus_write_timeout() {
    let Some(lab) = lab_or_skip() else { return };
    let mut client = lab.host();
    let redis = Redis::start();
    let url = redis.url();
    let listen = format!("{}:0", client.gateway);
    let gw = Gateway::start(&[
        ("SSE_GATEWAY_REDIS_URL", &url),
        ("SSE_GATEWAY_LISTEN", &listen),
        ("SSE_GATEWAY_HEARTBEAT_SECS", "2"),
        ("SSE_GATEWAY_WRITE_TIMEOUT_SECS", "3"),
        ("SSE_GATEWAY_MAX_CONNECTIONS_PER_USER", "1"),
    ]);
    gw.wait_ready(true, T).await;
    let tok = client_token("ivy", &["cable"]);
    let auth = format!("Authorization: Bearer {tok}");
    let url = format!("http://{}/events?channel=cable", gw.client);
    client.spawn("curl", &["-sN", "-o", "/dev/null", "-H", &auth, &url]);
    let opened = Instant::now();
    while gw.metric("sse_gateway_connections").await != 1.0 {
        assert!(opened.elapsed() < T, "the client's stream never opened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.wait_numsub("sse:cable", 1, T);
    // Let a heartbeat or two through, then the client goes silent.
    tokio::time::sleep(Duration::from_secs(3)).await;
    client.cut();
    let cut = Instant::now();
    let bound = Duration::from_secs(2 + 3 + 2);
    while gw.metric("sse_gateway_connections").await != 0.0 {
        assert!(
            cut.elapsed() < bound,
            "a client that vanished silently still held its stream after {:?} (bound {bound:?})",
            cut.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let released = cut.elapsed();
    // Its subscription (after the one-second unsubscribe grace) and its slot are free too.
    redis.wait_numsub("sse:cable", 0, Duration::from_secs(3));
    let again = SseClient::open(gw.client, "/events?channel=cable", Some(&tok)).await;
    assert!(
        again.is_ok(),
        "the vanished client's slot was not given back: {:?}",
        again.err().map(|r| r.status)
    );
    eprintln!("silent client released {released:?} after it went silent");
}
