# services.fleet-leaf: a standard nats-server running at a remote site as a
# leaf node of the fleet's hub (the coordinator). Local agents connect to it
# (services.fleet-agent.servers) and authenticate against the same operator;
# the leaf enforces the same permission templates as the hub.
#
# Two ways to configure it:
# - configFile: the nats-server config written by
#   `fleet-admin leaf config --site <site>` (with its creds files placed
#   where that config says), used as it is; or
# - generated here from hubUrls, credsFile, account, operatorJwtFile,
#   accountJwtDir and, for live account updates, systemCredentialsFile and
#   systemAccount: operator mode with the account JWTs of accountJwtDir
#   (every <account public key>.jwt) preloaded at start, and a leaf node
#   remote to the hub bound to the FLEET account.
#   With systemCredentialsFile (the site's leaf-system.creds) it is what
#   `fleet-admin leaf config` writes: a cache resolver in the state
#   directory and a second remote bound to the system account, over which
#   the leaf hears the account updates the coordinator pushes
#   ($SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE): a device revoked at the hub
#   is cut off at the site at once.
#   Without it the resolver is MEMORY, the preload alone (a warning says
#   so): a revocation reaches the site only when accountJwtDir is refreshed
#   and the unit restarted.
#   With cache.credentialsFile (the site's leaf-cache.creds from `leaf
#   config --cache`) the leaf also keeps a copy of the fleet's binary
#   cache: JetStream in the site's domain and a third remote, bound to the
#   CORE account, over which the hub feeds the mirrors.
{ config, lib, pkgs, utils, ... }:

