with subtest("typo"):
    undefined_helper()
