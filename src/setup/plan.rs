//! What setup and undo will do, computed as values from what is on disk now
//! ([`Observed`]) and what was asked ([`Request`]), without touching anything: `--dry-run`
//! prints these steps, a real run applies them in order.
//!
//! The order is the point of several steps. Setup installs the hook binary before nix.conf
//! names it, because Nix fails every build whose hook cannot be run; undo takes the line out
//! of nix.conf (and restarts nix-daemon, which read it at start) before the binary goes.

use crate::cache::CacheUrl;
use std::path::{Path, PathBuf};

use super::config_file;
use super::nixconf::{self, Added};

pub const BIN_DIR: &str = "/usr/local/bin";
pub const NARPOST: &str = "/usr/local/bin/narpost";
pub const HOOK: &str = "/usr/local/bin/narpost-hook";
pub const CONFIG_DIR: &str = "/etc/narpost";
pub const CONFIG: &str = "/etc/narpost/narpost.toml";
pub const NIX_CONF: &str = "/etc/nix/nix.conf";
pub const UNIT: &str = "/etc/systemd/system/narpost.service";
pub const DROP_IN: &str = "/etc/systemd/system/narpost.service.d/cache-dir.conf";
pub const STATE_DIR: &str = crate::config::DEFAULT_STATE_DIR;
/// The repository's unit, the one source of it.
pub const UNIT_TEXT: &str = include_str!("../../systemd/narpost.service");

/// One change, with host paths (below the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Copy a binary (mode 0755, or the old file's).
    Install {
        from: PathBuf,
        to: PathBuf,
    },
    /// `NAME.sec` (0600) and `NAME.pub` in `dir`.
    GenerateKey {
        name: String,
        dir: PathBuf,
    },
    CreateDir {
        path: PathBuf,
    },
    /// Replace a file's contents (new files get `mode`; existing ones keep theirs).
    Write {
        path: PathBuf,
        text: String,
        mode: u32,
        what: String,
    },
    /// Remove a file (and its directory, when that is left empty and `prune_dir`).
    Remove {
        path: PathBuf,
        prune_dir: bool,
    },
    Run {
        argv: Vec<String>,
    },
}

impl Step {
    pub fn describe(&self) -> String {
        match self {
            Step::Install { from, to } => {
                format!("install {} (from {})", to.display(), from.display())
            }
            Step::GenerateKey { name, dir } => format!(
                "generate signing key {} (mode 0600) and {name}.pub",
                dir.join(format!("{name}.sec")).display()
            ),
            Step::CreateDir { path } => format!("create directory {}", path.display()),
            Step::Write { path, what, .. } => format!("{}: {what}", path.display()),
            Step::Remove { path, .. } => format!("remove {}", path.display()),
            Step::Run { argv } => format!("run `{}`", argv.join(" ")),
        }
    }
}

/// The installed copy of a binary, compared with the one this setup would install.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinState {
    Absent,
    /// Same bytes (a second run), or it is the very file running.
    Current,
    Differs,
}

/// Where the signing key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyPlan {
    /// An existing key file (its path as the machine sees it) and its public key line.
    Existing { file: PathBuf, public: String },
    /// Generate `/etc/narpost/NAME.sec`.
    Generate { name: String },
}

impl KeyPlan {
    pub fn file(&self) -> PathBuf {
        match self {
            KeyPlan::Existing { file, .. } => file.clone(),
            KeyPlan::Generate { name } => Path::new(CONFIG_DIR).join(format!("{name}.sec")),
        }
    }
}

/// What systemd says about the units setup deals with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Services {
    pub narpost_enabled: bool,
    pub narpost_active: bool,
    pub nix_daemon_active: bool,
}

/// What is on disk (below the root) and running now.
#[derive(Debug, Clone)]
pub struct Observed {
    pub root: PathBuf,
    /// The running narpost and the narpost-hook beside it.
    pub narpost_exe: PathBuf,
    pub hook_exe: PathBuf,
    pub narpost_bin: BinState,
    pub hook_bin: BinState,
    pub nix_conf: Option<String>,
    /// Each hook set (not empty) in a file nix.conf includes: (file, hook).
    pub included_hooks: Vec<(PathBuf, String)>,
    pub config: Option<String>,
    pub unit: Option<String>,
    pub drop_in: Option<String>,
    /// For a `file://` cache: whether its directory exists.
    pub cache_dir_exists: bool,
    /// `None` when no service is to be touched (another root, or systemd is not running).
    pub services: Option<Services>,
}

