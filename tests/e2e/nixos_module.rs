//! nix/module.nix, flake.nix, nix/package.nix and README's NixOS example, evaluated by nixpkgs'
//! real lib and module system (`lib.evalModules`) over the stand-ins of tests/nixos/stubs.nix
//! (the NixOS options the module sets, declared loosely, and a few of pkgs); and every .nix
//! file parsed.
//!
//! nixpkgs' lib comes from `NIXPKGS_LIB` (its `lib` directory) or `<nixpkgs/lib>` on
//! NIX_PATH; with neither, these tests fail. What they cannot show: a NixOS evaluation with the
//! full nixpkgs (the real systemd, nix and environment.etc modules), the package built by
//! nixpkgs, a VM booting with the module.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// nixpkgs' lib directory, or None to let the evaluation use `<nixpkgs/lib>`; panics when
/// neither is there.
fn nixpkgs_lib() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("NIXPKGS_LIB").filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        assert!(
            dir.join("default.nix").is_file(),
            "NIXPKGS_LIB={} is not nixpkgs' lib directory (no default.nix in it)",
            dir.display()
        );
        return Some(dir);
    }
    let found = common::nix("nix-instantiate")
        .args(["--find-file", "nixpkgs/lib"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "nixpkgs' lib is needed to evaluate the NixOS module: set NIXPKGS_LIB to a nixpkgs \
         checkout's lib/ directory, or put nixpkgs on NIX_PATH (nixpkgs=/path/to/nixpkgs)"
    );
    None
}

struct Evaluated {
    json: Value,
    /// The raw JSON text, to search for secrets.
    text: String,
    /// The store the evaluation wrote its files (the config file) to.
    store: tempfile::TempDir,
}

/// Evaluates `file` (under tests/nixos/) with `args`, writing any file it generates into a
/// store of its own.
fn instantiate(file: &str, args: &[(&str, &str)]) -> Result<Evaluated, String> {
    let store = tempfile::tempdir().unwrap();
    let mut cmd = common::nix("nix-instantiate");
    cmd.arg("--store")
        .arg(store.path())
        .args(["--read-write-mode", "--eval", "--strict", "--json"])
        .arg(Path::new(REPO).join("tests/nixos").join(file));
    for (name, value) in args {
        cmd.args(["--argstr", name, value]);
    }
    match nixpkgs_lib() {
        Some(lib) => cmd.arg("--arg").arg("libPath").arg(lib),
        None => cmd.args(["--arg", "libPath", "null"]),
    };
    let out = cmd.output().expect("cannot run nix-instantiate");
    if !out.status.success() {
        return Err(common::stderr(&out));
    }
    let text = common::stdout(&out);
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    Ok(Evaluated { json, text, store })
}

/// Evaluates nix/module.nix with `definitions` (each a module's `config`).
fn evaluate(definitions: Value) -> Result<Evaluated, String> {
    let case = json!({ "definitions": definitions }).to_string();
    instantiate("eval.nix", &[("caseJson", &case)])
}

fn eval_ok(definitions: Value) -> Evaluated {
    evaluate(definitions).unwrap_or_else(|e| panic!("evaluation failed:\n{e}"))
}

fn narpost(options: Value) -> Value {
    json!([{ "services": { "narpost": options } }])
}

fn strs(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().flat_map(strs).collect(),
        Value::String(s) => s.split_whitespace().map(String::from).collect(),
        Value::Bool(b) => vec![b.to_string()],
        Value::Number(n) => vec![n.to_string()],
        other => panic!("not a unit setting: {other}"),
    }
}

impl Evaluated {
    fn package(&self) -> &str {
        self.json["packageOutPath"].as_str().unwrap()
    }

    fn service(&self) -> &Value {
        &self.json["systemd"]["services"]["narpost"]
    }

    /// The generated config file, parsed.
    fn config_file(&self) -> toml::Table {
        let text = self.json["environment"]["etc"]["narpost/narpost.toml"]["text"]
            .as_str()
            .expect("no /etc/narpost/narpost.toml");
        text.parse()
            .unwrap_or_else(|e| panic!("narpost.toml: {e}\n{text}"))
    }

