//! `http://` and `https://` binary caches that accept PUT (nginx WebDAV and the like): the
//! same requests `nix copy --to http://...` makes.
//!
//! - `open`: `GET nix-cache-info` (a `404` gets one written: `StoreDir: /nix/store\n`, exactly
//!   what Nix 2.8 writes); an answer without a `StoreDir` line (an HTML page, a login form)
//!   means the URL is not a binary cache. Then `HEAD` of a narinfo that cannot exist: a
//!   server answering `200` to it would make every existence check say "present", and
//!   narpost would skip uploads that never happened, so such a cache is refused.
//! - `missing`: `HEAD <hashpart>.narinfo`, at most [`MAX_IN_FLIGHT`] at once; `200` present,
//!   `404` missing.
//! - `put_nar`: `PUT nar/<filehash>.nar.zst`, streamed from the spooled file with its
//!   `Content-Length`. Servers like nginx keep an upload in a temporary file until the body
//!   is complete, so an aborted upload leaves nothing under the real name.
//! - `put_narinfo`: `PUT <hashpart>.narinfo`, the commit point.
//!
//! This target takes zstd NARs only: a raw NAR is refused as a permanent error, because the
//! narinfo the pipeline writes for a raw body has no `FileHash` and the layout Nix expects
//! from an HTTP cache is the compressed one.
//!
//! # Timeouts
//!
//! A hung server must turn into an error, never a stuck upload, but a multi-gigabyte NAR on
//! a slow link legitimately takes hours, so there is no total timeout on NAR uploads.
//! Instead a watchdog fails the upload when the connection has taken no new body data for
//! the read timeout, and, once the whole body has been handed over, when no answer arrives
//! within [`stall::ANSWER_TIMEOUT_FACTOR`] times it (the socket buffers may still hold megabytes
//! that a slow link has to drain first). Small requests (`HEAD`, `GET`, narinfo `PUT`) get
//! the read timeout as a total. reqwest's own `read_timeout` is not used: it runs from the
//! start of the request to the response headers, which would cut long uploads short.
//!
//! Redirects are not followed: a streamed body cannot be sent twice, and a cache that
//! redirects is better named by the URL it redirects to.
//!
//! Status mapping: connection failures, timeouts, `5xx`, `408` and `429` are transient;
//! `401`/`403` are authentication errors; any other answer is permanent, which means a push
//! does not retry it, each with a hint at the server setting to fix (a 413 is nginx's
//! `client_max_body_size`); the daemon keeps the path queued until it is fixed.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};

use super::stall::{self, Progress};
use super::{NarBody, NarFormat, ObjectStream, PreparedNar, Target, TargetError};
use crate::format::cache_info::CacheInfo;
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

/// Existence checks in flight at once: enough to hide latency, few enough not to look like
/// an attack to a small server.
pub const MAX_IN_FLIGHT: usize = 32;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a connection may show no progress. nginx's own body timeout is 60 s too.
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// `nix-cache-info` answers longer than this are not cache infos (and not worth reading).
const MAX_CACHE_INFO: usize = 64 * 1024;

/// A WebDAV listing longer than this is not read (about 400,000 narinfos).
const MAX_LISTING: usize = 64 << 20;

/// Chunk size for streaming a spooled NAR.
const UPLOAD_CHUNK: usize = 256 * 1024;

/// Credentials for the cache. Read by the caller from files or the environment; they are
/// never printed, and [`HttpTarget::url`] leaves them out.
#[derive(Clone)]
pub enum HttpAuth {
    None,
    Bearer(String),
    Basic { user: String, password: String },
}

impl fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpAuth::None => f.write_str("None"),
            HttpAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            HttpAuth::Basic { user, .. } => {
                write!(f, "Basic {{ user: {user:?}, password: <redacted> }}")
            }
        }
    }
}

pub struct HttpTarget {
    /// Where objects go: ends with `/`, holds no credentials, query or fragment.
    base: Url,
    /// The cache as shown to the user: `base` without the trailing slash.
    display: String,
    auth: HttpAuth,
    compression_level: i32,
    client: reqwest::Client,
    /// Longest stretch without progress on a connection; the total for small requests.
    read_timeout: Duration,
}

