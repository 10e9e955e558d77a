//! The local substituter: the daemon serves the cache to this machine's Nix, at
//! `http://<substituter-listen>` (off by default).
//!
//! Nix lists it in `substituters` like any binary cache. It answers `nix-cache-info` itself,
//! even while the cache is unreachable, and forwards every other read to the cache through
//! the target's read side, with narpost's own credentials: so Nix reads S3 buckets and
//! token-protected caches without any of their configuration, and a NAR passes through in
//! constant memory, chunk by chunk as the cache sends it. It is also where building once
//! across machines will answer from: the one place that sees Nix's question before a
//! build and can hold the answer.
//!
//! What Nix gets:
//!
//! - `GET /nix-cache-info`: `StoreDir`, `WantMassQuery: 1` and `Priority: 30` (ahead of
//!   cache.nixos.org's 40, so the fleet's cache is asked first).
//! - `GET /<hash>.narinfo`: the cache's narinfo, or 404. With build claims on (a cache
//!   that can be listed), a path the cache lacks is first looked up among the claims: while
//!   another machine builds it, the answer waits for that build ([`crate::claims`]). A
//!   cache that fails or cannot be reached also gets a 404, logged: Nix then builds the
//!   path, which is what it would do without this cache, where an error would fail the
//!   build (`fallback` is off by default).
//! - `GET /nar/<file>` and `GET /log/<drv>`: the object, streamed, or 404; an error from
//!   the cache before the first byte is a 502, one after it ends the connection (Nix
//!   retries the download).
//! - `HEAD` of the same, without a body. Nothing else: 404 for other names, 405 for other
//!   methods.
//!
//! Only loopback addresses make sense to listen on (it serves whatever the cache holds to
//! whoever connects); a request's head must arrive within a few seconds with few headers, and
//! past [`MAX_CONNECTIONS`] the oldest connection is closed.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use tokio_util::sync::CancellationToken;

use crate::cache::DynTarget;
use crate::claims::{Answer, Claims};

/// How long a client may take to send a request's head.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Headers a request may carry (curl sends a handful).
const MAX_HEADERS: usize = 32;
/// Connections served at once (Nix opens up to `http-connections`, 25 by default).
const MAX_CONNECTIONS: usize = 64;
/// A narinfo larger than this is not one.
const MAX_NARINFO: usize = 1 << 20;

/// Where `narpost setup --substituter` and the NixOS module put the local substituter.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:37515";

/// What `nix-cache-info` says.
pub const CACHE_INFO: &str = "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n";

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// Serves `target` at `addr` until `stop` fires. Call from within the runtime; returns once
/// it listens.
pub async fn serve(
    addr: std::net::SocketAddr,
    target: DynTarget,
    claims: Option<Arc<Claims>>,
    max_log_size: u64,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("substituter-listen = {addr}: cannot listen"))?;
    tracing::info!(
        "serving {} to this machine's Nix at http://{addr}",
        target.url()
    );
    crate::accept::spawn(
        listener,
        MAX_CONNECTIONS,
        "substituter",
        stop,
        move |stream| {
            let _ = stream.set_nodelay(true);
            let (target, claims) = (target.clone(), claims.clone());
            async move {
                let service = hyper::service::service_fn(move |req| {
                    let (target, claims) = (target.clone(), claims.clone());
                    async move { Ok::<_, Infallible>(respond(req, target, claims, max_log_size).await) }
                });
                // No small buffer limit here, unlike /metrics: it bounds the writes too, and a
                // NAR would go out a few KiB per write.
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(REQUEST_DEADLINE)
                    .max_headers(MAX_HEADERS)
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            }
        },
    );
    Ok(())
}

