//! The append pipeline: the request task only receives the body and hands the frames on (as
//! `Bytes`, never copied); hashing and writing run beside it on blocking threads, each stage one
//! batch at a time, so one upload moves at the speed of its slowest stage, not of their sum.
//!
//! ```text
//! socket -> request task -> pending -> batch -+-> hash stage  (whole-file SHA-256, checksum)
//!                                             +-> write stage (store; vectored writes)
//! ```
//!
//! Every frame holds its share of the instance's [`Budget`] until the last stage lets go of its
//! bytes, so all appends of an instance together never hold more than the budget; a request that
//! finds it spent stops reading its body (TCP pushes back on the client) until bytes are written.
//! Per upload, at most one batch waits for each stage beside the ones being worked on, and at most
//! [`PENDING_LIMIT`] bytes wait to become a batch.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::{
    sync::{AcquireError, OwnedSemaphorePermit, Semaphore},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use super::{
    BodyEvent, BodyStream, Result, UploadError,
    types::{Checksum, ChecksumAlgorithm, ChecksumHasher, ChecksumPlan, FileHasher},
};
use crate::store::{AppendOutcome, Appender, StoreError};

/// A batch handed to the stages holds at most this many bytes (whole frames; a larger frame
/// makes a batch of its own).
pub const BATCH_LIMIT: u64 = 1 << 20;
/// Bytes received and not yet in a batch, per upload, beyond which the body is not read.
pub const PENDING_LIMIT: u64 = 1 << 20;
/// The smallest budget allowed: well above the largest frame the HTTP layer hands over.
pub const MIN_BUDGET: u64 = 1 << 20;

/// The bytes all appends of one instance may hold in memory at once (`--memory-budget`).
#[derive(Clone)]
pub struct Budget {
    semaphore: Arc<Semaphore>,
    total: u64,
}

