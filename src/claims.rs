//! Building once across machines: while a machine builds a path the cache lacks, the others
//! wait for it and substitute it, instead of building it too.
//!
//! # What Nix allows
//!
//! Nix asks its substituters about every path of a build before it builds anything, one
//! question at a time, and waits for each answer; a 404 is remembered for an hour. So the
//! one place a machine can wait for another's build is the answer to that question, and
//! the first answer is the only one that counts. The daemon's local substituter
//! ([`crate::substituter`]) asks this module when the cache has no narinfo for a path.
//!
//! # Claims
//!
//! A machine that answers "not in the cache" (so its Nix builds the path) first claims the
//! path: it writes `claims/<hash part>/<machine>` into the cache ([`crate::format::claim`]).
//! One object per machine and path: no two machines ever write the same object, so the
//! cache needs no create-if-absent. A claim carries the machine's **session key**: when
//! its current claiming session began (a session starts with the first claim made while it
//! holds none, and lasts while it holds any), with its name as the tie-break. Every machine
//! reads the same key from the object, so all order claims alike.
//!
//! The clock is read for a session's key only **after the claim that opens it has landed**
//! in the cache: that claim is written first as `Pending`, carrying the time before the
//! write (a lower bound of its key), and written again with its key before the machine
//! lists anything. A machine that lists a pending claim which might be older than its own
//! reads it again until it has its key (for at most [`PENDING_WAIT`]).
//!
//! # Deciding, and why no two machines wait on each other
//!
//! Asked about a path the cache lacks, a machine writes its own claim (starting a session
//! if it holds none), **then** lists the path's claims, and:
//!
//! 1. if a claim's key is smaller than its own, it withdraws its claim and waits on the
//!    smallest such claim;
//! 2. otherwise it answers "not in the cache", and its Nix builds the path.
//!
//! A machine waits only on a smaller key than its own. A wait cycle would need A waiting on
//! B (B < A) and B on A (A < B): impossible in a total order, whatever the paths and
//! whatever each machine has seen.
//!
//! Two machines asking at once both write before either lists, so at least the later
//! lister sees both claims and waits on the smaller key. The earlier lister, seeing only
//! its own claim, builds; and when the other's session opened with this claim, the other
//! has the larger key and waits: its claim landed after that listing, and its key was read
//! after its claim landed, so later still (by one clock; across machines, unless their
//! clocks disagree by more than the write took). Only a machine whose session is already
//! under way (it holds other claims) can have the smaller key and yet land after the
//! other's listing: then it finds the path claimed by a younger session, claims it too and
//! builds it, a duplicate build, the price of never deadlocking. Nothing compares a remote
//! time with a local one.
//!
//! # Waiting
//!
//! The waiter asks the cache for the narinfo and reads the claim twice a second:
//!
//! - the narinfo appeared: that is the answer, and Nix substitutes the path (and then its
//!   closure, through the same substituter);
//! - the claim is gone (its build failed, or never started) or belongs to a new session:
//!   decide again, from step 1;
//! - the claim's heartbeat did not change for `claim-timeout` **on the waiter's own clock**
//!   (its machine died): decide again, ignoring that machine's session from then on;
//! - the wait reached [`MAX_WAIT`] (below Nix's `stalled-download-timeout`): claim the path
//!   and answer "not in the cache".
//!
//! # When a claim ends
//!
//! - **Uploaded**: the drainer releases the claims of the paths it has put in the cache
//!   ([`Claims::release`]).
//! - **Build failed**: Nix holds a `flock` on `/nix/store/<hash>-<name>.lock` while it
//!   builds that output; the claim goes once its lock was seen held, is no longer held, and
//!   the path is not valid (looked at every [`WATCH_EVERY`]).
//! - **Never built** (Nix stopped after another build failed, or substituted the path
//!   from elsewhere): once no claimed path's lock has been held for [`NEVER_BUILT_GRACE`]
//!   and this machine waits for nothing, the claims whose lock was never seen go; at once
//!   when a claimed build failed and nothing else builds here (Nix stops at a failure).
//! - **The machine died**: its claims stop changing; the daemon rewrites its claims every
//!   quarter of `claim-timeout` while they live, and waiters expire them as above.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use crate::cache::{DynTarget, TargetError};
use crate::format::claim::{self, Claim, ClaimKey, MAX_CLAIM_LEN};
use crate::format::store_path::StorePath;
use crate::store::Store;

