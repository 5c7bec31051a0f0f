//! The HTTP face of a replica: accept loops, the lean HTTP/1.1 path, routing, `GET /events`,
//! `GET /presence`, `POST /publish`, the stream body and its deadlines, the drain, and refusals as answers.
//!
//! This layer is the only one that knows requests and sockets; it reaches the backends only
//! through their traits, held in `AppState`.

pub mod body;
pub mod conn;
pub mod cors;
pub mod diagnostics;
pub mod disconnect;
pub mod error;
pub mod events;
pub mod h1stream;
pub mod presence;
pub mod publish;
pub mod request;
pub mod router;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod stream;
pub mod watchdog;
