//! The S3 target end to end, against a real S3 server that checks SigV4 signatures: s3s-fs
//! (installed by `scripts/install-s3s-fs`), started by each test on 127.0.0.1 with its own
//! access key and secret. s3s-fs keeps each object as a plain file at `<root>/<bucket>/<key>`,
//! so the bucket directory is a binary cache a fresh Nix store can substitute from with
//! `file://` (Debian's Nix 2.8 is built without S3 support), and that the cache-completeness
//! checker can read.

use crate::common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::s3::*;
use common::*;
use narpost::format::hash::Sha256;
use narpost::format::nixbase32;
use narpost::format::store_path::StorePath;

/// Bigger than narpost's multipart threshold even after zstd, since it is random.
const BIG_BYTES: u64 = 110_000_000;

/// A store path of 110 MB of random bytes, built once per test binary.
fn big_path() -> StorePath {
    static BIG: OnceLock<StorePath> = OnceLock::new();
    BIG.get_or_init(|| {
        let env = Env::new();
        let expr = format!(
            "{}mk \"narpost-s3-big\" \"mkdir $out && head -c {BIG_BYTES} /dev/urandom > $out/blob\"\n",
            nix_prelude(&nonce())
        );
        let file = env.write_nix("big.nix", &expr);
        let outs = nix_build(&file, &[], &[]);
        assert_eq!(outs.len(), 1, "{outs:?}");
        outs[0].clone()
    })
    .clone()
}

/// The rich closure plus the big path, under one new top. Returns (top, every path).
fn build_closure_with_big_path(env: &Env) -> (StorePath, Vec<StorePath>) {
    let big = big_path();
    let (rich_top, mut outs) = build_rich_closure(env);
    let expr = format!(
        r#"{}mk "narpost-s3-top" ''
  mkdir -p $out && echo ${{builtins.storePath "{}"}} ${{builtins.storePath "{}"}} > $out/refs
''
"#,
        nix_prelude(&nonce()),
        big.to_absolute(),
        rich_top.to_absolute()
    );
    let file = env.write_nix("top.nix", &expr);
    let top = nix_build(&file, &[], &[]).remove(0);
    outs.push(big);
    outs.push(top.clone());
    (top, outs)
}

/// Every file in `dir` (recursively) with its size and modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).into_iter().flatten().flatten() {
            let meta = entry.metadata().expect("stat");
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                out.insert(entry.path(), (meta.len(), meta.modified().expect("mtime")));
            }
        }
    }
    out
}

/// Every object in the bucket is whole: NARs are named by the hash of their content, so a
/// NAR file whose content does not hash to its name is a partial (or otherwise wrong)
/// object under a real key. Also: nothing but the cache's own kinds of key.
fn half_objects(cache: &CacheDir) -> Vec<String> {
    let mut problems = Vec::new();
    for (file, _) in snapshot(&cache.root) {
        let rel = file
            .strip_prefix(&cache.root)
            .expect("inside the bucket")
            .to_string_lossy()
            .into_owned();
        if rel == "nix-cache-info" || (rel.ends_with(".narinfo") && !rel.contains('/')) {
            continue;
        }
        // Build logs are whole objects too: each goes up in one PUT.
        if rel
            .strip_prefix("log/")
            .is_some_and(|drv| drv.ends_with(".drv") && !drv.contains('/'))
        {
            continue;
        }
        let Some(name) = rel
            .strip_prefix("nar/")
            .and_then(|n| n.strip_suffix(".nar.zst"))
        else {
            problems.push(format!("unexpected object {rel}"));
            continue;
        };
        let data = fs::read(&file).expect("read a NAR");
        if nixbase32::encode(Sha256::digest(&data).as_bytes()) != name {
            problems.push(format!(
                "{rel}: content does not match its name ({} bytes)",
                data.len()
            ));
        }
    }
    problems
}