/// The longest a question is held: Nix gives up on a transfer that receives nothing for
/// `stalled-download-timeout` (300 s by default), and an error fails its build.
pub const MAX_WAIT: Duration = Duration::from_secs(240);

/// How often a waiter looks at the cache.
const POLL: Duration = Duration::from_millis(500);

/// How often this machine looks at its own claims' builds.
pub const WATCH_EVERY: Duration = Duration::from_millis(250);

/// How long no claimed path may be building before the claims never built go.
pub const NEVER_BUILT_GRACE: Duration = Duration::from_secs(10);

/// The longest a pending claim (see the module doc) is read again for its key; a machine
/// rewrites it at once, so one still pending after this has a stuck writer, and counts as
/// old as it says.
pub const PENDING_WAIT: Duration = Duration::from_secs(5);

/// How often a pending claim is read again.
const PENDING_POLL: Duration = Duration::from_millis(20);

/// A narinfo larger than this is not one.
const MAX_NARINFO: usize = 1 << 20;

#[derive(Debug, Clone)]
pub struct ClaimOptions {
    /// This machine's name in claims.
    pub machine: String,
    /// A claim whose heartbeat does not change for this long belongs to a dead machine.
    pub timeout: Duration,
}

/// What the substituter answers a narinfo question the cache could not.
#[derive(Debug)]
pub enum Answer {
    /// Another machine built and uploaded the path while this one waited.
    Narinfo(Vec<u8>),
    /// Not in the cache: Nix builds it (and this machine holds the claim).
    Miss,
}

enum Decision {
    Build,
    Wait(Claim),
}

enum WaitEnd {
    Narinfo(Vec<u8>),
    Gone,
    Expired,
    TimedOut,
}

/// This machine's claims, and the waits of its substituter.
pub struct Claims {
    target: DynTarget,
    opts: ClaimOptions,
    own: Mutex<Own>,
    /// Held while a session opens, so that a machine opens one at a time.
    opening: tokio::sync::Mutex<()>,
    /// Where the build locks are.
    store_dir: PathBuf,
}

#[derive(Default)]
struct Own {
    /// When the current session began (ms since the epoch), while any claim is held.
    session: Option<u64>,
    held: BTreeMap<String, Held>,
    /// Paths the substituter waits on right now, by hash part.
    waiting: BTreeMap<String, usize>,
    /// When a claimed path's lock was last seen held.
    last_building: Option<Instant>,
    waits: u64,
    saved: u64,
    /// Sessions whose claims expired here (machine, session): their machine is gone, and
    /// no question waits on them again.
    dead: HashSet<(String, u64)>,
}

struct Held {
    beat: u64,
    since: Instant,
    /// The path, once the store knows its name.
    path: Option<StorePath>,
    lock_seen: bool,
}

impl Held {
    fn new() -> Held {
        Held {
            beat: 0,
            since: Instant::now(),
            path: None,
            lock_seen: false,
        }
    }
}

