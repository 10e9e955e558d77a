//! Hostile caches and hostile state directories. Each test sets a fault up on purpose (a
//! server that stops half-way through an answer or never stops sending one, a state
//! directory someone else controls, a planted symlink, a key file with an invisible byte)
//! and checks the outcome: one clear line, bounded time and memory, nothing written through
//! what was planted, no secret printed, no queued path lost.

use crate::common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use narpost::format::store_path::StorePath;

// ---------------------------------------------------------------------------------------
// A misbehaving HTTP server

/// What the server does with one request.
enum Reply {
    /// A complete response; the connection stays open for the next request.
    Full(Vec<u8>),
    /// These bytes (a status line and headers that promise a body), then nothing, until the
    /// client gives up and closes the connection.
    ThenSilence(&'static [u8]),
    /// These bytes, then `fill` without end, as fast as the client reads.
    Endless(&'static [u8], u8),
}

fn response(status: &str, content_type: &str, body: &[u8]) -> Reply {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    Reply::Full(out)
}

type Route = dyn Fn(&str, &str, &[u8]) -> Reply + Send + Sync;

/// An HTTP/1.1 server on 127.0.0.1 answering each request with `route(method, path, body)`.
/// Request bodies are read in full first (they always carry a `Content-Length` here).
fn hostile_server(route: impl Fn(&str, &str, &[u8]) -> Reply + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let route: Arc<Route> = Arc::new(route);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let route = Arc::clone(&route);
            std::thread::spawn(move || serve(stream, &*route));
        }
    });
    port
}

fn serve(mut stream: TcpStream, route: &Route) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut stream, &mut buf) {
        let (method, path, body) = (request.method, request.target, request.body);
        match route(&method, &path, &body) {
            Reply::Full(bytes) => {
                if stream.write_all(&bytes).is_err() {
                    return;
                }
            }
            Reply::ThenSilence(bytes) => {
                let _ = stream.write_all(bytes);
                // Hold the connection open, saying nothing, until the client hangs up.
                let mut sink = [0u8; 8192];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
                return;
            }
            Reply::Endless(head, fill) => {
                let _ = stream.write_all(head);
                let chunk = vec![fill; 64 * 1024];
                while stream.write_all(&chunk).is_ok() {}
                return;
            }
        }
    }
}

/// An Attic server's answers to `cache-config` and `get-missing-paths` (every path asked
/// about is missing), for routes a test does not take over.
fn attic_defaults(method: &str, path: &str, body: &[u8]) -> Reply {
    match (method, path) {
        ("GET", "/_api/v1/cache-config/main") => response("200 OK", "application/json", b"{}"),
        ("POST", "/_api/v1/get-missing-paths") => {
            let request: serde_json::Value = serde_json::from_slice(body).expect("JSON request");
            let answer = serde_json::json!({ "missing_paths": request["store_path_hashes"] });
            response("200 OK", "application/json", answer.to_string().as_bytes())
        }
        _ => response(
            "500 Internal Server Error",
            "text/plain",
            b"unexpected request",
        ),
    }
}

