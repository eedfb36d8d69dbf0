//! Local disk: bytes are written once, at their offset, into the file that object_store's
//! `LocalFileSystem` reads back. object_store has no append, so appends use their own file code.
//!
//! Two requests may append to one upload at once (a client that resumed while its dropped
//! request is still in flight, perhaps on another instance sharing the disk). Each append holds a
//! writer generation handed out by the database; a small lock file beside the data records the
//! newest generation. Every write takes an exclusive `flock` on that file, checks that its
//! generation is still the newest and only then writes, so once a newer writer has registered,
//! an older one can never write again and bytes never interleave.

use std::{
    fs::{File, OpenOptions},
    io::{self, IoSlice, Read, Seek, SeekFrom, Write},
    ops::Range,
    path::PathBuf,
    sync::Arc,
};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::{ObjectStoreExt, local::LocalFileSystem, path::Path};

use super::{
    AppendContext, AppendOutcome, Appender, ByteStream, Download, Part, Result, Staged, StagedObject, Store,
    StoreError, StoreUpload,
};
use crate::model::types::UploadId;

pub struct LocalStore {
    fs: Arc<LocalFileSystem>,
    root: PathBuf,
}

impl LocalStore {
    pub fn new(root: impl Into<PathBuf>) -> anyhow::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("uploads"))?;
        let root = root.canonicalize()?;
        let fs = LocalFileSystem::new_with_prefix(&root)?;
        Ok(Self { fs: Arc::new(fs), root })
    }

    fn data_path(&self, id: UploadId, upload: &StoreUpload) -> Result<PathBuf> {
        Ok(self.fs.path_to_filesystem(&upload.object_path(id))?)
    }

    /// Beside the data: `<id>.lock`.
    fn lock_path(&self, id: UploadId, upload: &StoreUpload) -> Result<PathBuf> {
        Ok(self.data_path(id, upload)?.with_file_name(format!("{id}.lock")))
    }
}

