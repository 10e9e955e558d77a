//! An Attic-API server for the tests, on 127.0.0.1.
//!
//! No Attic server can be installed from the package registries, so the Attic target is
//! tested against this one. It checks what the real server checks and answers as it does:
//!
//! - the token: `Authorization: bearer <token>` (or HTTP Basic with the token as password);
//!   a token the server does not know is ignored, so the request counts as anonymous. A
//!   client that may not even see the cache gets 401 `Unauthorized`, one that sees it but may
//!   not push gets 403 `AccessError`, a missing cache is 404 `NoSuchCache` (401 when the
//!   client could not tell it exists);
//! - the upload metadata: `X-Attic-Nar-Info-Preamble-Size` first (at most 1 MiB, exactly that
//!   many bytes of JSON at the start of the body), else `X-Attic-Nar-Info`, else 400; every
//!   field of `UploadPathNarInfo` with its type (cache name and store path hash syntax,
//!   `nar_hash` as `sha256:` plus 64 hex or 52 nixbase32 digits, `nar_size` an unsigned
//!   integer; the `Option` fields may be absent or null);
//! - the body: the uncompressed NAR, hashed as it streams in; a hash or size that differs
//!   from the metadata is 400 "Bad NAR Hash or Size" and nothing is stored (also when the NAR
//!   is already known, as with the server's `require-proof-of-possession` default).
//!
//! Errors are JSON `{"code", "error", "message"}`. What it accepts it stores, and serves
//! back as a binary cache (`/<cache>/nix-cache-info`, `<hash>.narinfo`, `nar/<hash>.nar`,
//! uncompressed), signing each narinfo with the cache's own key next to the signatures the
//! client sent, as Attic does; so a real Nix can substitute from it.
//!
//! For the tests it records every request and every accepted upload in order, and can answer
//! the next N requests to an endpoint with 503, as an overloaded proxy in front of it would.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use base64::Engine as _;
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use narpost::format::hash::{Sha256, Sha256Hasher};
use narpost::format::narinfo::NarInfo;
use narpost::format::nixbase32;
use narpost::format::signing::SigningKey;
use narpost::format::store_path::StorePath;

/// The server's default cap on the preamble (`max-nar-info-size`).
pub const MAX_NAR_INFO_SIZE: usize = 1024 * 1024;
pub const NAR_INFO_HEADER: &str = "x-attic-nar-info";
pub const PREAMBLE_SIZE_HEADER: &str = "x-attic-nar-info-preamble-size";

/// What a token may do on a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Perms {
    pub pull: bool,
    pub push: bool,
}

pub const PULL: Perms = Perms {
    pull: true,
    push: false,
};
pub const PUSH: Perms = Perms {
    pull: true,
    push: true,
};

impl Perms {
    fn can_discover(self) -> bool {
        self.pull || self.push
    }
}

/// A cache the server starts with.
#[derive(Debug, Clone)]
pub struct CacheSpec {
    pub name: String,
    /// Anyone may pull (read the binary cache and the cache config).
    pub is_public: bool,
    pub upstream_cache_key_names: Vec<String>,
}

impl CacheSpec {
    pub fn new(name: &str) -> CacheSpec {
        CacheSpec {
            name: name.to_string(),
            is_public: true,
            upstream_cache_key_names: Vec::new(),
        }
    }

    pub fn private(mut self) -> CacheSpec {
        self.is_public = false;
        self
    }

    pub fn upstream(mut self, names: &[&str]) -> CacheSpec {
        self.upstream_cache_key_names = names.iter().map(|s| s.to_string()).collect();
        self
    }
}

/// How the metadata of an upload arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Header,
    Preamble,
}

/// `UploadPathNarInfo`, as received and checked.
#[derive(Debug, Clone)]
pub struct UploadInfo {
    pub cache: String,
    pub store_path_hash: String,
    pub store_path: String,
    pub references: Vec<String>,
    pub system: Option<String>,
    pub deriver: Option<String>,
    pub sigs: Vec<String>,
    pub ca: Option<String>,
    pub nar_hash: Sha256,
    pub nar_size: u64,
}

