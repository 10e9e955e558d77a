//! One resolved configuration: the config file, then the environment, then flags, each
//! overriding the one before. The embedded defaults live here too: with nothing configured,
//! narpost pushes to `file://<state-dir>/cache` and signs with `<state-dir>/signing.sec`,
//! generated on first use.
//!
//! The config file is TOML with these keys (all optional):
//!
//! ```toml
//! cache = "https://cache.example.org"   # file:///dir, http(s)://, s3://bucket?..., attic+http(s)://host/cache, ssh://host
//! secret-key-file = "/etc/narpost/cache.example.org-1.sec"
//! jobs = 4
//! compression-level = 3
//! token-file = "/etc/narpost/token"        # bearer token for HTTP caches and Attic
//! basic-auth-file = "/etc/narpost/basic"   # `user:password`, for HTTP caches behind basic auth
//! gc-roots-dir = "/nix/var/nix/gcroots/narpost"
//! drain-timeout = 30                        # seconds the daemon lets in-flight uploads finish on SIGTERM
//! io-timeout = 60                           # seconds an HTTP/Attic/ssh connection may make no progress
//! upstream-keys = ["cache.nixos.org-1"]     # paths signed by these keys are left to upstream; [] pushes all
//! upload-logs = true                        # build logs go to log/<drv> in file://, HTTP and S3 caches
//! max-log-size = 16777216                   # bytes; a larger build log is skipped and reported
//! metrics-listen = "127.0.0.1:9464"        # serve Prometheus metrics at /metrics (off by default)
//! substituter-listen = "127.0.0.1:37515"   # serve the cache to this machine's Nix (off by default)
//! priority = "idle"                         # or "normal"; default idle for the daemon and watchers, normal for push
//! ```
//!
//! Secrets are only ever read from files or the environment, never from the command line,
//! where every user on the machine could read them in `ps`.

use crate::cache::CacheUrl;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::priority::Priority;

pub const DEFAULT_STATE_DIR: &str = "/var/lib/narpost";
pub const DEFAULT_CONFIG_FILE: &str = "/etc/narpost/narpost.toml";
pub const DEFAULT_GC_ROOTS_DIR: &str = "/nix/var/nix/gcroots/narpost";

/// Timeouts above this (ten years) mean "never" and are taken as this: a deadline must stay
/// a point in time the clock can hold, and `u64::MAX` seconds is the natural way to write
/// "never" in a config file.
pub const NEVER_SECS: u64 = 10 * 365 * 24 * 3600;
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The cache URL: checked when the settings load, so a bad one is one line at start.
    #[error("{}{}", .0.message, .0.hint.as_ref().map(|h| format!("\nhint: {h}")).unwrap_or_default())]
    Cache(crate::cache::TargetError),
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid config file: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{var}: invalid value {value:?}: {reason}")]
    Env {
        var: &'static str,
        value: String,
        reason: String,
    },
    #[error("{path}: cannot read secret: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: expected `user:password` on one line")]
    BasicAuth { path: PathBuf },
}

/// Older names the config file still takes for a key of [`FILE_KEYS`].
pub const FILE_KEY_ALIASES: &[(&str, &str)] = &[("http-timeout", "io-timeout")];

/// Every key the config file takes, as written there (NixOS's `services.narpost.settings`
/// declares exactly these; tests keep both lists equal to [`FileConfig`]'s fields).
pub const FILE_KEYS: &[&str] = &[
    "cache",
    "secret-key-file",
    "jobs",
    "compression-level",
    "token-file",
    "basic-auth-file",
    "gc-roots-dir",
    "drain-timeout",
    "io-timeout",
    "retry-timeout",
    "upstream-keys",
    "upload-logs",
    "max-log-size",
    "priority",
    "metrics-listen",
    "substituter-listen",
    "machine",
    "claim-timeout",
];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    cache: Option<String>,
    secret_key_file: Option<PathBuf>,
    jobs: Option<usize>,
    compression_level: Option<i32>,
    token_file: Option<PathBuf>,
    basic_auth_file: Option<PathBuf>,
    gc_roots_dir: Option<PathBuf>,
    drain_timeout: Option<u64>,
    /// Also spelt `http-timeout`, its name before it governed ssh too.
    #[serde(alias = "http-timeout")]
    io_timeout: Option<u64>,
    retry_timeout: Option<u64>,
    upstream_keys: Option<Vec<String>>,
    upload_logs: Option<bool>,
    max_log_size: Option<u64>,
    priority: Option<Priority>,
    metrics_listen: Option<String>,
    substituter_listen: Option<String>,
    machine: Option<String>,
    claim_timeout: Option<u64>,
}

