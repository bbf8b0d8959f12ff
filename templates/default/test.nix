# One NixOS test: a web server and a client on VLAN 1.
{
  name = "web";

  nodes.server = {
    services.nginx.enable = true;
    services.nginx.virtualHosts.default.locations."/".return = "200 'hello from the server'";
    networking.firewall.allowedTCPPorts = [ 80 ];
  };
  nodes.client =
    { pkgs, ... }:
    {
      environment.systemPackages = [ pkgs.curl ];
    };

  testScript = ''
    start_all()
    server.wait_for_unit("nginx.service")
    server.wait_for_open_port(80)
    with subtest("the client reaches the server"):
        t.assertIn("hello from the server", client.succeed("curl -sf http://server/"))
  '';
}
