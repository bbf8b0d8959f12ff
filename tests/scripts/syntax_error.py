start_all()
vm1.succeed("true")
if True
    vm1.succeed("true")
