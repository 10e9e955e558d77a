//! The daemon's local substituter (`substituter-listen`): this machine's Nix substitutes
//! through it, from a cache only narpost has the credentials for.

use crate::common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::s3::*;
use common::*;

/// `GET path` on the substituter: (status, body).
fn get(port: u16, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the substituter");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("set a read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("read the answer");
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn nix_substitutes_through_the_daemon_from_an_s3_bucket_and_a_down_cache_is_a_miss() {
    let env = Env::new();
    let mut server = S3Server::start(env.path());
    let (key, public) = env.keygen("substituter-1");
    let config = s3_config(&env, &server.url(), &key);
    let port = free_port();
    append_to_config(
        &config,
        &format!("substituter-listen = \"127.0.0.1:{port}\"\n"),
    );
    let (top, outs) = build_rich_closure(&env);
    hook_with_config(&env, &config, &outs);
    let daemon = spawn_with_config(
        &env,
        aws_env(&mut env.narpost(), &env, ACCESS_KEY, SECRET_KEY),
        &config,
        "daemon",
    );
    wait_for_port(port, Duration::from_secs(20));
    let cache = server.cache();
    wait_until(
        "the daemon to push the closure",
        Duration::from_secs(60),
        || queue_depth(&env, &config) == 0 && cache.has(&top),
    );

    assert_eq!(
        get(port, "/nix-cache-info"),
        (200, narpost::substituter::CACHE_INFO.to_owned())
    );
    // Debian's Nix has no S3 support and no credentials: it reads the bucket through narpost.
    let url = format!("http://127.0.0.1:{port}");
    assert_substitutes(&env, &url, &public, std::slice::from_ref(&top));
    assert_eq!(
        get(port, "/00000000000000000000000000000000.narinfo").0,
        404
    );
    assert_eq!(get(port, "/nar/../narpost.toml").0, 404);

    // The cache gone: Nix still gets the cache info, and a miss (it builds) rather than an
    // error (which would fail its build).
    server.kill();
    assert_eq!(get(port, "/nix-cache-info").0, 200);
    let (status, body) = get(port, &format!("/{}.narinfo", top.hash_part()));
    assert_eq!(status, 404, "{body}");
    let (_, log) = daemon.terminate(Duration::from_secs(20));
    assert!(
        log.contains("told Nix it is not in the cache"),
        "the miss is logged:\n{log}"
    );
}
