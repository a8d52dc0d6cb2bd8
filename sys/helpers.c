/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * C macros, inline and variadic functions of the kernel, wrapped in
 * functions the Rust side can call, the one walk over struct vm_map_entry
 * fields (kqemu_map_backing) and the reads of struct vm_page fields
 * (kqemu_page_is_managed_ram, kqemu_page_release), kept in C so they go
 * through FreeBSD's own headers.  Nothing else belongs here.
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
#include <vm/vm_object.h>
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
 * Whether a page vm_fault_quick_hold_pages held is ordinary managed
 * memory the module may use as guest RAM.  A device mapping (/dev/mem, a
 * DRM buffer: OBJT_DEVICE, OBJT_SG, OBJT_PHYS objects) gives fictitious
 * pages (PG_FICTITIOUS: no real page behind the vm_page, maybe no direct
 * map entry for its address) or unmanaged ones (VPO_UNMANAGED: no PV
 * entries, so FreeBSD never sees their mappings).  Both flags are set
 * when the page is made and stay while it is held.
 */
int
kqemu_page_is_managed_ram(vm_page_t m)
{

	return ((m->flags & PG_FICTITIOUS) == 0 &&
	    (m->oflags & VPO_UNMANAGED) == 0);
}

/*
 * Releases a page held by vm_fault_quick_hold_pages, marking it dirty
 * first.  The guest writes its RAM through the monitor's shadow page
 * tables and the module writes the dirty bytes and the list pages through
 * the direct map; the pmap's modified bits see neither.  The hold dirtied
 * the page once, but the syncer or msync(2) may clean it while it is
 * held (a MAP_SHARED file), and a clean page is reclaimed after the
 * unhold without being written back: the guest's later writes would be
 * lost.  vm_fault_quick_hold_pages itself dirties held pages without the
 * object lock, which a wired page allows (sys/vm/vm_fault.c,
 * vm_page_clear_dirty_mask); vm_page_dirty asserts that the page is all
 * valid, as a page faulted in for writing is.
 */
void
kqemu_page_release(vm_page_t m)
{

	if (vm_page_all_valid(m))
		vm_page_dirty(m);
	vm_page_unhold_pages(&m, 1);
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
 * The mappings behind the user range start..end of `map`, for the module
 * to tell whether its guest RAM is still the same memory after the map's
 * timestamp moved (any mmap, munmap or mprotect in the process moves it).
 * For each map entry covering the range, at most `max`: the covered part,
 * the entry's vm_object and the object offset of the part's start; parts
 * of one object at consecutive offsets are merged, so a clipped entry
 * (madvise, minherit) is still the same memory.  Returns the number of
 * pieces written, each holding a reference on its object (given back
 * with vm_object_deallocate), or -1, with nothing referenced, when a page
 * of the range is unmapped, an entry is a submap, is not mapped
 * read/write or has no object yet (an untouched anonymous mapping: it
 * gets one at its first fault, so its identity is unknown until then),
 * or the range spans more than `max` entries.
 * Each entry is the one vm_map_lookup_entry finds at the previous entry's
 * end, under the map's read lock.  The reference keeps the object, and so
 * its address, alive: a mapping replaced by another at the same place
 * gets an object at another address, never this one recycled by the
 * object zone.
 */
int
kqemu_map_backing(vm_map_t map, vm_offset_t start, vm_offset_t end,
    struct kqemu_map_piece *pieces, int max)
{
	vm_map_entry_t entry;
	vm_offset_t addr, stop;
	vm_ooffset_t offset;
	uintptr_t object;
	struct kqemu_map_piece *last;
	int i, n;

	if (start >= end || max <= 0)
		return (-1);
	n = 0;
	addr = start;
	vm_map_lock_read(map);
	for (i = 0; i < max && addr < end; i++) {
		if (!vm_map_lookup_entry(map, addr, &entry) ||
		    (entry->eflags & MAP_ENTRY_IS_SUB_MAP) != 0 ||
		    (entry->protection & (VM_PROT_READ | VM_PROT_WRITE)) !=
		    (VM_PROT_READ | VM_PROT_WRITE) ||
		    entry->object.vm_object == NULL)
			break;
		object = (uintptr_t)entry->object.vm_object;
		offset = entry->offset + (addr - entry->start);
		stop = MIN(entry->end, end);
		last = n > 0 ? &pieces[n - 1] : NULL;
		if (last != NULL && last->object == object &&
		    last->end == addr &&
		    last->offset + (addr - last->start) == offset) {
			last->end = stop;
		} else {
			pieces[n].start = addr;
			pieces[n].end = stop;
			pieces[n].object = object;
			pieces[n].offset = offset;
			n++;
		}
		addr = entry->end;
	}
	if (addr < end)
		n = -1;
	/* The entries hold references, so the objects are alive here. */
	for (i = 0; i < n; i++)
		vm_object_reference((vm_object_t)pieces[i].object);
	vm_map_unlock_read(map);
	return (n);
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