    /// Every generated file, by path: what the evaluation wrote to its store.
    fn generated_files(&self) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    walk(&path, out);
                } else if meta.is_file() {
                    out.push((path.clone(), std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut files = Vec::new();
        walk(&self.store.path().join("nix/store"), &mut files);
        files
    }
}

#[test]
fn disabled_module_defines_nothing() {
    for options in [
        json!({}),
        json!({ "enable": false, "cache": "s3://bucket" }),
    ] {
        let e = eval_ok(narpost(options));
        assert_eq!(
            e.json["systemd"],
            json!({ "services": {}, "tmpfiles": { "rules": [] } })
        );
        assert_eq!(e.json["nix"], json!({ "settings": {} }));
        assert_eq!(
            e.json["environment"],
            json!({ "etc": {}, "systemPackages": [] })
        );
        assert_eq!(e.json["warnings"], json!([]));
        assert!(e.generated_files().is_empty());
    }
}

#[test]
fn enabled_module_hooks_nix_and_runs_the_daemon() {
    // Not below /tmp, which the service hides from the daemon (an assertion says so).
    let secrets = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let marker = format!("SECRET-MARKER-{}", common::nonce());
    let key = secrets.path().join("cache.example.org-1.sec");
    let token = secrets.path().join("token");
    let env_file = secrets.path().join("narpost.env");
    std::fs::write(&key, format!("cache.example.org-1:{marker}\n")).unwrap();
    std::fs::write(&token, format!("{marker}\n")).unwrap();
    std::fs::write(&env_file, format!("AWS_SECRET_ACCESS_KEY={marker}\n")).unwrap();
    let cache = "s3://nix-cache?region=eu-central-1&endpoint=s3.example.org";

    let e = eval_ok(narpost(json!({
        "enable": true,
        "cache": cache,
        "secretKeyFile": key,
        "tokenFile": token,
        "environmentFile": env_file,
        "settings": { "jobs": 3, "compression-level": 9, "cache": "file:///overridden" },
    })));
    let pkg = e.package();

    assert_eq!(
        e.json["nix"]["settings"]["post-build-hook"],
        json!(format!("{pkg}/bin/narpost-hook"))
    );
    let service = e.service();
    assert_eq!(
        strs(&service["serviceConfig"]["ExecStart"]),
        [format!("{pkg}/bin/narpost"), "daemon".to_string()]
    );
    assert!(strs(&service["wantedBy"]).contains(&"multi-user.target".to_string()));
    assert_eq!(service["serviceConfig"]["EnvironmentFile"], json!(env_file));

    // The daemon (and the hook, and `narpost status`) read /etc/narpost/narpost.toml.
    let config = e.config_file();
    assert_eq!(config["cache"].as_str(), Some(cache), "typed option wins");
    assert_eq!(config["secret-key-file"].as_str(), key.to_str());
    assert_eq!(config["token-file"].as_str(), token.to_str());
    assert_eq!(config["jobs"].as_integer(), Some(3));
    assert_eq!(config["compression-level"].as_integer(), Some(9));
    assert_eq!(config.len(), 5, "{config:?}");
    // And narpost's own loader takes the file as the daemon will.
    let file = secrets.path().join("narpost.toml");
    std::fs::write(
        &file,
        e.json["environment"]["etc"]["narpost/narpost.toml"]["text"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    let loaded = narpost::config::Config::load(
        Some(&file),
        Some(secrets.path().join("state")),
        narpost::config::Overrides::default(),
    )
    .unwrap_or_else(|err| panic!("narpost refuses the module's config file: {err}"));
    assert_eq!(loaded.cache, cache);
    assert_eq!(loaded.key_file.as_deref(), Some(key.as_path()));
    assert_eq!(loaded.token_file.as_deref(), Some(token.as_path()));
    assert_eq!((loaded.jobs, loaded.compression_level), (3, 9));
    // A changed config restarts the daemon.
    let source = &e.json["environment"]["etc"]["narpost/narpost.toml"]["source"];
    assert_eq!(service["restartTriggers"], json!([source]));
    let warnings = e.json["warnings"].to_string();
    assert!(
        warnings.contains("services.narpost.settings.cache") && warnings.contains("overridden"),
        "{warnings}"
    );
    assert_eq!(e.json["environment"]["systemPackages"], json!([pkg]));
    assert_eq!(e.json["failedAssertions"], json!([]));

    // The module names the secrets; it never reads them.
    assert!(
        !e.text.contains(&marker),
        "a secret reached the evaluation: {}",
        e.text
    );
    let files = e.generated_files();
    assert_eq!(files.len(), 1, "{files:?}");
    for (path, bytes) in files {
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&marker),
            "{} holds a secret",
            path.display()
        );
    }
}

#[test]
fn hook_disabled_leaves_post_build_hook_alone() {
    let e = eval_ok(narpost(
        json!({ "enable": true, "cache": LOCAL, "hook": { "enable": false } }),
    ));
    assert_eq!(e.json["nix"]["settings"], json!({}));
    assert!(e.service().is_object(), "the daemon still runs");

    let mut definitions =
        narpost(json!({ "enable": true, "cache": LOCAL, "hook": { "enable": false } }));
    let own_hook = "/etc/nix/upload-to-cache";
    definitions
        .as_array_mut()
        .unwrap()
        .push(json!({ "nix": { "settings": { "post-build-hook": own_hook } } }));
    let e = eval_ok(definitions);
    assert_eq!(
        e.json["nix"]["settings"],
        json!({ "post-build-hook": own_hook })
    );

    // With the hook on, a second hook is a conflict NixOS reports, not one silently lost.
    let mut definitions = narpost(json!({ "enable": true, "cache": LOCAL }));
    definitions
        .as_array_mut()
        .unwrap()
        .push(json!({ "nix": { "settings": { "post-build-hook": own_hook } } }));
    let err = evaluate(definitions)
        .err()
        .expect("two hooks must conflict");
    assert!(err.contains("post-build-hook"), "{err}");
}

#[test]
fn the_local_substituter_listens_on_loopback_and_goes_first_in_substituters() {
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    assert!(e.json["nix"]["settings"].get("substituters").is_none());
    assert!(e.config_file().get("substituter-listen").is_none());
    for (options, port) in [
        (json!({ "enable": true }), 37515),
        (json!({ "enable": true, "port": 8765 }), 8765),
    ] {
        let e = eval_ok(narpost(
            json!({ "enable": true, "cache": LOCAL, "substituter": options }),
        ));
        assert_eq!(
            e.config_file()["substituter-listen"].as_str(),
            Some(format!("127.0.0.1:{port}").as_str())
        );
        assert_eq!(
            e.json["nix"]["settings"]["substituters"],
            json!([format!("http://127.0.0.1:{port}")])
        );
    }
}

/// The one setting a user must give: with no cache the daemon would fill a directory on
/// this machine that nothing serves.
const LOCAL: &str = "file:///var/lib/narpost/cache";

#[test]
fn a_cache_alone_is_the_whole_config_file_and_none_fails_an_assertion() {
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    let config = e.config_file();
    assert_eq!(config.len(), 1, "{config:?}");
    assert_eq!(config["cache"].as_str(), Some(LOCAL));
    assert_eq!(e.json["warnings"], json!([]));
    assert_eq!(e.json["failedAssertions"], json!([]));
    assert!(
        e.service()["serviceConfig"]
            .get("EnvironmentFile")
            .is_none()
    );

    let e = eval_ok(narpost(json!({ "enable": true })));
    let failed = e.json["failedAssertions"].to_string();
    assert!(
        failed.contains("services.narpost.cache is not set"),
        "{failed}"
    );
}

#[test]
fn bad_settings_fail_the_evaluation_naming_the_option() {
    for (options, option) in [
        (
            json!({ "cache": "cahce.example.org" }),
            "services.narpost.cache",
        ),
        (json!({ "cache": "ftp://x" }), "services.narpost.cache"),
        (
            json!({ "cache": LOCAL, "settings": { "cahce": "s3://b" } }),
            "services.narpost.settings.cahce",
        ),
        (
            json!({ "cache": LOCAL, "settings": { "jobs": "four" } }),
            "services.narpost.settings.jobs",
        ),
        (
            json!({ "settings": { "cache": "nfs://x" } }),
            "services.narpost.settings.cache",
        ),
        (
            json!({ "cache": LOCAL, "settings": { "priority": "low" } }),
            "services.narpost.settings.priority",
        ),
    ] {
        let mut options = options;
        options["enable"] = json!(true);
        let err = evaluate(narpost(options.clone()))
            .err()
            .unwrap_or_else(|| panic!("{options} was accepted"));
        assert!(err.contains(option), "{options}: {err}");
    }
}

#[test]
fn settings_declare_exactly_the_keys_narposts_loader_takes() {
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    let mut declared: Vec<String> = serde_json::from_value(e.json["settingKeys"].clone()).unwrap();
    declared.sort();
    let mut known: Vec<String> = narpost::config::FILE_KEYS
        .iter()
        .chain(narpost::config::FILE_KEY_ALIASES.iter().map(|(old, _)| old))
        .map(|k| k.to_string())
        .collect();
    known.sort();
    assert_eq!(declared, known);
}

#[test]
fn an_ssh_cache_puts_openssh_on_the_path_and_a_hidden_ssh_key_fails_an_assertion() {
    let cache = "ssh://nix-ssh@cachehost?ssh-key=/var/lib/narpost-keys/ssh_key&base64-ssh-public-host-key=AAAA";
    let e = eval_ok(narpost(json!({ "enable": true, "cache": cache })));
    assert_eq!(e.json["failedAssertions"], json!([]));
    let path = strs(&e.service()["path"]);
    assert_eq!(path.len(), 1, "{path:?}");
    assert!(path[0].ends_with("-openssh-9.9p1"), "{path:?}");

    let hidden = "ssh://nix-ssh@cachehost?ssh-key=/root/.ssh/id_ed25519";
    let e = eval_ok(narpost(json!({ "enable": true, "cache": hidden })));
    assert_eq!(
        e.json["failedAssertions"],
        json!([
            "services.narpost: the ssh-key /root/.ssh/id_ed25519 is hidden from the daemon by its \
             ProtectHome=true; keep it elsewhere, e.g. under /var/lib."
        ])
    );
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    assert_eq!(
        e.service()["path"],
        json!([]),
        "no ssh without an ssh:// cache"
    );
}

#[test]
fn the_stop_timeout_follows_drain_timeout() {
    let stop = |settings: Value| {
        let e = eval_ok(narpost(
            json!({ "enable": true, "cache": LOCAL, "settings": settings }),
        ));
        e.service()["serviceConfig"]["TimeoutStopSec"].clone()
    };
    assert_eq!(stop(json!({})), json!("45s"));
    assert_eq!(stop(json!({ "drain-timeout": 60 })), json!("75s"));
}

#[test]
fn secrets_reach_the_daemon_through_load_credential() {
    let e = eval_ok(narpost(json!({
        "enable": true,
        "cache": "https://cache.example.org",
        "secretKeyFile": "/root/keys/cache.sec",
        "tokenFile": "/var/lib/narpost-keys/token",
        "settings": { "basic-auth-file": "/home/ci/basic" },
    })));
    // Read by systemd, outside the sandbox: where they live does not matter.
    assert_eq!(e.json["failedAssertions"], json!([]));
    let service = e.service();
    let mut credentials = strs(&service["serviceConfig"]["LoadCredential"]);
    credentials.sort();
    assert_eq!(
        credentials,
        [
            "basic-auth:/home/ci/basic",
            "secret-key:/root/keys/cache.sec",
            "token:/var/lib/narpost-keys/token",
        ]
    );
    let env = &service["environment"];
    assert_eq!(env["NARPOST_KEY_FILE"], json!("%d/secret-key"));
    assert_eq!(env["NARPOST_TOKEN_FILE"], json!("%d/token"));
    assert_eq!(env["NARPOST_BASIC_AUTH_FILE"], json!("%d/basic-auth"));
    // The config file still names the originals, for `narpost status` and the hook.
    let config = e.config_file();
    assert_eq!(
        config["secret-key-file"].as_str(),
        Some("/root/keys/cache.sec")
    );
}

#[test]
fn secrets_that_would_land_in_the_store_are_refused() {
    for (option, value) in [
        (
            "secretKeyFile",
            "/nix/store/00000000000000000000000000000000-key.sec",
        ),
        ("secretKeyFile", "cache.sec"),
        ("tokenFile", "./token"),
        (
            "environmentFile",
            "/nix/store/00000000000000000000000000000000-env",
        ),
    ] {
        let err = evaluate(narpost(json!({ "enable": true, option: value })))
            .err()
            .unwrap_or_else(|| panic!("{option} = {value} was accepted"));
        assert!(
            err.contains(&format!("services.narpost.{option}"))
                && err.contains("absolute path outside the Nix store"),
            "{option} = {value}: {err}"
        );
    }
}

#[test]
fn paths_the_service_would_hide_from_the_daemon_fail_an_assertion() {
    let e = eval_ok(narpost(json!({
        "enable": true,
        "cache": "file:///tmp/cache",
        "secretKeyFile": "/home/alice/cache.sec",
        "settings": { "basic-auth-file": "/root/basic" },
        // systemd reads it, not the daemon.
        "environmentFile": "/root/aws.env",
    })));
    let mut failed: Vec<String> =
        serde_json::from_value(e.json["failedAssertions"].clone()).unwrap();
    failed.sort();
    // The key and the basic-auth file go through LoadCredential, which systemd reads.
    assert_eq!(
        failed,
        [
            "services.narpost: the file:// cache /tmp/cache is hidden from the daemon by its \
          PrivateTmp=true; keep it elsewhere, e.g. under /var/lib."
        ]
    );
    let e = eval_ok(narpost(json!({
        "enable": true,
        "cache": "file:///homework/cache",
        "secretKeyFile": "/var/lib/narpost-keys/cache.sec",
    })));
    assert_eq!(e.json["failedAssertions"], json!([]));
}

#[test]
fn file_cache_and_gc_roots_outside_the_defaults_are_writable() {
    let e = eval_ok(narpost(json!({
        "enable": true,
        "cache": "file:///srv/nix-cache?compression=zstd",
        "settings": { "gc-roots-dir": "/var/lib/ci-roots" },
    })));
    let paths = strs(&e.service()["serviceConfig"]["ReadWritePaths"]);
    assert!(paths.contains(&"/srv/nix-cache".to_string()), "{paths:?}");
    assert!(
        paths.contains(&"/var/lib/ci-roots".to_string()),
        "{paths:?}"
    );
    assert_eq!(
        e.json["systemd"]["tmpfiles"]["rules"],
        json!([
            "d /srv/nix-cache 0755 root root -",
            "d /var/lib/ci-roots 0755 root root -"
        ])
    );
}

/// systemd/narpost.service: (section, key) -> every value given, lists split on whitespace.
fn unit_file() -> BTreeMap<(String, String), Vec<String>> {
    let text = std::fs::read_to_string(Path::new(REPO).join("systemd/narpost.service")).unwrap();
    let mut section = String::new();
    let mut settings: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("narpost.service: not a setting: {line}"));
        let values = settings
            .entry((section.clone(), key.to_string()))
            .or_default();
        if key == "Description" {
            values.push(value.to_string());
        } else {
            values.extend(value.split_whitespace().map(String::from));
        }
    }
    settings
}