/// One accepted `upload-path`, in the order the server accepted them.
#[derive(Debug, Clone)]
pub struct Upload {
    pub info: UploadInfo,
    /// The metadata JSON exactly as sent.
    pub json: String,
    pub form: Form,
    pub deduplicated: bool,
    /// The request's `Content-Encoding`, if any (Attic wants the plain NAR).
    pub content_encoding: Option<String>,
}

/// One request: method, path (with the API prefix, if any) and the status answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub method: String,
    pub path: String,
    pub status: u16,
}

struct Cache {
    spec: CacheSpec,
    key: SigningKey,
    /// By store path hash.
    objects: BTreeMap<String, UploadInfo>,
}

struct Inner {
    port: u16,
    /// Where `cache-config` says the API is, below the server root ("" or "/something").
    api_prefix: String,
    caches: HashMap<String, Cache>,
    /// Token -> (cache name or "*", permissions).
    tokens: HashMap<String, Vec<(String, Perms)>>,
    /// NARs by hash, shared by every cache (Attic deduplicates globally).
    nars: HashMap<Sha256, Arc<Vec<u8>>>,
    uploads: Vec<Upload>,
    log: Vec<Logged>,
    /// Requests answered 4xx by the checks, with the message, for test failure output.
    rejections: Vec<String>,
    /// Endpoint name ("upload-path", "get-missing-paths", "cache-config") -> 503s still to give.
    failures: HashMap<&'static str, usize>,
    /// Uploads still to leave hanging: never read, never answered.
    stalls: usize,
}

type Shared = Arc<Mutex<Inner>>;

