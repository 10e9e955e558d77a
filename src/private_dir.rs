//! Directories only narpost's own user can change, and the files in them.
//!
//! The daemon usually runs as root, and a state directory is a path anyone can name
//! (`NARPOST_STATE_DIR=/tmp/ci-cache` in a CI job). If someone else owns that directory, or
//! may write to it, they can plant a symlink where narpost is about to write its status
//! file, its lock or a key, and root then writes through it wherever they like. So before
//! narpost uses a directory it checks, on the open descriptor (no window between the check
//! and the use of the directory itself), that the directory is owned by the effective user
//! and not writable by group or others, and refuses it with one line otherwise. Below the
//! top directory nothing is followed: subdirectories are opened with `O_NOFOLLOW`, and files
//! are created with `O_EXCL | O_NOFOLLOW` (temporaries) or opened with `O_NOFOLLOW`.
//!
//! The top directory itself may be a symlink (`/var/lib/narpost` pointing at a data disk is
//! a configuration, not an attack); what it points at is what is checked.
//!
//! Directories narpost creates get mode 0700: what they hold names what the machine built.
//! An existing directory is accepted with any mode that keeps group and others from
//! writing (a 0755 one made by hand or by an older version is fine).
//!
//! The checks are two system calls per directory (an open and an `fstat`), cheap enough for
//! the post-build hook, which makes them on every build.

use std::fs::{DirBuilder, File};
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

#[derive(Debug, thiserror::Error)]
pub enum DirError {
    #[error("{path}: cannot create directory: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("{path}: cannot open directory: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error(
        "{path}: is a symbolic link inside a state directory; refusing to follow it (remove it, and narpost makes the directory itself)"
    )]
    Symlink { path: PathBuf },
    #[error(
        "{path}: owned by uid {owner}, but narpost runs as uid {euid}; refusing to use a directory someone else controls (use one of your own, e.g. with --state-dir or NARPOST_STATE_DIR, or `chown {euid} {path}` if it is meant for this user)"
    )]
    Owner {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(
        "{path}: writable by group or others (mode {mode:04o}); refusing to use it, since they could plant files or symlinks in it (run `chmod go-w {path}`, or use a directory of your own)"
    )]
    Writable { path: PathBuf, mode: u32 },
}

impl DirError {
    /// Whether the directory exists and was refused as someone else's (rather than being
    /// missing or unreadable).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DirError::Symlink { .. } | DirError::Owner { .. } | DirError::Writable { .. }
        )
    }
}

/// An open directory that passed the checks, with the path it was opened by (for messages
/// and for callers that work by path).
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
    fd: OwnedFd,
}

const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

impl PrivateDir {
    /// Opens the directory at `path`, creating it (and missing parents) with mode 0700, and
    /// checks it. A symlink at `path` itself is followed; see the module doc.
    pub fn open(path: &Path) -> Result<PrivateDir, DirError> {
        let open = || rustix::fs::open(path, DIR_FLAGS, Mode::empty());
        let fd = match open() {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(path)
                    .map_err(|source| DirError::Create {
                        path: path.to_path_buf(),
                        source,
                    })?;
                open().map_err(|e| open_err(path, e))?
            }
            Err(e) => return Err(open_err(path, e)),
        };
        check(&fd, path)?;
        Ok(PrivateDir {
            path: path.to_path_buf(),
            fd,
        })
    }

    /// Opens (creating it with mode 0700 if missing) the subdirectory `name`, refusing a
    /// symlink, and checks it like [`PrivateDir::open`].
    pub fn subdir(&self, name: &str) -> Result<PrivateDir, DirError> {
        let path = self.path.join(name);
        let flags = DIR_FLAGS | OFlags::NOFOLLOW;
        let open = || rustix::fs::openat(&self.fd, name, flags, Mode::empty());
        let fd = match open() {
            Ok(fd) => fd,
            Err(Errno::NOENT) => {
                match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => {
                        return Err(DirError::Create {
                            path,
                            source: e.into(),
                        });
                    }
                }
                open().map_err(|e| sub_open_err(&self.fd, name, &path, e))?
            }
            Err(e) => return Err(sub_open_err(&self.fd, name, &path, e)),
        };
        check(&fd, &path)?;
        Ok(PrivateDir { path, fd })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The path of `name` in this directory.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Creates the file `name`, which must not exist (not even as a dangling symlink), for
    /// writing with mode 0600.
    pub fn create_new(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW;
        self.open_file(name, flags)
    }

    /// Opens `name` for writing, creating it (mode 0600) if missing; a symlink is refused.
    pub fn open_or_create(&self, name: &str) -> io::Result<File> {
        self.open_file(name, OFlags::WRONLY | OFlags::CREATE | OFlags::NOFOLLOW)
    }

    /// Opens an existing `name` for writing; a symlink is refused.
    pub fn open_write(&self, name: &str) -> io::Result<File> {
        self.open_file(name, OFlags::WRONLY | OFlags::NOFOLLOW)
    }

    /// Reads `name` whole, refusing a symlink and anything longer than `limit` bytes (an
    /// `InvalidData` error), so a planted `/dev/zero` or huge file costs nothing.
    pub fn read(&self, name: &str, limit: u64) -> io::Result<Vec<u8>> {
        read_capped(self.open_read(name)?, limit)
    }

    /// Opens `name` for reading; a symlink is refused, and a FIFO does not block the open.
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        self.open_file(name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK)
    }

    /// Makes the directory's entries durable (fsync).
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(Into::into)
    }

    /// Renames `from` to `to`, both in this directory (replacing `to`).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to).map_err(Into::into)
    }

    /// Removes the file `name`; one that is already gone is not an error.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, rustix::fs::AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn open_file(&self, name: &str, flags: OFlags) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.fd,
            name,
            flags | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| nofollow_err(e, name))?;
        Ok(File::from(fd))
    }
}

