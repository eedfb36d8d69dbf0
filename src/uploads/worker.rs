//! Background work that must not happen inside a request: sweeping expired uploads, completing
//! multipart uploads and computing final concatenations' SHA-256. Both are durable (driven by database state) and safe to run
//! on every instance at once.

use std::time::Duration;

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Upload, Uploads, now_ms,
    types::{Concat, FileHasher, UploadState},
};
use crate::{model::parts::Piece, repo::UploadRow, store::StoreError};

/// How long a completion job is held before another instance may take it over.
const COMPLETION_LEASE: Duration = Duration::from_secs(120);
/// How often an instance looks for completion jobs when nothing woke it.
const COMPLETION_POLL: Duration = Duration::from_secs(2);

/// Starts the sweeper and the completion worker; both stop when `shutdown` is cancelled.
pub fn spawn_background(uploads: Uploads, shutdown: CancellationToken) -> Vec<JoinHandle<()>> {
    let sweeper = {
        let uploads = uploads.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(uploads.settings.sweep_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = interval.tick() => {}
                }
                if let Err(e) = uploads.sweep().await {
                    tracing::warn!(error = %e, "sweep failed; retrying at the next interval");
                }
            }
        })
    };
    let completer = tokio::spawn(async move {
        loop {
            match uploads.complete_one().await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "completion job failed; it will be retried"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = uploads.completion_wanted.notified() => {}
                _ = tokio::time::sleep(COMPLETION_POLL) => {}
            }
        }
    });
    vec![sweeper, completer]
}

impl Uploads {
    /// Claims and runs one completion job; returns false when there was none.
    pub async fn complete_one(&self) -> anyhow::Result<bool> {
        let now = now_ms();
        let lease_until = now + COMPLETION_LEASE.as_millis() as i64;
        let Some(row) = self.repo.claim_completion(now, lease_until).await? else {
            return Ok(false);
        };
        match (&row.state, &row.concat) {
            (UploadState::Completing, Concat::Final(parts)) => self.adopt(&row, parts).await?,
            // A multipart upload whose parts are all stored: complete it.
            (UploadState::Completing, _) => self.finish_parts(row.id, &row.store).await?,
            _ => self.digest(&row, lease_until).await?,
        }
        Ok(true)
    }

    /// A final upload left assembling by an earlier version, which copied the partials' bytes:
    /// from now on it is read from them, and only its SHA-256 remains to be computed.
    async fn adopt(&self, row: &UploadRow, parts: &[super::types::UploadId]) -> anyhow::Result<()> {
        let mut pieces = Vec::with_capacity(parts.len());
        let mut start = 0;
        for part in parts {
            let Some(partial) = self.repo.get(*part).await? else {
                anyhow::bail!("partial upload {part} of final upload {} is gone", row.id);
            };
            let size = partial.length.unwrap_or(partial.offset);
            pieces.push(Piece { upload: *part, start, size, key_prefix: partial.store.key_prefix.clone() });
            start += size;
        }
        if self.repo.adopt_pieces(row.id, &pieces, now_ms()).await? {
            tracing::info!(upload = %row.id, parts = parts.len(), "final upload now read from its partial uploads");
            self.completion_wanted.notify_one();
        }
        Ok(())
    }

    /// Computes the whole-file SHA-256 of a completed upload that has none yet (a final upload,
    /// read from its pieces), and records it with `upload.completed`. The first piece is not
    /// read again when the final upload's saved hash state already covers it.
    async fn digest(&self, row: &UploadRow, lease_until: i64) -> anyhow::Result<()> {
        let pieces = self.repo.pieces(row.id).await?;
        let (hasher, from) = match pieces.first() {
            Some(first) => match FileHasher::restore(&row.hash_state) {
                Ok(state) if self.covers(first, &row.hash_state).await? => (state, first.end()),
                _ => (FileHasher::new(), 0),
            },
            None => (FileHasher::new(), 0),
        };
        let length = row.length.unwrap_or(row.offset);
        let upload = Upload::from(row.clone());
        let stream = if from < length { Some(self.download(&upload, Some(from..length)).await?.stream) } else { None };

        // Hashing runs on a blocking thread, fed through a bounded queue while the stream reads on.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(8);
        let hashing = tokio::task::spawn_blocking(move || {
            let mut hasher = hasher;
            let mut hashed = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                hashed += chunk.len() as u64;
                hasher.update(&chunk);
            }
            (hasher, hashed)
        });
        let renew = self.renew_lease(row.id, lease_until);
        let read = async {
            if let Some(mut stream) = stream {
                while let Some(chunk) = stream.next().await {
                    if tx.send(chunk?).await.is_err() {
                        break;
                    }
                }
            }
            drop(tx);
            Ok::<_, StoreError>(())
        }
        .await;
        renew.abort();
        let (hasher, hashed) = hashing.await?;
        read?;
        if from + hashed != length {
            anyhow::bail!("read {} bytes of upload {} but it has {length}", from + hashed, row.id);
        }
        let sha256 = hasher.finish();
        let done = UploadRow { sha256: Some(sha256), ..row.clone() };
        let events = [self.event(super::events::EventKind::Completed, &done)];
        if self.repo.record_digest(row.id, sha256, now_ms(), &events).await? {
            tracing::info!(upload = %row.id, length, "final upload's SHA-256 computed");
        }
        Ok(())
    }

    /// True when `hash_state` is the first piece's partial upload's own state after its last
    /// byte, which the final upload took over at creation.
    async fn covers(&self, first: &Piece, hash_state: &[u8]) -> anyhow::Result<bool> {
        Ok(self
            .repo
            .get(first.upload)
            .await?
            .is_some_and(|partial| partial.hash_state == hash_state && partial.offset == first.size))
    }

    /// Renews a completion lease while a job runs, so that a long job is not taken over.
    fn renew_lease(&self, id: super::types::UploadId, lease_until: i64) -> JoinHandle<()> {
        let repo = self.repo.clone();
        tokio::spawn(async move {
            let mut held = lease_until;
            loop {
                tokio::time::sleep(COMPLETION_LEASE / 3).await;
                let next = now_ms() + COMPLETION_LEASE.as_millis() as i64;
                match repo.renew_completion(id, held, next).await {
                    Ok(true) => held = next,
                    _ => break,
                }
            }
        })
    }
}
