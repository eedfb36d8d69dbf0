//! The types every layer shares (upload ids and states, metadata, checksums and hash states,
//! where the bytes are, the clock). This module imports no other module of ferry, so that
//! `repo`, `store`, `hooks`, `uploads` and `http` can all use it while no layer imports one above
//! it.

pub mod parts;
pub mod types;

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, as ferry stores times.
pub fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
