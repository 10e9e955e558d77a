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
//! Two promises: no file ever appears under its real name with partial contents, and no
//! narinfo is ever visible (after a crash too) whose NAR is not durable. So every file is
//! written under a temporary name (a dot name no reader asks for) in the directory it is
//! going to, its data synced, and then renamed into place; a rename is atomic, so readers
//! see the old state or the whole new file. The compressed NARs are spooled into `nar/`
//! itself. Temporaries beside their destination, not in a directory of their own, keep
//! every rename within one directory: a rename between two directories takes the
//! filesystem's rename lock and both directories' locks, and a thousand tiny paths spent
//! most of their time waiting on those (and on the one temporary directory every file
//! was created in).
//!
//! # Which syncs, and why no more
//!
//! A `fdatasync` costs about a millisecond here, and `nix copy` itself syncs nothing, so
//! syncing naively (file, directory, file, directory: four per path, one after the other)
//! would make a thousand tiny paths several times slower than Nix. What is needed per path:
//!
//! 1. `put_nar`: `fdatasync` the spooled NAR, then rename it into `nar/`. Needed so the name
//!    never points at missing data. The `nar/` directory is *not* synced here.
//! 2. `put_narinfo`: sync `nar/` (so the NAR's directory entry is durable), write the
//!    narinfo to a temporary file and `fdatasync` it, rename it into place, sync the cache
//!    directory (so the narinfo itself is durable when we report success and the queue
//!    forgets the path).
//!
//! The two directory syncs are *group commits* ([`DirSync`]): a directory sync covers every
//! rename that finished before it started, so a caller whose rename is already covered by a
//! sync that finished, or that was waited for, returns without syncing again. The pipeline
//! runs `put_narinfo` outside its worker slots, so under load many narinfos wait on one
//! directory sync, and the directory cost per path approaches zero; with a single path
//! at a time it degrades to one sync each, which is the minimum for that path. The two file
//! syncs cannot be shared (a sync names one file), but they run on blocking threads in
//! parallel across paths, where the filesystem merges their journal commits. `syncfs` would
//! cover everything with one call but also flushes unrelated dirty data on the same
//! filesystem (a build writing gigabytes into the store), so it is not used.
//!
//! A NAR that already exists with the right size is not replaced: its name is its content
//! hash, and replacing it would swap a durable file that some narinfo may already point to
//! for a new one. It is synced once more instead (free when it is already on disk), because
//! it may come from a writer that never syncs, such as `nix copy`.

mod dir_sync;
#[cfg(test)]
pub(super) mod tests;

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{NarBody, NarFormat, ObjectStream, PreparedNar, Target, TargetError};
use crate::format::cache_info::CacheInfo;
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
use dir_sync::{DirSync, sync_dir};

/// Name of the private directory for spooled NARs and temporary files.
/// Where earlier versions kept their temporaries; stale ones there are still removed.
const OLD_TMP_DIR: &str = ".narpost-tmp";

/// Names of this target's temporary files start so.
const TMP_PREFIX: &str = ".narpost-";

/// Temporary files older than this are leftovers of a crashed run; younger ones may belong
/// to a run still in progress.
const STALE_TMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// Files are readable by everyone, like the ones Nix writes, so a web server can serve them.
/// Set explicitly, not through a creation mode: the daemon's unit runs with UMask=0077.
const FILE_MODE: u32 = 0o644;
/// The same for the directories narpost creates (not the private temporary one).
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
    /// Makes temporary names unique within this process.
    tmp_counter: AtomicU64,
}

