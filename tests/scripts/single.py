# One machine: `machine` is an alias of it (deprecated when it has another name).
machine.succeed("true")
assert solo.succeed("echo $((6 * 7))").strip() == "42"
