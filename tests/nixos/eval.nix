# Evaluates nix/module.nix (or the flake's nixosModules.default) with nixpkgs' real module
# system, lib.evalModules, over the stand-ins of stubs.nix, and returns what it defines, for
# tests/e2e/nixos_module.rs.
{
  # nixpkgs' lib directory; null: <nixpkgs/lib> from NIX_PATH.
  libPath ? null,
  # { definitions = [ config... ]; viaFlake = bool; } as JSON.
  caseJson,
}:

let
  lib = if libPath != null then import libPath else import <nixpkgs/lib>;
  stubs = import ./stubs.nix { inherit lib; };
  case = builtins.fromJSON caseJson;
  viaFlake = case.viaFlake or false;

  flake = (import ../../flake.nix).outputs {
    self = flake // {
      outPath = ../..;
    };
    nixpkgs = {
      inherit lib;
      legacyPackages = lib.genAttrs [ "x86_64-linux" "aarch64-linux" ] (
        system: stubs.pkgsFor { inherit system; }
      );
    };
  };

  evaluated = lib.evalModules {
    modules = [
      stubs.options
      (if viaFlake then flake.nixosModules.default else ../../nix/module.nix)
      (
        { config, ... }:
        {
          # As NixOS makes pkgs: nixpkgs extended by nixpkgs.overlays.
          _module.args.pkgs = stubs.pkgsFor {
            system = "x86_64-linux";
            inherit (config.nixpkgs) overlays;
            extra = lib.optionalAttrs (!viaFlake) { narpost = stubs.fakePackage "narpost-0.1.0"; };
          };
        }
      )
    ]
    ++ map (definition: { config = definition; }) case.definitions;
  };
  c = evaluated.config;
in
{
  inherit (c) nix warnings;
  systemd = {
    inherit (c.systemd) tmpfiles;
    services = lib.mapAttrs (
      _: service:
      service
      // lib.optionalAttrs (service ? path) { path = map (p: p.outPath) service.path; }
    ) c.systemd.services;
  };
  environment = {
    systemPackages = map (p: p.outPath) c.environment.systemPackages;
    etc = lib.mapAttrs (_: e: {
      source = e.source;
      text = builtins.readFile e.source;
    }) c.environment.etc;
  };
  failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  packageOutPath = c.services.narpost.package.outPath;
  # The keys services.narpost.settings declares.
  settingKeys = lib.filter (k: !lib.hasPrefix "_" k) (
    lib.attrNames (evaluated.options.services.narpost.settings.type.getSubOptions [ ])
  );
}
