# NixOS VM test: a coordinator and two agents. The agents enrol with a token
# file, get a second generation deployed, and one of them is then given a
# generation whose health check fails and must roll back by itself.
#
# Run with `nix build .#checks.x86_64-linux.vm-test` (needs nixpkgs and
# KVM; it cannot run on the machine that only parses .nix files).
#
# The fleet-admin commands follow DESIGN.md (token create, release create,
# deploy, devices ls); align them here if the CLI lands with other spellings.
#
# Generations: each agent's system carries two specialisations, so their
# closures are already in the VM's store: `gen2` (a harmless change) and
# `broken` (stops the unit the agent's health check watches).
{ pkgs, self }:

let
  agentNode = { lib, pkgs, ... }: {
    imports = [ self.nixosModules.agent ];
    virtualisation.writableStore = true;
    virtualisation.memorySize = 1024;

    services.fleet-agent = {
      enable = true;
      servers = [ "nats://coordinator:4222" ];
      enrollmentTokenFile = "/etc/fleet/enroll-token";
      # The owner's key is made when the coordinator starts, so the test
      # passes it through the environment (FLEET_RELEASE_SIGNERS) below.
      releaseSigners = [ ];
      reconnectWithin = "1m";
      healthDeadline = "1m";
      healthChecks.marker = {
        type = "systemd";
        units = [ "fleet-test-marker.service" ];
        retries = 2;
        interval = "1s";
      };
    };
    systemd.services.fleet-agent.serviceConfig.EnvironmentFile = "-/etc/fleet/agent.env";

    systemd.services.fleet-test-marker = {
      wantedBy = [ "multi-user.target" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = "${pkgs.coreutils}/bin/true";
      };
    };

    specialisation.gen2.configuration = {
      environment.etc."fleet-generation".text = "2";
    };
    specialisation.broken.configuration = {
      environment.etc."fleet-generation".text = "broken";
      systemd.services.fleet-test-marker.enable = lib.mkForce false;
    };
  };
in
pkgs.testers.runNixOSTest {
  name = "fleet";

  nodes = {
    coordinator = { pkgs, ... }: {
      imports = [ self.nixosModules.coordinator ];
      services.fleet-coordinator = {
        enable = true;
        openFirewall = true;
        serverName = "coordinator";
      };
      environment.systemPackages = [ pkgs.jq pkgs.python3 ];
    };
    agent1 = agentNode;
    agent2 = agentNode;
  };

  testScript = ''
    import json

    admin = ("FLEET_SERVER=nats://127.0.0.1:4222 "
             "FLEET_CREDS=/var/lib/fleet-coordinator/admin.creds fleet-admin")
    agents = [agent1, agent2]

    start_all()
    coordinator.wait_for_unit("fleet-coordinator.service")
    coordinator.wait_for_open_port(4222)
    coordinator.wait_until_succeeds("curl -sf http://127.0.0.1:9465/readyz")

    with subtest("enrol both agents with a token file"):
        token = coordinator.succeed(f"{admin} token create --group test --uses 2 --ttl 1h").strip()
        # The owner's public key signs releases: the JWT's subject in admin.creds.
        signer = coordinator.succeed(
            "python3 -c 'import base64,json,sys; jwt=open(sys.argv[1]).read().split(\"-----\")[2].strip();"
            " p=jwt.split(\".\")[1]; print(json.loads(base64.urlsafe_b64decode(p+\"=\"*(-len(p)%4)))[\"sub\"])'"
            " /var/lib/fleet-coordinator/admin.creds").strip()
        for m in agents:
            m.wait_for_unit("multi-user.target")
            m.succeed("mkdir -p /etc/fleet")
            m.succeed(f"echo {token} > /etc/fleet/enroll-token && chmod 600 /etc/fleet/enroll-token")
            m.succeed(f"echo FLEET_RELEASE_SIGNERS={signer} > /etc/fleet/agent.env")
            m.systemctl("restart fleet-agent.service")
            m.wait_for_file("/var/lib/fleet-agent/agent.creds")
        coordinator.wait_until_succeeds(f"{admin} devices ls --json | jq -e 'length == 2'")

    def system_of(m, spec=None):
        link = "/run/current-system" + (f"/specialisation/{spec}" if spec else "")
        return m.succeed(f"readlink -f {link}").strip()

    # Both specialisations' paths, read while the base generation runs
    # (a specialisation has no specialisations of its own).
    spec_paths = {m.name: {s: system_of(m, s) for s in ("gen2", "broken")} for m in agents}

    def release(name, spec):
        closures = " ".join(f"--closure {m.name}={spec_paths[m.name][spec]}" for m in agents)
        return coordinator.succeed(f"{admin} release create --description {name} {closures} --json | jq -r .id").strip()

    with subtest("deploy a second generation"):
        gen2 = {m.name: spec_paths[m.name]["gen2"] for m in agents}
        r = release("gen2", "gen2")
        coordinator.succeed(f"{admin} deploy --release {r} --group test --strategy all --health-timeout 5m --wait")
        for m in agents:
            m.wait_until_succeeds(f"test $(readlink -f /run/current-system) = {gen2[m.name]}")
            m.succeed("grep -qx 2 /etc/fleet-generation")

    with subtest("a failing health check rolls back"):
        before = {m.name: system_of(m) for m in agents}
        r = release("broken", "broken")
        coordinator.fail(f"{admin} deploy --release {r} --group test --strategy all --health-timeout 5m --on-failure pause --wait")
        for m in agents:
            m.wait_until_succeeds(f"test $(readlink -f /run/current-system) = {before[m.name]}", timeout=300)
            m.succeed("systemctl is-active fleet-test-marker.service")
            m.succeed("grep -qx 2 /etc/fleet-generation")
            m.succeed("systemctl is-active fleet-agent.service")
  '';
}
