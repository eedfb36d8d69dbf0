//! The emergency ballast: a file of reserved space beside the SQLite database, released when
//! the volume is so full that recording a termination or an expiry fails (after something
//! other than ferry ate `--min-free-space`). Recording comes first and freeing bytes second
//! (the offset ferry reports never exceeds what it can read back), so without room to record,
//! nothing could ever be freed; the ballast gives that room once. It is made again when the
//! volume has space. CockroachDB keeps an emergency ballast for the same reason.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    sync::Arc,
};

use crate::config::{BallastSize, MinFreeSpace};

/// The file's name in the database's folder.
pub const FILE_NAME: &str = "EMERGENCY_BALLAST";
#[derive(Debug)]
pub struct Ballast {
    path: PathBuf,
    size: BallastSize,
    /// Serialises making and releasing it.
    lock: tokio::sync::Mutex<()>,
}

impl Ballast {
    /// The ballast of `size` of a database kept in `folder`.
    pub fn in_folder(folder: &Path, size: BallastSize) -> Arc<Self> {
        Arc::new(Self { path: folder.join(FILE_NAME), size, lock: tokio::sync::Mutex::new(()) })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes the ballast if it is missing and the volume has room for it beyond `--min-free-space`;
    /// true when it is in place afterwards.
    pub async fn ensure(&self, min_free: MinFreeSpace) -> io::Result<bool> {
        let _held = self.lock.lock().await;
        let (path, size) = (self.path.clone(), self.size);
        tokio::task::spawn_blocking(move || make(&path, size, min_free)).await.map_err(io::Error::other)?
    }

    /// Deletes the ballast (if it is there; true when it was) and runs `then` while no one can
    /// make it again, so that the room it gave is `then`'s.
    pub async fn release_then<T, Fut: std::future::Future<Output = T>>(&self, then: impl FnOnce(bool) -> Fut) -> T {
        let _held = self.lock.lock().await;
        let _ = tokio::fs::remove_file(self.path.with_extension("partial")).await;
        let released = match tokio::fs::remove_file(&self.path).await {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "could not release the emergency ballast");
                false
            }
        };
        then(released).await
    }

    /// Deletes the ballast; true when there was one to delete.
    pub async fn release(&self) -> bool {
        self.release_then(|released| async move { released }).await
    }
}

fn make(path: &Path, size: BallastSize, min_free: MinFreeSpace) -> io::Result<bool> {
    let folder = path.parent().unwrap_or(Path::new("."));
    let space = crate::store::local::volume_space(folder)?;
    let keep_free = min_free.of(space.total);
    let size = size.of(space.total);
    if size == 0 {
        return Ok(false);
    }
    let partial = path.with_extension("partial");
    // A leftover of a write that did not finish.
    let _ = std::fs::remove_file(&partial);
    let existing = match std::fs::metadata(path) {
        Ok(meta) => Some(meta.len()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    // One made for a volume of another size (`auto`) stays unless its replacement fits.
    if existing.is_some_and(|len| len == size || (len >= size / 2 && len <= size.saturating_mul(2))) {
        return Ok(true);
    }
    let room = space.available.saturating_add(existing.unwrap_or(0));
    if room < size.saturating_add(keep_free) {
        return Ok(existing.is_some());
    }
    if existing.is_some() {
        std::fs::remove_file(path)?;
    }
    // Real blocks, not a sparse file, and not zeros, which compressing file systems (ZFS, btrfs)
    // store as nothing: written out under a temporary name, so that a crash never leaves a
    // short ballast in place.
    let written = (|| {
        let mut file = std::fs::File::create(&partial)?;
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let block: Vec<u8> = (0..(1 << 17))
            .flat_map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state.to_le_bytes()
            })
            .collect();
        let mut left = size;
        while left > 0 {
            let n = left.min(block.len() as u64) as usize;
            file.write_all(&block[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        std::fs::rename(&partial, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&partial);
        return if crate::store::is_disk_full(&e) { Ok(false) } else { Err(e) };
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_percent_at_most_32_mib() {
        assert_eq!(BallastSize::Auto.of(24 << 20), (24 << 20) / 100);
        assert_eq!(BallastSize::Auto.of(1 << 40), 32 << 20);
        assert_eq!(BallastSize::Auto.of(0), 0);
        assert_eq!(BallastSize::Bytes(5).of(1 << 40), 5);
    }

    #[tokio::test]
    async fn made_once_released_once() {
        let dir = tempfile::tempdir().unwrap();
        let ballast = Ballast::in_folder(dir.path(), BallastSize::Bytes(3 << 20 | 5));
        let none = MinFreeSpace::Bytes(0);
        assert!(ballast.ensure(none).await.unwrap());
        assert_eq!(std::fs::metadata(ballast.path()).unwrap().len(), 3 << 20 | 5);
        assert!(ballast.ensure(none).await.unwrap(), "in place already");
        assert!(ballast.release().await);
        assert!(!ballast.release().await, "nothing left to release");
        let everything = MinFreeSpace::Bytes(u64::MAX);
        assert!(!ballast.ensure(everything).await.unwrap(), "no room beyond what must stay free");
        assert!(!ballast.path().exists());
        let off = Ballast::in_folder(dir.path(), BallastSize::Bytes(0));
        assert!(!off.ensure(none).await.unwrap(), "0 is no ballast");
        assert!(!off.path().exists());
    }
}
