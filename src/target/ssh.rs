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

use std::collections::{HashSet, VecDeque};
use std::ffi::OsString;
use std::io::Write as _;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use futures::StreamExt as _;
use reqwest::Url;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, timeout};

use super::stall::ANSWER_TIMEOUT_FACTOR;
use super::{NarBody, NarFormat, PreparedNar, Target, TargetError};
use crate::dump::NarSource;
use crate::format::narinfo::NarInfo;
use crate::format::serve::{self, AddToStoreNar, ServeError};
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

/// How long a connection may go without a request before it is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// Longest string accepted from the remote: a store path is at most 255 bytes.
const MAX_PATH_LEN: u64 = 1024;
/// Stderr lines kept per connection, and the length each is cut to.
const STDERR_LINES: usize = 20;
const STDERR_LINE_LEN: usize = 500;

/// What the URL says, turned into the `ssh` command line.
#[derive(Debug)]
pub struct SshSpec {
    /// The URL as given (it holds no secret: keys are files).
    pub url: String,
    /// `[user@]host[:port]`, for messages.
    pub label: String,
    /// Arguments after `ssh`, ending with the destination and the remote command.
    pub args: Vec<OsString>,
    /// Whether the host key is pinned by the URL (for the hint on a mismatch).
    pub pinned_host_key: bool,
    /// narpost's own known_hosts file; deleted with the target.
    _known_hosts: Option<tempfile::NamedTempFile>,
}

/// The single quotes Nix puts around `--store`'s value for the remote shell.
fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl SshSpec {
    /// Parses the URL; `sshopts` is `NIX_SSHOPTS`; `connect_timeout` goes to ssh's
    /// `ConnectTimeout`.
    pub fn parse(
        input: &str,
        sshopts: Option<&str>,
        connect_timeout: Duration,
    ) -> Result<SshSpec, TargetError> {
        let bad = |what: String| {
            TargetError::permanent(format!("{input}: {what}")).with_hint(
                "an ssh cache URL looks like ssh://[user@]host[:port]?ssh-key=/path/to/key",
            )
        };
        let url = Url::parse(input).map_err(|e| bad(format!("not a URL: {e}")))?;
        if url.scheme() != "ssh" {
            return Err(bad("not an ssh:// URL".into()));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("no host".into()))?
            .to_string();
        if host.starts_with('-') {
            return Err(bad(format!("{host:?} is not a host name")));
        }
        if url.password().is_some() {
            return Err(bad(
                "passwords do not go in the URL; use a key (ssh-key=) or an ssh agent".into(),
            ));
        }
        if !matches!(url.path(), "" | "/") || url.fragment().is_some() {
            return Err(bad(
                "unexpected path or #fragment after the host; the remote store is given with ?remote-store=".into(),
            ));
        }
        let user = url.username().to_string();
        let destination = if user.is_empty() {
            host.clone()
        } else {
            format!("{user}@{host}")
        };
        let port = url.port();
        let label = match port {
            Some(p) => format!("{destination}:{p}"),
            None => destination.clone(),
        };

        let mut key = None;
        let mut host_key = None;
        let mut compress = false;
        let mut program = "nix-store".to_string();
        let mut store = None;
        for (name, value) in url.query_pairs() {
            match &*name {
                "ssh-key" => key = Some(value.into_owned()),
                "base64-ssh-public-host-key" => host_key = Some(value.into_owned()),
                "compress" => {
                    compress = match &*value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(bad(format!("compress={other}: expected true or false")));
                        }
                    }
                }
                "remote-program" if !value.trim().is_empty() => program = value.into_owned(),
                "remote-store" if !value.is_empty() => store = Some(value.into_owned()),
                "remote-program" | "remote-store" => {
                    return Err(bad(format!("{name} is empty")));
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: ssh-key, base64-ssh-public-host-key, compress, remote-program, remote-store)"
                    )));
                }
            }
        }

        let mut args: Vec<OsString> = vec!["-x".into(), "-a".into()];
        if let Some(opts) = sshopts.filter(|s| !s.trim().is_empty()) {
            let split = shlex::split(opts).ok_or_else(|| {
                TargetError::permanent(format!("NIX_SSHOPTS={opts:?}: unbalanced quotes"))
                    .with_hint("NIX_SSHOPTS holds ssh options as a shell would split them")
            })?;
            args.extend(split.into_iter().map(OsString::from));
        }
        if let Some(key) = &key {
            args.push("-i".into());
            args.push(key.into());
        }
        let known_hosts = match &host_key {
            Some(encoded) => {
                let decoded =
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .filter(|k| k.split_whitespace().count() >= 2)
                        .ok_or_else(|| {
                            bad("base64-ssh-public-host-key is not the base64 of a public key line \
                             (like `ssh-ed25519 AAAA...`)".into())
                        })?;
                // The name ssh looks the key up under: `[host]:port` off port 22.
                let name = match port {
                    Some(p) if p != 22 => format!("[{host}]:{p}"),
                    _ => host.clone(),
                };
                let mut file = tempfile::Builder::new()
                    .prefix("narpost-known-hosts-")
                    .tempfile()
                    .map_err(|e| {
                        TargetError::permanent(format!(
                            "{input}: cannot write a known_hosts file for the host key: {e}"
                        ))
                    })?;
                writeln!(file, "{name} {}", decoded.trim())
                    .and_then(|_| file.flush())
                    .map_err(|e| {
                        TargetError::permanent(format!(
                            "{input}: cannot write a known_hosts file for the host key: {e}"
                        ))
                    })?;
                let mut opt = OsString::from("-oUserKnownHostsFile=");
                opt.push(file.path());
                args.push(opt);
                args.push("-oStrictHostKeyChecking=yes".into());
                Some(file)
            }
            None => None,
        };
        if compress {
            args.push("-C".into());
        }
        if let Some(p) = port {
            args.push("-p".into());
            args.push(p.to_string().into());
        }
        args.push("-oBatchMode=yes".into());
        args.push(format!("-oConnectTimeout={}", connect_timeout.as_secs().max(1)).into());
        args.push("--".into());
        args.push(destination.into());
        let mut command = format!("{program} --serve --write");
        if let Some(store) = &store {
            command.push_str(" --store ");
            command.push_str(&shell_escape(store));
        }
        args.push(command.into());
        Ok(SshSpec {
            url: input.to_string(),
            label,
            args,
            pinned_host_key: known_hosts.is_some(),
            _known_hosts: known_hosts,
        })
    }
}

