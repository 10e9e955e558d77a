//! `narpost setup`: wires a machine that is not NixOS in one command, and `--undo` takes
//! it out again.
//!
//! It looks at what is there ([`plan::Observed`]), computes every change as a value
//! ([`plan::plan_setup`], [`plan::plan_undo`]), prints them for `--dry-run` or applies them
//! in order ([`apply`]). The text edits are pure functions: [`nixconf`] for
//! `/etc/nix/nix.conf`, [`config_file`] for `/etc/narpost/narpost.toml`.
//!
//! Decisions a user may ask about:
//!
//! - Without `--key` or `--key-name`, the key is the one the config file already names, else
//!   the daemon's embedded default (`/var/lib/narpost/signing.sec`) if the machine has one,
//!   since other machines may already trust it, else a new `/etc/narpost/<hostname>-1.sec`
//!   (with `--root`, the host name comes from `<root>/etc/hostname` when there is one).
//! - Paths given (`--key`, `--token-file`) and paths written into files are as the machine
//!   sees them: with `--root DIR` they are read below DIR, and written without it, so the
//!   result is a working image.
//! - `--substituter` writes `substituter-listen` into the config and adds the local
//!   substituter as `extra-substituters` (after the admin's own, which keep their place;
//!   its `Priority: 30` has Nix ask it before cache.nixos.org). `--undo` takes that line out
//!   with the hook's.
//! - `--undo` keeps `/etc/narpost` (config and keys), the queue and the cache: the config
//!   does nothing once the binaries, hook line and unit are gone, it may hold settings of
//!   the admin's own, and a later `setup` picks it up again as it was.

pub mod apply;
pub mod config_file;
pub mod nixconf;
pub mod plan;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use apply::{Applied, check_target, read_optional};
use plan::{BinState, KeyPlan, Observed, Request, Services, Step, under};

/// `narpost setup` on the command line.
#[derive(Debug, Clone, clap::Args)]
pub struct SetupArgs {
    /// Cache to push to, as for `push --to`: file:///dir, http(s)://, s3://bucket?...,
    /// attic+http(s)://host/CACHE, ssh://[user@]host.
    #[arg(long, value_name = "URL", required_unless_present = "undo")]
    pub cache: Option<String>,

    /// Sign with this existing Nix secret key file.
    #[arg(long, value_name = "FILE", conflicts_with = "key_name")]
    pub key: Option<PathBuf>,

    /// Generate the key pair /etc/narpost/NAME.sec and NAME.pub (an existing pair of that name
    /// is used as it is). Without --key or --key-name: the key the config already names, else
    /// /var/lib/narpost/signing.sec if it exists, else a new <hostname>-1.
    #[arg(long, value_name = "NAME")]
    pub key_name: Option<String>,

    /// File holding the bearer token for HTTP caches and Attic.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,

    /// Write everything below DIR, as the machine will see it, and touch no service (image
    /// builds, tests).
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,

    /// Print the changes and write nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// When nix.conf sets another post-build-hook: comment it out and install narpost's.
    #[arg(long)]
    pub force: bool,

    /// Serve the cache to this machine's Nix through the daemon (substituter-listen =
    /// 127.0.0.1:37515, and that URL in nix.conf's extra-substituters): Nix reads the cache
    /// with narpost's credentials, and waits for a path another machine is building instead
    /// of building it too.
    #[arg(long)]
    pub substituter: bool,

    /// Take the hook line, the unit and the installed binaries out again; keeps the config,
    /// the keys, the queue and the cache.
    #[arg(long, conflicts_with_all = ["cache", "key", "key_name", "token_file", "force", "substituter"])]
    pub undo: bool,
}

pub fn run(args: &SetupArgs) -> anyhow::Result<()> {
    let root = std::fs::canonicalize(&args.root)
        .ok()
        .filter(|r| r.is_dir())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--root {}: not a directory; create it first",
                args.root.display()
            )
        })?;
    let system = root == Path::new("/");
    if system && !args.dry_run && !rustix::process::geteuid().is_root() {
        bail!(
            "setup writes /etc/nix/nix.conf, /etc/narpost and /usr/local/bin: run it as root (sudo narpost setup ...), or see what it would do with --dry-run"
        );
    }
    if under(&root, Path::new("/etc/NIXOS")).exists() {
        bail!(
            "{}: this is NixOS, whose nix.conf is generated: use the flake's NixOS module (services.narpost) instead",
            under(&root, Path::new("/etc/NIXOS")).display()
        );
    }
    let obs = observe(&root, args)?;
    if args.undo {
        let steps = plan::plan_undo(&obs);
        execute(&steps, args.dry_run)?;
        if steps.is_empty() {
            println!(
                "nothing to undo: narpost is not set up in {}",
                root.display()
            );
        }
        for (file, hook) in obs.included_hooks.iter().filter(|(_, h)| h == plan::HOOK) {
            println!(
                "kept {}: {} names it too (take that line out, then run --undo again)",
                obs.host(hook).display(),
                file.display()
            );
        }
        println!(
            "kept: {} (config and signing keys), {} (the queue; its GC roots keep queued paths from garbage collection until a daemon uploads them) and the cache",
            obs.host(plan::CONFIG_DIR).display(),
            obs.host(plan::STATE_DIR).display()
        );
        return Ok(());
    }
    let req = request(args, &obs)?;
    let steps = plan::plan_setup(&obs, &req)?;
    let generated = execute(&steps, args.dry_run)?;
    if steps.is_empty() {
        println!(
            "nothing to change: {} is already set up for {}",
            root.display(),
            req.cache
        );
    }
    if !system {
        println!("--root: no service was touched");
    } else if obs.services.is_none() {
        println!(
            "systemd is not running here, so no service was started: run `narpost daemon` some other way, and restart nix-daemon if it runs (it reads post-build-hook only at start)"
        );
    }
    let public = match &req.key {
        KeyPlan::Existing { public, .. } => public.clone(),
        KeyPlan::Generate { name } => {
            generated.unwrap_or_else(|| format!("{name}:<generated when setup runs for real>"))
        }
    };
    println!();
    println!("On the machines that fetch from this cache, add to /etc/nix/nix.conf:");
    for line in plan::consumer_lines(&req.cache, &public) {
        println!("{line}");
    }
    Ok(())
}

