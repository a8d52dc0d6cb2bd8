# The testbed (tests/testbed, TESTBED.md): the ring-0 test kernel booted in
# qemu-system-x86_64 (TCG), its runner and its suite.
#
#   make testbed         build the kernel (build/target-testbed)
#   make testbed-test    clippy on the kernel crate, then the suite: busybox
#                        amd64/i386 under -cpu max and qemu64 against the
#                        host, the self-test guests, the runner's own errors
#   make demo-testbed    the same, with a table of wall times and guest cycles
#
# tests/testbed/run holds the kernel's build command (so a person running
# it by hand gets the same kernel); these rules call it.

TESTBED_RUN := $(TOP)/tests/testbed/run
TESTBED_SUITE := $(TOP)/tests/testbed/suite

.PHONY: testbed testbed-lint testbed-test demo-testbed
testbed: deps
	$(TESTBED_RUN) --build-only

# The workspace lint skips this crate (bare-metal target); its code has no
# target-specific cfg, so clippy checks it for the host target.
testbed-lint: deps
	CARGO_TARGET_DIR=$(BUILD)/target-testbed-clippy $(HOST_CARGO) clippy -p kqemu-testbed --no-deps \
		--target x86_64-unknown-linux-gnu -- -D warnings

testbed-test: deps testbed-lint
	$(TESTBED_SUITE)

demo-testbed: deps
	$(TESTBED_SUITE) --demo

TEST_TARGETS += testbed-test
DEMO_TARGETS += demo-testbed