impl Budget {
    pub fn new(bytes: u64) -> Self {
        let total = bytes.clamp(MIN_BUDGET, u64::from(u32::MAX));
        Self { semaphore: Arc::new(Semaphore::new(total as usize)), total }
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    /// Bytes held by appends right now (received, not yet let go by every stage).
    pub fn in_use(&self) -> u64 {
        self.total - self.semaphore.available_permits() as u64
    }

    fn acquire(&self, bytes: u64) -> Acquiring {
        let bytes = bytes.min(self.total) as u32;
        Box::pin(self.semaphore.clone().acquire_many_owned(bytes))
    }
}

type Acquiring = Pin<Box<dyn Future<Output = std::result::Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// A received frame's bytes together with its share of the budget: the share goes back when the
/// last stage drops the bytes.
struct Held {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

/// How a body ended.
pub enum Ending {
    Complete,
    TimedOut,
    CutOff(String),
    /// The instance is shutting down.
    Stopped,
}

impl Ending {
    pub fn into_error(self, idle_timeout: Duration) -> Option<UploadError> {
        match self {
            Ending::Complete => None,
            Ending::TimedOut => Some(UploadError::BodyTimeout(idle_timeout)),
            Ending::CutOff(reason) => Some(UploadError::BodyCutOff(reason)),
            Ending::Stopped => Some(UploadError::ShuttingDown),
        }
    }
}

/// What the hash stage carries from batch to batch.
struct Hashes {
    file: FileHasher,
    /// Per-request checksums (`Upload-Checksum`); with a trailer, every supported algorithm.
    chunk: Vec<ChecksumHasher>,
}

/// What an append received, once every stage is done with it.
pub struct Received {
    pub bytes: u64,
    pub hasher: FileHasher,
    /// None when no checksum was asked for; otherwise whether the body matched it.
    pub checksum_ok: Option<bool>,
    pub ending: Ending,
    pub outcome: AppendOutcome,
}

/// Limits of one body.
pub struct Bounds {
    /// How many bytes the body may carry.
    pub remaining: u64,
    pub idle_timeout: Duration,
}

type Written = (Box<dyn Appender>, crate::store::Result<()>);

/// One append's stages and what is between them.
pub struct Pipeline {
    budget: Budget,
    bounds: Bounds,
    plan: ChecksumPlan,
    /// The checksum to verify (from the header, or the trailer once it came).
    expected: Option<Checksum>,
    /// Budget taken and not yet given to a frame.
    credit: Option<OwnedSemaphorePermit>,
    /// A frame waiting for budget; the body is not read meanwhile.
    parked: Option<Bytes>,
    acquiring: Option<Acquiring>,
    pending: Vec<Bytes>,
    pending_len: u64,
    /// The next batch of each stage, when that stage is busy.
    to_hash: Option<Vec<Bytes>>,
    to_write: Option<Vec<Bytes>>,
    hashes: Option<Hashes>,
    hashing: Option<JoinHandle<Hashes>>,
    appender: Option<Box<dyn Appender>>,
    writing: Option<JoinHandle<Written>>,
    received: u64,
}

/// Awaits the future in `slot`, or never when there is none (for `select!` branches).
async fn next_of<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

fn task_failed(stage: &str, e: tokio::task::JoinError) -> UploadError {
    UploadError::Internal(anyhow::anyhow!("the {stage} stage of an append failed: {e}"))
}

impl Pipeline {
    pub fn new(
        appender: Box<dyn Appender>,
        hasher: FileHasher,
        plan: ChecksumPlan,
        budget: Budget,
        bounds: Bounds,
    ) -> Self {
        let chunk = match &plan {
            ChecksumPlan::None => Vec::new(),
            ChecksumPlan::Header(checksum) => vec![checksum.hasher()],
            ChecksumPlan::Trailer => ChecksumAlgorithm::ALL.iter().map(|a| a.hasher()).collect(),
        };
        let expected = match &plan {
            ChecksumPlan::Header(checksum) => Some(checksum.clone()),
            _ => None,
        };
        Self {
            budget,
            bounds,
            plan,
            expected,
            credit: None,
            parked: None,
            acquiring: None,
            pending: Vec::new(),
            pending_len: 0,
            to_hash: None,
            to_write: None,
            hashes: Some(Hashes { file: hasher, chunk }),
            hashing: None,
            appender: Some(appender),
            writing: None,
            received: 0,
        }
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Receives the body until it ends (completely, cut off, stalled, or the instance stops),
    /// while the stages work. Returns at once, with an error, when `superseded` is cancelled or a
    /// stage fails; bytes that are still on their way to the store then do no harm (the offset
    /// does not move, and a newer writer writes over them).
    pub async fn receive(
        &mut self,
        body: &mut BodyStream,
        stopping: &CancellationToken,
        superseded: &CancellationToken,
    ) -> Result<Ending> {
        loop {
            self.dispatch();
            let reading = self.parked.is_none() && self.pending_len < PENDING_LIMIT;
            let idle_timeout = self.bounds.idle_timeout;
            tokio::select! {
                biased;
                () = superseded.cancelled() => return Err(super::superseded()),
                () = stopping.cancelled() => return Ok(Ending::Stopped),
                hashed = next_of(&mut self.hashing) => {
                    self.hashing = None;
                    self.hashes = Some(hashed.map_err(|e| task_failed("hash", e))?);
                }
                written = next_of(&mut self.writing) => {
                    self.writing = None;
                    self.wrote(written)?;
                }
                permit = next_of(&mut self.acquiring) => {
                    self.acquiring = None;
                    let permit = permit.map_err(|e| UploadError::Internal(e.into()))?;
                    self.add_credit(permit);
                    if let Some(frame) = self.parked.take() {
                        self.take_frame(frame);
                    }
                }
                next = tokio::time::timeout(idle_timeout, body.next()), if reading => match next {
                    Err(_) => return Ok(Ending::TimedOut),
                    Ok(None) => return Ok(Ending::Complete),
                    Ok(Some(Err(reason))) => return Ok(Ending::CutOff(reason)),
                    Ok(Some(Ok(BodyEvent::Data(data)))) => self.arrived(data)?,
                    Ok(Some(Ok(BodyEvent::TrailerChecksum(parsed)))) => self.trailer(parsed)?,
                },
            }
        }
    }

    /// Lets every stage finish what was received, then makes it durable (`last`: these bytes
    /// complete the upload). The store's flush starts as soon as the last write is done, beside
    /// the hash stage's last batch.
    pub async fn finish(mut self, ending: Ending, last: bool) -> Result<Received> {
        loop {
            self.dispatch();
            let writes_done =
                self.parked.is_none() && self.pending.is_empty() && self.to_write.is_none() && self.writing.is_none();
            if writes_done {
                break;
            }
            tokio::select! {
                hashed = next_of(&mut self.hashing) => {
                    self.hashing = None;
                    self.hashes = Some(hashed.map_err(|e| task_failed("hash", e))?);
                }
                written = next_of(&mut self.writing) => {
                    self.writing = None;
                    self.wrote(written)?;
                }
                // A frame that arrived last may still wait for its budget, which comes back as
                // the stages finish.
                permit = next_of(&mut self.acquiring) => {
                    self.acquiring = None;
                    self.add_credit(permit.map_err(|e| UploadError::Internal(e.into()))?);
                    if let Some(frame) = self.parked.take() {
                        self.take_frame(frame);
                    }
                }
            }
        }
        self.credit = None;
        let appender = self.appender.take().expect("the appender is back once the writes are done");
        let flushing = tokio::spawn(appender.finish(last));
        while self.hashing.is_some() || self.to_hash.is_some() {
            if let Some(hashing) = self.hashing.take() {
                self.hashes = Some(hashing.await.map_err(|e| task_failed("hash", e))?);
            }
            self.dispatch();
        }
        let outcome = flushing.await.map_err(|e| task_failed("write", e))??;
        let Hashes { file, chunk } = self.hashes.take().expect("the hashes are back once hashing is done");
        let checksum_ok = match (&self.plan, self.expected.take()) {
            (ChecksumPlan::None, _) => None,
            // An announced trailer that never came cannot vouch for the bytes.
            (_, None) => Some(false),
            (_, Some(expected)) => Some(
                chunk
                    .into_iter()
                    .find(|h| h.algorithm() == expected.algorithm)
                    .is_some_and(|h| h.finish() == expected.digest),
            ),
        };
        Ok(Received { bytes: self.received, hasher: file, checksum_ok, ending, outcome })
    }

    fn wrote(&mut self, written: std::result::Result<Written, tokio::task::JoinError>) -> Result<()> {
        let (appender, result) = written.map_err(|e| task_failed("write", e))?;
        self.appender = Some(appender);
        result.map_err(|e| match e {
            StoreError::Superseded => super::superseded(),
            other => other.into(),
        })
    }

    fn trailer(&mut self, parsed: std::result::Result<Checksum, String>) -> Result<()> {
        match self.plan {
            ChecksumPlan::Trailer => self.expected = Some(parsed.map_err(UploadError::Invalid)?),
            ChecksumPlan::None => {
                return Err(UploadError::Invalid(
                    "an Upload-Checksum trailer must be announced with 'Trailer: Upload-Checksum'".into(),
                ));
            }
            ChecksumPlan::Header(_) => {}
        }
        Ok(())
    }

    /// A frame arrived: it joins the pending bytes once it holds its share of the budget.
    fn arrived(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        if self.received + len > self.bounds.remaining {
            return Err(UploadError::TooLarge(format!(
                "the body is longer than the {} bytes that remain before the upload's length; nothing was kept",
                self.bounds.remaining
            )));
        }
        self.received += len;
        let credit = self.credit.as_ref().map_or(0, |c| c.num_permits() as u64);
        if credit >= len {
            self.take_frame(data);
            return Ok(());
        }
        // Appenders that keep bytes until a part is complete get the whole rest of the part at
        // once, so that a part once begun can always be completed; others take what a frame needs.
        let body_left = self.bounds.remaining - self.received + len;
        let wanted = match self.appender.as_ref().and_then(|a| a.holds_until()) {
            Some(part_rest) => part_rest.min(body_left).max(len),
            None => len,
        };
        self.acquiring = Some(self.budget.acquire(wanted.saturating_sub(credit).max(1)));
        self.parked = Some(data);
        Ok(())
    }

    fn add_credit(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.credit {
            Some(credit) => credit.merge(permit),
            None => self.credit = Some(permit),
        }
    }

    /// Wraps a frame with its share of the budget and queues it.
    fn take_frame(&mut self, data: Bytes) {
        let len = data.len();
        let credit = self.credit.as_mut().expect("a frame is taken only with credit for it");
        let permit = if credit.num_permits() == len {
            self.credit.take().expect("credit")
        } else {
            credit.split(len).expect("credit covers the frame")
        };
        self.pending_len += len as u64;
        self.pending.push(Bytes::from_owner(Held { data, _permit: permit }));
    }

    /// Starts whatever stage is free and has work, forming the next batch when both stages
    /// have taken the one before it.
    fn dispatch(&mut self) {
        if self.to_hash.is_none() && self.to_write.is_none() && self.pending_len > 0 {
            let mut size = 0u64;
            let take = self
                .pending
                .iter()
                .take_while(|frame| {
                    let fits = size == 0 || size + frame.len() as u64 <= BATCH_LIMIT;
                    if fits {
                        size += frame.len() as u64;
                    }
                    fits
                })
                .count();
            let batch: Vec<Bytes> = self.pending.drain(..take).collect();
            self.pending_len -= size;
            self.to_hash = Some(batch.clone());
            self.to_write = Some(batch);
        }
        if self.hashing.is_none()
            && let Some(batch) = self.to_hash.take()
        {
            let mut hashes = self.hashes.take().expect("the hash stage is idle");
            self.hashing = Some(tokio::task::spawn_blocking(move || {
                for frame in &batch {
                    hashes.file.update(frame);
                    for h in hashes.chunk.iter_mut() {
                        h.update(frame);
                    }
                }
                hashes
            }));
        }
        if self.writing.is_none()
            && self.appender.is_some()
            && let Some(batch) = self.to_write.take()
        {
            let mut appender = self.appender.take().expect("the write stage is idle");
            self.writing = Some(tokio::spawn(async move {
                let result = appender.write(batch).await;
                (appender, result)
            }));
        }
    }
}
