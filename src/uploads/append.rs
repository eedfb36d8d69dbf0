//! Appending to an upload, in its steps: lease, receive, commit, complete.
//!
//! One PATCH costs the database two statements on the way that matters: the lease (which also
//! reads the row, checks the owner, the offset and the lengths, and hands out the writer
//! generation) and the commit (compare-and-set of the offset on that generation, with the hash
//! state, and the parts and the event when there are any). Failures read the row once more to
//! answer precisely.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;

use super::{
    AppendRequest, Appended, BodyEvent, BodyStream, Result, UploadError, Uploads,
    events::EventKind,
    now_ms,
    pipeline::{Ending, Pipeline, Received},
    superseded,
    types::{Concat, UploadState},
};
use crate::{
    repo::{AppendCommit, Lease, PartClaim, Repo, RepoError, UploadRow},
    store::{AppendContext, StoreError, WriterCheck},
};

/// How long the last PATCH waits for the store to complete the upload before it answers anyway
/// (the completion goes on in the background).
pub const COMPLETION_WAIT: Duration = Duration::from_secs(2);

/// At most this much of a refused request's body is read and discarded before answering.
const DRAIN_LIMIT: u64 = 64 << 20;

/// How long a part-upload claim holds before another writer may assume its holder died.
const PART_CLAIM: Duration = Duration::from_secs(120);

impl Uploads {
    /// Streams a request body into the store at the client's offset and commits the new offset
    /// by compare-and-set. A body cut off mid-way keeps what arrived (unless a checksum was asked
    /// for, which a partial body cannot satisfy).
    pub async fn append(&self, request: AppendRequest, body: BodyStream) -> Result<Appended> {
        // The append runs in the request's own task (where the connection is read, so frames
        // reach it without crossing threads), and goes on in a task of its own if the request
        // future is dropped (the connection went away mid-body): what arrived is still stored
        // and committed.
        let uploads = self.clone();
        let span = tracing::Span::current();
        let task = async move {
            let mut body = body;
            let (id, owner) = (request.id, request.owner.clone());
            let result = uploads.append_here(request, &mut body).await;
            if matches!(result, Err(UploadError::DigestMismatch(_))) {
                // Its bytes are not the file the client meant: the upload has failed.
                if let Err(e) = uploads.terminate(id, owner.as_deref()).await {
                    tracing::warn!(upload = %id, error = %e, "could not discard an upload whose digest did not match");
                }
            }
            if matches!(result, Err(ref e) if e.body_may_still_arrive()) {
                // Read what the client is still sending, so that it hears the answer instead
                // of a connection reset mid-upload (bounded: a request is at most one chunk).
                drain(&mut body, DRAIN_LIMIT, uploads.settings.idle_timeout).await;
            }
            result
        };
        FinishOnDrop::new(tracing::Instrument::instrument(task, span)).await
    }

    async fn append_here(&self, request: AppendRequest, body: &mut BodyStream) -> Result<Appended> {
        if let Some(declared) = request.length
            && declared < request.offset
        {
            return Err(UploadError::LengthMismatch(format!(
                "Upload-Length {declared} is smaller than the {} bytes already received",
                request.offset
            )));
        }
        if request.content_length != Some(0)
            && let Some(message) = self.reserve.refuse(0)
        {
            return Err(UploadError::StorageFull(message));
        }
        // The body is received from the start; the lease and the store's side are ready
        // meanwhile, and the stages start with them.
        let idle_timeout = self.settings.idle_timeout;
        let provisional = self.settings.max_size.saturating_sub(request.offset);
        let likely_state = self.writers.committed_state(request.id, request.offset);
        let mut pipeline =
            Pipeline::new(request.checksum.clone(), self.budget.clone(), idle_timeout, provisional, likely_state);
        pipeline.keep_free(self.reserve.clone());
        let (row, writer, appender) = pipeline.receive_during(body, self.open_append(&request)).await?;
        let length = row.length.or(request.length);
        let remaining = length.unwrap_or(self.limit_of(row.size_limit)) - request.offset;
        let known = length.is_some();
        pipeline.attach(appender, &row.hash_state, remaining).await.map_err(|e| e.past_length_if(known))?;
        let ending =
            pipeline.receive(body, &self.stopping, writer.stopped()).await.map_err(|e| e.past_length_if(known))?;

        // From here until the commit, newer requests for this upload on this instance wait.
        let Some(_committing) = writer.committing().await else {
            return Err(superseded());
        };
        // These bytes complete the upload when they reach its (known) length, or when the body
        // was to complete it and arrived whole (its length becomes what arrived).
        let whole = matches!(ending, Ending::Complete);
        let last = whole
            && match length {
                Some(length) => length == request.offset + pipeline.received(),
                None => request.completes,
            };
        let received = pipeline.finish(ending, last).await?;
        self.commit(&request, &row, length, received).await
    }

