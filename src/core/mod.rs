//! The core: what an event is, how it is framed, where a stream stands, and the local fan-out.
//!
//! Nothing here knows Redis, HTTP or the settings: the core is the vocabulary the backends
//! and the HTTP layer share, and it imports only itself and the metric names.

pub mod backoff;
pub mod channel;
pub mod event;
pub mod frame;
pub mod hub;
pub mod position;
pub mod sink;
