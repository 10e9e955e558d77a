//! The S3 target: a binary cache in an S3 bucket, laid out exactly like a `file://` cache.
//!
//! # URL
//!
//! `s3://<bucket>[/<prefix>]?region=<r>&endpoint=<e>&scheme=<http|https>&profile=<p>`, with
//! Nix's own parameter names, so a cache URL from a `nix.conf` works unchanged. `endpoint` is
//! either a URL (`http://127.0.0.1:9000`) or `host:port`, which gets `scheme` (default
//! `https`) in front, as Nix does it. With an endpoint, requests use path-style addressing
//! (`<endpoint>/<bucket>/<key>`), which every S3-compatible server understands; plain HTTP is
//! allowed only when the endpoint says `http`. Nix's binary-cache settings that describe how
//! Nix itself writes (`compression`, `secret-key`, `parallel-compression`, ...) are accepted
//! and ignored, because narpost decides those elsewhere; any other parameter is an error, so a
//! typo does not silently send uploads to the wrong place.
//!
//! # Credentials
//!
//! The usual AWS order: `profile=` in the URL selects that profile of the shared credentials
//! file; otherwise `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`) from
//! the environment; otherwise the `AWS_PROFILE` (or `default`) profile of the shared
//! credentials file (`AWS_SHARED_CREDENTIALS_FILE`, else `~/.aws/credentials`); otherwise
//! whatever object_store finds on its own (web identity, container or instance credentials).
//! The region comes from `region=`, `AWS_REGION` / `AWS_DEFAULT_REGION`, the profile's
//! `region` in `~/.aws/config`, or `us-east-1`. Secrets never appear in messages or logs:
//! S3 error bodies are reduced to their `<Code>`.
//!
//! # Layout and uploads
//!
//! Keys are those of a `file://` cache below the prefix: `nix-cache-info`,
//! `<hashpart>.narinfo` (`text/x-nix-narinfo`) and `nar/<filehash>.nar.zst`
//! (`application/x-nix-nar`). NARs above [`MULTIPART_THRESHOLD`] go up as a multipart
//! upload whose parts are read from the spooled file one at a time (memory stays at a few
//! parts whatever the NAR's size); S3 only makes an object visible when the upload is
//! completed, and any failure aborts it, so no partial object ever exists under a real key.
//! (A crash leaves the parts stored but invisible; a bucket lifecycle rule removes them.)
//!
//! Before writing `nix-cache-info` into a new cache, the bucket is listed once: some
//! S3-compatible servers answer a read in a missing bucket as if only the key were missing
//! and create the bucket on the first write, which would turn a typo into a new cache.
//!
//! # Errors and retries
//!
//! The pipeline owns retrying with backoff, so object_store's own retries are cut down to a
//! couple of quick attempts: an outage then reaches the pipeline in about a second instead of
//! minutes. 5xx, `SlowDown` and connection failures are
//! [`Transient`](super::ErrorKind::Transient); rejected credentials and denied access are
//! [`Auth`](super::ErrorKind::Auth); a missing bucket and other 4xx are
//! [`Permanent`](super::ErrorKind::Permanent).

use std::collections::{HashMap, HashSet};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder, AwsCredential};
use object_store::client::{HttpError, HttpErrorKind};
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, MultipartUpload, ObjectStore,
    ObjectStoreExt, PutMultipartOptions, PutOptions, PutPayload, RetryConfig,
    StaticCredentialProvider,
};
use tokio::io::AsyncReadExt;

use super::{NarBody, NarFormat, PreparedNar, Target, TargetError};
use crate::format::narinfo::NarInfo;
use crate::format::store_path::{STORE_DIR, StorePath};
use crate::store::PathInfo;

/// NARs larger than this are uploaded in parts.
pub const MULTIPART_THRESHOLD: u64 = 16 * 1024 * 1024;
/// The usual part size; larger NARs get larger parts to stay under S3's part limit.
const PART_SIZE: u64 = 8 * 1024 * 1024;
/// S3 allows 10,000 parts; staying well below leaves room for rounding.
const MAX_PARTS: u64 = 9_000;
/// Parts uploaded at once for one NAR; the pipeline already runs several NARs in parallel.
const PARTS_IN_FLIGHT: usize = 2;
/// Concurrent `HEAD` requests while asking which narinfos exist.
const HEAD_CONCURRENCY: usize = 32;

const NARINFO_TYPE: &str = "text/x-nix-narinfo";
const NAR_TYPE: &str = "application/x-nix-nar";
const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";

