# A nixpkgs-style testScript using the documented globals; runs unchanged under nixpkgs.
import datetime

start_all()

with subtest("machines answer"):
    assert "hello" in vm1.succeed("echo hello")
    vm2.fail("false")
    status, out = vm1.execute("echo -n out; exit 3")
    t.assertEqual((status, out), (3, "out"))

with subtest("retry and polling conditions"):
    tries = []

    def ready(last_try: bool) -> bool:
        tries.append(last_try)
        return len(tries) >= 2

    retry(ready, timeout=datetime.timedelta(seconds=30))
    t.assertEqual(tries, [False, False])

    @polling_condition
    def guest_alive():
        "the guest is alive"
        vm2.succeed("true")

    with guest_alive:
        vm1.succeed("true")
        vm1.succeed("true")

with subtest("namespace"):
    t.assertIs(machines[0], vm1)
    t.assertEqual([m.name for m in machines], ["vm1", "vm2"])
    t.assertEqual(vlan1.nr, 1)
    t.assertEqual(vlans, [vlan1])
    t.assertIsInstance(vm1, QemuMachine)
    log.info("namespace checked")

serial_stdout_off()
vm1.succeed("echo quiet-line >&2")
vm1.wait_for_console_text("quiet-line")
serial_stdout_on()
vm1.succeed("echo loud-line >&2")
vm1.wait_for_console_text("loud-line")

with subtest("join_all"):
    vm1.shutdown()
    vm2.shutdown()
    join_all()
    t.assertFalse(vm1.is_up() or vm2.is_up())
