# services.fleet-agent: the fleet agent on a NixOS device.
#
# The agent keeps this machine on the generation its fleet coordinator wants
# (nix-env --set on the system profile, switch-to-configuration), runs the
# health checks below after each switch and rolls back when they fail.
#
# The config file is made by ./agent-config.nix (a pure function, tested
# against the agent's own parser by agent/nixmodule_test.go): every option
# below except enable, package, extraFlags, substituter and trustedPublicKeys
# (which go to nix.settings) is a setting of that file.
# Keep the option declarations in this layout (top-level options at 4
# spaces, health check options at 6): the test reads them from this source.
#
# The package defaults to pkgs.nixos-fleet, which only the flake's
# overlays.default provides (nixpkgs' own `fleet` is FleetDM, another
# program): without the overlay, evaluation stops with "nixos-fleet cannot
# be found in pkgs". The flake's nixosModules.agent sets it to the flake's
# own package.
{ config, lib, pkgs, utils, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;

  cfg = config.services.fleet-agent;
  agentConfig = import ./agent-config.nix;

  inherit (import ./types.nix { inherit lib; }) duration hostPath isDiskName;

  healthCheckModule = { name, ... }: {
    options = {
      name = mkOption {
        type = types.str;
        default = name;
        defaultText = literalExpression "<name>";
        description = "Name of the check, reported in events. Defaults to the attribute name.";
      };
      type = mkOption {
        type = types.enum [ "systemd" "http" "command" ];
        description = "systemd: the units are active; http: the URL answers with expectStatus; command: the command exits 0.";
      };
      units = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "nginx.service" ];
        description = "Units that must be active (type systemd).";
      };
      url = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "http://127.0.0.1:8080/healthz";
        description = "http(s) URL to GET (type http).";
      };
      expectStatus = mkOption {
        type = types.nullOr (types.ints.between 100 599);
        default = null;
        description = "Expected HTTP status (type http); null means the agent's default, 200.";
      };
      command = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = literalExpression ''[ "''${pkgs.curl}/bin/curl" "-fsS" "http://127.0.0.1/" ]'';
        description = "argv of a command run without a shell, as root (type command).";
      };
      timeout = mkOption {
        type = types.nullOr duration;
        default = null;
        example = "10s";
        description = "Bound on one attempt (Go duration); null means the agent's default, 10s.";
      };
      retries = mkOption {
        type = types.nullOr types.ints.unsigned;
        default = null;
        description = "Extra attempts after the first; null means the agent's default, 3.";
      };
      interval = mkOption {
        type = types.nullOr duration;
        default = null;
        example = "2s";
        description = "Pause between attempts (Go duration); null means the agent's default, 2s.";
      };
    };
  };

  # The settings agent-config.nix maps, straight from the options.
  settings = lib.genAttrs agentConfig.settingNames (n: cfg.${n}) // {
    healthChecks = lib.mapAttrsToList
      (_: hc: lib.genAttrs (builtins.attrNames agentConfig.checkKeys) (n: hc.${n}))
      cfg.healthChecks;
  };

  configFile = pkgs.writeText "fleet-agent.json" (builtins.toJSON (agentConfig settings));

  defaultStateDir = "/var/lib/fleet-agent";

  badDisks = builtins.filter (d: !isDiskName d) (builtins.attrNames cfg.recoveryKeys);
