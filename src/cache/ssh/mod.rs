//! The `ssh://` target: adds paths to the Nix store of a host over ssh, as
//! `nix copy --to ssh://` does, through `nix-store --serve --write` on the far side.
//!
//! This is how paths reach a host that serves its own store with nix-serve or harmonia:
//! neither accepts uploads, so the paths have to become valid in that host's store.
//!
//! # URL
//!
//! `ssh://[user@]host[:port][?param=value&...]` with Nix's own parameters: `ssh-key` (a
//! private key file, `-i`), `base64-ssh-public-host-key` (the host's public key, base64 of
//! its `known_hosts` form; checked strictly against a known_hosts file of narpost's own),
//! `compress` (`true`: `ssh -C`), `remote-program` (default `nix-store`) and `remote-store`
//! (passed as `--store` on the remote). `NIX_SSHOPTS` goes in front of narpost's options,
//! as Nix puts it. The system `ssh` is run (so `~/.ssh/config`, agents and jump hosts work)
//! with `-x -a` and `BatchMode=yes`: it fails instead of waiting for a password or a
//! host key confirmation nobody will type.
//!
//! # Protocol
//!
//! [`format::serve`](crate::format::serve) has the framing. `missing` is one
//! QueryValidPaths with `lock` for the whole plan, so the paths the remote already has stay
//! alive there (temporary roots) while the connection lives. Each path is one AddToStoreNar
//! carrying narpost's signature and the NAR streamed from the store. Like Attic's upload,
//! that single request is the commit point, so this target does its work in `put_narinfo`
//! (where the signed metadata is at hand) and `put_nar` stores nothing.
//!
//! A connection is a writer task and a reader task around one `ssh` process: requests are
//! written as they come, without waiting for earlier answers (pipelining), and the answers,
//! which come back in order, are matched to them. The target declares ordered commits, so
//! the pipeline hands it a path as soon as its references are handed over: the path goes
//! on the connection that carries them (or waits while they are spread over several), so
//! the remote never sees it before them. Should a reference fail, the connection ends
//! and everything sent after it fails as transient; the pipeline then sends it again once
//! its references are stored. The remote checks references itself, so a path whose
//! reference is missing is refused, never stored. Connections are opened as concurrent requests need them, up to
//! `jobs`, and closed after [`IDLE`] without a request. What is in flight is bounded by
//! the wire, not by the pipeline's slots: up to [`MAX_IN_FLIGHT`] paths and
//! [`MAX_IN_FLIGHT_KIB`] of NAR between a path's hand-over and its answer, so a far host
//! gets requests back to back and the push costs about one round trip plus the remote's
//! own time.
//!
//! # Failures
//!
//! The remote reports errors only on its stderr, then exits. So when a connection ends
//! early, the request being answered gets the remote's (or ssh's) last stderr line as its
//! error, with a hint where one helps; requests behind it on the same connection fail as
//! transient, to be retried on a new connection. Unreachable hosts are transient; a wrong
//! host key, a refused login, a missing `nix-store` and a refused signature need the
//! user, so they are [`Auth`](super::ErrorKind::Auth) errors: queued paths stay queued.
//! Every answer has a deadline (the `io-timeout` setting, times
//! [`ANSWER_TIMEOUT_FACTOR`](super::stall::ANSWER_TIMEOUT_FACTOR) after a request is
//! completely sent), every write one too, and what the remote sends is size-limited.

mod command;
mod conn;
mod errors;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, Semaphore, oneshot};

