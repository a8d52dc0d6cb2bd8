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
#include <vm/pmap.h>
#include <vm/vm_map.h>
#include <vm/vm_page.h>

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
