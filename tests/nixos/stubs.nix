# Stand-ins for what NixOS and nixpkgs would give nix/module.nix, nix/package.nix and
# flake.nix, for tests that have nixpkgs' lib and nothing else of nixpkgs.
#
# - `options`: the NixOS options the module sets, declared loosely (lists concatenate,
#   attribute sets merge, a scalar defined twice conflicts, as in NixOS; little is checked):
#   systemd.services, systemd.tmpfiles.rules, nix.settings, environment.etc,
#   environment.systemPackages, nixpkgs.overlays, warnings, assertions.
# - `pkgs`: a package set with only what the module and package use: callPackage,
#   formats.toml, rustPlatform.buildRustPackage (which returns a fake derivation keeping its
#   arguments), installShellFiles and stdenv's platforms. formats.toml's real `generate` is a
#   build running remarshal, which cannot run here, and nixpkgs' lib has no TOML writer (only
#   builtins.fromTOML), so `toTOML` is written here and every file it renders is checked
#   against builtins.fromTOML.
{ lib }:

let
  inherit (lib) mkOption types;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };

  bareKey = k: builtins.match "[A-Za-z0-9_-]+" k != null;
  key = k: if bareKey k then k else builtins.toJSON k;
  # JSON's string escapes (\" \\ \n \t \uXXXX ...) are all valid in a TOML basic string.
  scalar =
    v:
    if builtins.isString v then
      builtins.toJSON v
    else if builtins.isBool v then
      lib.boolToString v
    else if builtins.isInt v then
      toString v
    else if builtins.isFloat v then
      builtins.toJSON v
    else if builtins.isPath v then
      builtins.toJSON (toString v)
    else if builtins.isList v then
      "[ ${lib.concatMapStringsSep ", " scalar v} ]"
    else if builtins.isAttrs v then
      "{ ${lib.concatStringsSep ", " (lib.mapAttrsToList (k: x: "${key k} = ${scalar x}") v)} }"
    else
      throw "toTOML: cannot render ${builtins.typeOf v}";
  # Scalars and lists at the top; each attribute set below as a [table] of its own.
  toTOML =
    prefix: attrs:
    let
      tables = lib.filterAttrs (_: builtins.isAttrs) attrs;
      values = lib.filterAttrs (_: v: !builtins.isAttrs v && v != null) attrs;
      header = lib.optionalString (prefix != [ ]) "[${lib.concatMapStringsSep "." key prefix}]\n";
    in
    header
    + lib.concatStrings (lib.mapAttrsToList (k: v: "${key k} = ${scalar v}\n") values)
    + lib.concatStrings (lib.mapAttrsToList (k: v: "\n" + toTOML (prefix ++ [ k ]) v) tables);

  toml =
    { }:
    let
      valueType =
        types.nullOr (
          types.oneOf [
            types.bool
            types.int
            types.float
            types.str
            types.path
            (types.attrsOf valueType)
            (types.listOf valueType)
          ]
        )
        // {
          description = "TOML value";
        };
    in
    {
      type = types.attrsOf valueType;
      generate =
        name: value:
        let
          text = toTOML [ ] value;
        in
        if builtins.fromTOML text == lib.filterAttrs (_: v: v != null) value then
          builtins.toFile name text
        else
          throw "toTOML stand-in renders ${builtins.toJSON value} wrongly:\n${text}";
    };

  # A package set for `system`, extended by `overlays` as NixOS extends its pkgs.
  pkgsFor =
    {
      system,
      overlays ? [ ],
      extra ? { },
    }:
    lib.fix (
      lib.extends (lib.composeManyExtensions overlays) (
        final:
        {
          inherit lib;
          callPackage = lib.callPackageWith final;
          formats.toml = toml;
          stdenv = {
            hostPlatform.system = system;
            buildPlatform.system = system;
            buildPlatform.canExecute = platform: platform.system == system;
          };
          installShellFiles = fakePackage "install-shell-files";
          openssh = fakePackage "openssh-9.9p1";
          rustPlatform.buildRustPackage =
            args: fakePackage "${args.pname}-${args.version}-${system}" // { inherit args; };
        }
        // extra
      )
    );

  options =
    { ... }:
    {
      options = {
        systemd.services = mkOption {
          type = types.attrsOf (
            types.submodule {
              freeformType = types.attrsOf types.anything;
              options =
                lib.genAttrs
                  [
                    "after"
                    "wants"
                    "before"
                    "wantedBy"
                    "restartTriggers"
                  ]
                  (
                    _:
                    mkOption {
                      type = types.listOf types.anything;
                      default = [ ];
                    }
                  );
            }
          );
          default = { };
        };
        systemd.tmpfiles.rules = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        nix.settings = mkOption {
          type = types.attrsOf types.anything;
          default = { };
        };
        environment.etc = mkOption {
          type = types.attrsOf (
            types.submodule {
              options.source = mkOption { type = types.path; };
            }
          );
          default = { };
        };
        environment.systemPackages = mkOption {
          type = types.listOf types.package;
          default = [ ];
        };
        nixpkgs.overlays = mkOption {
          # As NixOS types it: types.anything would wrap each function in a merging one.
          type = types.listOf (
            lib.mkOptionType {
              name = "nixpkgs-overlay";
              check = lib.isFunction;
              merge = lib.mergeOneOption;
            }
          );
          default = [ ];
        };
        warnings = mkOption {
          type = types.listOf types.str;
          default = [ ];
        };
        assertions = mkOption {
          type = types.listOf types.attrs;
          default = [ ];
        };
      };
    };
in
{
  inherit fakePackage pkgsFor options;
}
