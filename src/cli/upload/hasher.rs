//! Chunk hashing: the SHA-256 of the whole file, compared with the server's `Repr-Digest` at the
//! end, and each chunk's own SHA-256 for the protocol's per-request checksum (tus's
//! `Upload-Checksum`, the IETF draft's `Content-Digest`). Each byte is read and hashed once,
//! whatever the retries, and the next chunk is read while the current one is on the wire.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::retry::Failure;

/// The SHA-256 of the whole file, computed chunk by chunk as the chunks are prepared (each byte
/// once, whatever the retries), and the per-chunk checksums. The next chunk is prepared while the
/// current one is being sent, so reading and hashing cost no time on the wire.
pub(super) struct FileHasher {
    pub(super) path: PathBuf,
    whole: Sha256,
    hashed_to: u64,
    /// The next chunk, being prepared.
    ahead: Option<tokio::task::JoinHandle<std::io::Result<Prepared>>>,
    /// Checksums prepared ahead: offset, and (length, SHA-256) for each length guessed.
    ready: Option<(u64, Sums)>,
}

/// A chunk's SHA-256 for each length it was prepared for.
type Sums = Vec<(u64, [u8; 32])>;

/// The outcome of one pass over a range of the file.
struct Prepared {
    whole: Sha256,
    hashed_to: u64,
    offset: u64,
    sums: Sums,
}

impl FileHasher {
    pub(super) fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), whole: Sha256::new(), hashed_to: 0, ahead: None, ready: None }
    }

    /// Waits for the chunk being prepared ahead, and keeps what it hashed.
    async fn settle(&mut self) -> Result<(), Failure> {
        if let Some(ahead) = self.ahead.take() {
            let prepared = ahead.await?.map_err(|e| read_failure(&self.path, e))?;
            self.whole = prepared.whole;
            self.hashed_to = prepared.hashed_to;
            self.ready = Some((prepared.offset, prepared.sums));
        }
        Ok(())
    }

    /// The chunk `[offset, offset + length)`: feeds the whole-file hash with what it has not seen
    /// (first the bytes before `offset`, when resuming) and returns the chunk's SHA-256 when
    /// `checksum` is asked for (prepared ahead when the guess was right).
    pub(super) async fn chunk(
        &mut self,
        offset: u64,
        length: u64,
        checksum: bool,
    ) -> Result<Option<[u8; 32]>, Failure> {
        self.settle().await?;
        if let Some((at, sums)) = self.ready.take()
            && at == offset
            && let Some((_, sum)) = sums.iter().find(|(l, _)| *l == length)
            && self.hashed_to >= offset + length
        {
            return Ok(checksum.then_some(*sum));
        }
        if !checksum && self.hashed_to >= offset + length {
            return Ok(None);
        }
        let task = self.pass(offset, vec![length], checksum);
        let prepared = task.await?.map_err(|e| read_failure(&self.path, e))?;
        self.whole = prepared.whole;
        self.hashed_to = prepared.hashed_to;
        Ok(prepared.sums.first().filter(|_| checksum).map(|(_, sum)| *sum))
    }

    /// Starts preparing the chunk at `offset`, for each of the `lengths` it may have.
    pub(super) fn prepare(&mut self, offset: u64, lengths: Vec<u64>, checksum: bool) {
        if self.ahead.is_none() && !lengths.is_empty() {
            self.ahead = Some(self.pass(offset, lengths, checksum));
        }
    }

    /// One read of `[hashed_to, offset + max(lengths))` in a blocking thread.
    fn pass(
        &self,
        offset: u64,
        mut lengths: Vec<u64>,
        checksum: bool,
    ) -> tokio::task::JoinHandle<std::io::Result<Prepared>> {
        let path = self.path.clone();
        let mut whole = self.whole.clone();
        let mut hashed = self.hashed_to;
        lengths.sort_unstable();
        tokio::task::spawn_blocking(move || {
            use std::os::unix::fs::FileExt;
            let longest = lengths.last().copied().unwrap_or(0);
            let file = std::fs::File::open(&path)?;
            let mut buffer = vec![0u8; 1 << 20];
            // The bytes before the chunk that the whole-file hash has not seen (after a resume).
            while hashed < offset {
                let want = ((offset - hashed) as usize).min(buffer.len());
                file.read_exact_at(&mut buffer[..want], hashed)?;
                whole.update(&buffer[..want]);
                hashed += want as u64;
            }
            let mut chunk = Sha256::new();
            let mut sums = Vec::new();
            let mut at = offset;
            let mut next = lengths.iter().copied().peekable();
            while at < offset + longest {
                // Stop each read at the next guessed length, to take the chunk's hash there.
                let boundary = offset + next.peek().copied().unwrap_or(longest);
                let want = ((boundary - at) as usize).min(buffer.len());
                let data = &mut buffer[..want];
                file.read_exact_at(data, at)?;
                if checksum {
                    chunk.update(&*data);
                }
                let end = at + want as u64;
                if end > hashed {
                    whole.update(&data[(hashed.saturating_sub(at)) as usize..]);
                    hashed = end;
                }
                at = end;
                while next.peek().is_some_and(|l| offset + l == at) {
                    let length = next.next().expect("peeked");
                    if checksum {
                        sums.push((length, chunk.clone().finalize().into()));
                    } else {
                        sums.push((length, [0; 32]));
                    }
                }
            }
            if checksum && longest == 0 && lengths.contains(&0) {
                sums.push((0, Sha256::digest([]).into()));
            }
            Ok(Prepared { whole, hashed_to: hashed, offset, sums })
        })
    }

    /// The whole file's SHA-256 (reading what was not hashed yet).
    pub(super) async fn finish(&mut self, size: u64) -> Result<[u8; 32], Failure> {
        self.settle().await?;
        if self.hashed_to < size {
            self.chunk(size, 0, false).await?;
        }
        Ok(self.whole.clone().finalize().into())
    }
}

fn read_failure(path: &Path, e: std::io::Error) -> Failure {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        Failure::Fatal("the file got shorter while it was being uploaded".into())
    } else {
        Failure::Fatal(format!("cannot read {}: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn chunks_prepared_ahead_or_not_have_the_right_checksums() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i.wrapping_mul(7919) % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let sha = |range: std::ops::Range<usize>| -> [u8; 32] { Sha256::digest(&data[range]).into() };
        let mut hasher = FileHasher::new(&path);

        assert_eq!(hasher.chunk(0, 1000, true).await.ok(), Some(Some(sha(0..1000))));
        // Prepared ahead, and the guess was right (the chunk grew).
        hasher.prepare(1000, vec![500, 1000, 2000], true);
        assert_eq!(hasher.chunk(1000, 2000, true).await.ok(), Some(Some(sha(1000..3000))));
        // Prepared ahead, and the guess was wrong.
        hasher.prepare(3000, vec![100_000, 200_000], true);
        assert_eq!(hasher.chunk(3000, 150_000, true).await.ok(), Some(Some(sha(3000..153_000))));
        // Again from an earlier offset (the server kept less than was sent).
        assert_eq!(hasher.chunk(2000, 1000, true).await.ok(), Some(Some(sha(2000..3000))));
        // Further on (a resume): the bytes in between still go into the whole file's hash.
        hasher.prepare(153_000, vec![10], false);
        assert_eq!(hasher.chunk(4_000_000, 10, true).await.ok(), Some(Some(sha(4_000_000..4_000_010))));
        assert_eq!(hasher.chunk(4_000_010, 10, false).await.ok(), Some(None));
        assert_eq!(hasher.finish(5_000_000).await.ok(), Some(sha(0..5_000_000)));
    }
}