/// A request and where its answer goes.
struct Job {
    request: Request,
    reply: oneshot::Sender<Result<Reply, TargetError>>,
}

enum Request {
    QueryValid(Vec<String>),
    Add {
        path: StorePath,
        header: Vec<u8>,
        nar: NarSource,
    },
}

enum Reply {
    Valid(Vec<String>),
    Added,
}

/// What the reader expects next, in the order the requests went out.
struct Pending {
    answer: Answer,
    reply: oneshot::Sender<Result<Reply, TargetError>>,
}

enum Answer {
    /// A path set of at most this many paths.
    Valid(u64),
    Added,
}

/// The last lines ssh or the remote wrote to stderr.
#[derive(Default)]
struct StderrTail(VecDeque<String>);

impl StderrTail {
    fn push(&mut self, line: &str) {
        let clean: String = line
            .chars()
            .filter(|c| !c.is_control())
            .take(STDERR_LINE_LEN)
            .collect();
        let clean = clean.trim();
        if clean.is_empty() {
            return;
        }
        if self.0.len() == STDERR_LINES {
            self.0.pop_front();
        }
        self.0.push_back(clean.to_string());
    }
}

/// One `ssh` process speaking the serve protocol.
struct Conn {
    jobs: mpsc::UnboundedSender<Job>,
    inflight: AtomicUsize,
    dead: AtomicBool,
}

