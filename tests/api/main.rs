//! The HTTP API end to end, against real servers on port 0. Every test runs twice: on SQLite
//! and on PostgreSQL (`FERRY_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/postgres).

mod azurite;
mod helpers;
mod s3api;

mod access;
mod azure;
mod backend_app;
mod browser;
mod cli_upload;
mod clients;
mod cluster;
mod concurrency;
mod creation;
mod database;
mod doctor;
mod download;
mod expiration;
mod faults;
mod ietf;
mod limits;
mod nginx;
mod openapi;
mod patch;
mod pipeline;
mod proxies;
mod proxy_chain;
mod service;
mod termination;
mod validation;
mod webhooks;
