//! The appends running on this instance, by upload: so that a client that resumes the instant its
//! connection dropped loses nothing, and a writer whose client still sends is ended at once.
//!
//! - A writer whose body has ended (complete, cut off, stalled) is *committing*: it holds its
//!   upload's gate from that moment until its offset is committed. Any newer request for the
//!   upload on this instance (HEAD, PATCH, DELETE, GET) first waits for the gate, at most
//!   [`SETTLE_WAIT`], so it sees the bytes that writer received.
//! - A writer whose client has stopped sending (its FIN or RST has arrived) counts as ended
//!   even before its request has read that far: a newer request waits for it the same way.
//! - A writer whose body is still arriving holds no gate. A newer append takes the gate while it
//!   leases the upload in the database; once it holds the lease, the older writer is told to stop
//!   (it keeps nothing: the newer request wins). An older writer whose body ends while the newer
//!   one is leasing waits for the gate, then finds it has been told to stop.
//!
//! This is only a shortcut for requests that reach the same instance: the database's writer
//! generation is what makes the newest writer win everywhere, and nothing here is needed by
//! another instance.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::{ClientLink, types::UploadId};

/// The longest a request waits for an ended writer of the same upload to commit.
pub const SETTLE_WAIT: Duration = Duration::from_millis(250);

#[derive(Default)]
struct GateState {
    /// The newest writer of the upload on this instance.
    writer: Option<Running>,
}

struct Running {
    generation: i64,
    /// Cancelled to stop it.
    stop: CancellationToken,
    /// Cancelled when it is done (committed or given up).
    done: CancellationToken,
    client: Option<Arc<dyn ClientLink>>,
}

type Gate = Arc<tokio::sync::Mutex<GateState>>;

/// How many uploads' last committed hash states are remembered.
const RECENT_STATES: usize = 4096;

#[derive(Default)]
pub struct Writers {
    gates: Mutex<HashMap<UploadId, Gate>>,
    /// The hash state this instance committed last for an upload, at which offset: the next
    /// append at that offset can start hashing before its lease confirms the state.
    recent: Mutex<HashMap<UploadId, (u64, Vec<u8>)>>,
}

/// A use of one upload's gate; the gate is forgotten when its last use ends.
struct Use<'a> {
    writers: &'a Writers,
    id: UploadId,
    gate: Gate,
}

impl Drop for Use<'_> {
    fn drop(&mut self) {
        let mut gates = self.writers.gates.lock().expect("writers lock");
        // The map's reference and this one: nobody else uses the gate.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.id);
        }
    }
}

/// The gate held while an append leases its upload.
pub struct Entry<'a> {
    gate: Use<'a>,
    guard: Option<OwnedMutexGuard<GateState>>,
}

/// A running writer of this instance.
pub struct Writer<'a> {
    gate: Use<'a>,
    generation: i64,
    stop: CancellationToken,
    done: CancellationToken,
}

/// Held by a writer from the end of its body until its commit is done.
pub struct Committing {
    _guard: Option<OwnedMutexGuard<GateState>>,
}

impl Writers {
    fn gate(&self, id: UploadId, create: bool) -> Option<Use<'_>> {
        let mut gates = self.gates.lock().expect("writers lock");
        let gate = match gates.get(&id) {
            Some(gate) => gate.clone(),
            None if create => gates.entry(id).or_default().clone(),
            None => return None,
        };
        Some(Use { writers: self, id, gate })
    }

    /// Waits, at most [`SETTLE_WAIT`], while a writer of this upload on this instance commits
    /// what its ended body brought.
    pub async fn settled(&self, id: UploadId) {
        if let Some(gate) = self.gate(id, false) {
            let _ = tokio::time::timeout(SETTLE_WAIT, gate.settle()).await;
        }
    }

    /// Before an append leases its upload: waits like [`Writers::settled`], then holds the gate
    /// while the lease is taken.
    pub async fn enter(&self, id: UploadId) -> Entry<'_> {
        let gate = self.gate(id, true).expect("created");
        let guard = tokio::time::timeout(SETTLE_WAIT, gate.settle()).await.ok();
        Entry { gate, guard }
    }
}

