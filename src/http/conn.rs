//! What a request handler knows of the connection it arrived on. A leaf of the crate: the
//! accept loops make it, the handlers read it, and neither needs the other for that.

use tokio_util::sync::CancellationToken;

/// The HTTP connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Connection id, on every log line about it.
    pub id: u64,
    /// The client's address.
    pub remote: std::net::SocketAddr,
    /// Cancels the whole connection (the slow-consumer cut).
    pub kill: CancellationToken,
}
