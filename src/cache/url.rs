//! The cache URL, parsed once (when the configuration loads, or `setup` reads `--cache`)
//! into the kind of cache it names. Everything that used to look at the scheme itself asks
//! this type: opening the cache, the form shown in messages and `status`, the line machines
//! that fetch from the cache add to their `nix.conf`, where a `file://` cache lives. Adding a
//! kind of cache touches [`Kind`] and its module.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::{DynTarget, TargetError};

/// What a cache needs besides its URL: resolved settings and secrets (read from files or
/// the environment by the caller), never the configuration itself.
#[derive(Clone, Default)]
pub struct CacheOptions {
    pub compression_level: i32,
    /// Bearer token for HTTP caches and Attic.
    pub token: Option<String>,
    /// `user:password` for an HTTP cache behind basic auth.
    pub basic_auth: Option<(String, String)>,
    /// How long a connection may make no progress (`io-timeout`).
    pub io_timeout: Duration,
    /// Paths prepared at once (ssh opens connections to match).
    pub jobs: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    /// `file:///dir`, or a bare absolute path.
    File(PathBuf),
    /// `http://` or `https://`.
    Http,
    /// `s3://bucket[/prefix]?...`.
    S3,
    /// `attic+http(s)://host[/path]/CACHE`.
    Attic,
    /// `ssh://[user@]host[:port]?...`.
    Ssh,
}

/// A cache URL narpost can use; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheUrl {
    raw: String,
    kind: Kind,
}

impl CacheUrl {
    /// Checks `url` as far as can be done without reaching the cache: a known scheme, and
    /// what that kind of cache needs in its URL (a bucket, a cache name, a host...).
    pub fn parse(url: &str) -> Result<CacheUrl, TargetError> {
        let kind = if let Some(dir) = url
            .strip_prefix("file://")
            .or_else(|| url.strip_prefix('/').map(|_| url))
        {
            let dir = dir.split('?').next().unwrap_or(dir);
            if !dir.starts_with('/') {
                return Err(TargetError::permanent(format!(
                    "{url}: a file:// cache needs an absolute directory"
                ))
                .with_hint("write it as file:///srv/nix-cache"));
            }
            Kind::File(PathBuf::from(dir))
        } else if url.starts_with("http://") || url.starts_with("https://") {
            reqwest::Url::parse(url).map_err(|e| {
                TargetError::permanent(format!(
                    "{}: not a valid URL: {e}",
                    super::http::redact(url)
                ))
            })?;
            Kind::Http
        } else if url.starts_with("s3://") {
            super::s3::check_url(url)?;
            Kind::S3
        } else if url.starts_with("attic+http://") || url.starts_with("attic+https://") {
            super::attic::check_url(url)?;
            Kind::Attic
        } else if url.starts_with("ssh://") {
            super::ssh::SshSpec::check(url)?;
            Kind::Ssh
        } else {
            return Err(TargetError::permanent(format!(
                "{}: unsupported cache URL",
                super::http::redact(url)
            ))
            .with_hint(
                "use file:///dir, http(s)://host/path, s3://bucket?region=..&endpoint=.., attic+http(s)://host/cache, or ssh://[user@]host",
            ));
        };
        Ok(CacheUrl {
            raw: url.to_owned(),
            kind,
        })
    }

    /// The URL as the user wrote it (it may hold a password: `http://user:secret@host`).
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The URL with any credentials left out, for messages and `status`.
    pub fn redacted(&self) -> String {
        super::http::redact(&self.raw)
    }

    /// The directory of a `file://` cache.
    pub fn file_dir(&self) -> Option<&Path> {
        match &self.kind {
            Kind::File(dir) => Some(dir),
            _ => None,
        }
    }

    /// Opens the cache: the target the pipeline pushes to.
    pub fn open(&self, opts: &CacheOptions) -> Result<DynTarget, TargetError> {
        let url = self.raw.as_str();
        let level = opts.compression_level;
        Ok(match &self.kind {
            Kind::File(dir) => Arc::new(super::file::FileTarget::new(dir.clone(), level)),
            Kind::Http => {
                let auth = match (&opts.token, &opts.basic_auth) {
                    (Some(token), _) => super::http::HttpAuth::Bearer(token.clone()),
                    (None, Some((user, password))) => super::http::HttpAuth::Basic {
                        user: user.clone(),
                        password: password.clone(),
                    },
                    (None, None) => super::http::HttpAuth::None,
                };
                Arc::new(
                    super::http::HttpTarget::new(url.to_string(), auth, level)?.with_timeouts(
                        opts.io_timeout.min(Duration::from_secs(10)),
                        opts.io_timeout,
                    )?,
                )
            }
            Kind::S3 => Arc::new(super::s3::S3Target::from_url(url, level)?),
            Kind::Attic => Arc::new(super::attic::AtticTarget::new(
                url,
                opts.token.clone(),
                opts.io_timeout,
            )?),
            Kind::Ssh => {
                let sshopts = std::env::var("NIX_SSHOPTS").ok();
                Arc::new(super::ssh::SshTarget::new(
                    url,
                    sshopts.as_deref(),
                    opts.io_timeout,
                    opts.jobs,
                )?)
            }
        })
    }