impl FileTarget {
    pub fn new(dir: PathBuf, compression_level: i32) -> FileTarget {
        let inner = Arc::new(Inner {
            nar_dir: DirSync::new(dir.join("nar")),
            root_dir: DirSync::new(dir.clone()),
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
        let size = spooled.file_size;
        let inner = self.inner.clone();
        blocking(move || inner.put_nar(&spool, &key, size).map(|()| key)).await
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, _nar: &PreparedNar) -> Result<(), TargetError> {
        let name = format!("{}.narinfo", narinfo.store_path.hash_part());
        let text = narinfo.to_string();
        let inner = self.inner.clone();
        blocking(move || inner.put_narinfo(&name, text.as_bytes())).await
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

    fn put_nar(&self, spool: &Path, key: &str, size: u64) -> Result<(), TargetError> {
        let dest = self.dir.join(key);
        if let Ok(meta) = fs::metadata(&dest)
            && meta.is_file()
            && meta.len() == size
        {
            File::open(&dest)
                .and_then(|f| f.sync_data())
                .map_err(|e| self.io_err(e, "cannot sync", &dest))?;
            self.nar_dir.note_rename();
            return Ok(());
        }

        let file =
            File::open(spool).map_err(|e| self.io_err(e, "cannot open spooled NAR", spool))?;
        let len = file
            .metadata()
            .map_err(|e| self.io_err(e, "cannot stat spooled NAR", spool))?
            .len();
        if len != size {
            return Err(TargetError::permanent(format!(
                "{}: spooled NAR is {len} bytes, but its FileSize is {size}",
                spool.display()
            )));
        }
        file.set_permissions(fs::Permissions::from_mode(FILE_MODE))
            .and_then(|()| file.sync_data())
            .map_err(|e| self.io_err(e, "cannot sync spooled NAR", spool))?;
        drop(file);

        match fs::rename(spool, &dest) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error()) => {
                // The spool lives on another filesystem (a caller-chosen spool directory):
                // copy it into ours first, so the final step is still an atomic rename.
                let mut src = File::open(spool)
                    .map_err(|e| self.io_err(e, "cannot open spooled NAR", spool))?;
                self.write_atomically_with(key, |out| io::copy(&mut src, out).map(|_| ()))?;
            }
            Err(e) => return Err(self.io_err(e, "cannot store", &dest)),
        }
        self.nar_dir.note_rename();
        Ok(())
    }

    fn put_narinfo(&self, name: &str, text: &[u8]) -> Result<(), TargetError> {
        // Everything renamed into nar/ so far, this narinfo's NAR included, becomes durable
        // before the narinfo can be seen.
        let ticket = self.nar_dir.current();
        self.nar_dir
            .sync_through(ticket)
            .map_err(|e| self.io_err(e, "cannot sync directory", &self.nar_dir.dir))?;
        self.write_atomically(name, text)?;
        let ticket = self.root_dir.note_rename();
        self.root_dir
            .sync_through(ticket)
            .map_err(|e| self.io_err(e, "cannot sync directory", &self.dir))
    }

    fn write_atomically(&self, key: &str, bytes: &[u8]) -> Result<(), TargetError> {
        self.write_atomically_with(key, |out| out.write_all(bytes))
    }

    /// Writes `key` (relative to the cache root) through a synced temporary file and a rename.
    /// Syncing the directory that holds `key` is the caller's business.
    fn write_atomically_with(
        &self,
        key: &str,
        fill: impl FnOnce(&mut File) -> io::Result<()>,
    ) -> Result<(), TargetError> {
        let dest = self.dir.join(key);
        let (parent, base) = match key.rsplit_once('/') {
            Some((sub, base)) => (self.dir.join(sub), base),
            None => (self.dir.clone(), key),
        };
        let tmp = parent.join(format!(
            "{TMP_PREFIX}{base}.{}-{}.tmp",
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&tmp)?;
            file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
            fill(&mut file)?;
            file.sync_data()?;
            drop(file);
            fs::rename(&tmp, &dest)
        })();
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(self.io_err(e, "cannot write", &dest));
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

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TargetError> + Send + 'static,
) -> Result<T, TargetError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| TargetError::transient(format!("file cache: internal error: {e}")))?
}