/// Nix settings that may appear in an S3 cache URL but only describe how Nix itself writes.
const IGNORED_NIX_PARAMS: &[&str] = &[
    "compression",
    "compression-level",
    "parallel-compression",
    "secret-key",
    "write-nar-listing",
    "index-debug-info",
    "narinfo-compression",
    "ls-compression",
    "log-compression",
    "multipart-upload",
    "buffer-size",
    "want-mass-query",
    "priority",
    "trusted",
];

/// A binary cache in an S3 bucket (or below a prefix in one).
pub struct S3Target {
    /// Client for small requests (HEAD, narinfo, nix-cache-info): a short timeout, so a hung
    /// server is noticed quickly.
    meta: AmazonS3,
    /// Client for NAR bodies: a timeout long enough for a large part on a slow uplink.
    data: AmazonS3,
    bucket: String,
    /// Key prefix without leading or trailing slashes; empty for the bucket's root.
    prefix: String,
    /// The URL as given (S3 URLs carry no secrets), for messages.
    url: String,
    /// Where requests go, for messages about an unreachable server.
    endpoint: String,
    compression_level: i32,
    /// Where the credentials came from, so an auth failure can say what to fix.
    credentials: CredentialSource,
}

/// What `s3://...` says, before any credentials are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
struct S3Url {
    bucket: String,
    prefix: String,
    region: Option<String>,
    /// Full URL with scheme.
    endpoint: Option<String>,
    profile: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum CredentialSource {
    Environment,
    Profile {
        name: String,
        file: PathBuf,
    },
    /// Nothing explicit was found; object_store's web identity / container / instance chain.
    Ambient,
}

impl S3Target {
    /// Parses an `s3://` cache URL and resolves credentials and region (see the module doc).
    ///
    /// Reads the shared AWS credentials and config files, which are a few hundred bytes; this
    /// is meant to be called once while setting up, not on a hot path.
    pub fn from_url(url: &str, compression_level: i32) -> Result<Self, TargetError> {
        let parsed = S3Url::parse(url)?;
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let resolved = resolve_credentials(&parsed, &env, home.as_deref())?;

        let mut builder = AmazonS3Builder::from_env()
            .with_bucket_name(&parsed.bucket)
            .with_retry(retry_config());
        if let Some(credential) = resolved.credential {
            builder = builder.with_credentials(Arc::new(StaticCredentialProvider::new(credential)));
        }
        let region = parsed
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"))
            .or(resolved.region)
            .unwrap_or_else(|| "us-east-1".to_string());
        builder = builder.with_region(&region);

        let endpoint = parsed
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"));
        let allow_http = endpoint
            .as_deref()
            .is_some_and(|e| e.starts_with("http://"));
        if let Some(endpoint) = &parsed.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        let endpoint_desc =
            endpoint.unwrap_or_else(|| format!("https://s3.{region}.amazonaws.com"));

        let build = |timeout: Duration| {
            let options = ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(timeout)
                .with_allow_http(allow_http);
            builder
                .clone()
                .with_client_options(options)
                .build()
                .map_err(|e| {
                    TargetError::permanent(format!(
                        "{url}: cannot set up the S3 client: {}",
                        redact(&e.to_string())
                    ))
                })
        };
        Ok(Self {
            meta: build(Duration::from_secs(30))?,
            data: build(Duration::from_secs(15 * 60))?,
            bucket: parsed.bucket,
            prefix: parsed.prefix,
            url: url.to_string(),
            endpoint: endpoint_desc,
            compression_level,
            credentials: resolved.source,
        })
    }

    fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }

