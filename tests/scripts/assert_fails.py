start_all()


def check_version():
    vm1.succeed("echo before")
    vm1.succeed("exit 4")


with subtest("version check"):
    check_version()

# Never reached: the failure above ends the script.
open(os.path.join(driver.out_dir, "after-failure"), "w").close()