/// The unit the module defines, as (section, key) -> values, the way [`unit_file`] reads
/// systemd/narpost.service (ExecStart's store path put back to `/usr/local`).
fn module_unit(e: &Evaluated) -> BTreeMap<(String, String), Vec<String>> {
    let service = e.service().as_object().unwrap();
    let pkg = e.package();
    let mut module: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    let mut put = |section: &str, key: &str, values: Vec<String>| {
        module.insert((section.into(), key.into()), values);
    };
    for (attr, value) in service {
        match attr.as_str() {
            "description" => put("Unit", "Description", vec![value.as_str().unwrap().into()]),
            "after" => put("Unit", "After", strs(value)),
            "wants" => put("Unit", "Wants", strs(value)),
            "before" => put("Unit", "Before", strs(value)),
            "wantedBy" => put("Install", "WantedBy", strs(value)),
            "environment" => put(
                "Service",
                "Environment",
                value
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
                    .collect(),
            ),
            // NixOS-only: restarts the daemon when its config file changes.
            "restartTriggers" => {}
            // NixOS-only: openssh for an ssh:// cache.
            "path" if value == &json!([]) => {}
            "serviceConfig" => {
                for (key, value) in value.as_object().unwrap() {
                    let mut values = strs(value);
                    if key == "ExecStart" {
                        // The unit names the binary where a hand installation puts it.
                        values[0] = values[0].replace(pkg, "/usr/local");
                    }
                    put("Service", key, values);
                }
            }
            other => panic!("services.narpost sets {other}, which no unit setting matches"),
        }
    }
    module
}