in
{
  options.services.fleet-agent = {
    enable = mkEnableOption "the fleet agent, which keeps this machine on the generation its fleet coordinator assigns";

    package = lib.mkPackageOption pkgs "nixos-fleet" {
      extraDescription = "Must provide bin/fleet-agent. Only fleet's overlays.default (or nixosModules.agent) provides pkgs.nixos-fleet.";
    };

    servers = mkOption {
      type = types.nonEmptyListOf types.str;
      example = [ "nats://fleet.example.org:4222" ];
      description = "Coordinator or leaf node URLs (flag --server). The agent only dials out.";
    };

    enrollmentTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/enroll-token";
      description = ''
        File holding an enrollment token (`fleet-admin token create`), used
        once, while the device has no credentials in stateDir. A path as a
        string on purpose: a Nix path literal would copy the token into the
        world-readable store. Put it on the machine at install time (see
        nixos-modules/README.md) or with a secrets tool (agenix, sops-nix).
      '';
    };

    releaseSigners = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "UABC...XYZ" ];
      description = ''
        Admin public keys (nkeys, `U...`) trusted to sign releases (flag
        --release-signer). Releases signed by anyone else are refused, so a
        compromised coordinator cannot make this machine run an arbitrary
        closure. With none, the agent applies no release.
      '';
    };

    healthChecks = mkOption {
      type = types.attrsOf (types.submodule healthCheckModule);
      default = { };
      example = literalExpression ''
        {
          nginx = { type = "systemd"; units = [ "nginx.service" ]; };
          app = { type = "http"; url = "http://127.0.0.1:8080/healthz"; retries = 5; };
        }
      '';
      description = "Checks run after each switch; a failing one rolls the machine back.";
    };

    healthDeadline = mkOption {
      type = types.nullOr duration;
      default = null;
      example = "5m";
      description = "Bound on all health checks of one apply together (Go duration); null means the agent's default.";
    };

    stateDir = mkOption {
      type = types.str;
      default = defaultStateDir;
      description = "Directory for the device's keys, credentials and apply state (flag --state-dir).";
    };

    hostname = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "Host name to enrol and select closures with; null means this host's own name.";
    };

    profile = mkOption {
      type = types.str;
      default = "/nix/var/nix/profiles/system";
      description = "System profile set on apply (flag --profile).";
    };

    currentSystem = mkOption {
      type = types.str;
      default = "/run/current-system";
      description = "Link to the running system (flag --current-system).";
    };

    bootedSystem = mkOption {
      type = types.str;
      default = "/run/booted-system";
      description = "Link to the booted system (flag --booted-system).";
    };

    factsInterval = mkOption {
      type = duration;
      default = "5m";
      description = "How often facts are reported (with jitter); also at once on a change of system, reboot need, encryption, last apply or mounts.";
    };

    reconnectWithin = mkOption {
      type = duration;
      default = "2m";
      description = "After a switch the agent must reach the coordinator again within this time, or it rolls back.";
    };

    applyTimeout = mkOption {
      type = duration;
      default = "30m";
      description = "Bound on fetching and switching one generation.";
    };

    recheck = mkOption {
      type = duration;
      default = "15m";
      description = "How often to re-read the desired state (with jitter), in case a change notification was lost.";
    };

    approvalPoll = mkOption {
      type = duration;
      default = "30s";
      description = "While the device waits for approval, how often to ask (with jitter).";
    };

    payloadDir = mkOption {
      type = hostPath;
      default = "/run/fleet/payloads";
      description = ''
        Where sealed payloads (`fleet-admin payload push`) are written, each
        file with the owner and mode it was pushed with (flag
        --payload-dir). The default is on tmpfs: opened payloads never reach
        the disk, and the agent fetches them again after a reboot. The
        module creates the directory at boot (systemd-tmpfiles, root, 0755),
        so it survives restarts of the agent and services can point at
        files in it.
      '';
    };

    recoveryKeys = mkOption {
      type = types.attrsOf hostPath;
      default = { };
      example = literalExpression ''
        {
          nvme0n1p2 = "/var/lib/fleet-agent/recovery-nvme0n1p2";
          sda1 = config.age.secrets.luks-recovery-sda1.path;
        }
      '';
      description = ''
        LUKS devices and their recovery key files, to escrow (flag
        --recovery-key DISK=FILE). The name is the device's kernel name as
        `lsblk` and the agent's facts show it (`nvme0n1p2`, not
        `/dev/nvme0n1p2`), so `fleet-admin escrow ls` matches it with the
        device's LUKS devices. The file holds the key, e.g. the output of
        `systemd-cryptenroll --recovery-key`; the agent (root) reads it,
        seals it to the escrow key and sends it again whenever it changes.
        Keep it root-only (0400) outside the Nix store: paths are strings,
        and store paths are refused.
      '';
    };

    escrowKey = mkOption {
      type = types.nullOr ((types.strMatching "X[A-Z2-7]{55}") // {
        description = "escrow public key (X..., 56 characters)";
      });
      default = null;
      example = "XDMN333ISMBVAKFHWQHHAUJ4G5ZOQZVG4SZLC2C25ENRXUOCPTCRIH7Q";
      description = ''
        Pin the escrow public key (`fleet-admin escrow init` prints it; flag
        --escrow-key). The agent learns the escrow key from the coordinator
        in a statement that must be signed by an admin in releaseSigners;
        with a pin, that statement must also name this key, so recovery
        keys are sealed to no other (a rotated key is refused until the pin
        is changed too). null: the signed statement decides.
      '';
    };

    logLevel = mkOption {
      type = types.enum [ "debug" "info" "warn" "error" ];
      default = "info";
      description = "Log level.";
    };

    logFormat = mkOption {
      type = types.enum [ "auto" "json" "console" ];
      default = "json";
      description = "Log format; journald keeps JSON lines as they are.";
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "--log-level=debug" ];
      description = "Extra arguments to `fleet-agent run`; they override the config file.";
    };

    substituter = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "https://cache.example.org";
      description = ''
        The fleet's binary cache, added to the host's substituters
        (nix.settings.extra-substituters). Releases that name no substituter
        are fetched with `nix-store --realise` from the host's substituters;
        releases that name one are copied from it. Either way the host's
        nix.conf decides which signatures it trusts: see trustedPublicKeys.
      '';
    };

    trustedPublicKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "fleet-cache-1:AbC...=" ];
      description = ''
        Public keys of the fleet's binary cache (nix.settings.
        extra-trusted-public-keys). A closure not signed by a trusted key is
        refused by Nix itself ("lacks a valid signature"), whatever a release
        says.
      '';
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = badDisks == [ ];
        message = "services.fleet-agent.recoveryKeys: ${lib.concatMapStringsSep ", " builtins.toJSON badDisks} ${if builtins.length badDisks == 1 then "is not a disk name" else "are not disk names"}; use the kernel name lsblk shows, without /dev/ (e.g. nvme0n1p2).";
      }
    ] ++ lib.flatten (lib.mapAttrsToList
      (key: hc: [
        {
          assertion = hc.type != "systemd" || hc.units != [ ];
          message = "services.fleet-agent.healthChecks.${key}: a systemd check needs units.";
        }
        {
          assertion = hc.type != "http" || (hc.url != null && builtins.match "https?://.+" hc.url != null);
          message = "services.fleet-agent.healthChecks.${key}: an http check needs an http(s) url.";
        }
        {
          assertion = hc.type != "command" || hc.command != [ ];
          message = "services.fleet-agent.healthChecks.${key}: a command check needs a command.";
        }
      ])
      cfg.healthChecks);

    warnings = lib.optional (cfg.releaseSigners == [ ])
      "services.fleet-agent.releaseSigners is empty: the agent will refuse every release.";

    environment.systemPackages = [ cfg.package ];

    nix.settings.extra-substituters = lib.optional (cfg.substituter != null) cfg.substituter;
    nix.settings.extra-trusted-public-keys = cfg.trustedPublicKeys;

    # The payload dir: created at boot with "d" (never "D", which would
    # empty it at every switch, when systemd-tmpfiles-resetup runs with
    # --remove), not as a RuntimeDirectory, which systemd removes whenever
    # the unit stops. The agent writes it as root, and the unit has no
    # ProtectSystem, so it needs no ReadWritePaths (see below).
    systemd.tmpfiles.rules = lib.optional (cfg.stateDir != defaultStateDir)
      "d ${cfg.stateDir} 0700 root root - -"
    ++ [ "d ${cfg.payloadDir} 0755 root root - -" ];

    systemd.services.fleet-agent = {
      description = "fleet agent";
      documentation = [ "https://github.com/fleet/fleet/tree/main/nixos-modules" ];
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];

      # The agent runs switch-to-configuration itself: the switch must not
      # stop or restart the unit it runs in, or it would kill itself half
      # way through. A new agent package takes effect at the next restart
      # of the unit (reboot, or `systemctl restart fleet-agent`).
      restartIfChanged = false;
      stopIfChanged = false;

      # nix-env, nix-store and `nix copy` for fetching and applying;
      # systemctl for systemd health checks; the running system's tools for
      # command health checks given by name.
      path = [ config.nix.package config.systemd.package "/run/current-system/sw" ];

      # Never give up: a device that cannot reach its coordinator keeps
      # trying, with the backoff below.
      unitConfig.StartLimitIntervalSec = 0;

      serviceConfig = {
        Type = "simple";
        ExecStart = utils.escapeSystemdExecArgs ([
          "${cfg.package}/bin/fleet-agent"
          "run"
          "--config"
          "${configFile}"
        ] ++ cfg.extraFlags);
        Restart = "always";
        RestartSec = "5s";
        # Exponential backoff from 5s up to 5min (systemd >= 254).
        RestartSteps = 10;
        RestartMaxDelaySec = "5min";

        User = "root";
        StateDirectory = mkIf (cfg.stateDir == defaultStateDir) "fleet-agent";
        StateDirectoryMode = "0700";

        # Hardening, and why there is so little of it.
        #
        # The agent is root on purpose: it sets the system profile and runs
        # switch-to-configuration, whose activation runs whatever the
        # (signed) new configuration holds: it writes /etc, /boot (boot
        # loader), /var, creates users and their homes under /home, sets up
        # setuid wrappers, loads kernel modules, sets the host name, remounts
        # special file systems and talks to PID 1. Anything that restricts
        # the agent restricts every activation it runs, so:
        # - no ProtectSystem (strict or full): /etc, /boot and /usr must stay
        #   writable for activation and the boot loader installer;
        # - no ProtectHome: activation creates new users' homes;
        # - no PrivateTmp, PrivateDevices, ProtectKernel*, ReadWritePaths or
        #   any option that gives the unit its own mount namespace: mounts
        #   and remounts made by activation would stay inside it (systemd
        #   makes it a slave namespace) instead of reaching the host;
        # - no NoNewPrivileges: a root process with all capabilities gains
        #   little from it, while activation scripts and boot loader
        #   installers may exec setuid/file-capability or SELinux/AppArmor-
        #   transitioning programs, which it would silently neuter;
        # - no RestrictSUIDSGID: activation creates the setuid wrappers;
        # - no SystemCallFilter, RestrictAddressFamilies, RestrictNamespaces,
        #   MemoryDenyWriteExecute, ProtectHostname, ProtectClock: each
        #   breaks some activation (kexec and reboot, netlink, containers,
        #   JITs, networking.hostName changes, time settings).
        # What protects the machine instead: releases must be signed by a
        # key in releaseSigners, and Nix verifies each closure against the
        # host's trusted-public-keys.
        #
        # What is safe: the state directory is private (above) and the
        # agent's files are created private; but activation inherits the
        # umask, so keep the usual 0022 for it (a 0077 umask would make
        # directories created by activation unreadable to services).
        UMask = "0022";
        LockPersonality = true;
        RestrictRealtime = true;
        # Real-time scheduling and personality changes are not used by
        # activation; everything else stays as the host has it.
      };
    };
  };
}
