//! Command-line clients of ferry.

pub mod upload;