impl HttpTarget {
    /// `base` is the cache's root URL (`http(s)://host[:port][/path]`). Credentials in it
    /// (`http://user:password@host`) are taken as basic authentication.
    pub fn new(base: String, auth: HttpAuth, compression_level: i32) -> Result<Self, TargetError> {
        let (base, auth) = parse_base(&base, auth)?;
        let display = base.as_str().trim_end_matches('/').to_string();
        if let Some(problem) = super::tls::https_without_roots(&display) {
            return Err(TargetError::permanent(problem));
        }
        Ok(HttpTarget {
            client: build_client(DEFAULT_CONNECT_TIMEOUT)?,
            base,
            display,
            auth,
            compression_level,
            read_timeout: DEFAULT_READ_TIMEOUT,
        })
    }

    /// Replaces the default timeouts (10 s to connect, 60 s without progress).
    pub fn with_timeouts(mut self, connect: Duration, read: Duration) -> Result<Self, TargetError> {
        self.client = build_client(connect)?;
        self.read_timeout = read;
        Ok(self)
    }

    fn object_url(&self, key: &str) -> Result<Url, TargetError> {
        self.base.join(key).map_err(|e| {
            TargetError::permanent(format!("{}/{key}: not a valid URL: {e}", self.display))
        })
    }

    /// The names directly below the WebDAV collection `url` (`PROPFIND`, depth 1), or
    /// `None` when the server does not list; a collection that does not exist is empty.
    async fn propfind(&self, url: Url) -> Result<Option<Vec<String>>, TargetError> {
        let method = Method::from_bytes(b"PROPFIND")
            .map_err(|e| TargetError::permanent(format!("PROPFIND: {e}")))?;
        let request = self
            .request(method, url.clone())
            .header("Depth", "1")
            .header(CONTENT_TYPE, "application/xml")
            .body(r#"<?xml version="1.0"?><propfind xmlns="DAV:"><prop><resourcetype/></prop></propfind>"#);
        let response = request
            .timeout(self.read_timeout * stall::ANSWER_TIMEOUT_FACTOR)
            .send()
            .await
            .map_err(|e| transport_error(&url, &e, self.read_timeout))?;
        let status = response.status();
        match status.as_u16() {
            207 => {}
            404 => return Ok(Some(Vec::new())),
            401 | 403 => return Err(status_error(&url, &response)),
            _ => return Ok(None),
        }
        let answer = stall::read_answer(
            response,
            MAX_LISTING,
            self.read_timeout * stall::ANSWER_TIMEOUT_FACTOR,
        )
        .await
        .map_err(|e| answer_error(&url, status, e))?;
        if answer.truncated {
            return Err(TargetError::permanent(format!(
                "{url}: the listing is larger than {MAX_LISTING} bytes"
            ))
            .with_hint("name the paths to check"));
        }
        Ok(Some(names_in_listing(&String::from_utf8_lossy(
            &answer.body,
        ))))
    }

    fn request(&self, method: Method, url: Url) -> RequestBuilder {
        let request = self.client.request(method, url);
        match &self.auth {
            HttpAuth::None => request,
            HttpAuth::Bearer(token) => request.bearer_auth(token),
            HttpAuth::Basic { user, password } => request.basic_auth(user, Some(password)),
        }
    }

    /// Sends a request whose whole exchange should fit in one read timeout.
    async fn send_small(
        &self,
        request: RequestBuilder,
        url: &Url,
    ) -> Result<Response, TargetError> {
        request
            .timeout(self.read_timeout)
            .send()
            .await
            .map_err(|e| transport_error(url, &e, self.read_timeout))
    }

    /// `Some(true)` for 200, `Some(false)` for 404, an error otherwise.
    async fn exists(&self, key: &str) -> Result<bool, TargetError> {
        let url = self.object_url(key)?;
        let response = self
            .send_small(self.request(Method::HEAD, url.clone()), &url)
            .await?;
        match response.status() {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(status_error(&url, &response)),
        }
    }

    async fn narinfo_exists(&self, path: StorePath) -> Result<(StorePath, bool), TargetError> {
        let present = self
            .exists(&format!("{}.narinfo", path.hash_part()))
            .await?;
        Ok((path, present))
    }

    async fn put_small(
        &self,
        key: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<(), TargetError> {
        let url = self.object_url(key)?;
        let request = self
            .request(Method::PUT, url.clone())
            .header(CONTENT_TYPE, content_type)
            .body(body);
        let response = self.send_small(request, &url).await?;
        expect_success(&url, response, self.read_timeout).await
    }

    async fn check_cache_info(&self) -> Result<(), TargetError> {
        let url = self.object_url("nix-cache-info")?;
        let response = self
            .send_small(self.request(Method::GET, url.clone()), &url)
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => {
                return self
                    .put_small(
                        "nix-cache-info",
                        "text/x-nix-cache-info",
                        CacheInfo::ours().into_bytes(),
                    )
                    .await;
            }
            _ => return Err(status_error(&url, &response)),
        }
        let status = response.status();
        let answer = stall::read_answer(response, MAX_CACHE_INFO, self.read_timeout)
            .await
            .map_err(|e| answer_error(&url, status, e))?;
        let text = String::from_utf8_lossy(&answer.body);
        CacheInfo::check(&text).map(drop).map_err(|what| {
            TargetError::permanent(format!(
                "{url}: {what}; {} doesn't look like a binary cache",
                self.display
            ))
            .with_hint("use the URL of the directory that holds nix-cache-info")
        })
    }

    async fn put_spooled(&self, key: &str, spooled: &super::SpooledNar) -> Result<(), TargetError> {
        let url = self.object_url(key)?;
        let file = tokio::fs::File::open(&spooled.file).await.map_err(|e| {
            TargetError::transient(format!(
                "{}: cannot open spooled NAR: {e}",
                spooled.file.display()
            ))
        })?;
        let len = file
            .metadata()
            .await
            .map_err(|e| {
                TargetError::transient(format!(
                    "{}: cannot stat spooled NAR: {e}",
                    spooled.file.display()
                ))
            })?
            .len();
        if len != spooled.file_size {
            return Err(TargetError::permanent(format!(
                "{}: spooled NAR is {len} bytes, but its FileSize is {}",
                spooled.file.display(),
                spooled.file_size
            )));
        }

        let progress = Arc::new(Progress::new());
        let touch = progress.clone();
        let body =
            tokio_util::io::ReaderStream::with_capacity(file, UPLOAD_CHUNK).inspect(move |chunk| {
                // An unreadable spool aborts the request (and the server discards the body).
                if chunk.is_ok() {
                    touch.touch();
                }
            });
        let finished = progress.clone();
        let body = body.chain(futures::stream::poll_fn(move |_| {
            // Runs once, when the file is exhausted: from here on the answer is awaited.
            finished.finish();
            std::task::Poll::Ready(None)
        }));
        let request = self
            .request(Method::PUT, url.clone())
            .header(CONTENT_TYPE, "application/x-nix-nar")
            .header(CONTENT_LENGTH, len)
            .body(reqwest::Body::wrap_stream(body));
        let response = self.watch(request.send(), &progress, &url).await?;
        expect_success(&url, response, self.read_timeout).await
    }

    /// Drives `send` and fails it when `progress` stalls (see the module doc).
    async fn watch(
        &self,
        send: impl Future<Output = Result<Response, reqwest::Error>>,
        progress: &Progress,
        url: &Url,
    ) -> Result<Response, TargetError> {
        match stall::watch(send, progress, self.read_timeout).await {
            Ok(result) => result.map_err(|e| transport_error(url, &e, self.read_timeout)),
            Err(stalled) => Err(TargetError::transient(format!(
                "{url}: timed out: {} for {}",
                stalled.what(),
                human_duration(stalled.waited)
            ))),
        }
    }
}

#[async_trait]
impl Target for HttpTarget {
    fn url(&self) -> String {
        self.display.clone()
    }

