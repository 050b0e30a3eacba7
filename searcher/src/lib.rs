//! The shoppers' server as a library: `main.rs` is its command line, the tests drive the
//! same app in process.

pub mod app;
pub mod client;
pub mod config;
pub mod connection;
pub mod framing;
pub mod memory;
pub mod metrics;
pub mod multipart;
pub mod pool;
pub mod server;
pub mod state;
pub mod upload;
