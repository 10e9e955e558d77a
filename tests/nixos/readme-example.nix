# The flake README.md's NixOS section shows, evaluated: its outputs called with this
# repository's flake as the narpost input and a nixpkgs whose lib.nixosSystem is
# lib.evalModules over the stand-ins of stubs.nix (hardware-configuration.nix, which only the
# reader has, is left out). Returns what tests/e2e/nixos_module.rs checks of each machine.
{
  libPath ? null,
  # The file the example was written to, absolute.
  example,
}:

let
  lib = if libPath != null then import libPath else import <nixpkgs/lib>;
  stubs = import ./stubs.nix { inherit lib; };

  nixosSystem =
    { system, modules }:
    lib.evalModules {
      modules = [
        stubs.options
        (
          { config, ... }:
          {
            _module.args.pkgs = stubs.pkgsFor {
              inherit system;
              inherit (config.nixpkgs) overlays;
            };
          }
        )
      ]
      ++ lib.filter (m: !builtins.isPath m) modules;
    };
  nixpkgs = {
    lib = lib // {
      inherit nixosSystem;
    };
  };
  narpost = (import ../../flake.nix).outputs {
    self = narpost // {
      outPath = ../..;
    };
    nixpkgs = {
      inherit lib;
    };
  };

  outputs = (import (/. + example)).outputs {
    self = outputs;
    inherit nixpkgs narpost;
  };
in
lib.mapAttrs (
  _: machine:
  let
    c = machine.config;
  in
  {
    inherit (c.nix.settings) substituters trusted-public-keys;
    services = lib.attrNames c.systemd.services;
    serviceConfig = c.systemd.services.narpost.serviceConfig or null;
    configFile =
      if c.environment.etc ? "narpost/narpost.toml" then
        builtins.readFile c.environment.etc."narpost/narpost.toml".source
      else
        null;
    hook = c.nix.settings.post-build-hook or null;
    failedAssertions = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  }
) outputs.nixosConfigurations