pub use crate::drain_state::ClaimsState;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Claims {
    pub fn new(target: DynTarget, opts: ClaimOptions) -> Claims {
        Claims {
            target,
            opts,
            own: Mutex::new(Own::default()),
            opening: tokio::sync::Mutex::new(()),
            store_dir: PathBuf::from(crate::format::store_path::STORE_DIR),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Own> {
        self.own.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn state(&self) -> ClaimsState {
        let own = self.lock();
        ClaimsState {
            machine: self.opts.machine.clone(),
            held: own.held.keys().cloned().collect(),
            waiting: own.waiting.keys().cloned().collect(),
            waits: own.waits,
            builds_saved: own.saved,
        }
    }

    /// The answer for a path (by hash part) whose narinfo the cache lacks: see the module
    /// doc. Never an error: whatever fails, Nix gets a miss and builds.
    pub async fn answer_miss(&self, hash: &str) -> Answer {
        let deadline = Instant::now() + MAX_WAIT;
        loop {
            let ignore = self.lock().dead.clone();
            let decision = match self.decide(hash, &ignore).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!("claims: {}; building {hash} here", e.message);
                    return Answer::Miss;
                }
            };
            let Decision::Wait(on) = decision else {
                return Answer::Miss;
            };
            tracing::info!("{hash}: {} builds it; waiting for it", on.machine);
            match self.wait_on(hash, &on, deadline).await {
                WaitEnd::Narinfo(body) => {
                    self.lock().saved += 1;
                    tracing::info!("{hash}: built by {}; substituting it", on.machine);
                    return Answer::Narinfo(body);
                }
                WaitEnd::Gone => {}
                WaitEnd::Expired => {
                    tracing::info!(
                        "{hash}: the claim of {} did not change for {}s; its machine is gone",
                        on.machine,
                        self.opts.timeout.as_secs()
                    );
                    self.lock().dead.insert((on.machine.clone(), on.session));
                }
                WaitEnd::TimedOut => {
                    tracing::warn!(
                        "{hash}: waited {}s for {}; building it here",
                        MAX_WAIT.as_secs(),
                        on.machine
                    );
                    if let Err(e) = self.claim(hash).await {
                        tracing::warn!("claims: {}", e.message);
                    }
                    return Answer::Miss;
                }
            }
        }
    }

    /// This machine's key: its session's, or the one a session starting now would have.
    fn my_key(&self) -> ClaimKey {
        ClaimKey {
            session: self.lock().session.unwrap_or_else(now_ms),
            machine: self.opts.machine.clone(),
        }
    }

    /// Claims first and lists after: of two machines asking at once, both have written
    /// before either lists, so at least the later one sees both claims (see the module
    /// doc); and a miss nobody else builds costs one write and one listing.
    async fn decide(
        &self,
        hash: &str,
        ignore: &HashSet<(String, u64)>,
    ) -> Result<Decision, TargetError> {
        self.claim(hash).await?;
        let mine = self.my_key();
        let mut others = Vec::new();
        for other in self.others(hash, ignore).await? {
            if other.pending && other.key() < mine {
                others.extend(self.keyed(hash, other).await?);
            } else {
                others.push(other);
            }
        }
        if let Some(older) = older_than(&others, &mine) {
            self.withdraw(hash).await;
            return Ok(Decision::Wait(older));
        }
        Ok(Decision::Build)
    }

    /// The other machines' claims on the path, but those in `ignore` (expired).
    async fn others(
        &self,
        hash: &str,
        ignore: &HashSet<(String, u64)>,
    ) -> Result<Vec<Claim>, TargetError> {
        let Some(names) = self.target.list(&claim::claims_prefix(hash)).await? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for name in names {
            if name == self.opts.machine || !claim::valid_machine(&name) {
                continue;
            }
            match self.read_claim(hash, &name).await? {
                Some(c) if !ignore.contains(&(c.machine.clone(), c.session)) => out.push(c),
                _ => {}
            }
        }
        Ok(out)
    }

    /// `machine`'s claim on the path; `None` when there is none, or what is there is not a
    /// claim of that machine's.
    async fn read_claim(&self, hash: &str, machine: &str) -> Result<Option<Claim>, TargetError> {
        let key = claim::claim_key(hash, machine);
        let Some(bytes) = self.target.read_small(&key, MAX_CLAIM_LEN).await? else {
            return Ok(None);
        };
        match Claim::parse(&bytes) {
            Ok(c) if c.machine == machine => Ok(Some(c)),
            Ok(c) => {
                tracing::debug!("{key}: a claim of {}", c.machine);
                Ok(None)
            }
            Err(e) => {
                tracing::debug!("{key}: not a claim: {e}");
                Ok(None)
            }
        }
    }

    /// Reads a pending claim again until it has its key; `None` once it is gone.
    async fn keyed(&self, hash: &str, mut claim: Claim) -> Result<Option<Claim>, TargetError> {
        let deadline = Instant::now() + PENDING_WAIT;
        while claim.pending && Instant::now() < deadline {
            tokio::time::sleep(PENDING_POLL).await;
            match self.read_claim(hash, &claim.machine).await? {
                Some(now) => claim = now,
                None => return Ok(None),
            }
        }
        Ok(Some(claim))
    }

    /// Claims the path (again), opening a session if none is under way.
    async fn claim(&self, hash: &str) -> Result<(), TargetError> {
        loop {
            if let Some(text) = self.next_claim(hash) {
                return self.put_claim(hash, text).await;
            }
            let _opening = self.opening.lock().await;
            if self.lock().session.is_none() {
                return self.open_session(hash).await;
            }
        }
    }

    /// Opens a session with a claim on the path: see the module doc for why the key is read
    /// only once that claim has landed.
    async fn open_session(&self, hash: &str) -> Result<(), TargetError> {
        let before = now_ms();
        let pending = self.book(&mut self.lock(), hash, before, true);
        self.put_claim(hash, pending).await?;
        let withdrawn = {
            let mut own = self.lock();
            let withdrawn = !own.held.contains_key(hash);
            if !withdrawn {
                own.session = Some(now_ms().max(before));
            }
            withdrawn
        };
        if withdrawn {
            // The path was uploaded while its claim was on its way, and the removal may have
            // come first; the next claim opens a session.
            self.remove_own(hash).await;
            return Ok(());
        }
        match self.next_claim(hash) {
            Some(text) => self.put_claim(hash, text).await,
            None => Ok(()),
        }
    }

    /// The claim on the path to write now, booked as held; `None` while no session is under
    /// way.
    fn next_claim(&self, hash: &str) -> Option<String> {
        let mut own = self.lock();
        let session = own.session?;
        Some(self.book(&mut own, hash, session, false))
    }

    /// Books the claim on the path as held, with its next beat; the text to write.
    fn book(&self, own: &mut Own, hash: &str, session: u64, pending: bool) -> String {
        let held = own.held.entry(hash.to_owned()).or_insert_with(Held::new);
        held.beat += 1;
        Claim {
            machine: self.opts.machine.clone(),
            session,
            beat: held.beat,
            pending,
        }
        .to_string()
    }

    async fn put_claim(&self, hash: &str, text: String) -> Result<(), TargetError> {
        let written = self
            .target
            .write_small(
                &claim::claim_key(hash, &self.opts.machine),
                text.into_bytes(),
            )
            .await;
        if written.is_err() {
            self.forget(hash);
        }
        written
    }

    /// Ends this machine's claim on the path, if it holds one.
    async fn withdraw(&self, hash: &str) {
        if self.forget(hash) {
            self.remove_own(hash).await;
        }
    }

    async fn remove_own(&self, hash: &str) {
        let key = claim::claim_key(hash, &self.opts.machine);
        if let Err(e) = self.target.remove(&key).await {
            // It expires with its heartbeat.
            tracing::warn!("claims: cannot remove {key}: {}", e.message);
        }
    }

    /// Drops the claim from this machine's book; whether it held one.
    fn forget(&self, hash: &str) -> bool {
        let mut own = self.lock();
        let had = own.held.remove(hash).is_some();
        if own.held.is_empty() {
            own.session = None;
        }
        had
    }

    /// The path is in the cache now (the drainer put it there, or found it there): its
    /// claim, if this machine holds one, ends.
    pub fn release(self: &Arc<Self>, hash: &str) {
        if !self.lock().held.contains_key(hash) {
            return;
        }
        let claims = self.clone();
        let hash = hash.to_owned();
        tokio::spawn(async move { claims.withdraw(&hash).await });
    }

    async fn wait_on(&self, hash: &str, on: &Claim, deadline: Instant) -> WaitEnd {
        let _waiting = Waiting::new(self, hash);
        let narinfo = format!("{hash}.narinfo");
        let mut beat = on.beat;
        let mut changed = Instant::now();
        loop {
            tokio::time::sleep(POLL).await;
            if Instant::now() >= deadline {
                return WaitEnd::TimedOut;
            }
            if let Ok(Some(body)) = self.target.read_small(&narinfo, MAX_NARINFO).await {
                return WaitEnd::Narinfo(body);
            }
            match self.read_claim(hash, &on.machine).await {
                Ok(Some(now)) if now.session == on.session => {
                    if now.beat != beat {
                        beat = now.beat;
                        changed = Instant::now();
                    }
                }
                Ok(_) => return WaitEnd::Gone,
                // A cache that cannot be read counts as a claim that does not change.
                Err(e) => tracing::debug!("claims: {}", e.message),
            }
            if changed.elapsed() >= self.opts.timeout {
                return WaitEnd::Expired;
            }
        }
    }

    /// Watches this machine's claims until `stop`: their builds (see the module doc) and
    /// their heartbeat.
    pub async fn run(
        self: Arc<Self>,
        store: Arc<Store>,
        state_dir: PathBuf,
        stop: CancellationToken,
    ) {
        let beat_every = (self.opts.timeout / 4).max(Duration::from_millis(250));
        let mut last_beat = Instant::now();
        let mut published: Option<ClaimsState> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(WATCH_EVERY) => {}
            }
            let state = self.state();
            if published.as_ref() != Some(&state) {
                // For `status`; tried again next time round.
                if crate::drain_state::write_claims(&state_dir, &state).is_ok() {
                    published = Some(state);
                }
            }
            let watched: Vec<(String, Option<StorePath>)> = self
                .lock()
                .held
                .iter()
                .map(|(h, c)| (h.clone(), c.path.clone()))
                .collect();
            if watched.is_empty() {
                continue;
            }
            let (store, dir) = (store.clone(), self.store_dir.clone());
            let seen = tokio::task::spawn_blocking(move || look_at_builds(&store, &dir, watched))
                .await
                .unwrap_or_default();
            // Built here and in the cache, but not through this machine's queue (its hook
            // is off, or another machine uploaded it first): nothing to wait for any more.
            for s in seen.iter().filter(|s| s.valid) {
                let narinfo = format!("{}.narinfo", s.hash);
                if let Ok(Some(_)) = self.target.object_size(&narinfo).await {
                    self.withdraw(&s.hash).await;
                }
            }
            for hash in self.ended(seen) {
                tracing::info!("{hash}: not built here after all; its claim ends");
                self.withdraw(&hash).await;
            }
            if last_beat.elapsed() >= beat_every {
                last_beat = Instant::now();
                let held: Vec<String> = self.lock().held.keys().cloned().collect();
                for hash in held {
                    if let Err(e) = self.claim(&hash).await {
                        tracing::warn!("claims: heartbeat of {hash}: {}", e.message);
                    }
                }
            }
        }
        // A stopped daemon leaves nothing for others to wait on.
        let held: Vec<String> = self.lock().held.keys().cloned().collect();
        for hash in held {
            self.withdraw(&hash).await;
        }
        let _ = crate::drain_state::write_claims(&state_dir, &self.state());
    }

    /// Books what [`look_at_builds`] saw; returns the claims that end.
    fn ended(&self, seen: Vec<Seen>) -> Vec<String> {
        let mut own = self.lock();
        let now = Instant::now();
        for s in &seen {
            if let Some(held) = own.held.get_mut(&s.hash) {
                if held.path.is_none() {
                    held.path = s.path.clone();
                }
                held.lock_seen |= s.locked;
            }
            if s.locked {
                own.last_building = Some(now);
            }
        }
        let idle = own
            .last_building
            .is_none_or(|at| now.duration_since(at) >= NEVER_BUILT_GRACE);
        let waiting = !own.waiting.is_empty();
        let failed = |s: &Seen, held: &Held| held.lock_seen && !s.locked && !s.valid;
        // A build that failed while nothing else builds here: Nix stopped (it builds
        // nothing after a failure unless told to keep going), so what it has not started
        // it never will, and others need not wait the grace for it.
        let stopped = !seen.iter().any(|s| s.locked)
            && seen
                .iter()
                .any(|s| own.held.get(&s.hash).is_some_and(|h| failed(s, h)));
        let mut out = Vec::new();
        for s in &seen {
            let Some(held) = own.held.get(&s.hash) else {
                continue;
            };
            let never = !held.lock_seen
                && !s.valid
                && !waiting
                && (stopped || (idle && now.duration_since(held.since) >= NEVER_BUILT_GRACE));
            if failed(s, held) || never {
                out.push(s.hash.clone());
            }
        }
        out
    }
}

