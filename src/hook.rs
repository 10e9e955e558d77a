//! `narpost hook`: Nix's `post-build-hook`. It records what a build produced in the durable
//! queue and returns; the daemon does the uploading.
//!
//! Nix runs the hook synchronously after every successful build, and a non-zero exit stops
//! the build loop. So the hook is built to be boring:
//!
//! - it always exits 0; every problem is one line on stderr (which lands in the build log):
//!   `narpost hook: <what>: <why>`, plus what to do about it;
//! - it catches panics, too, rather than let one escape as a failed build;
//! - no async runtime, no network, no Nix process: a handful of syscalls and two fsyncs, so
//!   it costs a few milliseconds however deep the queue is (enqueueing never lists it).
//!
//! Outputs come from `OUT_PATHS` (space-separated) when it is set and non-empty. Nix 2.8
//! leaves it empty (NixOS/nix#6446), so otherwise the `.drv` named by `DRV_PATH` is parsed
//! for its output paths: a small file, read in microseconds. Each path is validated; bad
//! ones are reported and skipped, the rest go on.
//!
//! Order of work, chosen for crash safety: open the queue (so an unusable state directory
//! is found before anything is changed; one that someone else could write to is refused,
//! see [`crate::private_dir`], but its paths still get their GC roots, which the daemon
//! adopts once the directory is fixed), then create GC roots, then enqueue (fsynced; the
//! drainer fsyncs the roots, see [`crate::queue`]'s GC roots). A queued path is thus always
//! protected from garbage collection; a crash between the two steps, or an enqueue that
//! fails (disk full), leaves a root without an entry, which the daemon finds and queues
//! (see [`crate::daemon`]). Failing to create roots is reported but does not stop the
//! enqueue: an unprotected path in the queue is still far more likely to be uploaded than
//! one that was never queued.

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

use crate::format::drv;
use crate::format::store_path::StorePath;
use crate::queue::{GcRoots, Producer, QueueError};

/// Where the hook writes.
#[derive(Debug, Clone)]
pub struct HookConfig {
    pub state_dir: PathBuf,
    pub gcroots_dir: PathBuf,
}

/// What Nix passes in the environment; a struct so tests need not touch the process's.
#[derive(Debug, Clone, Default)]
pub struct HookEnv {
    /// `OUT_PATHS`: space-separated output paths (empty under Nix 2.8).
    pub out_paths: Option<String>,
    /// `DRV_PATH`: the derivation that was built.
    pub drv_path: Option<String>,
}

impl HookEnv {
    /// Reads `OUT_PATHS` and `DRV_PATH`. Values that are not UTF-8 are kept (lossily) so
    /// that validation reports them instead of them silently vanishing.
    pub fn from_env() -> HookEnv {
        let var = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        HookEnv {
            out_paths: var("OUT_PATHS"),
            drv_path: var("DRV_PATH"),
        }
    }
}

/// Entry point for `narpost hook`: resolves the GC roots directory (all it needs from the
/// configuration), reads the environment and runs the hook. Never fails: a broken config
/// file is reported and the roots directory is taken from `NARPOST_GC_ROOTS_DIR` or the
/// default, so the build's outputs are still queued.
pub fn main(config_file: Option<&Path>, state_dir: &Path) {
    let mut stderr = std::io::stderr().lock();
    let loaded = catch_unwind(|| crate::config::Config::load_gc_roots_dir(config_file, state_dir));
    let fallback = || crate::config::resolve_gc_roots_dir(None, state_dir);
    let gcroots_dir = match loaded {
        Ok(Ok(dir)) => dir,
        Ok(Err(e)) => {
            let dir = fallback();
            let _ = writeln!(
                stderr,
                "narpost hook: {}; queuing anyway, with GC roots in {}",
                e.to_string().replace('\n', " "),
                dir.display()
            );
            dir
        }
        Err(_) => {
            let dir = fallback();
            let _ = writeln!(
                stderr,
                "narpost hook: internal error while reading the configuration; queuing anyway, with GC roots in {}; please report this bug",
                dir.display()
            );
            dir
        }
    };
    let cfg = HookConfig {
        state_dir: state_dir.to_path_buf(),
        gcroots_dir,
    };
    run_to(&cfg, &HookEnv::from_env(), &mut stderr);
}

/// Runs the hook, reporting on stderr. Always returns 0, the exit code for Nix.
pub fn run(cfg: HookConfig, env: HookEnv) -> i32 {
    run_to(&cfg, &env, &mut std::io::stderr().lock())
}

