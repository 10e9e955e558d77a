//! The Attic target: pushes to a cache on an Attic server through its HTTP API.
//!
//! # URL
//!
//! `attic+http://host:port/<cache>` or `attic+https://host/<prefix>/<cache>`: the server's API
//! endpoint is everything before the last path segment, the cache name is the last segment.
//! So `attic+https://cache.example.org/main` talks to `https://cache.example.org/` about
//! cache `main`, the cache Attic's own client calls `server:main`. The token is given
//! separately (never inside the URL, which shows up in messages and process lists) and is
//! sent as `Authorization: bearer <token>`.
//!
//! # What differs from a plain binary cache
//!
//! Attic compresses, chunks and signs on the server, so this target asks the pipeline for
//! the raw NAR ([`NarFormat::Raw`]) and never writes a narinfo. `put_nar` stores nothing;
//! `put_narinfo` is the single `PUT /_api/v1/upload-path` request that carries the path's
//! metadata and streams its NAR, which is the commit point on the server as a narinfo is
//! elsewhere. The signatures narpost made go along in `sigs`, so the cache serves them next
//! to its own. The metadata rides in the `X-Attic-Nar-Info` header when its JSON is under
//! 4 KiB, else in front of the body with `X-Attic-Nar-Info-Preamble-Size` (a path with many
//! references would otherwise exceed common header size limits).
//!
//! `open` reads the cache's configuration: its `api_endpoint`, if any, is used from then on,
//! and paths signed by one of its `upstream_cache_key_names` (e.g. `cache.nixos.org-1`) are
//! reported present, since the server treats them as available upstream.
//!
//! # Timeouts
//!
//! A hung server must become an error, never a stuck upload, yet a large NAR on a slow link
//! legitimately takes hours. So API calls get the timeout (the `io-timeout` setting) as a
//! total, while an upload fails only when the connection has taken no new NAR bytes for that
//! long, or when, after the last byte, no answer comes within [`stall::ANSWER_TIMEOUT_FACTOR`] times
//! it (the server still hashes, compresses and stores the end of the NAR before answering).
//!
//! # Errors
//!
//! Attic answers errors as JSON `{"code", "error", "message"}`. 401 (bad or expired token)
//! and 403 (no push permission) are [`Auth`](super::ErrorKind::Auth), a missing cache and
//! other 4xx are [`Permanent`](super::ErrorKind::Permanent), 5xx and connection failures are
//! [`Transient`](super::ErrorKind::Transient). When
//! the upload fails because the NAR could not be produced locally (for instance the store
//! path no longer matches its recorded hash), the error says so and is permanent.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderMap, HeaderValue};
use reqwest::{Client, StatusCode, Url};
use serde::{Deserialize, Serialize};

use super::stall::{self, Progress};
use super::{NarBody, NarFormat, ObjectStream, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::nixbase32;
use crate::format::store_path::{STORE_DIR, StorePath};
use crate::store::PathInfo;

/// At this size the metadata moves from the header into the body, as Attic's client does.
pub const PREAMBLE_THRESHOLD: usize = 4 * 1024;
/// Store path hashes per `get-missing-paths` request, to keep each request body modest.
const MISSING_BATCH: usize = 1_000;
/// How long a connection may make no progress unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest answer read for `cache-config`, an error or an upload: all are a few hundred
/// bytes from a real server.
const MAX_ANSWER: usize = 64 * 1024;
/// Largest `get-missing-paths` answer: [`MISSING_BATCH`] hashes of 32 characters in JSON
/// fit in about 35 KiB.
const MAX_MISSING_ANSWER: usize = 1024 * 1024;

const NAR_INFO_HEADER: &str = "X-Attic-Nar-Info";
const PREAMBLE_SIZE_HEADER: &str = "X-Attic-Nar-Info-Preamble-Size";

/// A cache on an Attic server.
pub struct AtticTarget {
    /// Carries the bearer token in its default headers (marked sensitive).
    client: Client,
    /// The API endpoint as given in the URL, ending in `/`.
    server: Url,
    cache: String,
    /// The URL as given, for messages (it never contains the token).
    url: String,
    /// Whether a token is configured, so a 401 can say which problem it is.
    has_token: bool,
    /// How long a request may make no progress.
    timeout: Duration,
    /// Filled by `open`.
    config: OnceLock<OpenedCache>,
}

struct OpenedCache {
    /// Where API calls go: the server's `api_endpoint` if it named one.
    api: Url,
    upstream_key_names: Vec<String>,
}

/// The metadata of one upload, with Attic's field names and types.
#[derive(Debug, Serialize)]
struct UploadPathNarInfo<'a> {
    cache: &'a str,
    store_path_hash: &'a str,
    store_path: String,
    /// Base names (`<hash>-<name>`), not full paths.
    references: Vec<&'a str>,
    system: Option<&'a str>,
    deriver: Option<&'a str>,
    sigs: &'a [String],
    ca: Option<&'a str>,
    /// `sha256:<64 hex digits>`.
    nar_hash: String,
    nar_size: u64,
}