    /// The lines a machine that fetches from this cache adds to its `nix.conf`; `public` is
    /// narpost's key line `NAME:KEY`. `extra-` keeps that machine's other caches.
    pub fn consumer_lines(&self, public: &str) -> Vec<String> {
        let ours = format!("extra-trusted-public-keys = {public}");
        match &self.kind {
            Kind::Attic => {
                let inner = self.raw.trim_start_matches("attic+");
                let url = inner.trim_end_matches('/');
                let name = url.rsplit('/').next().unwrap_or(url);
                vec![
                    format!("extra-substituters = {url}"),
                    format!(
                        "extra-trusted-public-keys = <the Attic cache's own public key, which signs what it serves: `attic cache info {name}`>"
                    ),
                ]
            }
            Kind::Ssh => {
                let host = super::ssh::SshSpec::host_of(&self.raw).unwrap_or_default();
                // The host's store is served over HTTP by nix-serve or harmonia, not by narpost.
                vec![
                    format!(
                        "extra-substituters = <the URL nix-serve or harmonia on {host} serves, e.g. http://{host}:5000>"
                    ),
                    ours,
                ]
            }
            Kind::File(dir) => vec![
                format!("extra-substituters = file://{}", dir.display()),
                ours,
                "# file:// is a directory on this machine: other machines use the URL of whatever serves it (an HTTP server, an NFS mount)".into(),
            ],
            Kind::Http | Kind::S3 => vec![format!("extra-substituters = {}", self.raw), ours],
        }
    }
}

impl fmt::Display for CacheUrl {
    /// The redacted form: a cache URL printed anywhere never shows a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl PartialEq<&str> for CacheUrl {
    fn eq(&self, other: &&str) -> bool {
        self.raw == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_is_recognised_once_and_bad_urls_are_one_line() {
        let file = CacheUrl::parse("file:///srv/cache").unwrap();
        assert_eq!(file.file_dir(), Some(Path::new("/srv/cache")));
        assert_eq!(
            CacheUrl::parse("/srv/cache").unwrap().file_dir(),
            Some(Path::new("/srv/cache"))
        );
        for ok in [
            "http://127.0.0.1:8080/nix",
            "https://user:secret@cache.example.org",
            "s3://bucket/prefix?region=eu-west-1",
            "attic+https://attic.example.org/main",
            "ssh://nix-ssh@cachehost?ssh-key=/etc/narpost/id",
        ] {
            let url = CacheUrl::parse(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(url.file_dir(), None);
            assert_eq!(url, ok);
        }
        assert_eq!(
            CacheUrl::parse("https://user:secret@cache.example.org")
                .unwrap()
                .to_string(),
            "https://<credentials>@cache.example.org"
        );
        for bad in [
            "cahce.example.org",
            "ftp://x",
            "file://relative",
            "attic+https://host",
            "ssh://",
        ] {
            let e = CacheUrl::parse(bad).expect_err(bad);
            assert!(e.message.starts_with(bad), "{bad}: {}", e.message);
            assert!(!e.message.contains('\n'), "{}", e.message);
        }
    }

    #[test]
    fn consumers_get_the_url_they_fetch_from() {
        let key = "builder-1:abc=";
        let lines = |u: &str| CacheUrl::parse(u).unwrap().consumer_lines(key);
        assert_eq!(
            lines("https://cache.example.org/nix"),
            [
                "extra-substituters = https://cache.example.org/nix",
                "extra-trusted-public-keys = builder-1:abc="
            ]
        );
        let s3 = "s3://nix-cache?region=eu-central-1";
        assert_eq!(lines(s3)[0], format!("extra-substituters = {s3}"));
        assert_eq!(
            lines("/srv/cache")[0],
            "extra-substituters = file:///srv/cache"
        );
        assert_eq!(
            lines("attic+https://attic.example.org/prefix/main/")[0],
            "extra-substituters = https://attic.example.org/prefix/main"
        );
        assert!(
            lines("ssh://nix-ssh@cache.lan:2222?ssh-key=/etc/narpost/id")[0]
                .contains("nix-serve or harmonia on cache.lan")
        );
    }
}
