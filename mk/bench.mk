# The testbed benchmark (tests/testbed/bench, issues 6 and 7): native vs
# monitor vs the real kqemu.ko (kld mode) guest cycles, median of three
# boots per cell.
#
#   make bench-testbed   the full table (compute, system calls, page faults,
#                        guest CR3 switches; amd64 and i386; the EXEC ioctl
#                        alone), also written to build/bench.md
#   make demo-bench      a short version: sha256sum of 16 MiB, the
#                        100,000-getpid loop on amd64 and the EXEC ioctl

TESTBED_BENCH := $(TOP)/tests/testbed/bench

.PHONY: bench-testbed demo-bench
# Kld mode loads build/freebsd14/kqemu.ko: the module comes first.
bench-testbed: deps kld
	$(TESTBED_BENCH)

demo-bench: deps kld
	$(TESTBED_BENCH) --quick

BENCH_TARGETS += bench-testbed
DEMO_TARGETS += demo-bench
