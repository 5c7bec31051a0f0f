//! A real browser for tests: headless Chromium with a throwaway profile, and a tiny server that
//! serves it a page and records what the page reports back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The Chromium on this machine (Debian's `chromium` first).
pub fn chromium_binary() -> String {
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

/// Headless Chromium with its profile in `profile`, the flags every test needs (no sandbox as
/// root, no background traffic, no first-run UI) and its output discarded; add the page (and
/// any other flags) before spawning.
pub fn chromium(profile: &Path) -> Command {
    let mut cmd = Command::new(chromium_binary());
    cmd.args([
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    cmd
}

/// Mints a token for a page's session cookie.
pub type Mint = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `page` (HTML) on `/` of a free loopback port, and records the query of every other
/// request (`/result?opened=8` records `opened=8`), answering those with an empty CORS-open
/// 204 so a page on another origin may report too. Returns the port.
pub async fn page_server(page: String, reports: Arc<Mutex<Vec<String>>>) -> u16 {
    app_server(page, reports, None).await
}

/// [`page_server`], plus what an application's session refresh does: `GET /token` answers
/// with a fresh token from `cookie`'s minter in the cookie it names (path `/`, `SameSite=Lax`).
pub async fn app_server(
    page: String,
    reports: Arc<Mutex<Vec<String>>>,
    cookie: Option<(String, Mint)>,
) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let port = listener.local_addr().expect("its address").port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let page = page.clone();
            let reports = reports.clone();
            let cookie = cookie.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = req.split_whitespace().nth(1).unwrap_or("/");
                let resp = match (path, &cookie) {
                    ("/token", Some((name, mint))) => format!(
                        "HTTP/1.1 204 No Content\r\nSet-Cookie: {name}={}; Path=/; SameSite=Lax\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n",
                        mint()
                    ),
                    _ => match path.split_once('?') {
                    Some((_, query)) => {
                        reports
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(query.to_string());
                        "HTTP/1.1 204 No Content\r\nAccess-Control-Allow-Origin: *\r\nConnection: close\r\n\r\n".to_string()
                    }
                    None => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                        page.len()
                    ),
                    },
                };
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}