let
  inherit (lib) mkOption mkEnableOption mkIf types literalExpression;

  cfg = config.services.fleet-leaf;
  inherit (import ./types.nix { inherit lib; }) listenAddress portOf;
  generated = cfg.configFile == null;

  runtimeConf = "/run/fleet-leaf/nats.conf";
  credsDir = "/run/credentials/fleet-leaf.service";
  liveUpdates = cfg.systemCredentialsFile != null;
  siteCache = cfg.cache.credentialsFile != null;
  # The cache resolver's store, in the unit's StateDirectory.
  jwtCacheDir = "/var/lib/fleet-leaf/jwt";

  # The static part; start.sh appends resolver_preload.
  staticConf = pkgs.writeText "fleet-leaf-static.conf" ''
    ${lib.optionalString (cfg.serverName != null) "server_name: ${builtins.toJSON cfg.serverName}"}
    listen: ${builtins.toJSON cfg.listen}
    ${lib.optionalString (cfg.monitorListen != null) "http: ${builtins.toJSON cfg.monitorListen}"}
    operator: ${builtins.toJSON cfg.operatorJwtFile}
    ${lib.optionalString (cfg.systemAccount != null) "system_account: ${builtins.toJSON cfg.systemAccount}"}
    ${if liveUpdates
      then "resolver: { type: cache, dir: ${builtins.toJSON jwtCacheDir}, ttl: \"1h\", limit: 1000 }"
      else "resolver: MEMORY"}
    ${lib.optionalString siteCache ''
    jetstream {
      domain: ${builtins.toJSON cfg.cache.site}
      store_dir: ${builtins.toJSON "/var/lib/fleet-leaf/jetstream"}
      max_file_store: ${builtins.toJSON cfg.cache.maxFileStore}
      max_memory_store: ${builtins.toJSON cfg.cache.maxMemoryStore}
    }
    ''}
    leafnodes {
      remotes: [
        {
          urls: ${builtins.toJSON cfg.hubUrls}
          credentials: ${builtins.toJSON "${credsDir}/leaf.creds"}
          account: ${builtins.toJSON cfg.account}
        }
        ${lib.optionalString siteCache ''
        {
          urls: ${builtins.toJSON cfg.hubUrls}
          credentials: ${builtins.toJSON "${credsDir}/leaf-cache.creds"}
          account: ${builtins.toJSON cfg.cache.coreAccount}
        }
        ''}
        ${lib.optionalString liveUpdates ''
        {
          urls: ${builtins.toJSON cfg.hubUrls}
          credentials: ${builtins.toJSON "${credsDir}/leaf-system.creds"}
          account: ${builtins.toJSON cfg.systemAccount}
        }
        ''}
      ]
    }
    ${cfg.extraConfig}
  '';

  prepare = pkgs.writeShellScript "fleet-leaf-prepare" ''
    set -euo pipefail
    umask 077
    out=${runtimeConf}.tmp
    cat ${staticConf} > "$out"
    echo 'resolver_preload: {' >> "$out"
    found=0
    for f in ${lib.escapeShellArg cfg.accountJwtDir}/*.jwt; do
      [ -e "$f" ] || continue
      key=$(basename "$f" .jwt)
      printf '  %s: "%s"\n' "$key" "$(tr -d '[:space:]' < "$f")" >> "$out"
      found=1
    done
    echo '}' >> "$out"
    if [ "$found" = 0 ]; then
      echo "fleet-leaf: no account JWTs (*.jwt) in ${toString cfg.accountJwtDir}" >&2
      exit 1
    fi
    mv "$out" ${runtimeConf}
  '';
in
{
  options.services.fleet-leaf = {
    enable = mkEnableOption "a NATS leaf node of the fleet's hub for this site";

    package = lib.mkPackageOption pkgs "nats-server" { };

    configFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/leaf-berlin.conf";
      description = ''
        A complete nats-server config, as written by `fleet-admin leaf
        config`; when set, the options below (but package, openFirewall and
        ports) are ignored. A string path, read at start: it names a creds
        file, which must not go to the Nix store.
      '';
    };

    hubUrls = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "nats-leaf://fleet.example.org:7422" ];
      description = "The hub's leaf node URLs (its --leafnode-listen).";
    };

    credsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/leaf-berlin.creds";
      description = "The leaf's creds (a FLEET user with the leaf role); passed to the unit with systemd LoadCredential, so it may stay root-only.";
    };

    systemCredentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/leaf-berlin-system.creds";
      description = ''
        The site's system-account creds (leaf-system.creds of `fleet-admin
        leaf config`); passed with systemd LoadCredential like credsFile.
        When set (with systemAccount), the leaf has a second remote to the
        hub bound to the system account and a cache resolver, and hears
        account updates at once: a device revoked at the hub is cut off at
        the site. When null, the account JWTs are only preloaded at start:
        a revocation reaches the site at the next restart.
      '';
    };

    account = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "ACXYZ...";
      description = "Public key of the FLEET account the remote binds to.";
    };

    operatorJwtFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/operator.jwt";
      description = "The operator JWT (the coordinator's operator.jwt; it names the system account).";
    };

    accountJwtDir = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/etc/fleet/jwt";
      description = "Directory of account JWTs, one <public key>.jwt each (like the coordinator's resolver dir), preloaded at start.";
    };

    systemAccount = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "System account public key; null takes it from the operator JWT (required with systemCredentialsFile, for its remote).";
    };

    serverName = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "leaf-berlin";
      description = "Server name; null means generated.";
    };

    listen = mkOption {
      type = listenAddress;
      default = "0.0.0.0:4222";
      description = "Address local agents connect to.";
    };

    monitorListen = mkOption {
      type = types.nullOr listenAddress;
      default = null;
      example = "127.0.0.1:8222";
      description = "nats-server monitoring address; null disables it.";
    };

    cache = {
      credentialsFile = mkOption {
        type = types.nullOr types.path;
        default = null;
        description = ''
          The site's leaf-cache.creds, written by `fleet-admin leaf config
          --site <site> --cache`: the leaf keeps a copy of the fleet's
          binary cache (JetStream in the site's own domain, mirrors the hub
          feeds once across the WAN), and the site's agents fetch closures
          from it first. Needs site, coreAccount and maxFileStore; the leaf
          then links the CORE account to the hub with these creds, which
          may only feed the mirrors. accountJwtDir must hold the CORE
          account's JWT (leaf config writes it).
        '';
      };
      site = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "berlin";
        description = "The site's name (leaf config --site): the JetStream domain of its copy of the cache.";
      };
      coreAccount = mkOption {
        type = types.nullOr types.str;
        default = null;
        description = "The CORE account's public key (leaf config --json prints it as core_account): the mirrors live in it.";
      };
      maxFileStore = mkOption {
        type = types.nullOr (types.either types.ints.positive types.str);
        default = null;
        example = "24G";
        description = ''
          Disk JetStream may use at the site: what the CORE account's JWT
          reserves plus the copy's bound. The leaf.conf that `fleet-admin
          leaf config --cache` writes names the figure (max_file_store).
        '';
      };
      maxMemoryStore = mkOption {
        type = types.either types.ints.positive types.str;
        default = "256M";
        description = "Memory JetStream may use at the site: at least what the CORE account's JWT reserves (leaf.conf's max_memory_store).";
      };
    };

    extraConfig = mkOption {
      type = types.lines;
      default = "";
      description = "Extra nats-server config appended to the generated one.";
    };

    openFirewall = mkOption {
      type = types.bool;
      default = false;
      description = "Open the client port (listen) in the firewall.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.optionals generated [
      { assertion = cfg.hubUrls != [ ]; message = "services.fleet-leaf: set hubUrls (or configFile)."; }
      { assertion = cfg.credsFile != null; message = "services.fleet-leaf: set credsFile (or configFile)."; }
      { assertion = cfg.account != null; message = "services.fleet-leaf: set account, the FLEET account's public key (or configFile)."; }
      { assertion = cfg.operatorJwtFile != null; message = "services.fleet-leaf: set operatorJwtFile (or configFile)."; }
      { assertion = cfg.accountJwtDir != null; message = "services.fleet-leaf: set accountJwtDir (or configFile)."; }
      { assertion = liveUpdates -> cfg.systemAccount != null; message = "services.fleet-leaf: systemCredentialsFile needs systemAccount, the system account's public key its remote binds to."; }
      { assertion = siteCache -> (cfg.cache.site != null && cfg.cache.coreAccount != null && cfg.cache.maxFileStore != null);
        message = "services.fleet-leaf: cache.credentialsFile needs cache.site, cache.coreAccount and cache.maxFileStore (all in what fleet-admin leaf config --cache writes)."; }
    ];

    warnings = lib.optional (generated && !liveUpdates)
      "services.fleet-leaf: systemCredentialsFile is not set, so the leaf has no system-account link to the hub: account updates (a device revoked at the hub) reach the site only when accountJwtDir is refreshed and fleet-leaf restarted.";

    users.users.fleet-leaf = {
      isSystemUser = true;
      group = "fleet-leaf";
      description = "fleet leaf node";
    };
    users.groups.fleet-leaf = { };

    networking.firewall.allowedTCPPorts = mkIf cfg.openFirewall
      [ (portOf cfg.listen) ];

    systemd.services.fleet-leaf = {
      description = "fleet leaf node (nats-server)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      restartTriggers = lib.optional generated staticConf;

      serviceConfig = import ./hardening.nix // {
        Type = "simple";
        ExecStartPre = lib.optional generated prepare;
        ExecStart = utils.escapeSystemdExecArgs [ "${cfg.package}/bin/nats-server" "-c" (if generated then runtimeConf else cfg.configFile) ];
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "on-failure";
        RestartSec = "5s";
        LimitNOFILE = 1048576;

        User = "fleet-leaf";
        Group = "fleet-leaf";
        DynamicUser = false;
        RuntimeDirectory = "fleet-leaf";
        RuntimeDirectoryMode = "0700";
        StateDirectory = "fleet-leaf";
        StateDirectoryMode = "0700";
        WorkingDirectory = "/var/lib/fleet-leaf";
        LoadCredential = lib.optional (generated && cfg.credsFile != null) "leaf.creds:${cfg.credsFile}"
          ++ lib.optional (generated && liveUpdates) "leaf-system.creds:${cfg.systemCredentialsFile}"
          ++ lib.optional (generated && siteCache) "leaf-cache.creds:${cfg.cache.credentialsFile}";
        UMask = "0077";
      };
    };
  };
}
