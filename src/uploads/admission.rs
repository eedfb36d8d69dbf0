//! Admitting a new upload, whichever protocol asks: the owner and size limit the caller's token
//! grants, then the application's pre-create hook, merged into one creation request.

use std::collections::BTreeMap;

use super::{CreateConcat, CreateRequest, Result, UploadError, Uploads, types::Metadata};
use crate::hooks::precreate::{Decision, PreCreateRequest};

/// What the caller's upload token grants (nothing, without tokens).
#[derive(Debug, Clone, Default)]
pub struct Grant {
    /// The token's subject: the upload's owner.
    pub owner: Option<String>,
    /// A smaller size limit than `--max-size`.
    pub max_size: Option<u64>,
}

/// A new upload as a protocol asks for it.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub length: Option<u64>,
    pub metadata: Metadata,
    pub concat: CreateConcat,
    pub grant: Grant,
    /// The request's headers the pre-create hook asked to see (see
    /// [`Uploads::forwarded_headers`]), lower-case names.
    pub headers: BTreeMap<String, String>,
    pub expected_sha256: Option<[u8; 32]>,
}

impl Uploads {
    /// The request headers the pre-create hook wants forwarded (lower-case names).
    pub fn forwarded_headers(&self) -> &[String] {
        self.precreate.as_ref().map_or(&[], |p| p.forward_headers())
    }

    /// Asks the pre-create hook (when configured) about a proposed upload and merges its answer
    /// with the caller's grant: the token's subject wins over the hook's owner, the smaller
    /// size limit wins, the hook's metadata is added.
    pub async fn admit(&self, proposal: Proposal) -> Result<CreateRequest> {
        let Proposal { length, mut metadata, concat, grant, headers, expected_sha256 } = proposal;
        let mut owner = grant.owner;
        let mut max_size = grant.max_size;
        let mut key_prefix = None;
        if let Some(precreate) = &self.precreate {
            let request = PreCreateRequest {
                length,
                metadata: metadata.decoded().into_iter().collect(),
                concat: match &concat {
                    CreateConcat::None => None,
                    CreateConcat::Partial => Some("partial"),
                    CreateConcat::Final(_) => Some("final"),
                },
                headers,
            };
            match precreate.ask(&request).await {
                Decision::Allow(allowed) => {
                    for (key, value) in &allowed.metadata {
                        metadata.insert(key, value);
                    }
                    owner = owner.or(allowed.owner);
                    key_prefix = allowed.key_prefix;
                    max_size = match (max_size, allowed.max_size) {
                        (Some(a), Some(b)) => Some(a.min(b)),
                        (a, b) => a.or(b),
                    };
                }
                Decision::Deny { status, message } => return Err(UploadError::Refused { status, message }),
                Decision::Unavailable(reason) => {
                    tracing::warn!(%reason, "the pre-create hook could not be asked");
                    return Err(UploadError::Unavailable(
                        "the application that approves uploads did not answer; nothing was created, try again later"
                            .into(),
                    ));
                }
            }
        }
        Ok(CreateRequest { length, metadata, concat, owner, max_size, key_prefix, expected_sha256 })
    }
}
