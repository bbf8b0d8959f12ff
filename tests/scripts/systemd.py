# systemd-level API on a real init (the Debian guest): units, jobs and ports.
machine.wait_for_unit("multi-user.target")
machine.succeed("systemd-run --unit=pinger.service /bin/sleep infinity")
machine.wait_for_unit("pinger.service")
machine.require_unit_state("pinger.service", "active")
machine.stop_job("pinger.service")
machine.wait_until_fails("systemctl is-active pinger.service")
with subtest("unit info"):
    info = machine.get_unit_info("multi-user.target")
    t.assertEqual(info["ActiveState"], "active")
