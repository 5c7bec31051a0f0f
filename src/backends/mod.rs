//! The state a replica keeps outside itself: the broker (events between replicas), history
//! (durable events), the limiter (per-user slots) and presence (who is on a channel), each a
//! trait with an in-memory implementation for single-replica mode and a Redis one, plus the
//! Redis connections they share.
//!
//! Backends import the core and nothing above it: they take their own settings structs, not
//! the command line, and deliver into an `EventSink`, not the hub's streams.

pub mod broker;
pub mod history;
pub mod limits;
pub mod presence;
pub mod redis;