/// What a request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Asked<'a> {
    CacheInfo,
    Narinfo(&'a str),
    Nar(&'a str),
    Log(&'a str),
    Other,
}

fn route(path: &str) -> Asked<'_> {
    let Some(key) = path.strip_prefix('/') else {
        return Asked::Other;
    };
    if key == "nix-cache-info" {
        return Asked::CacheInfo;
    }
    // The cache checks names too; these are only what Nix asks for.
    let plain = |name: &str| {
        !name.is_empty()
            && !name.starts_with('.')
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-._?=".contains(&b))
    };
    if let Some(hash) = key.strip_suffix(".narinfo") {
        let nixbase32 =
            |b: u8| b.is_ascii_digit() || (b.is_ascii_lowercase() && !b"eout".contains(&b));
        if hash.len() == 32 && hash.bytes().all(nixbase32) {
            return Asked::Narinfo(key);
        }
        return Asked::Other;
    }
    if let Some(name) = key.strip_prefix("nar/")
        && plain(name)
    {
        return Asked::Nar(key);
    }
    if let Some(name) = key.strip_prefix("log/")
        && plain(name)
    {
        return Asked::Log(key);
    }
    Asked::Other
}

async fn respond(
    req: hyper::Request<hyper::body::Incoming>,
    target: DynTarget,
    claims: Option<Arc<Claims>>,
    max_log_size: u64,
) -> hyper::Response<Body> {
    let head = match *req.method() {
        hyper::Method::GET => false,
        hyper::Method::HEAD => true,
        _ => return text(405, "GET or HEAD only\n"),
    };
    let path = req.uri().path();
    match route(path) {
        Asked::CacheInfo => small(200, "text/x-nix-cache-info", CACHE_INFO.into(), head),
        Asked::Narinfo(key) => match target.read_small(key, MAX_NARINFO).await {
            Ok(Some(body)) => small(200, "text/x-nix-narinfo", body.into(), head),
            // Another machine may be building it: then the answer waits for that build.
            Ok(None) => match &claims {
                Some(claims) => {
                    let hash = key.trim_end_matches(".narinfo");
                    match claims.answer_miss(hash).await {
                        Answer::Narinfo(body) => {
                            small(200, "text/x-nix-narinfo", body.into(), head)
                        }
                        Answer::Miss => text(404, "not in the cache\n"),
                    }
                }
                None => text(404, "not in the cache\n"),
            },
            Err(e) => {
                // A 404 lets Nix build the path; an error would fail its build.
                tracing::warn!(
                    "substituter: {}; told Nix it is not in the cache",
                    e.message
                );
                text(404, "the cache could not be asked\n")
            }
        },
        Asked::Log(key) => match target.read_small(key, max_log_size as usize).await {
            Ok(Some(body)) => small(200, "text/plain; charset=utf-8", body.into(), head),
            Ok(None) => text(404, "not in the cache\n"),
            Err(e) => text(502, &format!("{}\n", e.message)),
        },
        Asked::Nar(key) if head => match target.object_size(key).await {
            Ok(Some(size)) => hyper::Response::builder()
                .status(200)
                .header("content-type", "application/x-nix-nar")
                .header("content-length", size)
                .body(empty())
                .unwrap_or_default(),
            Ok(None) => text(404, "not in the cache\n"),
            Err(e) => text(502, &format!("{}\n", e.message)),
        },
        Asked::Nar(key) => match target.read_stream(key).await {
            Ok(Some(object)) => {
                let path = key.to_owned();
                let frames = object.body.map(move |chunk| match chunk {
                    Ok(bytes) => Ok(Frame::data(bytes)),
                    Err(e) => {
                        tracing::warn!("substituter: {path}: {}", e.message);
                        Err(std::io::Error::other(e.message))
                    }
                });
                let mut response = hyper::Response::builder()
                    .status(200)
                    .header("content-type", "application/x-nix-nar");
                if let Some(size) = object.size {
                    response = response.header("content-length", size);
                }
                response
                    .body(BodyExt::boxed_unsync(StreamBody::new(frames)))
                    .unwrap_or_default()
            }
            Ok(None) => text(404, "not in the cache\n"),
            Err(e) => text(502, &format!("{}\n", e.message)),
        },
        Asked::Other => text(404, "not served here\n"),
    }
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn small(status: u16, ctype: &str, body: Bytes, head: bool) -> hyper::Response<Body> {
    let len = body.len();
    let body = if head { Bytes::new() } else { body };
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("content-length", len)
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .unwrap_or_default()
}

fn text(status: u16, body: &str) -> hyper::Response<Body> {
    small(
        status,
        "text/plain; charset=utf-8",
        Bytes::from(body.to_owned()),
        false,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_nix_asks_for_is_routed() {
        assert_eq!(route("/nix-cache-info"), Asked::CacheInfo);
        let narinfo = "/0123456789abcdfghijklmnpqrsvwxyz.narinfo";
        assert_eq!(route(narinfo), Asked::Narinfo(&narinfo[1..]));
        assert_eq!(
            route("/nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst"),
            Asked::Nar("nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.zst")
        );
        assert_eq!(route("/log/abc-hello.drv"), Asked::Log("log/abc-hello.drv"));
        for other in [
            "/",
            "",
            "/x.narinfo",
            "/eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee.narinfo",
            "/nar/",
            "/nar/../secret",
            "/nar/.narpost-spool.nar.zst",
            "/nar/a/b",
            "/claims/x",
            "/log/%2e%2e",
            "/realisations/sha256:abc!out.doi",
        ] {
            assert_eq!(route(other), Asked::Other, "{other}");
        }
    }
}