/// What the command line says; `None` leaves the decision to the environment and file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub cache: Option<String>,
    pub key_file: Option<PathBuf>,
    pub jobs: Option<usize>,
    pub token_file: Option<PathBuf>,
    pub drain_timeout: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub state_dir: PathBuf,
    /// The cache, its URL checked.
    pub cache: CacheUrl,
    /// True when no cache was configured and the embedded `file://` default is used.
    pub cache_is_default: bool,
    /// `None`: the embedded default key in the state directory.
    pub key_file: Option<PathBuf>,
    pub jobs: usize,
    pub compression_level: i32,
    pub token_file: Option<PathBuf>,
    pub basic_auth_file: Option<PathBuf>,
    pub gc_roots_dir: PathBuf,
    pub drain_timeout: Duration,
    /// How long an HTTP or ssh connection may make no progress before it counts as hung.
    pub io_timeout: Duration,
    /// How long `push` keeps retrying one failing operation (the cache down, throttling)
    /// before it gives up on it; the daemon and the watchers retry for as long as it takes.
    pub retry_timeout: Duration,
    /// `priority` or `NARPOST_PRIORITY`; `None` leaves it to the command.
    pub priority: Option<Priority>,
    /// `metrics-listen` or `NARPOST_METRICS_LISTEN`: where to serve Prometheus metrics.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// `substituter-listen` or `NARPOST_SUBSTITUTER_LISTEN`: where the daemon serves the
    /// cache to this machine's Nix (see [`crate::substituter`]).
    pub substituter_listen: Option<std::net::SocketAddr>,
    /// `machine` or `NARPOST_MACHINE`: this machine's name in build claims; by default its
    /// `/etc/machine-id`, else its host name.
    pub machine: String,
    /// `claim-timeout` or `NARPOST_CLAIM_TIMEOUT`: seconds a build claim may go without a
    /// heartbeat before others take its machine for dead; default 60.
    pub claim_timeout: Duration,
    /// The file the settings came from, if any (for `status`).
    pub config_file: Option<PathBuf>,
    /// Key names whose signature in the local store means upstream serves the path.
    pub upstream_keys: Vec<String>,
    /// Whether build logs are uploaded where the cache has a place for them.
    pub upload_logs: bool,
    /// Largest build log uploaded, in bytes (uncompressed).
    pub max_log_size: u64,
}

/// Paths substituted from the official cache are not pushed again unless configured so.
pub const DEFAULT_UPSTREAM_KEYS: &[&str] = &["cache.nixos.org-1"];
pub use crate::buildlog::DEFAULT_MAX_LOG_SIZE;
/// `retry-timeout`'s default: two minutes rides out a restart of the cache server or a
/// burst of throttling, and still ends a push against a cache that is gone.
pub const DEFAULT_RETRY_TIMEOUT_SECS: u64 = 120;

impl Config {
    /// `config_file`: the `--config` flag or `NARPOST_CONFIG`; when absent, the system-wide
    /// file is read if it exists.
    pub fn load(
        config_file: Option<&Path>,
        state_dir: Option<PathBuf>,
        flags: Overrides,
    ) -> Result<Config, ConfigError> {
        let (file, config_file) = read_config_file(config_file)?;
        let state_dir = state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());

