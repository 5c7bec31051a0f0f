//! What the gateway's integration tests, the load tool and its smoke test share, written once:
//!
//! - [`sse`]: an SSE decoder (chunked or not, split anywhere) that follows the WHATWG parsing
//!   rules the gateway's clients use;
//! - [`http`]: an HTTP/1.1 client that sees the bytes on the wire (a test must see exactly what
//!   a browser or `curl -N` sees, which a high-level client would hide), and [`http::SseClient`];
//! - [`tokens`]: HS256 minting; [`metrics`]: reading one Prometheus sample;
//! - [`fixtures`]: a real `redis-server` on a free port and real gateway processes, each killed
//!   by PID when dropped; [`topology`]: Redis Cluster and Sentinel fixtures; [`browser`]:
//!   headless Chromium and a page server that records what the page reports.
//!
//! Nothing here mocks Redis, HTTP or the OS: tests drive real processes over real sockets.

pub mod browser;
pub mod fixtures;
pub mod http;
pub mod metrics;
pub mod sse;
pub mod tokens;
pub mod topology;

pub use fixtures::{free_port, gateway_binary, publish_to, stdout_of, Gateway, Redis};
pub use http::{http, Reply, SseClient};
pub use sse::{Block, Decoder, SseEvent};
pub use tokens::{client_token, now, publisher_token, token, token_with, SECRET};
