# flake.nix's outputs, called as Nix would call them, with a nixpkgs made of nixpkgs' lib and
# the stand-ins of stubs.nix; returns what tests/e2e/nixos_module.rs checks of the package.
{
  libPath ? null,
}:

let
  lib = if libPath != null then import libPath else import <nixpkgs/lib>;
  stubs = import ./stubs.nix { inherit lib; };
  systems = [
    "x86_64-linux"
    "aarch64-linux"
  ];
  nixpkgs = {
    inherit lib;
    legacyPackages = lib.genAttrs systems (system: stubs.pkgsFor { inherit system; });
  };
  flake = (import ../../flake.nix).outputs {
    self = flake // {
      outPath = ../..;
    };
    inherit nixpkgs;
  };
  # What buildRustPackage was given.
  describe =
    package:
    let
      args = package.args;
    in
    {
      inherit (package) name;
      inherit (args)
        pname
        version
        cargoTestFlags
        postInstall
        ;
      lockFile = toString args.cargoLock.lockFile;
      # Copied into the evaluation's store, as a build would see it.
      src = "${args.src}";
      nativeBuildInputs = map (p: p.name) args.nativeBuildInputs;
      meta = {
        inherit (args.meta) description mainProgram;
        platforms = lib.filter (p: lib.elem p systems) args.meta.platforms;
        license = args.meta.license.spdxId;
      };
    };
in
{
  packages = lib.mapAttrs (_: packages: lib.mapAttrs (_: describe) packages) flake.packages;
  overlay = describe (stubs.pkgsFor {
    system = "aarch64-linux";
    overlays = [ flake.overlays.default ];
  }).narpost;
  module =
    let
      m = flake.nixosModules.default {
        inherit lib;
        pkgs = stubs.pkgsFor { system = "x86_64-linux"; };
      };
    in
    {
      imports = map toString m.imports;
      # An overlay would clash with nixpkgs.pkgs and readOnlyPkgs.
      setsNixpkgs = m ? nixpkgs;
      package = m.services.narpost.package.content.name;
    };
}