    fn nar_format(&self) -> NarFormat {
        NarFormat::Zstd {
            level: self.compression_level,
        }
    }

    async fn open(&self) -> Result<(), TargetError> {
        self.check_cache_info().await?;
        let probe = format!("{}.narinfo", impossible_hash_part());
        if self.exists(&probe).await? {
            return Err(TargetError::permanent(format!(
                "{}: cache answers 200 for narinfos it cannot have ({probe}); refusing to trust its existence checks",
                self.display
            ))
            .with_hint("check the cache URL and the server's configuration (a catch-all route or a login page?)"));
        }
        Ok(())
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        let paths: Vec<StorePath> = paths.iter().map(|info| info.path.clone()).collect();
        futures::stream::iter(paths)
            .map(|path| self.narinfo_exists(path))
            .buffer_unordered(MAX_IN_FLIGHT)
            .try_fold(HashSet::new(), |mut missing, (path, present)| async move {
                if !present {
                    missing.insert(path);
                }
                Ok(missing)
            })
            .await
    }

    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
        match &nar.body {
            NarBody::Spooled(spooled) => {
                let key = spooled.cache_key();
                self.put_spooled(&key, spooled).await?;
                Ok(key)
            }
            NarBody::Raw(_) => Err(TargetError::permanent(format!(
                "{}: this cache stores zstd-compressed NARs, but was handed an uncompressed one for {}",
                self.display,
                nar.info.path.to_absolute()
            ))),
        }
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, _nar: &PreparedNar) -> Result<(), TargetError> {
        let key = format!("{}.narinfo", narinfo.store_path.hash_part());
        self.put_small(&key, "text/x-nix-narinfo", narinfo.to_string().into_bytes())
            .await
    }