/// Prints the steps (`dry_run`) or applies them, each line once it is done. Returns the
/// public key of a key it generated.
fn execute(steps: &[Step], dry_run: bool) -> anyhow::Result<Option<String>> {
    if dry_run {
        if !steps.is_empty() {
            println!("--dry-run: would make these changes (nothing was written):");
        }
        for s in steps {
            println!("  {}", s.describe());
        }
        return Ok(None);
    }
    let mut public = None;
    for s in steps {
        if let Applied::Key(k) = apply::apply(s)? {
            public = Some(k);
        }
        println!("{}", s.describe());
    }
    Ok(public)
}

fn observe(root: &Path, args: &SetupArgs) -> anyhow::Result<Observed> {
    let host = |p: &str| under(root, Path::new(p));
    for p in [plan::NIX_CONF, plan::CONFIG, plan::UNIT, plan::DROP_IN] {
        check_target(root, &host(p))?;
    }
    // Binaries may be links (to this very binary); the cache directory is only created.
    let cache_dir = args.cache.as_deref().and_then(plan::file_cache_dir);
    let cache_dir = cache_dir.map(|d| under(root, &d));
    for p in [host(plan::NARPOST), host(plan::HOOK)]
        .iter()
        .chain(cache_dir.as_ref())
    {
        apply::check_ancestors(root, p)?;
    }
    let narpost_exe = std::env::current_exe().context("cannot tell where this narpost is")?;
    let hook_exe = narpost_exe.with_file_name("narpost-hook");
    if !args.undo && !hook_exe.is_file() {
        bail!(
            "{}: narpost-hook is missing beside narpost; it is built and shipped with it (`cargo build --release` makes both): put it there and run setup again",
            hook_exe.display()
        );
    }
    let nix_conf = read_optional(&host(plan::NIX_CONF))?;
    Ok(Observed {
        root: root.to_path_buf(),
        narpost_bin: bin_state(root, &narpost_exe, &host(plan::NARPOST), args.undo)?,
        hook_bin: bin_state(root, &hook_exe, &host(plan::HOOK), args.undo)?,
        narpost_exe,
        hook_exe,
        included_hooks: included_hooks(
            root,
            Path::new("/etc/nix"),
            nix_conf.as_deref().unwrap_or(""),
            0,
        ),
        nix_conf,
        config: read_optional(&host(plan::CONFIG))?,
        unit: read_optional(&host(plan::UNIT))?,
        drop_in: read_optional(&host(plan::DROP_IN))?,
        cache_dir_exists: cache_dir.is_some_and(|d| d.is_dir()),
        services: if root == Path::new("/") && Path::new("/run/systemd/system").is_dir() {
            Some(services())
        } else {
            None
        },
    })
}

/// How `dest` compares with the binary `src` that would be installed there.
fn bin_state(root: &Path, src: &Path, dest: &Path, undo: bool) -> anyhow::Result<BinState> {
    let Ok(meta) = std::fs::symlink_metadata(dest) else {
        return Ok(BinState::Absent);
    };
    if undo {
        return Ok(BinState::Differs);
    }
    // Running from there already (also through a link pointing at this very binary).
    if apply::canonical(dest) == apply::canonical(src) {
        return Ok(BinState::Current);
    }
    check_target(root, dest)?;
    if meta.is_file() && apply::same_contents(src, dest)? {
        Ok(BinState::Current)
    } else {
        Ok(BinState::Differs)
    }
}

