//! `narpost-hook`: the same as `narpost hook`, in a binary that links only the queue, so Nix
//! pays for starting a small program after every build rather than the whole of narpost
//! (its HTTP, TLS, S3 and async runtime code). Point `post-build-hook` at it directly, or at
//! `hook/narpost-hook`, which calls it.
//!
//! Settings as for `narpost`: `--state-dir DIR` / `NARPOST_STATE_DIR`, `--config FILE` /
//! `NARPOST_CONFIG`, `NARPOST_GC_ROOTS_DIR`. Always exits 0: a problem is one line on stderr.

// Nix waits for this program after every build, so it skips the Rust runtime's start-up
// (which reads /proc/self/maps to place a stack guard, installs an alternate signal stack and
// inspects the standard descriptors): about 0.2 ms, several percent of the whole run. Arguments and the environment still come through std, which glibc hands them to
// before `main`. What is lost is harmless here: a stack overflow ends the process by SIGSEGV
// without a message instead of with one, and SIGPIPE keeps its default action, which only
// matters if Nix has closed the log pipe, i.e. is gone and no longer waiting.
#![no_main]

use std::io::Write;
use std::path::PathBuf;

#[unsafe(no_mangle)]
pub extern "C" fn main(
    _argc: std::ffi::c_int,
    _argv: *const *const std::ffi::c_char,
) -> std::ffi::c_int {
    run();
    0
}

fn run() {
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