/// A binary cache that exists and lacks everything, for routes a test does not take over.
fn http_cache_defaults(method: &str, path: &str) -> Reply {
    match (method, path) {
        ("GET", "/nix-cache-info") => response("200 OK", "text/plain", b"StoreDir: /nix/store\n"),
        ("HEAD", _) => response("404 Not Found", "text/plain", b""),
        _ => response(
            "500 Internal Server Error",
            "text/plain",
            b"unexpected request",
        ),
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// Builds one small path nobody built before.
fn build_one(env: &Env, name: &str) -> StorePath {
    let expr = format!(
        "{}mk \"narpost-t-{name}\" \"echo {name} > $out\"\n",
        nix_prelude(&nonce())
    );
    let file = env.write_nix(&format!("{name}.nix"), &expr);
    let mut outs = nix_build(&file, &[], &[]);
    assert_eq!(outs.len(), 1, "{outs:?}");
    outs.remove(0)
}

/// The lines of `text` that are narpost's error lines.
fn error_lines(text: &str) -> Vec<&str> {
    text.lines()
        .filter(|l| l.starts_with("narpost: "))
        .collect()
}

/// A push's output names one failure (as it happens, and again in the summary), saying
/// `what`.
fn assert_one_failure(text: &str, what: &str) {
    let lines: std::collections::BTreeSet<&str> =
        text.lines().filter(|l| l.starts_with("failed: ")).collect();
    assert_eq!(lines.len(), 1, "one failure: {text}");
    assert!(lines.iter().all(|l| l.contains(what)), "{text}");
}

/// How a run ended: exit status (`None` when it had to be killed at the deadline), stderr,
/// time taken and the peak resident memory of the process (`ru_maxrss`).
struct Measured {
    status: Option<i32>,
    stderr: String,
    elapsed: Duration,
    peak_kib: u64,
}

/// Runs `cmd` until it exits or `limit` passes (then it is killed), and takes its peak
/// memory from the kernel's accounting of this one child (`wait4`), so nothing else the
/// test process runs is counted.
// The child is reaped by `wait4` (which std's `Child::wait` would not report usage for).
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command, scratch: &Path, limit: Duration) -> Measured {
    let log = scratch.join(format!("measured-{}.log", nonce()));
    let child = cmd
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).expect("create the log"))
        .spawn()
        .expect("start narpost");
    let pid = child.id() as libc::pid_t;
    let started = Instant::now();
    let mut killed = false;
    let (raw, usage) = loop {
        let mut raw = 0;
        // SAFETY: a zeroed rusage is a valid value, and both pointers outlive the call.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        let flags = if killed { 0 } else { libc::WNOHANG };
        // SAFETY: as above; `pid` is our own child, reaped only here.
        let got = unsafe { libc::wait4(pid, &mut raw, flags, &mut usage) };
        assert!(got >= 0, "wait4: {}", std::io::Error::last_os_error());
        if got == pid {
            break (raw, usage);
        }
        if started.elapsed() > limit && !killed {
            // SAFETY: signalling our own child, which has not been reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
            continue;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Measured {
        status: (!killed && libc::WIFEXITED(raw)).then(|| libc::WEXITSTATUS(raw)),
        stderr: fs::read_to_string(&log).unwrap_or_default(),
        elapsed: started.elapsed(),
        peak_kib: usage.ru_maxrss as u64,
    }
}

fn status_json(env: &Env) -> serde_json::Value {
    let out = run(env.narpost().args(["status", "--json"]));
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

// ---------------------------------------------------------------------------------------
// 1. An answer that stops after its headers

#[test]
fn an_http_answer_that_stops_after_its_headers_is_a_transient_error_and_the_path_stays_queued() {
    let env = Env::new();
    let path = build_one(&env, "answer-stall");
    let (key, _) = env.keygen("hostile-1");
    let port = hostile_server(|method, path, _| {
        if method == "PUT" && path.starts_with("/nar/") {
            Reply::ThenSilence(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n")
        } else {
            http_cache_defaults(method, path)
        }
    });
    let url = format!("http://127.0.0.1:{port}");

    // `push`: every attempt ends at the timeout, the retries run out (retry-timeout), and
    // the summary says why in one line.
    let measured = run_measured(
        push_cmd(&env, &url, &key, &path)
            .env("NARPOST_HTTP_TIMEOUT", "2")
            .env("NARPOST_RETRY_TIMEOUT", "6"),
        env.path(),
        Duration::from_secs(90),
    );
    let status = measured
        .status
        .expect("push must not hang on a stalled answer");
    assert_eq!(status, 1, "{}", measured.stderr);
    assert_one_failure(&measured.stderr, "did not finish its answer");
    eprintln!(
        "push against a stalled answer: failed after {:.1}s (http-timeout 2s, retry-timeout 6s)",
        measured.elapsed.as_secs_f64()
    );
    assert!(measured.elapsed < Duration::from_secs(45));

    // The daemon: the same error, reported as the cache being unreachable, and the path
    // stays queued for the next attempt.
    run(env
        .narpost()
        .arg("hook")
        .env("OUT_PATHS", path.to_absolute())
        .env("DRV_PATH", ""));
    assert_eq!(status_json(&env)["queue_depth"], 1);
    let mut daemon = Background::spawn(
        env.narpost()
            .env("NARPOST_HTTP_TIMEOUT", "2")
            .args(["daemon", "--to", &url, "--key"])
            .arg(&key),
        &env.path().join("daemon.log"),
        "narpost daemon",
    );
    let started = Instant::now();
    daemon.wait_for_output("did not finish its answer", Duration::from_secs(30));
    eprintln!(
        "daemon against a stalled answer: reported after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    daemon.assert_running();
    let status = status_json(&env);
    assert_eq!(status["queue_depth"], 1, "{status}");
    assert_eq!(
        status["failed"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    daemon.terminate(Duration::from_secs(30));
}

#[test]
fn an_attic_answer_that_stops_after_its_headers_fails_the_push_in_bounded_time() {
    let env = Env::new();
    let path = build_one(&env, "attic-stall");
    let port = hostile_server(|method, path, body| {
        if method == "PUT" && path == "/_api/v1/upload-path" {
            Reply::ThenSilence(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
            )
        } else {
            attic_defaults(method, path, body)
        }
    });
    let mut cmd = env.narpost();
    cmd.env("NARPOST_HTTP_TIMEOUT", "2")
        .env("NARPOST_RETRY_TIMEOUT", "6")
        .args([
            "push",
            "--to",
            &format!("attic+http://127.0.0.1:{port}/main"),
        ])
        .arg(path.to_absolute());
    let measured = run_measured(&mut cmd, env.path(), Duration::from_secs(90));
    let status = measured
        .status
        .expect("push must not hang on a stalled answer");
    assert_eq!(status, 1, "{}", measured.stderr);
    assert_one_failure(&measured.stderr, "did not finish its answer");
    eprintln!(
        "Attic push against a stalled answer: failed after {:.1}s",
        measured.elapsed.as_secs_f64()
    );
    assert!(measured.elapsed < Duration::from_secs(45));
}

// ---------------------------------------------------------------------------------------
// 2. Endless Attic answers

#[test]
fn endless_attic_answers_are_cut_off_with_bounded_memory() {
    let env = Env::new();
    let path = build_one(&env, "attic-endless");
    const JSON_200: &[u8] =
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"missing_paths\":[\"";
    const JSON_500: &[u8] = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{\"message\":\"";
    // Which request gets the endless answer, and what the one line must say.
    let cases: [(&str, &str, &'static [u8], &str); 3] = [
        (
            "GET",
            "/_api/v1/cache-config/main",
            JSON_200,
            "larger than 64 KiB",
        ),
        (
            "POST",
            "/_api/v1/get-missing-paths",
            JSON_200,
            "larger than 1024 KiB",
        ),
        (
            "GET",
            "/_api/v1/cache-config/main",
            JSON_500,
            "server answered 500",
        ),
    ];
    for (method, endpoint, head, says) in cases {
        let port = hostile_server(move |m, p, body| {
            if m == method && p == endpoint {
                Reply::Endless(head, b'a')
            } else {
                attic_defaults(m, p, body)
            }
        });
        let mut cmd = env.narpost();
        // A 500 is retried, for retry-timeout.
        cmd.env("NARPOST_HTTP_TIMEOUT", "5")
            .env("NARPOST_RETRY_TIMEOUT", "3")
            .args([
                "push",
                "--to",
                &format!("attic+http://127.0.0.1:{port}/main"),
            ])
            .arg(path.to_absolute());
        let measured = run_measured(&mut cmd, env.path(), Duration::from_secs(60));
        let status = measured.status.unwrap_or_else(|| {
            panic!(
                "{method} {endpoint}: push still running after 60s, peak {} MiB",
                measured.peak_kib / 1024
            )
        });
        eprintln!(
            "endless answer to {method} {endpoint}: exit after {:.1}s, peak RSS {} MiB",
            measured.elapsed.as_secs_f64(),
            measured.peak_kib / 1024
        );
        assert_eq!(status, 2, "{}", measured.stderr);
        let lines = error_lines(&measured.stderr);
        assert_eq!(lines.len(), 1, "one error line: {}", measured.stderr);
        assert!(lines[0].contains(says), "{}", measured.stderr);
        assert!(
            measured.peak_kib < 100 * 1024,
            "{method} {endpoint}: peak RSS {} MiB",
            measured.peak_kib / 1024
        );
    }
}

// ---------------------------------------------------------------------------------------
// 4. Status without a drainer

#[test]
fn status_without_drain_state_shows_no_password_from_the_cache_url() {
    let env = Env::new();
    let url = "http://bob:s3cret-pw@127.0.0.1:9/cache";
    for json in [false, true] {
        let mut cmd = env.narpost();
        cmd.env("NARPOST_CACHE", url).arg("status");
        if json {
            cmd.arg("--json");
        }
        let out = run(&mut cmd);
        let text = format!("{}{}", stdout(&out), stderr(&out));
        assert!(!text.contains("s3cret"), "{text}");
        assert!(
            text.contains("127.0.0.1:9/cache"),
            "still names the cache: {text}"
        );
    }
    assert!(!env.state().join(narpost::daemon::STATE_FILE).exists());
}

// ---------------------------------------------------------------------------------------
// 5. A DRV_PATH that is not a derivation

#[test]
fn hook_returns_at_once_on_drv_path_dev_zero() {
    let env = Env::new();
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_narpost-hook"))
        .arg("--state-dir")
        .arg(env.state())
        .env("NARPOST_GC_ROOTS_DIR", env.path().join("gcroots"))
        .env("OUT_PATHS", "")
        .env("DRV_PATH", "/dev/zero")
        .output()
        .expect("run narpost-hook");
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(0));
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");
    let text = stderr(&out);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(lines[0].starts_with("narpost hook: DRV_PATH"), "{text}");
    assert!(lines[0].contains("/dev/zero"), "{text}");
}

// ---------------------------------------------------------------------------------------
// 6. Key files with a bad name

#[test]
fn keys_with_a_byte_order_mark_or_a_line_break_in_the_name_are_refused_without_echo() {
    let env = Env::new();
    let (good, _) = env.keygen("plain-1");
    let content = fs::read_to_string(&good).expect("read the key");
    let (_, secret) = content.split_once(':').expect("name:secret");
    let cache = env.path().join("cache");
    let absent = "/nix/store/00000000000000000000000000000000-narpost-absent";
    for (file, text, says) in [
        ("bom.sec", format!("\u{feff}{content}"), "byte order mark"),
        (
            "two-lines.sec",
            format!("TOPSECRET{secret}\nplain-1:{secret}"),
            "more than one line",
        ),
    ] {
        let key = env.path().join(file);
        fs::write(&key, text).expect("write the key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        let out = env
            .narpost()
            .args([
                "push",
                "--to",
                &format!("file://{}", cache.display()),
                "--key",
            ])
            .arg(&key)
            .arg(absent)
            .output()
            .expect("run narpost");
        assert!(!out.status.success());
        let err = stderr(&out);
        let lines = error_lines(&err);
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(&key.display().to_string()), "{err}");
        assert!(lines[0].contains(says), "{err}");
        assert!(!err.contains(&secret[..12]), "the secret is echoed: {err}");
        assert!(!err.contains("TOPSECRET"), "{err}");
        assert!(!err.contains('\u{feff}'), "{err}");
    }
    assert!(!cache.exists(), "nothing was signed with the bad keys");
}

// ---------------------------------------------------------------------------------------
// 7. Terminal escapes in names of files set aside

#[test]
fn status_escapes_names_of_corrupt_files() {
    let env = Env::new();
    let queue = narpost::queue::Queue::open(&env.state()).expect("open the queue");
    let evil = "x\u{1b}]0;pwned\u{7}\u{1b}[2J.entry";
    fs::write(queue.queue_dir().join(evil), b"garbage").expect("plant a file");
    // The drainer's listing sets it aside.
    assert_eq!(queue.entries().expect("list").len(), 0);
    let out = run(env.narpost().arg("status"));
    let text = stdout(&out);
    assert!(text.contains("corrupt:"), "{text}");
    assert!(
        text.contains("x\\u{1b}]0;pwned\\u{7}\\u{1b}[2J.entry"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}') && !text.contains('\u{7}'),
        "{text:?}"
    );
    // JSON escapes it by itself.
    let json = status_json(&env);
    assert_eq!(
        json["corrupt"][0]["file"]
            .as_str()
            .map(|f| f.ends_with(evil)),
        Some(true),
        "{json}"
    );
}

// ---------------------------------------------------------------------------------------
// 3. A state directory someone else controls

/// `nobody`, the owner of the hostile directories (as root, any uid other than ours will do).
const NOBODY: u32 = 65534;

fn chown_nobody(path: &Path) {
    std::os::unix::fs::lchown(path, Some(NOBODY), Some(NOBODY)).expect("chown (needs root)");
}

fn mode(path: &Path) -> u32 {
    fs::symlink_metadata(path)
        .expect("stat")
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn a_state_directory_owned_by_someone_else_is_refused_and_nothing_is_written_through_its_links() {
    assert_eq!(
        rustix::process::geteuid().as_raw(),
        0,
        "these tests run as root"
    );
    let env = Env::new();
    let (key, _) = env.keygen("state-1");
    let cache = format!("file://{}", env.path().join("cache").display());
    // As a CI job or a user would find it at a predictable path: owned by nobody, its
    // subdirectories open to all, two links planted by its owner.
    let state = env.state();
    fs::create_dir(&state).expect("mkdir");
    for sub in ["queue", "tmp", "corrupt", "failed"] {
        fs::create_dir(state.join(sub)).expect("mkdir");
        fs::set_permissions(state.join(sub), fs::Permissions::from_mode(0o777)).expect("chmod");
        chown_nobody(&state.join(sub));
    }
    let victim = env.path().join("root-only");
    fs::write(&victim, "precious").expect("write");
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).expect("chmod");
    let created = env.path().join("created-by-root");
    let tmp_link = state.join(format!(".{}.tmp", narpost::daemon::STATE_FILE));
    let lock_link = state.join(narpost::daemon::LOCK_FILE);
    std::os::unix::fs::symlink(&victim, &tmp_link).expect("plant");
    std::os::unix::fs::symlink(&created, &lock_link).expect("plant");
    chown_nobody(&tmp_link);
    chown_nobody(&lock_link);
    chown_nobody(&state);
    let untouched = || {
        assert_eq!(fs::read_to_string(&victim).expect("read"), "precious");
        assert_eq!(mode(&victim), 0o600);
        assert!(
            fs::symlink_metadata(&created).is_err(),
            "{created:?} was created"
        );
    };

    let refused = |cmd: &mut Command, what: &str| {
        let started = Instant::now();
        let out = cmd.output().expect("run narpost");
        assert!(started.elapsed() < Duration::from_secs(10), "{what}");
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let err = stderr(&out);
        let lines = error_lines(&err);
        assert_eq!(lines.len(), 1, "{what}: {err}");
        lines[0].to_owned()
    };
    let daemon = || {
        let mut cmd = env.narpost();
        cmd.args(["daemon", "--to", &cache, "--key"]).arg(&key);
        cmd
    };
    let line = refused(&mut daemon(), "daemon");
    assert!(line.contains(&state.display().to_string()), "{line}");
    assert!(line.contains("owned by uid 65534"), "{line}");
    assert!(line.contains("--state-dir"), "says what to do: {line}");
    untouched();
    let key_arg = key.to_str().expect("UTF-8 path");
    let absent = "/nix/store/00000000000000000000000000000000-x";
    for cmd in [
        vec!["status"],
        // The embedded default key lives in the state directory,
        vec!["push", "--to", &cache, absent],
        // and so does the spool of a cache that has none of its own.
        vec![
            "push",
            "--to",
            "http://127.0.0.1:9",
            "--key",
            key_arg,
            absent,
        ],
    ] {
        let line = refused(env.narpost().args(&cmd), cmd[0]);
        assert!(line.contains("owned by uid 65534"), "{line}");
    }
    untouched();

    // The hook: exit 0 and one line, and the path keeps a GC root, from which the daemon
    // queues it once the directory is fixed.
    let built = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-narpost-t-refused";
    let gcroots = env.path().join("gcroots");
    let out = Command::new(env!("CARGO_BIN_EXE_narpost-hook"))
        .arg("--state-dir")
        .arg(&state)
        .env("NARPOST_GC_ROOTS_DIR", &gcroots)
        .env("OUT_PATHS", built)
        .env("DRV_PATH", "")
        .output()
        .expect("run narpost-hook");
    assert_eq!(out.status.code(), Some(0));
    let err = stderr(&out);
    let lines: Vec<_> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("owned by uid 65534"), "{err}");
    assert!(lines[0].contains(built), "names the path: {err}");
    assert_eq!(
        fs::read_link(gcroots.join(&built["/nix/store/".len()..])).expect("a GC root"),
        Path::new(built)
    );
    untouched();

    // Owned by us again, but with the planted links still there and the subdirectories
    // still someone else's: each is refused in turn, by name.
    std::os::unix::fs::lchown(&state, Some(0), Some(0)).expect("chown");
    let line = refused(&mut daemon(), "daemon, planted lock link");
    assert!(line.contains("symbolic link"), "{line}");
    untouched();
    fs::remove_file(&lock_link).expect("rm");
    let line = refused(&mut daemon(), "daemon, foreign subdirectories");
    assert!(line.contains("owned by uid 65534"), "{line}");
    assert!(
        ["queue", "tmp", "corrupt", "failed"]
            .iter()
            .any(|sub| line.contains(&state.join(sub).display().to_string())),
        "names the subdirectory: {line}"
    );
    for sub in ["queue", "tmp", "corrupt", "failed"] {
        std::os::unix::fs::lchown(state.join(sub), Some(0), Some(0)).expect("chown");
    }
    let line = refused(&mut daemon(), "daemon, subdirectories open to all");
    assert!(line.contains("mode 0777"), "{line}");
    assert!(line.contains("chmod go-w"), "{line}");
    untouched();
}

#[test]
fn directories_narpost_creates_are_private_and_a_planted_default_key_is_refused() {
    let env = Env::new();
    let state = env.state();
    let cache = env.path().join("cache");
    let path = build_one(&env, "private-dirs");
    // The embedded default key and the state directory are made on first use.
    run(env
        .narpost()
        .args(["push", "--to", &format!("file://{}", cache.display())])
        .arg(path.to_absolute()));
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("signing.sec")), 0o600);
    // A push to an HTTP cache spools in the state directory.
    let nginx = Nginx::start(env.path());
    run(env
        .narpost()
        .args(["push", "--to", &nginx.url()])
        .arg(path.to_absolute()));
    assert_eq!(mode(&state.join("spool")), 0o700);
    run(env.narpost().arg("status"));
    for sub in ["queue", "tmp", "corrupt", "failed"] {
        assert_eq!(mode(&state.join(sub)), 0o700, "{sub}");
    }

    // A default key swapped for a link (to a key someone else chose) is not used.
    let (other, _) = env.keygen("planted-1");
    fs::remove_file(state.join("signing.sec")).expect("rm");
    std::os::unix::fs::symlink(&other, state.join("signing.sec")).expect("plant");
    let out = env
        .narpost()
        .args([
            "push",
            "--to",
            &format!("file://{}", env.path().join("c2").display()),
        ])
        .arg(path.to_absolute())
        .output()
        .expect("run narpost");
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("signing.sec"), "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    let signed = fs::read_dir(env.path().join("c2"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".narinfo"))
        })
        .unwrap_or(false);
    assert!(!signed, "nothing was signed with the planted key");
}

// ---------------------------------------------------------------------------------------
// Terminal escapes in a server's error, and timeouts written as "never"

/// An Attic server whose error answer carries terminal escapes: `push` prints them
/// escaped, and the daemon's log and `status` hold no ESC byte either.
#[test]
fn terminal_escapes_in_an_attic_error_never_reach_the_terminal_the_log_or_status() {
    let env = Env::new();
    let path = build_one(&env, "attic-escapes");
    let port = hostile_server(|method, path, body| {
        if method == "PUT" && path == "/_api/v1/upload-path" {
            response(
                "400 Bad Request",
                "application/json",
                b"{\"error\":\"Bad\x1b[2J\",\"message\":\"evil\x1b]0;owned\x07 text\"}",
            )
        } else {
            attic_defaults(method, path, body)
        }
    });
    let url = format!("attic+http://127.0.0.1:{port}/main");
    let out = env
        .narpost()
        .args(["push", "--to", &url])
        .arg(path.to_absolute())
        .output()
        .expect("run push");
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(!out.stderr.contains(&0x1b), "{:?}", stderr(&out));
    assert!(stderr(&out).contains("\\u{1b}[2J"), "{}", stderr(&out));

    run(env
        .narpost()
        .arg("hook")
        .env("OUT_PATHS", path.to_absolute()));
    let log = env.path().join("daemon.log");
    let daemon = Background::spawn(
        env.narpost().env("NARPOST_CACHE", &url).arg("daemon"),
        &log,
        "narpost daemon",
    );
    wait_until(
        "the daemon to record the error",
        Duration::from_secs(30),
        || {
            status_json(&env)["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("evil"))
        },
    );
    let status = status_json(&env);
    assert!(!status.to_string().contains("\\u001b"), "{status}");
    let text = run(env.narpost().arg("status"));
    assert!(!text.stdout.contains(&0x1b), "{}", stdout(&text));
    assert_eq!(
        status["queue_depth"], 1,
        "a refusing cache keeps the path queued"
    );
    let (_, log_text) = daemon.terminate(Duration::from_secs(30));
    assert!(!log_text.as_bytes().contains(&0x1b), "{log_text:?}");
}

/// `http-timeout` written as the largest number TOML holds, the natural way to say
/// "never": pushes work instead of panicking on the first deadline.
#[test]
fn a_timeout_of_never_uploads_instead_of_panicking() {
    let env = Env::new();
    let nginx = Nginx::start(env.path());
    let (key, public) = env.keygen("never-1");
    let path = build_one(&env, "never-timeout");
    let config = env.path().join("narpost.toml");
    fs::write(&config, "http-timeout = 9223372036854775807\n").expect("write config");
    run(push_cmd(&env, &nginx.url(), &key, &path).env("NARPOST_CONFIG", &config));
    let out =
        run(push_cmd(&env, &nginx.url(), &key, &path)
            .env("NARPOST_HTTP_TIMEOUT", u64::MAX.to_string()));
    assert!(stderr(&out).contains("already cached"), "{}", stderr(&out));
    assert_substitutes(&env, &nginx.url(), &public, std::slice::from_ref(&path));
}
