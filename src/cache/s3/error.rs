//! Turning object_store errors into one-line messages of the right
//! [kind](crate::cache::ErrorKind) (see [Errors and retries](super#errors-and-retries)).

use object_store::client::{HttpError, HttpErrorKind};

use super::S3Target;
use super::credentials::CredentialSource;
use crate::cache::TargetError;

impl S3Target {
    /// Turns an object_store error into one line naming the bucket, plus what to do.
    pub(super) fn error(&self, err: &object_store::Error, action: &str) -> TargetError {
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
            (_, "RequestTimeTooSkewed") => TargetError::auth(format!(
                "{cache}: the server refused the request's time ({code_note}) while {action}"
            ))
            .with_hint("this machine's clock is off by more than 15 minutes; set it right (timedatectl, chrony, ntpd)"),
            (_, code) if transient_code(code) => TargetError::transient(format!(
                "{cache}: the server answered {code_note} while {action}"
            )),
            (Some(500..=599 | 429 | 408), _) => TargetError::transient(format!(
                "{cache}: the server answered {code_note} while {action}"
            )),
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
}

/// What an object_store error says about the request, gathered from its source chain.
///
/// object_store does not export its HTTP error type, only the transport one, so the status
/// and the S3 `<Code>` are read from the error's text, where object_store puts them.
#[derive(Debug, Default)]
pub(super) struct Failure {
    status: Option<u16>,
    pub(super) code: Option<String>,
    pub(super) transport: Option<HttpErrorKind>,
    /// The innermost error's text, e.g. "Connection refused (os error 111)".
    root_cause: String,
    /// The failure was fetching credentials from an instance/container metadata endpoint.
    credential_endpoint: bool,
}

impl Failure {
    pub(super) fn inspect(err: &object_store::Error) -> Self {
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

/// S3 error codes that say "try again later", whatever the HTTP status they came with:
/// S3 answers `InternalError` and `SlowDown` inside a 200 to CompleteMultipartUpload, and
/// `RequestTimeout` (a 400) when it closed an idle upload socket; every AWS SDK retries
/// these.
fn transient_code(code: &str) -> bool {
    matches!(
        code,
        "InternalError"
            | "InternalFailure"
            | "ServiceUnavailable"
            | "ServiceFailure"
            | "SlowDown"
            | "RequestTimeout"
            | "RequestTimeoutException"
            | "OperationAborted"
            | "Throttling"
            | "ThrottlingException"
            | "ThrottledException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "RequestLimitExceeded"
            | "BandwidthLimitExceeded"
            | "EC2ThrottledException"
            | "PriorRequestNotComplete"
            | "TransactionInProgressException"
    )
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
pub(super) fn redact(text: &str) -> String {
    let cut = text.find("<?xml").or_else(|| text.find("<Error>"));
    let kept = match cut {
        Some(at) => text[..at].trim_end_matches([' ', ':']),
        None => text,
    };
    kept.lines().next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
