# narpost built from this repository by nixpkgs' rustPlatform: both binaries, the systemd
# unit, shell completions and man pages. flake.nix adds it to pkgs through its overlay.
{
  lib,
  stdenv,
  rustPlatform,
  installShellFiles,
  # The revision `narpost --version` names (the flake passes its own); null: "unknown".
  commit ? null,
}:

let
  manifest = (lib.importTOML ../Cargo.toml).package;
in
rustPlatform.buildRustPackage {
  pname = manifest.name;
  inherit (manifest) version;

  # What cargo needs to build (Cargo.toml declares the benches), the fixtures the unit tests
  # of the check phase read, and the unit to install; not the other tests, nor the target/
  # of a local checkout.
  src = lib.cleanSourceWith {
    name = "narpost-source";
    src = ../.;
    filter =
      path: _type:
      let
        relative = lib.removePrefix (toString ../. + "/") (toString path);
      in
      lib.elem relative [
        "Cargo.toml"
        "Cargo.lock"
        "build.rs"
      ]
      || lib.any (dir: relative == dir || lib.hasPrefix "${dir}/" relative) [
        "src"
        "benches"
        "systemd"
        "tests/fixtures"
      ]
      # The directories on the way to tests/fixtures, for the filter to descend into.
      || relative == "tests";
  };
  cargoLock.lockFile = ../Cargo.lock;

  env = lib.optionalAttrs (commit != null) { NARPOST_GIT_COMMIT = commit; };

  nativeBuildInputs = [ installShellFiles ];

  # Only the unit tests: the others run the real Nix as root, build into /nix/store, and
  # start servers, none of which the build sandbox has.
  cargoTestFlags = [ "--lib" ];

  postInstall = ''
    install -Dm644 systemd/narpost.service $out/lib/systemd/system/narpost.service
    substituteInPlace $out/lib/systemd/system/narpost.service \
      --replace-fail /usr/local/bin/narpost $out/bin/narpost
  ''
  # Completions and man pages come from the binary itself, which a cross build cannot run.
  + lib.optionalString (stdenv.buildPlatform.canExecute stdenv.hostPlatform) ''
    installShellCompletion --cmd narpost \
      --bash <($out/bin/narpost completions bash) \
      --zsh <($out/bin/narpost completions zsh) \
      --fish <($out/bin/narpost completions fish)
    $out/bin/narpost man --out man
    installManPage man/*.1
  '';

  meta = {
    description = "Uploads every Nix store path a machine builds to a binary cache, signed, without slowing down or failing a build";
    license = lib.licenses.mit;
    mainProgram = "narpost";
    platforms = lib.platforms.linux;
  };
}