    /// Leases the upload (waiting for a writer of this instance that is committing, and holding
    /// off newer ones meanwhile), registers this writer, and opens the store's side.
    async fn open_append(
        &self,
        request: &AppendRequest,
    ) -> Result<(UploadRow, super::writers::Writer<'_>, Box<dyn crate::store::Appender>)> {
        let entry = self.writers.enter(request.id).await;
        let row = self.lease(request).await?;
        let writer = entry.register(row.write_gen, request.client.clone()).await;
        let staged = if row.staged_count > 0 { self.repo.staged(request.id).await? } else { Vec::new() };
        let context = AppendContext {
            id: request.id,
            offset: request.offset,
            generation: row.write_gen,
            upload: row.store.clone(),
            staged,
            check: Arc::new(CurrentWriter { repo: self.repo.clone(), id: request.id, generation: row.write_gen }),
            stop: writer.stopped().clone(),
        };
        let appender = self.store.append(context).await?;
        Ok((row, writer, appender))
    }

    /// Takes the right to append at the request's offset. On refusal, reads the upload once more
    /// to say why.
    async fn lease(&self, request: &AppendRequest) -> Result<UploadRow> {
        let now = now_ms();
        let lease = Lease {
            id: request.id,
            offset: request.offset,
            owner: request.owner.clone(),
            length: request.length,
            content_length: request.content_length,
            max_size: self.settings.max_size,
            now,
            expires_at: Some(self.expiry(now)),
        };
        if let Some(row) = self.repo.lease_append(&lease).await? {
            return Ok(row);
        }
        let row = self.load_owned(request.id, request.owner.as_deref()).await?;
        self.check_appendable(&row, request)?;
        // Something changed between the two statements: the current state answers next time.
        Err(superseded())
    }

    /// Commits what a body brought: moves the offset, saves the hash state and the parts; when
    /// the upload is complete, records that and its event in the same transaction.
    async fn commit(
        &self,
        request: &AppendRequest,
        row: &UploadRow,
        length: Option<u64>,
        received: Received,
    ) -> Result<Appended> {
        self.check_received(&received)?;
        let to_offset = request.offset + received.bytes;
        let settled = Settled::of(request, length, &received);
        let completes = settled.length == Some(to_offset);
        let needs_assembly = completes && !self.store.completes_in_place();
        let sha256 = completes.then(|| received.hasher.clone().finish());
        check_digest(row, sha256)?;
        let events = if completes && !needs_assembly {
            let done = UploadRow {
                offset: to_offset,
                length: Some(to_offset),
                sha256,
                state: UploadState::Completed,
                ..row.clone()
            };
            vec![self.event(EventKind::Completed, &done)]
        } else {
            Vec::new()
        };
        let now = now_ms();
        let consumed = received.outcome.consumed.clone();
        let commit = AppendCommit {
            id: request.id,
            generation: row.write_gen,
            from_offset: request.offset,
            to_offset,
            hash_state: received.hasher.save(),
            length: settled.declared,
            sha256,
            events,
            needs_assembly,
            outcome: received.outcome,
            now,
            expires_at: (!completes).then(|| self.expiry(now)),
        };
        if !self.repo.commit_append(&commit).await? {
            return Err(superseded());
        }
        if !completes {
            self.writers.committed(request.id, to_offset, &commit.hash_state);
        }
        self.metrics.bytes_received.inc_by(received.bytes);
        self.after_commit(request.id, row, consumed, needs_assembly, completes.then_some(to_offset)).await;

        if let Some(error) = received.ending.into_error(self.settings.idle_timeout) {
            return Err(error);
        }
        if settled.short {
            return Err(UploadError::LengthMismatch(format!(
                "the body was to complete the upload, but the upload's length is {} and it is at {to_offset}; \
                 the bytes were kept: append the rest",
                settled.length.unwrap_or_default()
            )));
        }
        Ok(Appended { offset: to_offset, completed: completes, sha256, expires_at: commit.expires_at })
    }

