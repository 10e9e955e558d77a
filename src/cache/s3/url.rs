//! Parsing `s3://` cache URLs (see [URL](super#url)).

use std::collections::HashMap;

use crate::cache::TargetError;

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

/// What `s3://...` says, before any credentials are looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct S3Url {
    pub(super) bucket: String,
    pub(super) prefix: String,
    pub(super) region: Option<String>,
    /// Full URL with scheme.
    pub(super) endpoint: Option<String>,
    pub(super) profile: Option<String>,
}

impl S3Url {
    pub(super) fn parse(input: &str) -> Result<Self, TargetError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ErrorKind;

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
}
