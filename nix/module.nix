# services.narpost: the post-build-hook that queues what this machine builds, and the daemon
# that uploads the queue to a binary cache.
#
# The service below is written out here, not generated from systemd/narpost.service (a NixOS
# unit names its binary by store path and takes its settings as attributes). The two are kept
# in step by tests/e2e/nixos_module.rs, which evaluates this module and compares every [Unit],
# [Service] and [Install] setting of the result with the unit file's: a setting added to one
# and not the other fails it.
{
  config,
  lib,
  pkgs,
  ...
}:

let
  cfg = config.services.narpost;
  inherit (lib) mkOption types;

  # narpost's defaults (src/config.rs); the hook, the daemon and `narpost status` all find
  # the config file at this path without being told.
  stateDir = "/var/lib/narpost";
  configPath = "narpost/narpost.toml";
  defaultGcRootsDir = "/nix/var/nix/gcroots/narpost";

  settingsFormat = pkgs.formats.toml { };

  # Every key of narpost's config file (src/config.rs FileConfig, which refuses any other;
  # tests/e2e/nixos_module.rs keeps the two lists equal), typed as narpost reads it.
  setting =
    type: description:
    mkOption {
      type = types.nullOr type;
      default = null;
      inherit description;
    };
  absolutePath = types.addCheck types.str (lib.hasPrefix "/") // {
    name = "absolutePath";
    description = "absolute path";
  };
  seconds = types.ints.unsigned;
  settingOptions = {
    cache = setting cacheUrlType "The cache to upload to (see services.narpost.cache).";
    secret-key-file = setting secretPath "The signing key (see services.narpost.secretKeyFile).";
    token-file = setting secretPath "A bearer token for HTTP caches and Attic.";
    basic-auth-file = setting secretPath "`user:password` for an HTTP cache behind basic auth.";
    jobs = setting types.ints.positive "Paths prepared and uploaded at once; default: the number of cores.";
    compression-level = setting (types.ints.between 1 19) "zstd level; default 3.";
    gc-roots-dir = setting absolutePath "Where queued paths get their GC roots.";
    drain-timeout = setting seconds "Seconds uploads under way may take after SIGTERM; default 30.";
    io-timeout = setting seconds "Seconds an HTTP, Attic or ssh connection may make no progress; default 60.";
    http-timeout = setting seconds "The older name of `io-timeout`.";
    retry-timeout = setting seconds "Seconds `narpost push` retries a failing cache; default 120.";
    upstream-keys = setting (types.listOf types.str) "Paths signed by these keys are left to upstream; default `[ \"cache.nixos.org-1\" ]`.";
    upload-logs = setting types.bool "Upload build logs where the cache has room; default true.";
    max-log-size = setting types.ints.unsigned "Largest build log uploaded, in bytes; default 16 MiB.";
    priority = setting (types.enum [
      "idle"
      "normal"
    ]) "`idle` (the daemon's default) or `normal`.";
    metrics-listen = setting types.str "Where to serve Prometheus metrics, e.g. `127.0.0.1:9464`; default off.";
    substituter-listen = setting types.str "Where the daemon serves the cache to this machine's Nix (see services.narpost.substituter); default off.";
    machine = setting (types.strMatching "[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}") "This machine's name in build claims; default: its /etc/machine-id.";
    claim-timeout = setting types.ints.positive "Seconds a build claim may go without a heartbeat before other machines build the path themselves; default 60.";
  };

  # The cache URL schemes narpost knows (src/target/mod.rs from_config).
  cacheSchemes = [
    "file://"
    "http://"
    "https://"
    "s3://"
    "attic+http://"
    "attic+https://"
    "ssh://"
  ];
  cacheUrlType = types.addCheck types.str (u: lib.any (p: lib.hasPrefix p u) cacheSchemes) // {
    name = "cacheUrl";
    description = "cache URL (${lib.concatStringsSep ", " (map (p: "${p}...") cacheSchemes)})";
  };

  # A secret is named by a path string and read by narpost at run time. A Nix path (./key)
  # or a string that refers to one would copy the key into the world-readable store.
  secretPath =
    types.nullOr (
      types.addCheck types.str (
        s: lib.hasPrefix "/" s && !lib.hasPrefix "${builtins.storeDir}/" s && !builtins.hasContext s
      )
      // {
        name = "secretPath";
        description = "absolute path outside the Nix store, as a string";
      }
    );

  # What the typed options say, in the config file's keys; they win over `settings`.
  typed = lib.filterAttrs (_: v: v != null) {
    cache = cfg.cache;
    secret-key-file = cfg.secretKeyFile;
    token-file = cfg.tokenFile;
    substituter-listen = if cfg.substituter.enable then substituterAddress else null;
  };
  substituterAddress = "127.0.0.1:${toString cfg.substituter.port}";
  givenSettings = lib.filterAttrs (_: v: v != null) cfg.settings;
  finalSettings = givenSettings // typed;
  configFile = settingsFormat.generate "narpost.toml" finalSettings;

  # A file:// cache is a directory the daemon writes, outside what ProtectSystem=strict
  # leaves writable.
  cacheUrl = finalSettings.cache or null;
  fileCacheDir =
    if lib.isString cacheUrl && lib.hasPrefix "file://" cacheUrl then
      lib.head (lib.splitString "?" (lib.removePrefix "file://" cacheUrl))
    else
      null;
  gcRootsDir = finalSettings.gc-roots-dir or defaultGcRootsDir;
  drainTimeout = finalSettings.drain-timeout or 30;

  # An ssh:// cache runs ssh, which the unit's PATH must hold; its key is a file the daemon
  # (ssh) opens itself.
  isSsh = lib.isString cacheUrl && lib.hasPrefix "ssh://" cacheUrl;
  urlParams =
    url:
    let
      query = lib.concatStringsSep "?" (lib.drop 1 (lib.splitString "?" url));
      pairs = lib.filter (p: p != "") (lib.splitString "&" query);
    in
    lib.listToAttrs (
      map (
        p:
        let
          kv = lib.splitString "=" p;
        in
        lib.nameValuePair (lib.head kv) (lib.concatStringsSep "=" (lib.drop 1 kv))
      ) pairs
    );
  sshKey = if isSsh then (urlParams cacheUrl).ssh-key or null else null;

  # Secrets systemd hands the daemon itself (LoadCredential): read outside the sandbox, so
  # they may live anywhere root can read, and the daemon reads its copy.
  credentials = lib.filterAttrs (_: v: v.path != null) {
    secret-key = {
      path = finalSettings.secret-key-file or null;
      env = "NARPOST_KEY_FILE";
    };
    token = {
      path = finalSettings.token-file or null;
      env = "NARPOST_TOKEN_FILE";
    };
    basic-auth = {
      path = finalSettings.basic-auth-file or null;
      env = "NARPOST_BASIC_AUTH_FILE";
    };
  };

  # What the daemon opens itself, which the service's ProtectHome and PrivateTmp would hide
  # from it. (An EnvironmentFile is read by systemd, outside those.)
  daemonOpens = lib.filterAttrs (_: lib.isString) {
    "file:// cache" = fileCacheDir;
    "ssh-key" = sshKey;
  };
  hiddenBy =
    path:
    let
      under = dir: path == dir || lib.hasPrefix "${dir}/" path;
    in
    if lib.any under [ "/home" "/root" "/run/user" ] then
      "ProtectHome=true"
    else if lib.any under [ "/tmp" "/var/tmp" ] then
      "PrivateTmp=true"
    else
      null;
  # systemd/narpost.service's ReadWritePaths, then what this configuration adds.
  readWritePaths = [
    stateDir
    "/nix/var/nix/gcroots"
    "/nix/var/nix/db"
  ]
  ++ lib.optional (!lib.hasPrefix "/nix/var/nix/gcroots/" gcRootsDir) gcRootsDir
  ++ lib.optional (fileCacheDir != null && !lib.hasPrefix "${stateDir}/" fileCacheDir) fileCacheDir;