#[test]
fn service_matches_the_systemd_unit() {
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    let module = module_unit(&e);
    let unit = unit_file();
    let keys = |m: &BTreeMap<(String, String), Vec<String>>| m.keys().cloned().collect::<Vec<_>>();
    let only_unit: Vec<_> = keys(&unit)
        .into_iter()
        .filter(|k| !module.contains_key(k))
        .collect();
    let only_module: Vec<_> = keys(&module)
        .into_iter()
        .filter(|k| !unit.contains_key(k))
        .collect();
    assert!(
        only_unit.is_empty() && only_module.is_empty(),
        "systemd/narpost.service and nix/module.nix differ: only in the unit {only_unit:?}, \
         only in the module {only_module:?}"
    );
    for (key, values) in &unit {
        assert_eq!(&module[key], values, "{key:?} differs");
    }
}

/// The exposure `systemd-analyze security` gives a unit file.
fn exposure(unit: &Path) -> f64 {
    let out = common::run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(unit),
    );
    let text = common::stdout(&out);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    let after = line.split(": ").nth(1).unwrap_or_default();
    after
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"))
}

#[test]
fn the_unit_is_rated_at_most_2_5_by_systemd_analyze_security() {
    common::require("systemd-analyze");
    let dir = tempfile::tempdir().unwrap();
    // The evaluated service, rendered as systemd reads it.
    let e = eval_ok(narpost(json!({ "enable": true, "cache": LOCAL })));
    let mut text = String::new();
    for section in ["Unit", "Service", "Install"] {
        text.push_str(&format!("[{section}]\n"));
        for ((s, key), values) in module_unit(&e) {
            if s == section {
                for v in if key == "CPUWeight" || key == "Environment" {
                    values.clone()
                } else {
                    vec![values.join(" ")]
                } {
                    text.push_str(&format!("{key}={v}\n"));
                }
            }
        }
    }
    let rendered = dir.path().join("narpost.service");
    std::fs::write(&rendered, &text).unwrap();
    let shipped = dir.path().join("shipped").join("narpost.service");
    std::fs::create_dir(shipped.parent().unwrap()).unwrap();
    std::fs::copy(Path::new(REPO).join("systemd/narpost.service"), &shipped).unwrap();
    for unit in [&rendered, &shipped] {
        let score = exposure(unit);
        eprintln!("{}: exposure {score}", unit.display());
        assert!(
            score <= 2.5,
            "{}: exposure {score}:\n{text}",
            unit.display()
        );
    }
}