fn lock(state: &Shared) -> MutexGuard<'_, Inner> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct AtticServer {
    pub port: u16,
    state: Shared,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl AtticServer {
    /// Starts the server with `caches` and `tokens` (token, [(cache name or "*", perms)]),
    /// serving the API at the root.
    pub fn start(caches: Vec<CacheSpec>, tokens: &[(&str, &[(&str, Perms)])]) -> AtticServer {
        AtticServer::start_with_api_prefix(caches, tokens, "")
    }

    /// Like [`AtticServer::start`], but `get-missing-paths` and `upload-path` exist only below
    /// `prefix` (e.g. "/api"), which `cache-config` announces as `api_endpoint`; a client that
    /// ignores `api_endpoint` gets 404 from them.
    pub fn start_with_api_prefix(
        caches: Vec<CacheSpec>,
        tokens: &[(&str, &[(&str, Perms)])],
        prefix: &str,
    ) -> AtticServer {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind the Attic test server");
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        let port = listener.local_addr().expect("local address").port();
        let caches = caches
            .into_iter()
            .map(|spec| {
                let key = SigningKey::generate(&format!("{}-attic-1", spec.name))
                    .expect("generate a cache key");
                (
                    spec.name.clone(),
                    Cache {
                        spec,
                        key,
                        objects: BTreeMap::new(),
                    },
                )
            })
            .collect();
        let tokens = tokens
            .iter()
            .map(|(token, grants)| {
                (
                    token.to_string(),
                    grants
                        .iter()
                        .map(|(cache, perms)| (cache.to_string(), *perms))
                        .collect(),
                )
            })
            .collect();
        let state: Shared = Arc::new(Mutex::new(Inner {
            port,
            api_prefix: prefix.trim_end_matches('/').to_string(),
            caches,
            tokens,
            nars: HashMap::new(),
            uploads: Vec::new(),
            log: Vec::new(),
            rejections: Vec::new(),
            failures: HashMap::new(),
            stalls: 0,
        }));
        let app = router(prefix.trim_end_matches('/'), state.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("start the Attic test server's runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)
                    .expect("hand the listener to tokio");
                // No graceful shutdown: a request the server leaves hanging on purpose must
                // not keep the test waiting; dropping the runtime ends every connection.
                tokio::select! {
                    served = axum::serve(listener, app) => served.expect("serve the Attic API"),
                    _ = rx => {}
                }
            });
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        });
        AtticServer {
            port,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// The narpost cache URL for `cache`.
    pub fn url(&self, cache: &str) -> String {
        format!("attic+http://127.0.0.1:{}/{cache}", self.port)
    }

    /// The binary cache Nix substitutes `cache` from.
    pub fn substituter(&self, cache: &str) -> String {
        format!("http://127.0.0.1:{}/{cache}", self.port)
    }

    /// The cache's own public key line, for `trusted-public-keys`.
    pub fn public_key(&self, cache: &str) -> String {
        lock(&self.state).caches[cache].key.public().to_nix_string()
    }

    /// Answer the next `n` requests to `endpoint` ("upload-path", "get-missing-paths" or
    /// "cache-config") with 503, after reading the whole request, as a proxy would.
    pub fn fail_next(&self, endpoint: &'static str, n: usize) {
        lock(&self.state).failures.insert(endpoint, n);
    }

    /// Leave the next `n` uploads hanging, as a wedged server would: the body is not read
    /// and no answer comes until the client gives up.
    pub fn stall_next_uploads(&self, n: usize) {
        lock(&self.state).stalls = n;
    }

    /// Accepted uploads, in order.
    pub fn uploads(&self) -> Vec<Upload> {
        lock(&self.state).uploads.clone()
    }

    /// What `cache` holds, by store path hash.
    pub fn objects(&self, cache: &str) -> BTreeMap<String, UploadInfo> {
        lock(&self.state).caches[cache].objects.clone()
    }

    pub fn log(&self) -> Vec<Logged> {
        lock(&self.state).log.clone()
    }

    /// Requests the checks refused, with the reason (what a real server would have said).
    pub fn rejections(&self) -> Vec<String> {
        lock(&self.state).rejections.clone()
    }

    /// Requests to `path` (without the API prefix) answered with `status`.
    pub fn count(&self, path_suffix: &str, status: u16) -> usize {
        self.log()
            .iter()
            .filter(|l| l.path.ends_with(path_suffix) && l.status == status)
            .count()
    }
}

impl Drop for AtticServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn router(prefix: &str, state: Shared) -> Router {
    let mut app = Router::new()
        .route("/_api/v1/cache-config/{cache}", get(cache_config))
        .route(
            &format!("{prefix}/_api/v1/get-missing-paths"),
            post(get_missing_paths),
        )
        .route(&format!("{prefix}/_api/v1/upload-path"), put(upload_path))
        .route("/{cache}/nix-cache-info", get(nix_cache_info))
        .route("/{cache}/nar/{file}", get(nar))
        .route("/{cache}/{file}", get(narinfo).head(narinfo));
    if !prefix.is_empty() {
        app = app.route(
            &format!("{prefix}/_api/v1/cache-config/{{cache}}"),
            get(cache_config),
        );
    }
    app.fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(state.clone(), record))
        .with_state(state)
}

/// Logs every request with the status it got.
async fn record(
    State(state): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let method = request.method().to_string();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    lock(&state).log.push(Logged {
        method,
        path,
        status: response.status().as_u16(),
    });
    response
}

/// The error kinds the real server answers with, and their messages.
#[derive(Debug)]
enum ApiError {
    NotFound,
    Unauthorized,
    NoSuchCache,
    NoSuchObject,
    Access(&'static str),
    Request(String),
}

impl ApiError {
    /// What a client without discovery permission on the cache is told instead.
    fn hide(self, discover: bool) -> ApiError {
        match self {
            ApiError::NoSuchCache | ApiError::NoSuchObject | ApiError::Access(_) if !discover => {
                ApiError::Unauthorized
            }
            other => other,
        }
    }

