/*
 * A kld-shaped object for the checker's self-test: the linker sets that
 * DECLARE_MODULE, MODULE_VERSION, SYSINIT and SYSCTL_* produce, rebuilt with
 * local copies of the structures of sys/sys/module.h and sys/sys/kernel.h so
 * that the test needs no FreeBSD headers.  The -D switches below make the
 * variants the checker must reject.
 */
#ifndef MODNAME
#define MODNAME "kqemu"
#endif
#ifndef MODVERSION
#define MODVERSION 1
#endif
#ifndef KMIN
#define KMIN 1400097
#endif
#ifndef KMAX
#define KMAX 1499999
#endif

#define MDT_DEPEND 1
#define MDT_MODULE 2
#define MDT_VERSION 3
#define MDT_STRUCT_VERSION 1

struct mod_metadata {
	int md_version;
	int md_type;
	const void *md_data;
	const char *md_cval;
};

struct mod_depend {
	int md_ver_minimum;
	int md_ver_preferred;
	int md_ver_maximum;
};

struct mod_version {
	int mv_version;
};

typedef struct moduledata {
	const char *name;
	int (*evhand)(void *, int, void *);
	void *priv;
} moduledata_t;

struct sysinit {
	unsigned int subsystem;
	unsigned int order;
	void (*func)(const void *);
	const void *udata;
};

struct sysctl_oid_stub {
	const char *oid_name;
	int *oid_arg1;
};

/* sys/sys/linker_set.h: a pointer in section set_<name>, and weak bounds. */
#define SET_ENTRY(set, sym)						\
	__asm__(".weak __start_set_" #set "\n.weak __stop_set_" #set);	\
	static void const *const __set_##set##_sym_##sym		\
	    __attribute__((section("set_" #set), used, aligned(8))) = &(sym)

/* sys/sys/pcpu.h: the kernel's DPCPU set bounds, global in every file. */
__asm__(".globl __start_set_pcpu\n.globl __stop_set_pcpu");

int printf(const char *, ...);
int not_a_kpi_function(void);

static int fake_counter;

/* `used`: the NO_* variants leave some of these unreferenced. */
#define UNREFERENCED_OK __attribute__((used))

static int UNREFERENCED_OK
fake_modevent(void *mod, int what, void *arg)
{
	(void)mod;
	(void)arg;
	printf("fake module event %d\n", what);
#ifdef CALL_UNLISTED
	return (not_a_kpi_function());
#else
	return (0);
#endif
}

static void UNREFERENCED_OK
fake_init(const void *arg)
{
	(void)arg;
	fake_counter++;
}

static void UNREFERENCED_OK
fake_uninit(const void *arg)
{
	(void)arg;
	fake_counter--;
}

#ifndef NO_MODMETA
static moduledata_t fake_mod = { MODNAME, fake_modevent, 0 };
static const struct mod_metadata md_module = {
	MDT_STRUCT_VERSION, MDT_MODULE, &fake_mod, MODNAME
};
SET_ENTRY(modmetadata_set, md_module);
#ifndef NO_DEPEND
static struct mod_depend kernel_depend = { KMIN, KMIN, KMAX };
static const struct mod_metadata md_kernel = {
	MDT_STRUCT_VERSION, MDT_DEPEND, &kernel_depend, "kernel"
};
SET_ENTRY(modmetadata_set, md_kernel);
#endif
static struct mod_version fake_version = { MODVERSION };
static const struct mod_metadata md_version = {
	MDT_STRUCT_VERSION, MDT_VERSION, &fake_version, MODNAME
};
SET_ENTRY(modmetadata_set, md_version);
#endif

#ifndef NO_SYSINIT
static const struct sysinit fake_sysinit = { 0x1000000, 0, fake_init, 0 };
SET_ENTRY(sysinit_set, fake_sysinit);
#endif
#ifndef NO_SYSUNINIT
static const struct sysinit fake_sysuninit = { 0x1000000, 0, fake_uninit, 0 };
SET_ENTRY(sysuninit_set, fake_sysuninit);
#endif
#ifndef NO_SYSCTL
static const struct sysctl_oid_stub fake_sysctl = { "fake", &fake_counter };
SET_ENTRY(sysctl_set, fake_sysctl);
#endif

#ifdef COMMON_SYMBOL
int fake_common;
int *fake_common_ref = &fake_common;
#endif
