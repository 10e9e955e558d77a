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
//! which come back in order, are matched to them. The pipeline hands this target a path
//! only after its references were answered, so a path never overtakes its references, even
//! on another connection. Connections are opened as concurrent requests need them, up to
//! `jobs`, and closed after [`IDLE`] without a request.
//!
//! # Failures
//!
//! The remote reports errors only on its stderr, then exits. So when a connection ends
//! early, the request being answered gets the remote's (or ssh's) last stderr line as its
//! error, with a hint where one helps; requests behind it on the same connection fail as
//! transient, to be retried on a new connection. Unreachable hosts are transient; a wrong
//! host key, a refused login, a missing `nix-store` and a refused signature need the
//! user, so they are [`Auth`](super::ErrorKind::Auth) errors: queued paths stay queued.
//! Every answer has a deadline (the `http-timeout` setting, times
//! [`ANSWER_TIMEOUT_FACTOR`](super::stall::ANSWER_TIMEOUT_FACTOR) after a request is
//! completely sent), every write one too, and what the remote sends is size-limited.

mod command;
mod conn;
mod errors;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, oneshot};

use super::{NarBody, NarFormat, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::serve::{self, AddToStoreNar};
use crate::format::store_path::StorePath;
use crate::store::PathInfo;
pub use command::SshSpec;
use conn::{Conn, Job, Reply, Request};

/// How long a connection may go without a request before it is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// The open connections.
#[derive(Default)]
struct Pool {
    conns: Vec<Arc<Conn>>,
    /// Connections being opened right now.
    opening: usize,
}

/// A host's store over ssh.
pub struct SshTarget {
    spec: Arc<SshSpec>,
    timeout: Duration,
    max_connections: usize,
    pool: Arc<Mutex<Pool>>,
    changed: Arc<Notify>,
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
        })
    }

    /// Sends `request` on a connection (opening one if every open one is busy and there is
    /// room) and waits for its answer.
    async fn call(&self, request: Request) -> Result<Reply, TargetError> {
        let (tx, rx) = oneshot::channel();
        let mut job = Some(Job { request, reply: tx });
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let connect = {
                let mut pool = self.lock_pool();
                pool.conns.retain(|c| !c.is_dead());
                let room = pool.conns.len() + pool.opening < self.max_connections;
                let best = pool.conns.iter().min_by_key(|c| c.load()).cloned();
                match best {
                    Some(conn) if conn.load() == 0 || !room => {
                        if let Some(job) = job.take()
                            && let Err(reply) = conn.submit(job)
                        {
                            let _ = reply.send(Err(self.lost("before the request went out")));
                        }
                        false
                    }
                    _ if room => {
                        pool.opening += 1;
                        true
                    }
                    _ => false,
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
        rx.await
            .unwrap_or_else(|_| Err(self.lost("before the remote answered")))
    }

    /// Opens a connection into the pool; the caller has counted it in `opening`.
    async fn add_connection(&self) -> Result<(), TargetError> {
        let opened = conn::connect(&self.spec, self.timeout, self.pool.clone()).await;
        let mut pool = self.lock_pool();
        pool.opening -= 1;
        let result = opened.map(|conn| pool.conns.push(conn));
        drop(pool);
        self.changed.notify_waiters();
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
        self.call(Request::Add {
            path: narinfo.store_path.clone(),
            header,
            nar: source.clone(),
        })
        .await
        .map(|_| ())
    }
}
