//! Preparing a path for its target: the raw NAR streamed from the store, or for plain
//! caches a zstd file spooled to disk and checked against the store's NarHash before
//! anything leaves the machine.

use std::io::{BufWriter, Write};
use std::path::Path;

use super::{FailureKind, PathFailure, Pipeline};
use crate::cache::{NarBody, NarFormat, PreparedNar, SpooledNar};
use crate::compress::FramedZstd;
use crate::dump::{self, DumpError, NarSource};
use crate::format::hash::HashingWriter;
use crate::format::nar::NarError;
use crate::format::narinfo::NarInfo;
use crate::format::signing::SigningKey;
use crate::store::PathInfo;

impl Pipeline {
    /// The path as its target wants it, and its narinfo, signed, without its `URL`. Signing
    /// is CPU work: for plain caches it is done on the blocking thread that prepares the
    /// NAR, not on the thread that drives every path's upload.
    pub(super) async fn prepare(
        &self,
        info: &PathInfo,
    ) -> Result<(PreparedNar, NarInfo), PathFailure> {
        let key = self.key.clone();
        match self.target.nar_format() {
            NarFormat::Raw => {
                let prepared = PreparedNar {
                    info: info.clone(),
                    body: NarBody::Raw(NarSource {
                        path: info.path.clone(),
                        nar_hash: info.nar_hash,
                        nar_size: info.nar_size,
                    }),
                };
                let narinfo = signed_narinfo(key.as_deref(), &prepared);
                Ok((prepared, narinfo))
            }
            NarFormat::Zstd { level } => {
                let dir = self
                    .target
                    .spool_dir()
                    .unwrap_or_else(|| self.opts.spool_dir.clone());
                let info2 = info.clone();
                // A large NAR compresses behind newer, smaller work (a build that just ended
                // goes ahead of a backlog's compression, whatever runs on the cores).
                let large = !crate::compress::is_small(info.nar_size);
                tokio::task::spawn_blocking(move || {
                    let spooled = if large {
                        crate::priority::behind_newer_work(|| spool_zstd(&info2, &dir, level))
                    } else {
                        spool_zstd(&info2, &dir, level)
                    }?;
                    let prepared = PreparedNar {
                        info: info2,
                        body: NarBody::Spooled(spooled),
                    };
                    let narinfo = signed_narinfo(key.as_deref(), &prepared);
                    Ok((prepared, narinfo))
                })
                .await
                .map_err(|e| PathFailure {
                    path: info.path.clone(),
                    kind: FailureKind::Unreadable,
                    message: format!("{}: internal error: {e}", info.path.to_absolute()),
                    hint: None,
                })?
            }
        }
    }
}

/// The narinfo of a prepared path, signed with `key`; its `URL` is the caller's to fill in
/// once the NAR is stored (the signature does not cover it).
fn signed_narinfo(key: Option<&SigningKey>, nar: &PreparedNar) -> NarInfo {
    let info = &nar.info;
    let (compression, file_hash, file_size) = match &nar.body {
        NarBody::Spooled(s) => (s.compression, Some(s.file_hash), Some(s.file_size)),
        NarBody::Raw(_) => ("none", None, None),
    };
    let mut narinfo = NarInfo {
        store_path: info.path.clone(),
        url: String::new(),
        compression: Some(compression.to_string()),
        file_hash,
        file_size,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references: info.references.iter().cloned().collect(),
        deriver: info.deriver.clone(),
        system: None,
        sigs: Vec::new(),
        ca: info.ca.clone(),
    };
    // Signatures the store already holds (e.g. from the upstream cache) stay valid:
    // they sign the same fingerprint.
    let own = key.map(|k| format!("{}:", k.name()));
    narinfo.sigs = info
        .sigs
        .iter()
        .filter(|s| own.as_deref().is_none_or(|o| !s.starts_with(o)))
        .cloned()
        .collect();
    if let Some(key) = key {
        narinfo.sign(key);
    }
    narinfo
}

/// Serializes, hashes and compresses one path into a spool file, checking the result
/// against the store's record. Blocking.
pub fn spool_zstd(info: &PathInfo, dir: &Path, level: i32) -> Result<SpooledNar, PathFailure> {
    let abs = info.path.to_absolute();
    let fail = |kind, message: String, hint: Option<String>| PathFailure {
        path: info.path.clone(),
        kind,
        message,
        hint,
    };
    let spool_err = |e: std::io::Error| {
        fail(
            FailureKind::Transient,
            format!("{}: cannot write spool file: {e}", dir.display()),
            Some("check free space and permissions of the state directory".into()),
        )
    };
    // What waits here names what the machine built: private, like the rest of the state.
    // Only when missing: creating a directory takes its parent's lock even when it exists,
    // which every path of a thousand-path push would contend for.
    if !dir.is_dir() {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(spool_err)?;
    }
    let tmp = tempfile::Builder::new()
        .prefix(".narpost-")
        .suffix(".nar.zst")
        .tempfile_in(dir)
        .map_err(spool_err)?;
    // A second handle on the same open file, not a second open by name.
    let file = tmp.as_file().try_clone().map_err(spool_err)?;

    let compressed = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    let encoder = FramedZstd::new(compressed, level, info.nar_size).map_err(spool_err)?;
    let nar = HashingWriter::new(encoder);
    let nar = dump::dump_path(Path::new(&abs), nar).map_err(|e| match e {
        // Writing is the spool's side (a full disk, a quota, a failing disk), never the
        // path's: the same path goes through once there is room.
        DumpError::Nar {
            source: NarError::Io(e),
            ..
        }
        | DumpError::Io {
            action: dump::WRITE_NAR,
            source: e,
            ..
        } => spool_err(e),
        e => fail(
            FailureKind::Unreadable,
            format!("{abs}: cannot serialize: {e}"),
            Some(format!(
                "check the path with `nix-store --verify-path {abs}`"
            )),
        ),
    })?;
    let (encoder, nar_hash, nar_size) = nar.finish();
    if nar_hash != info.nar_hash || nar_size != info.nar_size {
        return Err(fail(
            FailureKind::Corrupt,
            format!(
                "{abs}: contents do not match the store's NarHash (recorded {} / {} bytes, found {} / {} bytes); not uploading it or anything that refers to it",
                info.nar_hash, info.nar_size, nar_hash, nar_size
            ),
            Some(format!(
                "run `nix-store --verify-path {abs}` and repair it with `nix-store --repair-path {abs}`"
            )),
        ));
    }
    let compressed = encoder.finish().map_err(spool_err)?;
    let (buf, file_hash, file_size) = compressed.finish();
    let mut file = buf.into_inner().map_err(|e| spool_err(e.into_error()))?;
    file.flush().map_err(spool_err)?;
    let (_, path) = tmp.keep().map_err(|e| spool_err(e.error))?;
    Ok(SpooledNar {
        file: path,
        compression: "zstd",
        file_hash,
        file_size,
    })
}
