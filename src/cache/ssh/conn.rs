//! One connection: an `ssh` process, a task writing requests as they come and a task
//! matching the answers, which arrive in order, to them.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::io::{
    AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, timeout};

use super::errors::{Failure, classify};
use super::{IDLE, Pool, SshSpec};
use crate::cache::TargetError;
use crate::cache::stall::ANSWER_TIMEOUT_FACTOR;
use crate::dump::NarSource;
use crate::format::serve::{self, ServeError};
use crate::format::store_path::StorePath;

/// Longest string accepted from the remote: a store path is at most 255 bytes.
const MAX_PATH_LEN: u64 = 1024;
/// Stderr lines kept per connection, and the length each is cut to.
const STDERR_LINES: usize = 20;
const STDERR_LINE_LEN: usize = 500;
/// Bytes the remote may send ahead of the request they answer being handed to the reader.
const UNASKED_LIMIT: usize = 64 * 1024;

/// A request and where its answer goes.
pub(super) struct Job {
    pub(super) request: Request,
    pub(super) reply: ReplyTo,
}

pub(super) type ReplyTo = oneshot::Sender<Result<Reply, TargetError>>;

pub(super) enum Request {
    QueryValid(Vec<String>),
    Add {
        path: StorePath,
        header: Vec<u8>,
        nar: NarSource,
    },
}

pub(super) enum Reply {
    Valid(Vec<String>),
    Added,
}

/// What the reader expects next, in the order the requests went out.
struct Pending {
    answer: Answer,
    reply: ReplyTo,
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
pub(super) struct Conn {
    jobs: mpsc::UnboundedSender<Job>,
    inflight: AtomicUsize,
    dead: AtomicBool,
}

impl Conn {
    pub(super) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Relaxed) || self.jobs.is_closed()
    }

    /// Requests handed over and not answered yet.
    pub(super) fn load(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Hands `job` to the writer; if the connection is gone, gives back where its answer
    /// was to go.
    pub(super) fn submit(&self, job: Job) -> Result<(), ReplyTo> {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.jobs.send(job).map_err(|mpsc::error::SendError(job)| {
            self.inflight.fetch_sub(1, Ordering::Relaxed);
            job.reply
        })
    }
}