in
{
  options.services.narpost = {
    enable = lib.mkEnableOption "narpost, which uploads every store path this machine builds to a binary cache";

    package = mkOption {
      type = types.package;
      default = pkgs.callPackage ./package.nix { };
      defaultText = lib.literalExpression "pkgs.callPackage ./package.nix { }";
      description = "The narpost package: by default built from this repository with the configuration's own nixpkgs (the flake's module sets the flake's package).";
    };

    cache = mkOption {
      type = types.nullOr cacheUrlType;
      default = null;
      example = "s3://nix-cache?region=eu-central-1";
      description = ''
        The binary cache to upload to: `file:///dir`, `http(s)://host/path`,
        `s3://bucket[/prefix]?region=..&endpoint=..`, `attic+http(s)://host/CACHE`, or
        `ssh://[user@]host?ssh-key=/path` for a host that serves its own store (nix-serve,
        harmonia). Required (here or as `settings.cache`): a daemon without one would
        upload to a directory on this machine that nothing serves. For a cache on this
        machine, say so: `file:///var/lib/narpost/cache`.

        With `ssh://`, `openssh` is put on the daemon's PATH. The daemon runs with
        `ProtectHome`, so neither `/root/.ssh/known_hosts` nor `/root/.ssh/config` is seen:
        pin the host key with `base64-ssh-public-host-key=` in the URL, or declare it in
        `programs.ssh.knownHosts` (`/etc/ssh/ssh_known_hosts`), and keep the `ssh-key=`
        file outside `/root` and `/home` (e.g. `/var/lib/narpost-keys/ssh_key`).
      '';
    };

    secretKeyFile = mkOption {
      type = secretPath;
      default = null;
      example = "/var/lib/narpost-keys/cache.example.org-1.sec";
      description = ''
        The signing key (`narpost keygen` or `nix-store --generate-binary-cache-key`
        format), mode 0600, owned by root. Only its path is written to the configuration; the
        module never reads it, so the key stays out of the Nix store. `null` means the key
        narpost generates on first start, `/var/lib/narpost/signing.sec` (its public key is in
        `/var/lib/narpost/signing.pub` and in `narpost status`).
      '';
    };

    tokenFile = mkOption {
      type = secretPath;
      default = null;
      description = "File holding a bearer token for an HTTP cache or an Attic server.";
    };

    environmentFile = mkOption {
      type = secretPath;
      default = null;
      example = "/run/secrets/narpost.env";
      description = ''
        A systemd `EnvironmentFile` for the daemon, e.g. `AWS_ACCESS_KEY_ID=...` and
        `AWS_SECRET_ACCESS_KEY=...` for an S3 cache.
      '';
    };

    settings = mkOption {
      type = types.submodule { options = settingOptions; };
      default = { };
      example = {
        jobs = 4;
        compression-level = 9;
        drain-timeout = 60;
        io-timeout = 120;
      };
      description = ''
        narpost's config file (`/etc/narpost/narpost.toml`): each key narpost's loader
        knows, typed as narpost reads it, so a misspelt key or a value of the wrong type
        fails the evaluation instead of the daemon. `cache`, `secretKeyFile` and
        `tokenFile`, when set, win over the same keys here.
      '';
    };

    substituter.enable = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Serve the cache to this machine's Nix through the daemon, at
        `http://127.0.0.1:''${port}`, listed first in `nix.settings.substituters`. Nix then
        reads the cache with narpost's credentials (an S3 bucket, a token-protected cache)
        and needs none of its own; a cache that cannot be reached is a miss, so Nix builds
        instead of failing. The paths still need `trusted-public-keys` for their signers.
      '';
    };

    substituter.port = mkOption {
      type = types.port;
      default = 37515;
      description = "The loopback port of the local substituter.";
    };

    hook.enable = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Set `nix.settings.post-build-hook` to `narpost-hook`, which queues every path this
        machine builds for the daemon. Turn it off to queue paths some other way (or to run a
        hook of your own that calls it).
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cacheUrl != null;
        message = "services.narpost.cache is not set: name the binary cache to upload to (for one on this machine, file:///var/lib/narpost/cache).";
      }
    ]
    ++ lib.mapAttrsToList (what: path: {
      assertion = hiddenBy path == null;
      message = "services.narpost: the ${what} ${path} is hidden from the daemon by its ${toString (hiddenBy path)}; keep it elsewhere, e.g. under /var/lib.";
    }) daemonOpens;

    warnings = lib.mapAttrsToList (
      key: value:
      "services.narpost.settings.${key} = ${builtins.toJSON value} is overridden by a typed services.narpost option (${builtins.toJSON typed.${key}})."
    ) (lib.filterAttrs (key: value: typed.${key} != value) (builtins.intersectAttrs typed givenSettings));

    environment.etc.${configPath}.source = configFile;
    environment.systemPackages = [ cfg.package ];

    nix.settings = lib.mkMerge [
      (lib.mkIf cfg.hook.enable {
        post-build-hook = "${cfg.package}/bin/narpost-hook";
      })
      (lib.mkIf cfg.substituter.enable {
        substituters = lib.mkBefore [ "http://${substituterAddress}" ];
      })
    ];

    # ReadWritePaths needs its directories to exist before the daemon starts.
    systemd.tmpfiles.rules =
      lib.optional (fileCacheDir != null) "d ${fileCacheDir} 0755 root root -"
      ++ lib.optional (!lib.hasPrefix "/nix/var/nix/gcroots/" gcRootsDir) "d ${gcRootsDir} 0755 root root -";

    systemd.services.narpost = {
      description = "narpost: upload built Nix store paths to the binary cache";
      after = [
        "network-online.target"
        "nix-daemon.service"
      ];
      wants = [ "network-online.target" ];
      # At start the daemon gives every queued path its GC root back; a garbage collection
      # at boot (nix-gc.service with Persistent=true) should come after that.
      before = [ "nix-gc.service" ];
      wantedBy = [ "multi-user.target" ];
      environment = {
        NARPOST_STATE_DIR = stateDir;
      }
      // lib.mapAttrs' (name: c: lib.nameValuePair c.env "%d/${name}") credentials;
      path = lib.optional isSsh pkgs.openssh;
      restartTriggers = [ configFile ];

      serviceConfig = {
        Type = "exec";
        ExecStart = "${cfg.package}/bin/narpost daemon";
        StateDirectory = "narpost";
        StateDirectoryMode = "0700";
        Restart = "on-failure";
        RestartSec = "5s";
        # SIGTERM lets uploads under way finish within drain-timeout (default 30 s), and
        # the daemon a little more to write its state and exit.
        TimeoutStopSec = "${toString (drainTimeout + 15)}s";
        KillSignal = "SIGTERM";

        # Uploads never slow a build: the cgroup weight decides the CPU share ("idle" needs
        # systemd 252; older systemd rejects it with a warning and keeps the weight before
        # it), nice and the I/O class cover kernels without the cpu controller.
        CPUWeight = [
          "1"
          "idle"
        ];
        Nice = "19";
        IOSchedulingClass = "idle";
        IOWeight = "1";

        # Reads the store and its database, writes only its state, its GC roots and a
        # file:// cache. The database directory stays writable because SQLite readers of a
        # WAL database map its `-shm` file.
        ProtectSystem = "strict";
        ReadWritePaths = readWritePaths;
        ReadOnlyPaths = "/nix/store";
        ProtectHome = "true";
        PrivateTmp = "true";
        PrivateDevices = "true";
        ProtectKernelTunables = "true";
        ProtectKernelModules = "true";
        ProtectControlGroups = "true";
        NoNewPrivileges = "true";
        RestrictSUIDSGID = "true";
        LockPersonality = "true";
        RestrictRealtime = "true";
        RestrictAddressFamilies = "AF_UNIX AF_INET AF_INET6";
        RestrictNamespaces = "true";
        ProtectClock = "true";
        ProtectHostname = "true";
        ProtectKernelLogs = "true";
        MemoryDenyWriteExecute = "true";
        SystemCallArchitectures = "native";
        UMask = "0077";
        # Root without root's powers (see systemd/narpost.service).
        CapabilityBoundingSet = "CAP_SYS_NICE";
        SystemCallFilter = "@system-service";
        SystemCallErrorNumber = "EPERM";
        ProtectProc = "invisible";
        ProcSubset = "pid";
        RemoveIPC = "true";
        PrivateMounts = "true";
      }
      // lib.optionalAttrs (cfg.environmentFile != null) {
        EnvironmentFile = cfg.environmentFile;
      }
      // lib.optionalAttrs (credentials != { }) {
        LoadCredential = lib.mapAttrsToList (name: c: "${name}:${c.path}") credentials;
      };
    };
  };
}