impl Conn {
    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed) || self.jobs.is_closed()
    }
}

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
                let best = pool
                    .conns
                    .iter()
                    .min_by_key(|c| c.inflight.load(Ordering::Relaxed))
                    .cloned();
                match best {
                    Some(conn) if conn.inflight.load(Ordering::Relaxed) == 0 || !room => {
                        conn.inflight.fetch_add(1, Ordering::Relaxed);
                        if let Some(job) = job.take()
                            && let Err(mpsc::error::SendError(job)) = conn.jobs.send(job)
                        {
                            let _ = job
                                .reply
                                .send(Err(self.lost("before the request went out")));
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
                let opened = self.connect().await;
                let mut pool = self.lock_pool();
                pool.opening -= 1;
                let result = opened.map(|conn| pool.conns.push(conn));
                drop(pool);
                self.changed.notify_waiters();
                result?;
            } else {
                notified.await;
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(self.lost("before the remote answered")))
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

    /// Starts `ssh`, greets the remote and starts the connection's tasks.
    async fn connect(&self) -> Result<Arc<Conn>, TargetError> {
        let spec = &self.spec;
        let mut child = tokio::process::Command::new("ssh")
            .args(&spec.args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                TargetError::auth(format!("{}: cannot run ssh: {e}", spec.url))
                    .with_hint("install the OpenSSH client (Debian: openssh-client)")
            })?;
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(TargetError::permanent(format!(
                "{}: ssh started without its pipes",
                spec.url
            )));
        };
        let tail: Arc<Mutex<StderrTail>> = Arc::default();
        let stderr_done = tokio::spawn(collect_stderr(stderr, tail.clone()));
        let mut remote = Remote {
            spec: spec.clone(),
            child: Some(child),
            tail,
            stderr_done: Some(stderr_done),
        };
        let mut stdin = stdin;
        let mut stdout = stdout;
        let mut hello = Vec::new();
        let greeted = async {
            serve::write_hello(&mut hello).map_err(ServeError::Io)?;
            stdin.write_all(&hello).await?;
            stdin.flush().await?;
            let mut buf = Vec::new();
            read_frame(&mut stdout, &mut buf, 16, |r| serve::read_hello(r)).await
        };
        let wait = self.timeout * ANSWER_TIMEOUT_FACTOR;
        let failure = match timeout(wait, greeted).await {
            Ok(Ok(_version)) => None,
            Ok(Err(ServeError::NotServe(text))) => Some(Failure::Garbage(text)),
            Ok(Err(ServeError::TooOld { major, minor })) => {
                return Err(TargetError::auth(format!(
                    "{}: the remote speaks serve protocol {major}.{minor}, too old to push to",
                    spec.label
                ))
                .with_hint("Nix 2.1 or later is needed on the host"));
            }
            Ok(Err(e)) => Some(Failure::Io(e.to_string())),
            Err(_) => Some(Failure::Timeout(wait)),
        };
        if let Some(failure) = failure {
            return Err(remote.fail(failure, "connecting").await);
        }
        Ok(start(
            stdin,
            stdout,
            remote,
            self.pool.clone(),
            self.timeout,
        ))
    }
}

/// The process behind a connection, and what it said on stderr.
struct Remote {
    spec: Arc<SshSpec>,
    child: Option<tokio::process::Child>,
    tail: Arc<Mutex<StderrTail>>,
    stderr_done: Option<tokio::task::JoinHandle<()>>,
}

/// How a connection ended before it should have.
enum Failure {
    /// The remote closed its end.
    Eof,
    Io(String),
    Timeout(Duration),
    Garbage(String),
    Protocol(String),
}

impl Remote {
    /// Ends the process (if it still runs) and turns what it said into one error.
    async fn fail(&mut self, failure: Failure, during: &str) -> TargetError {
        let status = match self.child.take() {
            Some(mut child) => {
                if !matches!(failure, Failure::Eof) {
                    let _ = child.start_kill();
                }
                match timeout(Duration::from_secs(5), child.wait()).await {
                    Ok(Ok(status)) => Some(status),
                    _ => {
                        let _ = child.start_kill();
                        None
                    }
                }
            }
            None => None,
        };
        if let Some(done) = self.stderr_done.take() {
            let _ = timeout(Duration::from_secs(2), done).await;
        }
        let lines: Vec<String> = self
            .tail
            .lock()
            .map(|t| t.0.iter().cloned().collect())
            .unwrap_or_default();
        classify(&self.spec, &lines, status, &failure, during)
    }
}

async fn collect_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<StderrTail>>) {
    // Lines are read through a bounded buffer: a remote that writes endless stderr costs
    // time, never memory.
    let mut reader = tokio::io::BufReader::with_capacity(8 * 1024, stderr);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = (&mut reader)
            .take(64 * 1024)
            .read_until(b'\n', &mut line)
            .await;
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                tracing::debug!("ssh: {}", text.trim_end());
                if let Ok(mut t) = tail.lock() {
                    t.push(&text);
                }
            }
        }
    }
}