use super::{Committing, NarBody, NarFormat, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::serve::{self, AddToStoreNar};
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
pub use command::SshSpec;
use conn::{Conn, Job, Reply, Request};

/// How long a connection may go without a request before it is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// Paths handed over and not answered yet, at most: the remote works through requests one
/// after another, so keeping the wire full takes as many as arrive in one round trip (at
/// 10 ms and a millisecond per tiny path, ten or so); this leaves room for far hosts.
const MAX_IN_FLIGHT: usize = 256;

/// NAR bytes handed over and not answered yet, at most, in KiB. The NARs are streamed from
/// the store as they go out, so this is not memory: it bounds what a connection that dies
/// takes down with it, to be sent again.
const MAX_IN_FLIGHT_KIB: usize = 64 << 10;

/// The open connections.
#[derive(Default)]
struct Pool {
    conns: Vec<Arc<Conn>>,
    /// Connections being opened right now.
    opening: usize,
    /// Paths handed over through `hand_over_narinfo` whose answer is still to come, and those
    /// whose answer was an error: what a referrer must go behind, or must not go out after.
    carrying: HashMap<StorePath, Carrier>,
    /// Numbers the hand-overs, so an answer settles only its own entry, never a later
    /// attempt's at the same path.
    handed: u64,
}

enum Carrier {
    /// In flight on this connection, as hand-over number `.1`.
    On(Arc<Conn>, u64),
    Failed,
}

/// Where a request may go, given the references it must follow.
enum Route {
    To(Arc<Conn>),
    Connect,
    Wait,
}

/// A host's store over ssh.
pub struct SshTarget {
    spec: Arc<SshSpec>,
    timeout: Duration,
    max_connections: usize,
    pool: Arc<Mutex<Pool>>,
    changed: Arc<Notify>,
    /// What is in flight, by count and by NAR KiB (see [`MAX_IN_FLIGHT`]): a path's
    /// permits are held from its hand-over to its answer.
    in_flight: Arc<Semaphore>,
    in_flight_kib: Arc<Semaphore>,
}

impl SshTarget {
    /// `timeout`: how long a write may make no progress, and (times the answer factor) how
    /// long an answer may take; `jobs`: the most connections at once.
    pub fn new(
        url: &str,
        sshopts: Option<&str>,
        timeout: Duration,
        jobs: usize,
    ) -> Result<Self, TargetError> {
        let spec = SshSpec::parse(url, sshopts, timeout.min(Duration::from_secs(30)))?;
        Ok(SshTarget {
            spec: Arc::new(spec),
            timeout,
            max_connections: jobs.max(1),
            pool: Arc::default(),
            changed: Arc::new(Notify::new()),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            in_flight_kib: Arc::new(Semaphore::new(MAX_IN_FLIGHT_KIB)),
        })
    }

    /// Sends `request` on a connection (opening one if every open one is busy and there is
    /// room) and waits for its answer.
    async fn call(&self, request: Request) -> Result<Reply, TargetError> {
        self.submit(request, &[])
            .await?
            .answer
            .await
            .unwrap_or_else(|_| Err(self.lost("before the remote answered")))
    }

    /// Hands `request` to a connection and returns where its answer will come. A request
    /// that must follow paths still in flight (`after`) goes on their connection, so the
    /// remote sees it after them; while they are spread over several connections, or on
    /// one that died, it waits for their answers (sent elsewhere, it would reach the remote
    /// before them, be refused and take that connection down). After one whose answer was
    /// an error it does not go out at all: the remote would refuse it for the missing
    /// reference and end the connection, failing every other request on it.
    async fn submit(&self, request: Request, after: &[StorePath]) -> Result<Handed, TargetError> {
        let (tx, rx) = oneshot::channel();
        let path = match &request {
            Request::Add { path, .. } => Some(path.clone()),
            Request::QueryValid(_) => None,
        };
        let mut job = Some(Job { request, reply: tx });
        let mut number = None;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let connect = {
                let mut pool = self.lock_pool();
                pool.conns.retain(|c| !c.is_dead());
                let route = match self.route(&pool, after) {
                    Ok(route) => route,
                    Err(reference) => {
                        return Err(TargetError::transient(format!(
                            "{}: not sent, because its reference {reference} was not stored",
                            self.spec.label
                        )));
                    }
                };
                match route {
                    Route::To(conn) => {
                        if let Some(job) = job.take() {
                            // Entered even if the connection is gone already: the pipeline
                            // lets referrers go once this returns, and they must find it
                            // (failed, once its answer is in), not an empty place.
                            if let Some(path) = &path {
                                pool.handed += 1;
                                let n = pool.handed;
                                pool.carrying
                                    .insert(path.clone(), Carrier::On(conn.clone(), n));
                                number = Some(n);
                            }
                            if let Err(reply) = conn.submit(job) {
                                let _ = reply.send(Err(self.lost("before the request went out")));
                            }
                        }
                        false
                    }
                    Route::Connect => {
                        pool.opening += 1;
                        true
                    }
                    Route::Wait => false,
                }
            };
            if job.is_none() {
                break;
            }
            if connect {
                self.add_connection().await?;
            } else {
                notified.await;
            }
        }
        Ok(Handed { answer: rx, number })
    }

    /// Where a request that must follow `after` goes now; `Err` names a reference whose
    /// answer was an error.
    fn route<'a>(&self, pool: &Pool, after: &'a [StorePath]) -> Result<Route, &'a StorePath> {
        let mut carriers: Vec<&Arc<Conn>> = Vec::new();
        for reference in after {
            match pool.carrying.get(reference) {
                Some(Carrier::Failed) => return Err(reference),
                Some(Carrier::On(conn, _)) if !carriers.iter().any(|c| Arc::ptr_eq(c, conn)) => {
                    carriers.push(conn)
                }
                _ => {}
            }
        }
        match carriers.as_slice() {
            [conn] if !conn.is_dead() => return Ok(Route::To(Arc::clone(conn))),
            [] => {}
            // Several carriers, or one whose connection died: their answers (a dead
            // connection fails what it still holds) settle them and wake this request.
            _ => return Ok(Route::Wait),
        }
        let room = pool.conns.len() + pool.opening < self.max_connections;
        let best = pool.conns.iter().min_by_key(|c| c.load()).cloned();
        Ok(match best {
            Some(conn) if conn.load() == 0 || !room => Route::To(conn),
            _ if room => Route::Connect,
            _ => Route::Wait,
        })
    }

    /// Opens a connection into the pool; the caller has counted it in `opening`.
    async fn add_connection(&self) -> Result<(), TargetError> {
        let opening = Opening(self);
        let opened = conn::connect(&self.spec, self.timeout, self.pool.clone()).await;
        let result = opened.map(|conn| self.lock_pool().conns.push(conn));
        drop(opening);
        result
    }

    fn lock_pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lost(&self, when: &str) -> TargetError {
        TargetError::transient(format!(
            "{}: the ssh connection closed {when}",
            self.spec.label
        ))
    }
}

