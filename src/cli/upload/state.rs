//! What `ferry upload` remembers between runs: for each (file, target URL) the URL of the upload
//! the server created, in a small JSON file of its own, so that a rerun after Ctrl-C, a lost
//! network, a killed process or a reboot asks the server for the offset and continues there.
//!
//! A file is recognised by its fingerprint: canonical path, size, modification time (ns), and the
//! SHA-256 of its first and last MiB. The path, size and time cost one `stat`; the two hashes cost
//! at most 2 MiB of reads and catch a file rewritten under a restored or coarse modification time
//! (`cp -p`, `rsync -t`, FAT's 2 s). Any change gives a new fingerprint and so a new upload; a
//! change in the middle that all of these miss is caught by the final SHA-256 comparison.

use std::{
    fs::{File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    time::UNIX_EPOCH,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::policy::MIB;

/// The state folder: `--state-dir`/`FERRY_STATE_DIR`, else `$XDG_STATE_HOME/ferry`, else
/// `~/.local/state/ferry`.
pub fn default_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("ferry"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("neither XDG_STATE_HOME nor HOME is set: give a folder with --state-dir or FERRY_STATE_DIR")?;
    Ok(PathBuf::from(home).join(".local").join("state").join("ferry"))
}

/// Who a local file is, for resuming.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
    /// SHA-256 (hex) of the first MiB and of the last MiB.
    pub head: String,
    pub tail: String,
}

impl Fingerprint {
    /// Reads the fingerprint of `path` (blocking: at most 2 MiB of reads).
    pub fn of(path: &Path) -> anyhow::Result<Self> {
        let canonical = std::fs::canonicalize(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut file = File::open(&canonical).with_context(|| format!("cannot open {}", path.display()))?;
        let meta = file.metadata().with_context(|| format!("cannot read {}", path.display()))?;
        anyhow::ensure!(meta.is_file(), "{} is not a regular file", path.display());
        let mtime_ns = match meta.modified()?.duration_since(UNIX_EPOCH) {
            Ok(after) => after.as_nanos() as i128,
            Err(before) => -(before.duration().as_nanos() as i128),
        };
        let size = meta.len();
        let head = hash_range(&mut file, 0, size.min(MIB))?;
        let tail = hash_range(&mut file, size.saturating_sub(MIB), size.min(MIB))?;
        Ok(Self { path: canonical, size, mtime_ns, head, tail })
    }

    /// The state file's name for uploads of this file to `target`.
    pub fn key(&self, target: &str) -> String {
        let mut hash = Sha256::new();
        hash.update(b"ferry-upload-v1\n");
        hash.update(self.path.as_os_str().as_encoded_bytes());
        hash.update(format!("\n{}\n{}\n{}\n{}\n{target}", self.size, self.mtime_ns, self.head, self.tail));
        hex(&hash.finalize()[..16])
    }
}

fn hash_range(file: &mut File, start: u64, len: u64) -> anyhow::Result<String> {
    file.seek(SeekFrom::Start(start))?;
    let mut hash = Sha256::new();
    let mut buffer = vec![0u8; len as usize];
    file.read_exact(&mut buffer).context("the file got shorter while it was being read")?;
    hash.update(&buffer);
    Ok(hex(&hash.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One upload as remembered on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub version: u32,
    pub fingerprint: Fingerprint,
    /// The `--to` URL the upload was made for.
    pub target: String,
    /// The upload's URL (the `Location` of the POST).
    pub upload_url: String,
    /// Seconds since the epoch.
    pub created_at: u64,
    /// Set once the server's SHA-256 matched the file's.
    #[serde(default)]
    pub sha256: Option<String>,
    /// The protocol that created the upload (`tus`, `ietf`); records written before there was a
    /// choice have none and were made by tus.
    #[serde(default)]
    pub protocol: Option<String>,
}

/// The state folder, holding `<key>.json` per upload and `<key>.lock` while one runs.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

/// Held while a file is being uploaded to a target, so that two runs do not fight over it.
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl StateDir {
    /// Opens the folder, creating it readable by its owner only: upload URLs are capabilities.
    pub fn open(dir: PathBuf) -> anyhow::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create the state folder {}", dir.display()))?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn file(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.json"))
    }

    /// Takes the lock of `key`; fails at once when another process holds it.
    pub fn lock(&self, key: &str) -> anyhow::Result<Lock> {
        let path = self.dir.join(format!("{key}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Lock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => {
                anyhow::bail!("another `ferry upload` is uploading this file to this URL right now")
            }
            Err(std::fs::TryLockError::Error(e)) => Err(e).context(format!("cannot lock {}", path.display())),
        }
    }

    /// The record of `key`; none when there is none or it cannot be read (it is then ignored).
    pub fn load(&self, key: &str) -> Option<Record> {
        let text = std::fs::read_to_string(self.file(key)).ok()?;
        serde_json::from_str::<Record>(&text).ok().filter(|r| r.version == 1)
    }

    /// Saves a record durably: written to a temporary file, flushed to disk, renamed over the old.
    pub fn save(&self, key: &str, record: &Record) -> anyhow::Result<()> {
        let path = self.file(key);
        let temporary = self.dir.join(format!("{key}.json.tmp"));
        let write = || -> std::io::Result<()> {
            let mut file = File::create(&temporary)?;
            file.write_all(serde_json::to_string_pretty(record).map_err(std::io::Error::other)?.as_bytes())?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().with_context(|| format!("cannot save the upload state in {}", path.display()))
    }

    pub fn remove(&self, key: &str) {
        let _ = std::fs::remove_file(self.file(key));
    }

    /// Removes the records of earlier versions of a file (same path and target, another
    /// fingerprint): they can never be resumed, the file has changed.
    pub fn forget_others(&self, keep: &str, fingerprint: &Fingerprint, target: &str) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(key) = name.strip_suffix(".json") else { continue };
            if key == keep {
                continue;
            }
            if let Some(record) = self.load(key)
                && record.target == target
                && record.fingerprint.path == fingerprint.path
            {
                self.remove(key);
                let _ = std::fs::remove_file(self.dir.join(format!("{key}.lock")));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_changed_file_has_another_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.bin");
        let data: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
        write(&path, &data);
        let first = Fingerprint::of(&path).unwrap();
        assert_eq!(first, Fingerprint::of(&path).unwrap(), "stable while nothing changes");
        assert_eq!(first.key("http://a/files/"), Fingerprint::of(&path).unwrap().key("http://a/files/"));
        assert_ne!(first.key("http://a/files/"), first.key("http://b/files/"), "the target is part of the key");

        // The last byte changes and the modification time is put back: the tail hash notices.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        let mut changed = data.clone();
        *changed.last_mut().unwrap() ^= 1;
        write(&path, &changed);
        File::options().write(true).open(&path).unwrap().set_modified(mtime).unwrap();
        let second = Fingerprint::of(&path).unwrap();
        assert_eq!((second.size, second.mtime_ns), (first.size, first.mtime_ns));
        assert_ne!(second.key("t"), first.key("t"));
    }

    #[test]
    fn records_round_trip_and_stale_ones_are_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().join("state")).unwrap();
        let path = dir.path().join("f");
        write(&path, b"hello");
        let fingerprint = Fingerprint::of(&path).unwrap();
        let record = Record {
            version: 1,
            fingerprint: fingerprint.clone(),
            target: "http://x/files/".into(),
            upload_url: "http://x/files/1".into(),
            created_at: 1,
            sha256: None,
            protocol: Some("ietf".into()),
        };
        state.save("old", &record).unwrap();
        state.save("new", &Record { upload_url: "http://x/files/2".into(), ..record.clone() }).unwrap();
        assert_eq!(state.load("old").unwrap().upload_url, "http://x/files/1");
        assert_eq!(state.load("old").unwrap().protocol.as_deref(), Some("ietf"));
        state.forget_others("new", &fingerprint, "http://x/files/");
        assert!(state.load("old").is_none());
        assert_eq!(state.load("new").unwrap().upload_url, "http://x/files/2");

        // A record of an older client, without the protocol, still loads.
        let mut old = serde_json::to_value(&record).unwrap();
        old.as_object_mut().unwrap().remove("protocol");
        std::fs::write(dir.path().join("state").join("older.json"), old.to_string()).unwrap();
        assert_eq!(state.load("older").map(|r| r.protocol), Some(None));
    }

    #[test]
    fn one_lock_per_key() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::open(dir.path().to_path_buf()).unwrap();
        let held = state.lock("k").unwrap();
        assert!(state.lock("k").is_err());
        drop(held);
        assert!(state.lock("k").is_ok());
    }
}
