//! Where NARs and narinfos go: the cache URL ([`CacheUrl`], parsed once), and the
//! [`Target`] trait with its `file://`, HTTP, S3, Attic and ssh implementations.
//!
//! At its core a target answers three questions: which paths the cache is missing, how to
//! store a NAR, how to store a narinfo (`missing`, `put_nar`, `put_narinfo`, after `open`).
//! Everything else (closure, order, hashing, compression, signing, retries) is the
//! pipeline's, so every target gets it the same way. The rest of the trait are
//! declarations with defaults that most targets keep: what NAR form it wants
//! (`nar_format`, `spool_dir`), whether it signs itself, keeps commits in order
//! (`ordered_commits`, `hand_over_narinfo`) or leaves upstream paths out; its place for build
//! logs (`stores_logs`, `put_log`); and its read side (`read_small`, `object_size`,
//! `object_sha256`, `list_narinfos`, `remove`), which `narpost check` uses.
//!
//! What differs between caches is what a target *receives*, and each target declares it
//! through [`Target::nar_format`]: plain binary caches (`file://`, HTTP, S3) want a zstd
//! file that the pipeline spools to disk and hashes before anything leaves the machine;
//! Attic wants the raw NAR streamed, and compresses and signs on its side; so does a host's
//! store over ssh. The narinfo is always the commit point: [`Target::put_narinfo`] is called
//! only after the NAR is stored and after every reference's narinfo exists, except on a
//! target that declares [`Target::ordered_commits`], whose channel keeps a path behind
//! its references (the ssh target: a host's store refuses a path whose references are
//! not valid yet, and a connection applies requests in the order they were sent). For Attic and
//! ssh the commit is one request carrying the signed metadata and the NAR (`upload-path`,
//! AddToStoreNar), so their `put_nar` stores nothing and `put_narinfo` streams the NAR.
//!
//! A build log is one more artifact, stored after the narinfo of a path it built
//! ([`Target::put_log`]); caches with no place for logs keep the default, which says so.

pub mod attic;
pub mod dns;
pub mod file;
pub mod http;
pub mod s3;
pub mod ssh;
pub mod stall;
pub mod tls;
mod url;

pub use url::{CacheOptions, CacheUrl};

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::format::hash::Sha256;
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

/// What a target wants the pipeline to hand it for each path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NarFormat {
    /// A zstd-compressed NAR spooled to a file, hashed, named by its FileHash.
    Zstd { level: i32 },
    /// The uncompressed NAR, streamed from the store on demand.
    Raw,
}

/// One path, ready to be stored: its NAR hash was checked against the store's record.
pub struct PreparedNar {
    pub info: PathInfo,
    pub body: NarBody,
}

pub enum NarBody {
    /// A compressed NAR on disk. The pipeline deletes `file` after the upload if it still exists,
    /// so a target may rename it away instead of copying it.
    Spooled(SpooledNar),
    /// The raw NAR, serialized again from the store each time it is opened (so retries work).
    Raw(crate::dump::NarSource),
}

pub struct SpooledNar {
    pub file: PathBuf,
    /// `zstd`
    pub compression: &'static str,
    /// sha256 of the compressed bytes; the NAR's file name is its nixbase32 form.
    pub file_hash: Sha256,
    pub file_size: u64,
}

impl SpooledNar {
    /// `nar/<filehash>.nar.zst`, the name Nix itself gives a compressed NAR.
    pub fn cache_key(&self) -> String {
        let ext = match self.compression {
            "zstd" => "zst",
            "xz" => "xz",
            "bzip2" => "bz2",
            other => other,
        };
        format!(
            "nar/{}.nar.{ext}",
            crate::format::nixbase32::encode(self.file_hash.as_bytes())
        )
    }
}

/// Why a target operation failed, and whether trying again can help.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct TargetError {
    pub kind: ErrorKind,
    /// One line: what failed, naming the cache or object.
    pub message: String,
    /// What the user can do about it, if there is something.
    pub hint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Connection refused or reset, timeout, 5xx, throttling: retry with backoff.
    Transient,
    /// Bad credentials or permissions: retrying will not help until the user acts.
    Auth,
    /// Anything else the cache refused or answered wrongly (4xx, garbage): do not retry.
    Permanent,
}