    /// Turns an object_store error into one line naming the bucket, plus what to do.
    fn error(&self, err: &object_store::Error, action: &str) -> TargetError {
        let failure = Failure::inspect(err);
        let cache = self.display();
        if let Some(kind) = failure.transport {
            let detail = failure.root_cause;
            if self.credentials == CredentialSource::Ambient && failure.credential_endpoint {
                return TargetError::auth(format!(
                    "{cache}: no AWS credentials found while {action}"
                ))
                .with_hint(
                    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or add a profile to \
                     ~/.aws/credentials (and name it with profile= or AWS_PROFILE)",
                );
            }
            let what = match kind {
                HttpErrorKind::Timeout => "timed out",
                _ => "cannot reach the server",
            };
            return TargetError::transient(format!(
                "{cache}: {what} at {} while {action}: {detail}",
                self.endpoint
            ))
            .with_hint(format!(
                "check that {} is up and that the endpoint= and region= parameters are right",
                self.endpoint
            ));
        }
        let code = failure.code.as_deref().unwrap_or("");
        let status = failure.status;
        let code_note = if code.is_empty() {
            status.map(|s| format!("HTTP {s}")).unwrap_or_default()
        } else {
            code.to_string()
        };
        match (status, code) {
            (_, "NoSuchBucket") => TargetError::permanent(format!(
                "{cache}: bucket {} does not exist on {}",
                self.bucket, self.endpoint
            ))
            .with_hint(format!(
                "create it first (e.g. `aws s3 mb s3://{}`), or fix the bucket name, region= or endpoint=",
                self.bucket
            )),
            (_, "SlowDown") | (Some(500..=599), _) | (Some(429), _) => {
                TargetError::transient(format!(
                    "{cache}: the server answered {code_note} while {action}"
                ))
            }
            (
                _,
                "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken"
                | "TokenRefreshRequired" | "AuthorizationHeaderMalformed" | "NotSignedUp",
            )
            | (Some(401), _) => TargetError::auth(format!(
                "{cache}: the server rejected the credentials ({code_note}) while {action}"
            ))
            .with_hint(self.credentials_hint()),
            (Some(403), _) => TargetError::auth(format!(
                "{cache}: access denied ({code_note}) while {action}"
            ))
            .with_hint(format!(
                "the credentials need s3:GetObject, s3:PutObject and s3:AbortMultipartUpload on \
                 bucket {}; {}",
                self.bucket,
                self.credentials_hint()
            )),
            _ => TargetError::permanent(format!(
                "{cache}: the server refused {action} ({})",
                if code_note.is_empty() {
                    redact(&err.to_string())
                } else {
                    code_note
                }
            )),
        }
    }

    fn credentials_hint(&self) -> String {
        match &self.credentials {
            CredentialSource::Environment => {
                "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN, if the \
                 session expired)"
                    .to_string()
            }
            CredentialSource::Profile { name, file } => {
                format!("check profile [{name}] in {}", file.display())
            }
            CredentialSource::Ambient => "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or \
                                          add a profile to ~/.aws/credentials"
                .to_string(),
        }
    }

    async fn put_small(
        &self,
        key: &ObjectPath,
        body: Bytes,
        content_type: &'static str,
        action: &str,
    ) -> Result<(), TargetError> {
        let client = if body.len() as u64 > 1024 * 1024 {
            &self.data
        } else {
            &self.meta
        };
        let options = PutOptions {
            attributes: content_type_attr(content_type),
            ..PutOptions::default()
        };
        client
            .put_opts(key, PutPayload::from(body), options)
            .await
            .map(|_| ())
            .map_err(|e| self.error(&e, action))
    }

    async fn put_multipart(
        &self,
        key: &ObjectPath,
        file: &FsPath,
        size: u64,
    ) -> Result<(), TargetError> {
        let action = format!("uploading {key}");
        let options = PutMultipartOptions {
            attributes: content_type_attr(NAR_TYPE),
            ..PutMultipartOptions::default()
        };
        let mut upload = self
            .data
            .put_multipart_opts(key, options)
            .await
            .map_err(|e| self.error(&e, &format!("starting the upload of {key}")))?;
        let sent = self.send_parts(upload.as_mut(), file, size, &action).await;
        let result = match sent {
            Ok(()) => upload
                .complete()
                .await
                .map(|_| ())
                .map_err(|e| self.error(&e, &format!("completing the upload of {key}"))),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Until it is completed, a multipart upload is invisible under its key; aborting
            // frees the stored parts. If the server is gone, it discards them by its own
            // lifecycle rules, and the key still never shows a partial object.
            if let Err(abort) = upload.abort().await {
                tracing::warn!(
                    "{}: could not abort the failed upload of {key}: {}",
                    self.display(),
                    self.error(&abort, "aborting").message
                );
            }
        }
        result
    }

