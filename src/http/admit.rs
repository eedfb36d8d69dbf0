//! A new upload as the HTTP request proposes it: the caller's grant (its token) and the headers
//! the pre-create hook asked to see; the domain admits it (`Uploads::admit`).

use axum::Extension;
use http::HeaderMap;

use super::{AppState, auth::Caller, error::ApiError};
use crate::uploads::{CreateConcat, CreateRequest, Grant, Proposal, types::Metadata};

/// Asks the domain to admit an upload of `length` bytes (None: not known yet) with `metadata`.
pub async fn admit(
    state: &AppState,
    caller: Option<Extension<Caller>>,
    request_headers: &HeaderMap,
    length: Option<u64>,
    metadata: Metadata,
    concat: CreateConcat,
) -> Result<CreateRequest, ApiError> {
    let grant = caller.map_or_else(Grant::default, |Extension(c)| Grant { owner: Some(c.owner), max_size: c.max_size });
    let headers = state
        .uploads
        .forwarded_headers()
        .iter()
        .filter_map(|name| Some((name.clone(), request_headers.get(name.as_str())?.to_str().ok()?.to_string())))
        .collect();
    let proposal = Proposal { length, metadata, concat, grant, headers, expected_sha256: None };
    Ok(state.uploads.admit(proposal).await?)
}
