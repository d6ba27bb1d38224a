{
  description = "fleet: fleet management (an MDM) for NixOS on NATS JetStream";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

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

      # Only Go sources and the module files: editing docs or Nix files does
      # not rebuild the binaries.
      src = lib.fileset.toSource {
        root = ./.;
        fileset = lib.fileset.unions [
          ./go.mod
          ./go.sum
          (lib.fileset.fileFilter (f: f.hasExt "go") ./.)
        ];
      };

      mkFleet = pkgs: (buildGoModuleFor pkgs) {
        pname = "fleet";
        inherit version src;

        # The hash of the Go module dependencies: the NAR hash of what
        # `go mod vendor` writes. After changing go.mod/go.sum, update it:
        #   go mod vendor -o /tmp/v && nix hash path /tmp/v
        # (or run `nix build`, which prints the right one on a mismatch).
        vendorHash = "sha256-AES6sNFJQFbQiX6P8imTSFM8BOygp/xJ7yLhDw2T3yg=";

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
      # flake's build.
      withPackage = file: service: { lib, pkgs, ... }: {
        imports = [ file ];
        config.services.${service}.package =
          lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.fleet;
      };
    in
    {
      packages = forSystems allSystems (pkgs: rec {
        fleet = mkFleet pkgs;
        default = fleet;
      });

      overlays.default = final: prev: { fleet = mkFleet final; };

      nixosModules = {
        agent = withPackage ./nixos-modules/agent.nix "fleet-agent";
        coordinator = withPackage ./nixos-modules/coordinator.nix "fleet-coordinator";
        # The leaf runs pkgs.nats-server; it needs no fleet package.
        leaf = ./nixos-modules/leaf.nix;
        default = {
          imports = [ self.nixosModules.agent self.nixosModules.coordinator self.nixosModules.leaf ];
        };
      };

      checks = forSystems linuxSystems (pkgs: {
        package = self.packages.${pkgs.stdenv.hostPlatform.system}.fleet;

        # The Go unit tests that fit a build sandbox: not integration/,
        # nixtest/ and admin/ (they build and fetch with a real Nix store as
        # root; CI runs them). nix-instantiate evaluates agent-config.nix for
        # agent/nixmodule_test.go against a dummy store; broker/ starts its
        # own Prometheus.
        go-test = self.packages.${pkgs.stdenv.hostPlatform.system}.fleet.overrideAttrs (old: {
          pname = "fleet-go-test";
          # The tests also read nixos-modules/ (agent/nixmodule_test.go).
          src = lib.fileset.toSource {
            root = ./.;
            fileset = lib.fileset.unions [
              ./go.mod
              ./go.sum
              (lib.fileset.fileFilter (f: f.hasExt "go") ./.)
              ./nixos-modules
              ./grafana
              ./prometheus
            ];
          };
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