    /// Before the first write into a cache: some S3-compatible servers answer a GET in a
    /// missing bucket with `NoSuchKey` and create the bucket on the first PUT, so a typo in
    /// the bucket name would quietly start a new cache. A listing names a missing bucket
    /// everywhere. Without permission to list, there is no telling, and the push goes on.
    async fn check_bucket_exists(&self) -> Result<(), TargetError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let first = self.meta.list(prefix.as_ref()).next().await;
        let Some(Err(err)) = first else {
            return Ok(());
        };
        let failure = Failure::inspect(&err);
        if failure.code.as_deref() == Some("NoSuchBucket") || failure.transport.is_some() {
            return Err(self.error(&err, "listing the bucket"));
        }
        tracing::debug!(
            "{}: cannot list the bucket to check it exists: {}",
            self.display(),
            redact(&err.to_string())
        );
        Ok(())
    }

    /// `Some(path)` when the cache has no narinfo for it.
    async fn narinfo_missing(&self, path: StorePath) -> Result<Option<StorePath>, TargetError> {
        let key = self.key(&format!("{}.narinfo", path.hash_part()));
        match self.meta.head(&key).await {
            Ok(_) => Ok(None),
            Err(object_store::Error::NotFound { .. }) => Ok(Some(path)),
            Err(e) => Err(self.error(&e, &format!("checking {key}"))),
        }
    }

    async fn send_parts(
        &self,
        upload: &mut dyn MultipartUpload,
        file: &FsPath,
        size: u64,
        action: &str,
    ) -> Result<(), TargetError> {
        let local = |e: std::io::Error| {
            TargetError::permanent(format!(
                "{}: cannot read the spooled NAR: {e}",
                file.display()
            ))
        };
        let part_size = part_size_for(size);
        let mut reader = tokio::fs::File::open(file).await.map_err(local)?;
        let mut in_flight: FuturesUnordered<object_store::UploadPart> = FuturesUnordered::new();
        let mut sent = 0u64;
        while sent < size {
            let len = part_size.min(size - sent);
            let mut buf = vec![0u8; len as usize];
            reader.read_exact(&mut buf).await.map_err(local)?;
            sent += len;
            while in_flight.len() >= PARTS_IN_FLIGHT {
                if let Some(done) = in_flight.next().await {
                    done.map_err(|e| self.error(&e, action))?;
                }
            }
            in_flight.push(upload.put_part(PutPayload::from(Bytes::from(buf))));
        }
        while let Some(done) = in_flight.next().await {
            done.map_err(|e| self.error(&e, action))?;
        }
        // The spool file must be exactly what was hashed; more bytes mean it changed under us.
        let mut probe = [0u8; 1];
        if reader.read(&mut probe).await.map_err(local)? != 0 {
            return Err(TargetError::permanent(format!(
                "{}: spooled NAR is longer than its recorded size {size}",
                file.display()
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl Target for S3Target {
    fn url(&self) -> String {
        self.url.clone()
    }

    fn nar_format(&self) -> NarFormat {
        NarFormat::Zstd {
            level: self.compression_level,
        }
    }

    async fn open(&self) -> Result<(), TargetError> {
        let key = self.key("nix-cache-info");
        let action = "reading nix-cache-info";
        match self.meta.get(&key).await {
            Ok(got) => {
                let body = got.bytes().await.map_err(|e| self.error(&e, action))?;
                let text = String::from_utf8_lossy(&body);
                let store_dir = text.lines().find_map(|l| l.strip_prefix("StoreDir:"));
                match store_dir.map(str::trim) {
                    Some(dir) if dir != STORE_DIR => Err(TargetError::permanent(format!(
                        "{}: the cache is for store {dir}, not {STORE_DIR}",
                        self.display()
                    ))),
                    _ => Ok(()),
                }
            }
            Err(err) => {
                let failure = Failure::inspect(&err);
                let missing_key = matches!(err, object_store::Error::NotFound { .. })
                    && failure.code.as_deref() != Some("NoSuchBucket");
                if !missing_key {
                    return Err(self.error(&err, action));
                }
                self.check_bucket_exists().await?;
                let info = format!("StoreDir: {STORE_DIR}\nWantMassQuery: 1\nPriority: 40\n");
                self.put_small(
                    &key,
                    Bytes::from(info),
                    CACHE_INFO_TYPE,
                    "writing nix-cache-info",
                )
                .await
            }
        }
    }

    async fn missing(&self, paths: &[PathInfo]) -> Result<HashSet<StorePath>, TargetError> {
        let unique: HashSet<StorePath> = paths.iter().map(|p| p.path.clone()).collect();
        let found: Vec<Option<StorePath>> = futures::stream::iter(unique)
            .map(|path| self.narinfo_missing(path))
            .buffer_unordered(HEAD_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(found.into_iter().flatten().collect())
    }

    async fn put_nar(&self, nar: &PreparedNar) -> Result<String, TargetError> {
        let NarBody::Spooled(spooled) = &nar.body else {
            return Err(TargetError::permanent(format!(
                "{}: S3 target was handed an uncompressed NAR for {}",
                self.display(),
                nar.info.path
            )));
        };
        let relative = spooled.cache_key();
        let key = self.key(&relative);
        // NARs are named by their content: one already there with the right size is this one
        // (left over from an interrupted push, or shared with another path).
        match self.meta.head(&key).await {
            Ok(meta) if meta.size == spooled.file_size => return Ok(relative),
            Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error(&e, &format!("checking {key}"))),
        }
        if spooled.file_size > MULTIPART_THRESHOLD {
            self.put_multipart(&key, &spooled.file, spooled.file_size)
                .await?;
        } else {
            let body = tokio::fs::read(&spooled.file).await.map_err(|e| {
                TargetError::permanent(format!(
                    "{}: cannot read the spooled NAR: {e}",
                    spooled.file.display()
                ))
            })?;
            if body.len() as u64 != spooled.file_size {
                return Err(TargetError::permanent(format!(
                    "{}: spooled NAR has {} bytes, expected {}",
                    spooled.file.display(),
                    body.len(),
                    spooled.file_size
                )));
            }
            self.put_small(
                &key,
                Bytes::from(body),
                NAR_TYPE,
                &format!("uploading {key}"),
            )
            .await?;
        }
        Ok(relative)
    }

    async fn put_narinfo(&self, narinfo: &NarInfo, _nar: &PreparedNar) -> Result<(), TargetError> {
        let key = self.key(&format!("{}.narinfo", narinfo.store_path.hash_part()));
        let action = format!("uploading {key}");
        self.put_small(
            &key,
            Bytes::from(narinfo.to_string()),
            NARINFO_TYPE,
            &action,
        )
        .await
    }

    fn stores_logs(&self) -> bool {
        true
    }

    async fn put_log(&self, drv: &StorePath, log: Bytes) -> Result<(), TargetError> {
        let key = self.key(&super::log_key(drv));
        let action = format!("uploading {key}");
        self.put_small(&key, log, super::LOG_TYPE, &action).await
    }
}

impl S3Url {
    fn parse(input: &str) -> Result<Self, TargetError> {
        let bad = |what: String| {
            TargetError::permanent(format!("{input}: {what}")).with_hint(
                "an S3 cache URL looks like s3://bucket[/prefix]?region=...&endpoint=...&profile=...",
            )
        };
        let url = reqwest::Url::parse(input).map_err(|e| bad(format!("not a URL: {e}")))?;
        if url.scheme() != "s3" {
            return Err(bad(format!("scheme is {}, not s3", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials do not belong in the URL; use AWS_ACCESS_KEY_ID / \
                 AWS_SECRET_ACCESS_KEY or profile="
                    .to_string(),
            ));
        }
        let bucket = url
            .host_str()
            .filter(|b| !b.is_empty())
            .ok_or_else(|| bad("no bucket name".to_string()))?
            .to_string();
        if url.port().is_some() {
            return Err(bad(
                "a port belongs in endpoint=, not after the bucket name".to_string(),
            ));
        }
        let prefix = url.path().trim_matches('/').to_string();
        if prefix.split('/').any(|s| s == "." || s == "..") {
            return Err(bad("prefix must not contain . or .. segments".to_string()));
        }
        let mut params: HashMap<String, String> = HashMap::new();
        for (name, value) in url.query_pairs() {
            if params.insert(name.to_string(), value.to_string()).is_some() {
                return Err(bad(format!("parameter {name} given twice")));
            }
        }
        let mut region = None;
        let mut endpoint = None;
        let mut scheme = None;
        let mut profile = None;
        for (name, value) in params {
            match name.as_str() {
                "region" => region = Some(value),
                "endpoint" => endpoint = Some(value),
                "scheme" => scheme = Some(value),
                "profile" => profile = Some(value),
                other if IGNORED_NIX_PARAMS.contains(&other) => {
                    tracing::debug!("{input}: ignoring Nix setting {other}")
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other} (known: region, endpoint, scheme, profile)"
                    )));
                }
            }
        }
        let scheme = match scheme.as_deref() {
            None | Some("https") => "https",
            Some("http") => "http",
            Some(other) => return Err(bad(format!("scheme={other} is neither http nor https"))),
        };
        let endpoint = match endpoint.filter(|e| !e.is_empty()) {
            None => None,
            Some(e) if e.contains("://") => {
                let parsed =
                    reqwest::Url::parse(&e).map_err(|err| bad(format!("endpoint {e}: {err}")))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    return Err(bad(format!("endpoint {e} is not http or https")));
                }
                Some(e.trim_end_matches('/').to_string())
            }
            Some(e) => Some(format!("{scheme}://{}", e.trim_end_matches('/'))),
        };
        Ok(Self {
            bucket,
            prefix,
            region: region.filter(|r| !r.is_empty()),
            endpoint,
            profile: profile.filter(|p| !p.is_empty()),
        })
    }
}

/// Credentials (none: object_store's ambient chain) and the profile's region, if any.
#[derive(Debug)]
struct Resolved {
    credential: Option<AwsCredential>,
    source: CredentialSource,
    region: Option<String>,
}

fn resolve_credentials(
    url: &S3Url,
    env: &dyn Fn(&str) -> Option<String>,
    home: Option<&FsPath>,
) -> Result<Resolved, TargetError> {
    let aws_dir = home.map(|h| h.join(".aws"));
    let credentials_file = env("AWS_SHARED_CREDENTIALS_FILE")
        .map(PathBuf::from)
        .or_else(|| aws_dir.as_ref().map(|d| d.join("credentials")));
    let config_file = env("AWS_CONFIG_FILE")
        .map(PathBuf::from)
        .or_else(|| aws_dir.as_ref().map(|d| d.join("config")));

    let key_id = env("AWS_ACCESS_KEY_ID");
    let secret = env("AWS_SECRET_ACCESS_KEY");
    if url.profile.is_none() {
        match (key_id, secret) {
            (Some(key_id), Some(secret_key)) => {
                return Ok(Resolved {
                    credential: Some(AwsCredential {
                        key_id,
                        secret_key,
                        token: env("AWS_SESSION_TOKEN"),
                    }),
                    source: CredentialSource::Environment,
                    region: None,
                });
            }
            (Some(_), None) => {
                return Err(TargetError::auth(format!(
                    "s3://{}: AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not",
                    url.bucket
                )));
            }
            (None, Some(_)) => {
                return Err(TargetError::auth(format!(
                    "s3://{}: AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not",
                    url.bucket
                )));
            }
            (None, None) => {}
        }
    }

    let explicit = url.profile.clone().or_else(|| env("AWS_PROFILE"));
    let name = explicit.clone().unwrap_or_else(|| "default".to_string());
    let region = config_file
        .as_deref()
        .and_then(|f| std::fs::read_to_string(f).ok())
        .and_then(|text| {
            let section = if name == "default" {
                "default".to_string()
            } else {
                format!("profile {name}")
            };
            parse_ini(&text).remove(&section)?.remove("region")
        });
    let Some(file) = credentials_file else {
        return match explicit {
            Some(_) => Err(TargetError::auth(format!(
                "s3://{}: profile {name} requested but there is no home directory to find \
                 ~/.aws/credentials in",
                url.bucket
            ))
            .with_hint("set AWS_SHARED_CREDENTIALS_FILE")),
            None => Ok(Resolved {
                credential: None,
                source: CredentialSource::Ambient,
                region,
            }),
        };
    };
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && explicit.is_none() => {
            return Ok(Resolved {
                credential: None,
                source: CredentialSource::Ambient,
                region,
            });
        }
        Err(e) => {
            return Err(TargetError::auth(format!(
                "s3://{}: cannot read {} for profile {name}: {e}",
                url.bucket,
                file.display()
            )));
        }
    };
    let mut sections = parse_ini(&text);
    let Some(mut section) = sections.remove(&name) else {
        return match explicit {
            Some(_) => Err(TargetError::auth(format!(
                "s3://{}: profile {name} not found in {}",
                url.bucket,
                file.display()
            ))),
            None => Ok(Resolved {
                credential: None,
                source: CredentialSource::Ambient,
                region,
            }),
        };
    };
    match (
        section.remove("aws_access_key_id"),
        section.remove("aws_secret_access_key"),
    ) {
        (Some(key_id), Some(secret_key)) => Ok(Resolved {
            credential: Some(AwsCredential {
                key_id,
                secret_key,
                token: section.remove("aws_session_token"),
            }),
            source: CredentialSource::Profile { name, file },
            region,
        }),
        _ => Err(TargetError::auth(format!(
            "s3://{}: profile {name} in {} lacks aws_access_key_id or aws_secret_access_key",
            url.bucket,
            file.display()
        ))
        .with_hint(
            "narpost reads static keys from the credentials file; for SSO or role profiles, \
             export AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN",
        )),
    }
}

