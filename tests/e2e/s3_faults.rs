//! The S3 target against a server that fails the way real S3 does, in front of the real
//! s3s-fs: `InternalError` inside a 200 answer to CompleteMultipartUpload, a part answered
//! `400 RequestTimeout`, `503 SlowDown` for a while. Whatever the fault, a queued path stays
//! queued with its GC root and lands once the fault is over; `push` keeps retrying for
//! `retry-timeout` and no longer.

use crate::common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::daemon::*;
use common::s3::*;
use common::*;
use narpost::format::store_path::StorePath;

/// What the proxy answers in the server's place, given (method, request target), or `None`
/// to pass the request through.
type Fault = dyn Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync;

/// An HTTP proxy on 127.0.0.1 in front of the S3 server. Each request goes to the server
/// on a connection of its own (`Connection: close`, so the proxy need not parse answers),
/// unless `fault` answers it. Signatures still check out: SigV4 signs the Host header the
/// client sent, which the proxy passes on unchanged.
struct FaultProxy {
    port: u16,
    stop: Arc<AtomicBool>,
    /// Requests the fault answered.
    faults: Arc<AtomicUsize>,
}

impl FaultProxy {
    fn start(
        upstream: u16,
        fault: impl Fn(&str, &str) -> Option<Vec<u8>> + Send + Sync + 'static,
    ) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicUsize::new(0));
        let fault: Arc<Fault> = Arc::new(fault);
        let (stopping, counted) = (stop.clone(), faults.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let (fault, counted) = (fault.clone(), counted.clone());
                std::thread::spawn(move || relay(client, upstream, &*fault, &counted));
            }
        });
        FaultProxy { port, stop, faults }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn url(&self) -> String {
        format!(
            "s3://{BUCKET}?region=us-east-1&endpoint={}",
            self.endpoint()
        )
    }

    fn faults(&self) -> usize {
        self.faults.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn relay(mut client: TcpStream, upstream: u16, fault: &Fault, faults: &AtomicUsize) {
    let _ = client.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut client, &mut buf) {
        let (method, target, head, body) =
            (request.method, request.target, request.head, request.body);
        if let Some(answer) = fault(&method, &target) {
            faults.fetch_add(1, Ordering::SeqCst);
            if client.write_all(&answer).is_err() {
                return;
            }
            continue;
        }
        // Passed through on a connection of its own, closed after the answer.
        let mut kept: Vec<&str> = head
            .trim_end()
            .lines()
            .filter(|l| {
                !l.to_ascii_lowercase().starts_with("connection:")
                    && !l.to_ascii_lowercase().starts_with("keep-alive:")
            })
            .collect();
        kept.push("Connection: close");
        let request = format!("{}\r\n\r\n", kept.join("\r\n"));
        let Ok(mut server) = TcpStream::connect(("127.0.0.1", upstream)) else {
            return;
        };
        if server.write_all(request.as_bytes()).is_err() || server.write_all(&body).is_err() {
            return;
        }
        let mut answer = Vec::new();
        let _ = server.read_to_end(&mut answer);
        // The answer may promise keep-alive; the client learns otherwise from the close.
        let _ = client.write_all(&answer);
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
}

fn answer(status: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn s3_error(code: &str, message: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{code}</Code><Message>{message}</Message><RequestId>4442587FB7D0A2F9</RequestId></Error>"
    )
}

/// A daemon draining into the bucket through `proxy`: queues `path` through the hook, waits
/// until the proxy answered at least `faults` requests with its fault, checks that the entry
/// is still queued and rooted with nothing given up on, ends the fault, and checks that the
/// path lands in a bucket a fresh store substitutes from.
fn drain_through_fault(
    env: &Env,
    server: &S3Server,
    proxy: &FaultProxy,
    failing: &AtomicBool,
    path: &StorePath,
    faults: usize,
) {
    let (key, public) = env.keygen("s3-fault-1");
    let gcroots = env.path().join("gcroots");
    assert_lines(
        hook(
            &env.state(),
            &gcroots,
            &[("OUT_PATHS", &path.to_absolute())],
        ),
        &[],
    );
    let daemon = Daemon::start_with(env, &proxy.url(), &key, 30, |cmd| {
        aws_env(cmd, env, ACCESS_KEY, SECRET_KEY);
    });
    wait_for(
        &daemon,
        &format!("{faults} faulty answers"),
        Duration::from_secs(120),
        || proxy.faults() >= faults,
    );
    // Past the retries of the moment: the pass is over and the entry booked.
    wait_for(
        &daemon,
        "the failure to be recorded",
        Duration::from_secs(60),
        || status_json(env)["last_error"].is_string(),
    );
    assert_kept(env, &daemon, &gcroots, path, &server.cache());

    failing.store(false, Ordering::SeqCst);
    wait_drained(env, &daemon, Duration::from_secs(180));
    wait_unrooted(&gcroots);
    server.cache().assert_complete();
    assert_substitutes(env, &server.file_url(), &public, std::slice::from_ref(path));
}

#[test]
fn an_internal_error_inside_a_200_to_complete_multipart_keeps_the_path_queued_until_it_ends() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let failing = Arc::new(AtomicBool::new(true));
    let on = failing.clone();
    let proxy = FaultProxy::start(server.port, move |method, target| {
        let complete = method == "POST" && target.contains("uploadId=");
        (complete && on.load(Ordering::SeqCst)).then(|| {
            answer(
                "200 OK",
                &s3_error(
                    "InternalError",
                    "We encountered an internal error. Please try again.",
                ),
            )
        })
    });
    let path = random_path(&env, "s3-complete", 40_000_000);
    // More than the client library's own retries of one Complete: the fault reached narpost.
    drain_through_fault(&env, &server, &proxy, &failing, &path, 6);
}