#[test]
fn closure_with_a_110_mb_path_goes_up_multipart_and_substitutes() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let (top, outs) = build_closure_with_big_path(&env);
    let (key, public) = env.keygen("s3-test-1");
    // Through the config file alone; the credentials come from the standard environment.
    let config = s3_config(&env, &server.url(), &key);
    let push = || {
        let out = run(aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY)
            .arg("--config")
            .arg(&config)
            .arg("push")
            .arg(top.to_absolute()));
        stdout(&out) + &stderr(&out)
    };

    let started = Instant::now();
    let text = push();
    let took = started.elapsed();
    let cache = server.cache();
    let closure = nix_closure(std::slice::from_ref(&top));
    assert_eq!(cache.narinfos().len(), closure.len(), "{text}");
    cache.assert_complete();
    let problems = half_objects(&cache);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(!text.contains(SECRET_KEY), "the secret is never printed");

    // The big NAR went up in parts (its ETag is the multipart kind, `<md5>-<parts>`), and
    // every object carries the Content-Type Nix gives it.
    let big = big_path();
    let big_info = &cache.narinfos()[&big];
    assert!(big_info.file_size.expect("FileSize") > 100 * 1024 * 1024);
    let etag = server.object_record(&big_info.url, "internal")["e_tag"]
        .as_str()
        .expect("an ETag")
        .to_string();
    let parts: u32 = etag
        .rsplit_once('-')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or_else(|| panic!("{}: single-part ETag {etag}", big_info.url));
    assert!(parts >= 2, "{etag}");
    for (key, content_type) in [
        (format!("{}.narinfo", top.hash_part()), "text/x-nix-narinfo"),
        (big_info.url.clone(), "application/x-nix-nar"),
        ("nix-cache-info".to_string(), "text/x-nix-cache-info"),
    ] {
        assert_eq!(
            server.object_record(&key, "metadata")["content_type"],
            content_type,
            "{key}"
        );
    }

    assert_substitutes(&env, &server.file_url(), &public, &outs);

    // Second push: nothing is uploaded, and it says so.
    let before = snapshot(&server.bucket_dir());
    let text = push();
    assert!(
        text.contains(&format!("all {} paths were already cached", closure.len())),
        "{text}"
    );
    assert_eq!(
        snapshot(&server.bucket_dir()),
        before,
        "a second push changed the bucket"
    );
    eprintln!("pushed {} paths incl. 110 MB in {took:?}", closure.len());
}

#[test]
fn wrong_credentials_missing_bucket_and_dead_endpoint_are_one_line_each() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let (top, _) = build_rich_closure(&env);
    let (key, _) = env.keygen("s3-test-2");
    let fail = |url: &str, access: &str, secret: &str| {
        let out = aws_env(&mut env.narpost(), &env, access, secret)
            .args(["push", "--to", url, "--key"])
            .arg(&key)
            .arg(top.to_absolute())
            .output()
            .expect("run narpost");
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        // Progress lines about retries may come first; the error itself is one line.
        let lines: Vec<&str> = err
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with("hint:"))
            .filter(|l| !l.contains("; retrying in "))
            .collect();
        assert_eq!(lines.len(), 1, "one line, then a hint:\n{err}");
        assert!(lines[0].starts_with("narpost: s3://"), "{err}");
        assert!(err.contains("\nhint: "), "{err}");
        assert!(!err.contains(secret), "the secret is never printed: {err}");
        err
    };
    // Retrying cannot fix credentials or a missing bucket, so those fail at once.
    let not_retried = |err: &str| assert!(!err.contains("retrying"), "{err}");

    let err = fail(&server.url(), ACCESS_KEY, "not-the-secret");
    assert!(err.contains("s3://cache"), "{err}");
    assert!(err.contains("rejected the credentials"), "{err}");
    assert!(err.contains("AWS_SECRET_ACCESS_KEY"), "{err}");
    not_retried(&err);

    let err = fail(&server.url(), "nobody", SECRET_KEY);
    assert!(err.contains("rejected the credentials"), "{err}");
    not_retried(&err);

    let err = fail(
        &s3_url("nosuch", &server.endpoint()),
        ACCESS_KEY,
        SECRET_KEY,
    );
    assert!(err.contains("bucket nosuch does not exist"), "{err}");
    not_retried(&err);
    assert!(!server.root.join("nosuch").exists());

    let dead = format!("http://127.0.0.1:{}", free_port());
    let err = fail(&s3_url(BUCKET, &dead), ACCESS_KEY, SECRET_KEY);
    assert!(
        err.contains(&format!("cannot reach the server at {dead}")),
        "{err}"
    );

    // Nothing was uploaded by any of them.
    assert!(
        snapshot(&server.bucket_dir()).is_empty(),
        "{:?}",
        snapshot(&server.bucket_dir())
    );
}

