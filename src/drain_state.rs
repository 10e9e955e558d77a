//! The drainer's published state, `<state>/drain-state.json`: what `narpost status`, the
//! metrics and a watcher's closing summary read, and the one place that writes and reads it.
//!
//! Written by the drainer after each pass, atomically by rename; on a full disk (where no
//! new file fits) over the old file in place, whose blocks are already there, because the
//! reason the disk is full is what `status` must show. Read without following a link and
//! with a size limit, like everything in the state directory.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::private_dir::{DirError, PrivateDir};

/// What the drainer publishes for `narpost status`, rewritten atomically after each batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainState {
    pub pid: u32,
    pub started_at: u64,
    pub cache: String,
    /// The public half of the signing key, for `trusted-public-keys`.
    #[serde(default)]
    pub public_key: Option<String>,
    pub pushed: u64,
    pub already_cached: u64,
    /// Paths signed by an upstream key, not uploaded.
    #[serde(default)]
    pub left_upstream: u64,
    /// Build logs uploaded, with their paths or (watchers) of failed builds.
    #[serde(default)]
    pub logs_uploaded: u64,
    pub last_error: Option<String>,
    pub last_error_at: Option<u64>,
    pub cache_down_since: Option<u64>,
    /// Why the cache (or this machine) needs someone to act before queued paths can go:
    /// a refusal such as a 413 or a 404, credentials, an unreadable path; with its hint.
    #[serde(default)]
    pub needs_attention: Option<String>,
}

pub const STATE_FILE: &str = "drain-state.json";

/// What the daemon's build claims publish beside it (see [`crate::claims`]).
pub const CLAIMS_FILE: &str = "claims-state.json";

/// The build claims of this machine, for `status` and the metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimsState {
    /// This machine's name in claims.
    pub machine: String,
    /// Hash parts of the paths this machine claims (builds, or is about to).
    pub held: Vec<String>,
    /// Hash parts of the paths this machine waits for another to build.
    pub waiting: Vec<String>,
    /// Waits since start, and those that ended with the path built elsewhere.
    pub waits: u64,
    pub builds_saved: u64,
}

/// The claims state the daemon of `state_dir` last published, if there is one.
pub fn read_claims(state_dir: &Path) -> Option<ClaimsState> {
    let dir = PrivateDir::open(state_dir).ok()?;
    let bytes = dir.read(CLAIMS_FILE, MAX_LEN).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Publishes the claims state, atomically like the drain state.
pub fn write_claims(state_dir: &Path, state: &ClaimsState) -> std::io::Result<()> {
    write_json(
        state_dir,
        CLAIMS_FILE,
        &serde_json::to_vec_pretty(state).unwrap_or_default(),
    )
}

/// A status file is a few hundred bytes; a larger one is not ours.
const MAX_LEN: u64 = 1 << 20;

/// The state the drainer of `state_dir` last published, if there is a readable one.
pub fn read(state_dir: &Path) -> Option<DrainState> {
    let dir = PrivateDir::open(state_dir).ok()?;
    let bytes = dir.read(STATE_FILE, MAX_LEN).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Publishes `state` (see the module doc). Nothing here follows a symlink: the temporary
/// file is created exclusively (a stale one from a crash is removed first), the fallback
/// opens with O_NOFOLLOW.
pub fn write(state_dir: &Path, state: &DrainState) -> std::io::Result<()> {
    write_json(
        state_dir,
        STATE_FILE,
        &serde_json::to_vec_pretty(state).unwrap_or_default(),
    )
}

fn write_json(state_dir: &Path, name: &str, json: &[u8]) -> std::io::Result<()> {
    let tmp = format!(".{name}.tmp");
    let dir = PrivateDir::open(state_dir).map_err(|e: DirError| std::io::Error::other(e))?;
    let atomic = (|| -> std::io::Result<()> {
        dir.remove(&tmp)?;
        let mut f = dir.create_new(&tmp)?;
        f.write_all(json)?;
        dir.rename(&tmp, name)
    })();
    atomic.or_else(|e| {
        let _ = dir.remove(&tmp);
        let mut f = dir.open_write(name)?;
        f.write_all(json)
            .and_then(|()| f.set_len(json.len() as u64))
            .map_err(|_| e)
    })
}
