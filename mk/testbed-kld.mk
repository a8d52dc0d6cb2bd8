# Kld mode of the testbed (issue 7, tests/testbed/README.md "Kld mode"):
# the suite loads build/freebsd{14,15}/kqemu.ko, so the modules come first
# (the runner builds the kernel and kqemu-run itself).
testbed-test demo-testbed: kld