impl TargetError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Transient,
            message: message.into(),
            hint: None,
        }
    }
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Permanent,
            message: message.into(),
            hint: None,
        }
    }
    pub fn auth(message: impl Into<String>) -> Self {
        Self {
            kind: ErrorKind::Auth,
            message: message.into(),
            hint: None,
        }
    }
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
    pub fn is_retryable(&self) -> bool {
        self.kind == ErrorKind::Transient
    }
}

#[async_trait]
pub trait Target: Send + Sync {
    /// The cache as the user named it, with any secret left out (for messages and status).
    fn url(&self) -> String;

    fn nar_format(&self) -> NarFormat;

    /// Whether the cache signs what it serves with a key of its own (Attic), so that a
    /// narpost key is optional: without one configured, no default key is made for it.
    /// Every other cache serves exactly the signatures narpost puts on a path.
    fn signs_itself(&self) -> bool {
        false
    }

    /// Where compressed NARs should be spooled so that storing one is a rename on the same
    /// filesystem. `None`: the pipeline's own spool directory.
    fn spool_dir(&self) -> Option<PathBuf> {
        None
    }

    /// Called once before anything else: check the cache is reachable and usable, and write
    /// `nix-cache-info` where the cache has none.
    async fn open(&self) -> Result<(), TargetError>;

    /// Which of `paths` the cache does not have (by narinfo). Targets batch or bound their
    /// requests themselves; the pipeline hands over the whole plan at once.
    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError>;

    /// Store the NAR; returns the narinfo `URL` it can be fetched from, relative to the cache.
    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError>;

    /// Store the narinfo: the commit point after which substituters see the path. A
    /// [`NarBody::Spooled`] body is gone by then (its spool file is removed once `put_nar`
    /// stored it); a target that sends the NAR with the narinfo takes it [`NarBody::Raw`].
    async fn put_narinfo(&self, narinfo: &NarInfo, nar: &PreparedNar) -> Result<(), TargetError>;

    /// Whether commits go out on ordered channels: a narinfo handed over with
    /// [`Target::hand_over_narinfo`] after each of its references' narinfos was handed over is
    /// applied after them, and fails (without being stored) if one of them fails. The
    /// pipeline then hands a path over as soon as its references are handed over, instead
    /// of after they are stored. The target must keep that order itself (one channel for a
    /// path and its references in flight, or waiting); false for every cache that stores
    /// what it is given whatever else is there.
    fn ordered_commits(&self) -> bool {
        false
    }

    /// Hands the narinfo over for storing, returning once it is on its way; what it returns
    /// finishes when the narinfo is stored, and the pipeline holds no upload slot while it
    /// waits for that. Targets with [`Target::ordered_commits`] return before the commit,
    /// and so does one whose commit ends in a wait that costs nothing (file://, whose
    /// commits wait for a shared sync); the default stores it first.
    async fn hand_over_narinfo(
        &self,
        narinfo: &NarInfo,
        nar: &PreparedNar,
    ) -> Result<Committing, TargetError> {
        self.put_narinfo(narinfo, nar).await?;
        Ok(Box::pin(async { Ok(()) }))
    }

    /// Whether a path this target lacks may be left to upstream (`upstream-keys`): true for
    /// binary caches, whose readers have upstream as a substituter too; false for a Nix
    /// store, which accepts a path only once every reference is valid in it.
    fn leaves_upstream_paths(&self) -> bool {
        true
    }

    /// Whether the cache has a place for build logs ([`Target::put_log`]).
    fn stores_logs(&self) -> bool {
        false
    }

    /// Store the build log of `drv`, plain text, at `log/<drv basename>`, where `nix log`
    /// looks for it. Called only when [`Target::stores_logs`] says so.
    async fn put_log(&self, drv: &StorePath, _log: Bytes) -> Result<(), TargetError> {
        Err(TargetError::permanent(format!(
            "{}: this cache has no place for build logs (log of {drv})",
            self.url()
        )))
    }

    // Reading the cache back, as a substituting Nix would (`narpost check`). `key` is
    // relative to the cache root, as a narinfo's `URL` is, and has passed [`object_key`];
    // `Ok(None)` means there is no such object. A cache that cannot be read back (a host's
    // store over ssh) keeps the defaults, which say so.

    /// The whole of a small object (a narinfo), refused past `limit` bytes.
    async fn read_small(&self, key: &str, _limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        Err(cannot_read(&self.url(), key))
    }