/// Checks the directory at `path` if it exists, following a symlink at `path` itself (for
/// directories narpost does not keep open, such as the GC roots directory). A missing
/// directory passes: whoever creates it makes it 0700.
pub fn check_existing(path: &Path) -> Result<(), DirError> {
    match rustix::fs::open(path, DIR_FLAGS, Mode::empty()) {
        Ok(fd) => check(&fd, path),
        Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(open_err(path, e)),
    }
}

/// Reads `file` whole, failing with `InvalidData` past `limit` bytes.
pub fn read_capped(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("longer than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

/// The owner and mode checks of the module doc, on an open descriptor.
fn check(fd: &impl AsFd, path: &Path) -> Result<(), DirError> {
    let stat = rustix::fs::fstat(fd).map_err(|e| open_err(path, e))?;
    let euid = rustix::process::geteuid().as_raw();
    if stat.st_uid != euid {
        return Err(DirError::Owner {
            path: path.to_path_buf(),
            owner: stat.st_uid,
            euid,
        });
    }
    let mode = stat.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(DirError::Writable {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

fn open_err(path: &Path, e: Errno) -> DirError {
    DirError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

/// `O_NOFOLLOW | O_DIRECTORY` on a symlink fails with `ELOOP` (or `ENOTDIR`, depending on
/// the target); a look at the name tells which problem it really is.
fn sub_open_err(parent: &OwnedFd, name: &str, path: &Path, e: Errno) -> DirError {
    let is_link = rustix::fs::statat(parent, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_symlink());
    if is_link {
        DirError::Symlink {
            path: path.to_path_buf(),
        }
    } else {
        open_err(path, e)
    }
}

/// `ELOOP` from `O_NOFOLLOW` means a symlink sits where a file was expected: say so.
fn nofollow_err(e: Errno, name: &str) -> io::Error {
    if e == Errno::LOOP {
        io::Error::other(format!(
            "{name} is a symbolic link; refusing to follow it (remove it)"
        ))
    } else {
        e.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn creates_0700_and_refuses_writable_and_symlinked_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("a/b");
        let dir = PrivateDir::open(&top).unwrap();
        assert_eq!(mode(&top), 0o700);
        assert_eq!(mode(&tmp.path().join("a")), 0o700);
        dir.subdir("queue").unwrap();
        assert_eq!(mode(&top.join("queue")), 0o700);

        std::fs::set_permissions(top.join("queue"), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        let err = dir.subdir("queue").unwrap_err();
        assert!(
            matches!(err, DirError::Writable { mode: 0o777, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("chmod go-w"), "{err}");

        std::os::unix::fs::symlink(tmp.path(), top.join("tmp")).unwrap();
        let err = dir.subdir("tmp").unwrap_err();
        assert!(matches!(err, DirError::Symlink { .. }), "{err}");

        // A 0755 directory made by hand is fine.
        std::fs::set_permissions(&top, std::fs::Permissions::from_mode(0o755)).unwrap();
        PrivateDir::open(&top).unwrap();
    }

    #[test]
    fn files_are_never_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = PrivateDir::open(&tmp.path().join("s")).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.join("link")).unwrap();
        assert!(dir.create_new("link").is_err());
        assert!(dir.open_or_create("link").is_err());
        assert!(dir.open_write("link").is_err());
        assert!(dir.read("link", 100).is_err());
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");

        std::fs::write(dir.join("big"), vec![b'x'; 101]).unwrap();
        let err = dir.read("big", 100).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(dir.read("big", 101).unwrap().len(), 101);
    }
}