/// The free space of the volume holding `path` (statvfs(3)).
pub(crate) fn volume_space(path: &std::path::Path) -> io::Result<super::Space> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c_path` is a valid C string and `stat` is a writable statvfs, which statvfs(3)
    // fills in completely when it returns 0.
    let result = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: statvfs returned 0, so it filled `stat` in.
    let stat = unsafe { stat.assume_init() };
    let fragment = stat.f_frsize;
    Ok(super::Space { available: stat.f_bavail * fragment, total: stat.f_blocks * fragment })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> io::Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Other(format!("blocking task failed: {e}")))?
        .map_err(StoreError::Io)
}

/// Reads the newest registered generation; call with the lock held.
fn read_generation(lock: &File) -> io::Result<i64> {
    let mut buf = [0u8; 8];
    let mut file = lock;
    file.seek(SeekFrom::Start(0))?;
    match file.read_exact(&mut buf) {
        Ok(()) => Ok(i64::from_le_bytes(buf)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(e),
    }
}

#[async_trait]
impl Store for LocalStore {
    async fn create(
        &self,
        id: UploadId,
        key_prefix: Option<String>,
        _max_length: u64,
        _empty: bool,
    ) -> Result<StoreUpload> {
        let upload = StoreUpload { key_prefix, ..Default::default() };
        let data = self.data_path(id, &upload)?;
        blocking(move || {
            if let Some(folder) = data.parent() {
                std::fs::create_dir_all(folder)?;
            }
            OpenOptions::new().write(true).create(true).truncate(false).open(&data)?.sync_all()?;
            Ok(())
        })
        .await?;
        Ok(upload)
    }

    async fn append(&self, context: AppendContext) -> Result<Box<dyn Appender>> {
        let AppendContext { id, offset, generation, upload, stop, check, .. } = context;
        // Nothing is opened here: the write stage's thread opens the files with its first write,
        // so an append costs no extra trip to a blocking thread.
        Ok(Box::new(LocalAppender {
            data_path: self.data_path(id, &upload)?,
            lock_path: self.lock_path(id, &upload)?,
            files: None,
            generation,
            position: offset,
            stop,
            check,
            runtime: tokio::runtime::Handle::current(),
        }))
    }

    fn completes_in_place(&self) -> bool {
        true
    }

    fn space(&self) -> Option<super::Space> {
        volume_space(&self.root)
            .inspect_err(|e| tracing::warn!(path = %self.root.display(), error = %e, "could not read the free space"))
            .ok()
    }

    async fn complete(&self, _id: UploadId, _upload: &StoreUpload, _parts: &[Part]) -> Result<()> {
        Ok(())
    }

    async fn read(&self, id: UploadId, upload: &StoreUpload, range: Option<Range<u64>>) -> Result<Download> {
        let path = upload.object_path(id);
        super::read_object(self.fs.as_ref(), &path, range).await
    }

    async fn write_stream(&self, id: UploadId, upload: &StoreUpload, stream: ByteStream) -> Result<u64> {
        let upload = self.fs.put_multipart(&upload.object_path(id)).await?;
        super::write_multipart(upload, 8 << 20, stream).await
    }

    async fn delete(&self, id: UploadId, upload: &StoreUpload, _staged: &[Staged]) -> Result<()> {
        for path in [self.data_path(id, upload)?, self.lock_path(id, upload)?] {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    async fn staged_objects(&self) -> Result<Vec<StagedObject>> {
        Ok(Vec::new())
    }

    async fn delete_staged(&self, _key: &str) -> Result<()> {
        Ok(())
    }

    async fn presign(
        &self,
        _id: UploadId,
        _upload: &StoreUpload,
        _expires_in: std::time::Duration,
    ) -> Result<Option<String>> {
        Ok(None)
    }

    fn location(&self, id: UploadId, upload: &StoreUpload) -> String {
        self.data_path(id, upload).map(|p| p.display().to_string()).unwrap_or_default()
    }

    async fn ping(&self) -> Result<()> {
        let path = Path::from("uploads");
        self.fs.path_to_filesystem(&path)?;
        tokio::fs::metadata(self.root.join("uploads")).await?;
        Ok(())
    }
}

struct LocalAppender {
    data_path: PathBuf,
    lock_path: PathBuf,
    /// This append's own descriptors of the data file (whose file position is this writer's)
    /// and of the lock file, once the first write opened them.
    files: Option<(File, File)>,
    generation: i64,
    position: u64,
    stop: tokio_util::sync::CancellationToken,
    /// Asked when the lock file records a newer generation than this writer's.
    check: std::sync::Arc<dyn super::WriterCheck>,
    runtime: tokio::runtime::Handle,
}

impl LocalAppender {
    /// Opens the files and registers this writer's generation in the lock file, unless a newer
    /// writer registered already. Called with nothing locked.
    fn open(&mut self) -> io::Result<bool> {
        let data = OpenOptions::new().write(true).create(true).truncate(false).open(&self.data_path)?;
        let lock = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&self.lock_path)?;
        lock.lock()?;
        let registered = read_generation(&lock).and_then(|newest| {
            // A newer generation in the lock file is a newer writer, unless the database says
            // this one is the newest: then the database lost the leases that handed the newer
            // numbers out (a PostgreSQL crash before its WAL was flushed), and their writers
            // are long gone, since their commits were lost with them.
            if newest > self.generation
                && !self.runtime.block_on(self.check.is_newest()).map_err(|e| io::Error::other(e.to_string()))?
            {
                return Ok(false);
            }
            let mut file = &lock;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(&self.generation.to_le_bytes())?;
            Ok(true)
        });
        lock.unlock()?;
        if registered? {
            self.files = Some((data, lock));
            return Ok(true);
        }
        Ok(false)
    }
}

impl Appender for LocalAppender {
    fn write(&mut self, data: Vec<Bytes>) -> Result<()> {
        if self.files.is_none() && !self.open()? {
            return Err(StoreError::Superseded);
        }
        let (file, lock) = self.files.as_ref().expect("opened");
        let len: u64 = data.iter().map(|d| d.len() as u64).sum();
        lock.lock()?;
        // A newer writer registers in the lock file (any instance) or, on this instance, may not
        // have got there yet but has already told this one to stop.
        let result = read_generation(lock).and_then(|newest| {
            if newest == self.generation && !self.stop.is_cancelled() {
                write_all_at(file, &data, self.position)?;
                Ok(true)
            } else {
                Ok(false)
            }
        });
        lock.unlock()?;
        if !result? {
            return Err(StoreError::Superseded);
        }
        self.position += len;
        Ok(())
    }

    fn finish(self: Box<Self>, _last: bool) -> Result<AppendOutcome> {
        if let Some((data, _)) = &self.files {
            data.sync_data()?;
        }
        Ok(AppendOutcome::default())
    }
}

/// Writes `pieces` one after the other from `position`, with as few vectored writes as the
/// kernel allows (one, usually).
fn write_all_at(file: &File, pieces: &[Bytes], position: u64) -> io::Result<()> {
    let mut file = file;
    file.seek(SeekFrom::Start(position))?;
    let mut slices: Vec<IoSlice<'_>> = pieces.iter().filter(|p| !p.is_empty()).map(|p| IoSlice::new(p)).collect();
    let mut slices = &mut slices[..];
    while !slices.is_empty() {
        match file.write_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "the file took no more bytes")),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
