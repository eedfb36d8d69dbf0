//! The append pipeline: the request task only receives the body and hands the frames on (as
//! `Bytes`, never copied); hashing and writing run beside it, each on a thread of its own, so
//! one upload moves at the speed of its slowest stage, not of their sum.
//!
//! ```text
//!                         +-> hash queue  -> hash stage  (SHA-256, checksum)
//! socket -> request task -+
//!                         +-> write queue -> write stage -> store
//! ```
//!
//! Every frame goes to both queues (the same `Bytes`, shared), and each stage takes its queue in
//! order: writing does not wait for hashing, so the last bytes of a request are stored while they
//! are hashed rather than after. Nothing is committed until both stages have taken every byte
//! received and the write stage has made them durable; then the hash state is the one of exactly
//! the bytes written. A stage that fails (or an append that is dropped) stops both, and nothing
//! of that request is committed.
//!
//! A stage is a loop on a blocking thread that takes everything queued, works on it, and ends
//! when its queue is empty; the next bytes start it again. While bytes keep coming a stage keeps
//! running, so a fast upload costs a handful of thread wake-ups per request, and an idle one
//! holds no thread. Whichever stage is done last makes the append durable, on its own thread.
//!
//! Every frame holds its share of the instance's [`Budget`] until both stages (and, on object
//! stores, the part upload) have dropped its bytes, so all appends of an instance together never
//! hold more than the budget; a request that finds it spent stops reading its body (TCP pushes
//! back on the client). Per upload, at most [`IN_FLIGHT_LIMIT`] bytes are received and not yet
//! both hashed and written.