impl Observed {
    pub fn host(&self, path: &str) -> PathBuf {
        under(&self.root, Path::new(path))
    }
}

/// `path` (absolute, as the machine sees it) below `root`.
pub fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// What `narpost setup` was asked for.
#[derive(Debug, Clone)]
pub struct Request {
    pub cache: String,
    pub key: KeyPlan,
    pub token_file: Option<PathBuf>,
    pub force: bool,
    /// Serve the cache to this machine's Nix (`--substituter`).
    pub substituter: bool,
}

/// The nix.conf setting `--substituter` adds, and `--undo` takes out.
pub const SUBSTITUTERS: &str = "extra-substituters";

/// The local substituter's URL.
pub fn substituter_url() -> String {
    format!("http://{}", crate::substituter::DEFAULT_LISTEN)
}

/// Why setup changes nothing at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error(
        "{file}: post-build-hook is already set to {hook} (line {line}); nothing changed (--force comments it out and installs narpost's)"
    )]
    ForeignHook {
        file: PathBuf,
        line: usize,
        hook: String,
    },
    #[error(
        "{file}: post-build-hook is set to {hook} there; nothing changed (--force adds narpost's at the end of nix.conf, which overrides it)"
    )]
    IncludedHook { file: PathBuf, hook: String },
    #[error("{file}: {problem}")]
    Config { file: PathBuf, problem: String },
}

/// The setting of the unit that hides `path` (as the machine sees it) from the daemon, if
/// one does: a key, token or `file://` cache there would work from a shell and fail in the
/// service.
pub fn hidden_from_daemon(path: &Path) -> Option<&'static str> {
    let rules: [(&'static str, &[&str]); 2] = [
        ("ProtectHome=true", &["/home", "/root", "/run/user"]),
        ("PrivateTmp=true", &["/tmp", "/var/tmp"]),
    ];
    rules
        .into_iter()
        .find(|(setting, dirs)| {
            UNIT_TEXT.lines().any(|l| l.trim() == *setting)
                && dirs.iter().any(|d| path.starts_with(d))
        })
        .map(|(setting, _)| setting)
}

/// The local directory of a `file://` cache (or a bare absolute path).
pub fn file_cache_dir(cache: &str) -> Option<PathBuf> {
    CacheUrl::parse(cache)
        .ok()?
        .file_dir()
        .map(Path::to_path_buf)
}

/// The unit runs with `ProtectSystem=strict`: a `file://` cache outside the state directory
/// needs to be made writable for it, in a drop-in so the unit itself stays the shipped one.
pub fn drop_in_text(cache: &str) -> Option<String> {
    let dir = file_cache_dir(cache)?;
    if dir.starts_with(STATE_DIR) {
        return None;
    }
    Some(format!(
        "# Written by `narpost setup`: the daemon writes the file:// cache here.\n[Service]\nReadWritePaths={}\n",
        dir.display()
    ))
}

