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
//! minutes. 5xx, 429, 408, connection failures and the S3 error codes that mean "later"
//! whatever status they come with (`InternalError` and `SlowDown` inside a 200 answer to
//! CompleteMultipartUpload, `RequestTimeout` as a 400) are
//! [`Transient`](super::ErrorKind::Transient); rejected credentials, denied access and a
//! skewed clock are [`Auth`](super::ErrorKind::Auth); a missing bucket and other 4xx are
//! [`Permanent`](super::ErrorKind::Permanent). None of them gives up a queued path: the
//! daemon keeps it until the cache takes it (see `pipeline::FailureKind::is_permanent`).

mod client;
mod credentials;
mod error;
mod multipart;
mod url;

use object_store::aws::AmazonS3;

use credentials::CredentialSource;
pub use multipart::MULTIPART_THRESHOLD;

/// Whether `url` is an `s3://` cache URL narpost can use (bucket, parameters), without
/// resolving credentials.
pub fn check_url(url: &str) -> Result<(), super::TargetError> {
    url::S3Url::parse(url).map(drop)
}

const NARINFO_TYPE: &str = "text/x-nix-narinfo";
const NAR_TYPE: &str = "application/x-nix-nar";
const CACHE_INFO_TYPE: &str = "text/x-nix-cache-info";

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