#[derive(Debug, Deserialize)]
struct CacheConfig {
    api_endpoint: Option<String>,
    upstream_cache_key_names: Option<Vec<String>>,
    store_dir: Option<String>,
}

#[derive(Debug, Serialize)]
struct MissingPathsRequest<'a> {
    cache: &'a str,
    store_path_hashes: Vec<&'a str>,
}

#[derive(Debug, Deserialize)]
struct MissingPathsResponse {
    missing_paths: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct UploadPathResult {
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    error: String,
    message: String,
}

impl AtticTarget {
    /// `url` is `attic+http(s)://host[:port][/prefix]/<cache>`; `token` is the Attic token
    /// (`None` for a server that lets anyone push, which is rare); `timeout` is how long a
    /// request may make no progress (see the module doc).
    pub fn new(url: &str, token: Option<String>, timeout: Duration) -> Result<Self, TargetError> {
        let (server, cache) = parse_url(url)?;
        let has_token = token.is_some();
        let mut headers = HeaderMap::new();
        if let Some(token) = token {
            let mut value = HeaderValue::from_str(&format!("bearer {}", token.trim()))
                .map_err(|_| {
                    TargetError::auth(format!(
                        "{url}: the Attic token contains characters that cannot go in an HTTP header"
                    ))
                    .with_hint("check the token file for stray bytes; a token is one line of base64")
                })?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        if let Some(problem) = super::tls::https_without_roots(server.as_str()) {
            return Err(TargetError::permanent(problem));
        }
        let mut builder = Client::builder();
        if super::tls::no_system_roots() {
            builder = builder.tls_certs_only(std::iter::empty());
        }
        let client = builder
            .user_agent(concat!("narpost/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .dns_resolver(super::dns::shared())
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .tcp_keepalive(Duration::from_secs(30))
            .build()
            .map_err(|e| {
                TargetError::permanent(format!("{url}: cannot set up the HTTP client: {e}"))
            })?;
        Ok(Self {
            client,
            server,
            cache,
            url: url.to_string(),
            has_token,
            timeout,
            config: OnceLock::new(),
        })
    }

    fn api(&self) -> &Url {
        self.config.get().map_or(&self.server, |c| &c.api)
    }

    fn endpoint(&self, path: &str) -> Result<Url, TargetError> {
        self.api().join(path).map_err(|e| {
            TargetError::permanent(format!("{}: cannot form the URL for {path}: {e}", self.url))
        })
    }

    /// An object of the binary cache the server serves for this cache (narinfos, NARs):
    /// below the server's own address, not the API endpoint.
    fn cache_object(&self, key: &str) -> Result<Url, TargetError> {
        let key = super::object_key(key)?;
        self.server
            .join(&format!("{}/{key}", self.cache))
            .map_err(|e| {
                TargetError::permanent(format!("{}: cannot form the URL for {key}: {e}", self.url))
            })
    }

    fn server_name(&self) -> String {
        self.api().as_str().trim_end_matches('/').to_string()
    }

    /// A request that never got an answer: the server is down, unreachable or timed out.
    fn request_error(&self, err: &reqwest::Error, action: &str) -> TargetError {
        let server = self.server_name();
        let detail = root_cause(err);
        if err.is_decode() {
            return TargetError::permanent(format!(
                "{server}: unreadable answer while {action}: {detail}"
            ));
        }
        if err.is_timeout() {
            return TargetError::transient(format!(
                "{server}: timed out after {}s while {action}",
                self.timeout.as_secs()
            ))
            .with_hint(format!(
                "check that the Attic server at {server} is healthy; io-timeout sets how long to wait"
            ));
        }
        TargetError::transient(format!(
            "{server}: cannot reach the server while {action}: {detail}"
        ))
        .with_hint(format!("check that the Attic server at {server} is up"))
    }

    /// Turns an error answer into a message naming the server or cache and what to do.
    async fn answer_error(&self, response: reqwest::Response, action: &str) -> TargetError {
        let status = response.status();
        // Only the start of an error answer is worth showing; a broken or endless one still
        // leaves the status to go by.
        let body = stall::read_answer(response, MAX_ANSWER, self.timeout)
            .await
            .map(|a| String::from_utf8_lossy(&a.body).into_owned())
            .unwrap_or_default();
        let (name, message) = match serde_json::from_str::<ApiError>(&body) {
            Ok(api) => (first_line(&api.error), first_line(&api.message)),
            Err(_) => (String::new(), first_line(&body)),
        };
        let server = self.server_name();
        let cache = &self.cache;
        let said = match (name.is_empty(), message.is_empty()) {
            (false, false) => format!("{name}: {message}"),
            (false, true) => name.clone(),
            (true, false) => message.clone(),
            (true, true) => status.to_string(),
        };
        match status {
            StatusCode::UNAUTHORIZED if !self.has_token => TargetError::auth(format!(
                "{server} wants a token for cache {cache}, and none is configured"
            ))
            .with_hint(
                "set token-file in the config file, NARPOST_TOKEN_FILE, or NARPOST_TOKEN to an \
                 Attic token with push permission on the cache",
            ),
            // Attic answers 401 also for a cache the token may not see at all.
            StatusCode::UNAUTHORIZED => TargetError::auth(format!(
                "bad or expired token for {server}, or it may not see cache {cache}"
            ))
            .with_hint(format!(
                "get a token with push permission on {cache} from the server's admin \
                 (atticadm make-token --push {cache}) and set it in token-file, \
                 NARPOST_TOKEN_FILE or NARPOST_TOKEN"
            )),
            StatusCode::FORBIDDEN => TargetError::auth(format!(
                "token has no push permission on cache {cache} ({server})"
            ))
            .with_hint(format!(
                "ask for a token with push permission on {cache} (atticadm make-token --push {cache})"
            )),
            StatusCode::NOT_FOUND if name == "NoSuchCache" => {
                TargetError::permanent(format!("no such cache {cache} on {server}"))
                    .with_hint(format!("create it with `attic cache create {cache}`, or fix the cache name"))
            }
            StatusCode::NOT_FOUND => TargetError::permanent(format!(
                "{server}: no Attic API there ({said}) while {action}"
            ))
            .with_hint("check the server address in the attic+http(s):// URL"),
            s if s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS => {
                TargetError::transient(format!(
                    "{server}: server answered {} while {action}: {said}",
                    s.as_u16()
                ))
            }
            s => TargetError::permanent(format!(
                "{server}: cache {cache} refused {action} (HTTP {}): {said}",
                s.as_u16()
            )),
        }
    }

    /// Drives an upload and fails it when it stalls (see the module doc).
    async fn watch(
        &self,
        send: impl Future<Output = Result<reqwest::Response, reqwest::Error>>,
        progress: &Progress,
        action: &str,
    ) -> Result<reqwest::Response, TargetError> {
        match stall::watch(send, progress, self.timeout).await {
            Ok(result) => result.map_err(|e| self.request_error(&e, action)),
            Err(stalled) => Err(TargetError::transient(format!(
                "{}: timed out while {action}: {} for {}s",
                self.server_name(),
                stalled.what(),
                stalled.waited.as_secs()
            ))
            .with_hint(format!(
                "check that the Attic server at {} is healthy; io-timeout sets how long to wait",
                self.server_name()
            ))),
        }
    }

    /// Reads the body of an answer narpost needs (the timeout as a whole, at most `limit`).
    async fn read_body(
        &self,
        response: reqwest::Response,
        limit: usize,
        action: &str,
    ) -> Result<Vec<u8>, TargetError> {
        let server = self.server_name();
        match stall::read_answer(response, limit, self.timeout).await {
            Ok(answer) if answer.truncated => Err(TargetError::permanent(format!(
                "{server}: the answer while {action} is larger than {} KiB, far more than an Attic server sends; refusing to read it",
                limit / 1024
            ))),
            Ok(answer) => Ok(answer.body),
            Err(stall::AnswerError::TimedOut(waited)) => Err(TargetError::transient(format!(
                "{server}: timed out after {}s while {action}: the answer did not finish",
                waited.as_secs()
            ))
            .with_hint(format!(
                "check that the Attic server at {server} is healthy; io-timeout sets how long to wait"
            ))),
            Err(stall::AnswerError::Transport(e)) => Err(self.request_error(&e, action)),
        }
    }

    async fn missing_batch(&self, hashes: Vec<&str>) -> Result<Vec<String>, TargetError> {
        let action = "asking which paths are missing";
        let request = MissingPathsRequest {
            cache: &self.cache,
            store_path_hashes: hashes,
        };
        let body = serde_json::to_vec(&request).map_err(|e| {
            TargetError::permanent(format!("{}: cannot encode the request: {e}", self.url))
        })?;
        let response = self
            .client
            .post(self.endpoint("_api/v1/get-missing-paths")?)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(self.timeout)
            .body(body)
            .send()
            .await
            .map_err(|e| self.request_error(&e, action))?;
        if !response.status().is_success() {
            return Err(self.answer_error(response, action).await);
        }
        let bytes = self.read_body(response, MAX_MISSING_ANSWER, action).await?;
        let parsed: MissingPathsResponse = serde_json::from_slice(&bytes).map_err(|e| {
            TargetError::permanent(format!(
                "{}: unexpected answer to get-missing-paths: {e}",
                self.server_name()
            ))
        })?;
        Ok(parsed.missing_paths)
    }
}

#[async_trait]
impl Target for AtticTarget {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn signs_itself(&self) -> bool {
        true
    }

    fn nar_format(&self) -> NarFormat {
        NarFormat::Raw
    }

    async fn open(&self) -> Result<(), TargetError> {
        let action = format!("reading the configuration of cache {}", self.cache);
        let response = self
            .client
            .get(self.endpoint(&format!("_api/v1/cache-config/{}", self.cache))?)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.request_error(&e, &action))?;
        if !response.status().is_success() {
            return Err(self.answer_error(response, &action).await);
        }
        let bytes = self.read_body(response, MAX_ANSWER, &action).await?;
        let config: CacheConfig = serde_json::from_slice(&bytes).map_err(|e| {
            TargetError::permanent(format!(
                "{}: the cache configuration of {} is not what an Attic server sends: {e}",
                self.server_name(),
                self.cache
            ))
            .with_hint("check that the URL points at an Attic server")
        })?;
        if let Some(dir) = config.store_dir.as_deref()
            && dir.trim_end_matches('/') != STORE_DIR
        {
            return Err(TargetError::permanent(format!(
                "{}: cache {} is for store {dir}, not {STORE_DIR}",
                self.server_name(),
                self.cache
            )));
        }
        let api = match config.api_endpoint.as_deref() {
            Some(endpoint) => with_trailing_slash(endpoint).map_err(|e| {
                TargetError::permanent(format!(
                    "{}: the server names an invalid api_endpoint {endpoint:?}: {e}",
                    self.server_name()
                ))
            })?,
            None => self.server.clone(),
        };
        // A second open (the pipeline calls it once) keeps the first answer.
        let _ = self.config.set(OpenedCache {
            api,
            upstream_key_names: config.upstream_cache_key_names.unwrap_or_default(),
        });
        Ok(())
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        let upstream = self
            .config
            .get()
            .map(|c| c.upstream_key_names.as_slice())
            .unwrap_or_default();
        let mut by_hash: HashMap<&str, &StorePath> = HashMap::new();
        for info in paths {
            let from_upstream = info.sigs.iter().any(|sig| {
                sig.split_once(':')
                    .is_some_and(|(name, _)| upstream.iter().any(|u| u == name))
            });
            if !from_upstream {
                by_hash.insert(info.path.hash_part(), &info.path);
            }
        }
        let hashes: Vec<&str> = by_hash.keys().copied().collect();
        let mut missing = HashSet::new();
        for batch in hashes.chunks(MISSING_BATCH) {
            for hash in self.missing_batch(batch.to_vec()).await? {
                match by_hash.get(hash.as_str()) {
                    Some(path) => {
                        missing.insert((*path).clone());
                    }
                    None => tracing::debug!(
                        "{}: get-missing-paths named {hash}, which was not asked about",
                        self.url
                    ),
                }
            }
        }
        Ok(missing)
    }

    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
        // Attic takes the NAR with the metadata in put_narinfo; this is the URL the server
        // serves it under, so the narinfo the pipeline builds is accurate.
        Ok(format!(
            "nar/{}.nar",
            nixbase32::encode(nar.info.nar_hash.as_bytes())
        ))
    }

    async fn read_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        let url = self.cache_object(key)?;
        let action = format!("reading {url}");
        let response = self
            .client
            .get(url)
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.request_error(&e, &action))?;
        match response.status().as_u16() {
            200 => self.read_body(response, limit, &action).await.map(Some),
            404 => Ok(None),
            _ => Err(self.answer_error(response, &action).await),
        }
    }