pub fn plan_setup(obs: &Observed, req: &Request) -> Result<Vec<Step>, Refusal> {
    let mut steps = Vec::new();
    // nix.conf first, though it is applied last: a refusal must come before anything changes.
    let nix_conf_step = nix_conf_setup(obs, req.force, req.substituter)?;

    for (state, from, to) in [
        (obs.narpost_bin, &obs.narpost_exe, NARPOST),
        (obs.hook_bin, &obs.hook_exe, HOOK),
    ] {
        if state != BinState::Current {
            steps.push(Step::Install {
                from: from.clone(),
                to: obs.host(to),
            });
        }
    }
    if let Some(dir) = file_cache_dir(&req.cache)
        && !obs.cache_dir_exists
    {
        steps.push(Step::CreateDir {
            path: under(&obs.root, &dir),
        });
    }
    if let KeyPlan::Generate { name } = &req.key {
        steps.push(Step::GenerateKey {
            name: name.clone(),
            dir: obs.host(CONFIG_DIR),
        });
    }

    let mut settings = vec![
        ("cache", req.cache.clone()),
        ("secret-key-file", req.key.file().display().to_string()),
    ];
    if let Some(t) = &req.token_file {
        settings.push(("token-file", t.display().to_string()));
    }
    if req.substituter {
        settings.push((
            "substituter-listen",
            crate::substituter::DEFAULT_LISTEN.to_string(),
        ));
    }
    let config = config_file::set_strings(obs.config.as_deref(), &settings).map_err(|e| {
        Refusal::Config {
            file: obs.host(CONFIG),
            problem: e.to_string(),
        }
    })?;
    if obs.config.as_deref() != Some(config.as_str()) {
        let what = match obs.config {
            None => "write the config (cache, signing key)".to_string(),
            Some(_) => "update the config's cache, secret-key-file and token-file".to_string(),
        };
        steps.push(Step::Write {
            path: obs.host(CONFIG),
            text: config,
            mode: 0o644,
            what,
        });
    }

    let unit_changed = obs.unit.as_deref() != Some(UNIT_TEXT);
    if unit_changed {
        steps.push(Step::Write {
            path: obs.host(UNIT),
            text: UNIT_TEXT.to_string(),
            mode: 0o644,
            what: match obs.unit {
                None => "install the systemd unit".into(),
                Some(_) => "replace with this narpost's unit (local changes belong in a drop-in: systemctl edit narpost)".into(),
            },
        });
    }
    let drop_in = drop_in_text(&req.cache);
    let drop_in_changed = drop_in != obs.drop_in;
    match (&drop_in, &obs.drop_in) {
        (Some(text), _) if drop_in_changed => steps.push(Step::Write {
            path: obs.host(DROP_IN),
            text: text.clone(),
            mode: 0o644,
            what: "let the daemon write the file:// cache (the unit has ProtectSystem=strict)"
                .into(),
        }),
        (None, Some(_)) => steps.push(Step::Remove {
            path: obs.host(DROP_IN),
            prune_dir: true,
        }),
        _ => {}
    }

    let nix_conf_changed = nix_conf_step.is_some();
    let narpost_changed = !steps.is_empty();
    steps.extend(nix_conf_step);

    if let Some(services) = obs.services {
        let touched = Touched {
            unit: unit_changed || drop_in_changed,
            narpost: narpost_changed,
            nix_conf: nix_conf_changed,
        };
        steps.extend(
            setup_commands(&touched, &services)
                .into_iter()
                .map(|argv| Step::Run { argv }),
        );
    }
    Ok(steps)
}

fn nix_conf_setup(obs: &Observed, force: bool, substituter: bool) -> Result<Option<Step>, Refusal> {
    let hook = nix_conf_hook(obs, force)?;
    if !substituter {
        return Ok(hook);
    }
    let (text, what) = match &hook {
        Some(Step::Write { text, what, .. }) => (text.clone(), what.clone()),
        _ => (obs.nix_conf.clone().unwrap_or_default(), String::new()),
    };
    let url = substituter_url();
    let Some(text) = nixconf::add_line(&text, SUBSTITUTERS, &url) else {
        return Ok(hook);
    };
    let added = format!("add {SUBSTITUTERS} = {url}");
    Ok(Some(Step::Write {
        path: obs.host(NIX_CONF),
        text,
        mode: 0o644,
        what: if what.is_empty() {
            added
        } else {
            format!("{what}; {added}")
        },
    }))
}

fn nix_conf_hook(obs: &Observed, force: bool) -> Result<Option<Step>, Refusal> {
    let path = obs.host(NIX_CONF);
    if let Some((file, hook)) = obs.included_hooks.iter().find(|(_, h)| h != HOOK)
        && !force
    {
        return Err(Refusal::IncludedHook {
            file: file.clone(),
            hook: hook.clone(),
        });
    }
    let old = obs.nix_conf.as_deref().unwrap_or("");
    match nixconf::add_hook(old, HOOK, force) {
        Added::Unchanged => Ok(None),
        Added::Foreign { line, hook } => Err(Refusal::ForeignHook {
            file: path,
            line,
            hook,
        }),
        Added::Changed { text, disabled } => {
            let mut what = format!("add post-build-hook = {HOOK}");
            for line in &disabled {
                what.push_str(&format!("; comment out `{line}` (--force)"));
            }
            Ok(Some(Step::Write {
                path,
                text,
                mode: 0o644,
                what,
            }))
        }
    }
}

/// Which kinds of thing a setup run changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Touched {
    /// The unit or its drop-in.
    pub unit: bool,
    /// Anything the daemon reads at start: binaries, config, key, unit.
    pub narpost: bool,
    pub nix_conf: bool,
}

fn systemctl(args: &[&str]) -> Vec<String> {
    std::iter::once("systemctl")
        .chain(args.iter().copied())
        .map(String::from)
        .collect()
}

