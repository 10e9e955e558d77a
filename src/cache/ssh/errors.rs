//! What an ssh connection that ended early says, as one error line with a hint.

use std::process::ExitStatus;
use std::time::Duration;

use super::SshSpec;
use crate::cache::TargetError;

/// How a connection ended before it should have.
pub(super) enum Failure {
    /// The remote closed its end.
    Eof,
    Io(String),
    Timeout(Duration),
    Garbage(String),
    Protocol(String),
}

/// Turns the end of a connection into one line naming the host, with a hint.
pub(super) fn classify(
    spec: &SshSpec,
    lines: &[String],
    status: Option<ExitStatus>,
    failure: &Failure,
    during: &str,
) -> TargetError {
    let host = &spec.label;
    let find = |needles: &[&str]| {
        lines
            .iter()
            .rev()
            .find(|l| needles.iter().any(|n| l.contains(n)))
            .cloned()
    };
    if let Some(line) = find(&[
        "Host key verification failed",
        "REMOTE HOST IDENTIFICATION HAS CHANGED",
        "host key is known for",
    ]) {
        let hint = if spec.pinned_host_key {
            format!(
                "base64-ssh-public-host-key in the cache URL is not {host}'s key; get it with \
                 `ssh-keyscan` from a trusted network and base64-encode the line"
            )
        } else {
            format!(
                "add {host}'s key to known_hosts (ssh-keyscan, from a trusted network), or pin \
                 it with base64-ssh-public-host-key in the cache URL"
            )
        };
        let unknown = lines.iter().any(|l| l.contains("host key is known for"));
        let what = if unknown {
            "the host's key is not known here"
        } else {
            "the host's key is not the one expected"
        };
        return TargetError::auth(format!("{host}: {what} (ssh: {line})")).with_hint(hint);
    }
    if let Some(line) = find(&["Permission denied", "Too many authentication failures"]) {
        return TargetError::auth(format!("{host}: ssh login refused ({line})")).with_hint(
            "check ssh-key in the cache URL, and that its public key is authorized on the host \
             (nix.sshServe.keys on NixOS)",
        );
    }
    if let Some(line) = find(&["lacks a valid signature", "lacks a signature"]) {
        return TargetError::auth(format!(
            "{host}: the remote refused the path: {}",
            strip_error(&line)
        ))
        .with_hint(format!(
            "add narpost's public key to trusted-public-keys in {host}'s nix.conf, or make the \
                 ssh user a trusted user there (trusted-users; nix.sshServe.trusted on NixOS)"
        ));
    }
    if let Some(line) = find(&[
        "command not found",
        "No such file or directory",
        "not found",
    ]) {
        return TargetError::auth(format!("{host}: {}", strip_error(&line))).with_hint(
            "set remote-program in the cache URL to the nix-store program on the host \
             (for example ?remote-program=/nix/var/nix/profiles/default/bin/nix-store)",
        );
    }
    if let Some(line) = find(&[
        "Connection refused",
        "No route to host",
        "timed out",
        "Could not resolve hostname",
        "Network is unreachable",
        "Name or service not known",
        "Temporary failure in name resolution",
        "Connection reset",
        "Connection closed",
        "kex_exchange_identification",
    ]) {
        return TargetError::transient(format!("{host}: cannot reach the host: {line}"))
            .with_hint(format!("check that {host} is up and its sshd reachable"));
    }
    let said = lines.last().map(|l| strip_error(l));
    let what = match failure {
        Failure::Eof => "the connection closed".to_string(),
        Failure::Io(e) => format!("the connection failed ({e})"),
        Failure::Timeout(d) => format!("no answer for {}s", d.as_secs()),
        Failure::Garbage(text) => {
            format!("the remote is not a nix-store --serve (it sent {text:?})")
        }
        Failure::Protocol(e) => format!("protocol error: {e}"),
    };
    let exit = status
        .and_then(|s| s.code())
        .map(|c| format!(", exit status {c}"))
        .unwrap_or_default();
    let message = match said {
        Some(said) => format!("{host}: {said} ({what} while {during}{exit})"),
        None => format!("{host}: {what} while {during}{exit}"),
    };
    match failure {
        Failure::Garbage(_) => TargetError::auth(message).with_hint(
            "the remote login prints text before nix-store starts; keep the forced command's \
             shell quiet",
        ),
        Failure::Protocol(_) => TargetError::permanent(message),
        _ => TargetError::transient(message),
    }
}

/// `error: cannot add ...` is shown without Nix's prefix.
pub(super) fn strip_error(line: &str) -> String {
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SshSpec {
        SshSpec::parse("ssh://cache", None, Duration::from_secs(5)).unwrap()
    }

    fn kind_of(
        lines: &[&str],
        failure: Failure,
    ) -> (crate::cache::ErrorKind, String, Option<String>) {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        let e = classify(&spec(), &lines, None, &failure, "pushing");
        (e.kind, e.message, e.hint)
    }

    #[test]
    fn the_remotes_last_words_become_one_line_with_a_hint() {
        use crate::cache::ErrorKind::*;
        let (kind, message, hint) = kind_of(
            &[
                "copying path",
                "error: cannot add path '/nix/store/x' because it lacks a valid signature",
            ],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);
        assert_eq!(
            message,
            "cache: the remote refused the path: cannot add path '/nix/store/x' because it lacks a valid signature"
        );
        assert!(hint.unwrap().contains("trusted-public-keys"));

        let (kind, _, hint) = kind_of(
            &["bash: line 1: nix-store: command not found"],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);
        assert!(hint.unwrap().contains("remote-program"));

        let (kind, message, _) = kind_of(&["Host key verification failed."], Failure::Eof);
        assert_eq!(kind, Auth);
        assert!(message.contains("host's key"), "{message}");

        let (kind, _, _) = kind_of(
            &["root@127.0.0.1: Permission denied (publickey)."],
            Failure::Eof,
        );
        assert_eq!(kind, Auth);

        let (kind, _, _) = kind_of(
            &["ssh: connect to host cache port 22: Connection refused"],
            Failure::Eof,
        );
        assert_eq!(kind, Transient);

        let (kind, message, _) = kind_of(
            &["error: writing to file: No space left on device"],
            Failure::Eof,
        );
        assert_eq!(
            (kind, message.as_str()),
            (
                Transient,
                "cache: writing to file: No space left on device (the connection closed while pushing)"
            )
        );

        let (kind, message, _) = kind_of(&[], Failure::Timeout(Duration::from_secs(300)));
        assert_eq!(
            (kind, message.as_str()),
            (Transient, "cache: no answer for 300s while pushing")
        );
    }
}