/// [`run`], reporting to `err` (one line per problem). Always returns 0.
pub fn run_to(cfg: &HookConfig, env: &HookEnv, err: &mut dyn Write) -> i32 {
    let mut lines = Vec::new();
    let outcome = catch_unwind(AssertUnwindSafe(|| hook(cfg, env, &mut lines)));
    if let Err(panic) = outcome {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".to_owned());
        lines.push(format!(
            "internal error: {msg}; this build's outputs may not be queued, push them with `narpost push`, and please report this bug"
        ));
    }
    for line in lines {
        // One line each, even if a message from below contains a newline.
        let line = line.replace('\n', " ");
        let _ = writeln!(err, "narpost hook: {line}");
    }
    let _ = err.flush();
    0
}

fn hook(cfg: &HookConfig, env: &HookEnv, report: &mut Vec<String>) {
    let (paths, drv) = outputs(env, report);
    if paths.is_empty() {
        return;
    }
    let listed = || {
        paths
            .iter()
            .map(StorePath::to_absolute)
            .collect::<Vec<_>>()
            .join(" ")
    };
    let roots = GcRoots::new(&cfg.gcroots_dir);
    let protect = |report: &mut Vec<String>| match roots
        .check()
        .and_then(|()| roots.protect_all(&paths))
    {
        Ok(()) => true,
        Err(e) => {
            report.push(format!(
                "{e}; queuing anyway, but garbage collection may delete the paths before they are uploaded"
            ));
            false
        }
    };
    let queue = match Producer::open(&cfg.state_dir) {
        Ok(q) => q,
        Err(QueueError::Dir(e)) if e.is_refusal() => {
            // The directory exists and is the configured one, only someone else could steer
            // writes into it: the paths keep GC roots, which the daemon adopts once the
            // directory is fixed, so nothing built is lost meanwhile.
            let rooted = protect(report);
            let paths = listed();
            report.push(if rooted {
                format!(
                    "{e}; not queued: {paths}; their GC roots stay, and the daemon queues them once the state directory is fixed (or run `narpost push {paths}`)"
                )
            } else {
                format!("{e}; not queued: {paths}; fix the state directory, then run `narpost push {paths}`")
            });
            return;
        }
        Err(e) => {
            report.push(format!(
                "{e}; not queued: {paths}; fix the state directory, then run `narpost push {paths}`",
                paths = listed()
            ));
            return;
        }
    };
    let rooted = protect(report);
    if let Err(e) = queue.enqueue(&paths, drv.as_deref()) {
        let paths = listed();
        report.push(if rooted {
            format!(
                "{e}; not queued: {paths}; their GC roots stay, and the daemon queues them from there within minutes once the state directory is writable (or run `narpost push {paths}`)"
            )
        } else {
            format!(
                "{e}; not queued: {paths}; free space or fix the state directory, then run `narpost push {paths}`"
            )
        });
    }
}

/// The build's outputs, deduplicated in order, and the derivation if it is a valid store
/// path. Problems are added to `report`.
fn outputs(env: &HookEnv, report: &mut Vec<String>) -> (Vec<StorePath>, Option<String>) {
    let drv_path = env
        .drv_path
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let drv = drv_path
        .filter(|d| StorePath::from_absolute(d).is_ok())
        .map(str::to_owned);
    let mut paths: Vec<StorePath> = Vec::new();
    let mut push = |p: StorePath| {
        if !paths.contains(&p) {
            paths.push(p);
        }
    };
    let out_paths = env.out_paths.as_deref().unwrap_or("");
    if !out_paths.trim().is_empty() {
        for item in out_paths.split_ascii_whitespace() {
            match StorePath::from_absolute(item) {
                Ok(p) => push(p),
                Err(e) => report.push(format!("OUT_PATHS: {e}; skipping it")),
            }
        }
        return (paths, drv);
    }
    let Some(drv_path) = drv_path else {
        report.push(
            "OUT_PATHS and DRV_PATH: neither is set, so there is nothing to queue; run narpost hook only as Nix's post-build-hook".to_owned(),
        );
        return (paths, drv);
    };
    if let Err(e) = StorePath::from_absolute(drv_path) {
        report.push(format!(
            "DRV_PATH: {e}; OUT_PATHS is empty, so this build's outputs are not queued; push them with `narpost push`"
        ));
        return (paths, drv);
    }
    let text = match read_drv(Path::new(drv_path)) {
        Ok(t) => t,
        Err(e) => {
            report.push(format!(
                "DRV_PATH {drv_path}: cannot read the derivation: {e}; OUT_PATHS is empty, so this build's outputs are not queued; push them with `narpost push`"
            ));
            return (paths, drv);
        }
    };
    match drv::parse_outputs(&text) {
        Ok(outputs) => {
            for (_name, p) in outputs {
                push(p);
            }
        }
        Err(e) => report.push(format!(
            "DRV_PATH {drv_path}: {e}; this build's outputs are not queued; push them with `narpost push`"
        )),
    }
    (paths, drv)
}

