//! Signing keys on disk: loading a Nix secret key file safely, writing new key pairs
//! (`narpost keygen`), and the embedded default key generated on first use.
//!
//! A secret key readable by group or others is refused rather than used: a leaked key lets
//! anyone publish paths every machine trusting the cache will install.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::format::signing::{PublicKey, SigningKey};
use crate::private_dir::PrivateDir;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "{path}: signing key file not found\nhint: create one with `narpost keygen NAME` or point --key / NARPOST_KEY_FILE at an existing Nix secret key"
    )]
    Missing { path: PathBuf },
    #[error("{path}: cannot read signing key: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: signing key is readable by group or others (mode {mode:o})\nhint: run `chmod 600 {path}`"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error(
        "{path}: not a Nix secret key ({reason})\nhint: expected one line `NAME:BASE64` as written by `nix-store --generate-binary-cache-key` or `narpost keygen`"
    )]
    Malformed { path: PathBuf, reason: String },
    #[error("{path}: cannot write key file: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: owned by uid {owner}, but narpost runs as uid {euid}; refusing a default key someone else could have planted (remove it to have a new one generated, or name a key with --key)"
    )]
    NotOwned {
        path: PathBuf,
        owner: u32,
        euid: u32,
    },
    #[error(transparent)]
    Dir(#[from] crate::private_dir::DirError),
    #[error("{path}: already exists; refusing to overwrite a key")]
    Exists { path: PathBuf },
    #[error(
        "invalid key name {name:?}: use letters, digits, '.', '-' and '_' (e.g. cache.example.org-1)"
    )]
    BadName { name: String },
}

/// Secret key files are one line of about a hundred bytes.
const MAX_KEY_FILE: u64 = 64 * 1024;

