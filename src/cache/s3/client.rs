//! Setting up the clients, the requests of the [layout](super#layout-and-uploads) that fit in
//! one PUT or HEAD, and the [`Target`] implementation.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{StreamExt, TryStreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutOptions,
    PutPayload, RetryConfig, StaticCredentialProvider,
};

use super::credentials::resolve_credentials;
use super::error::{Failure, redact};
use super::url::S3Url;
use super::{CACHE_INFO_TYPE, MULTIPART_THRESHOLD, NAR_TYPE, NARINFO_TYPE, S3Target};
use crate::cache::{
    LOG_TYPE, NarBody, NarFormat, ObjectStream, PreparedNar, Target, TargetError, log_key,
};
use crate::format::cache_info::CacheInfo;
use crate::format::narinfo::NarInfo;
use crate::format::store_path::StorePath;
use crate::store::PathInfo;

/// Concurrent `HEAD` requests while asking which narinfos exist.
const HEAD_CONCURRENCY: usize = 32;

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
        if let Some(problem) = crate::cache::tls::https_without_roots(&endpoint_desc) {
            return Err(TargetError::permanent(format!("{url}: {problem}")));
        }

        let build = |timeout: Duration| {
            let options = ClientOptions::new()
                .with_connect_timeout(Duration::from_secs(5))
                .with_timeout(timeout)
                .with_allow_http(allow_http)
                .with_dns_resolver(Arc::new(crate::cache::dns::shared()))
                .with_no_system_certificates(crate::cache::tls::no_system_roots());
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

    pub(super) fn key(&self, name: &str) -> ObjectPath {
        if self.prefix.is_empty() {
            ObjectPath::from(name)
        } else {
            ObjectPath::from(format!("{}/{name}", self.prefix))
        }
    }

    pub(super) fn display(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
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
                CacheInfo::check(&String::from_utf8_lossy(&body))
                    .map(drop)
                    .map_err(|what| TargetError::permanent(format!("{}: {what}", self.display())))
            }
            Err(err) => {
                let failure = Failure::inspect(&err);
                let missing_key = matches!(err, object_store::Error::NotFound { .. })
                    && failure.code.as_deref() != Some("NoSuchBucket");
                if !missing_key {
                    return Err(self.error(&err, action));
                }
                self.check_bucket_exists().await?;
                self.put_small(
                    &key,
                    Bytes::from(CacheInfo::ours()),
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
        let key = self.key(&log_key(drv));
        let action = format!("uploading {key}");
        self.put_small(&key, log, LOG_TYPE, &action).await
    }

    async fn read_small(&self, key: &str, limit: usize) -> Result<Option<Vec<u8>>, TargetError> {
        let key = self.key(crate::cache::object_key(key)?);
        let action = format!("reading {key}");
        let got = match self.meta.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(&e, &action)),
        };
        if got.meta.size > limit as u64 {
            return Err(TargetError::permanent(format!(
                "{}: {key} is larger than {limit} bytes",
                self.display()
            )));
        }
        let body = got.bytes().await.map_err(|e| self.error(&e, &action))?;
        Ok(Some(body.to_vec()))
    }

    async fn object_size(&self, key: &str) -> Result<Option<u64>, TargetError> {
        let key = self.key(crate::cache::object_key(key)?);
        match self.meta.head(&key).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error(&e, &format!("checking {key}"))),
        }
    }

    async fn read_stream(&self, key: &str) -> Result<Option<ObjectStream>, TargetError> {
        let key = self.key(crate::cache::object_key(key)?);
        let action = format!("reading {key}");
        let got = match self.data.get(&key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.error(&e, &action)),
        };
        let size = Some(got.meta.size);
        let display = self.display();
        let body = got
            .into_stream()
            .map(move |chunk| {
                chunk.map_err(|e| {
                    TargetError::transient(format!(
                        "{display}: {action}: {}",
                        crate::cache::stall::causes(&e)
                    ))
                })
            })
            .boxed();
        Ok(Some(ObjectStream { size, body }))
    }

    async fn remove(&self, key: &str) -> Result<(), TargetError> {
        let key = self.key(crate::cache::object_key(key)?);
        match self.meta.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error(&e, &format!("removing {key}"))),
        }
    }

    async fn write_small(&self, key: &str, bytes: Vec<u8>) -> Result<(), TargetError> {
        let key = self.key(crate::cache::object_key(key)?);
        let action = format!("uploading {key}");
        self.put_small(&key, Bytes::from(bytes), "text/plain", &action)
            .await
    }

    async fn list(&self, prefix: &str) -> Result<Option<Vec<String>>, TargetError> {
        let below = self.key(crate::cache::object_key(prefix.trim_end_matches('/'))?);
        let depth = below.parts().count();
        let mut out = Vec::new();
        let mut listing = self.meta.list(Some(&below));
        while let Some(item) = listing.next().await {
            let meta = item.map_err(|e| self.error(&e, &format!("listing {below}")))?;
            if meta.location.parts().count() != depth + 1 {
                continue;
            }
            if let Some(name) = meta.location.filename() {
                out.push(name.to_owned());
            }
        }
        out.sort();
        Ok(Some(out))
    }

    async fn list_narinfos(&self) -> Result<Option<Vec<String>>, TargetError> {
        let prefix = (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()));
        let depth = prefix.as_ref().map_or(0, |p| p.parts().count());
        let mut out = Vec::new();
        let mut listing = self.meta.list(prefix.as_ref());
        while let Some(item) = listing.next().await {
            let meta = item.map_err(|e| self.error(&e, "listing the bucket"))?;
            // Directly below the prefix only: nar/ and log/ hold other things.
            if meta.location.parts().count() != depth + 1 {
                continue;
            }
            if let Some(hash) = meta
                .location
                .filename()
                .and_then(|n| n.strip_suffix(".narinfo"))
            {
                out.push(hash.to_owned());
            }
        }
        out.sort();
        Ok(Some(out))
    }
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

pub(super) fn content_type_attr(content_type: &'static str) -> Attributes {
    let mut attributes = Attributes::new();
    attributes.insert(Attribute::ContentType, content_type.into());
    attributes
}
