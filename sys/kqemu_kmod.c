/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * kqemu.ko: the parts FreeBSD wants as C data (the character device
 * switch, the module declaration, the malloc type, the sysctl tree).  The
 * code behind them is Rust (src/freebsd in the kqemu crate).
 */

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/conf.h>
#include <sys/kernel.h>
#include <sys/malloc.h>
#include <sys/module.h>
#include <sys/sysctl.h>

#include <vm/vm.h>
#include <vm/pmap.h>
#include <vm/vm_map.h>

#include "kqemu_kmod.h"

MALLOC_DEFINE(M_KQEMU, "kqemu", "kqemu accelerator");

/*
 * No D_NEEDGIANT: the driver does its own locking (the old one ran under
 * Giant).
 */
struct cdevsw kqemu_cdevsw = {
	.d_version =	D_VERSION,
	.d_name =	"kqemu",
	.d_open =	kqemu_open,
	.d_ioctl =	kqemu_ioctl,
};

SYSCTL_NODE(_hw, OID_AUTO, kqemu, CTLFLAG_RD | CTLFLAG_MPSAFE, NULL,
    "kqemu accelerator");
SYSCTL_INT(_hw_kqemu, OID_AUTO, version, CTLFLAG_RD, &kqemu_abi_version, 0,
    "Version of the /dev/kqemu interface");
SYSCTL_UINT(_hw_kqemu, OID_AUTO, instances, CTLFLAG_RD, &kqemu_instances, 0,
    "Open files of /dev/kqemu");

/*
 * Loader tunables (CTLFLAG_RDTUN: fetched from the kernel environment when
 * the module registers its sysctls, before MOD_LOAD): the group and mode
 * of /dev/kqemu.
 */
int kqemu_tunable_gid = GID_WHEEL;
SYSCTL_INT(_hw_kqemu, OID_AUTO, gid, CTLFLAG_RDTUN, &kqemu_tunable_gid, 0,
    "Group of /dev/kqemu");
int kqemu_tunable_mode = 0660;
SYSCTL_INT(_hw_kqemu, OID_AUTO, mode, CTLFLAG_RDTUN, &kqemu_tunable_mode, 0,
    "Permissions of /dev/kqemu");

/*
 * Guest pages the module holds (vm_fault_quick_hold_pages) are wirings that
 * vm.max_user_wired does not count, so the module bounds them itself: all
 * instances together hold at most hw.kqemu.max_locked_pages.  0 at load
 * means the default, half of vm.max_user_wired (src/freebsd/mod.rs); a
 * later change applies from each instance's next KQEMU_EXEC (shrinking
 * caches) and to the next KQEMU_INIT, and 0 written then is a limit of 0
 * (every KQEMU_INIT fails, caches shrink to their minimum), not the
 * default again: the load-time replacement is the only one.
 */
u_int kqemu_max_locked_pages;
SYSCTL_UINT(_hw_kqemu, OID_AUTO, max_locked_pages, CTLFLAG_RWTUN,
    &kqemu_max_locked_pages, 0,
    "Most guest pages all kqemu instances together hold "
    "(0 at load: half of vm.max_user_wired; 0 later: no new instance)");
SYSCTL_UINT(_hw_kqemu, OID_AUTO, locked_pages, CTLFLAG_RD,
    &kqemu_lock_budget.held, 0, "Guest pages kqemu holds now");

DEV_MODULE(kqemu, kqemu_modevent, NULL);
MODULE_VERSION(kqemu, 1);
