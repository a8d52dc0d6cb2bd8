# mk/kld.mk: kqemu.ko for FreeBSD 14 and 15, cross-built on Linux with the
# compile and link steps of bsd.kmod.mk (TOOLCHAIN.md), against the
# FreeBSD headers `make deps` unpacks.  Flags come from mk/kernel.mk,
# which FreeBSD's Makefile reads too.
#
#   make kld    build/freebsd14/kqemu.ko and build/freebsd15/kqemu.ko

KLD_RELEASES := 14 15
KLD_CC := clang
KLD_LD := ld.lld
KLD_OBJCOPY := llvm-objcopy
KLD_NM := llvm-nm

# Everything a module is built from: any change rebuilds both.
KLD_INPUTS := $(shell find $(TOP)/src $(TOP)/sys -type f -not -name '*~') \
	$(TOP)/Cargo.toml $(TOP)/Cargo.lock $(TOP)/mk/kernel.mk $(TOP)/mk/kld.mk

# The C compile line of release $(1): target, headers (amd64 before
# generic, so machine/ resolves to amd64), the shim's own directory.
kld_cflags = --target=x86_64-unknown-freebsd$(1).0 $(KQEMU_KERNEL_CFLAGS) \
	-D__FreeBSD_version=$(KQEMU_FREEBSD_VERSION_$(1)) \
	-I$(DEPS)/freebsd$(1)/include/x86_64-freebsd-none \
	-I$(DEPS)/freebsd$(1)/include/generic-freebsd -I$(TOP)/sys

define kld_release
$(BUILD)/freebsd$(1)/%.o: $(TOP)/sys/%.c $(TOP)/sys/kqemu_kmod.h $(TOP)/mk/kernel.mk | $(BUILD)/freebsd$(1)/.dir
	$(KLD_CC) $(call kld_cflags,$(1)) -c $$< -o $$@

# The Rust side as a static library; its own target directory per release
# so the two builds do not invalidate each other.  compiler_builtins
# objects carry LLVM bitcode (.llvmbc): no business in a kld.
$(BUILD)/freebsd$(1)/libkqemu.a: $(KLD_INPUTS) | $(BUILD)/freebsd$(1)/.dir
	cd $(TOP) && env KQEMU_KERNEL_CFLAGS="$(call kld_cflags,$(1))" \
		RUSTFLAGS="$(KQEMU_RUSTFLAGS)" CARGO_TARGET_DIR=$(BUILD)/target-kld$(1) \
		$(KERNEL_CARGO) rustc -p kqemu --features freebsd$(1) $(KQEMU_CARGO_FLAGS)
	cp $(BUILD)/target-kld$(1)/$(KQEMU_RUST_TARGET)/release/libkqemu.a $$@.tmp
	$(KLD_OBJCOPY) -R .llvmbc -R .llvmcmd $$@.tmp
	mv $$@.tmp $$@

# Link as kmod.mk does, drop debug information (kmod.mk without
# DEBUG_FLAGS), then localize every defined global and strip commons
# (kmod_syms.awk with no EXPORT_SYMS): only the undefined kernel symbols
# and linker-set bounds stay global.
$(BUILD)/freebsd$(1)/kqemu.ko: $(BUILD)/freebsd$(1)/kqemu_kmod.o $(BUILD)/freebsd$(1)/helpers.o \
		$(BUILD)/freebsd$(1)/libkqemu.a $(TOP)/sys/kqemu_kmod.ldscript
	$(KLD_LD) $(KQEMU_LDFLAGS) -T $(TOP)/sys/kqemu_kmod.ldscript -o $$@.tmp $$(filter-out %.ldscript,$$^)
	$(KLD_OBJCOPY) --strip-debug $$@.tmp
	$(KLD_NM) --defined-only --extern-only $$@.tmp | awk '$$$$2 != "A" && $$$$2 != "C" { print $$$$3 }' > $$@.localize
	$(KLD_NM) --extern-only $$@.tmp | awk '$$$$2 == "C" { print $$$$3 }' > $$@.commons
	$(KLD_OBJCOPY) --localize-symbols=$$@.localize --strip-symbols=$$@.commons $$@.tmp
	rm -f $$@.localize $$@.commons
	mv $$@.tmp $$@
endef
$(foreach r,$(KLD_RELEASES),$(eval $(call kld_release,$(r))))

$(BUILD)/%/.dir:
	mkdir -p $(@D)
	touch $@

.PHONY: kld
kld: $(foreach r,$(KLD_RELEASES),$(BUILD)/freebsd$(r)/kqemu.ko)

# clippy over the kld's own code (src/freebsd), which host builds leave
# out: checked for the host target with each release's bindings.
.PHONY: kld-clippy
kld-clippy:
	$(foreach r,$(KLD_RELEASES),env KQEMU_KERNEL_CFLAGS="$(call kld_cflags,$(r))" \
		CARGO_TARGET_DIR=$(BUILD)/target-kld-clippy \
		$(HOST_CARGO) clippy -p kqemu --features freebsd$(r) --lib -- -D warnings &&) true
