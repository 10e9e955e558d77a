//! Records the git commit narpost is built from, for `narpost --version`.
//!
//! Order: `NARPOST_GIT_COMMIT` (set by a package build, which has no `.git`), then the
//! checkout's `git rev-parse HEAD`, else "unknown". Cargo reruns this only when HEAD, the
//! branch it points at, or the packed refs change, so an ordinary edit does not rerun it
//! and a new commit does.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NARPOST_GIT_COMMIT");
    let commit = match std::env::var("NARPOST_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_owned(),
        _ => from_git().unwrap_or_else(|| "unknown".to_owned()),
    };
    println!("cargo:rustc-env=NARPOST_BUILD_COMMIT={commit}");
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    Some(text.trim().to_owned())
}

fn from_git() -> Option<String> {
    // Only this crate's own checkout counts: a tarball unpacked inside some other
    // repository must not report that repository's commit.
    let top = git(&["rev-parse", "--show-toplevel"])?;
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    if Path::new(&top).canonicalize().ok()? != manifest_dir.canonicalize().ok()? {
        return None;
    }
    let absolute = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            manifest_dir.join(p)
        }
    };
    let git_dir = absolute(git(&["rev-parse", "--git-dir"])?);
    let common_dir = absolute(git(&["rev-parse", "--git-common-dir"])?);
    watch(&git_dir.join("HEAD"));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose = common_dir.join(branch);
        if loose.exists() {
            watch(&loose);
        } else if let Some(parent) = loose.parent() {
            // Packed away: the next commit writes it loose again, in this directory.
            watch(parent);
        }
    }
    watch(&common_dir.join("packed-refs"));
    git(&["rev-parse", "HEAD"])
}

/// Watches `file` if it exists: Cargo reruns a build script on every build for a watched
/// path that does not exist.
fn watch(file: &Path) {
    if file.exists() {
        println!("cargo:rerun-if-changed={}", file.display());
    }
}