/// The smallest of `claims` whose key is smaller than `mine`.
fn older_than(claims: &[Claim], mine: &ClaimKey) -> Option<Claim> {
    claims
        .iter()
        .filter(|c| c.key() < *mine)
        .min_by_key(|c| c.key())
        .cloned()
}

/// Counts a wait while it lasts, for `status`.
struct Waiting<'a> {
    claims: &'a Claims,
    hash: String,
}

impl<'a> Waiting<'a> {
    fn new(claims: &'a Claims, hash: &str) -> Waiting<'a> {
        let mut own = claims.lock();
        *own.waiting.entry(hash.to_owned()).or_default() += 1;
        own.waits += 1;
        Waiting {
            claims,
            hash: hash.to_owned(),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut own = self.claims.lock();
        if let Some(n) = own.waiting.get_mut(&self.hash) {
            *n -= 1;
            if *n == 0 {
                own.waiting.remove(&self.hash);
            }
        }
    }
}

/// What one look at a claimed path found.
#[derive(Debug, Default)]
struct Seen {
    hash: String,
    path: Option<StorePath>,
    locked: bool,
    valid: bool,
}

/// Looks at each claimed path: its name (from the store), whether it is valid, whether its
/// build lock is held. Blocking.
fn look_at_builds(
    store: &Store,
    store_dir: &Path,
    watched: Vec<(String, Option<StorePath>)>,
) -> Vec<Seen> {
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    watched
        .into_iter()
        .map(|(hash, path)| {
            let path = path.or_else(|| store.path_from_hash_part(&hash).ok().flatten());
            let (locked, valid) = match &path {
                Some(p) => (
                    lock_held(&locks, &store_dir.join(format!("{}.lock", p.base()))),
                    store.is_valid(p).unwrap_or(false),
                ),
                None => (false, false),
            };
            Seen {
                hash,
                path,
                locked,
                valid,
            }
        })
        .collect()
}

/// Whether `/proc/locks` (its text) shows a lock held on `file`. Reading the table takes no
/// lock itself: trying one would make Nix wait for it.
fn lock_held(locks: &str, file: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(file) else {
        // Nix deletes the lock file after a build that succeeded.
        return false;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    locked_in_table(locks, major, minor, meta.ino())
}

/// Whether the `/proc/locks` text has a lock on the inode `ino` of device `major:minor`.
fn locked_in_table(locks: &str, major: u32, minor: u32, ino: u64) -> bool {
    locks.lines().any(|line| {
        // `1: FLOCK  ADVISORY  WRITE 31152 fe:00:9576259 0 EOF`; a waiter's line has `->`.
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.get(1) == Some(&"->") {
            return false;
        }
        fields.iter().any(|f| {
            let mut parts = f.split(':');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(ma), Some(mi), Some(i), None) => {
                    u32::from_str_radix(ma, 16) == Ok(major)
                        && u32::from_str_radix(mi, 16) == Ok(minor)
                        && i.parse::<u64>() == Ok(ino)
                }
                _ => false,
            }
        })
    })
}

#[cfg(test)]
mod tests;
