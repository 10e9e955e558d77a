//! `file:///dir` binary caches: the same layout Nix writes with `nix copy --to file://dir`.
//!
//! ```text
//! nix-cache-info                 "StoreDir: /nix/store\n", exactly what Nix 2.8 writes
//! <hashpart>.narinfo             one per store path: the commit point
//! nar/<filehash>.nar.zst         compressed NARs, named by the sha256 of their bytes
//! log/, realisations/            created empty, as Nix does
//! .narpost-*                     temporary files, in the directory they are renamed within
//! ```
//!
//! # Crash safety
//!
//! Two promises: no file ever appears under a name a reader asks for with partial contents,
//! and no narinfo is ever visible (after a crash too) whose NAR is not durable. So every
//! file is written under a temporary name (a dot name no reader asks for) in the directory
//! it is going to, and renamed into place; a rename is atomic, so readers see the old state
//! or the whole new file. The compressed NARs are spooled into `nar/` itself. Temporaries
//! beside their destination, not in a directory of their own, keep every rename within one
//! directory: a rename between two directories takes the filesystem's rename lock and both
//! directories' locks, and a thousand tiny paths spent most of their time waiting on those.
//!
//! A NAR is renamed into place before its bytes are synced. Readers find NARs only through
//! narinfos, and its narinfo is renamed into place only after a sync that covers the NAR;
//! so after a crash a NAR's name may hold bytes that never reached the disk, but nothing
//! points at it. Its name is the hash of its bytes, so `put_nar` trusts a NAR it finds only
//! once it has hashed it, and replaces one that does not match.
//!
//! # Which syncs, and why no more
//!
//! `nix copy` itself syncs nothing. On a journaling filesystem each `fsync` is a journal
//! commit of about a millisecond, so syncing each path's files and directories (four per
//! path) made a thousand tiny paths several times slower than Nix. Instead, narinfos are
//! committed in rounds ([`fs_sync`]): one thread writes every narinfo handed in since the
//! last round to a temporary file, makes everything durable with one `syncfs` (those files,
//! the NARs behind them, and the round before's renames), reports the round before done and
//! renames this round's narinfos into place. The pipeline gives its upload slot back while
//! a narinfo waits for its round ([`Target::hand_over_narinfo`]), so under load a round
//! covers many paths and a sync costs each next to nothing; one path alone costs two syncs,
//! the minimum for a commit that must be durable before it is reported.
//!
//! `syncfs` also writes out whatever else is dirty on that filesystem (a build writing
//! gigabytes into the store). So rounds run only while the machine has little dirty data;
//! otherwise each narinfo is committed alone: sync its NAR, the `nar/` directory (a group
//! commit, [`DirSync`], shared by every rename before it) and its own temporary file, rename
//! it, sync the cache directory (again a group commit).

mod dir_sync;
mod fs_sync;
#[cfg(test)]
pub(super) mod tests;

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Committing, NarBody, NarFormat, ObjectStream, PreparedNar, Target, TargetError};
use crate::format::cache_info::CacheInfo;
use crate::format::hash::{HashingWriter, Sha256};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
use dir_sync::{DirSync, sync_dir};
use fs_sync::{FILE_MODE, FsSync};

/// Name of the private directory for spooled NARs and temporary files.
/// Where earlier versions kept their temporaries; stale ones there are still removed.
const OLD_TMP_DIR: &str = ".narpost-tmp";

/// Names of this target's temporary files start so.
const TMP_PREFIX: &str = ".narpost-";

/// Temporary files older than this are leftovers of a crashed run; younger ones may belong
/// to a run still in progress.
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// Directories narpost creates are readable by everyone too, like the files in them.
const DIR_MODE: u32 = 0o755;

pub struct FileTarget {
    /// The cache root, as the user named it.
    dir: PathBuf,
    /// Handed to the pipeline through [`Target::nar_format`].
    compression_level: i32,
    /// Shared with blocking tasks, which must own what they use.
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// Group commit for renames into `nar/`.
    nar_dir: DirSync,
    /// Group commit for renames into the cache root (narinfos).
    root_dir: DirSync,
    /// Group commit of the whole filesystem, used instead of the file and directory syncs
    /// while it may be.
    fs: FsSync,
    /// Makes temporary names unique within this process.
    tmp_counter: AtomicU64,
}

impl FileTarget {
    pub fn new(dir: PathBuf, compression_level: i32) -> FileTarget {
        let fs = FsSync::new(&dir);
        Self::with_fs_sync(dir, compression_level, fs)
    }