    fn response(self, state: &Shared) -> Response {
        let (status, name, message) = match self {
            ApiError::NotFound => (
                StatusCode::NOT_FOUND,
                "NotFound",
                "The URL you requested was not found.".to_string(),
            ),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "Unauthorized.".to_string(),
            ),
            ApiError::NoSuchCache => (
                StatusCode::NOT_FOUND,
                "NoSuchCache",
                "The requested cache does not exist.".to_string(),
            ),
            ApiError::NoSuchObject => (
                StatusCode::NOT_FOUND,
                "NoSuchObject",
                "The requested object does not exist.".to_string(),
            ),
            ApiError::Access(what) => (
                StatusCode::FORBIDDEN,
                "AccessError",
                format!("Access error: {what}"),
            ),
            ApiError::Request(what) => (
                StatusCode::BAD_REQUEST,
                "RequestError",
                format!("General request error: {what}"),
            ),
        };
        if status != StatusCode::NOT_FOUND || name != "NotFound" {
            lock(state)
                .rejections
                .push(format!("{} {name}: {message}", status.as_u16()));
        }
        (
            status,
            axum::Json(json!({"code": status.as_u16(), "error": name, "message": message})),
        )
            .into_response()
    }
}

async fn not_found(State(state): State<Shared>) -> Response {
    ApiError::NotFound.response(&state)
}

/// The token an `Authorization` header carries: `bearer <token>`, or Basic auth whose
/// password is the token (the scheme name in any case, as the real server parses it).
fn token_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        Some(rest.to_string())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (_, password) = text.split_once(':')?;
        Some(password.to_string())
    } else {
        None
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    Pull,
    Push,
}

impl Inner {
    /// The real server's `auth_cache`: permissions from the token (an unknown one counts as
    /// none), plus pull on public caches; errors hidden from clients that cannot discover.
    fn auth(&self, headers: &HeaderMap, cache: &str, need: Need) -> Result<(), ApiError> {
        let mut perms = token_of(headers)
            .and_then(|t| self.tokens.get(&t))
            .map(|grants| {
                grants
                    .iter()
                    .filter(|(pattern, _)| pattern == "*" || pattern == cache)
                    .fold(Perms::default(), |acc, (_, p)| Perms {
                        pull: acc.pull || p.pull,
                        push: acc.push || p.push,
                    })
            })
            .unwrap_or_default();
        let Some(found) = self.caches.get(cache) else {
            return Err(ApiError::NoSuchCache.hide(perms.can_discover()));
        };
        if found.spec.is_public {
            perms.pull = true;
        }
        let result = match need {
            Need::Pull if !perms.pull => Err(ApiError::Access("No pull permission.")),
            Need::Push if !perms.push => Err(ApiError::Access("No push permission.")),
            _ => Ok(()),
        };
        result.map_err(|e| e.hide(perms.can_discover()))
    }

    fn take_failure(&mut self, endpoint: &'static str) -> bool {
        match self.failures.get_mut(endpoint) {
            Some(n) if *n > 0 => {
                *n -= 1;
                true
            }
            _ => false,
        }
    }
}

/// What a proxy in front of an overloaded server answers.
fn unavailable() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "text/html")],
        "<html><body><h1>503 Service Temporarily Unavailable</h1></body></html>\n",
    )
        .into_response()
}

async fn drain(body: Body) {
    let mut stream = body.into_data_stream();
    while let Some(Ok(_)) = stream.next().await {}
}

fn valid_cache_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 50
        && chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '+'))
}

fn valid_store_path_hash(hash: &str) -> bool {
    hash.len() == 32 && hash.bytes().all(|b| nixbase32::ALPHABET.contains(&b))
}