    fn stores_logs(&self) -> bool {
        true
    }

    async fn put_log(&self, drv: &StorePath, log: bytes::Bytes) -> Result<(), TargetError> {
        self.put_small(&super::log_key(drv), super::LOG_TYPE, log.to_vec())
            .await
    }

    async fn read_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        let url = self.object_url(super::object_key(key)?)?;
        let response = self
            .send_small(self.request(Method::GET, url.clone()), &url)
            .await?;
        let status = response.status();
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(&url, &response)),
        }
        let answer = stall::read_answer(response, limit, self.read_timeout)
            .await
            .map_err(|e| answer_error(&url, status, e))?;
        if answer.truncated {
            return Err(TargetError::permanent(format!(
                "{url}: larger than {limit} bytes"
            )));
        }
        Ok(Some(answer.body))
    }

    async fn object_size(&self, key: &str) -> Result<Option<u64>, TargetError> {
        let url = self.object_url(super::object_key(key)?)?;
        let response = self
            .send_small(self.request(Method::HEAD, url.clone()), &url)
            .await?;
        match response.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(&url, &response)),
        }
        response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .map(Some)
            .ok_or_else(|| {
                TargetError::permanent(format!("{url}: the server gave no Content-Length"))
            })
    }

    async fn read_stream(&self, key: &str) -> Result<Option<ObjectStream>, TargetError> {
        let url = self.object_url(super::object_key(key)?)?;
        // No total timeout: a large NAR may take long; stalling is what fails it.
        let response = self
            .request(Method::GET, url.clone())
            .send()
            .await
            .map_err(|e| transport_error(&url, &e, self.read_timeout))?;
        let status = response.status();
        match status {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND => return Ok(None),
            _ => return Err(status_error(&url, &response)),
        }
        let size = response.content_length();
        let body = stall::answer_stream(response, self.read_timeout, move |e| {
            answer_error(&url, status, e)
        });
        Ok(Some(ObjectStream { size, body }))
    }

    async fn remove(&self, key: &str) -> Result<(), TargetError> {
        let url = self.object_url(super::object_key(key)?)?;
        let response = self
            .send_small(self.request(Method::DELETE, url.clone()), &url)
            .await?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            _ => Err(status_error(&url, &response)),
        }
    }

    /// A WebDAV listing (`PROPFIND`, depth 1) of the cache directory, where the server
    /// offers one (nginx with `dav_ext_methods PROPFIND`); a plain HTTP cache has none.
    async fn list_narinfos(&self) -> Result<Option<Vec<String>>, TargetError> {
        let Some(names) = self.propfind(self.base.clone()).await? else {
            return Ok(None);
        };
        Ok(Some(narinfos_in_listing(&names)))
    }

    async fn write_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), TargetError> {
        self.put_small(super::object_key(key)?, "text/plain", bytes)
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Option<Vec<String>>, TargetError> {
        let url = self.object_url(super::object_key(prefix.trim_end_matches('/'))?)?;
        let mut url = url;
        url.set_path(&format!("{}/", url.path().trim_end_matches('/')));
        self.propfind(url).await
    }
}

