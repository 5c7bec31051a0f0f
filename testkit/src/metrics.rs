//! Reading a replica's Prometheus exposition.

use std::net::SocketAddr;

/// The value of one series in an exposition (name with labels, exactly as rendered).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Scrapes `/metrics` from an admin address; `None` when it cannot be read.
pub async fn scrape(admin: SocketAddr) -> Option<String> {
    let reply = crate::http::try_http(admin, "GET", "/metrics", &[], b"")
        .await
        .ok()?;
    (reply.status == 200).then(|| reply.text())
}
