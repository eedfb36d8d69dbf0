//! The free-space reserve of a local store (`--min-free-space`): bodies are refused before the
//! volume is full, so that what keeps an instance working (the database on the same volume,
//! DELETE, expiry) always finds room, the way Elasticsearch's disk watermarks refuse writes
//! before the disk fills and keep deletes working.

use std::sync::Arc;

use crate::{
    config::MinFreeSpace,
    store::{Space, Store},
};

/// How often an append that is receiving checks the free space again: every this many bytes.
pub const CHECK_EVERY: u64 = 1 << 20;

#[derive(Clone)]
pub struct Reserve {
    store: Arc<dyn Store>,
    min_free: MinFreeSpace,
}

impl Reserve {
    pub fn new(store: Arc<dyn Store>, min_free: MinFreeSpace) -> Self {
        Self { store, min_free }
    }

    /// The store's free space and the reserve in bytes, where the store has a volume.
    pub fn reading(&self) -> Option<(Space, u64)> {
        let space = self.store.space()?;
        Some((space, self.min_free.of(space.total)))
    }

    /// The free space and the reserve, when writing `pending` more bytes would leave the volume
    /// with less free space than the reserve (one statvfs).
    pub fn shortfall(&self, pending: u64) -> Option<(Space, u64)> {
        let (space, reserve) = self.reading()?;
        (reserve > 0 && space.available < reserve.saturating_add(pending)).then_some((space, reserve))
    }

    /// Why `pending` more bytes may not be written now, if they may not.
    pub fn refuse(&self, pending: u64) -> Option<String> {
        let (space, reserve) = self.shortfall(pending)?;
        Some(format!(
            "the store is below --min-free-space ({} MiB free, {} MiB kept free); no more bytes are accepted \
             until space is freed, for example by deleting uploads",
            space.available >> 20,
            reserve >> 20
        ))
    }
}