/// The systemctl commands a setup run needs, in order: nothing when nothing changed and the
/// daemon runs; a restart of the daemon when what it read at start changed; a restart of
/// nix-daemon when nix.conf changed, because Nix reads post-build-hook only at start.
pub fn setup_commands(t: &Touched, s: &Services) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if t.unit {
        out.push(systemctl(&["daemon-reload"]));
    }
    if !s.narpost_enabled || !s.narpost_active {
        out.push(systemctl(&["enable", "--now", "narpost.service"]));
    } else if t.narpost {
        out.push(systemctl(&["restart", "narpost.service"]));
    }
    if t.nix_conf && s.nix_daemon_active {
        out.push(systemctl(&["restart", "nix-daemon.service"]));
    }
    out
}

/// What undo found to do, and what it keeps.
pub fn plan_undo(obs: &Observed) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut nix_conf_changed = false;
    if let Some(text) = &obs.nix_conf {
        let removed = nixconf::remove_hook(text, HOOK);
        let mut what = Vec::new();
        if removed.text.is_some() {
            what.push(format!("take out post-build-hook = {HOOK}"));
            for line in &removed.restored {
                what.push(format!("restore `{line}`"));
            }
        }
        let after_hook = removed.text.unwrap_or_else(|| text.clone());
        let url = substituter_url();
        let new = match nixconf::remove_line(&after_hook, SUBSTITUTERS, &url) {
            Some(new) => {
                what.push(format!("take out {SUBSTITUTERS} = {url}"));
                new
            }
            None => after_hook,
        };
        if !what.is_empty() {
            steps.push(Step::Write {
                path: obs.host(NIX_CONF),
                text: new,
                mode: 0o644,
                what: what.join("; "),
            });
            nix_conf_changed = true;
        }
    }
    let unit_present = obs.unit.is_some() || obs.drop_in.is_some();
    if let Some(s) = obs.services {
        steps.extend(
            undo_commands_before_removal(nix_conf_changed, unit_present, &s)
                .into_iter()
                .map(|argv| Step::Run { argv }),
        );
    }
    if obs.drop_in.is_some() {
        steps.push(Step::Remove {
            path: obs.host(DROP_IN),
            prune_dir: true,
        });
    }
    if obs.unit.is_some() {
        steps.push(Step::Remove {
            path: obs.host(UNIT),
            prune_dir: false,
        });
    }
    if obs.services.is_some() && unit_present {
        steps.push(Step::Run {
            argv: systemctl(&["daemon-reload"]),
        });
    }
    if obs.narpost_bin != BinState::Absent {
        steps.push(Step::Remove {
            path: obs.host(NARPOST),
            prune_dir: false,
        });
    }
    // A hook still named somewhere nix.conf includes must stay, or every build fails.
    if obs.hook_bin != BinState::Absent && !obs.included_hooks.iter().any(|(_, h)| h == HOOK) {
        steps.push(Step::Remove {
            path: obs.host(HOOK),
            prune_dir: false,
        });
    }
    steps
}

/// Before the unit goes: nix-daemon restarted so it stops running the hook (it read
/// nix.conf at start), then the daemon stopped and disabled.
pub fn undo_commands_before_removal(
    nix_conf_changed: bool,
    unit_present: bool,
    s: &Services,
) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    if nix_conf_changed && s.nix_daemon_active {
        out.push(systemctl(&["restart", "nix-daemon.service"]));
    }
    if unit_present && (s.narpost_enabled || s.narpost_active) {
        out.push(systemctl(&["disable", "--now", "narpost.service"]));
    }
    out
}

