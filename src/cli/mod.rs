//! Command-line clients of ferry: `ferry upload` and `ferry doctor`.

pub mod doctor;
pub mod upload;
