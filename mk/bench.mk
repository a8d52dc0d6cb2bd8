# The testbed benchmark (tests/testbed/bench, issue 6): native vs monitor
# guest cycles, median of three boots per cell.
#
#   make bench-testbed   the full table (compute, system calls, page faults,
#                        guest CR3 switches; amd64 and i386), also written
#                        to build/bench.md
#   make demo-bench      a short version: sha256sum of 16 MiB and the
#                        100,000-getpid loop on amd64

TESTBED_BENCH := $(TOP)/tests/testbed/bench

.PHONY: bench-testbed demo-bench
bench-testbed: deps
	$(TESTBED_BENCH)

demo-bench: deps
	$(TESTBED_BENCH) --quick

BENCH_TARGETS += bench-testbed
DEMO_TARGETS += demo-bench