fn build_client(connect_timeout: Duration) -> Result<reqwest::Client, TargetError> {
    let mut builder = reqwest::Client::builder();
    if super::tls::no_system_roots() {
        builder = builder.tls_certs_only(std::iter::empty());
    }
    builder
        .connect_timeout(connect_timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(super::dns::shared())
        // Notices a peer that vanished without closing while we wait on an idle connection.
        .tcp_keepalive(Duration::from_secs(30))
        .user_agent(concat!("narpost/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| {
            TargetError::permanent(format!("cannot set up the HTTP client: {}", innermost(&e)))
        })
}

/// Validates the cache URL and moves credentials embedded in it into `auth`.
fn parse_base(base: &str, auth: HttpAuth) -> Result<(Url, HttpAuth), TargetError> {
    // The URL is not echoed in full: it may hold a password.
    let mut url = Url::parse(base).map_err(|e| {
        TargetError::permanent(format!("{}: not a valid cache URL: {e}", redact(base)))
    })?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(TargetError::permanent(format!(
            "{}: not an http:// or https:// URL with a host",
            redact(base)
        )));
    }
    if let Some(query) = url.query() {
        return Err(TargetError::permanent(format!(
            "{}: cache URLs take no parameters (?{query})",
            redact(base)
        ))
        .with_hint("remove the '?...' part: narpost always uploads zstd NARs and takes its settings from its configuration"));
    }
    url.set_fragment(None);
    let mut auth = auth;
    if !url.username().is_empty() || url.password().is_some() {
        if !matches!(auth, HttpAuth::None) {
            return Err(TargetError::permanent(format!(
                "{}: credentials both in the URL and in the configuration",
                redact(base)
            ))
            .with_hint(
                "keep one of them; a token or basic-auth file keeps secrets out of command lines",
            ));
        }
        auth = HttpAuth::Basic {
            user: percent_decode(url.username()),
            password: url.password().map(percent_decode).unwrap_or_default(),
        };
        // Only fails for URLs that cannot have credentials, which the checks above exclude.
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok((url, auth))
}

/// `scheme://host...` with anything between `://` and `@` replaced (for any URL that may
/// carry credentials, not only HTTP ones).
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            format!("{}://<credentials>@{}", &url[..s], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A valid-looking hash part that no store path has: 160 random bits.
fn impossible_hash_part() -> String {
    use std::hash::{BuildHasher, Hasher};
    // Each `RandomState` is seeded from the OS's randomness (then varied per instance).
    let mut seed = Vec::with_capacity(40);
    for i in 0..4u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default(),
        );
        h.write_u32(std::process::id());
        seed.extend_from_slice(&h.finish().to_le_bytes());
    }
    let digest = crate::format::hash::Sha256::digest(&seed);
    crate::format::nixbase32::encode(&digest.as_bytes()[..20])
}

/// A success answer's body carries nothing we need, but it is read (briefly, see
/// [`MAX_CACHE_INFO`]) so the connection can be reused, and an answer that stops half-way is
/// a failure like any other stall: the server may not have stored the object.
async fn expect_success(
    url: &Url,
    response: Response,
    timeout: Duration,
) -> Result<(), TargetError> {
    let status = response.status();
    if !status.is_success() {
        return Err(status_error(url, &response));
    }
    stall::read_answer(response, MAX_CACHE_INFO, timeout)
        .await
        .map(drop)
        .map_err(|e| answer_error(url, status, e))
}

