/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * Layout probe for the testbed's FreeBSD personality (tests/testbed/src/freebsd).
 * build.rs compiles this file against one release's kernel headers with
 * `clang -S` and turns every `kq_<name>` constant into a Rust constant, so
 * the personality builds struct pcpu, struct thread, struct cdev, ... with
 * the offsets the module (compiled against the same headers) expects.
 */

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/conf.h>
#include <sys/errno.h>
#include <sys/fcntl.h>
#include <sys/ioccom.h>
#include <sys/kernel.h>
#include <sys/malloc.h>
#include <sys/module.h>
#include <sys/pcpu.h>
#include <sys/proc.h>
#include <sys/stat.h>
#include <sys/sysctl.h>

#include <vm/vm.h>
#include <vm/pmap.h>
#include <vm/vm_map.h>
#include <vm/vm_page.h>

#define	K(name, value)	const unsigned long kq_##name = (unsigned long)(value);
#define	OFF(s, f)	K(s##_##f, offsetof(struct s, f))
#define	SIZE(s)		K(sizeof_##s, sizeof(struct s))

K(freebsd_version, __FreeBSD_version)

SIZE(pcpu)
OFF(pcpu, pc_curthread)
OFF(pcpu, pc_fpcurthread)
OFF(pcpu, pc_cpuid)
SIZE(thread)
OFF(thread, td_proc)
OFF(thread, td_critnest)
OFF(thread, td_owepreempt)
OFF(thread, td_ast)
K(TDA_SCHED, TDA_SCHED)
SIZE(proc)
OFF(proc, p_vmspace)
OFF(proc, p_pid)
SIZE(vmspace)
OFF(vmspace, vm_map)
SIZE(vm_page)
OFF(vm_page, phys_addr)

OFF(malloc_type, ks_version)
OFF(malloc_type, ks_shortdesc)
K(M_VERSION, M_VERSION)
K(M_NOWAIT, M_NOWAIT)
K(M_WAITOK, M_WAITOK)
K(M_ZERO, M_ZERO)

SIZE(sysctl_oid)
OFF(sysctl_oid, oid_parent)
OFF(sysctl_oid, oid_children)
OFF(sysctl_oid, oid_kind)
OFF(sysctl_oid, oid_arg1)
OFF(sysctl_oid, oid_arg2)
OFF(sysctl_oid, oid_name)
OFF(sysctl_oid, oid_handler)
SIZE(sysctl_req)
OFF(sysctl_req, td)
OFF(sysctl_req, oldptr)
OFF(sysctl_req, oldlen)
OFF(sysctl_req, oldidx)
OFF(sysctl_req, oldfunc)
OFF(sysctl_req, newptr)
OFF(sysctl_req, newlen)
OFF(sysctl_req, newidx)
OFF(sysctl_req, newfunc)
K(CTLTYPE, CTLTYPE)
K(CTLTYPE_NODE, CTLTYPE_NODE)
K(CTLTYPE_INT, CTLTYPE_INT)
K(CTLTYPE_UINT, CTLTYPE_UINT)
K(CTLFLAG_TUN, CTLFLAG_TUN)

OFF(cdevsw, d_version)
OFF(cdevsw, d_name)
OFF(cdevsw, d_open)
OFF(cdevsw, d_close)
OFF(cdevsw, d_ioctl)
K(D_VERSION, D_VERSION)
SIZE(cdev)
OFF(cdev, si_drv1)
OFF(cdev, si_drv2)
OFF(cdev, si_devsw)
OFF(cdev, si_name)
K(SPECNAMELEN, SPECNAMELEN)
SIZE(make_dev_args)
OFF(make_dev_args, mda_size)
OFF(make_dev_args, mda_flags)
OFF(make_dev_args, mda_devsw)
OFF(make_dev_args, mda_uid)
OFF(make_dev_args, mda_gid)
OFF(make_dev_args, mda_mode)
OFF(make_dev_args, mda_si_drv1)
OFF(make_dev_args, mda_si_drv2)
K(MAKEDEV_WAITOK, MAKEDEV_WAITOK)
K(MAKEDEV_NOWAIT, MAKEDEV_NOWAIT)
K(MAKEDEV_CHECKNAME, MAKEDEV_CHECKNAME)

K(MOD_LOAD, MOD_LOAD)
K(MOD_UNLOAD, MOD_UNLOAD)
K(MOD_QUIESCE, MOD_QUIESCE)

K(O_ACCMODE, O_ACCMODE)
K(S_IFCHR, S_IFCHR)
K(IOC_VOID, IOC_VOID)
K(IOC_OUT, IOC_OUT)
K(IOC_IN, IOC_IN)
K(IOCPARM_MAX, IOCPARM_MAX)
K(IOCPARM_MASK, IOCPARM_MASK)
K(VM_PROT_WRITE, VM_PROT_WRITE)

K(EPERM, EPERM)
K(ENOENT, ENOENT)
K(ENXIO, ENXIO)
K(EBADF, EBADF)
K(ENOMEM, ENOMEM)
K(EFAULT, EFAULT)
K(EBUSY, EBUSY)
K(EEXIST, EEXIST)
K(ENODEV, ENODEV)
K(EINVAL, EINVAL)
K(EMFILE, EMFILE)
K(ENOTTY, ENOTTY)
K(ENOSYS, ENOSYS)
K(EOPNOTSUPP, EOPNOTSUPP)

#if __FreeBSD_version >= 1500000
K(sizeof_kva_layout, sizeof(struct kva_layout_s))
K(kva_layout_dmap_low, offsetof(struct kva_layout_s, dmap_low))
K(kva_layout_dmap_high, offsetof(struct kva_layout_s, dmap_high))
#endif