/// Turns the end of a connection into one line naming the host, with a hint.
fn classify(
    spec: &SshSpec,
    lines: &[String],
    status: Option<ExitStatus>,
    failure: &Failure,
    during: &str,
) -> TargetError {
    let host = &spec.label;
    let find = |needles: &[&str]| {
        lines
            .iter()
            .rev()
            .find(|l| needles.iter().any(|n| l.contains(n)))
            .cloned()
    };
    if let Some(line) = find(&[
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key is known for",
    ]) {
        let hint = if spec.pinned_host_key {
            format!(
                "base64-ssh-public-host-key in the cache URL is not {host}'s key; get it with \
                 `ssh-keyscan` from a trusted network and base64-encode the line"
            )
        } else {
            format!(
                "add {host}'s key to known_hosts (ssh-keyscan, from a trusted network), or pin \
                 it with base64-ssh-public-host-key in the cache URL"
            )
        };
        let unknown = lines.iter().any(|l| l.contains("host key is known for"));
        let what = if unknown {
            "the host's key is not known here"
        } else {
            "the host's key is not the one expected"
        };
        return TargetError::auth(format!("{host}: {what} (ssh: {line})")).with_hint(hint);
    }
    if let Some(line) = find(&["Permission denied", "Too many authentication failures"]) {
        return TargetError::auth(format!("{host}: ssh login refused ({line})")).with_hint(
            "check ssh-key in the cache URL, and that its public key is authorized on the host \
             (nix.sshServe.keys on NixOS)",
        );
    }
    if let Some(line) = find(&["lacks a valid signature", "lacks a signature"]) {
        return TargetError::auth(format!(
            "{host}: the remote refused the path: {}",
            strip_error(&line)
        ))
        .with_hint(format!(
            "add narpost's public key to trusted-public-keys in {host}'s nix.conf, or make the \
                 ssh user a trusted user there (trusted-users; nix.sshServe.trusted on NixOS)"
        ));
    }
    if let Some(line) = find(&[
        "command not found",
        "No such file or directory",
        "not found",
    ]) {
        return TargetError::auth(format!("{host}: {}", strip_error(&line))).with_hint(
            "set remote-program in the cache URL to the nix-store program on the host \
             (for example ?remote-program=/nix/var/nix/profiles/default/bin/nix-store)",
        );
    }
    if let Some(line) = find(&[
        "Connection refused",
        "No route to host",
        "timed out",
        "Could not resolve hostname",
        "Network is unreachable",
        "Name or service not known",
        "Temporary failure in name resolution",
        "Connection reset",
        "Connection closed",
        "kex_exchange_identification",
    ]) {
        return TargetError::transient(format!("{host}: cannot reach the host: {line}"))
            .with_hint(format!("check that {host} is up and its sshd reachable"));
    }
    let said = lines.last().map(|l| strip_error(l));
    let what = match failure {
        Failure::Eof => "the connection closed".to_string(),
        Failure::Io(e) => format!("the connection failed ({e})"),
        Failure::Timeout(d) => format!("no answer for {}s", d.as_secs()),
        Failure::Garbage(text) => {
            format!("the remote is not a nix-store --serve (it sent {text:?})")
        }
        Failure::Protocol(e) => format!("protocol error: {e}"),
    };
    let exit = status
        .and_then(|s| s.code())
        .map(|c| format!(", exit status {c}"))
        .unwrap_or_default();
    let message = match said {
        Some(said) => format!("{host}: {said} ({what} while {during}{exit})"),
        None => format!("{host}: {what} while {during}{exit}"),
    };
    match failure {
        Failure::Garbage(_) => TargetError::auth(message).with_hint(
            "the remote login prints text before nix-store starts; keep the forced command's \
             shell quiet",
        ),
        Failure::Protocol(_) => TargetError::permanent(message),
        _ => TargetError::transient(message),
    }
}

/// `error: cannot add ...` is shown without Nix's prefix.
fn strip_error(line: &str) -> String {
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

/// Reads one framed value: more bytes are read into `buf` until `decode` stops saying
/// [`ServeError::Truncated`]; `max` bounds `buf`. The bytes after the value stay in `buf`.
async fn read_frame<R: AsyncRead + Unpin, T>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    decode: impl Fn(&mut &[u8]) -> Result<T, ServeError>,
) -> Result<T, ServeError> {
    loop {
        if let Some(value) = try_decode(buf, &decode)? {
            return Ok(value);
        }
        if buf.len() >= max {
            return Err(ServeError::TooLong {
                what: "answer",
                len: buf.len() as u64,
                max: max as u64,
            });
        }
        buf.reserve(8 * 1024);
        if reader.read_buf(buf).await? == 0 {
            return Err(ServeError::Truncated);
        }
    }
}

