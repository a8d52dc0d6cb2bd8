# mk/check-kld.mk: the static checks every kqemu.ko must pass, standing in
# for kldload on this Linux host (tests/kld/check_kld.py, TOOLCHAIN.md
# "Link and the checks a kld must pass"), and the checker's own self-test.
#
#   make check-kld            check build/freebsd{14,15}/kqemu.ko
#   make check-kld-selftest   show each check rejects an object built to break it

CHECK_KLD := python3 $(TOP)/tests/kld/check_kld.py
CHECK_KLD_RELEASES := 14 15

.PHONY: check-kld check-kld-selftest
# Both modules are checked even when the first fails; the module declares
# sysctls (hw.kqemu), so set_sysctl_set is required too.
check-kld: kld
	@status=0; for r in $(CHECK_KLD_RELEASES); do \
		$(CHECK_KLD) --release $$r --kpi $(TOP)/tests/kld/kpi-$$r.txt \
			--require-set sysctl_set $(BUILD)/freebsd$$r/kqemu.ko || status=1; \
	done; exit $$status

check-kld-selftest: deps
	python3 $(TOP)/tests/kld/selftest.py --out $(BUILD)/kld-selftest

TEST_TARGETS += check-kld check-kld-selftest