        let cache = flags.cache.or_else(|| env("NARPOST_CACHE")).or(file.cache);
        let cache_is_default = cache.is_none();
        let cache =
            cache.unwrap_or_else(|| format!("file://{}", state_dir.join("cache").display()));
        let cache = CacheUrl::parse(&cache).map_err(ConfigError::Cache)?;
        let key_file = flags
            .key_file
            .or_else(|| env("NARPOST_KEY_FILE").map(PathBuf::from))
            .or(file.secret_key_file);
        let jobs = match flags.jobs {
            Some(j) => j,
            None => match env("NARPOST_JOBS") {
                Some(v) => v.parse().map_err(|_| ConfigError::Env {
                    var: "NARPOST_JOBS",
                    value: v.clone(),
                    reason: "expected a whole number".into(),
                })?,
                None => file.jobs.unwrap_or_else(default_jobs),
            },
        }
        .max(1);
        let io_timeout_var = ["NARPOST_IO_TIMEOUT", "NARPOST_HTTP_TIMEOUT"]
            .into_iter()
            .find_map(|var| env(var).map(|v| (var, v)));
        let io_timeout = match io_timeout_var {
            Some((var, v)) => {
                v.parse()
                    .ok()
                    .filter(|&s: &u64| s > 0)
                    .ok_or_else(|| ConfigError::Env {
                        var,
                        value: v.clone(),
                        reason: "expected a whole number of seconds above 0".into(),
                    })?
            }
            None => file.io_timeout.unwrap_or(60).max(1),
        }
        .min(NEVER_SECS);
        let retry_timeout = match env("NARPOST_RETRY_TIMEOUT") {
            Some(v) => v.parse().map_err(|_| ConfigError::Env {
                var: "NARPOST_RETRY_TIMEOUT",
                value: v.clone(),
                reason: "expected a whole number of seconds".into(),
            })?,
            None => file.retry_timeout.unwrap_or(DEFAULT_RETRY_TIMEOUT_SECS),
        }
        .min(NEVER_SECS);
        let token_file = flags
            .token_file
            .or_else(|| env("NARPOST_TOKEN_FILE").map(PathBuf::from))
            .or(file.token_file);
        // Set but empty means "no upstream": the environment's way of saying `[]`.
        let upstream_keys = match std::env::var("NARPOST_UPSTREAM_KEYS") {
            Ok(v) => v
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|k| !k.is_empty())
                .map(str::to_string)
                .collect(),
            Err(_) => file.upstream_keys.unwrap_or_else(|| {
                DEFAULT_UPSTREAM_KEYS
                    .iter()
                    .map(|k| k.to_string())
                    .collect()
            }),
        };
        let upload_logs = match env("NARPOST_UPLOAD_LOGS") {
            Some(v) => match v.as_str() {
                "1" | "true" | "yes" => true,
                "0" | "false" | "no" => false,
                _ => {
                    return Err(ConfigError::Env {
                        var: "NARPOST_UPLOAD_LOGS",
                        value: v.clone(),
                        reason: "expected true or false".into(),
                    });
                }
            },
            None => file.upload_logs.unwrap_or(true),
        };
        let max_log_size = match env("NARPOST_MAX_LOG_SIZE") {
            Some(v) => v.parse().map_err(|_| ConfigError::Env {
                var: "NARPOST_MAX_LOG_SIZE",
                value: v.clone(),
                reason: "expected a whole number of bytes".into(),
            })?,
            None => file.max_log_size.unwrap_or(DEFAULT_MAX_LOG_SIZE),
        };
        let priority = match env("NARPOST_PRIORITY") {
            Some(v) => Some(v.parse().map_err(|reason| ConfigError::Env {
                var: "NARPOST_PRIORITY",
                value: v.clone(),
                reason,
            })?),
            None => file.priority,
        };
        let listen = |var: &'static str, key: &str, from_file: Option<String>| match env(var) {
            Some(v) => parse_listen(&v)
                .map(Some)
                .map_err(|reason| ConfigError::Env {
                    var,
                    value: v.clone(),
                    reason,
                }),
            None => match from_file {
                Some(v) => parse_listen(&v)
                    .map(Some)
                    .map_err(|reason| ConfigError::Parse {
                        path: config_file.clone().unwrap_or_default(),
                        message: format!("{key} = {v:?}: {reason}"),
                    }),
                None => Ok(None),
            },
        };
        let metrics_listen = listen(
            "NARPOST_METRICS_LISTEN",
            "metrics-listen",
            file.metrics_listen.clone(),
        )?;
        let substituter_listen = listen(
            "NARPOST_SUBSTITUTER_LISTEN",
            "substituter-listen",
            file.substituter_listen.clone(),
        )?;
        let machine = match env("NARPOST_MACHINE").or(file.machine.clone()) {
            Some(name) if crate::format::claim::valid_machine(&name) => name,
            Some(name) => {
                return Err(ConfigError::Parse {
                    path: config_file.clone().unwrap_or_default(),
                    message: format!(
                        "machine = {name:?}: use 1 to {} of A-Z a-z 0-9 . _ -, not starting with a dot",
                        crate::format::claim::MAX_MACHINE_LEN
                    ),
                });
            }
            None => default_machine(),
        };
        let claim_timeout = match env("NARPOST_CLAIM_TIMEOUT") {
            Some(v) => Duration::from_secs(v.parse().map_err(|_| ConfigError::Env {
                var: "NARPOST_CLAIM_TIMEOUT",
                value: v.clone(),
                reason: "expected whole seconds".into(),
            })?),
            None => Duration::from_secs(file.claim_timeout.unwrap_or(60)),
        }
        .clamp(Duration::from_secs(1), Duration::from_secs(NEVER_SECS));
        Ok(Config {
            machine,
            claim_timeout,
            upstream_keys,
            upload_logs,
            max_log_size,
            priority,
            metrics_listen,
            substituter_listen,
            cache,
            cache_is_default,
            key_file,
            jobs,
            compression_level: file.compression_level.unwrap_or(3).clamp(1, 19),
            token_file,
            basic_auth_file: env("NARPOST_BASIC_AUTH_FILE")
                .map(PathBuf::from)
                .or(file.basic_auth_file),
            gc_roots_dir: resolve_gc_roots_dir(file.gc_roots_dir, &state_dir),
            drain_timeout: Duration::from_secs(
                flags
                    .drain_timeout
                    .or(file.drain_timeout)
                    .unwrap_or(30)
                    .min(NEVER_SECS),
            ),
            io_timeout: Duration::from_secs(io_timeout),
            retry_timeout: Duration::from_secs(retry_timeout),
            state_dir,
            config_file,
        })
    }

    /// Only what the post-build hook needs, the GC roots directory, resolved exactly as
    /// [`Config::load`] resolves it (a broken config file is the same error) but without the
    /// work the rest takes, because every build waits for the hook.
    pub fn load_gc_roots_dir(
        config_file: Option<&Path>,
        state_dir: &Path,
    ) -> Result<PathBuf, ConfigError> {
        let (file, _) = read_config_file(config_file)?;
        Ok(resolve_gc_roots_dir(file.gc_roots_dir, state_dir))
    }

    /// The bearer token: `NARPOST_TOKEN` itself, or the first line of the token file.
    pub fn token(&self) -> Result<Option<String>, ConfigError> {
        if let Ok(t) = std::env::var("NARPOST_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_string()));
        }
        match &self.token_file {
            Some(p) => Ok(Some(read_secret(p)?)),
            None => Ok(None),
        }
    }

    pub fn basic_auth(&self) -> Result<Option<(String, String)>, ConfigError> {
        let Some(p) = &self.basic_auth_file else {
            return Ok(None);
        };
        let s = read_secret(p)?;
        let (user, password) = s
            .split_once(':')
            .ok_or_else(|| ConfigError::BasicAuth { path: p.clone() })?;
        Ok(Some((user.to_string(), password.to_string())))
    }
}