/// Hooks set in the files nix.conf includes (and those include), as Nix resolves them:
/// relative to the including file's directory. Unreadable ones are left to Nix to report.
fn included_hooks(root: &Path, dir: &Path, text: &str, depth: usize) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    if depth > 8 {
        return out;
    }
    for (path, _) in nixconf::includes(text) {
        let seen = dir.join(&path);
        let file = under(root, &seen);
        let Ok(Some(inner)) = read_optional(&file) else {
            continue;
        };
        if let Some((_, hook)) = nixconf::hook_setting(&inner)
            && !hook.is_empty()
        {
            out.push((file.clone(), hook));
        }
        let inner_dir = seen.parent().unwrap_or(dir);
        out.extend(included_hooks(root, inner_dir, &inner, depth + 1));
    }
    out
}

fn services() -> Services {
    let yes = |args: &[&str]| {
        std::process::Command::new("systemctl")
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    Services {
        narpost_enabled: yes(&["is-enabled", "--quiet", "narpost.service"]),
        narpost_active: yes(&["is-active", "--quiet", "narpost.service"]),
        nix_daemon_active: yes(&["is-active", "--quiet", "nix-daemon.service"]),
    }
}

/// An absolute path as the machine sees it: relative ones are taken from the current
/// directory only when the machine is this one.
fn machine_path(flag: &str, path: &Path, root: &Path) -> anyhow::Result<PathBuf> {
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    if root != Path::new("/") {
        bail!(
            "{flag} {}: give the absolute path the machine below --root will see",
            path.display()
        );
    }
    std::path::absolute(path).with_context(|| format!("{flag} {}", path.display()))
}

fn request(args: &SetupArgs, obs: &Observed) -> anyhow::Result<Request> {
    let cache = args
        .cache
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--cache URL is needed"))?;
    check_cache(&cache)?;
    let root = &obs.root;
    let token_file = match &args.token_file {
        Some(t) => {
            let t = machine_path("--token-file", t, root)?;
            let seen = under(root, &t);
            if !seen.is_file() {
                bail!(
                    "{}: token file not found; write the token there first (one line, mode 0600)",
                    seen.display()
                );
            }
            Some(t)
        }
        None => None,
    };
    let key = key_plan(args, obs)?;
    let key_file = key.file();
    let cache_dir = plan::file_cache_dir(&cache);
    for (what, path) in [
        ("signing key", Some(key_file.as_path())),
        ("token file", token_file.as_deref()),
        ("file:// cache", cache_dir.as_deref()),
    ] {
        if let Some(p) = path
            && let Some(setting) = plan::hidden_from_daemon(p)
        {
            bail!(
                "{}: the daemon cannot see this {what} there (its unit sets {setting}); move it below /etc/narpost (a cache: /var/lib/narpost or /srv) and run setup again",
                p.display()
            );
        }
    }
    Ok(Request {
        key,
        cache,
        token_file,
        force: args.force,
        substituter: args.substituter,
    })
}

/// Refuses a cache URL the daemon could not use, before anything is written.
fn check_cache(url: &str) -> anyhow::Result<()> {
    crate::cache::CacheUrl::parse(url)
        .map(drop)
        .map_err(|e| crate::error::from_target(e).context("--cache"))
}

fn key_plan(args: &SetupArgs, obs: &Observed) -> anyhow::Result<KeyPlan> {
    let root = &obs.root;
    let existing = |file: PathBuf| -> anyhow::Result<KeyPlan> {
        let key = crate::keys::load_signing_key(&under(root, &file))?;
        Ok(KeyPlan::Existing {
            file,
            public: key.public().to_nix_string(),
        })
    };
    if let Some(file) = &args.key {
        return existing(machine_path("--key", file, root)?);
    }
    if let Some(name) = &args.key_name {
        return named_key(root, name, &existing);
    }
    let configured = obs
        .config
        .as_deref()
        .and_then(|t| t.parse::<toml::Table>().ok())
        .and_then(|t| t.get("secret-key-file")?.as_str().map(PathBuf::from));
    if let Some(file) = configured {
        match existing(file) {
            Err(e)
                if e.downcast_ref::<crate::keys::KeyError>()
                    .is_some_and(|k| matches!(k, crate::keys::KeyError::Missing { .. })) => {}
            other => return other,
        }
    }
    let default = Path::new(plan::STATE_DIR).join("signing.sec");
    if under(root, &default).exists() {
        return existing(default);
    }
    let host = match read_optional(&under(root, Path::new("/etc/hostname"))) {
        Ok(Some(name)) if root != Path::new("/") && !name.trim().is_empty() => {
            crate::keys::host_key_part(name.trim())
        }
        _ => crate::keys::hostname(),
    };
    named_key(root, &format!("{host}-1"), &existing)
}

fn named_key(
    root: &Path,
    name: &str,
    existing: &dyn Fn(PathBuf) -> anyhow::Result<KeyPlan>,
) -> anyhow::Result<KeyPlan> {
    if !crate::keys::valid_key_name(name) {
        return Err(crate::keys::KeyError::BadName {
            name: name.to_string(),
        }
        .into());
    }
    let file = Path::new(plan::CONFIG_DIR).join(format!("{name}.sec"));
    if std::fs::symlink_metadata(under(root, &file)).is_ok() {
        return existing(file);
    }
    Ok(KeyPlan::Generate {
        name: name.to_string(),
    })
}