    /// The size of an object, without reading it.
    async fn object_size(&self, key: &str) -> Result<Option<u64>, TargetError> {
        Err(cannot_read(&self.url(), key))
    }

    /// An object's bytes as they arrive, in constant memory (a NAR for `check --deep`, or
    /// for a Nix substituting through the daemon), with its size when the cache says it.
    async fn read_stream(&self, key: &str) -> Result<Option<ObjectStream>, TargetError> {
        Err(cannot_read(&self.url(), key))
    }

    /// The SHA-256 and size of an object's bytes, read through in constant memory.
    async fn object_sha256(&self, key: &str) -> Result<Option<(Sha256, u64)>, TargetError> {
        let Some(mut object) = self.read_stream(key).await? else {
            return Ok(None);
        };
        let mut hasher = crate::format::hash::Sha256Hasher::new();
        let mut size = 0u64;
        while let Some(chunk) = futures::StreamExt::next(&mut object.body).await {
            let chunk = chunk?;
            hasher.update(&chunk);
            size += chunk.len() as u64;
        }
        Ok(Some((hasher.finalize(), size)))
    }

    /// The hash parts of every narinfo in the cache, or `None` when the cache cannot be
    /// listed (a plain HTTP server without WebDAV listing, Attic).
    async fn list_narinfos(&self) -> Result<Option<Vec<String>>, TargetError> {
        Ok(None)
    }

    /// Writes a small object that no narinfo promises (a build claim): whole or not at
    /// all, with no durability beyond what the cache gives a plain write. A cache that
    /// cannot hold one keeps the default, which says so.
    async fn write_small(&self, key: &str, _bytes: Vec<u8>) -> Result<(), TargetError> {
        Err(TargetError::permanent(format!(
            "{}: this cache cannot hold {key}",
            self.url()
        )))
    }

    /// The names of the objects directly below `prefix` (a key ending in `/`), or `None`
    /// when the cache cannot be listed. A prefix with nothing below it lists as empty.
    async fn list(&self, _prefix: &str) -> Result<Option<Vec<String>>, TargetError> {
        Ok(None)
    }

    /// Removes an object found corrupt (`check --deep --repair`), so that storing the NAR
    /// again writes it instead of taking the same-named object as already there.
    async fn remove(&self, key: &str) -> Result<(), TargetError> {
        Err(cannot_read(&self.url(), key))
    }
}

/// Largest narinfo read back: real ones are a few hundred bytes to a few kilobytes.
pub const MAX_NARINFO: usize = 1 << 20;

fn cannot_read(url: &str, key: &str) -> TargetError {
    TargetError::permanent(format!("{url}: this cache cannot be read back ({key})"))
        .with_hint("check binary caches (file://, http(s)://, s3://, attic+); an ssh host's store checks itself with `nix store verify`")
}

/// `key` if it may name an object below the cache root: relative, without `.` or `..`
/// segments and without control characters. Keys come from narinfos, which are whatever the
/// cache holds; none may lead a read outside it.
pub fn object_key(key: &str) -> Result<&str, TargetError> {
    let fine = !key.is_empty()
        && !key.starts_with('/')
        && key.len() <= 1024
        && key
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
        && !key
            .chars()
            .any(|c| c.is_control() || matches!(c, '\\' | '?' | '#' | '%'));
    if fine {
        Ok(key)
    } else {
        Err(TargetError::permanent(format!(
            "{}: not a key inside the cache",
            crate::text::printable(key)
        )))
    }
}

/// Where a build log goes, relative to the cache root.
pub fn log_key(drv: &StorePath) -> String {
    format!("log/{}", drv.base())
}

/// What Nix itself sends a build log as.
pub const LOG_TYPE: &str = "text/plain; charset=utf-8";

pub type DynTarget = Arc<dyn Target>;

/// An object read from a cache as a stream (see [`Target::read_stream`]). Each chunk has
/// the target's read deadline: a cache that stops sending ends the stream in an error.
pub struct ObjectStream {
    /// The object's size, when the cache said it before the body.
    pub size: Option<u64>,
    pub body: futures::stream::BoxStream<'static, Result<Bytes, TargetError>>,
}

/// A narinfo handed over and not yet stored ([`Target::hand_over_narinfo`]).
pub type Committing =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), TargetError>> + Send>>;