/// The package's source exactly as its derivation filters it, built and unit-tested the
/// way its check phase does (`cargo test --lib`, offline), so a file the unit tests read
/// and the filter leaves out fails here instead of in `nix build`.
#[test]
fn the_filtered_package_source_passes_the_check_phase() {
    let e = instantiate("flake-outputs.nix", &[]).unwrap_or_else(|err| panic!("{err}"));
    let src = in_store(&e, e.json["overlay"]["src"].as_str().unwrap());
    let build = tempfile::tempdir().unwrap();
    common::run(
        Command::new("cp")
            .arg("-r")
            .arg(src.join("."))
            .arg(build.path()),
    );
    common::run(Command::new("chmod").args(["-R", "u+w"]).arg(build.path()));
    // The checkout's own target directory: the dependencies are built already.
    common::run(
        Command::new(env!("CARGO"))
            .args(["test", "--lib", "--offline", "--quiet"])
            .current_dir(build.path())
            .env("CARGO_TARGET_DIR", Path::new(REPO).join("target")),
    );
}

#[test]
fn every_nix_file_parses() {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if path.is_dir() {
                if name != "target" && !name.starts_with('.') {
                    walk(&path, out);
                }
            } else if name.ends_with(".nix") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(Path::new(REPO), &mut files);
    for expected in [
        "flake.nix",
        "nix/module.nix",
        "nix/package.nix",
        "tests/nixos/eval.nix",
    ] {
        assert!(
            files.contains(&Path::new(REPO).join(expected)),
            "{expected} not found"
        );
    }
    for file in &files {
        common::run(common::nix("nix-instantiate").arg("--parse").arg(file));
    }
}