    /// A checksum vouches for a whole body: a cut-off or mismatching body is discarded.
    fn check_received(&self, received: &Received) -> Result<()> {
        let whole = matches!(received.ending, Ending::Complete);
        match received.checksum_ok {
            Some(false) if whole => Err(UploadError::ChecksumMismatch),
            Some(_) if !whole => Err(received
                .ending
                .clone()
                .into_error(self.settings.idle_timeout)
                .unwrap_or(UploadError::ChecksumMismatch)),
            _ => Ok(()),
        }
    }

    /// What follows a commit: merged staged objects are deleted; a complete upload is
    /// assembled by its store (object stores) or counted as completed.
    async fn after_commit(
        &self,
        id: super::types::UploadId,
        row: &UploadRow,
        consumed: Vec<String>,
        needs_assembly: bool,
        completed_at: Option<u64>,
    ) {
        // Staged bytes now live in a part; their objects can go.
        for key in consumed {
            if let Err(e) = self.store.delete_staged(&key).await {
                tracing::warn!(upload = %id, error = %e, "could not delete a merged staged object");
            }
        }
        if needs_assembly {
            self.complete_parts(id, row).await;
        } else if let Some(length) = completed_at {
            self.metrics.uploads_completed.inc();
            tracing::info!(upload = %id, length, "upload completed");
        }
    }

    /// Completes the multipart upload (no byte is copied) without holding up the answer for
    /// long: the store's side of completing may grow with the file. The state is durable, so if
    /// this fails or the instance dies, the background job finishes it on any instance.
    async fn complete_parts(&self, id: super::types::UploadId, row: &UploadRow) {
        let uploads = self.clone();
        let store = row.store.clone();
        let completing = tokio::spawn(async move {
            if let Err(e) = uploads.finish_parts(id, &store).await {
                tracing::warn!(upload = %id, error = %e, "completing the upload failed; retrying in the background");
                uploads.completion_wanted.notify_one();
            }
        });
        // Usually quick: wait a little so that the upload is downloadable when the client
        // hears back, but never longer than a fixed bound.
        let _ = tokio::time::timeout(COMPLETION_WAIT, completing).await;
    }

    /// Checks that an upload accepts an append at the request's offset; returns its length
    /// (the declared one for a deferred upload).
    pub(super) fn check_appendable(&self, row: &UploadRow, request: &AppendRequest) -> Result<Option<u64>> {
        if matches!(row.concat, Concat::Final(_)) {
            return Err(UploadError::Forbidden(
                "a final upload is assembled from its partial uploads and cannot be appended to".into(),
            ));
        }
        if row.offset != request.offset {
            return Err(UploadError::OffsetMismatch { expected: row.offset, provided: request.offset });
        }
        if row.state != UploadState::Receiving {
            return Err(UploadError::AlreadyComplete);
        }
        let length = match (row.length, request.length) {
            (Some(known), Some(declared)) if known != declared => {
                return Err(UploadError::LengthMismatch(format!(
                    "the upload's length is already {known} and cannot change to {declared}"
                )));
            }
            (Some(known), _) => Some(known),
            (None, Some(declared)) => {
                self.check_size(declared)?;
                let limit = self.limit_of(row.size_limit);
                if declared > limit {
                    return Err(UploadError::TooLarge(format!(
                        "Upload-Length {declared} is larger than the {limit} bytes this upload may have"
                    )));
                }
                if declared < row.offset {
                    return Err(UploadError::LengthMismatch(format!(
                        "Upload-Length {declared} is smaller than the {} bytes already received",
                        row.offset
                    )));
                }
                Some(declared)
            }
            (None, None) => None,
        };
        let remaining = length.unwrap_or(self.limit_of(row.size_limit)) - request.offset;
        if let Some(content_length) = request.content_length
            && content_length > remaining
        {
            return Err(UploadError::TooLarge(format!(
                "the body is {content_length} bytes but only {remaining} remain before the upload's length"
            ))
            .past_length_if(length.is_some()));
        }
        Ok(length)
    }
}