/// Reading an answer's body failed: transient, like the request it belongs to failing.
fn answer_error(url: &Url, status: StatusCode, e: stall::AnswerError) -> TargetError {
    match e {
        stall::AnswerError::TimedOut(waited) => TargetError::transient(format!(
            "{url}: timed out: the server answered {status} but did not finish its answer within {}",
            human_duration(waited)
        )),
        stall::AnswerError::Transport(e) => {
            let detail = innermost(&e);
            TargetError::transient(format!(
                "{url}: the server answered {status}, then its answer broke off: {detail}"
            ))
        }
    }
}

/// The names of the objects a WebDAV multistatus answer lists (the last part of each
/// `<D:href>`, under any namespace prefix), collections left out.
fn names_in_listing(xml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(at) = rest.find("href>") {
        rest = &rest[at + 5..];
        let Some(end) = rest.find('<') else { break };
        let href = rest[..end].trim();
        // The collection itself and those below it end in `/`: only objects have a name.
        let name = href.rsplit('/').next().unwrap_or("");
        if !name.is_empty() {
            out.push(name.to_owned());
        }
        rest = &rest[end..];
    }
    out.sort();
    out.dedup();
    out
}

/// The hash parts of the narinfos among a listing's names.
fn narinfos_in_listing(names: &[String]) -> Vec<String> {
    names
        .iter()
        .filter_map(|name| name.strip_suffix(".narinfo"))
        .filter(|hash| {
            hash.len() == 32
                && hash
                    .bytes()
                    .all(|b| crate::format::nixbase32::ALPHABET.contains(&b))
        })
        .map(str::to_owned)
        .collect()
}

fn status_error(url: &Url, response: &Response) -> TargetError {
    let status = response.status();
    let message = format!("{url}: server answered {status}");
    match status.as_u16() {
        401 | 403 => TargetError::auth(message).with_hint(
            "check the token (NARPOST_TOKEN or the token file) or the basic-auth file (NARPOST_BASIC_AUTH_FILE), and that it may write to this cache",
        ),
        408 | 429 | 500..=599 => TargetError::transient(message),
        300..=399 => {
            let location = response
                .headers()
                .get(LOCATION)
                .and_then(|l| l.to_str().ok())
                .unwrap_or("nowhere");
            TargetError::permanent(format!("{message} (redirect to {location})"))
                .with_hint("use the URL the server redirects to as the cache URL")
        }
        405 => TargetError::permanent(message)
            .with_hint("the server does not take PUT here; enable uploads (nginx: dav_methods PUT)"),
        413 => TargetError::permanent(message)
            .with_hint("raise the server's upload limit (nginx: client_max_body_size 0)"),
        404 => TargetError::permanent(message).with_hint(
            "check the cache URL; a WebDAV server may also need create_full_put_path on (nginx)",
        ),
        409 => TargetError::permanent(message).with_hint(
            "the server has no directory to put this in; create it, or let the server create it (nginx: create_full_put_path on)",
        ),
        _ => TargetError::permanent(message),
    }
}

fn transport_error(url: &Url, e: &reqwest::Error, read_timeout: Duration) -> TargetError {
    let detail = innermost(e);
    if e.is_timeout() {
        return TargetError::transient(format!(
            "{url}: timed out: no answer within {}",
            human_duration(read_timeout)
        ));
    }
    if detail.contains("certificate") {
        return TargetError::permanent(format!("{url}: TLS: {detail}"))
            .with_hint("the server's certificate is not trusted here; fix it or add its CA to the system's trust store");
    }
    if e.is_connect() {
        return TargetError::transient(format!("{url}: cannot connect: {detail}"))
            .with_hint("check that the cache server is running and reachable");
    }
    if e.is_builder() {
        return TargetError::permanent(format!("{url}: cannot build the request: {detail}"));
    }
    TargetError::transient(format!("{url}: {detail}"))
}

/// The most specific message in an error's source chain (reqwest's own top-level message
/// repeats the URL, possibly with credentials, and says little).
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last: &(dyn std::error::Error + 'static) = e;
    while let Some(source) = last.source() {
        last = source;
    }
    last.to_string()
}

fn human_duration(d: Duration) -> String {
    if d.as_secs() >= 1 && d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}
