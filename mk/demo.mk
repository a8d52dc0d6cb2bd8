# mk/demo.mk: the module part of `make demo`: build both kqemu.ko files,
# show what FreeBSD's kld linker would see in them, and what each imports.
# (The testbed part, demo-testbed, comes from mk/testbed.mk.)

.PHONY: demo-kld
demo-kld: check-kld
	@echo
	@echo "== kqemu.ko, cross-built for FreeBSD 14 and 15 =="
	@for r in $(KLD_RELEASES); do \
		ko=$(BUILD)/freebsd$$r/kqemu.ko; \
		printf 'FreeBSD %s: %s, %s bytes, imports: ' $$r "$${ko#$(TOP)/}" $$(stat -c %s $$ko); \
		$(KLD_NM) -u $$ko | awk '$$2 !~ /^__(start|stop)_set_/ { printf "%s ", $$2 }'; \
		echo; \
	done
	@echo "Both modules pass the kld checks above (make check-kld)."
	@echo

DEMO_TARGETS += demo-kld