/// The subset of INI the AWS files use: `[section]`, `key = value`, `#`/`;` comments.
fn parse_ini(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut sections: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            sections.entry(name.clone()).or_default();
            current = Some(name);
        } else if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            sections
                .entry(section.clone())
                .or_default()
                .insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
        }
    }
    sections
}

fn retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
            base: 2.0,
        },
        max_retries: 2,
        retry_timeout: Duration::from_secs(15),
    }
}

fn content_type_attr(content_type: &'static str) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, content_type.into());
    attributes
}

fn part_size_for(size: u64) -> u64 {
    PART_SIZE.max(size.div_ceil(MAX_PARTS))
}

/// What an object_store error says about the request, gathered from its source chain.
///
/// object_store does not export its HTTP error type, only the transport one, so the status
/// and the S3 `<Code>` are read from the error's text, where object_store puts them.
#[derive(Debug, Default)]
struct Failure {
    status: Option<u16>,
    code: Option<String>,
    transport: Option<HttpErrorKind>,
    /// The innermost error's text, e.g. "Connection refused (os error 111)".
    root_cause: String,
    /// The failure was fetching credentials from an instance/container metadata endpoint.
    credential_endpoint: bool,
}

impl Failure {
    fn inspect(err: &object_store::Error) -> Self {
        let text = err.to_string();
        let mut failure = Failure {
            status: match err {
                object_store::Error::NotFound { .. } => Some(404),
                object_store::Error::PermissionDenied { .. } => Some(403),
                object_store::Error::Unauthenticated { .. } => Some(401),
                object_store::Error::Precondition { .. } => Some(412),
                _ => None,
            },
            code: xml_code(&text),
            credential_endpoint: text.contains("169.254.169.254") || text.contains("169.254.170.2"),
            ..Failure::default()
        };
        if failure.status.is_none() {
            failure.status = status_in(&text);
        }
        let mut current: &(dyn std::error::Error + 'static) = err;
        loop {
            if let Some(http) = current.downcast_ref::<HttpError>() {
                failure.transport.get_or_insert(http.kind());
            }
            match current.source() {
                Some(next) => current = next,
                None => break,
            }
        }
        failure.root_cause = redact(&current.to_string());
        // A response that arrived (with a status) is not a transport failure, even if
        // object_store also wrapped a decoding error somewhere in the chain.
        if failure.status.is_some() || failure.code.is_some() {
            failure.transport = None;
        }
        if matches!(
            failure.transport,
            Some(HttpErrorKind::Decode | HttpErrorKind::Unknown)
        ) {
            failure.transport = None;
        }
        failure
    }
}

fn status_in(text: &str) -> Option<u16> {
    let (_, rest) = text.split_once("status code: ")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn xml_code(text: &str) -> Option<String> {
    let (_, rest) = text.split_once("<Code>")?;
    let (code, _) = rest.split_once("</Code>")?;
    Some(code.trim().to_string()).filter(|c| !c.is_empty())
}

/// S3 error bodies echo the signed request (canonical request, string to sign); none of it is
/// secret, but it is noise, so messages keep only what comes before the body.
fn redact(text: &str) -> String {
    let cut = text.find("<?xml").or_else(|| text.find("<Error>"));
    let kept = match cut {
        Some(at) => text[..at].trim_end_matches([' ', ':']),
        None => text,
    };
    kept.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::super::ErrorKind;
    use super::*;

    #[test]
    fn parses_bucket_prefix_and_nix_parameters() {
        let url = S3Url::parse(
            "s3://my-cache/some/prefix/?region=eu-west-1&endpoint=http://127.0.0.1:9000&profile=ci&compression=xz",
        )
        .unwrap();
        assert_eq!(
            url,
            S3Url {
                bucket: "my-cache".into(),
                prefix: "some/prefix".into(),
                region: Some("eu-west-1".into()),
                endpoint: Some("http://127.0.0.1:9000".into()),
                profile: Some("ci".into()),
            }
        );
    }

    #[test]
    fn endpoint_without_scheme_takes_the_scheme_parameter() {
        let url = S3Url::parse("s3://b?endpoint=minio.local:9000&scheme=http").unwrap();
        assert_eq!(url.endpoint.as_deref(), Some("http://minio.local:9000"));
        assert_eq!(url.prefix, "");
        let url = S3Url::parse("s3://b?endpoint=minio.local:9000").unwrap();
        assert_eq!(url.endpoint.as_deref(), Some("https://minio.local:9000"));
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "http://bucket",
            "s3://",
            "s3://b?endpont=x",
            "s3://key:secret@b",
            "s3://b?scheme=ftp&endpoint=x:1",
            "s3://b:9000",
        ] {
            let err = S3Url::parse(bad).unwrap_err();
            assert_eq!(err.kind, ErrorKind::Permanent, "{bad}");
            assert!(err.message.starts_with(bad), "{bad}: {}", err.message);
        }
    }

    #[test]
    fn ini_sections_keys_and_comments() {
        let ini = "# c\n[default]\naws_access_key_id = AK\n; x\nAWS_SECRET_ACCESS_KEY=SK\n\n[profile ci]\nregion = eu-central-1\n";
        let parsed = parse_ini(ini);
        assert_eq!(parsed["default"]["aws_access_key_id"], "AK");
        assert_eq!(parsed["default"]["aws_secret_access_key"], "SK");
        assert_eq!(parsed["profile ci"]["region"], "eu-central-1");
    }

    fn env_of(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn environment_keys_win_unless_a_profile_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(".aws")).unwrap();
        std::fs::write(
            dir.path().join(".aws/credentials"),
            "[default]\naws_access_key_id=FILEAK\naws_secret_access_key=FILESK\n[ci]\naws_access_key_id=CIAK\naws_secret_access_key=CISK\naws_session_token=T\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".aws/config"),
            "[profile ci]\nregion=eu-north-1\n",
        )
        .unwrap();
        let env = env_of(&[
            ("AWS_ACCESS_KEY_ID", "ENVAK"),
            ("AWS_SECRET_ACCESS_KEY", "ENVSK"),
        ]);
        let url = S3Url::parse("s3://b").unwrap();
        let got = resolve_credentials(&url, &env, Some(dir.path())).unwrap();
        assert_eq!(got.source, CredentialSource::Environment);
        assert_eq!(got.credential.unwrap().key_id, "ENVAK");

        let url = S3Url::parse("s3://b?profile=ci").unwrap();
        let got = resolve_credentials(&url, &env, Some(dir.path())).unwrap();
        let cred = got.credential.unwrap();
        assert_eq!(
            (cred.key_id.as_str(), cred.token.as_deref()),
            ("CIAK", Some("T"))
        );
        assert_eq!(got.region.as_deref(), Some("eu-north-1"));

        let none = env_of(&[]);
        let url = S3Url::parse("s3://b").unwrap();
        let got = resolve_credentials(&url, &none, Some(dir.path())).unwrap();
        assert_eq!(got.credential.unwrap().key_id, "FILEAK");

        let url = S3Url::parse("s3://b?profile=nope").unwrap();
        let err = resolve_credentials(&url, &none, Some(dir.path())).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Auth);
        assert!(
            err.message.contains("profile nope not found"),
            "{}",
            err.message
        );
    }

    #[test]
    fn no_credentials_anywhere_falls_back_to_the_ambient_chain() {
        let dir = tempfile::tempdir().unwrap();
        let url = S3Url::parse("s3://b").unwrap();
        let got = resolve_credentials(&url, &env_of(&[]), Some(dir.path())).unwrap();
        assert_eq!(got.source, CredentialSource::Ambient);
        assert!(got.credential.is_none());
        let half = env_of(&[("AWS_ACCESS_KEY_ID", "AK")]);
        let err = resolve_credentials(&url, &half, Some(dir.path())).unwrap_err();
        assert_eq!(err.kind, ErrorKind::Auth);
    }

    #[test]
    fn reads_status_and_code_from_error_text() {
        let text = "Generic S3 error: Error performing PUT http://x/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable: <?xml version=\"1.0\"?><Error><Code>SlowDown</Code><StringToSign>x</StringToSign></Error>";
        assert_eq!(status_in(text), Some(503));
        assert_eq!(xml_code(text).as_deref(), Some("SlowDown"));
        assert_eq!(
            redact(text),
            "Generic S3 error: Error performing PUT http://x/b/k in 2ms - Server returned non-2xx status code: 503 Service Unavailable"
        );
    }

    #[test]
    fn parts_stay_under_the_part_limit() {
        assert_eq!(part_size_for(100 * 1024 * 1024), PART_SIZE);
        let huge = 200 * 1024 * 1024 * 1024u64;
        assert!(huge.div_ceil(part_size_for(huge)) <= MAX_PARTS);
    }
}