/// The system state directory gets the plain roots directory; any other state directory
/// (a CI job's, a user's) gets one of its own beside it, because a drainer adopts every root
/// in its directory that has no queue entry, and must never adopt another queue's roots.
pub fn default_gc_roots_dir(state_dir: &Path) -> PathBuf {
    if state_dir == Path::new(DEFAULT_STATE_DIR) {
        return PathBuf::from(DEFAULT_GC_ROOTS_DIR);
    }
    let absolute = std::path::absolute(state_dir).unwrap_or_else(|_| state_dir.to_path_buf());
    let digest = crate::format::hash::Sha256::digest(absolute.as_os_str().as_encoded_bytes());
    PathBuf::from(format!("{DEFAULT_GC_ROOTS_DIR}-{}", &digest.to_hex()[..12]))
}

/// `NARPOST_GC_ROOTS_DIR`, then the file's `gc-roots-dir`, then the state directory's default.
pub(crate) fn resolve_gc_roots_dir(from_file: Option<PathBuf>, state_dir: &Path) -> PathBuf {
    std::env::var_os("NARPOST_GC_ROOTS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or(from_file)
        .unwrap_or_else(|| default_gc_roots_dir(state_dir))
}

/// The file named by `--config`/`NARPOST_CONFIG`, else the system-wide one if it exists.
fn read_config_file(
    config_file: Option<&Path>,
) -> Result<(FileConfig, Option<PathBuf>), ConfigError> {
    match config_file {
        Some(p) => Ok((read_file(p)?, Some(p.to_path_buf()))),
        None => {
            let p = Path::new(DEFAULT_CONFIG_FILE);
            match read_file(p) {
                Ok(file) => Ok((file, Some(p.to_path_buf()))),
                Err(ConfigError::Read { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    Ok((FileConfig::default(), None))
                }
                Err(e) => Err(e),
            }
        }
    }
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.message().to_string(),
    })
}

fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Secret {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(s.lines().next().unwrap_or("").trim().to_string())
}

/// This machine's name in build claims when none is configured: its machine id, else its
/// host name, else one that says neither was found.
fn default_machine() -> String {
    let id = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    [id.trim(), host.trim()]
        .into_iter()
        .find(|name| crate::format::claim::valid_machine(name))
        .unwrap_or("unnamed")
        .to_owned()
}