fn try_decode<T>(
    buf: &mut Vec<u8>,
    decode: &impl Fn(&mut &[u8]) -> Result<T, ServeError>,
) -> Result<Option<T>, ServeError> {
    let mut rest: &[u8] = buf;
    match decode(&mut rest) {
        Ok(value) => {
            let used = buf.len() - rest.len();
            buf.drain(..used);
            Ok(Some(value))
        }
        Err(ServeError::Truncated) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The most bytes an answer to `answer` may take.
fn answer_limit(answer: &Answer) -> usize {
    match answer {
        Answer::Added => 8,
        Answer::Valid(n) => 8 + (*n as usize).saturating_mul(16 + MAX_PATH_LEN as usize),
    }
}

fn decode_answer(answer: &Answer, r: &mut &[u8]) -> Result<Reply, ServeError> {
    match answer {
        Answer::Added => serve::read_add_to_store_nar_reply(r).map(|()| Reply::Added),
        Answer::Valid(n) => serve::read_strings(r, *n, MAX_PATH_LEN).map(Reply::Valid),
    }
}

/// Starts the writer and reader tasks of a greeted connection.
fn start<W, R>(
    stdin: W,
    stdout: R,
    remote: Remote,
    pool: Arc<Mutex<Pool>>,
    timeout: Duration,
) -> Arc<Conn>
where
    W: AsyncWrite + Unpin + Send + 'static,
    R: AsyncRead + Unpin + Send + 'static,
{
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    let conn = Arc::new(Conn {
        jobs: jobs_tx,
        inflight: AtomicUsize::new(0),
        dead: AtomicBool::new(false),
    });
    let (pending_tx, pending_rx) = mpsc::unbounded_channel();
    let abort = Arc::new(Notify::new());
    let label = remote.spec.label.clone();
    tokio::spawn(writer(
        stdin,
        jobs_rx,
        pending_tx,
        conn.clone(),
        pool,
        abort.clone(),
        timeout,
        label,
    ));
    tokio::spawn(reader(
        stdout,
        pending_rx,
        conn.clone(),
        remote,
        abort,
        timeout,
    ));
    conn
}

/// Writes requests as they come, each right after the previous one, and hands each to the
/// reader once it is completely sent.
#[allow(clippy::too_many_arguments)]
async fn writer<W: AsyncWrite + Unpin>(
    mut stdin: W,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    pending: mpsc::UnboundedSender<Pending>,
    conn: Arc<Conn>,
    pool: Arc<Mutex<Pool>>,
    abort: Arc<Notify>,
    timeout_: Duration,
    label: String,
) {
    let stalled = |what: &str| {
        TargetError::transient(format!(
            "{label}: the ssh connection took no data for {}s while {what}",
            timeout_.as_secs()
        ))
        .with_hint("http-timeout sets how long to wait")
    };
    loop {
        let job = if conn.inflight.load(Ordering::Relaxed) == 0 {
            match timeout(IDLE, jobs.recv()).await {
                Ok(job) => job,
                Err(_) => {
                    // Idle: close, unless a request was handed over meanwhile (the pool
                    // hands over under its lock, so checking under it is race-free).
                    let guard = pool.lock().unwrap_or_else(|e| e.into_inner());
                    match jobs.try_recv() {
                        Ok(job) => Some(job),
                        Err(_) => {
                            conn.dead.store(true, Ordering::Relaxed);
                            drop(guard);
                            None
                        }
                    }
                }
            }
        } else {
            jobs.recv().await
        };
        let Some(job) = job else { break };
        let Job { request, reply } = job;
        let (answer, result) = match request {
            Request::QueryValid(paths) => {
                let mut bytes = Vec::new();
                let _ = serve::write_query_valid_paths(&mut bytes, true, false, &paths);
                let sent = write_with_deadline(&mut stdin, &bytes, timeout_).await;
                (
                    Answer::Valid(paths.len() as u64),
                    sent.map_err(|e| (e, false)),
                )
            }
            Request::Add { path, header, nar } => {
                let sent = async {
                    write_with_deadline(&mut stdin, &header, timeout_)
                        .await
                        .map_err(|e| (e, false))?;
                    let mut stream = nar.stream();
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(bytes) => write_with_deadline(&mut stdin, &bytes, timeout_)
                                .await
                                .map_err(|e| (e, false))?,
                            Err(e) => {
                                return Err((
                                    WriteError::Local(format!(
                                        "{path}: upload abandoned, the NAR could not be produced: {e}"
                                    )),
                                    true,
                                ));
                            }
                        }
                    }
                    Ok(())
                }
                .await;
                (Answer::Added, sent)
            }
        };
        match result {
            Ok(()) => {
                if let Err(mpsc::error::SendError(p)) = pending.send(Pending { answer, reply }) {
                    let _ = p.reply.send(Err(TargetError::transient(format!(
                        "{label}: the ssh connection closed before the remote answered"
                    ))));
                }
            }
            Err((WriteError::Local(message), _)) => {
                // Closing the pipe mid-NAR makes the remote drop the partial import.
                conn.inflight.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send(Err(TargetError::permanent(message)));
                break;
            }
            Err((WriteError::Stalled, _)) => {
                conn.inflight.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send(Err(stalled("sending")));
                abort.notify_one();
                break;
            }
            Err((WriteError::Io, _)) => {
                // The remote went away; the reader reports why when it gets to this request.
                let _ = pending.send(Pending { answer, reply });
                break;
            }
        }
    }
    conn.dead.store(true, Ordering::Relaxed);
    drop(stdin);
    jobs.close();
    while let Ok(job) = jobs.try_recv() {
        conn.inflight.fetch_sub(1, Ordering::Relaxed);
        let _ = job.reply.send(Err(TargetError::transient(format!(
            "{label}: the ssh connection closed before the request went out"
        ))));
    }
}

