# The NixOS test the flake's VM checks run through nixos-repl (as `nixos-test-driver` and with
# `nixos-repl --batch`). Two machines on VLAN 1.
{
  name = "nixos-repl-example";

  nodes.server = {
    services.getty.autologinUser = "root";
    systemd.services.hello = {
      wantedBy = [ "multi-user.target" ];
      script = "echo hello from the server > /run/hello";
      serviceConfig.Type = "oneshot";
      serviceConfig.RemainAfterExit = true;
    };
  };
  nodes.client = { };

  testScript = ''
    start_all()
    with subtest("the service ran"):
        server.wait_for_unit("hello.service")
        t.assertEqual(server.succeed("cat /run/hello"), "hello from the server\n")
    with subtest("the machines see each other on VLAN 1"):
        client.wait_for_unit("multi-user.target")
        client.wait_until_succeeds("ping -c 1 server", timeout=60)
    server.screenshot("server")
  '';
}
