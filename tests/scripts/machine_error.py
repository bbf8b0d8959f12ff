broken = create_machine("/nonexistent/run-broken-vm")
broken.start()
open(os.path.join(driver.out_dir, "after-failure"), "w").close()