/// The upload's length as this append leaves it.
struct Settled {
    length: Option<u64>,
    /// A length this append declares (to record, when the upload's was deferred).
    declared: Option<u64>,
    /// The body was to complete the upload but ended before its length.
    short: bool,
}

impl Settled {
    fn of(request: &AppendRequest, length: Option<u64>, received: &Received) -> Self {
        let to_offset = request.offset + received.bytes;
        let whole = matches!(received.ending, Ending::Complete);
        // A body that ends the upload and arrived whole gives a deferred upload its length.
        if request.completes && whole && length.is_none() {
            return Self { length: Some(to_offset), declared: Some(to_offset), short: false };
        }
        let short = request.completes && whole && length.is_some_and(|l| l != to_offset);
        Self { length, declared: request.length, short }
    }
}

/// The bytes of a completed upload against the `Repr-Digest` announced at its creation; on a
/// mismatch nothing is committed, and the upload is discarded once the request lets go of it.
fn check_digest(row: &UploadRow, sha256: Option<[u8; 32]>) -> Result<()> {
    match (row.expected_sha256, sha256) {
        (Some(expected), Some(actual)) if expected != actual => {
            let hex = |d: &[u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
            Err(UploadError::DigestMismatch(format!("announced {}, received {}", hex(&expected), hex(&actual))))
        }
        _ => Ok(()),
    }
}

/// A future that, when dropped before it is done, is not cancelled but finishes in a task of
/// its own.
struct FinishOnDrop<F: Future<Output: Send> + Send + 'static> {
    inner: Option<std::pin::Pin<Box<F>>>,
}

impl<F: Future<Output: Send> + Send + 'static> FinishOnDrop<F> {
    fn new(future: F) -> Self {
        Self { inner: Some(Box::pin(future)) }
    }
}

impl<F: Future<Output: Send> + Send + 'static> Future for FinishOnDrop<F> {
    type Output = F::Output;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<F::Output> {
        let inner = self.inner.as_mut().expect("polled after completion");
        let output = std::task::ready!(inner.as_mut().poll(cx));
        self.inner = None;
        std::task::Poll::Ready(output)
    }
}

impl<F: Future<Output: Send> + Send + 'static> Drop for FinishOnDrop<F> {
    fn drop(&mut self) {
        if let Some(rest) = self.inner.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(rest);
        }
    }
}

/// Reads and discards what is left of a body, up to `limit` bytes, while it keeps moving.
async fn drain(body: &mut BodyStream, limit: u64, idle_timeout: Duration) {
    let mut read = 0u64;
    while read < limit {
        match tokio::time::timeout(idle_timeout, body.next()).await {
            Ok(Some(Ok(BodyEvent::Data(data)))) => read += data.len() as u64,
            Ok(Some(Ok(BodyEvent::TrailerChecksum(_)))) => {}
            _ => break,
        }
    }
}

/// Answers an object store's question "is this writer still the newest?" from the database.
struct CurrentWriter {
    repo: Arc<dyn Repo>,
    id: super::types::UploadId,
    generation: i64,
}

#[async_trait::async_trait]
impl WriterCheck for CurrentWriter {
    async fn begin_part(&self) -> std::result::Result<(), StoreError> {
        let other = |e: RepoError| StoreError::Other(format!("could not claim the part upload: {e}"));
        loop {
            let now = now_ms();
            let claim = self.repo.claim_part_upload(self.id, self.generation, now, now + PART_CLAIM.as_millis() as i64);
            match claim.await.map_err(other)? {
                PartClaim::Granted => return Ok(()),
                PartClaim::Superseded => return Err(StoreError::Superseded),
                // An older writer is finishing a part upload: let it land first, then overwrite it.
                PartClaim::Busy => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    async fn is_newest(&self) -> std::result::Result<bool, StoreError> {
        let row =
            self.repo.get(self.id).await.map_err(|e| StoreError::Other(format!("could not read the upload: {e}")))?;
        Ok(row.is_some_and(|row| row.write_gen == self.generation && row.state == UploadState::Receiving))
    }

    async fn end_part(&self) {
        if let Err(e) = self.repo.release_part_upload(self.id, self.generation).await {
            tracing::warn!(upload = %self.id, error = %e, "could not release a part-upload claim; it lapses by itself");
        }
    }
}