use std::{
    collections::VecDeque,
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{AcquireError, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{
    BodyEvent, BodyStream, Result, UploadError,
    space::{self, Reserve},
    types::{Checksum, ChecksumAlgorithm, ChecksumHasher, ChecksumPlan, FileHasher},
};
use crate::store::{AppendOutcome, Appender, StoreError};

/// Bytes of one upload received and not yet written, beyond which its body is not read.
pub const IN_FLIGHT_LIMIT: u64 = 4 << 20;
/// The most one pass of a stage takes from its queue.
const STAGE_BATCH: u64 = 2 << 20;
/// While the body keeps coming, the hash stage is started once this much waits for it: every
/// start costs a thread wake-up.
const STAGE_START: u64 = 512 << 10;
/// The same for the write stage, which writes faster than the hash stage hashes: it is started
/// once this much waits for it.
const WRITE_START: u64 = 1 << 20;
/// A slower body's bytes wait at most this long for the hash stage, so that a slow client's small
/// frames go through a few at a time rather than each on its own (what waits is only what that
/// connection received; it is all written before the commit).
const STAGE_DELAY: Duration = Duration::from_millis(500);
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
/// last holder drops the bytes.
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
#[derive(Debug, Clone)]
pub enum Ending {
    Complete,
    TimedOut,
    CutOff(String),
    /// The instance is shutting down.
    Stopped,
    /// The store's volume reached `--min-free-space`: what arrived until then is kept.
    StoreFull(String),
}

impl Ending {
    pub fn into_error(self, idle_timeout: Duration) -> Option<UploadError> {
        match self {
            Ending::Complete => None,
            Ending::TimedOut => Some(UploadError::BodyTimeout(idle_timeout)),
            Ending::CutOff(reason) => Some(UploadError::BodyCutOff(reason)),
            Ending::Stopped => Some(UploadError::ShuttingDown),
            Ending::StoreFull(message) => Some(UploadError::StorageFull(message)),
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
    /// Bytes received, written and made durable.
    pub bytes: u64,
    /// The whole-file hash state after them.
    pub hasher: FileHasher,
    /// None when no checksum was asked for; otherwise whether the body matched it.
    pub checksum_ok: Option<bool>,
    pub ending: Ending,
    pub outcome: AppendOutcome,
}

/// What the request task and the two stages share.
struct Queues {
    hash: Lane,
    /// The hash stage's state; None while the stage works on it (or before the lease gave it).
    hashes: Option<Hashes>,
    /// Its `running` also while a stage makes the append durable.
    write: Lane,
    /// The store's side; None while the write stage works or the append is made durable (or
    /// before the lease opened it).
    appender: Option<Box<dyn Appender>>,
    /// Bytes queued to both stages.
    queued: u64,
    failed: Option<StoreError>,
    /// Set when the body has ended (`true`: its bytes complete the upload): once everything is
    /// hashed and written, the last stage to finish makes it durable.
    closing: Option<bool>,
    outcome: Option<AppendOutcome>,
    /// The request task waits for a stage (room, or the end): tell it when something changes.
    waiting: bool,
}

impl Queues {
    /// Wakes the request task if it waits for the stages (and only then: a wake-up costs a
    /// thread switch, and most changes do not concern it).
    fn tell(&mut self, shared: &Shared) {
        if self.waiting || self.failed.is_some() {
            self.waiting = false;
            shared.changed.notify_one();
        }
    }

    /// Received and not yet both hashed and written.
    fn in_flight(&self) -> u64 {
        self.queued - self.hash.done.min(self.write.done)
    }

    /// Whether the append should be made durable now: the body has ended, and every byte of it
    /// is hashed and written (no stage runs).
    fn ready_to_finish(&self) -> bool {
        self.closing.is_some()
            && self.outcome.is_none()
            && self.failed.is_none()
            && self.hash.idle()
            && self.write.idle()
            && self.appender.is_some()
    }

    /// Makes the append durable when it is ready to be, on the calling (blocking) thread.
    fn finish_if_ready(mut q: std::sync::MutexGuard<'_, Queues>, shared: &Shared) {
        if !q.ready_to_finish() {
            q.tell(shared);
            return;
        }
        let appender = q.appender.take().expect("an appender");
        let last = q.closing.expect("closing");
        q.write.running = true;
        drop(q);
        let result = appender.finish(last);
        let mut q = shared.lock();
        q.write.running = false;
        match result {
            Ok(outcome) => q.outcome = Some(outcome),
            Err(e) => q.failed = Some(e),
        }
        q.tell(shared);
    }

    /// Whether the hash stage has work, is not running, and has its state.
    fn hash_can_start(&self) -> bool {
        self.failed.is_none() && self.hashes.is_some() && self.hash.can_start()
    }

    /// Whether the write stage has work, is not running, and has the store's side.
    fn write_can_start(&self) -> bool {
        self.failed.is_none() && self.appender.is_some() && self.write.can_start()
    }

    /// Marks the hash stage running when it can start: the caller starts it once it has let go
    /// of the lock (see [`Starts`]).
    fn claim_hashing(&mut self) -> bool {
        let start = self.hash_can_start();
        self.hash.running |= start;
        start
    }

    /// The same for the write stage.
    fn claim_writing(&mut self) -> bool {
        let start = self.write_can_start();
        self.write.running |= start;
        start
    }

    /// Claims both stages that have work waiting.
    fn claim(&mut self) -> Starts {
        Starts { hash: self.claim_hashing(), write: self.claim_writing() }
    }
}

/// Stages claimed under the lock, to be started after it is let go: starting one wakes a blocking
/// thread (or creates one), and a stage that wants the lock meanwhile would sleep on it.
#[must_use]
struct Starts {
    hash: bool,
    write: bool,
}

impl Starts {
    fn spawn(self, shared: &Arc<Shared>) {
        if self.hash {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || hash_stage(shared));
        }
        if self.write {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || write_stage(shared));
        }
    }
}

/// One stage's queue: the frames waiting for it, in order, and how far it has got.
#[derive(Default, Clone)]
struct Lane {
    frames: VecDeque<Bytes>,
    /// Bytes of `frames`.
    len: u64,
    /// Bytes the stage has taken in (hashed, or written).
    done: u64,
    running: bool,
}

impl Lane {
    fn push(&mut self, frame: Bytes) {
        self.len += frame.len() as u64;
        self.frames.push_back(frame);
    }

    /// Takes frames from the front, up to [`STAGE_BATCH`] bytes (at least one frame).
    fn take(&mut self) -> (Vec<Bytes>, u64) {
        let mut taken = 0;
        let mut frames = Vec::new();
        while let Some(frame) = self.frames.front() {
            if taken > 0 && taken + frame.len() as u64 > STAGE_BATCH {
                break;
            }
            taken += frame.len() as u64;
            frames.push(self.frames.pop_front().expect("a frame"));
        }
        self.len -= taken;
        (frames, taken)
    }

    fn can_start(&self) -> bool {
        !self.running && !self.frames.is_empty()
    }

    /// Not running, and nothing waits for it.
    fn idle(&self) -> bool {
        !self.running && self.frames.is_empty()
    }
}

struct Shared {
    queues: Mutex<Queues>,
    /// The stages tell the request task that something changed (room, an error, idleness).
    changed: Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// One append's stages and what is between them.
pub struct Pipeline {
    shared: Arc<Shared>,
    budget: Budget,
    idle_timeout: Duration,
    /// How many bytes the body may carry (provisional until [`Pipeline::attach`]).
    remaining: u64,
    plan: ChecksumPlan,
    /// The checksum to verify (from the header, or the trailer once it came).
    expected: Option<Checksum>,
    /// Whether the appender keeps bytes until a part is complete (see [`Appender::holds_until`]).
    holds_parts: bool,
    /// Budget taken and not yet given to a frame.
    credit: Option<OwnedSemaphorePermit>,
    /// A frame waiting for budget; the body is not read meanwhile.
    parked: Option<Bytes>,
    acquiring: Option<Acquiring>,
    received: u64,
    /// Set when the body ended while the stages were not attached yet.
    ended: Option<Ending>,
    /// The saved hash state hashing started from before the lease confirmed it.
    started_from: Option<Vec<u8>>,
    /// Since when bytes wait for the hash stage, which is not running.
    waiting_since: Option<tokio::time::Instant>,
    /// The store's free-space reserve, checked every [`space::CHECK_EVERY`] bytes received.
    reserve: Option<Reserve>,
    /// What had been received when the free space was last checked.
    space_checked_at: u64,
}

impl Drop for Pipeline {
    /// An append that ends early (refused, superseded, failed) stops its stages after the pass
    /// they are in: nothing of it is committed, so nothing more need be hashed or written.
    fn drop(&mut self) {
        let mut q = self.shared.lock();
        if q.failed.is_none() {
            q.failed = Some(StoreError::Other("the append ended".into()));
        }
    }
}

/// Sleeps until `due`, or never when there is none (for `select!` branches).
async fn sleep_until(due: Option<tokio::time::Instant>) {
    match due {
        Some(due) => tokio::time::sleep_until(due).await,
        None => std::future::pending().await,
    }
}

/// Awaits the future in `slot`, or never when there is none (for `select!` branches).
async fn next_of<F: Future + Unpin>(slot: &mut Option<F>) -> F::Output {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The hash stage: hashes what is queued for it, in order, until its queue is empty.
fn hash_stage(shared: Arc<Shared>) {
    loop {
        let (frames, len, mut hashes) = {
            let mut q = shared.lock();
            if q.hash.frames.is_empty() || q.failed.is_some() {
                q.hash.running = false;
                return Queues::finish_if_ready(q, &shared);
            }
            let (frames, len) = q.hash.take();
            (frames, len, q.hashes.take().expect("the hash stage holds the hashes"))
        };
        for frame in &frames {
            hashes.file.update(frame);
            for h in hashes.chunk.iter_mut() {
                h.update(frame);
            }
        }
        drop(frames);
        let mut q = shared.lock();
        q.hashes = Some(hashes);
        q.hash.done += len;
        q.tell(&shared);
    }
}

/// The write stage: writes what is queued for it, in order, until its queue is empty.
fn write_stage(shared: Arc<Shared>) {
    loop {
        let (frames, len, mut appender) = {
            let mut q = shared.lock();
            if q.write.frames.is_empty() || q.failed.is_some() {
                q.write.running = false;
                return Queues::finish_if_ready(q, &shared);
            }
            let (frames, len) = q.write.take();
            (frames, len, q.appender.take().expect("the write stage holds the appender"))
        };
        let result = appender.write(frames);
        let mut q = shared.lock();
        q.appender = Some(appender);
        match result {
            Ok(()) => q.write.done += len,
            Err(e) => q.failed = Some(e),
        }
        q.tell(&shared);
    }
}

fn stage_failed(e: StoreError) -> UploadError {
    match e {
        StoreError::Superseded => super::superseded(),
        other => other.into(),
    }
}

impl Pipeline {
    /// A pipeline that can receive right away; writing starts once [`Pipeline::attach`] gives it
    /// the store's appender and the hash state saved with the offset. `remaining` bounds the body
    /// until then. With `likely_state` (the hash state this instance committed last at the
    /// request's offset), hashing starts at once too, and [`Pipeline::attach`] checks it.
    pub fn new(
        plan: ChecksumPlan,
        budget: Budget,
        idle_timeout: Duration,
        remaining: u64,
        likely_state: Option<Vec<u8>>,
    ) -> Self {
        let expected = match &plan {
            ChecksumPlan::Header(checksum) => Some(checksum.clone()),
            _ => None,
        };
        let queues = Queues {
            hash: Lane::default(),
            hashes: None,
            write: Lane::default(),
            appender: None,
            queued: 0,
            failed: None,
            closing: None,
            outcome: None,
            waiting: false,
        };
        let mut pipeline = Self {
            shared: Arc::new(Shared { queues: Mutex::new(queues), changed: Notify::new() }),
            budget,
            idle_timeout,
            remaining,
            plan,
            expected,
            holds_parts: false,
            credit: None,
            parked: None,
            acquiring: None,
            received: 0,
            ended: None,
            started_from: None,
            waiting_since: None,
            reserve: None,
            space_checked_at: 0,
        };
        if let Some(state) = likely_state
            && let Ok(hasher) = FileHasher::restore(&state)
        {
            pipeline.start_hashes(hasher);
            pipeline.started_from = Some(state);
        }
        pipeline
    }

    /// Gives the hash stage its state and lets it start on what is queued.
    fn start_hashes(&mut self, hasher: FileHasher) {
        let chunk = match &self.plan {
            ChecksumPlan::None => Vec::new(),
            ChecksumPlan::Header(checksum) => vec![checksum.hasher()],
            ChecksumPlan::Trailer => ChecksumAlgorithm::ALL.iter().map(|a| a.hasher()).collect(),
        };
        let mut q = self.shared.lock();
        q.hashes = Some(Hashes { file: hasher, chunk });
        let starts = Starts { hash: q.claim_hashing(), write: false };
        drop(q);
        starts.spawn(&self.shared);
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Ends the body early, keeping what arrived, once the store's volume reaches `reserve`.
    pub fn keep_free(&mut self, reserve: Reserve) {
        self.reserve = Some(reserve);
    }

    /// Why no more should be received, when the store's volume has reached its reserve (counting
    /// what was received and is not written yet).
    fn out_of_space(&mut self) -> Option<String> {
        let reserve = self.reserve.as_ref()?;
        if self.received < self.space_checked_at + space::CHECK_EVERY {
            return None;
        }
        self.space_checked_at = self.received;
        // Bytes being written count as written: the volume's free space already shows them in
        // part, and counting them twice would refuse a body before the reserve is reached (and
        // let the next one in).
        // What the write stage has not taken yet: still queued for it, or not queued at all (a
        // frame waiting for budget).
        let pending = {
            let q = self.shared.lock();
            self.received.saturating_sub(q.queued) + q.write.len
        };
        reserve.refuse(pending)
    }

    /// Receives the body while `work` runs (the lease, opening the store), so that the first
    /// bytes need not wait for it; returns what `work` returns. Nothing is hashed or written yet.
    pub async fn receive_during<T>(
        &mut self,
        body: &mut BodyStream,
        work: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        tokio::pin!(work);
        loop {
            let reading = self.ended.is_none() && self.can_read();
            if reading {
                match self.take_ready(body)? {
                    Some(Some(ending)) => {
                        self.ended = Some(ending);
                        continue;
                    }
                    Some(None) => continue,
                    None => {}
                }
            }
            let due = self.stage_due(reading);
            tokio::select! {
                biased;
                done = &mut work => return done,
                permit = next_of(&mut self.acquiring) => self.acquired(permit)?,
                () = sleep_until(due), if due.is_some() => self.kick(),
                next = tokio::time::timeout(self.idle_timeout, body.next()), if reading => {
                    if let Some(ending) = self.next(next)? {
                        self.ended = Some(ending);
                    }
                }
            }
        }
    }

    /// Hands the stages what they work with: the store's appender and the hash state saved with
    /// the offset (`saved_state`); `remaining` is now exact. Bytes received so far start through
    /// the stages. Had hashing started from another state than the saved one, it starts again.
    pub async fn attach(&mut self, appender: Box<dyn Appender>, saved_state: &[u8], remaining: u64) -> Result<()> {
        if self.received > remaining {
            return Err(self.too_large_for(remaining));
        }
        self.remaining = remaining;
        self.holds_parts = appender.holds_until().is_some();
        let hasher = FileHasher::restore(saved_state).map_err(|e| anyhow::anyhow!(e))?;
        match self.started_from.take() {
            Some(started) if started == saved_state => {}
            Some(_) => {
                // Hash every frame again, from the saved state: until the store's side is here
                // nothing is written, so the write queue holds every frame received, in order.
                loop {
                    {
                        let mut q = self.shared.lock();
                        if !q.hash.running {
                            debug_assert_eq!(q.write.done, 0);
                            q.hash = q.write.clone();
                            break;
                        }
                        q.waiting = true;
                    }
                    self.shared.changed.notified().await;
                }
                self.start_hashes(hasher);
            }
            None => self.start_hashes(hasher),
        }
        let mut q = self.shared.lock();
        q.appender = Some(appender);
        let starts = Starts { hash: false, write: q.claim_writing() };
        drop(q);
        starts.spawn(&self.shared);
        Ok(())
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
        if let Some(ending) = self.ended.take() {
            return Ok(ending);
        }
        loop {
            let reading = {
                let mut q = self.shared.lock();
                if let Some(e) = q.failed.take() {
                    return Err(stage_failed(e));
                }
                let room = q.in_flight() < IN_FLIGHT_LIMIT;
                q.waiting = !room;
                room && self.parked.is_none()
            };
            if superseded.is_cancelled() {
                return Err(super::superseded());
            }
            if stopping.is_cancelled() {
                return Ok(Ending::Stopped);
            }
            if let Some(message) = self.out_of_space() {
                return Ok(Ending::StoreFull(message));
            }
            if reading {
                match self.take_ready(body)? {
                    Some(Some(ending)) => return Ok(ending),
                    Some(None) => continue,
                    None => {}
                }
            }
            let due = self.stage_due(reading);
            tokio::select! {
                biased;
                () = superseded.cancelled() => return Err(super::superseded()),
                () = stopping.cancelled() => return Ok(Ending::Stopped),
                () = self.shared.changed.notified() => {}
                permit = next_of(&mut self.acquiring) => self.acquired(permit)?,
                () = sleep_until(due), if due.is_some() => self.kick(),
                next = tokio::time::timeout(self.idle_timeout, body.next()), if reading => {
                    if let Some(ending) = self.next(next)? {
                        return Ok(ending);
                    }
                }
            }
        }
    }

    /// Lets the stages finish what was received, then makes it durable (`last`: these bytes
    /// complete the upload).
    pub async fn finish(mut self, ending: Ending, last: bool) -> Result<Received> {
        self.kick();
        // A frame that arrived last may still wait for its budget, which comes back as the
        // stages finish.
        while self.parked.is_some() {
            self.shared.lock().waiting = true;
            tokio::select! {
                () = self.shared.changed.notified() => {
                    if let Some(e) = self.shared.lock().failed.take() {
                        return Err(stage_failed(e));
                    }
                }
                permit = next_of(&mut self.acquiring) => self.acquired(permit)?,
            }
        }
        self.credit = None;
        // The last stage to be done makes the bytes durable; when both are done already, a
        // blocking thread does.
        loop {
            let finish_here = {
                let mut q = self.shared.lock();
                if let Some(e) = q.failed.take() {
                    return Err(stage_failed(e));
                }
                if q.outcome.is_some() {
                    break;
                }
                q.waiting = true;
                q.closing.is_none() && {
                    q.closing = Some(last);
                    q.ready_to_finish()
                }
            };
            if finish_here {
                // Started once the lock is let go, like the stages.
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || Queues::finish_if_ready(shared.lock(), &shared));
            }
            self.shared.changed.notified().await;
        }
        let mut q = self.shared.lock();
        let outcome = q.outcome.take().expect("the outcome");
        let Hashes { file: hasher, chunk } = q.hashes.take().expect("the hashes are back once hashing is done");
        debug_assert!(q.hash.done == q.write.done && q.write.done == q.queued);
        let bytes = q.write.done;
        drop(q);
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
        Ok(Received { bytes, hasher, checksum_ok, ending, outcome })
    }

    /// Whether the body may be read now: no frame waits for budget, and the upload's bytes in
    /// flight leave room.
    fn can_read(&self) -> bool {
        self.parked.is_none() && self.shared.lock().in_flight() < IN_FLIGHT_LIMIT
    }

    /// Handles what the body yielded; returns how it ended, if it did.
    fn next(
        &mut self,
        next: std::result::Result<Option<std::result::Result<BodyEvent, String>>, tokio::time::error::Elapsed>,
    ) -> Result<Option<Ending>> {
        Ok(match next {
            Err(_) => Some(Ending::TimedOut),
            Ok(None) => Some(Ending::Complete),
            Ok(Some(Err(reason))) => Some(Ending::CutOff(reason)),
            Ok(Some(Ok(BodyEvent::Data(data)))) => {
                self.arrived(data)?;
                None
            }
            Ok(Some(Ok(BodyEvent::TrailerChecksum(parsed)))) => {
                self.trailer(parsed)?;
                None
            }
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

    fn too_large_for(&self, remaining: u64) -> UploadError {
        UploadError::TooLarge(format!(
            "the body is longer than the {remaining} bytes that remain before the upload's length; nothing was kept"
        ))
    }

    /// A frame arrived: it joins the hash queue once it holds its share of the budget.
    fn arrived(&mut self, data: Bytes) -> Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        if self.received + len > self.remaining {
            return Err(self.too_large_for(self.remaining));
        }
        self.received += len;
        let credit = self.credit.as_ref().map_or(0, |c| c.num_permits() as u64);
        if credit >= len {
            self.take_frame(data);
            return Ok(());
        }
        // Appenders that keep bytes until a part is complete get the whole rest of the part at
        // once, so that a part once begun can always be completed; others take what a frame
        // needs.
        let body_left = self.remaining - self.received + len;
        let part_rest = self.shared.lock().appender.as_ref().and_then(|a| a.holds_until());
        let wanted = match part_rest {
            Some(rest) if self.holds_parts => rest.min(body_left).max(len),
            _ => len,
        };
        self.acquiring = Some(self.budget.acquire(wanted.saturating_sub(credit).max(1)));
        self.parked = Some(data);
        Ok(())
    }

    fn acquired(&mut self, permit: std::result::Result<OwnedSemaphorePermit, AcquireError>) -> Result<()> {
        self.acquiring = None;
        let permit = permit.map_err(|e| UploadError::Internal(e.into()))?;
        match &mut self.credit {
            Some(credit) => credit.merge(permit),
            None => self.credit = Some(permit),
        }
        if let Some(frame) = self.parked.take() {
            self.take_frame(frame);
        }
        Ok(())
    }

    /// Wraps a frame with its share of the budget and queues it for hashing.
    fn take_frame(&mut self, data: Bytes) {
        let len = data.len();
        let credit = self.credit.as_mut().expect("a frame is taken only with credit for it");
        let permit = if credit.num_permits() == len {
            self.credit.take().expect("credit")
        } else {
            credit.split(len).expect("credit covers the frame")
        };
        let frame = Bytes::from_owner(Held { data, _permit: permit });
        let mut q = self.shared.lock();
        q.queued += len as u64;
        q.hash.push(frame.clone());
        q.write.push(frame);
        // Each stage is started for its own queue: the write stage, faster, drains its queue
        // sooner and waits for a batch again rather than being woken for every frame.
        let starts = Starts {
            hash: q.hash.len >= STAGE_START && q.claim_hashing(),
            write: q.write.len >= WRITE_START && q.claim_writing(),
        };
        drop(q);
        starts.spawn(&self.shared);
    }

    /// The stages take what is queued.
    fn kick(&self) {
        let starts = self.shared.lock().claim();
        starts.spawn(&self.shared);
    }

    /// Before the request task waits: starts the hash stage now if the body cannot be read (the
    /// stages must make room) or bytes waited [`STAGE_DELAY`]; otherwise returns when they will
    /// have.
    fn stage_due(&mut self, reading: bool) -> Option<tokio::time::Instant> {
        let idle_with_work = {
            let q = self.shared.lock();
            q.hash_can_start() || q.write_can_start()
        };
        if !idle_with_work {
            self.waiting_since = None;
            return None;
        }
        let now = tokio::time::Instant::now();
        let due = *self.waiting_since.get_or_insert(now) + STAGE_DELAY;
        if !reading || due <= now {
            self.waiting_since = None;
            self.kick();
            return None;
        }
        Some(due)
    }

    /// Takes what the body has ready without waiting for more; false when nothing was ready.
    fn take_ready(&mut self, body: &mut BodyStream) -> Result<Option<Option<Ending>>> {
        use futures_util::FutureExt;
        match body.next().now_or_never() {
            Some(next) => self.next(Ok(next)).map(Some),
            None => Ok(None),
        }
    }
}