/// The lines a machine that fetches from the cache needs in its nix.conf (see
/// [`CacheUrl::consumer_lines`]); `cache` has passed `check_cache`.
pub fn consumer_lines(cache: &str, public: &str) -> Vec<String> {
    match CacheUrl::parse(cache) {
        Ok(url) => url.consumer_lines(public),
        Err(_) => vec![format!("extra-substituters = {cache}")],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed() -> Observed {
        Observed {
            root: PathBuf::from("/"),
            narpost_exe: PathBuf::from("/opt/narpost/bin/narpost"),
            hook_exe: PathBuf::from("/opt/narpost/bin/narpost-hook"),
            narpost_bin: BinState::Absent,
            hook_bin: BinState::Absent,
            nix_conf: Some("build-users-group = nixbld\n".into()),
            included_hooks: vec![],
            config: None,
            unit: None,
            drop_in: None,
            cache_dir_exists: false,
            services: None,
        }
    }

    fn request(cache: &str) -> Request {
        Request {
            substituter: false,
            cache: cache.into(),
            key: KeyPlan::Generate {
                name: "host-1".into(),
            },
            token_file: None,
            force: false,
        }
    }

    fn described(steps: &[Step]) -> Vec<String> {
        steps.iter().map(Step::describe).collect()
    }

    #[test]
    fn a_fresh_machine_gets_everything_with_the_hook_binary_before_nix_conf_names_it() {
        let steps = plan_setup(&observed(), &request("https://cache.example.org")).unwrap();
        assert_eq!(
            described(&steps),
            vec![
                "install /usr/local/bin/narpost (from /opt/narpost/bin/narpost)",
                "install /usr/local/bin/narpost-hook (from /opt/narpost/bin/narpost-hook)",
                "generate signing key /etc/narpost/host-1.sec (mode 0600) and host-1.pub",
                "/etc/narpost/narpost.toml: write the config (cache, signing key)",
                "/etc/systemd/system/narpost.service: install the systemd unit",
                "/etc/nix/nix.conf: add post-build-hook = /usr/local/bin/narpost-hook",
            ]
        );
    }

    #[test]
    fn a_set_up_machine_plans_nothing() {
        let first = plan_setup(&observed(), &request("file:///srv/cache")).unwrap();
        let mut obs = observed();
        for step in &first {
            if let Step::Write { path, text, .. } = step {
                let text = Some(text.clone());
                match path.to_str().unwrap() {
                    NIX_CONF => obs.nix_conf = text,
                    CONFIG => obs.config = text,
                    UNIT => obs.unit = text,
                    DROP_IN => obs.drop_in = text,
                    other => panic!("unexpected write {other}"),
                }
            }
        }
        assert!(
            obs.drop_in.is_some(),
            "a file:// cache outside the state dir"
        );
        obs.narpost_bin = BinState::Current;
        obs.hook_bin = BinState::Current;
        obs.cache_dir_exists = true;
        let mut req = request("file:///srv/cache");
        req.key = KeyPlan::Existing {
            file: "/etc/narpost/host-1.sec".into(),
            public: "host-1:x".into(),
        };
        assert_eq!(plan_setup(&obs, &req).unwrap(), vec![]);
        obs.services = Some(Services {
            narpost_enabled: true,
            narpost_active: true,
            nix_daemon_active: true,
        });
        assert_eq!(plan_setup(&obs, &req).unwrap(), vec![]);
    }

    #[test]
    fn a_foreign_hook_stops_everything() {
        let mut obs = observed();
        obs.nix_conf = Some("post-build-hook = /etc/nix/upload.sh\n".into());
        let err = plan_setup(&obs, &request("https://c")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/etc/nix/nix.conf: post-build-hook is already set to /etc/nix/upload.sh (line 1); nothing changed (--force comments it out and installs narpost's)"
        );
        obs.nix_conf = None;
        obs.included_hooks = vec![("/etc/nix/extra.conf".into(), "/x".into())];
        assert!(matches!(
            plan_setup(&obs, &request("https://c")),
            Err(Refusal::IncludedHook { .. })
        ));
        let mut req = request("https://c");
        req.force = true;
        assert!(plan_setup(&obs, &req).is_ok());
    }

    #[test]
    fn service_commands_follow_what_changed() {
        let idle = Services::default();
        let running = Services {
            narpost_enabled: true,
            narpost_active: true,
            nix_daemon_active: true,
        };
        let all = Touched {
            unit: true,
            narpost: true,
            nix_conf: true,
        };
        let strs = |v: Vec<Vec<String>>| v.into_iter().map(|a| a.join(" ")).collect::<Vec<_>>();
        assert_eq!(
            strs(setup_commands(&all, &idle)),
            vec![
                "systemctl daemon-reload",
                "systemctl enable --now narpost.service"
            ]
        );
        assert_eq!(
            strs(setup_commands(&all, &running)),
            vec![
                "systemctl daemon-reload",
                "systemctl restart narpost.service",
                "systemctl restart nix-daemon.service"
            ]
        );
        let config_only = Touched {
            narpost: true,
            ..Touched::default()
        };
        assert_eq!(
            strs(setup_commands(&config_only, &running)),
            vec!["systemctl restart narpost.service"]
        );
        assert!(setup_commands(&Touched::default(), &running).is_empty());
        // Stopped by hand: a second setup starts it again.
        let stopped = Services {
            narpost_active: false,
            ..running
        };
        assert_eq!(
            strs(setup_commands(&Touched::default(), &stopped)),
            vec!["systemctl enable --now narpost.service"]
        );
        assert_eq!(
            strs(undo_commands_before_removal(true, true, &running)),
            vec![
                "systemctl restart nix-daemon.service",
                "systemctl disable --now narpost.service"
            ]
        );
        assert!(undo_commands_before_removal(false, false, &running).is_empty());
    }

    #[test]
    fn undo_takes_the_line_out_before_the_binary_and_keeps_an_included_hook_alive() {
        let mut obs = observed();
        obs.nix_conf = Some(format!("a = b\npost-build-hook = {HOOK}\n"));
        obs.unit = Some(UNIT_TEXT.into());
        obs.narpost_bin = BinState::Current;
        obs.hook_bin = BinState::Differs;
        obs.services = Some(Services {
            narpost_enabled: true,
            narpost_active: true,
            nix_daemon_active: true,
        });
        assert_eq!(
            described(&plan_undo(&obs)),
            vec![
                "/etc/nix/nix.conf: take out post-build-hook = /usr/local/bin/narpost-hook",
                "run `systemctl restart nix-daemon.service`",
                "run `systemctl disable --now narpost.service`",
                "remove /etc/systemd/system/narpost.service",
                "run `systemctl daemon-reload`",
                "remove /usr/local/bin/narpost",
                "remove /usr/local/bin/narpost-hook",
            ]
        );
        obs.included_hooks = vec![("/etc/nix/more.conf".into(), HOOK.into())];
        obs.services = None;
        assert!(
            !described(&plan_undo(&obs))
                .iter()
                .any(|s| s.ends_with("narpost-hook") && s.starts_with("remove"))
        );
    }

    #[test]
    fn consumers_get_the_url_they_fetch_from() {
        let key = "host-1:abc=";
        assert_eq!(
            consumer_lines("https://cache.example.org/nix", key),
            vec![
                "extra-substituters = https://cache.example.org/nix",
                "extra-trusted-public-keys = host-1:abc="
            ]
        );
        let s3 = "s3://bucket/prefix?region=eu-west-1&endpoint=minio.lan:9000&scheme=http";
        assert_eq!(
            consumer_lines(s3, key)[0],
            format!("extra-substituters = {s3}")
        );
        let file = consumer_lines("/srv/cache", key);
        assert_eq!(file[0], "extra-substituters = file:///srv/cache");
        assert_eq!(file[1], "extra-trusted-public-keys = host-1:abc=");
        let attic = consumer_lines("attic+https://attic.example.org/prefix/main/", key);
        assert_eq!(
            attic[0],
            "extra-substituters = https://attic.example.org/prefix/main"
        );
        assert!(attic[1].contains("attic cache info main"), "{}", attic[1]);
        let ssh = consumer_lines("ssh://nix-ssh@cache.lan:2222?ssh-key=/etc/narpost/id", key);
        assert!(ssh[0].contains("http://cache.lan:5000"), "{}", ssh[0]);
        assert_eq!(ssh[1], "extra-trusted-public-keys = host-1:abc=");
    }

    #[test]
    fn paths_the_unit_hides_are_named_with_the_setting() {
        assert_eq!(
            hidden_from_daemon(Path::new("/root/cache.sec")),
            Some("ProtectHome=true")
        );
        assert_eq!(
            hidden_from_daemon(Path::new("/home/ci/token")),
            Some("ProtectHome=true")
        );
        assert_eq!(
            hidden_from_daemon(Path::new("/tmp/cache")),
            Some("PrivateTmp=true")
        );
        assert_eq!(hidden_from_daemon(Path::new("/etc/narpost/k.sec")), None);
        assert_eq!(hidden_from_daemon(Path::new("/homework/x")), None);
    }

    #[test]
    fn the_drop_in_is_only_for_file_caches_outside_the_state_dir() {
        assert!(drop_in_text("https://c").is_none());
        assert!(drop_in_text("file:///var/lib/narpost/cache").is_none());
        assert_eq!(
            drop_in_text("file:///srv/cache").unwrap().lines().last(),
            Some("ReadWritePaths=/srv/cache")
        );
    }
}
