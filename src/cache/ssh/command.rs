//! The `ssh` command line a cache URL stands for, as Nix builds it.

use std::ffi::OsString;
use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use reqwest::Url;

use crate::cache::TargetError;

/// What the URL says, turned into the `ssh` command line.
#[derive(Debug)]
pub struct SshSpec {
    /// The URL as given (it holds no secret: keys are files).
    pub url: String,
    /// `[user@]host[:port]`, for messages.
    pub label: String,
    /// Arguments after `ssh`, ending with the destination and the remote command.
    pub args: Vec<OsString>,
    /// Whether the host key is pinned by the URL (for the hint on a mismatch).
    pub pinned_host_key: bool,
    /// narpost's own known_hosts file; deleted with the target.
    _known_hosts: Option<tempfile::NamedTempFile>,
}

/// The single quotes Nix puts around `--store`'s value for the remote shell.
fn shell_escape(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// The host as ssh takes it: an IPv6 address without the brackets a URL puts around it
/// (ssh would look `[::1]` up as a name), and never empty.
fn bare_host(url: &Url) -> Option<String> {
    match url.host()? {
        url::Host::Ipv6(addr) => Some(addr.to_string()),
        url::Host::Ipv4(addr) => Some(addr.to_string()),
        url::Host::Domain(name) if !name.is_empty() => Some(name.to_string()),
        url::Host::Domain(_) => None,
    }
}

impl SshSpec {
    /// The host an `ssh://` URL names, or `None` for any other URL.
    pub fn host_of(url: &str) -> Option<String> {
        let parsed = Url::parse(url).ok().filter(|u| u.scheme() == "ssh")?;
        bare_host(&parsed)
    }

    /// Whether `url` is an ssh:// cache URL narpost can use (host, parameters, host key).
    pub fn check(url: &str) -> Result<(), TargetError> {
        SshSpec::parse(url, None, Duration::from_secs(60)).map(drop)
    }

    /// Parses the URL; `sshopts` is `NIX_SSHOPTS`; `connect_timeout` goes to ssh's
    /// `ConnectTimeout`.
    pub fn parse(
        input: &str,
        sshopts: Option<&str>,
        connect_timeout: Duration,
    ) -> Result<SshSpec, TargetError> {
        let bad = |what: String| {
            TargetError::permanent(format!("{input}: {what}")).with_hint(
                "an ssh cache URL looks like ssh://[user@]host[:port]?ssh-key=/path/to/key",
            )
        };
        let url = Url::parse(input).map_err(|e| bad(format!("not a URL: {e}")))?;
        if url.scheme() != "ssh" {
            return Err(bad("not an ssh:// URL".into()));
        }
        let host = bare_host(&url).ok_or_else(|| bad("no host".into()))?;
        if host.starts_with('-') {
            return Err(bad(format!("{host:?} is not a host name")));
        }
        if url.password().is_some() {
            return Err(bad(
                "passwords do not go in the URL; use a key (ssh-key=) or an ssh agent".into(),
            ));
        }
        if !matches!(url.path(), "" | "/") || url.fragment().is_some() {
            return Err(bad(
                "unexpected path or #fragment after the host; the remote store is given with ?remote-store=".into(),
            ));
        }
        let user = url.username().to_string();
        let destination = if user.is_empty() {
            host.clone()
        } else {
            format!("{user}@{host}")
        };
        let port = url.port();
        let label = match port {
            Some(p) if host.contains(':') => {
                let at = if user.is_empty() {
                    String::new()
                } else {
                    format!("{user}@")
                };
                format!("{at}[{host}]:{p}")
            }
            Some(p) => format!("{destination}:{p}"),
            None => destination.clone(),
        };

        let mut key = None;
        let mut host_key = None;
        let mut compress = false;
        let mut program = "nix-store".to_string();
        let mut store = None;
        for (name, value) in url.query_pairs() {
            match &*name {
                "ssh-key" => key = Some(value.into_owned()),
                "base64-ssh-public-host-key" => host_key = Some(value.into_owned()),
                "compress" => {
                    compress = match &*value {
                        "true" | "1" => true,
                        "false" | "0" => false,
                        other => {
                            return Err(bad(format!("compress={other}: expected true or false")));
                        }
                    }
                }
                "remote-program" if !value.trim().is_empty() => program = value.into_owned(),
                "remote-store" if !value.is_empty() => store = Some(value.into_owned()),
                "remote-program" | "remote-store" => {
                    return Err(bad(format!("{name} is empty")));
                }
                other => {
                    return Err(bad(format!(
                        "unknown parameter {other:?} (known: ssh-key, base64-ssh-public-host-key, compress, remote-program, remote-store)"
                    )));
                }
            }
        }

        let mut args: Vec<OsString> = vec!["-x".into(), "-a".into()];
        if let Some(opts) = sshopts.filter(|s| !s.trim().is_empty()) {
            let split = shlex::split(opts).ok_or_else(|| {
                TargetError::permanent(format!("NIX_SSHOPTS={opts:?}: unbalanced quotes"))
                    .with_hint("NIX_SSHOPTS holds ssh options as a shell would split them")
            })?;
            args.extend(split.into_iter().map(OsString::from));
        }
        if let Some(key) = &key {
            args.push("-i".into());
            args.push(key.into());
        }
        let known_hosts = match &host_key {
            Some(encoded) => {
                let decoded =
                    base64::engine::general_purpose::STANDARD
                        .decode(encoded.trim())
                        .ok()
                        .and_then(|b| String::from_utf8(b).ok())
                        .filter(|k| k.split_whitespace().count() >= 2)
                        .ok_or_else(|| {
                            bad("base64-ssh-public-host-key is not the base64 of a public key line \
                             (like `ssh-ed25519 AAAA...`)".into())
                        })?;
                // The name ssh looks the key up under: `[host]:port` off port 22.
                let name = match port {
                    Some(p) if p != 22 => format!("[{host}]:{p}"),
                    _ => host.clone(),
                };
                let mut file = tempfile::Builder::new()
                    .prefix("narpost-known-hosts-")
                    .tempfile()
                    .map_err(|e| {
                        TargetError::permanent(format!(
                            "{input}: cannot write a known_hosts file for the host key: {e}"
                        ))
                    })?;
                writeln!(file, "{name} {}", decoded.trim())
                    .and_then(|_| file.flush())
                    .map_err(|e| {
                        TargetError::permanent(format!(
                            "{input}: cannot write a known_hosts file for the host key: {e}"
                        ))
                    })?;
                let mut opt = OsString::from("-oUserKnownHostsFile=");
                opt.push(file.path());
                args.push(opt);
                args.push("-oStrictHostKeyChecking=yes".into());
                Some(file)
            }
            None => None,
        };
        if compress {
            args.push("-C".into());
        }
        if let Some(p) = port {
            args.push("-p".into());
            args.push(p.to_string().into());
        }
        args.push("-oBatchMode=yes".into());
        args.push(format!("-oConnectTimeout={}", connect_timeout.as_secs().max(1)).into());
        args.push("--".into());
        args.push(destination.into());
        let mut command = format!("{program} --serve --write");
        if let Some(store) = &store {
            command.push_str(" --store ");
            command.push_str(&shell_escape(store));
        }
        args.push(command.into());
        Ok(SshSpec {
            url: input.to_string(),
            label,
            args,
            pinned_host_key: known_hosts.is_some(),
            _known_hosts: known_hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(spec: &SshSpec) -> Vec<String> {
        spec.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn the_url_becomes_the_ssh_command_nix_would_run() {
        let spec = SshSpec::parse(
            "ssh://nix-ssh@cache.example.org:2222?ssh-key=/etc/narpost/id&compress=true&remote-store=/srv/it's",
            Some("-o ProxyJump='jump host'"),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(spec.label, "nix-ssh@cache.example.org:2222");
        assert_eq!(
            args(&spec),
            [
                "-x",
                "-a",
                "-o",
                "ProxyJump=jump host",
                "-i",
                "/etc/narpost/id",
                "-C",
                "-p",
                "2222",
                "-oBatchMode=yes",
                "-oConnectTimeout=10",
                "--",
                "nix-ssh@cache.example.org",
                "nix-store --serve --write --store '/srv/it'\\''s'",
            ]
        );
        let plain = SshSpec::parse(
            "ssh://host?remote-program=/opt/nix/bin/nix-store",
            None,
            Duration::from_secs(60),
        )
        .unwrap();
        assert_eq!(
            args(&plain)[args(&plain).len() - 2..],
            ["host", "/opt/nix/bin/nix-store --serve --write"]
        );
    }

    #[test]
    fn a_pinned_host_key_is_checked_strictly_against_a_private_file() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFm0tKc7g7RkKxWpuTxvhUdHYS8nlY4XBT1gbdUhJ2Xg";
        let encoded = base64::engine::general_purpose::STANDARD.encode(line);
        for (url, name) in [
            (
                format!("ssh://u@10.0.0.1:2222?base64-ssh-public-host-key={encoded}"),
                "[10.0.0.1]:2222",
            ),
            (
                format!("ssh://10.0.0.1?base64-ssh-public-host-key={encoded}"),
                "10.0.0.1",
            ),
        ] {
            let spec = SshSpec::parse(&url, None, Duration::from_secs(5)).unwrap();
            let a = args(&spec);
            assert!(
                a.contains(&"-oStrictHostKeyChecking=yes".to_string()),
                "{a:?}"
            );
            let file = a
                .iter()
                .find_map(|x| x.strip_prefix("-oUserKnownHostsFile="))
                .expect("a known_hosts file");
            assert_eq!(
                std::fs::read_to_string(file).unwrap(),
                format!("{name} {line}\n")
            );
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(file).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "only narpost reads it");
        }
    }

    #[test]
    fn an_ipv6_host_goes_to_ssh_without_brackets_and_is_pinned_as_ssh_names_it() {
        let key = base64::engine::general_purpose::STANDARD.encode("ssh-ed25519 AAAAC3Nz host");
        let url = format!("ssh://nix@[::1]:2222?base64-ssh-public-host-key={key}");
        let spec = SshSpec::parse(&url, None, Duration::from_secs(5)).unwrap();
        let args: Vec<String> = spec
            .args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let dest = args.iter().position(|a| a == "--").unwrap() + 1;
        assert_eq!(args[dest], "nix@::1", "{args:?}");
        assert_eq!(spec.label, "nix@[::1]:2222");
        let known = args
            .iter()
            .find_map(|a| a.strip_prefix("-oUserKnownHostsFile="))
            .unwrap();
        let line = std::fs::read_to_string(known).unwrap();
        assert_eq!(line, "[::1]:2222 ssh-ed25519 AAAAC3Nz host\n");
        assert_eq!(SshSpec::host_of("ssh://[::1]"), Some("::1".into()));
    }

    #[test]
    fn bad_urls_are_one_line_naming_the_url() {
        for bad in [
            "ssh://",
            "ssh://host/some/path",
            "ssh://user:secret@host",
            "ssh://host?max-connectons=2",
            "ssh://host?compress=maybe",
            "ssh://host?base64-ssh-public-host-key=!!",
            "ssh://-oProxyCommand=x",
            "ssh://host?remote-program=",
        ] {
            let err = SshSpec::parse(bad, None, Duration::from_secs(5)).unwrap_err();
            assert!(err.message.starts_with(bad), "{bad}: {}", err.message);
            assert!(!err.message.contains('\n'), "{}", err.message);
        }
        let err = SshSpec::parse("ssh://host", Some("-o 'unbalanced"), Duration::from_secs(5))
            .unwrap_err();
        assert!(err.message.contains("NIX_SSHOPTS"), "{}", err.message);
    }
}