/// A TCP proxy that lets at most `bytes_per_sec` through per connection towards the server,
/// so a test can act while a large upload is under way.
struct SlowProxy {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl SlowProxy {
    fn start(upstream: u16, bytes_per_sec: u64) -> SlowProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || pump(client, server, Some(bytes_per_sec)));
                std::thread::spawn(move || pump(s2, c2, None));
            }
        });
        SlowProxy { port, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, rate: Option<u64>) {
    let mut buf = vec![0u8; 64 * 1024];
    let started = Instant::now();
    let mut sent = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        sent += n as u64;
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let _ = to.shutdown(Shutdown::Both);
    let _ = from.shutdown(Shutdown::Both);
}

#[test]
fn server_killed_during_a_multipart_upload_leaves_no_half_object_and_a_later_push_completes() {
    let env = Env::new();
    let mut server = S3Server::start(env.path());
    let (top, outs) = build_closure_with_big_path(&env);
    let (key, public) = env.keygen("s3-test-3");
    let big = big_path();
    // 24 MB/s per connection: the 110 MB NAR takes seconds, long enough to kill the server
    // between its parts.
    let proxy = SlowProxy::start(server.port, 24 << 20);
    let slow_url = s3_url(BUCKET, &proxy.endpoint());

    let mut push = Background::spawn(
        aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY)
            .args(["push", "--to", &slow_url, "--key"])
            .arg(&key)
            .arg(top.to_absolute()),
        &env.path().join("push.log"),
        "narpost push",
    );
    wait_until(
        "a part of the big NAR to land",
        Duration::from_secs(60),
        || {
            push.assert_running();
            server.landed_parts() >= 1
        },
    );
    server.kill();

    // The push gives up on the big path (and its referrer) after its retries.
    let deadline = Instant::now() + Duration::from_secs(120);
    let (status, log) = loop {
        if let Some(done) = push.try_finish() {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "push did not give up: {}",
            push.output()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "{log}");
    let cache = server.cache();
    assert!(!cache.has(&big), "{log}");
    assert!(!cache.has(&top), "{log}");
    cache.assert_complete();
    let problems = half_objects(&cache);
    assert!(problems.is_empty(), "{}", problems.join("\n"));

    server.resume();
    let out = run(aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY)
        .args(["push", "--to", &server.url(), "--key"])
        .arg(&key)
        .arg(top.to_absolute()));
    let text = stdout(&out) + &stderr(&out);
    assert_eq!(
        cache.narinfos().len(),
        nix_closure(std::slice::from_ref(&top)).len(),
        "{text}"
    );
    cache.assert_complete();
    let problems = half_objects(&cache);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_substitutes(&env, &server.file_url(), &public, &outs);
}

