//! ferry: resumable chunked uploads (tus 1.0) into object storage.
//!
//! Layers, top to bottom: [`http`] (axum handlers) -> [`uploads`] (the domain) -> [`repo`]
//! (metadata and offsets, PostgreSQL or SQLite) and [`store`] (bytes, on object_store).

pub mod cli;
pub mod config;
pub mod hooks;
pub mod http;
pub mod model;
pub mod repo;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod uploads;

pub use server::{App, launch};