    async fn object_size(&self, key: &str) -> Result<Option<u64>, TargetError> {
        let url = self.cache_object(key)?;
        let action = format!("checking {url}");
        let response = self
            .client
            .head(url.clone())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(|e| self.request_error(&e, &action))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.answer_error(response, &action).await),
        }
        let size = response
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        match size {
            Some(size) => Ok(Some(size)),
            // Attic streams NARs from chunks and may not know the length up front: read it.
            None => Ok(self.object_sha256(key).await?.map(|(_, size)| size)),
        }
    }

    async fn read_stream(&self, key: &str) -> Result<Option<ObjectStream>, TargetError> {
        let url = self.cache_object(key)?;
        let action = format!("reading {url}");
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| self.request_error(&e, &action))?;
        match response.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.answer_error(response, &action).await),
        }
        let size = response.content_length();
        let server = self.server_name();
        let body = stall::answer_stream(response, self.timeout, move |e| match e {
            stall::AnswerError::TimedOut(waited) => TargetError::transient(format!(
                "{server}: timed out after {}s while {action}: the answer stalled",
                waited.as_secs()
            )),
            stall::AnswerError::Transport(e) => TargetError::transient(format!(
                "{server}: {action}: the answer broke off: {}",
                crate::cache::stall::causes(&e)
            )),
        });
        Ok(Some(ObjectStream { size, body }))
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, nar: &PreparedNar) -> Result<(), TargetError> {
        let path = &narinfo.store_path;
        let NarBody::Raw(source) = &nar.body else {
            return Err(TargetError::permanent(format!(
                "{}: Attic target was handed a compressed NAR for {path}",
                self.url
            )));
        };
        let action = format!("uploading {path}");
        let meta = UploadPathNarInfo {
            cache: &self.cache,
            store_path_hash: path.hash_part(),
            store_path: path.to_absolute(),
            references: narinfo.references.iter().map(StorePath::base).collect(),
            system: None,
            deriver: narinfo.deriver.as_ref().map(StorePath::base),
            sigs: &narinfo.sigs,
            ca: narinfo.ca.as_deref(),
            nar_hash: format!("sha256:{}", narinfo.nar_hash.to_hex()),
            nar_size: narinfo.nar_size,
        };
        let json = serde_json::to_string(&meta).map_err(|e| {
            TargetError::permanent(format!("{path}: cannot encode the upload metadata: {e}"))
        })?;

        // The NAR comes from the store as it is read; when producing it fails (a read error,
        // or the path no longer matching its hash), the request is cut short and the reason
        // is kept here, so the error names the path rather than a broken connection.
        let local_failure: Arc<Mutex<Option<String>>> = Arc::default();
        let recorder = Arc::clone(&local_failure);
        let progress = Arc::new(Progress::new());
        let touch = Arc::clone(&progress);
        let finished = Arc::clone(&progress);
        let nar_stream = source
            .stream()
            .inspect(move |chunk| match chunk {
                // The body is pulled as the connection takes it: each chunk is progress.
                Ok(_) => touch.touch(),
                Err(e) => {
                    if let Ok(mut slot) = recorder.lock() {
                        slot.get_or_insert_with(|| e.to_string());
                    }
                }
            })
            .chain(futures::stream::poll_fn(move |_| {
                // Runs once, after the last chunk: from here on the answer is awaited.
                finished.finish();
                std::task::Poll::Ready(None)
            }));

        let header_value = (json.len() < PREAMBLE_THRESHOLD)
            .then(|| HeaderValue::from_str(&json).ok())
            .flatten();
        let mut request = self
            .client
            .put(self.endpoint("_api/v1/upload-path")?)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream");
        let body_len = match header_value {
            Some(value) => {
                request = request.header(NAR_INFO_HEADER, value);
                request = request.body(reqwest::Body::wrap_stream(nar_stream));
                narinfo.nar_size
            }
            None => {
                let preamble = Bytes::from(json);
                let preamble_len = preamble.len() as u64;
                let chained =
                    futures::stream::once(async move { Ok::<_, std::io::Error>(preamble) })
                        .chain(nar_stream);
                request = request
                    .header(PREAMBLE_SIZE_HEADER, preamble_len)
                    .body(reqwest::Body::wrap_stream(chained));
                preamble_len + narinfo.nar_size
            }
        };
        // A declared length lets proxies and the server check the body is complete.
        request = request.header(CONTENT_LENGTH, body_len);

        let sent = self.watch(request.send(), &progress, &action).await;
        let local = local_failure.lock().ok().and_then(|mut slot| slot.take());
        if let Some(reason) = local {
            return Err(TargetError::permanent(format!(
                "{path}: upload to {} abandoned, the NAR could not be produced: {reason}",
                self.url
            ))
            .with_hint(format!(
                "check the path with `nix-store --verify-path {}`",
                path.to_absolute()
            )));
        }
        let response = sent?;
        if !response.status().is_success() {
            return Err(self.answer_error(response, &action).await);
        }
        // Attic's own client accepts a success without a JSON body, so this does too; but
        // an answer that never ends is a stalled upload: the server may not have stored it.
        let answer = match stall::read_answer(response, MAX_ANSWER, self.timeout).await {
            Ok(answer) => answer,
            Err(stall::AnswerError::TimedOut(waited)) => {
                return Err(TargetError::transient(format!(
                    "{}: timed out while {action}: the server accepted the upload but did not finish its answer within {}s",
                    self.server_name(),
                    waited.as_secs()
                ))
                .with_hint(format!(
                    "check that the Attic server at {} is healthy; io-timeout sets how long to wait",
                    self.server_name()
                )));
            }
            Err(stall::AnswerError::Transport(e)) => return Err(self.request_error(&e, &action)),
        };
        if let Ok(result) = serde_json::from_slice::<UploadPathResult>(&answer.body) {
            tracing::debug!(
                "{}: {path}: {}",
                self.url,
                result.kind.as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }
}

/// Splits `attic+http(s)://host[:port][/prefix]/<cache>` into the server base and the cache.
/// Whether `url` is an Attic cache URL narpost can use: a server and a cache name.
pub fn check_url(url: &str) -> Result<(), TargetError> {
    parse_url(url).map(drop)
}

fn parse_url(input: &str) -> Result<(Url, String), TargetError> {
    let bad = |what: &str| {
        TargetError::permanent(format!("{input}: {what}"))
            .with_hint("an Attic cache URL looks like attic+https://attic.example.org/<cache>")
    };
    let inner = input
        .strip_prefix("attic+")
        .ok_or_else(|| bad("not an attic+http:// or attic+https:// URL"))?;
    let mut url = Url::parse(inner).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme after attic+ must be http or https"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad(
            "the token does not belong in the URL; give it through the token setting",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("unexpected ?query or #fragment"));
    }
    let mut segments: Vec<String> = url
        .path_segments()
        .map(|s| s.filter(|s| !s.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    let cache = segments
        .pop()
        .ok_or_else(|| bad("no cache name after the server address"))?;
    // Attic's own rule for cache names.
    let mut chars = cache.chars();
    let valid = cache.len() <= 50
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'));
    if !valid {
        return Err(bad(&format!("{cache:?} is not a valid Attic cache name")));
    }
    let mut base = segments.join("/");
    if !base.is_empty() {
        base.push('/');
    }
    url.set_path(&format!("/{base}"));
    Ok((url, cache))
}

fn with_trailing_slash(endpoint: &str) -> Result<Url, String> {
    let mut parsed = Url::parse(endpoint).map_err(|e| e.to_string())?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("scheme {} is not http or https", parsed.scheme()));
    }
    if !parsed.path().ends_with('/') {
        let path = format!("{}/", parsed.path());
        parsed.set_path(&path);
    }
    Ok(parsed)
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// The first line of a server's message, shortened, with anything that could drive a
/// terminal escaped: it ends up on the user's terminal, in the log and in `status`.
fn first_line(text: &str) -> String {
    let line = text.lines().next().unwrap_or("").trim();
    crate::text::printable(&line.chars().take(200).collect::<String>())
}

