//! Build logs on this machine: where Nix keeps them, and reading one for a binary cache.
//!
//! Nix writes the log of `/nix/store/<drv>` to `<log dir>/drvs/<first 2 chars>/<rest>`,
//! bzip2-compressed with a `.bz2` suffix by default (`compress-build-log = true`), plain
//! otherwise. The log directory is `$NIX_LOG_DIR`, by default `/nix/var/log/nix`.
//!
//! A binary cache keeps a log at `log/<drv basename>` as plain text: that is what
//! `nix store copy-log` writes, and `nix log` prints what it fetches as it is. A compressed
//! log would come out compressed (Nix 2.8 decompresses only what an HTTP server marks with
//! `Content-Encoding`, and a `file://` cache has no such mark), so the log is decompressed
//! here, never past the configured size.
//!
//! A log still being written is an unfinished bzip2 stream: reading it ends early, which
//! [`LogError::Incomplete`] reports, so the watchers can tell a build still running from one
//! that ended.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// `max-log-size`'s default: larger logs are skipped (and reported), since each is held in
/// memory while it goes up.
pub const DEFAULT_MAX_LOG_SIZE: u64 = 16 << 20;

use crate::format::store_path::{STORE_DIR, StorePath};

/// `$NIX_LOG_DIR`, or Nix's default.
pub fn log_dir() -> PathBuf {
    std::env::var_os("NIX_LOG_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/nix/var/log/nix"))
}

/// Where Nix keeps build logs, one subdirectory per first two characters.
pub fn drvs_dir(log_dir: &Path) -> PathBuf {
    log_dir.join("drvs")
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{file}: cannot read build log: {source}")]
    Unreadable { file: PathBuf, source: io::Error },
    #[error("{file}: build log is larger than max-log-size ({limit} bytes); not uploaded")]
    TooLarge { file: PathBuf, limit: u64 },
    #[error("{file}: build log is still being written")]
    Incomplete { file: PathBuf },
}

/// The log file of `drv` if this machine has one: the compressed form first, since that is
/// what Nix writes by default.
pub fn find(log_dir: &Path, drv: &StorePath) -> Option<(PathBuf, bool)> {
    let base = drv.base();
    if base.len() < 3 {
        return None;
    }
    let dir = drvs_dir(log_dir).join(&base[..2]);
    let bz2 = dir.join(format!("{}.bz2", &base[2..]));
    if bz2.is_file() {
        return Some((bz2, true));
    }
    let plain = dir.join(&base[2..]);
    plain.is_file().then_some((plain, false))
}

/// The derivation a file under [`drvs_dir`] is the log of.
pub fn drv_of(file: &Path) -> Option<StorePath> {
    let name = file.file_name()?.to_str()?;
    let prefix = file.parent()?.file_name()?.to_str()?;
    let rest = name.strip_suffix(".bz2").unwrap_or(name);
    let drv = StorePath::from_base(&format!("{prefix}{rest}")).ok()?;
    drv.is_derivation().then_some(drv)
}

/// The log of `drv` as plain text, at most `limit` bytes; `Ok(None)` when this machine has
/// no log for it. Blocking.
pub fn read(log_dir: &Path, drv: &StorePath, limit: u64) -> Result<Option<Vec<u8>>, LogError> {
    match find(log_dir, drv) {
        Some((file, compressed)) => read_file(&file, compressed, limit).map(Some),
        None => Ok(None),
    }
}

/// Reads one log file, decompressing a `.bz2` one. Blocking.
pub fn read_file(file: &Path, compressed: bool, limit: u64) -> Result<Vec<u8>, LogError> {
    let unreadable = |source| LogError::Unreadable {
        file: file.to_path_buf(),
        source,
    };
    let f = File::open(file).map_err(unreadable)?;
    let reader: Box<dyn Read> = if compressed {
        Box::new(bzip2::read::BzDecoder::new(io::BufReader::new(f)))
    } else {
        Box::new(f)
    };
    let mut out = Vec::new();
    match reader.take(limit.saturating_add(1)).read_to_end(&mut out) {
        Ok(_) => {}
        Err(e) if compressed && e.kind() == io::ErrorKind::UnexpectedEof => {
            return Err(LogError::Incomplete {
                file: file.to_path_buf(),
            });
        }
        Err(e) => return Err(unreadable(e)),
    }
    if out.len() as u64 > limit {
        return Err(LogError::TooLarge {
            file: file.to_path_buf(),
            limit,
        });
    }
    Ok(out)
}

/// The `/nix/store/<drv>` file a log belongs to, for reading its outputs.
pub fn drv_file(drv: &StorePath) -> PathBuf {
    Path::new(STORE_DIR).join(drv.base())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn drv() -> StorePath {
        StorePath::from_base("ma7ldvkv6zb5m8b347a4jzr4v6mk5blm-logexp.drv").expect("valid")
    }

    fn bz2(data: &[u8]) -> Vec<u8> {
        let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::default());
        e.write_all(data).expect("compress");
        e.finish().expect("finish")
    }

    #[test]
    fn finds_and_decompresses_where_nix_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("drvs/ma");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let file = sub.join("7ldvkv6zb5m8b347a4jzr4v6mk5blm-logexp.drv.bz2");
        std::fs::write(&file, bz2(b"hello-from-build\n")).expect("write");
        let log = read(dir.path(), &drv(), 1024)
            .expect("read")
            .expect("found");
        assert_eq!(log, b"hello-from-build\n");
        assert_eq!(drv_of(&file), Some(drv()));
    }

    #[test]
    fn a_plain_log_is_read_as_it_is_and_none_is_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(read(dir.path(), &drv(), 1024).expect("no log").is_none());
        let sub = dir.path().join("drvs/ma");
        std::fs::create_dir_all(&sub).expect("mkdir");
        std::fs::write(
            sub.join("7ldvkv6zb5m8b347a4jzr4v6mk5blm-logexp.drv"),
            b"plain\n",
        )
        .expect("write");
        let log = read(dir.path(), &drv(), 1024)
            .expect("read")
            .expect("found");
        assert_eq!(log, b"plain\n");
    }

    #[test]
    fn a_log_past_the_limit_is_refused_and_a_cut_stream_is_incomplete() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("x.bz2");
        let data = vec![b'a'; 10_000];
        std::fs::write(&file, bz2(&data)).expect("write");
        assert!(matches!(
            read_file(&file, true, 9_999),
            Err(LogError::TooLarge { .. })
        ));
        assert_eq!(read_file(&file, true, 10_000).expect("fits").len(), 10_000);
        let whole = bz2(&data);
        std::fs::write(&file, &whole[..whole.len() - 4]).expect("write");
        assert!(
            matches!(
                read_file(&file, true, 100_000),
                Err(LogError::Incomplete { .. })
            ),
            "{:?}",
            read_file(&file, true, 100_000)
        );
    }
}
