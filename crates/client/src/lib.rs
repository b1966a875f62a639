//! The rankd client crate: the request and response types every transport
//! speaks (`types`), the socket's framing (`frame`) and MessagePack envelope
//! (`wire`), and a Rust client over the Unix socket (`UdsClient`, pipelined)
//! or HTTP (`HttpClient`, with the `http` feature) behind one `Client` trait.
//! The daemon uses the same types and framing, so both sides agree by
//! construction.

mod client;
pub mod frame;
#[cfg(feature = "http")]
mod http;
pub mod types;
pub mod wire;

pub use client::{Client, ClientError, UdsClient};
#[cfg(feature = "http")]
pub use http::HttpClient;