/// Attic's typed hash: `sha256:` and 64 hex digits or 52 nixbase32 digits.
fn parse_nar_hash(text: &str) -> Result<Sha256, String> {
    let (kind, digest) = text
        .split_once(':')
        .ok_or_else(|| "The string lacks a colon separator.".to_string())?;
    if kind != "sha256" {
        return Err(format!("Hash algorithm {kind} is not supported."));
    }
    let bytes: Vec<u8> = match digest.len() {
        64 => (0..32)
            .map(|i| u8::from_str_radix(&digest[2 * i..2 * i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("Invalid base16 hash: {e}"))?,
        52 => nixbase32::decode(digest).map_err(|_| "Invalid base32 hash.".to_string())?,
        n => {
            return Err(format!(
                "Invalid length for SHA-256 string: Must be either 64 (hexadecimal) or 52 (base32), got {n}."
            ));
        }
    };
    let array: [u8; 32] = bytes
        .try_into()
        .map_err(|_| "Invalid base32 hash.".to_string())?;
    Ok(Sha256::from_bytes(array))
}

/// `UploadPathNarInfo` with the real server's field types: absent `Option`s are `None`,
/// unknown fields are ignored, everything else must be there with the right type.
#[derive(Deserialize)]
struct WireUploadInfo {
    cache: String,
    store_path_hash: String,
    store_path: String,
    references: Vec<String>,
    system: Option<String>,
    deriver: Option<String>,
    sigs: Vec<String>,
    ca: Option<String>,
    nar_hash: String,
    nar_size: u64,
}

fn parse_upload_info(json: &[u8]) -> Result<UploadInfo, String> {
    let wire: WireUploadInfo = serde_json::from_slice(json).map_err(|e| e.to_string())?;
    if !valid_cache_name(&wire.cache) {
        return Err(format!("Invalid cache name {:?}", wire.cache));
    }
    if !valid_store_path_hash(&wire.store_path_hash) {
        return Err(format!(
            "Invalid store path hash {:?}",
            wire.store_path_hash
        ));
    }
    Ok(UploadInfo {
        nar_hash: parse_nar_hash(&wire.nar_hash)?,
        cache: wire.cache,
        store_path_hash: wire.store_path_hash,
        store_path: wire.store_path,
        references: wire.references,
        system: wire.system,
        deriver: wire.deriver,
        sigs: wire.sigs,
        ca: wire.ca,
        nar_size: wire.nar_size,
    })
}

async fn cache_config(
    State(state): State<Shared>,
    Path(cache): Path<String>,
    headers: HeaderMap,
) -> Response {
    let result = {
        let mut inner = lock(&state);
        if inner.take_failure("cache-config") {
            return unavailable();
        }
        inner.auth(&headers, &cache, Need::Pull).map(|()| {
            let found = &inner.caches[&cache];
            let base = format!("http://127.0.0.1:{}", inner.port);
            json!({
                "substituter_endpoint": format!("{base}/{cache}"),
                "api_endpoint": format!("{base}{}/", inner.api_prefix),
                "public_key": found.key.public().to_nix_string(),
                "is_public": found.spec.is_public,
                "store_dir": "/nix/store",
                "priority": 41,
                "upstream_cache_key_names": found.spec.upstream_cache_key_names,
                "retention_period": "Global",
            })
        })
    };
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.response(&state),
    }
}

#[derive(Deserialize)]
struct MissingPathsRequest {
    cache: String,
    store_path_hashes: Vec<String>,
}

async fn get_missing_paths(
    State(state): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if lock(&state).take_failure("get-missing-paths") {
        return unavailable();
    }
    // The real server reads this body with axum's `Json` extractor: it wants the JSON
    // content type and answers 400 / 422 for bodies that are not JSON / not the request.
    let json_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_type {
        lock(&state)
            .rejections
            .push("415 get-missing-paths without a JSON content type".to_string());
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Expected request with `Content-Type: application/json`",
        )
            .into_response();
    }
    let request: MissingPathsRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let status = if e.is_data() {
                StatusCode::UNPROCESSABLE_ENTITY
            } else {
                StatusCode::BAD_REQUEST
            };
            let message = format!("Failed to deserialize the JSON body: {e}");
            lock(&state)
                .rejections
                .push(format!("{} {message}", status.as_u16()));
            return (status, message).into_response();
        }
    };
    if !valid_cache_name(&request.cache)
        || !request
            .store_path_hashes
            .iter()
            .all(|h| valid_store_path_hash(h))
    {
        let message = "Failed to deserialize the JSON body: invalid cache name or store path hash";
        lock(&state).rejections.push(format!("422 {message}"));
        return (StatusCode::UNPROCESSABLE_ENTITY, message).into_response();
    }
    let result = {
        let inner = lock(&state);
        inner.auth(&headers, &request.cache, Need::Push).map(|()| {
            let objects = &inner.caches[&request.cache].objects;
            let mut missing: Vec<&String> = request
                .store_path_hashes
                .iter()
                .filter(|h| !objects.contains_key(*h))
                .collect();
            missing.sort();
            missing.dedup();
            json!({ "missing_paths": missing })
        })
    };
    match result {
        Ok(answer) => axum::Json(answer).into_response(),
        Err(e) => e.response(&state),
    }
}

