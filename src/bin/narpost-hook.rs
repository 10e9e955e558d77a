//! `narpost-hook`: the same as `narpost hook`, in a binary that links only the queue, so Nix
//! pays for starting a small program after every build rather than the whole of narpost
//! (its HTTP, TLS, S3 and async runtime code). Point `post-build-hook` at it directly, or at
//! `hook/narpost-hook`, which calls it.
//!
//! Settings as for `narpost`: `--state-dir DIR` / `NARPOST_STATE_DIR`, `--config FILE` /
//! `NARPOST_CONFIG`, `NARPOST_GC_ROOTS_DIR`. Always exits 0: a problem is one line on stderr.

use std::io::Write;
use std::path::PathBuf;

fn main() {
    let mut state_dir = env_path("NARPOST_STATE_DIR")
        .unwrap_or_else(|| PathBuf::from(narpost::config::DEFAULT_STATE_DIR));
    let mut config = env_path("NARPOST_CONFIG");
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let value =
            |args: &mut dyn Iterator<Item = std::ffi::OsString>| args.next().map(PathBuf::from);
        match arg.to_str() {
            Some("--state-dir") => match value(&mut args) {
                Some(v) => state_dir = v,
                None => return usage("--state-dir needs a directory"),
            },
            Some("--config") => match value(&mut args) {
                Some(v) => config = Some(v),
                None => return usage("--config needs a file"),
            },
            // `narpost-hook hook` reads like `narpost hook`; both are accepted.
            Some("hook") => {}
            _ => return usage(&format!("unexpected argument {:?}", arg.to_string_lossy())),
        }
    }
    narpost::hook::main(config.as_deref(), &state_dir);
}

fn env_path(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Even a wrong command line must not fail the build: say so, queue nothing, exit 0.
fn usage(problem: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "narpost hook: {problem}; this build's outputs are not queued; usage: narpost-hook [--state-dir DIR] [--config FILE]"
    );
}