    /// As if the machine had `dirty` bytes of dirty page cache, whatever it has.
    #[cfg(test)]
    pub(crate) fn with_dirty_probe(dir: PathBuf, compression_level: i32, dirty: u64) -> Self {
        let probe = if dirty == 0 {
            || Some(0)
        } else {
            || Some(fs_sync::DIRTY_LIMIT + 1)
        };
        let fs = FsSync::with_dirty(&dir, probe);
        Self::with_fs_sync(dir, compression_level, fs)
    }

    fn with_fs_sync(dir: PathBuf, compression_level: i32, fs: FsSync) -> FileTarget {
        let inner = Arc::new(Inner {
            nar_dir: DirSync::new(dir.join("nar")),
            root_dir: DirSync::new(dir.clone()),
            fs,
            tmp_counter: AtomicU64::new(0),
            dir: dir.clone(),
        });
        FileTarget {
            dir,
            compression_level,
            inner,
        }
    }
}

#[async_trait]
impl Target for FileTarget {
    fn url(&self) -> String {
        format!("file://{}", self.dir.display())
    }

    fn nar_format(&self) -> NarFormat {
        NarFormat::Zstd {
            level: self.compression_level,
        }
    }

    fn spool_dir(&self) -> Option<PathBuf> {
        // The spooled NAR is renamed within `nar/` (see the module doc).
        Some(self.inner.nar_dir.dir.clone())
    }

