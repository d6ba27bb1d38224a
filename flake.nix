{
  description = "fleet: fleet management (an MDM) for NixOS on NATS JetStream";

  # Pinned in flake.lock (a nixos-25.11 revision). Evaluates with Nix 2.8 or
  # newer: no lib.fileset (Nix >= 2.14 in pure mode), modules wrapped in
  # attribute sets.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs = { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      linuxSystems = [ "x86_64-linux" "aarch64-linux" ];
      allSystems = linuxSystems ++ [ "x86_64-darwin" "aarch64-darwin" ];
      forSystems = systems: f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      version = self.shortRev or self.dirtyShortRev or "dev";

      # go.mod says go 1.26: use a Go 1.26 builder where nixpkgs has one by
      # name, else nixpkgs' default Go (which must then be >= 1.26).
      goFor = pkgs: pkgs.go_1_26 or pkgs.go;
      buildGoModuleFor = pkgs: pkgs.buildGo126Module or pkgs.buildGoModule;

      # A copy of the repository with only the files `keep` accepts (and the
      # directories on the way to them). lib.cleanSourceWith is builtins.path
      # with a filter, which pure evaluation accepts on every Nix with
      # flakes; lib.fileset needs Nix >= 2.14 there.
      sourceOf = name: keep: lib.cleanSourceWith {
        inherit name;
        src = ./.;
        filter = path: type:
          let rel = lib.removePrefix (toString ./. + "/") (toString path);
          in (type == "directory" && baseNameOf path != ".git") || keep rel;
      };
      isGo = rel: lib.hasSuffix ".go" rel || rel == "go.mod" || rel == "go.sum";
      under = dirs: rel: lib.any (d: lib.hasPrefix "${d}/" rel) dirs;

      # Only Go sources and the module files: editing docs or Nix files does
      # not rebuild the binaries.
      src = sourceOf "fleet-src" isGo;

      mkFleet = pkgs: (buildGoModuleFor pkgs) {
        pname = "nixos-fleet";
        inherit version src;

        # The hash of the Go module dependencies: the NAR hash of what
        # `go mod vendor` writes. After changing go.mod/go.sum, update it:
        #   go mod vendor -o /tmp/v && nix hash path /tmp/v
        # (or run `nix build`, which prints the right one on a mismatch).
        vendorHash = "sha256-q/CueTWojPm8CSq3NeY9QKF7e5O2NvCCDtj1cuNFTlY=";

        subPackages = [ "cmd/fleet-coordinator" "cmd/fleet-agent" "cmd/fleet-admin" ];
        env.CGO_ENABLED = 0;
        ldflags = [
          "-s"
          "-w"
          "-X fleet/broker.Version=${version}"
          "-X fleet/agent.Version=${version}"
          "-X fleet/admin.Version=${version}"
        ];
        # Unit tests run in checks.<system>.go-test.
        doCheck = false;

        meta = {
          description = "Fleet management for NixOS: coordinator, agent and admin CLI";
          mainProgram = "fleet-admin";
          platforms = lib.platforms.linux ++ lib.platforms.darwin;
        };
      };

      # A module of ./nixos-modules with its package defaulting to this
      # flake's build. The package is called nixos-fleet: nixpkgs' `fleet`
      # is FleetDM, another program.
      withPackage = file: service: { lib, pkgs, ... }: {
        imports = [ file ];
        config.services.${service}.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-fleet;
      };
    in
    {
      packages = forSystems allSystems (pkgs: rec {
        nixos-fleet = mkFleet pkgs;
        default = nixos-fleet;
      });

      # Adds pkgs.nixos-fleet, the modules' default package. It replaces no
      # nixpkgs package (pkgs.fleet stays FleetDM's).
      overlays.default = final: prev: { nixos-fleet = mkFleet final; };

      nixosModules = {
        agent = withPackage ./nixos-modules/agent.nix "fleet-agent";
        coordinator = withPackage ./nixos-modules/coordinator.nix "fleet-coordinator";
        # The leaf runs pkgs.nats-server; it needs no fleet package. A module
        # given as a path is refused by `nix flake check` of older Nix
        # ("module must be a function or an attribute set"): wrap it.
        leaf = { imports = [ ./nixos-modules/leaf.nix ]; };
        default = {
          imports = [ self.nixosModules.agent self.nixosModules.coordinator self.nixosModules.leaf ];
        };
      };

      checks = forSystems linuxSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-fleet;

        # The Go unit tests that fit a build sandbox: not integration/,
        # nixtest/ and admin/ (they build and fetch with a real Nix store as
        # root; CI runs them). nix-instantiate evaluates agent-config.nix for
        # agent/nixmodule_test.go against a dummy store; broker/ starts its
        # own Prometheus.
        go-test = self.packages.${pkgs.stdenv.hostPlatform.system}.nixos-fleet.overrideAttrs (old: {
          pname = "fleet-go-test";
          # The tests also read nixos-modules/ (agent/nixmodule_test.go).
          src = sourceOf "fleet-test-src" (rel: isGo rel || under [ "nixos-modules" "grafana" "prometheus" ] rel);
          nativeCheckInputs = (old.nativeCheckInputs or [ ]) ++ [ pkgs.nix pkgs.prometheus ];
          doCheck = true;
          checkPhase = ''
            runHook preCheck
            export HOME=$TMPDIR
            export NIX_CONFIG="store = dummy://"
            go test -count=1 $(go list ./... | grep -v -e /integration -e /nixtest -e /admin)
            runHook postCheck
          '';
          installPhase = "touch $out";
          doInstallCheck = false;
        });

        vm-test = import ./nixos-modules/tests/fleet.nix { inherit pkgs self; };
      });

      devShells = forSystems allSystems (pkgs: {
        default = pkgs.mkShell {
          packages = [ (goFor pkgs) pkgs.nats-server pkgs.natscli pkgs.nix pkgs.jq ];
        };
      });

      formatter = forSystems allSystems (pkgs: pkgs.nixpkgs-fmt);
    };
}