#[cfg(test)]
mod tests {
    use super::super::ErrorKind;
    use super::*;

    #[test]
    fn url_names_the_server_and_the_cache() {
        let (server, cache) = parse_url("attic+http://127.0.0.1:8080/main").unwrap();
        assert_eq!(
            (server.as_str(), cache.as_str()),
            ("http://127.0.0.1:8080/", "main")
        );
        let (server, cache) = parse_url("attic+https://example.org/attic/ci-cache_2+x/").unwrap();
        assert_eq!(
            (server.as_str(), cache.as_str()),
            ("https://example.org/attic/", "ci-cache_2+x")
        );
    }

    #[test]
    fn rejects_what_attic_would_not_call_a_cache() {
        for bad in [
            "http://host/main",
            "attic+ftp://host/main",
            "attic+http://host",
            "attic+http://host/",
            "attic+http://user:token@host/main",
            "attic+http://host/main?x=1",
            "attic+http://host/-main",
            "attic+http://host/a.b",
            &format!("attic+http://host/{}", "a".repeat(51)),
        ] {
            let err = parse_url(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Permanent, "{bad}");
            assert!(err.message.starts_with(bad), "{bad}: {}", err.message);
        }
    }

    #[test]
    fn upload_metadata_has_attic_field_names_and_types() {
        let sigs = vec!["k-1:c2ln".to_string()];
        let meta = UploadPathNarInfo {
            cache: "main",
            store_path_hash: "0123456789abcdfghijklmnpqrsvwxyz",
            store_path: "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-x".to_string(),
            references: vec!["0123456789abcdfghijklmnpqrsvwxyz-x"],
            system: None,
            deriver: None,
            sigs: &sigs,
            ca: None,
            nar_hash: format!("sha256:{}", "ab".repeat(32)),
            nar_size: 42,
        };
        let value = serde_json::to_value(&meta).unwrap();
        assert_eq!(value["nar_size"], 42);
        assert_eq!(value["system"], serde_json::Value::Null);
        assert_eq!(value["references"][0], "0123456789abcdfghijklmnpqrsvwxyz-x");
        assert_eq!(value.as_object().unwrap().len(), 10);
    }
}
