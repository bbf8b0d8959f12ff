start_all()
with subtest("hangs"):
    vm1.succeed("sleep 600")
open(os.path.join(driver.out_dir, "after-failure"), "w").close()
