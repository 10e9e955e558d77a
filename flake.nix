{
  description = "narpost: gets every Nix store path a machine builds into a binary cache";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      # The ARM nodes build too.
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      # What `narpost --version` names; a build has no .git to ask.
      commit = self.rev or self.dirtyRev or null;
    in
    {
      overlays.default = final: _prev: {
        narpost = final.callPackage ./nix/package.nix { inherit commit; };
      };

      packages = forAllSystems (pkgs: {
        narpost = pkgs.callPackage ./nix/package.nix { inherit commit; };
        default = self.packages.${pkgs.stdenv.hostPlatform.system}.narpost;
      });

      # services.narpost with this flake's package. It sets no nixpkgs.overlays, so it also
      # works where pkgs is given from outside (nixpkgs.pkgs with readOnlyPkgs).
      nixosModules.default =
        { lib, pkgs, ... }:
        {
          imports = [ ./nix/module.nix ];
          # Built by the configuration's own nixpkgs (its system, its settings), from this
          # flake's source, naming this flake's revision.
          services.narpost.package = lib.mkDefault (pkgs.callPackage ./nix/package.nix { inherit commit; });
        };
    };
}
