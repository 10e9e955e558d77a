//! Finding AWS credentials and the region the usual AWS way (see
//! [Credentials](super#credentials)).

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};

use object_store::aws::AwsCredential;

use super::url::S3Url;
use crate::cache::TargetError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum CredentialSource {
    Environment,
    Profile {
        name: String,
        file: PathBuf,
    },
    /// Nothing explicit was found; object_store's web identity / container / instance chain.
    Ambient,
}

/// Credentials (none: object_store's ambient chain) and the profile's region, if any.
#[derive(Debug)]
pub(super) struct Resolved {
    pub(super) credential: Option<AwsCredential>,
    pub(super) source: CredentialSource,
    pub(super) region: Option<String>,
}

pub(super) fn resolve_credentials(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ErrorKind;

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
}