/// The process behind a connection, and what it said on stderr.
struct Remote {
    spec: Arc<SshSpec>,
    child: Option<tokio::process::Child>,
    tail: Arc<Mutex<StderrTail>>,
    stderr_done: Option<tokio::task::JoinHandle<()>>,
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

/// Starts `ssh`, greets the remote and starts the connection's tasks.
pub(super) async fn connect(
    spec: &Arc<SshSpec>,
    timeout_: Duration,
    pool: Arc<Mutex<Pool>>,
) -> Result<Arc<Conn>, TargetError> {
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
    let wait = timeout_ * ANSWER_TIMEOUT_FACTOR;
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
        Ok(Err(e @ ServeError::TooNew { .. })) => {
            return Err(TargetError::auth(format!("{}: {e}", spec.label)).with_hint(
                "this narpost is older than the host's Nix; upgrade narpost, or point remote-program= at a Nix that speaks 2.x",
            ));
        }
        Ok(Err(e)) => Some(Failure::Io(e.to_string())),
        Err(_) => Some(Failure::Timeout(wait)),
    };
    if let Some(failure) = failure {
        return Err(remote.fail(failure, "connecting").await);
    }
    Ok(start(stdin, stdout, remote, pool, timeout_))
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
        .with_hint("io-timeout sets how long to wait")
    };
    loop {
        let job = match timeout(IDLE, jobs.recv()).await {
            Ok(job) => job,
            Err(_) => {
                // Idle: close, unless a request was handed over meanwhile (the pool hands
                // over under its lock, so checking under it is race-free) or answers are
                // still to come.
                let guard = pool.lock().unwrap_or_else(|e| e.into_inner());
                match jobs.try_recv() {
                    Ok(job) => Some(job),
                    Err(_) if conn.load() > 0 && !conn.is_dead() => continue,
                    Err(_) => {
                        conn.dead.store(true, Ordering::Relaxed);
                        drop(guard);
                        None
                    }
                }
            }
        };
        let Some(job) = job else { break };
        let Job { request, reply } = job;
        let (answer, result) = match request {
            Request::QueryValid(paths) => {
                let mut bytes = Vec::new();
                let _ = serve::write_query_valid_paths(&mut bytes, true, false, &paths);
                let sent = write_with_deadline(&mut stdin, &bytes, timeout_).await;
                (Answer::Valid(paths.len() as u64), sent)
            }
            Request::Add { path, header, nar } => {
                let sent = async {
                    write_with_deadline(&mut stdin, &header, timeout_).await?;
                    let mut stream = nar.stream();
                    while let Some(chunk) = stream.next().await {
                        match chunk {
                            Ok(bytes) => write_with_deadline(&mut stdin, &bytes, timeout_).await?,
                            Err(e) => {
                                return Err(WriteError::Local(format!(
                                    "{label}: upload of {path} abandoned: {e}"
                                )));
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
            Err(WriteError::Local(message)) => {
                // Closing the pipe mid-NAR makes the remote drop the partial import.
                conn.inflight.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send(Err(TargetError::permanent(message)));
                break;
            }
            Err(WriteError::Stalled) => {
                conn.inflight.fetch_sub(1, Ordering::Relaxed);
                let _ = reply.send(Err(stalled("sending")));
                abort.notify_one();
                break;
            }
            Err(WriteError::Io) => {
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
    // After the remote closed its end, the answers already read are still handed out.
    let mut eof = false;
    let failure = loop {
        if head.is_none() {
            match pending.try_recv() {
                Ok(p) => head = Some((p, Instant::now() + wait)),
                // The writer is done and every answer is in: a clean end.
                Err(mpsc::error::TryRecvError::Disconnected) => break Failure::Eof,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
        }
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
        } else if buf.len() > UNASKED_LIMIT {
            // An answer may arrive a moment before its request is handed over, but never
            // this much of one.
            break Failure::Protocol(format!("{} bytes nobody asked for", buf.len()));
        }
        if eof {
            break Failure::Eof;
        }
        let deadline = head.as_ref().map(|(_, d)| *d);
        tokio::select! {
            biased;
            _ = abort.notified() => break Failure::Timeout(timeout_),
            next = pending.recv(), if head.is_none() => match next {
                Some(p) => head = Some((p, Instant::now() + wait)),
                None => break Failure::Eof,
            },
            read = stdout.read_buf(&mut buf) => match read {
                Ok(0) => eof = true,
                Ok(_) => {}
                Err(e) => break Failure::Io(e.to_string()),
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                break Failure::Timeout(wait);
            }
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

/// A connection to a remote played by the test (its reading and writing ends), with
/// `timeout_` for every wait.
#[cfg(test)]
pub(super) fn test_connection(
    timeout_: Duration,
) -> (Arc<Conn>, tokio::io::DuplexStream, tokio::io::DuplexStream) {
    let (client_w, remote_r) = tokio::io::duplex(1 << 16);
    let (remote_w, client_r) = tokio::io::duplex(1 << 16);
    let remote = Remote {
        spec: Arc::new(
            SshSpec::parse("ssh://cache", None, Duration::from_secs(5)).expect("test spec"),
        ),
        child: None,
        tail: Arc::default(),
        stderr_done: None,
    };
    let conn = start(client_w, client_r, remote, Arc::default(), timeout_);
    (conn, remote_r, remote_w)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (conn, remote_r, remote_w) = connection(Duration::from_secs(5));
        let remote_task = tokio::spawn(pipelined_remote(remote_r, remote_w, 3));
        let paths: Vec<String> = (0..3).map(|i| format!("/nix/store/{i}")).collect();
        let replies: Vec<_> = paths.iter().map(|p| query(&conn, &[p])).collect();
        for (path, rx) in paths.iter().zip(replies) {
            match timeout(Duration::from_secs(5), rx).await {
                Ok(Ok(Ok(Reply::Valid(v)))) => assert_eq!(v, [path.as_str()]),
                _ => panic!("no answer for {path}"),
            }
        }
        assert_eq!(remote_task.await.unwrap(), [1, 1, 1]);
        assert_eq!(conn.load(), 0);
    }

    #[tokio::test]
    async fn a_connection_that_ends_fails_the_unanswered_requests() {
        let (conn, mut remote_r, remote_w) = connection(Duration::from_secs(5));
        let replies = [
            query(&conn, &["/nix/store/0"]),
            query(&conn, &["/nix/store/1"]),
        ];
        // The remote reads a little and hangs up without answering.
        let mut some = [0u8; 8];
        remote_r.read_exact(&mut some).await.unwrap();
        drop(remote_w);
        for rx in replies {
            let e = error_of(rx).await;
            assert!(e.is_retryable(), "{e}");
        }
        assert!(conn.is_dead());
    }

    fn connection(
        timeout_: Duration,
    ) -> (Arc<Conn>, tokio::io::DuplexStream, tokio::io::DuplexStream) {
        test_connection(timeout_)
    }

    fn query(conn: &Conn, paths: &[&str]) -> oneshot::Receiver<Result<Reply, TargetError>> {
        let (tx, rx) = oneshot::channel();
        let request = Request::QueryValid(paths.iter().map(|p| p.to_string()).collect());
        let _ = conn.submit(Job { request, reply: tx });
        rx
    }

    async fn error_of(rx: oneshot::Receiver<Result<Reply, TargetError>>) -> TargetError {
        match timeout(Duration::from_secs(10), rx).await {
            Ok(Ok(Err(e))) => e,
            Ok(Ok(Ok(_))) => panic!("expected an error, got an answer"),
            _ => panic!("no error in time"),
        }
    }

    #[tokio::test]
    async fn a_remote_that_never_answers_fails_the_request_after_the_deadline() {
        let (conn, _remote_r, _remote_w) = connection(Duration::from_millis(50));
        let started = std::time::Instant::now();
        let e = error_of(query(&conn, &["/nix/store/x"])).await;
        assert!(e.is_retryable(), "{e}");
        assert!(e.message.contains("no answer for"), "{}", e.message);
        // The answer deadline is ANSWER_TIMEOUT_FACTOR timeouts.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        assert!(conn.is_dead());
    }

    #[tokio::test]
    async fn an_answer_with_more_paths_than_asked_is_refused() {
        let (conn, _remote_r, mut remote_w) = connection(Duration::from_secs(5));
        let rx = query(&conn, &["/nix/store/a"]);
        let mut answer = Vec::new();
        serve::write_strings(&mut answer, &["/nix/store/a", "/nix/store/b"]).unwrap();
        remote_w.write_all(&answer).await.unwrap();
        let e = error_of(rx).await;
        assert!(e.message.contains("protocol error"), "{}", e.message);
        assert!(!e.is_retryable(), "{e}");

        let (conn, _remote_r, mut remote_w) = connection(Duration::from_secs(5));
        let rx = query(&conn, &["/nix/store/a"]);
        let mut answer = Vec::new();
        serve::write_strings(
            &mut answer,
            &["/nix/store/".to_string() + &"x".repeat(5000)],
        )
        .unwrap();
        remote_w.write_all(&answer).await.unwrap();
        let e = error_of(rx).await;
        assert!(
            e.message.contains("more than the 1024 allowed"),
            "{}",
            e.message
        );
    }
}
