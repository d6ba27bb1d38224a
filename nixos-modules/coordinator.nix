# services.fleet-coordinator: the fleet's coordinator (an embedded NATS
# JetStream server with the fleet's services), as a hardened system service
# with its own user.
#
# The config file is made by ./coordinator-config.nix (pure, builtins only)
# and passed with `fleet-coordinator run --config`; its keys are the flags of
# `fleet-coordinator run` (broker/cli.go).
#
# Clustering: run this module on three hosts with the same clusterName,
# each with its own serverName, clusterListen set, routes naming the other
# two (nats-route://host:port) and replicas = 3 (the default once
# clusterListen is set). All three share one identity: initialise one data
# dir (`fleet-coordinator init`), then copy its operator.jwt, keys/, jwt/ and
# admin.creds (not jetstream/) into the others' dataDir before their first
# start, or run `fleet-coordinator init --from DIR` there. openFirewall opens
# the cluster port too.
#
# The package defaults to pkgs.nixos-fleet (the flake's overlays.default;
# nixpkgs' own `fleet` is FleetDM, another program).
{ config, lib, pkgs, utils, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;

  cfg = config.services.fleet-coordinator;
  coordinatorConfig = import ./coordinator-config.nix;

  fleetTypes = import ./types.nix { inherit lib; };
  inherit (fleetTypes) duration listenAddress portOf;

  defaultDataDir = "/var/lib/fleet-coordinator";

  settings = lib.genAttrs coordinatorConfig.settingNames (n: cfg.${n});
  configFile = pkgs.writeText "fleet-coordinator.json" (builtins.toJSON (coordinatorConfig settings));

  hostOf = addr:
    let h = lib.removeSuffix ":${toString (portOf addr)}" addr;
    in if h == "" || h == "0.0.0.0" || h == "[::]" then "127.0.0.1" else h;

  dashboards = pkgs.runCommand "fleet-grafana-dashboards" { } ''
    mkdir -p $out
    cp ${cfg.grafana.dashboardFile} $out/fleet-dashboard.json
  '';
in
{
  options.services.fleet-coordinator = {
    enable = mkEnableOption "the fleet coordinator";

    package = lib.mkPackageOption pkgs "nixos-fleet" {
      extraDescription = "Must provide bin/fleet-coordinator. Only fleet's overlays.default (or nixosModules.coordinator) provides pkgs.nixos-fleet.";
    };

    dataDir = mkOption {
      type = types.str;
      default = defaultDataDir;
      description = ''
        Keys, account JWTs and JetStream data (flag --data-dir). Initialised
        on first start; it then holds the owner's credentials (admin.creds)
        and the operator seed, which you should move offline.
      '';
    };

    domain = mkOption {
      type = types.str;
      default = "fleet";
      description = "JetStream domain; agents behind leaf nodes reach JetStream through it (flag --domain).";
    };

    listen = mkOption {
      type = listenAddress;
      default = "0.0.0.0:4222";
      description = "Address for NATS clients: agents and admins (flag --listen).";
    };

    http = mkOption {
      type = types.either (types.enum [ "" ]) listenAddress;
      default = "127.0.0.1:9465";
      description = ''
        Address for /healthz, /readyz, /metrics and /api/v1 (flag --http);
        "" disables it. The default port, 9465, stays clear of the
        Prometheus node exporter's 9100.
      '';
    };

    leafnodeListen = mkOption {
      type = types.nullOr listenAddress;
      default = null;
      example = "0.0.0.0:7422";
      description = "Address for remote sites' leaf nodes (flag --leafnode-listen); null disables it.";
    };

    serverName = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "fleet-1";
      description = "Server name, unique in a cluster (flag --server-name); null means generated.";
    };

    clusterName = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "fleet";
      description = "Cluster name, the same on every coordinator of a cluster (flag --cluster-name); null means \"fleet\".";
    };

    clusterListen = mkOption {
      type = types.nullOr listenAddress;
      default = null;
      example = "0.0.0.0:6222";
      description = ''
        Address for routes from the other coordinators of a cluster (flag
        --cluster-listen); null runs alone. Needs serverName.
      '';
    };

    routes = mkOption {
      type = types.nullOr (types.listOf types.str);
      default = null;
      example = [ "nats-route://fleet-2.example:6222" "nats-route://fleet-3.example:6222" ];
      description = "The other coordinators' cluster addresses (flag --routes); needs clusterListen.";
    };

    replicas = mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      description = ''
        Replicas of each stream and bucket: 1 alone, 3 or 5 in a cluster
        (flag --replicas); null means 1 alone, 3 with clusterListen.
      '';
    };

    factsRetention = mkOption {
      type = duration;
      default = "720h";
      description = "How long fact reports are kept (flag --facts-retention).";
    };

    factsHistory = mkOption {
      type = types.ints.positive;
      default = 1440;
      description = "Fact reports kept per device (flag --facts-history).";
    };

    eventsRetention = mkOption {
      type = duration;
      default = "2160h";
      description = "How long device events are kept (flag --events-retention).";
    };

    apiTokenFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/keys/fleet-api-token";
      description = ''
        File holding the bearer token (at least 16 characters) that
        /api/v1/devices and /api/v1/rollouts require (flag --api-token-file).
        Readable by the fleet-coordinator user; kept out of the Nix store.
        Null leaves the JSON API off (403).
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

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the client port (listen) and, when set, the leaf node and cluster ports in the firewall. The HTTP port is not opened.";
    };

    extraFlags = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "Extra arguments to `fleet-coordinator run`; they override the config file.";
    };

    prometheus.enable = mkOption {
      type = types.bool;
      default = false;
      description = "Add a scrape job for the coordinator's /metrics to services.prometheus on this host.";
    };

    prometheus.target = mkOption {
      type = types.str;
      default = "${hostOf cfg.http}:${toString (portOf cfg.http)}";
      defaultText = literalExpression ''"<host of http>:<port of http>"'';
      description = "host:port Prometheus scrapes.";
    };

    grafana.provisionDashboard = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Provision the fleet dashboard into services.grafana on this host
        (a Prometheus data source is yours to provision).
      '';
    };

    grafana.dashboardFile = mkOption {
      type = types.path;
      default = ../grafana/fleet-dashboard.json;
      defaultText = literalExpression "./grafana/fleet-dashboard.json (in the fleet repository)";
      description = "The dashboard JSON to provision.";
    };
  };

  config = mkIf cfg.enable (lib.mkMerge [
    {
      assertions = [
        {
          assertion = !(cfg.prometheus.enable && cfg.http == "");
          message = "services.fleet-coordinator.prometheus.enable needs http (the /metrics endpoint).";
        }
      ];

      environment.systemPackages = [ cfg.package ];

      users.users.fleet-coordinator = {
        isSystemUser = true;
        group = "fleet-coordinator";
        home = cfg.dataDir;
        description = "fleet coordinator";
      };
      users.groups.fleet-coordinator = { };

      systemd.tmpfiles.rules = lib.optional (cfg.dataDir != defaultDataDir)
        "d ${cfg.dataDir} 0700 fleet-coordinator fleet-coordinator - -";

      networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall
        ([ (portOf cfg.listen) ]
          ++ lib.optional (cfg.leafnodeListen != null) (portOf cfg.leafnodeListen)
          ++ lib.optional (cfg.clusterListen != null) (portOf cfg.clusterListen));

      systemd.services.fleet-coordinator = {
        description = "fleet coordinator";
        wantedBy = [ "multi-user.target" ];
        wants = [ "network-online.target" ];
        after = [ "network-online.target" ];
        # Stop and start (not restart in place) on a config change.
        restartTriggers = [ configFile ];

        serviceConfig = import ./hardening.nix // {
          Type = "simple";
          ExecStart = utils.escapeSystemdExecArgs ([
            "${cfg.package}/bin/fleet-coordinator"
            "run"
            "--config"
            "${configFile}"
          ] ++ cfg.extraFlags);
          Restart = "on-failure";
          RestartSec = "5s";
          # JetStream flushes on SIGTERM; give it time.
          TimeoutStopSec = "60s";
          LimitNOFILE = 1048576;

          User = "fleet-coordinator";
          Group = "fleet-coordinator";
          DynamicUser = false;
          StateDirectory = mkIf (cfg.dataDir == defaultDataDir) "fleet-coordinator";
          StateDirectoryMode = "0700";
          WorkingDirectory = cfg.dataDir;
          UMask = "0077";

          # Hardening: the coordinator writes only its data dir and needs no
          # privilege (ports above 1024; for a port below, add
          # AmbientCapabilities = [ "CAP_NET_BIND_SERVICE" ] and the same in
          # CapabilityBoundingSet).
          ReadWritePaths = [ cfg.dataDir ];
          PrivateUsers = true;
          ProcSubset = "pid";
        };
      };
    }

    (mkIf cfg.prometheus.enable {
      services.prometheus.scrapeConfigs = [
        {
          job_name = "fleet-coordinator";
          static_configs = [{ targets = [ cfg.prometheus.target ]; }];
        }
      ];
    })

    (mkIf cfg.grafana.provisionDashboard {
      services.grafana.provision = {
        enable = true;
        dashboards.settings.providers = [
          {
            name = "fleet";
            type = "file";
            options.path = dashboards;
          }
        ];
      };
    })
  ]);
}
