# services.narpost: the post-build-hook that queues what this machine builds, and the daemon
# that uploads the queue to a binary cache.
#
# The service below is written out here, not generated from systemd/narpost.service (a NixOS
# unit names its binary by store path and takes its settings as attributes). The two are kept
# in step by tests/nixos_module.rs, which evaluates this module and compares every [Unit],
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
  };
  finalSettings = cfg.settings // typed;
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

  # What the daemon opens itself, which the service's ProtectHome and PrivateTmp would hide
  # from it. (An EnvironmentFile is read by systemd, outside those.)
  daemonOpens = lib.filterAttrs (_: lib.isString) {
    secret-key-file = finalSettings.secret-key-file or null;
    token-file = finalSettings.token-file or null;
    basic-auth-file = finalSettings.basic-auth-file or null;
    "file:// cache" = fileCacheDir;
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
      default = pkgs.narpost;
      defaultText = lib.literalExpression "pkgs.narpost";
      description = "The narpost package (with the `narpost` overlay applied, `pkgs.narpost`).";
    };

    cache = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "s3://nix-cache?region=eu-central-1";
      description = ''
        The binary cache to upload to: `file:///dir`, `http(s)://host/path`,
        `s3://bucket[/prefix]?region=..&endpoint=..` or `attic+http(s)://host/CACHE`.
        `null` means narpost's default, `file:///var/lib/narpost/cache`.
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
      type = settingsFormat.type;
      default = { };
      example = {
        jobs = 4;
        compression-level = 9;
        drain-timeout = 60;
        http-timeout = 120;
      };
      description = ''
        narpost's config file (`/etc/narpost/narpost.toml`), any of its keys: `jobs`,
        `compression-level`, `drain-timeout`, `http-timeout`, `basic-auth-file`,
        `gc-roots-dir`, ... `cache`, `secretKeyFile` and `tokenFile`, when set, win over
        the same keys here.
      '';
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
    assertions = lib.mapAttrsToList (what: path: {
      assertion = hiddenBy path == null;
      message = "services.narpost: the ${what} ${path} is hidden from the daemon by its ${toString (hiddenBy path)}; keep it elsewhere, e.g. under /var/lib.";
    }) daemonOpens;

    warnings = lib.mapAttrsToList (
      key: value:
      "services.narpost.settings.${key} = ${builtins.toJSON value} is overridden by a typed services.narpost option (${builtins.toJSON typed.${key}})."
    ) (lib.filterAttrs (key: value: typed.${key} != value) (builtins.intersectAttrs typed cfg.settings));

    environment.etc.${configPath}.source = configFile;
    environment.systemPackages = [ cfg.package ];

    nix.settings = lib.mkIf cfg.hook.enable {
      post-build-hook = "${cfg.package}/bin/narpost-hook";
    };

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
      environment.NARPOST_STATE_DIR = stateDir;
      restartTriggers = [ configFile ];

      serviceConfig = {
        Type = "exec";
        ExecStart = "${cfg.package}/bin/narpost daemon";
        StateDirectory = "narpost";
        StateDirectoryMode = "0700";
        Restart = "on-failure";
        RestartSec = "5s";
        # SIGTERM lets uploads under way finish within drain-timeout (default 30 s).
        TimeoutStopSec = "45s";
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
      }
      // lib.optionalAttrs (cfg.environmentFile != null) {
        EnvironmentFile = cfg.environmentFile;
      };
    };
  };
}