#[async_trait]
impl Target for SshTarget {
    fn url(&self) -> String {
        self.spec.url.clone()
    }

    fn nar_format(&self) -> NarFormat {
        NarFormat::Raw
    }

    fn leaves_upstream_paths(&self) -> bool {
        false
    }

    async fn open(&self) -> Result<(), TargetError> {
        {
            let mut pool = self.lock_pool();
            if pool.conns.iter().any(|c| !c.is_dead()) {
                return Ok(());
            }
            pool.opening += 1;
        }
        self.add_connection().await
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        if paths.is_empty() {
            return Ok(HashSet::new());
        }
        let asked: Vec<String> = paths.iter().map(|p| p.path.to_absolute()).collect();
        let Reply::Valid(valid) = self.call(Request::QueryValid(asked)).await? else {
            return Err(TargetError::permanent(format!(
                "{}: the answer to QueryValidPaths was of the wrong kind",
                self.spec.label
            )));
        };
        let valid: HashSet<String> = valid.into_iter().collect();
        // A new plan: what failed before is either valid now or will be sent again.
        self.lock_pool()
            .carrying
            .retain(|_, carrier| matches!(carrier, Carrier::On(..)));
        Ok(paths
            .iter()
            .filter(|p| !valid.contains(&p.path.to_absolute()))
            .map(|p| p.path.clone())
            .collect())
    }

    async fn put_nar(&self, _nar: &PreparedNar) -> Result<String, TargetError> {
        // The NAR goes with the signed metadata in put_narinfo, in one request.
        Ok(String::new())
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, nar: &PreparedNar) -> Result<(), TargetError> {
        self.hand_over_narinfo(narinfo, nar).await?.await
    }

    fn ordered_commits(&self) -> bool {
        // Each connection's requests are applied in the order they were written, one
        // failing ends the connection and with it everything sent after it, and `submit`
        // puts a path on the connection carrying its references.
        true
    }

    async fn hand_over_narinfo(
        &self,
        narinfo: &NarInfo,
        nar: &PreparedNar,
    ) -> Result<Committing, TargetError> {
        let request = self.add_request(narinfo, nar)?;
        let after: Vec<StorePath> = narinfo
            .references
            .iter()
            .filter(|r| **r != narinfo.store_path)
            .cloned()
            .collect();
        // A NAR larger than the whole bound goes alone, once everything before it is in.
        let kib = (narinfo.nar_size.div_ceil(1024) as usize).clamp(1, MAX_IN_FLIGHT_KIB) as u32;
        let closed =
            || TargetError::permanent(format!("{}: the target was closed", self.spec.label));
        let counted = self
            .in_flight
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| closed())?;
        let sized = self
            .in_flight_kib
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| closed())?;
        let Handed { answer, number } = self.submit(request, &after).await?;
        let settle = Settle {
            pool: self.pool.clone(),
            changed: self.changed.clone(),
            path: narinfo.store_path.clone(),
            number: number.unwrap_or_default(),
            stored: false,
        };
        let lost = self.lost("before the remote answered");
        Ok(Box::pin(async move {
            let mut settle = settle;
            let result = answer.await.unwrap_or(Err(lost)).map(|_| ());
            settle.stored = result.is_ok();
            drop((counted, sized));
            result
        }))
    }
}

