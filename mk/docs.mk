# mk/docs.mk: the FreeBSD user files (rc.d/kqemu, kqemu.4,
# devfs.rules.sample).  `make check-docs` runs sh -n and mandoc -Tlint,
# the rc.d script under a stand-in rc.subr with fake kld tools, the
# man page's consistency with the driver's contract (tests/docs/run.sh),
# and shows that each of those checks can fail (tests/docs/mutate.sh).

TEST_TARGETS += check-docs

.PHONY: check-docs
check-docs: deps
	@echo "== check-docs: rc.d/kqemu, kqemu.4, devfs.rules.sample"
	@bash $(TOP)/tests/docs/run.sh
	@echo "== check-docs: the checks fail on broken copies"
	@bash $(TOP)/tests/docs/mutate.sh