    async fn open(&self) -> Result<(), TargetError> {
        let inner = self.inner.clone();
        blocking(move || inner.open()).await
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        let inner = self.inner.clone();
        let paths: Vec<StorePath> = paths.iter().map(|p| p.path.clone()).collect();
        blocking(move || inner.missing(paths)).await
    }

    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
        let spooled = match &nar.body {
            NarBody::Spooled(s) => s,
            NarBody::Raw(_) => {
                return Err(TargetError::permanent(format!(
                    "{}: this cache stores zstd-compressed NARs, but was handed an uncompressed one for {}",
                    self.url(),
                    nar.info.path.to_absolute()
                )));
            }
        };
        let key = spooled.cache_key();
        let spool = spooled.file.clone();
        let (size, hash) = (spooled.file_size, spooled.file_hash);
        let inner = self.inner.clone();
        blocking(move || inner.put_nar(&spool, &key, size, hash).map(|()| key)).await
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, nar: &PreparedNar) -> Result<(), TargetError> {
        self.hand_over_narinfo(narinfo, nar).await?.await
    }

    async fn hand_over_narinfo(
        &self,
        narinfo: &NarInfo,
        _nar: &PreparedNar,
    ) -> Result<Committing, TargetError> {
        let name = format!("{}.narinfo", narinfo.store_path.hash_part());
        let text = narinfo.to_string();
        let nar_key = super::object_key(&narinfo.url)?.to_owned();
        let dest = self.dir.join(&name);
        let tmp = self.inner.tmp_name(&self.dir, &name);
        let (done, finished) = tokio::sync::oneshot::channel();
        let commit = fs_sync::Commit {
            tmp,
            dest,
            text: text.into_bytes(),
            done,
        };
        match self.inner.fs.submit(commit) {
            Ok(()) => {
                let inner = self.inner.clone();
                let url = self.url();
                Ok(Box::pin(async move {
                    match finished.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err((path, e))) => Err(inner.io_err(e, "cannot commit", &path)),
                        Err(_) => Err(TargetError::transient(format!(
                            "{url}: the commit thread ended"
                        ))),
                    }
                }))
            }
            Err(commit) => {
                let inner = self.inner.clone();
                blocking(move || inner.commit_alone(&commit, &nar_key)).await?;
                Ok(Box::pin(async { Ok(()) }))
            }
        }
    }

    fn stores_logs(&self) -> bool {
        true
    }

    async fn put_log(&self, drv: &StorePath, log: Bytes) -> Result<(), TargetError> {
        let key = super::log_key(drv);
        let inner = self.inner.clone();
        // Best effort and no commit point: log/ is not synced, so a crash just after may
        // lose the log (written whole or not at all), never anything a narinfo promises.
        blocking(move || inner.write_atomically(&key, &log)).await
    }

    async fn read_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        let path = self.dir.join(super::object_key(key)?);
        let inner = self.inner.clone();
        blocking(move || {
            let Some(file) = inner.open_existing(&path)? else {
                return Ok(None);
            };
            let mut body = Vec::new();
            io::Read::read_to_end(&mut io::Read::take(file, limit as u64 + 1), &mut body)
                .map_err(|e| inner.io_err(e, "cannot read", &path))?;
            if body.len() > limit {
                return Err(TargetError::permanent(format!(
                    "{}: larger than {limit} bytes",
                    path.display()
                )));
            }
            Ok(Some(body))
        })
        .await
    }

    async fn object_size(&self, key: &str) -> Result<Option<u64>, TargetError> {
        let path = self.dir.join(super::object_key(key)?);
        let inner = self.inner.clone();
        blocking(move || match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(meta.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(inner.io_err(e, "cannot check", &path)),
        })
        .await
    }

    async fn read_stream(&self, key: &str) -> Result<Option<ObjectStream>, TargetError> {
        let path = self.dir.join(super::object_key(key)?);
        let inner = self.inner.clone();
        let opened = {
            let path = path.clone();
            blocking(move || inner.open_existing(&path)).await?
        };
        let Some(file) = opened else {
            return Ok(None);
        };
        let size = file.metadata().ok().map(|m| m.len());
        let inner = self.inner.clone();
        let file = tokio::fs::File::from_std(file);
        let body = futures::StreamExt::boxed(futures::StreamExt::map(
            tokio_util::io::ReaderStream::with_capacity(file, 1 << 20),
            move |chunk| chunk.map_err(|e| inner.io_err(e, "cannot read", &path)),
        ));
        Ok(Some(ObjectStream { size, body }))
    }

    async fn remove(&self, key: &str) -> Result<(), TargetError> {
        let path = self.dir.join(super::object_key(key)?);
        let inner = self.inner.clone();
        blocking(move || match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(inner.io_err(e, "cannot remove", &path)),
        })
        .await
    }

    async fn write_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), TargetError> {
        let key = super::object_key(key)?.to_owned();
        let inner = self.inner.clone();
        blocking(move || {
            if let Some((sub, _)) = key.rsplit_once('/') {
                let dir = inner.dir.join(sub);
                fs::create_dir_all(&dir)
                    .and_then(|()| fs::set_permissions(&dir, fs::Permissions::from_mode(DIR_MODE)))
                    .map_err(|e| inner.io_err(e, "cannot create directory", &dir))?;
            }
            inner.write_atomically(&key, &bytes)
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Option<Vec<String>>, TargetError> {
        let dir = self
            .dir
            .join(super::object_key(prefix.trim_end_matches('/'))?);
        let inner = self.inner.clone();
        blocking(move || {
            let list_err = |e| inner.io_err(e, "cannot list", &dir);
            let items = match fs::read_dir(&dir) {
                Ok(items) => items,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
                Err(e) => return Err(list_err(e)),
            };
            let mut out = Vec::new();
            for item in items {
                let name = item.map_err(list_err)?.file_name();
                if let Some(name) = name.to_str().filter(|n| !n.starts_with(TMP_PREFIX)) {
                    out.push(name.to_owned());
                }
            }
            out.sort();
            Ok(Some(out))
        })
        .await
    }

    async fn list_narinfos(&self) -> Result<Option<Vec<String>>, TargetError> {
        let inner = self.inner.clone();
        let dir = self.dir.clone();
        blocking(move || {
            let list_err = |e| inner.io_err(e, "cannot list", &dir);
            let mut out = Vec::new();
            for item in fs::read_dir(&dir).map_err(list_err)? {
                let name = item.map_err(list_err)?.file_name();
                if let Some(hash) = name.to_str().and_then(|n| n.strip_suffix(".narinfo")) {
                    out.push(hash.to_owned());
                }
            }
            out.sort();
            Ok(Some(out))
        })
        .await
    }
}

impl Inner {
    fn open(&self) -> Result<(), TargetError> {
        let created_root = !self.dir.exists();
        // Nix creates log/ and realisations/ on open too; doing the same keeps the tree
        // identical.
        let (log, realisations) = (self.dir.join("log"), self.dir.join("realisations"));
        for sub in [&self.dir, &self.nar_dir.dir, &log, &realisations] {
            if !sub.exists() {
                fs::create_dir_all(sub)
                    .and_then(|()| fs::set_permissions(sub, fs::Permissions::from_mode(DIR_MODE)))
                    .map_err(|e| self.io_err(e, "cannot create directory", sub))?;
            }
        }
        if created_root && let Some(parent) = self.dir.parent() {
            // Best effort: the directories only need to survive once something is in them,
            // and each narinfo commit syncs the root again.
            let _ = sync_dir(parent);
        }
        sync_dir(&self.dir).map_err(|e| self.io_err(e, "cannot sync directory", &self.dir))?;

        let info_path = self.dir.join("nix-cache-info");
        match fs::read_to_string(&info_path) {
            Ok(text) => CacheInfo::check(&text).map(drop).map_err(|what| {
                TargetError::permanent(format!("{}: {what}", info_path.display())).with_hint(
                    "point narpost at a cache for /nix/store, or remove the file if the directory is not in use",
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.write_atomically("nix-cache-info", CacheInfo::ours().as_bytes())?;
                let ticket = self.root_dir.note_rename();
                self.root_dir
                    .sync_through(ticket)
                    .map_err(|e| self.io_err(e, "cannot sync directory", &self.dir))?;
            }
            Err(e) => return Err(self.io_err(e, "cannot read", &info_path)),
        }
        self.remove_stale_tmp();
        Ok(())
    }

    /// Leftovers of crashed runs would otherwise pile up forever beside the cache's files.
    fn remove_stale_tmp(&self) {
        let now = SystemTime::now();
        for dir in [
            self.dir.clone(),
            self.nar_dir.dir.clone(),
            self.dir.join("log"),
            self.dir.join(OLD_TMP_DIR),
        ] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                let Ok(meta) = entry.metadata() else { continue };
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|age| age > STALE_TMP_AGE);
                if meta.is_file() && old {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }

    fn missing(&self, paths: Vec<StorePath>) -> Result<HashSet<StorePath>, TargetError> {
        let mut missing = HashSet::new();
        for path in paths {
            let narinfo = self.dir.join(format!("{}.narinfo", path.hash_part()));
            match fs::symlink_metadata(&narinfo) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    missing.insert(path);
                }
                Err(e) => return Err(self.io_err(e, "cannot check", &narinfo)),
            }
        }
        Ok(missing)
    }

    fn put_nar(&self, spool: &Path, key: &str, size: u64, hash: Sha256) -> Result<(), TargetError> {
        let dest = self.dir.join(key);
        // Its name is its content hash, but after a crash a name may hold bytes that never
        // reached the disk (see the module doc): trusted only once its bytes are checked.
        // Replacing it instead would swap a durable file that some narinfo may point to for
        // one that is not durable yet.
        if let Ok(meta) = fs::metadata(&dest)
            && meta.is_file()
            && meta.len() == size
            && file_sha256(&dest).map_err(|e| self.io_err(e, "cannot read", &dest))? == hash
        {
            self.nar_dir.note_rename();
            return Ok(());
        }

        let len = fs::symlink_metadata(spool)
            .map_err(|e| self.io_err(e, "cannot stat spooled NAR", spool))?
            .len();
        if len != size {
            return Err(TargetError::permanent(format!(
                "{}: spooled NAR is {len} bytes, but its FileSize is {size}",
                spool.display()
            )));
        }
        fs::set_permissions(spool, fs::Permissions::from_mode(FILE_MODE))
            .map_err(|e| self.io_err(e, "cannot set the mode of spooled NAR", spool))?;

        match fs::rename(spool, &dest) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                // The spool lives on another filesystem (a caller-chosen spool directory):
                // copy it into ours first, so the final step is still an atomic rename.
                let mut src = File::open(spool)
                    .map_err(|e| self.io_err(e, "cannot open spooled NAR", spool))?;
                self.write_atomically_with(key, false, |out| io::copy(&mut src, out).map(|_| ()))?;
            }
            Err(e) => return Err(self.io_err(e, "cannot store", &dest)),
        }
        self.nar_dir.note_rename();
        Ok(())
    }

    /// Commits a narinfo syncing the files behind it one by one: the way when the
    /// filesystem is not to be synced whole.
    fn commit_alone(&self, commit: &fs_sync::Commit, nar_key: &str) -> Result<(), TargetError> {
        let (tmp, dest) = (&commit.tmp, &commit.dest);
        self.write_temp_at(tmp, dest, true, |out| out.write_all(&commit.text))?;
        let committed = (|| {
            // The NAR's bytes and name and the narinfo's own bytes become durable before
            // the narinfo can be seen.
            let nar = self.dir.join(nar_key);
            File::open(&nar)
                .and_then(|f| f.sync_data())
                .map_err(|e| self.io_err(e, "cannot sync", &nar))?;
            let ticket = self.nar_dir.current();
            self.nar_dir
                .sync_through(ticket)
                .map_err(|e| self.io_err(e, "cannot sync directory", &self.nar_dir.dir))?;
            fs::rename(tmp, dest).map_err(|e| self.io_err(e, "cannot write", dest))
        })();
        if committed.is_err() {
            let _ = fs::remove_file(tmp);
        }
        committed?;
        // Durable before success is reported and the queue forgets the path.
        let renamed = self.root_dir.note_rename();
        self.root_dir
            .sync_through(renamed)
            .map_err(|e| self.io_err(e, "cannot sync directory", &self.dir))
    }

    fn write_atomically(&self, key: &str, bytes: &[u8]) -> Result<(), TargetError> {
        self.write_atomically_with(key, true, |out| out.write_all(bytes))
    }

    /// Writes `key` (relative to the cache root) through a temporary file (its data synced
    /// when `sync` is set) and a rename. Syncing the directory that holds `key` is the
    /// caller's business.
    fn write_atomically_with(
        &self,
        key: &str,
        sync: bool,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), TargetError> {
        let dest = self.dir.join(key);
        let (parent, base) = match key.rsplit_once('/') {
            Some((sub, base)) => (self.dir.join(sub), base),
            None => (self.dir.clone(), key),
        };
        let tmp = self.write_temp(&parent, base, sync, fill)?;
        if let Err(e) = fs::rename(&tmp, &dest) {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_err(e, "cannot write", &dest));
        }
        Ok(())
    }

    /// A new temporary file in `parent` for `base`, filled; its name.
    fn write_temp(
        &self,
        parent: &Path,
        base: &str,
        sync: bool,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<PathBuf, TargetError> {
        let tmp = self.tmp_name(parent, base);
        self.write_temp_at(&tmp, &parent.join(base), sync, fill)?;
        Ok(tmp)
    }

    /// A name for a temporary file in `parent` that will become `base`, unique in this
    /// process.
    fn tmp_name(&self, parent: &Path, base: &str) -> PathBuf {
        parent.join(format!(
            "{TMP_PREFIX}{base}.{}-{}.tmp",
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// Creates `tmp` (to become `dest`) and fills it.
    fn write_temp_at(
        &self,
        tmp: &Path,
        dest: &Path,
        sync: bool,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), TargetError> {
        if let Err(e) = fs_sync::write_new(tmp, sync, fill) {
            let _ = fs::remove_file(tmp);
            return Err(self.io_err(e, "cannot write", dest));
        }
        Ok(())
    }

    /// `<path>: <what>: <error>`, classified, with a hint where the user can fix it.
    /// A regular file opened for reading, or `None` when nothing (or no file) is there.
    fn open_existing(&self, path: &Path) -> Result<Option<File>, TargetError> {
        match File::open(path) {
            Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => Ok(Some(f)),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err(e, "cannot open", path)),
        }
    }

    fn io_err(&self, e: io::Error, what: &str, path: &Path) -> TargetError {
        let message = format!("{}: {what}: {e}", path.display());
        let dir = self.dir.display();
        match e.raw_os_error().map(rustix::io::Errno::from_raw_os_error) {
            Some(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM) => TargetError::auth(message)
                .with_hint(format!(
                    "make {dir} and everything in it writable by the user narpost runs as"
                )),
            Some(rustix::io::Errno::NOSPC | rustix::io::Errno::DQUOT) => {
                TargetError::transient(message)
                    .with_hint(format!("free space on the filesystem that holds {dir}"))
            }
            Some(rustix::io::Errno::ROFS) => TargetError::permanent(message).with_hint(format!(
                "{dir} is on a read-only filesystem; remount it or pick another cache"
            )),
            Some(
                rustix::io::Errno::IO
                | rustix::io::Errno::AGAIN
                | rustix::io::Errno::INTR
                | rustix::io::Errno::TIMEDOUT
                | rustix::io::Errno::STALE,
            ) => TargetError::transient(message),
            _ if e.kind() == io::ErrorKind::NotFound => TargetError::permanent(message).with_hint(
                format!("{dir} changed under narpost; check that nothing else removes files there"),
            ),
            _ => TargetError::permanent(message),
        }
    }
}

/// The sha256 of a file's bytes.
fn file_sha256(path: &Path) -> io::Result<Sha256> {
    let mut hashing = HashingWriter::new(io::sink());
    io::copy(&mut File::open(path)?, &mut hashing)?;
    Ok(hashing.finish().1)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::transient(format!("file cache: internal error: {e}")))?
}
