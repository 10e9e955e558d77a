//! Carrying out a plan's steps, and the file checks that come before it.
//!
//! Every file is replaced whole: written under a temporary name in its own directory,
//! fsynced, renamed over the old one, and the directory fsynced, so a crash or a full disk
//! leaves the old file or the new one, never half of nix.conf. A replaced file keeps its
//! mode and owner.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use super::plan::Step;

/// Refuses a target that is a symlink, or (below a root other than `/`) that lies behind
/// one: a link can point out of the root, and replacing a link with a file silently stops
/// whatever kept it in sync (a NixOS or home-manager generation, a config repository).
pub fn check_target(root: &Path, path: &Path) -> anyhow::Result<()> {
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.file_type().is_symlink()
    {
        let to = fs::read_link(path)
            .map(|t| t.display().to_string())
            .unwrap_or_else(|_| "?".into());
        bail!(
            "{}: is a symlink (to {to}); setup replaces only regular files: edit the file it points to by hand, or replace the link with a copy",
            path.display()
        );
    }
    check_ancestors(root, path)
}

/// Below a root other than `/`, refuses a path behind a linked directory, which could lead
/// out of the root.
pub fn check_ancestors(root: &Path, path: &Path) -> anyhow::Result<()> {
    if root != Path::new("/") {
        let mut dir = path.parent();
        while let Some(d) = dir {
            if d == root || !d.starts_with(root) {
                break;
            }
            if fs::symlink_metadata(d).is_ok_and(|m| m.file_type().is_symlink()) {
                bail!(
                    "{}: is a symlink; with --root, setup writes only below real directories so that nothing lands outside {}",
                    d.display(),
                    root.display()
                );
            }
            dir = d.parent();
        }
    }
    Ok(())
}

/// Reads a file that may not exist yet.
pub fn read_optional(path: &Path) -> anyhow::Result<Option<String>> {
    match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes)
            .map(Some)
            .map_err(|_| anyhow::anyhow!("{}: is not UTF-8 text; fix it by hand", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
    }
}

/// Whether two files hold the same bytes.
pub fn same_contents(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let open =
        |p: &Path| fs::File::open(p).with_context(|| format!("{}: cannot read", p.display()));
    let (mut fa, mut fb) = (open(a)?, open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = read_full(&mut fa, &mut ba)?;
        let m = read_full(&mut fb, &mut bb)?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// What a step produced that the summary needs: a generated key's public line.
pub enum Applied {
    Done,
    Key(String),
}

pub fn apply(step: &Step) -> anyhow::Result<Applied> {
    match step {
        Step::Install { from, to } => {
            let mut src =
                fs::File::open(from).with_context(|| format!("{}: cannot read", from.display()))?;
            replace(to, 0o755, |f| {
                std::io::copy(&mut src, f)?;
                Ok(())
            })?;
        }
        Step::GenerateKey { name, dir } => {
            let (_, _, public) = crate::keys::keygen(name, dir)?;
            return Ok(Applied::Key(public.to_nix_string()));
        }
        Step::CreateDir { path } => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(path)
            .with_context(|| format!("{}: cannot create the directory", path.display()))?,
        Step::Write {
            path, text, mode, ..
        } => replace(path, *mode, |f| f.write_all(text.as_bytes()))?,
        Step::Remove { path, prune_dir } => {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("{}: cannot remove", path.display()));
                }
            }
            if let Some(dir) = path.parent() {
                if *prune_dir {
                    // Only if nothing else is in it (an admin's own drop-ins stay).
                    let _ = fs::remove_dir(dir);
                }
                sync_dir(dir.parent().filter(|_| *prune_dir).unwrap_or(dir));
            }
        }
        Step::Run { argv } => {
            let status = Command::new(&argv[0])
                .args(&argv[1..])
                .status()
                .with_context(|| format!("cannot run {}", argv[0]))?;
            if !status.success() {
                bail!(
                    "`{}` failed ({status}); the files are in place: fix what systemctl reported and run setup again",
                    argv.join(" ")
                );
            }
        }
    }
    Ok(Applied::Done)
}

/// Replaces `path` with what `fill` writes: a temporary file beside it, fsynced, renamed
/// over it, the directory fsynced. A new file gets `mode`; an old one's mode and owner stay.
fn replace(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut fs::File) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let ctx = || format!("{}: cannot write", path.display());
    let dir = path
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{}: no parent directory", path.display()))?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let old = fs::metadata(path).ok();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .tempfile_in(dir)
        .with_context(ctx)?;
    fill(tmp.as_file_mut()).with_context(ctx)?;
    let file = tmp.as_file();
    let mode = old.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(mode);
    file.set_permissions(fs::Permissions::from_mode(mode))
        .with_context(ctx)?;
    if let Some(m) = &old {
        std::os::unix::fs::fchown(file, Some(m.uid()), Some(m.gid())).with_context(ctx)?;
    }
    file.sync_all().with_context(ctx)?;
    tmp.persist(path).map_err(|e| e.error).with_context(ctx)?;
    sync_dir(dir);
    Ok(())
}

/// Makes a rename or removal in `dir` durable; best effort, as the change itself is done.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The canonical form of a path, or the path itself when it does not exist.
pub fn canonical(path: &Path) -> PathBuf {
    fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}