#[test]
fn a_part_answered_400_request_timeout_keeps_the_path_queued_until_it_ends() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let failing = Arc::new(AtomicBool::new(true));
    let on = failing.clone();
    let proxy = FaultProxy::start(server.port, move |method, target| {
        let part = method == "PUT" && target.contains("partNumber=");
        (part && on.load(Ordering::SeqCst)).then(|| {
            answer(
                "400 Bad Request",
                &s3_error(
                    "RequestTimeout",
                    "Your socket connection to the server was not read from or written to within the timeout period.",
                ),
            )
        })
    });
    let path = random_path(&env, "s3-part", 40_000_000);
    drain_through_fault(&env, &server, &proxy, &failing, &path, 4);
}

/// `503 SlowDown` to every request: a push rides it out within `retry-timeout`, and gives
/// up after it with one line naming the fault.
#[test]
fn push_rides_out_slow_down_for_retry_timeout_and_then_gives_up_saying_so() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let (key, public) = env.keygen("s3-slowdown-1");
    let failing = Arc::new(AtomicBool::new(true));
    let on = failing.clone();
    let proxy = FaultProxy::start(server.port, move |_, _| {
        on.load(Ordering::SeqCst).then(|| {
            answer(
                "503 Slow Down",
                &s3_error("SlowDown", "Please reduce your request rate."),
            )
        })
    });
    let path = random_path(&env, "s3-slowdown", 100_000);

    let give_up = std::time::Instant::now();
    let mut short = env.narpost();
    aws_env(&mut short, &env, ACCESS_KEY, SECRET_KEY)
        .env("NARPOST_RETRY_TIMEOUT", "3")
        .args(["push", "--to", &proxy.url(), "--key"])
        .arg(&key)
        .arg(path.to_absolute());
    let out = short.output().expect("run push");
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("SlowDown"), "{}", stderr(&out));
    assert!(
        give_up.elapsed() < Duration::from_secs(60),
        "gave up after {:?}",
        give_up.elapsed()
    );

    // The fault ends 20 s in; the default retry-timeout (two minutes) outlasts it.
    let ending = failing.clone();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(20));
        ending.store(false, Ordering::SeqCst);
    });
    let mut long = env.narpost();
    aws_env(&mut long, &env, ACCESS_KEY, SECRET_KEY)
        .args(["push", "--to", &proxy.url(), "--key"])
        .arg(&key)
        .arg(path.to_absolute());
    let out = run(&mut long);
    assert!(proxy.faults() > 5, "the fault was met: {}", stderr(&out));
    server.cache().assert_complete();
    assert_substitutes(
        &env,
        &server.file_url(),
        &public,
        std::slice::from_ref(&path),
    );
}