async fn upload_path(State(state): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    if lock(&state).take_failure("upload-path") {
        drain(body).await;
        return unavailable();
    }
    let stall = {
        let mut inner = lock(&state);
        let stall = inner.stalls > 0;
        inner.stalls = inner.stalls.saturating_sub(1);
        stall
    };
    if stall {
        // Holding the body unread until the client hangs up.
        let _unread = body;
        return std::future::pending::<Response>().await;
    }
    match receive_upload(&state, &headers, body).await {
        Ok(answer) => answer,
        Err(e) => e.response(&state),
    }
}

async fn receive_upload(
    state: &Shared,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let mut stream = body.into_data_stream();
    // Bytes of the body already read past the preamble: the start of the NAR.
    let mut head: Vec<u8> = Vec::new();
    let (json, form) = if let Some(size) = headers.get(PREAMBLE_SIZE_HEADER) {
        let size: usize = size
            .to_str()
            .map_err(|_| {
                ApiError::Request("X-Attic-Nar-Info-Preamble-Size has invalid encoding".into())
            })?
            .parse()
            .map_err(|_| {
                ApiError::Request(
                    "X-Attic-Nar-Info-Preamble-Size must be a valid unsigned integer".into(),
                )
            })?;
        if size > MAX_NAR_INFO_SIZE {
            return Err(ApiError::Request("Upload info is too large".into()));
        }
        let mut preamble = Vec::with_capacity(size);
        while preamble.len() < size {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    let take = (size - preamble.len()).min(chunk.len());
                    preamble.extend_from_slice(&chunk[..take]);
                    head.extend_from_slice(&chunk[take..]);
                }
                Some(Err(e)) => return Err(ApiError::Request(e.to_string())),
                None => break,
            }
        }
        if preamble.len() != size {
            return Err(ApiError::Request(
                "Upload info doesn't match specified size".into(),
            ));
        }
        (preamble, Form::Preamble)
    } else if let Some(value) = headers.get(NAR_INFO_HEADER) {
        (value.as_bytes().to_vec(), Form::Header)
    } else {
        return Err(ApiError::Request("X-Attic-Nar-Info must be set".into()));
    };
    let info = parse_upload_info(&json).map_err(ApiError::Request)?;
    lock(state).auth(headers, &info.cache, Need::Push)?;

    let mut hasher = Sha256Hasher::new();
    let mut nar = Vec::with_capacity(usize::try_from(info.nar_size).unwrap_or(0).min(1 << 28));
    hasher.update(&head);
    nar.extend_from_slice(&head);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::Request(e.to_string()))?;
        hasher.update(&chunk);
        nar.extend_from_slice(&chunk);
    }
    if hasher.finalize() != info.nar_hash || nar.len() as u64 != info.nar_size {
        return Err(ApiError::Request("Bad NAR Hash or Size".into()));
    }

    let mut inner = lock(state);
    let deduplicated = inner.nars.contains_key(&info.nar_hash);
    inner
        .nars
        .entry(info.nar_hash)
        .or_insert_with(|| Arc::new(nar));
    let cache = inner
        .caches
        .get_mut(&info.cache)
        .ok_or(ApiError::NoSuchCache)?;
    cache
        .objects
        .insert(info.store_path_hash.clone(), info.clone());
    inner.uploads.push(Upload {
        info: info.clone(),
        json: String::from_utf8_lossy(&json).into_owned(),
        form,
        deduplicated,
        content_encoding: headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    let answer = if deduplicated {
        json!({"kind": "Deduplicated", "file_size": null, "frac_deduplicated": 1.0})
    } else {
        json!({"kind": "Uploaded", "file_size": info.nar_size, "frac_deduplicated": 0.0})
    };
    Ok(axum::Json(answer).into_response())
}

async fn nix_cache_info(
    State(state): State<Shared>,
    Path(cache): Path<String>,
    headers: HeaderMap,
) -> Response {
    let auth = lock(&state).auth(&headers, &cache, Need::Pull);
    match auth {
        Ok(()) => (
            [(header::CONTENT_TYPE, "text/x-nix-cache-info")],
            "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 41\n",
        )
            .into_response(),
        Err(e) => e.response(&state),
    }
}

/// The narinfo the server makes of an object: its metadata, the uncompressed NAR's URL, the
/// client's signatures and the cache's own.
fn object_narinfo(info: &UploadInfo, key: &SigningKey) -> Option<NarInfo> {
    let references = info
        .references
        .iter()
        .map(|r| StorePath::from_base(r).ok())
        .collect::<Option<Vec<_>>>()?;
    let mut narinfo = NarInfo {
        store_path: StorePath::from_absolute(&info.store_path).ok()?,
        url: format!("nar/{}.nar", nixbase32::encode(info.nar_hash.as_bytes())),
        compression: Some("none".to_string()),
        file_hash: None,
        file_size: None,
        nar_hash: info.nar_hash,
        nar_size: info.nar_size,
        references,
        deriver: info
            .deriver
            .as_deref()
            .and_then(|d| StorePath::from_base(d).ok()),
        system: info.system.clone(),
        sigs: info.sigs.clone(),
        ca: info.ca.clone(),
    };
    narinfo.sign(key);
    Some(narinfo)
}

async fn narinfo(
    State(state): State<Shared>,
    Path((cache, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(hash) = file.strip_suffix(".narinfo") else {
        return ApiError::NotFound.response(&state);
    };
    let result = {
        let inner = lock(&state);
        inner.auth(&headers, &cache, Need::Pull).and_then(|()| {
            let found = &inner.caches[&cache];
            found
                .objects
                .get(hash)
                .and_then(|info| object_narinfo(info, &found.key))
                .ok_or(ApiError::NoSuchObject)
        })
    };
    match result {
        Ok(narinfo) => (
            [(header::CONTENT_TYPE, "text/x-nix-narinfo")],
            narinfo.to_string(),
        )
            .into_response(),
        Err(e) => e.response(&state),
    }
}

async fn nar(
    State(state): State<Shared>,
    Path((cache, file)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let result = {
        let inner = lock(&state);
        inner.auth(&headers, &cache, Need::Pull).and_then(|()| {
            let hash = file
                .strip_suffix(".nar")
                .and_then(|h| nixbase32::decode(h).ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .map(Sha256::from_bytes)
                .ok_or(ApiError::NoSuchObject)?;
            let held = inner.caches[&cache]
                .objects
                .values()
                .any(|o| o.nar_hash == hash);
            match inner.nars.get(&hash) {
                Some(bytes) if held => Ok(bytes.clone()),
                _ => Err(ApiError::NoSuchObject),
            }
        })
    };
    match result {
        Ok(bytes) => (
            [(header::CONTENT_TYPE, "application/x-nix-nar")],
            bytes.as_ref().clone(),
        )
            .into_response(),
        Err(e) => e.response(&state),
    }
}
