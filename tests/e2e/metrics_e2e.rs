//! `metrics-listen`: the daemon's Prometheus metrics, scraped over real HTTP while it drains
//! into a real nginx, agree with `narpost status --json` and with what is in the cache.

use crate::common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// `GET path` over a plain connection: (status line, body).
fn get(port: u16, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the metrics port");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the response");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Every sample of a scrape: `name{labels}` -> value.
fn scrape(port: u16) -> BTreeMap<String, f64> {
    let (status, body) = get(port, "/metrics");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (name, value) = l.rsplit_once(' ').expect("a sample line");
            (name.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

fn status(env: &Env) -> serde_json::Value {
    serde_json::from_slice(&run(env.narpost().args(["status", "--json"])).stdout)
        .expect("status --json prints JSON")
}

#[test]
fn metrics_agree_with_status_while_the_cache_is_down_and_after_the_drain() {
    let env = Env::new();
    let mut nginx = Nginx::start(env.path());
    let (key, _) = env.keygen("metrics-1");
    let file = env.write_nix(
        "metrics.nix",
        &format!(
            "{}{{\n{}}}\n",
            nix_prelude(&nonce()),
            (0..3)
                .map(|i| format!(
                    "  p{i} = mk \"narpost-metrics-{i}\" \"head -c {}K /dev/urandom > $out\";\n",
                    100 * (i + 1)
                ))
                .collect::<String>()
        ),
    );
    let paths = nix_build(&file, &["p0", "p1", "p2"], &[]);
    assert_eq!(paths.len(), 3);
    for p in &paths {
        run(env.narpost().arg("hook").env("OUT_PATHS", p.to_absolute()));
    }

    nginx.stop();
    let port = free_port();
    let log = env.path().join("daemon.log");
    let mut daemon = Background::spawn(
        env.narpost()
            .env("NARPOST_CACHE", nginx.url())
            .env("NARPOST_KEY_FILE", &key)
            .env("NARPOST_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .arg("daemon"),
        &log,
        "narpost daemon",
    );
    wait_for_port(port, Duration::from_secs(20));

    // The cache is down: everything queued, and both say so.
    wait_until(
        "status to show the cache down",
        Duration::from_secs(30),
        || !status(&env)["cache_down_since"].is_null(),
    );
    let m = scrape(port);
    let s = status(&env);
    eprintln!("{m:#?}\n{s:#}");
    assert_eq!(
        m["narpost_queue_depth"],
        s["queue_depth"].as_f64().expect("depth")
    );
    assert_eq!(m["narpost_queue_depth"], 3.0);
    assert_eq!(m["narpost_cache_up"], 0.0);
    let age = s["oldest_entry_age_secs"]
        .as_f64()
        .expect("an oldest entry");
    assert!(
        (m["narpost_queue_oldest_entry_age_seconds"] - age).abs() <= 2.0,
        "{m:?} vs {s}"
    );
    assert_eq!(m["narpost_paths_pushed_total"], 0.0);

    // Back up: the drain goes through, and the counters match status and the cache.
    nginx.resume();
    wait_until("the queue to drain", Duration::from_secs(60), || {
        status(&env)["queue_depth"] == 0
    });
    wait_until("the cache to count as up", Duration::from_secs(20), || {
        scrape(port)["narpost_cache_up"] == 1.0
    });
    let m = scrape(port);
    let s = status(&env);
    eprintln!("{m:#?}\n{s:#}");
    assert_eq!(m["narpost_queue_depth"], 0.0);
    assert_eq!(m["narpost_queue_oldest_entry_age_seconds"], 0.0);
    assert_eq!(
        m["narpost_paths_pushed_total"],
        s["pushed_since_start"].as_f64().expect("pushed")
    );
    assert_eq!(m["narpost_paths_pushed_total"], 3.0);
    assert_eq!(m["narpost_upload_duration_seconds_count"], 3.0);
    assert!(m["narpost_upload_duration_seconds_sum"] > 0.0);
    assert_eq!(
        m["narpost_upload_duration_seconds_bucket{le=\"+Inf\"}"],
        3.0
    );
    let cache = nginx.cache();
    let stored: u64 = paths
        .iter()
        .map(|p| cache.narinfos()[p].file_size.expect("FileSize"))
        .sum();
    assert_eq!(m["narpost_pushed_bytes_total"], stored as f64);
    assert!(m.contains_key("narpost_upload_retries_total"), "{m:?}");

    // Nothing else is served; a request head past the size limit is refused.
    let (status_line, _) = get(port, "/");
    assert!(status_line.contains(" 404 "), "{status_line}");
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let _ = write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(!answer.contains(" 200 "), "{answer}");
    daemon.assert_running();
}

/// 64 clients that open a connection and send half a request head never keep a scrape out:
/// each of four real scrapes is answered within seconds while they hang on.
#[test]
fn scrapes_get_through_while_64_clients_stall_half_way_through_their_request() {
    let env = Env::new();
    let (key, _) = env.keygen("metrics-slow-1");
    let port = free_port();
    let log = env.path().join("daemon.log");
    let mut daemon = Background::spawn(
        env.narpost()
            .env(
                "NARPOST_CACHE",
                format!("file://{}", env.path().join("cache").display()),
            )
            .env("NARPOST_KEY_FILE", &key)
            .env("NARPOST_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .arg("daemon"),
        &log,
        "narpost daemon",
    );
    wait_for_port(port, Duration::from_secs(20));
    let stalled: Vec<TcpStream> = (0..64)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .expect("half a request");
            s
        })
        .collect();
    for _ in 0..4 {
        let started = std::time::Instant::now();
        let m = scrape(port);
        assert!(m.contains_key("narpost_queue_depth"), "{m:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a scrape took {:?} behind stalled clients",
            started.elapsed()
        );
    }
    drop(stalled);
    daemon.assert_running();
}