impl SshTarget {
    fn add_request(&self, narinfo: &NarInfo, nar: &PreparedNar) -> Result<Request, TargetError> {
        let NarBody::Raw(source) = &nar.body else {
            return Err(TargetError::permanent(format!(
                "{}: ssh target was handed a compressed NAR for {}",
                self.spec.url, narinfo.store_path
            )));
        };
        let request = AddToStoreNar {
            path: narinfo.store_path.to_absolute(),
            deriver: narinfo
                .deriver
                .as_ref()
                .map(StorePath::to_absolute)
                .unwrap_or_default(),
            nar_hash_hex: narinfo.nar_hash.to_hex(),
            references: narinfo
                .references
                .iter()
                .map(StorePath::to_absolute)
                .collect(),
            registration_time: 0,
            nar_size: narinfo.nar_size,
            ultimate: false,
            sigs: narinfo.sigs.clone(),
            ca: narinfo.ca.clone().unwrap_or_default(),
        };
        let mut header = Vec::new();
        serve::write_add_to_store_nar(&mut header, &request).map_err(|e| {
            TargetError::permanent(format!("{}: cannot encode the request: {e}", request.path))
        })?;
        Ok(Request::Add {
            path: narinfo.store_path.clone(),
            header,
            nar: source.clone(),
        })
    }
}

/// A connection being opened, counted in [`Pool::opening`] until this is dropped: also when
/// the caller is dropped midway (a push cut short), or the count would hold that room for
/// good.
struct Opening<'a>(&'a SshTarget);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        let mut pool = self.0.lock_pool();
        pool.opening = pool.opening.saturating_sub(1);
        drop(pool);
        self.0.changed.notify_waiters();
    }
}

/// Settles a queued path's entry in the pool once its answer is in (or nobody waits for
/// it any more): gone when stored, marked failed otherwise (unless a later attempt's entry
/// took its place), and waiting referrers woken.
struct Settle {
    pool: Arc<Mutex<Pool>>,
    changed: Arc<Notify>,
    path: StorePath,
    /// The hand-over's number.
    number: u64,
    stored: bool,
}

impl Drop for Settle {
    fn drop(&mut self) {
        let mut pool = self.pool.lock().unwrap_or_else(|e| e.into_inner());
        let own = matches!(
            pool.carrying.get(&self.path),
            Some(Carrier::On(_, n)) if *n == self.number
        );
        if self.stored {
            // Stored is stored, whichever attempt is in flight too.
            pool.carrying.remove(&self.path);
        } else if own {
            // Only this hand-over's own entry: a later attempt in flight, or one that
            // stored the path meanwhile, says more than this failure.
            pool.carrying.insert(self.path.clone(), Carrier::Failed);
        }
        drop(pool);
        self.changed.notify_waiters();
    }
}

/// A request handed to a connection: where its answer comes, and (for a path) the number
/// its entry in [`Pool::carrying`] has.
struct Handed {
    answer: oneshot::Receiver<Result<Reply, TargetError>>,
    number: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt as _;

    fn path(name: &str) -> StorePath {
        StorePath::from_absolute(&format!("/nix/store/{}-{name}", "1".repeat(32)))
            .expect("test path")
    }

    fn target() -> SshTarget {
        SshTarget::new("ssh://cache", None, Duration::from_secs(5), 4).expect("target")
    }

    /// Enters `path` as in flight on `conn`, the way `submit` does, and returns what
    /// settles it.
    fn carry(target: &SshTarget, path: &StorePath, conn: &Arc<Conn>) -> Settle {
        let mut pool = target.lock_pool();
        pool.handed += 1;
        let number = pool.handed;
        pool.carrying
            .insert(path.clone(), Carrier::On(conn.clone(), number));
        Settle {
            pool: target.pool.clone(),
            changed: target.changed.clone(),
            path: path.clone(),
            number,
            stored: false,
        }
    }