impl Use<'_> {
    /// Takes the gate once no writer holds it, and once the running writer, if its client has
    /// stopped sending, is done.
    async fn settle(&self) -> OwnedMutexGuard<GateState> {
        loop {
            let guard = self.gate.clone().lock_owned().await;
            let ending = guard
                .writer
                .as_ref()
                .filter(|w| !w.done.is_cancelled() && w.client.as_ref().is_some_and(|c| c.stopped_sending()))
                .map(|w| w.done.clone());
            let Some(done) = ending else { return guard };
            // Its request has yet to read the end of the body: let it, and commit.
            drop(guard);
            done.cancelled().await;
        }
    }
}

impl Writers {
    /// The uploads with a writer on this instance: (receiving, committing or leasing). For the
    /// log, when shutdown has to cut appends off.
    pub fn running(&self) -> (Vec<UploadId>, Vec<UploadId>) {
        let gates = self.gates.lock().expect("writers lock");
        let (mut receiving, mut busy) = (Vec::new(), Vec::new());
        for (id, gate) in gates.iter() {
            match gate.try_lock() {
                Ok(state) if state.writer.as_ref().is_some_and(|w| !w.done.is_cancelled()) => receiving.push(*id),
                Ok(_) => {}
                Err(_) => busy.push(*id),
            }
        }
        (receiving, busy)
    }

    /// Remembers the hash state committed at `offset`.
    pub fn committed(&self, id: UploadId, offset: u64, state: &[u8]) {
        let mut recent = self.recent.lock().expect("recent states lock");
        if recent.len() >= RECENT_STATES && !recent.contains_key(&id) {
            // Forget one; any will do (a miss only means waiting for the lease to hash).
            if let Some(other) = recent.keys().next().copied() {
                recent.remove(&other);
            }
        }
        recent.insert(id, (offset, state.to_vec()));
    }

    /// The hash state this instance committed last at exactly `offset`, if it did.
    pub fn committed_state(&self, id: UploadId, offset: u64) -> Option<Vec<u8>> {
        let recent = self.recent.lock().expect("recent states lock");
        recent.get(&id).filter(|(at, _)| *at == offset).map(|(_, state)| state.clone())
    }
}

impl<'a> Entry<'a> {
    /// The append holds the lease of `generation`: the writer before it on this instance stops.
    pub async fn register(self, generation: i64, client: Option<Arc<dyn ClientLink>>) -> Writer<'a> {
        let Entry { gate, guard } = self;
        let mut guard = match guard {
            Some(guard) => guard,
            // The committing writer took too long; the lease has ended it anyway.
            None => gate.gate.clone().lock_owned().await,
        };
        let stop = CancellationToken::new();
        let done = CancellationToken::new();
        let running = Running { generation, stop: stop.clone(), done: done.clone(), client };
        if let Some(older) = guard.writer.replace(running) {
            older.stop.cancel();
        }
        drop(guard);
        Writer { gate, generation, stop, done }
    }
}

impl Writer<'_> {
    /// Cancelled when a newer append of this instance took over.
    pub fn stopped(&self) -> &CancellationToken {
        &self.stop
    }

    /// The body has ended: holds the gate until the commit is done, so newer requests wait for
    /// it. None when a newer append took over meanwhile (this one must not commit).
    pub async fn committing(&self) -> Option<Committing> {
        let guard = self.gate.gate.clone().lock_owned().await;
        if self.stop.is_cancelled() {
            return None;
        }
        Some(Committing { _guard: Some(guard) })
    }
}

impl Drop for Writer<'_> {
    fn drop(&mut self) {
        self.done.cancel();
        // Forget this writer unless a newer one replaced it. The gate may be held by a request
        // waiting on it; then that request's own use keeps the entry, and the stale writer
        // record does no harm (it is done, and its token is only ever cancelled).
        if let Ok(mut state) = self.gate.gate.try_lock()
            && state.writer.as_ref().is_some_and(|w| w.generation == self.generation)
        {
            state.writer = None;
        }
    }
}