#[test]
fn daemon_drains_the_hook_queue_into_s3_through_the_config_file_alone() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let (key, public) = env.keygen("s3-test-4");
    // Below a prefix in the bucket, as a fleet sharing one bucket would have it.
    let url = format!(
        "s3://{BUCKET}/fleet/x86_64?region=us-east-1&endpoint={}",
        server.endpoint()
    );
    let config = s3_config(&env, &url, &key);
    let (top, outs) = build_rich_closure(&env);
    hook_with_config(&env, &config, &outs);

    let mut daemon = spawn_with_config(
        &env,
        aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY),
        &config,
        "daemon",
    );
    let closure = nix_closure(&[top]);
    let prefix_dir = server.bucket_dir().join("fleet/x86_64");
    let cache = CacheDir::new(&prefix_dir);
    wait_until(
        "the daemon to drain the queue",
        Duration::from_secs(60),
        || {
            daemon.assert_running();
            cache.narinfos().len() == closure.len() && queue_depth(&env, &config) == 0
        },
    );
    let (status, log) = daemon.terminate(Duration::from_secs(30));
    assert!(status.success(), "{status}: {log}");
    cache.assert_complete();
    assert!(prefix_dir.join("nix-cache-info").is_file());
    let bucket_root: Vec<String> = fs::read_dir(server.bucket_dir())
        .expect("list the bucket")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        bucket_root,
        vec!["fleet".to_string()],
        "nothing outside the prefix"
    );
    let url = format!("file://{}", prefix_dir.display());
    assert_substitutes(&env, &url, &public, &outs);
}

#[test]
fn watch_store_pushes_new_builds_to_s3_through_the_config_file_alone() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let (key, public) = env.keygen("s3-test-5");
    let config = s3_config(&env, &server.url(), &key);
    // Other tests build in the same store meanwhile, and the watcher pushes their paths
    // too; a short drain timeout keeps SIGTERM from waiting for those.
    append_to_config(&config, "drain-timeout = 5\n");
    let mut watcher = spawn_with_config(
        &env,
        aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY),
        &config,
        "watch-store",
    );
    watcher.wait_for_output("narpost: watching", Duration::from_secs(30));

    let (top, outs) = build_rich_closure(&env);
    let cache = server.cache();
    wait_until(
        "watch-store to push the new build",
        Duration::from_secs(60),
        || {
            watcher.assert_running();
            outs.iter().all(|p| cache.has(p))
        },
    );
    let (status, log) = watcher.terminate(Duration::from_secs(60));
    assert!(status.success(), "{status}: {log}");
    cache.assert_complete();
    assert_substitutes(&env, &server.file_url(), &public, &[top]);
}

#[test]
fn build_logs_go_to_the_bucket_where_nix_log_reads_them() {
    let env = Env::new();
    let server = S3Server::start(env.path());
    let marker = format!("s3-log-{}", nonce());
    let expr = format!(
        r#"{prelude}{{
  talk = mk "narpost-s3-log" ''
    echo "the build says {marker}"
    echo done > $out
  '';
}}
"#,
        prelude = nix_prelude(&nonce())
    );
    let out = nix_build(&env.write_nix("talk.nix", &expr), &["talk"], &[]).remove(0);
    let drv = stdout(&run(nix("nix-store").args(["-qd", &out.to_absolute()])));
    let drv = StorePath::from_absolute(drv.trim()).expect("a deriver");
    let (key, _) = env.keygen("s3-test-1");
    let config = s3_config(&env, &server.url(), &key);
    let out_text = run(aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY)
        .arg("--config")
        .arg(&config)
        .arg("push")
        .arg(out.to_absolute()));
    let text = stdout(&out_text) + &stderr(&out_text);
    assert!(text.contains("1 build log uploaded"), "{text}");
    let log_key = format!("log/{}", drv.base());
    assert_eq!(
        server.object_record(&log_key, "metadata")["content_type"],
        "text/plain; charset=utf-8"
    );
    // The bucket's files as Nix reads a cache (Debian's Nix has no S3 support).
    let printed = stdout(&run(nix("nix")
        .args(["log", "--store", &server.file_url()])
        .arg(out.to_absolute())));
    assert!(
        printed.contains(&format!("the build says {marker}")),
        "{printed}"
    );
}
