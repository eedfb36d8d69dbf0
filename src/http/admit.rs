//! Admitting a new upload, whichever protocol asks: the owner and size limit from the caller's
//! token, then the application's pre-create hook, merged into the domain's creation request.

use axum::Extension;
use http::HeaderMap;

use super::{AppState, auth::Caller, error::ApiError};
use crate::hooks::precreate::{Decision, PreCreateRequest};
use crate::uploads::{CreateConcat, CreateRequest, types::Metadata};

/// Asks what the caller's token and the pre-create hook (when configured) allow for an upload
/// of `length` bytes (None: not known yet) with `metadata`.
pub async fn admit(
    state: &AppState,
    caller: Option<Extension<Caller>>,
    request_headers: &HeaderMap,
    length: Option<u64>,
    mut metadata: Metadata,
    concat: CreateConcat,
) -> Result<CreateRequest, ApiError> {
    let caller = caller.map(|Extension(caller)| caller);
    let mut owner = caller.as_ref().map(|c| c.owner.clone());
    let mut max_size = caller.as_ref().and_then(|c| c.max_size);
    let mut key_prefix = None;
    if let Some(precreate) = &state.precreate {
        let request = PreCreateRequest {
            length,
            metadata: metadata.decoded().into_iter().collect(),
            concat: match &concat {
                CreateConcat::None => None,
                CreateConcat::Partial => Some("partial"),
                CreateConcat::Final(_) => Some("final"),
            },
            headers: precreate
                .forward_headers()
                .iter()
                .filter_map(|name| {
                    let value = request_headers.get(name.as_str())?.to_str().ok()?;
                    Some((name.clone(), value.to_string()))
                })
                .collect(),
        };
        match precreate.ask(&request).await {
            Decision::Allow(allowed) => {
                for (key, value) in &allowed.metadata {
                    metadata.insert(key, value);
                }
                // A token's subject wins over the hook's owner; the smaller size limit wins.
                owner = owner.or(allowed.owner);
                key_prefix = allowed.key_prefix;
                max_size = match (max_size, allowed.max_size) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
            Decision::Deny { status, message } => return Err(ApiError::Refused { status, message }),
            Decision::Unavailable(reason) => {
                tracing::warn!(%reason, "the pre-create hook could not be asked");
                return Err(ApiError::Unavailable(
                    "the application that approves uploads did not answer; nothing was created, try again later".into(),
                ));
            }
        }
    }
    Ok(CreateRequest { length, metadata, concat, owner, max_size, key_prefix, expected_sha256: None })
}
