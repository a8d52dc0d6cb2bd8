/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * C macros and variadic functions of the kernel, wrapped in functions the
 * Rust side can call.  Nothing else belongs here.
 */

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/conf.h>
#include <sys/malloc.h>
#include <sys/module.h>
#include <sys/pcpu.h>
#include <sys/proc.h>

#include <vm/vm.h>
#include <vm/vm_param.h>
#include <vm/pmap.h>
#include <vm/vm_map.h>
#include <vm/vm_page.h>

#include <machine/cpufunc.h>
#include <machine/fpu.h>
#include <machine/specialreg.h>

#include "kqemu_kmod.h"

struct thread *
kqemu_curthread(void)
{

	return (curthread);
}

vm_paddr_t
kqemu_vm_page_to_phys(vm_page_t m)
{

	return (VM_PAGE_TO_PHYS(m));
}

void *
kqemu_phys_to_dmap(vm_paddr_t pa)
{

	return ((void *)PHYS_TO_DMAP(pa));
}

/*
 * vtophys(9) (pmap_kextract): the physical address of a mapped kernel
 * address (the module's image, the direct map); 0 when unmapped.
 */
vm_paddr_t
kqemu_vtophys(vm_offset_t va)
{

	return (vtophys(va));
}

int
kqemu_make_dev_s(struct make_dev_args *args, struct cdev **cdev,
    const char *name)
{

	return (make_dev_s(args, cdev, "%s", name));
}

void
kqemu_vm_map_lock_read(vm_map_t map)
{

	vm_map_lock_read(map);
}

void
kqemu_vm_map_unlock_read(vm_map_t map)
{

	vm_map_unlock_read(map);
}

/*
 * Begins running guest code: critical_enter(9) (no preemption, so no
 * migration and no context switch until kqemu_cpu_leave), and the
 * calling thread's user FPU state live in the registers with CR0.TS
 * clear, as the guest runs on it (ABI.md "Guest FPU contract").  With
 * FreeBSD's eager FPU switching the state is normally live already; if
 * CR0.TS is set, fpudna() (sys/amd64/amd64/fpu.c, the #NM handler) loads
 * the thread's state from its pcb and clears TS, the way the kernel does
 * on a user thread's first FPU instruction.  Returns the CPU index.
 */
u_int
kqemu_cpu_enter(void)
{

	critical_enter();
	if ((rcr0() & CR0_TS) != 0)
		fpudna();
	return (PCPU_GET(cpuid));
}

void
kqemu_cpu_leave(void)
{

	critical_exit();
}
