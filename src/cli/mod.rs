//! Client-side commands.

pub mod doctor;