    fn query(paths: &[&StorePath]) -> Request {
        Request::QueryValid(paths.iter().map(|p| p.to_absolute()).collect())
    }

    /// A reference on a connection that died before its answer settled: a referrer sent on
    /// another connection would reach the remote before the reference was stored there and
    /// be refused, taking that connection down. It waits, and goes once the answer is in.
    #[tokio::test]
    async fn a_request_waits_while_its_reference_is_on_a_dead_connection() {
        let target = Arc::new(target());
        let (dying, dying_r, dying_w) = conn::test_connection(Duration::from_secs(5));
        let (live, mut live_r, _live_w) = conn::test_connection(Duration::from_secs(5));
        target.lock_pool().conns = vec![dying.clone(), live.clone()];
        let reference = path("reference");
        let mut settle = carry(&target, &reference, &dying);
        drop((dying_r, dying_w));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !dying.is_dead() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the connection notices its remote is gone");

        let referrer = path("referrer");
        let sending = {
            let target = target.clone();
            let reference = reference.clone();
            tokio::spawn(async move {
                target
                    .submit(query(&[&referrer]), &[reference])
                    .await
                    .map(|_| ())
            })
        };
        let mut buf = [0u8; 8];
        let early = tokio::time::timeout(Duration::from_millis(300), live_r.read(&mut buf)).await;
        assert!(early.is_err(), "sent before its reference's answer was in");
        assert!(!sending.is_finished());

        settle.stored = true;
        drop(settle);
        tokio::time::timeout(Duration::from_secs(5), sending)
            .await
            .expect("sent once the reference is stored")
            .expect("task")
            .expect("submit");
        let read = tokio::time::timeout(Duration::from_secs(5), live_r.read(&mut buf))
            .await
            .expect("the request reaches the live connection")
            .expect("read");
        assert!(read > 0);
    }

    #[tokio::test]
    async fn a_request_behind_references_on_two_connections_waits_for_one_of_them() {
        let target = Arc::new(target());
        let (a, _a_r, _a_w) = conn::test_connection(Duration::from_secs(5));
        let (b, mut b_r, _b_w) = conn::test_connection(Duration::from_secs(5));
        target.lock_pool().conns = vec![a.clone(), b.clone()];
        let (x, z) = (path("x"), path("z"));
        let mut on_a = carry(&target, &x, &a);
        let _on_b = carry(&target, &z, &b);
        let sending = {
            let (target, x, z) = (target.clone(), x.clone(), z.clone());
            tokio::spawn(async move {
                target
                    .submit(query(&[&path("y")]), &[x, z])
                    .await
                    .map(|_| ())
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !sending.is_finished(),
            "went out with its references on two connections"
        );
        on_a.stored = true;
        drop(on_a);
        tokio::time::timeout(Duration::from_secs(5), sending)
            .await
            .expect("sent once one carrier is left")
            .expect("task")
            .expect("submit");
        // Behind z, on z's connection.
        let mut buf = [0u8; 8];
        let read = tokio::time::timeout(Duration::from_secs(5), b_r.read(&mut buf))
            .await
            .expect("the request goes on the connection carrying z")
            .expect("read");
        assert!(read > 0);
    }

    #[tokio::test]
    async fn a_request_behind_a_failed_reference_is_not_sent_and_a_stale_answer_changes_nothing() {
        let target = target();
        let (a, mut a_r, _a_w) = conn::test_connection(Duration::from_secs(5));
        target.lock_pool().conns = vec![a.clone()];
        let x = path("x");
        let first = carry(&target, &x, &a);
        // A second attempt is in flight when the first one's failure comes in late: the
        // second one's entry stands, and a referrer goes behind it.
        let second = carry(&target, &x, &a);
        drop(first);
        assert!(matches!(
            target.lock_pool().carrying.get(&x),
            Some(Carrier::On(_, n)) if *n == second.number
        ));
        drop(second);
        let e = match target
            .submit(query(&[&path("y")]), std::slice::from_ref(&x))
            .await
        {
            Err(e) => e,
            Ok(_) => panic!("sent behind a reference that failed"),
        };
        assert!(e.is_retryable(), "{e}");
        let mut buf = [0u8; 8];
        let nothing = tokio::time::timeout(Duration::from_millis(200), a_r.read(&mut buf)).await;
        assert!(nothing.is_err(), "something went out");
    }
}
