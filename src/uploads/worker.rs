//! Background work that must not happen inside a request: sweeping expired uploads and
//! assembling final concatenations. Both are durable (driven by database state) and safe to run
//! on every instance at once.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use futures_util::{StreamExt, TryStreamExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    Uploads, now_ms,
    types::{Concat, FileHasher},
};
use crate::store::{ByteStream, StoreError};

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
        let Concat::Final(parts) = &row.concat else {
            // A multipart upload whose parts are all stored: complete it.
            self.finish_parts(row.id, &row.store).await?;
            return Ok(true);
        };
        tracing::info!(upload = %row.id, parts = parts.len(), "assembling final upload");

        // Stream every partial, in order, into the final upload's object, hashing on the way.
        let hasher = Arc::new(Mutex::new(FileHasher::new()));
        let store = self.store.clone();
        // Each partial's bytes are where its own key prefix put them.
        let mut sources = Vec::with_capacity(parts.len());
        for part in parts {
            let stored = self.repo.get(*part).await?.map(|r| r.store).unwrap_or_default();
            sources.push((*part, stored));
        }
        let parts = sources;
        let reader: ByteStream = futures_util::stream::iter(parts)
            .then(move |part| {
                let store = store.clone();
                async move { store.read(part.0, &part.1, None).await.map(|download| download.stream) }
            })
            .try_flatten()
            .inspect_ok({
                let hasher = hasher.clone();
                move |chunk| hasher.lock().expect("hasher lock").update(chunk)
            })
            .boxed();
        // Renew the lease while the copy runs, so that a long job is not taken over.
        let renew = {
            let repo = self.repo.clone();
            let id = row.id;
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
        };
        let written = self.store.write_stream(row.id, &row.store, reader).await;
        renew.abort();
        let written = match written {
            Ok(written) => written,
            Err(StoreError::NotFound) => anyhow::bail!("a partial upload of {} has no bytes", row.id),
            Err(e) => return Err(e.into()),
        };
        if Some(written) != row.length {
            anyhow::bail!("assembled {written} bytes for {} but expected {:?}", row.id, row.length);
        }
        let sha256 = Arc::try_unwrap(hasher)
            .map_err(|_| anyhow::anyhow!("hasher still shared"))?
            .into_inner()
            .expect("hasher lock")
            .finish();
        let done = crate::repo::UploadRow {
            state: crate::uploads::types::UploadState::Completed,
            offset: written,
            sha256: Some(sha256),
            ..row.clone()
        };
        let events = [self.event(super::events::EventKind::Completed, &done)];
        if self.repo.finish_completion(row.id, Some(sha256), now_ms(), &events).await? {
            self.metrics.uploads_completed.inc();
            tracing::info!(upload = %row.id, length = written, "final upload completed");
        }
        Ok(true)
    }
}