enum WriteError {
    /// The NAR could not be produced from the store.
    Local(String),
    /// Nothing was taken for the timeout.
    Stalled,
    /// The pipe broke.
    Io,
}

async fn write_with_deadline<W: AsyncWrite + Unpin>(
    w: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> Result<(), WriteError> {
    // A deadline per 64 KiB: a slow link is fine, a stuck one is not.
    for chunk in bytes.chunks(64 * 1024) {
        match timeout(limit, w.write_all(chunk)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(WriteError::Io),
            Err(_) => return Err(WriteError::Stalled),
        }
    }
    match timeout(limit, w.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(WriteError::Io),
        Err(_) => Err(WriteError::Stalled),
    }
}

/// Matches answers to requests in order; when the connection ends early, the request
/// being answered gets the reason and the ones behind it a transient error.
async fn reader<R: AsyncRead + Unpin>(
    mut stdout: R,
    mut pending: mpsc::UnboundedReceiver<Pending>,
    conn: Arc<Conn>,
    mut remote: Remote,
    abort: Arc<Notify>,
    timeout_: Duration,
) {
    let wait = timeout_ * ANSWER_TIMEOUT_FACTOR;
    let mut buf: Vec<u8> = Vec::new();
    let mut head: Option<(Pending, Instant)> = None;
    let failure = loop {
        if let Some((p, _)) = &head {
            match try_decode(&mut buf, &|r: &mut &[u8]| decode_answer(&p.answer, r)) {
                Ok(Some(reply)) => {
                    if let Some((p, _)) = head.take() {
                        conn.inflight.fetch_sub(1, Ordering::Relaxed);
                        let _ = p.reply.send(Ok(reply));
                    }
                    continue;
                }
                Ok(None) if buf.len() > answer_limit(&p.answer) => {
                    break Failure::Protocol(format!(
                        "an answer over {} bytes",
                        answer_limit(&p.answer)
                    ));
                }
                Ok(None) => {}
                Err(e) => break Failure::Protocol(e.to_string()),
            }
        }
        let deadline = head.as_ref().map(|(_, d)| *d);
        tokio::select! {
            next = pending.recv(), if head.is_none() => match next {
                Some(p) => head = Some((p, Instant::now() + wait)),
                // The writer is done and every answer is in: a clean end.
                None => break Failure::Eof,
            },
            read = stdout.read_buf(&mut buf) => match read {
                Ok(0) => break Failure::Eof,
                Ok(_) if head.is_none() => {
                    break Failure::Protocol("bytes nobody asked for".into());
                }
                Ok(_) => {}
                Err(e) => break Failure::Io(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                break Failure::Timeout(wait);
            }
            _ = abort.notified() => break Failure::Timeout(timeout_),
        }
    };
    conn.dead.store(true, Ordering::Relaxed);
    let unanswered = head.is_some() || !pending.is_empty();
    if !unanswered {
        // Closed while idle or after the last answer: nothing to report.
        if let Some(mut child) = remote.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        return;
    }
    let error = remote.fail(failure, "pushing").await;
    tracing::debug!("{}: connection ended: {error}", remote.spec.label);
    if let Some((p, _)) = head.take() {
        conn.inflight.fetch_sub(1, Ordering::Relaxed);
        let _ = p.reply.send(Err(error.clone()));
    }
    pending.close();
    while let Ok(p) = pending.try_recv() {
        conn.inflight.fetch_sub(1, Ordering::Relaxed);
        let _ = p.reply.send(Err(TargetError::transient(format!(
            "{}: the ssh connection closed before the remote answered: {}",
            remote.spec.label, error.message
        ))));
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

    async fn open(&self) -> Result<(), TargetError> {
        let live = self.lock_pool().conns.iter().any(|c| !c.is_dead());
        if live {
            return Ok(());
        }
        self.lock_pool().opening += 1;
        let opened = self.connect().await;
        let mut pool = self.lock_pool();
        pool.opening -= 1;
        let result = opened.map(|conn| pool.conns.push(conn));
        drop(pool);
        self.changed.notify_waiters();
        result
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args(spec: &SshSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_url_becomes_the_ssh_command_nix_would_run() {
        let spec = SshSpec::parse(
            "ssh://nix-ssh@cache.example.org:2222?ssh-key=/etc/narpost/id&compress=true&remote-store=/srv/it's",
            Some("-o ProxyJump='jump host'"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(spec.label, "nix-ssh@cache.example.org:2222");
        assert_eq!(
            args(&spec),
            [
                "-x",
                "-a",
                "-o",
                "ProxyJump=jump host",
                "-i",
                "/etc/narpost/id",
                "-C",
                "-p",
                "2222",
                "-oBatchMode=yes",
                "-oConnectTimeout=10",
                "--",
                "nix-ssh@cache.example.org",
                "nix-store --serve --write --store '/srv/it'\\''s'",
            ]
        );
        let plain = SshSpec::parse(
            "ssh://host?remote-program=/opt/nix/bin/nix-store",
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            args(&plain)[args(&plain).len() - 2..],
            ["host", "/opt/nix/bin/nix-store --serve --write"]
        );
    }

    #[test]
    fn a_pinned_host_key_is_checked_strictly_against_a_private_file() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFm0tKc7g7RkKxWpuTxvhUdHYS8nlY4XBT1gbdUhJ2Xg";
        let encoded = base64::engine::general_purpose::STANDARD.encode(line);
        for (url, name) in [
            (
                format!("ssh://u@10.0.0.1:2222?base64-ssh-public-host-key={encoded}"),
                "[10.0.0.1]:2222",
            ),
            (
                format!("ssh://10.0.0.1?base64-ssh-public-host-key={encoded}"),
                "10.0.0.1",
            ),
        ] {
            let spec = SshSpec::parse(&url, None, Duration::from_secs(5)).unwrap();
            let a = args(&spec);
            assert!(
                a.contains(&"-oStrictHostKeyChecking=yes".to_string()),
                "{a:?}"
            );
            let file = a
                .iter()
                .find_map(|x| x.strip_prefix("-oUserKnownHostsFile="))
                .expect("a known_hosts file");
            assert_eq!(
                std::fs::read_to_string(file).unwrap(),
                format!("{name} {line}\n")
            );
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "only narpost reads it");
        }
    }

    #[test]
    fn bad_urls_are_one_line_naming_the_url() {
        for bad in [
            "ssh://",
            "ssh://host/some/path",
            "ssh://user:secret@host",
            "ssh://host?max-connectons=2",
            "ssh://host?compress=maybe",
            "ssh://host?base64-ssh-public-host-key=!!",
            "ssh://-oProxyCommand=x",
            "ssh://host?remote-program=",
        ] {
            let err = SshSpec::parse(bad, None, Duration::from_secs(5)).unwrap_err();
            assert!(err.message.starts_with(bad), "{bad}: {}", err.message);
            assert!(!err.message.contains('\n'), "{}", err.message);
        }
        let err = SshSpec::parse("ssh://host", Some("-o 'unbalanced"), Duration::from_secs(5))
            .unwrap_err();
        assert!(err.message.contains("NIX_SSHOPTS"), "{}", err.message);
    }

    fn spec() -> SshSpec {
        SshSpec::parse("ssh://cache", None, Duration::from_secs(5)).unwrap()
    }

    fn kind_of(
        lines: &[&str],
        failure: Failure,
    ) -> (super::super::ErrorKind, String, Option<String>) {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        let e = classify(&spec(), &lines, None, &failure, "pushing");
        (e.kind, e.message, e.hint)
    }

    #[test]
    fn the_remotes_last_words_become_one_line_with_a_hint() {
        use super::super::ErrorKind::*;
        let (kind, message, hint) = kind_of(
            &[
                "copying path",
                "error: cannot add path '/nix/store/x' because it lacks a valid signature",
            ],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);
        assert_eq!(
            message,
            "cache: the remote refused the path: cannot add path '/nix/store/x' because it lacks a valid signature"
        );
        assert!(hint.unwrap().contains("trusted-public-keys"));

        let (kind, _, hint) = kind_of(
            &["bash: line 1: nix-store: command not found"],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);
        assert!(hint.unwrap().contains("remote-program"));

        let (kind, message, _) = kind_of(&["Host key verification failed."], Failure::Eof);
        assert_eq!(kind, Auth);
        assert!(message.contains("host's key"), "{message}");

        let (kind, _, _) = kind_of(
            &["root@127.0.0.1: Permission denied (publickey)."],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);

        let (kind, _, _) = kind_of(
            &["ssh: connect to host cache port 22: Connection refused"],
            Failure::Eof,
        );
        assert_eq!(kind, Transient);

        let (kind, message, _) = kind_of(
            &["error: writing to file: No space left on device"],
            Failure::Eof,
        );
        assert_eq!(
            (kind, message.as_str()),
            (
                Transient,
                "cache: writing to file: No space left on device (the connection closed while pushing)"
            )
        );

        let (kind, message, _) = kind_of(&[], Failure::Timeout(Duration::from_secs(300)));
        assert_eq!(
            (kind, message.as_str()),
            (Transient, "cache: no answer for 300s while pushing")
        );
    }

    /// A remote that reads `requests` requests before answering any: a client that waited
    /// for each answer before sending the next request would hang here.
    async fn pipelined_remote(
        mut from_client: tokio::io::DuplexStream,
        mut to_client: tokio::io::DuplexStream,
        requests: usize,
    ) -> Vec<u64> {
        let mut buf = Vec::new();
        let mut commands = Vec::new();
        for _ in 0..requests {
            let cmd = read_frame(&mut from_client, &mut buf, 1 << 20, |r| serve::read_u64(r))
                .await
                .unwrap();
            commands.push(cmd);
            let paths = read_frame(&mut from_client, &mut buf, 1 << 20, |r| {
                serve::read_u64(r)?;
                serve::read_u64(r)?;
                serve::read_strings(r, 10, 100)
            })
            .await
            .unwrap();
            assert_eq!(paths.len(), 1);
        }
        for i in 0..requests {
            let mut answer = Vec::new();
            serve::write_strings(&mut answer, &[format!("/nix/store/{i}")]).unwrap();
            to_client.write_all(&answer).await.unwrap();
        }
        commands
    }

    #[tokio::test]
    async fn requests_go_out_before_earlier_answers_and_answers_find_their_request() {
        let (client_w, remote_r) = tokio::io::duplex(1 << 16);
        let (remote_w, client_r) = tokio::io::duplex(1 << 16);
        let remote_task = tokio::spawn(pipelined_remote(remote_r, remote_w, 3));
        let spec = Arc::new(spec());
        let remote = Remote {
            spec,
            child: None,
            tail: Arc::default(),
            stderr_done: None,
        };
        let conn = start(
            client_w,
            client_r,
            remote,
            Arc::default(),
            Duration::from_secs(5),
        );
        let mut replies = Vec::new();
        for i in 0..3 {
            let (tx, rx) = oneshot::channel();
            conn.inflight.fetch_add(1, Ordering::Relaxed);
            conn.jobs
                .send(Job {
                    request: Request::QueryValid(vec![format!("/nix/store/{i}")]),
                    reply: tx,
                })
                .map_err(|_| "send")
                .unwrap();
            replies.push(rx);
        }
        for (i, rx) in replies.into_iter().enumerate() {
            match timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(Ok(Reply::Valid(v)))) => assert_eq!(v, [format!("/nix/store/{i}")]),
                _ => panic!("no answer to request {i}"),
            }
        }
        assert_eq!(remote_task.await.unwrap(), [1, 1, 1]);
        assert_eq!(conn.inflight.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_connection_that_ends_fails_the_unanswered_requests() {
        let (client_w, mut remote_r) = tokio::io::duplex(1 << 16);
        let (remote_w, client_r) = tokio::io::duplex(1 << 16);
        let remote = Remote {
            spec: Arc::new(spec()),
            child: None,
            tail: Arc::default(),
            stderr_done: None,
        };
        let conn = start(
            client_w,
            client_r,
            remote,
            Arc::default(),
            Duration::from_secs(5),
        );
        let mut replies = Vec::new();
        for i in 0..2 {
            let (tx, rx) = oneshot::channel();
            conn.inflight.fetch_add(1, Ordering::Relaxed);
            let _ = conn.jobs.send(Job {
                request: Request::QueryValid(vec![format!("/nix/store/{i}")]),
                reply: tx,
            });
            replies.push(rx);
        }
        // The remote reads a little and hangs up without answering.
        let mut some = [0u8; 8];
        remote_r.read_exact(&mut some).await.unwrap();
        drop(remote_w);
        for rx in replies {
            let result = timeout(Duration::from_secs(5), rx)
                .await
                .expect("an answer in time");
            match result {
                Ok(Err(e)) => assert!(e.is_retryable(), "{e}"),
                _ => panic!("expected an error"),
            }
        }
        assert!(conn.is_dead());
    }
}