/// Derivations are kilobytes; the largest real ones (long inline scripts, many inputs) are
/// a few megabytes. Anything larger is not worth holding a build for.
const MAX_DRV_LEN: u64 = 32 << 20;

/// Reads a `.drv` for its outputs, at a bounded cost whatever is at the path: a symlink or
/// something other than a regular file is refused without reading, a file that does not
/// start like a derivation after its first few bytes, and one past [`MAX_DRV_LEN`] before
/// it is read whole.
fn read_drv(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    const PREFIX: &[u8] = b"Derive(";
    let flags = rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags.bits() as i32)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(Error::new(ErrorKind::InvalidData, "not a regular file"));
    }
    if meta.len() > MAX_DRV_LEN {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!(
                "{} bytes is too large for a derivation (at most {MAX_DRV_LEN})",
                meta.len()
            ),
        ));
    }
    let mut limited = file.take(MAX_DRV_LEN);
    let mut head = Vec::with_capacity(meta.len() as usize);
    (&mut limited)
        .take(PREFIX.len() as u64)
        .read_to_end(&mut head)?;
    if head != PREFIX {
        return Err(Error::new(
            ErrorKind::InvalidData,
            "does not start with `Derive(`, so it is not a derivation",
        ));
    }
    limited.read_to_end(&mut head)?;
    String::from_utf8(head).map_err(|_| Error::new(ErrorKind::InvalidData, "not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "/nix/store/2nm1z9vx9pf9ny6mxl4khv44ibbh5adr-a";
    const B: &str = "/nix/store/91c2za11mf61rwg8ypjk82l4ia73346p-b";

    #[test]
    fn out_paths_are_validated_and_deduplicated() {
        let env = HookEnv {
            out_paths: Some(format!("  {A} /tmp/x {B}\t{A} /nix/store/short ")),
            drv_path: Some("/not/a/store/path.drv".into()),
        };
        let mut report = Vec::new();
        let (paths, drv) = outputs(&env, &mut report);
        let abs: Vec<_> = paths.iter().map(StorePath::to_absolute).collect();
        assert_eq!(abs, [A, B]);
        assert_eq!(drv, None);
        assert_eq!(report.len(), 2, "{report:?}");
        assert!(report[0].contains("\"/tmp/x\""), "{report:?}");
        assert!(report[1].contains("\"/nix/store/short\""), "{report:?}");
    }

    #[test]
    fn drv_path_is_read_only_from_the_store_and_only_if_it_looks_like_a_derivation() {
        let mut report = Vec::new();
        let env = |drv: &str| HookEnv {
            out_paths: Some(String::new()),
            drv_path: Some(drv.into()),
        };
        let started = std::time::Instant::now();
        let (paths, _) = outputs(&env("/dev/zero"), &mut report);
        assert!(paths.is_empty());
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(report.len(), 1, "{report:?}");
        assert!(report[0].contains("/dev/zero"), "{report:?}");

        let tmp = tempfile::tempdir().unwrap();
        let big = tmp.path().join("big");
        let file = std::fs::File::create(&big).unwrap();
        file.set_len(MAX_DRV_LEN + 1).unwrap();
        let err = read_drv(&big).unwrap_err();
        assert!(err.to_string().contains("too large"), "{err}");
        // A file that is not a derivation is refused after seven bytes.
        std::fs::write(&big, b"garbage").unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        file.set_len(MAX_DRV_LEN).unwrap();
        let err = read_drv(&big).unwrap_err();
        assert!(err.to_string().contains("Derive("), "{err}");
        std::os::unix::fs::symlink(&big, tmp.path().join("link")).unwrap();
        assert!(read_drv(&tmp.path().join("link")).is_err());
        assert!(read_drv(Path::new("/dev/null")).is_err());
    }

    #[test]
    fn no_variables_is_one_line_and_nothing() {
        let mut report = Vec::new();
        let (paths, _) = outputs(&HookEnv::default(), &mut report);
        assert!(paths.is_empty());
        assert_eq!(report.len(), 1);
        assert!(report[0].contains("DRV_PATH"), "{report:?}");
    }
}