#[test]
fn flake_module_brings_the_package_through_the_overlay() {
    let case = json!({
        "viaFlake": true,
        "definitions": narpost(json!({ "enable": true, "cache": LOCAL })),
    })
    .to_string();
    let e = instantiate("eval.nix", &[("caseJson", &case)])
        .unwrap_or_else(|err| panic!("evaluation failed:\n{err}"));
    // The configuration's own pkgs, extended by the flake's overlay, built it.
    let pkg = e.package();
    assert!(pkg.ends_with("-narpost-0.1.0-x86_64-linux"), "{pkg}");
    assert_eq!(
        e.json["nix"]["settings"]["post-build-hook"],
        json!(format!("{pkg}/bin/narpost-hook"))
    );
}

fn cargo_manifest() -> toml::Table {
    std::fs::read_to_string(Path::new(REPO).join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn flake_packages_both_systems_from_the_repository() {
    let e = instantiate("flake-outputs.nix", &[]).unwrap_or_else(|err| panic!("{err}"));
    let manifest = cargo_manifest();
    let package = &manifest["package"];
    let packages = e.json["packages"].as_object().unwrap();
    assert_eq!(
        packages.keys().collect::<Vec<_>>(),
        ["aarch64-linux", "x86_64-linux"]
    );
    for (system, outputs) in packages {
        let narpost = &outputs["narpost"];
        assert_eq!(outputs["default"], *narpost, "{system}: default is narpost");
        assert!(
            narpost["name"].as_str().unwrap().ends_with(system.as_str()),
            "{system}: built by that system's nixpkgs: {narpost}"
        );
    }
    let overlay = &e.json["overlay"];
    assert_eq!(overlay["name"], json!("narpost-0.1.0-aarch64-linux"));
    for p in [overlay, &packages["x86_64-linux"]["narpost"]] {
        assert_eq!(p["pname"].as_str(), package["name"].as_str());
        assert_eq!(p["version"].as_str(), package["version"].as_str());
        assert_eq!(p["lockFile"], json!(Path::new(REPO).join("Cargo.lock")));
        assert_eq!(p["cargoTestFlags"], json!(["--lib"]));
        assert_eq!(p["meta"]["mainProgram"], json!("narpost"));
        assert_eq!(p["meta"]["license"].as_str(), package["license"].as_str());
        assert_eq!(
            p["meta"]["platforms"],
            json!(["aarch64-linux", "x86_64-linux"])
        );
    }
    assert_eq!(
        e.json["module"]["imports"],
        json!([Path::new(REPO).join("nix/module.nix")])
    );
    assert_eq!(e.json["module"]["setsNixpkgs"], json!(false));
    assert_eq!(
        e.json["module"]["package"],
        json!("narpost-0.1.0-x86_64-linux")
    );
}

/// The store path the evaluation copied `path` (a /nix/store/... name) to.
fn in_store(e: &Evaluated, path: &str) -> PathBuf {
    e.store.path().join(path.trim_start_matches('/'))
}

#[test]
fn package_source_holds_what_cargo_and_the_install_need() {
    let e = instantiate("flake-outputs.nix", &[]).unwrap_or_else(|err| panic!("{err}"));
    let src = in_store(&e, e.json["overlay"]["src"].as_str().unwrap());
    let mut top: Vec<_> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    top.sort();
    let mut expected = vec![
        "Cargo.lock",
        "Cargo.toml",
        "benches",
        "src",
        "systemd",
        "tests",
    ];
    if Path::new(REPO).join("build.rs").exists() {
        expected.push("build.rs");
    }
    expected.sort();
    assert_eq!(top, expected);
    // Of the tests, only the fixtures the unit tests read.
    let tests: Vec<_> = std::fs::read_dir(src.join("tests"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(tests, ["fixtures"]);
    // Every target Cargo.toml declares or cargo finds is in the source.
    let scratch = tempfile::tempdir().unwrap();
    let out = common::run(
        Command::new(env!("CARGO"))
            .args([
                "metadata",
                "--offline",
                "--no-deps",
                "--format-version",
                "1",
            ])
            .arg("--manifest-path")
            .arg(src.join("Cargo.toml"))
            .env("CARGO_TARGET_DIR", scratch.path()),
    );
    let metadata: Value = serde_json::from_slice(&out.stdout).unwrap();
    let targets: Vec<_> = metadata["packages"][0]["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    for name in ["narpost", "narpost-hook"] {
        assert!(targets.contains(&name.to_string()), "{targets:?}");
    }
}

/// What nixpkgs' setup hooks do for the three commands postInstall uses, so the script
/// itself runs here: substituteInPlace --replace-fail (fails when the text is not there),
/// installShellCompletion --cmd and installManPage (by the page's section suffix).
const SETUP_HOOK_STAND_INS: &str = r#"
substituteInPlace() {
  local file=$1; shift
  while (($#)); do
    [[ $1 == --replace-fail ]] || { echo "substituteInPlace: unknown $1" >&2; return 1; }
    grep -qF -- "$2" "$file" || { echo "substituteInPlace: '$2' not in $file" >&2; return 1; }
    local text; text=$(<"$file"); printf '%s\n' "${text//"$2"/"$3"}" >"$file"
    shift 3
  done
}
installShellCompletion() {
  local cmd=
  while (($#)); do
    case $1 in
      --cmd) cmd=$2 ;;
      --bash) mkdir -p "$out/share/bash-completion/completions"; cat "$2" >"$out/share/bash-completion/completions/$cmd.bash" ;;
      --zsh) mkdir -p "$out/share/zsh/site-functions"; cat "$2" >"$out/share/zsh/site-functions/_$cmd" ;;
      --fish) mkdir -p "$out/share/fish/vendor_completions.d"; cat "$2" >"$out/share/fish/vendor_completions.d/$cmd.fish" ;;
      *) echo "installShellCompletion: unknown $1" >&2; return 1 ;;
    esac
    shift 2
  done
}
installManPage() {
  local page
  for page; do install -Dm644 "$page" "$out/share/man/man${page##*.}/${page##*/}"; done
}
"#;

#[test]
fn package_post_install_installs_unit_completions_and_man_pages() {
    let e = instantiate("flake-outputs.nix", &[]).unwrap_or_else(|err| panic!("{err}"));
    let package = &e.json["packages"]["x86_64-linux"]["narpost"];
    let src = in_store(&e, package["src"].as_str().unwrap());
    // The build's source directory, and $out with the binaries cargo installed.
    let build = tempfile::tempdir().unwrap();
    common::run(
        Command::new("cp")
            .arg("-r")
            .arg(src.join("."))
            .arg(build.path()),
    );
    common::run(Command::new("chmod").args(["-R", "u+w"]).arg(build.path()));
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir(out.path().join("bin")).unwrap();
    std::fs::copy(common::narpost_bin(), out.path().join("bin/narpost")).unwrap();
    let script = format!(
        "{SETUP_HOOK_STAND_INS}\n{}",
        package["postInstall"].as_str().unwrap()
    );
    common::run(
        Command::new("bash")
            .args(["--norc", "--noprofile", "-euo", "pipefail", "-c", &script])
            .current_dir(build.path())
            .env("out", out.path()),
    );

    let out = out.path();
    let unit = std::fs::read_to_string(out.join("lib/systemd/system/narpost.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "\nExecStart={}/bin/narpost daemon\n",
            out.display()
        )),
        "{unit}"
    );
    for file in [
        "share/bash-completion/completions/narpost.bash",
        "share/zsh/site-functions/_narpost",
        "share/fish/vendor_completions.d/narpost.fish",
        "share/man/man1/narpost.1",
        "share/man/man1/narpost-daemon.1",
    ] {
        let len = std::fs::metadata(out.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .len();
        assert!(len > 100, "{file} is {len} bytes");
    }
}

#[test]
fn readme_nixos_example_evaluates_to_a_builder_and_its_consumers() {
    let readme = std::fs::read_to_string(Path::new(REPO).join("README.md")).unwrap();
    let section = &readme[readme
        .find("\n## NixOS\n")
        .expect("README has no NixOS section")..];
    let start = section.find("```nix\n").expect("no nix example") + "```nix\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("flake.nix");
    std::fs::write(&file, example).unwrap();
    let e = instantiate("readme-example.nix", &[("example", file.to_str().unwrap())])
        .unwrap_or_else(|err| panic!("README's example does not evaluate:\n{err}"));

    let machines = e.json.as_object().unwrap();
    assert_eq!(
        machines.keys().collect::<Vec<_>>(),
        ["builder", "node-2", "node-3"]
    );
    let builder = &machines["builder"];
    let config: toml::Table = builder["configFile"].as_str().unwrap().parse().unwrap();
    assert!(
        config["cache"].as_str().unwrap().starts_with("s3://"),
        "{config:?}"
    );
    assert!(config.contains_key("secret-key-file"), "{config:?}");
    assert!(builder["serviceConfig"]["EnvironmentFile"].is_string());
    assert!(
        builder["hook"]
            .as_str()
            .unwrap()
            .ends_with("-aarch64-linux/bin/narpost-hook"),
        "{builder}"
    );
    for (name, machine) in machines {
        assert_eq!(machine["failedAssertions"], json!([]), "{name}");
        assert_eq!(machine["substituters"], builder["substituters"], "{name}");
        assert_eq!(
            machine["trusted-public-keys"], builder["trusted-public-keys"],
            "{name}"
        );
        if name != "builder" {
            assert_eq!(machine["services"], json!([]), "{name}");
            assert_eq!(machine["hook"], Value::Null, "{name}");
        }
    }
}

/// flake.lock pins flake.nix's one input as Nix writes a lock (version 7): its `original` is
/// exactly the input's URL, so Nix takes the lock as it is instead of locking again, and the
/// pin is a full revision with a narHash.
#[test]
fn flake_lock_pins_the_nixpkgs_input_flake_nix_names() {
    let lock: Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(REPO).join("flake.lock")).unwrap())
            .unwrap();
    assert_eq!(lock["version"], json!(7));
    assert_eq!(
        lock["nodes"]["root"]["inputs"],
        json!({ "nixpkgs": "nixpkgs" })
    );
    let node = &lock["nodes"]["nixpkgs"];
    let original = &node["original"];
    let flake = std::fs::read_to_string(Path::new(REPO).join("flake.nix")).unwrap();
    let url = format!(
        "github:{}/{}/{}",
        original["owner"].as_str().unwrap(),
        original["repo"].as_str().unwrap(),
        original["ref"].as_str().unwrap()
    );
    assert!(
        flake.contains(&format!("inputs.nixpkgs.url = \"{url}\";")),
        "flake.nix's input is not {url}"
    );
    let locked = &node["locked"];
    let rev = locked["rev"].as_str().unwrap();
    assert!(
        rev.len() == 40 && rev.bytes().all(|b| b.is_ascii_hexdigit()),
        "{rev}"
    );
    let nar_hash = locked["narHash"].as_str().unwrap();
    assert!(
        nar_hash.starts_with("sha256-") && nar_hash.len() == 51,
        "{nar_hash}"
    );
    assert_eq!(locked["type"], original["type"]);
}
