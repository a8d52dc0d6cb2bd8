/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * The interface between the C shim of kqemu.ko (kqemu_kmod.c, helpers.c)
 * and its Rust side (src/freebsd in the kqemu crate).  bindgen reads this
 * header too, so the Rust declarations come from the same text.
 */

#ifndef _KQEMU_KMOD_H_
#define	_KQEMU_KMOD_H_

/* Defined by the C shim, kqemu_kmod.c. */
MALLOC_DECLARE(M_KQEMU);
extern struct cdevsw kqemu_cdevsw;
extern int kqemu_tunable_gid;
extern int kqemu_tunable_mode;
extern u_int kqemu_max_locked_pages;

/*
 * Defined by the Rust side.  Not given to bindgen (the Rust definitions
 * are the originals); the Rust side checks its entry points against the
 * d_open_t / d_ioctl_t / modeventhand_t / d_priv_dtor_t types instead.
 */
#ifndef KQEMU_BINDGEN
extern u_int kqemu_instances;
/* The module-wide books of held pages (src/host.rs LockBudget, repr(C)). */
struct kqemu_lock_budget {
	u_int	held;
	uint64_t promised;
};
extern struct kqemu_lock_budget kqemu_lock_budget;
extern int kqemu_abi_version;
int	kqemu_modevent(module_t mod, int type, void *arg);
d_open_t kqemu_open;
d_ioctl_t kqemu_ioctl;
d_priv_dtor_t kqemu_cdevpriv_dtor;
#endif

/* Macros and variadic functions, as functions Rust can call (helpers.c). */
struct thread *kqemu_curthread(void);
vm_paddr_t kqemu_vm_page_to_phys(vm_page_t m);
void	*kqemu_phys_to_dmap(vm_paddr_t pa);
int	kqemu_page_is_managed_ram(vm_page_t m);
void	kqemu_page_release(vm_page_t m);
vm_paddr_t kqemu_vtophys(vm_offset_t va);
int	kqemu_make_dev_s(struct make_dev_args *args, struct cdev **cdev,
	    const char *name);
void	kqemu_vm_map_lock_read(vm_map_t map);
void	kqemu_vm_map_unlock_read(vm_map_t map);
/*
 * One part of a user range and the mapping behind it
 * (kqemu_map_backing): `object` is the entry's vm_object_t, only compared.
 */
struct kqemu_map_piece {
	vm_offset_t	start;
	vm_offset_t	end;
	uintptr_t	object;
	vm_ooffset_t	offset;
};
int	kqemu_map_backing(vm_map_t map, vm_offset_t start, vm_offset_t end,
	    struct kqemu_map_piece *pieces, int max);
u_int	kqemu_cpu_enter(void);
void	kqemu_cpu_leave(void);

#endif /* !_KQEMU_KMOD_H_ */