/// `metrics-listen`'s value, or an error naming it.
pub fn parse_listen(value: &str) -> Result<std::net::SocketAddr, String> {
    value
        .parse()
        .map_err(|_| "expected an address and port such as 127.0.0.1:9464".to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_state_dir_gets_its_own_default_roots_dir() {
        use super::*;
        assert_eq!(
            default_gc_roots_dir(Path::new(DEFAULT_STATE_DIR)),
            PathBuf::from(DEFAULT_GC_ROOTS_DIR)
        );
        let a = default_gc_roots_dir(Path::new("/tmp/ci-a/narpost"));
        let b = default_gc_roots_dir(Path::new("/tmp/ci-b/narpost"));
        assert_ne!(a, b);
        assert!(
            a.to_string_lossy()
                .starts_with(&format!("{DEFAULT_GC_ROOTS_DIR}-")),
            "{a:?}"
        );
        assert_eq!(a, default_gc_roots_dir(Path::new("/tmp/ci-a/narpost")));
    }

    use super::*;

    #[test]
    fn file_values_apply_and_flags_override_them() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("narpost.toml");
        std::fs::write(
            &cfg,
            "cache = \"http://cache.invalid\"\njobs = 7\ncompression-level = 5\n",
        )
        .unwrap();
        let c = Config::load(Some(&cfg), Some(dir.path().into()), Overrides::default()).unwrap();
        assert_eq!(c.jobs, 7);
        assert_eq!(c.compression_level, 5);
        assert!(!c.cache_is_default);
        let c = Config::load(
            Some(&cfg),
            Some(dir.path().into()),
            Overrides {
                cache: Some("file:///x".into()),
                jobs: Some(2),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.cache, "file:///x");
        assert_eq!(c.jobs, 2);
    }

    #[test]
    fn timeouts_written_as_never_become_deadlines_the_clock_can_hold() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("narpost.toml");
        std::fs::write(
            &cfg,
            "http-timeout = 9223372036854775807\ndrain-timeout = 9223372036854775807\nretry-timeout = 9223372036854775807\n",
        )
        .unwrap();
        let c = Config::load(Some(&cfg), Some(dir.path().into()), Overrides::default()).unwrap();
        let never = Duration::from_secs(NEVER_SECS);
        assert_eq!(
            (c.io_timeout, c.drain_timeout, c.retry_timeout),
            (never, never, never)
        );
        for t in [c.io_timeout, c.drain_timeout, c.retry_timeout] {
            assert!(std::time::Instant::now().checked_add(t * 5).is_some());
            let _ = tokio::time::Instant::now() + t;
        }
    }

    #[test]
    fn upstream_keys_and_log_settings_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("narpost.toml");
        let load = |text: &str| {
            std::fs::write(&cfg, text).unwrap();
            Config::load(Some(&cfg), Some(dir.path().into()), Overrides::default()).unwrap()
        };
        let c = load("");
        assert_eq!(c.upstream_keys, ["cache.nixos.org-1"]);
        assert!(c.upload_logs);
        assert_eq!(c.max_log_size, DEFAULT_MAX_LOG_SIZE);
        let c = load("upstream-keys = []\nupload-logs = false\nmax-log-size = 1000\n");
        assert!(c.upstream_keys.is_empty());
        assert!(!c.upload_logs);
        assert_eq!(c.max_log_size, 1000);
        let c = load("upstream-keys = [\"a-1\", \"b-1\"]\n");
        assert_eq!(c.upstream_keys, ["a-1", "b-1"]);
    }

    #[test]
    fn file_keys_are_exactly_what_the_loader_takes() {
        // serde lists the fields it expected when it meets an unknown one.
        let err = toml::from_str::<FileConfig>("not-a-key = 1")
            .unwrap_err()
            .to_string();
        let listed = err.split_once("expected one of ").expect("a field list").1;
        let mut known: Vec<&str> = listed
            .split(',')
            .map(|f| {
                f.trim()
                    .trim_matches(|c: char| c == '`' || c.is_whitespace())
            })
            .filter(|f| !f.is_empty())
            .collect();
        known.sort();
        // serde lists an alias beside the key it stands for.
        let mut declared = FILE_KEYS.to_vec();
        declared.extend(FILE_KEY_ALIASES.iter().map(|(old, _)| *old));
        declared.sort();
        known.dedup();
        assert_eq!(known, declared, "{err}");
    }

    #[test]
    fn unknown_keys_are_reported_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("narpost.toml");
        std::fs::write(&cfg, "cahce = \"x\"\n").unwrap();
        let err = Config::load(Some(&cfg), None, Overrides::default()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("narpost.toml") && msg.contains("cahce"),
            "{msg}"
        );
    }

    #[test]
    fn missing_explicit_config_is_an_error() {
        let err = Config::load(
            Some(Path::new("/nonexistent/narpost.toml")),
            None,
            Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/narpost.toml"));
    }
}