/// Loads a Nix secret key file, refusing one that others can read. The path may be a
/// symlink (secret managers install keys that way).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    // Non-blocking, so a FIFO at the path is refused below rather than waited on.
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path);
    match file {
        Ok(file) => load_open(path, file, false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(KeyError::Missing {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(KeyError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// The checks and the parse, on the open file (so what is checked is what is read). With
/// `must_own`, a file owned by anyone but this user is refused too.
fn load_open(path: &Path, file: fs::File, must_own: bool) -> Result<SigningKey, KeyError> {
    let read_err = |source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    };
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(KeyError::Malformed {
            path: path.to_path_buf(),
            reason: "not a regular file".to_owned(),
        });
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    let euid = rustix::process::geteuid().as_raw();
    if must_own && meta.uid() != euid {
        return Err(KeyError::NotOwned {
            path: path.to_path_buf(),
            owner: meta.uid(),
            euid,
        });
    }
    let bytes = crate::private_dir::read_capped(file, MAX_KEY_FILE).map_err(read_err)?;
    let text = String::from_utf8(bytes).map_err(|_| KeyError::Malformed {
        path: path.to_path_buf(),
        reason: "not UTF-8 text".to_owned(),
    })?;
    SigningKey::parse(text.trim()).map_err(|e| KeyError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

pub fn valid_key_name(name: &str) -> bool {
    !name.is_empty()
        && !name.contains(':')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
}

/// Writes `dir/NAME.sec` (0600) and `dir/NAME.pub` in Nix's format; never overwrites.
pub fn keygen(name: &str, dir: &Path) -> Result<(PathBuf, PathBuf, PublicKey), KeyError> {
    if !valid_key_name(name) {
        return Err(KeyError::BadName {
            name: name.to_string(),
        });
    }
    let sec = dir.join(format!("{name}.sec"));
    let public = dir.join(format!("{name}.pub"));
    let key = SigningKey::generate(name).map_err(|e| KeyError::BadName {
        name: format!("{name} ({e})"),
    })?;
    write_pair(&key, &sec, &public)?;
    Ok((sec, public, key.public()))
}

fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), KeyError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                KeyError::Exists {
                    path: path.to_path_buf(),
                }
            } else {
                KeyError::Write {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    f.write_all(contents.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|source| KeyError::Write {
            path: path.to_path_buf(),
            source,
        })
}

fn write_pair(key: &SigningKey, sec: &Path, public: &Path) -> Result<(), KeyError> {
    if let Some(dir) = sec.parent() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| KeyError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    // Nix writes key files without a trailing newline; so do we, so `$(cat pub)` is exact.
    write_new(sec, &key.to_nix_string(), 0o600)?;
    write_new(public, &key.public().to_nix_string(), 0o644)
}

/// The embedded default: `<state-dir>/signing.sec`, generated on first use with the name
/// `<hostname>-1`. Returns the key and, when it was just created, its public key so the caller
/// can tell the user what to put in `trusted-public-keys`.
pub fn default_key(state_dir: &Path) -> Result<(SigningKey, Option<PublicKey>), KeyError> {
    // The state directory is checked first (see `crate::private_dir`), and the key in it is
    // opened without following a link: someone who could plant or swap it would choose the
    // key every upload is signed with.
    let dir = PrivateDir::open(state_dir)?;
    let sec = dir.join("signing.sec");
    match dir.open_read("signing.sec") {
        Ok(file) => return Ok((load_open(&sec, file, true)?, None)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(KeyError::Read { path: sec, source }),
    }
    let name = format!("{}-1", hostname());
    let key = SigningKey::generate(&name).map_err(|e| KeyError::Write {
        path: sec.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    match write_pair(&key, &sec, &state_dir.join("signing.pub")) {
        Ok(()) => {
            let public = key.public();
            Ok((key, Some(public)))
        }
        // Another process created it first: use theirs.
        Err(KeyError::Exists { .. }) => {
            let file = dir
                .open_read("signing.sec")
                .map_err(|source| KeyError::Read {
                    path: sec.clone(),
                    source,
                })?;
            Ok((load_open(&sec, file, true)?, None))
        }
        Err(e) => Err(e),
    }
}

/// This machine's host name, as it goes into a key name (`<hostname>-1`).
pub fn hostname() -> String {
    let uname = rustix::system::uname();
    host_key_part(&uname.nodename().to_string_lossy())
}

/// A host name with what a key name cannot hold left out (`narpost` if nothing is left).
pub fn host_key_part(name: &str) -> String {
    let clean: String = name
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._".contains(*c))
        .collect();
    if clean.is_empty() {
        "narpost".to_string()
    } else {
        clean
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keygen_writes_private_key_0600_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, _pubf, public) = keygen("test-1", dir.path()).unwrap();
        let mode = fs::metadata(&sec).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let key = load_signing_key(&sec).unwrap();
        assert_eq!(key.public().to_nix_string(), public.to_nix_string());
        assert!(matches!(
            keygen("test-1", dir.path()),
            Err(KeyError::Exists { .. })
        ));
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (sec, _, _) = keygen("k", dir.path()).unwrap();
        fs::set_permissions(&sec, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_signing_key(&sec).unwrap_err();
        assert!(matches!(err, KeyError::TooOpen { .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"));
    }

    #[test]
    fn malformed_and_missing_keys_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.sec");
        write_new(&p, "not a key", 0o600).unwrap();
        assert!(matches!(
            load_signing_key(&p),
            Err(KeyError::Malformed { .. })
        ));
        let missing = dir.path().join("nope.sec");
        let err = load_signing_key(&missing).unwrap_err();
        assert!(err.to_string().contains("nope.sec"));
    }

    #[test]
    fn default_key_is_created_once() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, new1) = default_key(dir.path()).unwrap();
        assert!(new1.is_some());
        let (k2, new2) = default_key(dir.path()).unwrap();
        assert!(new2.is_none());
        assert_eq!(k1.to_nix_string(), k2.to_nix_string());
        assert!(dir.path().join("signing.pub").exists());
    }

    #[test]
    fn key_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            keygen("a:b", dir.path()),
            Err(KeyError::BadName { .. })
        ));
    }
}
