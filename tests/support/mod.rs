//! The integration tests' fixtures and clients live in the workspace's `sse-testkit` crate,
//! shared with the load tool; this module brings them into each test file.
#![allow(unused_imports)]

pub use sse_testkit::topology;
pub use sse_testkit::*;
