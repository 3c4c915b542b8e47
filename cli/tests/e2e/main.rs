//! keel end to end, on real parts: PostgreSQL, the broker, Redis, HTTP and the `keel` binary.
//! One test binary, one module per concern; each test builds a [`common::Stack`] of its own
//! (database, topics, group ids), so they run in parallel.
//!
//! Two concerns have binaries of their own because what they observe is global to a process:
//! `traces.rs` installs the tracing subscriber, and `health.rs` reads every loop's liveness.

mod common;

mod audit;
mod batches;
mod cluster;
mod groups;
mod interop;
mod ops;
mod rebuild;
mod shutdown;
mod spine;
mod tls;
