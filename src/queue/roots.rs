//! GC roots for queued paths (see [GC roots](super#gc-roots)).

use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::new_entry_name;
use crate::format::store_path::StorePath;
use crate::private_dir::DirError;

#[derive(Debug, thiserror::Error)]
pub enum GcRootError {
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("{path}: cannot create GC root directory: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path}: cannot create GC root: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path}: cannot make GC roots durable (fsync failed): {source}")]
    Sync { path: PathBuf, source: io::Error },
    #[error("{path}: cannot remove GC root: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("{path}: cannot read GC root directory: {source}")]
    List { path: PathBuf, source: io::Error },
}

/// One symlink per protected store path in a directory below Nix's `gcroots`.
#[derive(Debug, Clone)]
pub struct GcRoots {
    dir: PathBuf,
}

impl GcRoots {
    pub fn new(dir: impl Into<PathBuf>) -> GcRoots {
        GcRoots { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Refuses a roots directory that someone else owns or may write to: they could plant
    /// roots, which the drainer would adopt and upload, or remove them (see
    /// [`crate::private_dir`]). A missing directory is fine; it is created 0700.
    pub fn check(&self) -> Result<(), GcRootError> {
        Ok(crate::private_dir::check_existing(&self.dir)?)
    }

    /// Protects one path; see [`GcRoots::protect_all`].
    pub fn protect(&self, path: &StorePath) -> Result<(), GcRootError> {
        self.protect_all(std::slice::from_ref(path))
    }

    /// Creates a root for each path. The garbage collector sees a root the moment it exists,
    /// and it outlives any process; it is on disk only after [`GcRoots::sync`] or the
    /// kernel's writeback (see [GC roots](super#gc-roots) for why the hook does not wait).
    pub fn protect_all(&self, paths: &[StorePath]) -> Result<(), GcRootError> {
        for path in paths {
            self.link(path)?;
        }
        Ok(())
    }

    /// Makes the roots created so far survive a power loss (fsync of the directory).
    pub fn sync(&self) -> Result<(), GcRootError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| GcRootError::Sync {
                path: self.dir.clone(),
                source,
            })
    }

    fn link(&self, path: &StorePath) -> Result<(), GcRootError> {
        let link = self.dir.join(path.base());
        let target = path.to_absolute();
        let create_err = |source| GcRootError::Create {
            path: link.clone(),
            source,
        };
        match std::os::unix::fs::symlink(&target, &link) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(&self.dir)
                    .map_err(|source| GcRootError::CreateDir {
                        path: self.dir.clone(),
                        source,
                    })?;
                match std::os::unix::fs::symlink(&target, &link) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(create_err(e)),
                }
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(create_err(e)),
        }
        if fs::read_link(&link).is_ok_and(|t| t.as_os_str() == OsStr::new(&target)) {
            return Ok(());
        }
        // Something else has the name (a stale file, a link elsewhere): replace it
        // atomically, so there is no moment without a root.
        let tmp = self
            .dir
            .join(format!(".tmp-{}-{}", std::process::id(), new_entry_name(0)));
        std::os::unix::fs::symlink(&target, &tmp).map_err(create_err)?;
        fs::rename(&tmp, &link).map_err(|e| {
            let _ = fs::remove_file(&tmp);
            create_err(e)
        })
    }

    /// Removes a path's root. Call only once the path is in the cache (see the module doc).
    /// A root that cannot be removed only delays garbage collection, so the failure is logged
    /// as a warning rather than returned; [`GcRoots::try_release`] returns it.
    pub fn release(&self, path: &StorePath) {
        if let Err(e) = self.try_release(path) {
            tracing::warn!("{e}");
        }
    }

    /// [`GcRoots::release`], returning the failure. A root that is already gone is not one.
    pub fn try_release(&self, path: &StorePath) -> Result<(), GcRootError> {
        let link = self.dir.join(path.base());
        match fs::remove_file(&link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(GcRootError::Remove { path: link, source }),
        }
    }

    /// Paths that have a root here, sorted; other files in the directory are ignored. An
    /// absent directory has no roots.
    pub fn list(&self) -> Result<Vec<StorePath>, GcRootError> {
        self.list_created_before(None)
    }

    /// [`GcRoots::list`], keeping only roots created before `cutoff` (all when `None`): a
    /// younger root may belong to a hook that has not written its queue entry yet.
    pub fn list_created_before(
        &self,
        cutoff: Option<SystemTime>,
    ) -> Result<Vec<StorePath>, GcRootError> {
        let list_err = |source| GcRootError::List {
            path: self.dir.clone(),
            source,
        };
        let dir = match fs::read_dir(&self.dir) {
            Ok(dir) => dir,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(list_err(e)),
        };
        let mut out = Vec::new();
        for item in dir {
            let item = item.map_err(list_err)?;
            let Some(path) = item
                .file_name()
                .to_str()
                .and_then(|n| StorePath::from_base(n).ok())
            else {
                continue;
            };
            if let Some(cutoff) = cutoff {
                let created = fs::symlink_metadata(item.path()).and_then(|m| m.modified());
                if !created.is_ok_and(|t| t < cutoff) {
                    continue;
                }
            }
            if fs::read_link(item.path())
                .is_ok_and(|t| t.as_os_str() == OsStr::new(&path.to_absolute()))
            {
                out.push(path);
            }
        }
        out.sort();
        Ok(out)
    }
}
