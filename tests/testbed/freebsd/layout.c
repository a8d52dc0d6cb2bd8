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
#include <sys/signal.h>
#include <sys/stat.h>
#include <sys/sysctl.h>
#include <sys/thr.h>
#include <sys/time.h>
#include <sys/ucontext.h>

#include <vm/vm.h>
#include <vm/pmap.h>
#include <vm/vm_map.h>
#include <vm/vm_object.h>
#include <vm/vm_page.h>

#include <machine/sigframe.h>

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
OFF(vmspace, vm_refcnt)
OFF(vm_map, timestamp)
OFF(vm_map, header)
SIZE(vm_map_entry)
OFF(vm_map_entry, start)
OFF(vm_map_entry, end)
OFF(vm_map_entry, object)
OFF(vm_map_entry, offset)
OFF(vm_map_entry, protection)
SIZE(vm_object)
SIZE(vm_page)
OFF(vm_page, phys_addr)
OFF(vm_page, flags)
OFF(vm_page, oflags)
OFF(vm_page, valid)
OFF(vm_page, dirty)
K(sizeof_vm_page_bits_t, sizeof(vm_page_bits_t))
K(VM_PAGE_BITS_ALL, VM_PAGE_BITS_ALL)
K(PG_FICTITIOUS, PG_FICTITIOUS)
K(VPO_UNMANAGED, VPO_UNMANAGED)

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

/* Signals (the personality's signal.rs): sigaction(2), the amd64 signal
 * frame sendsig() builds (machine/sigframe.h, x86/ucontext.h), siginfo. */
K(TDA_SIG, TDA_SIG)
K(_SIG_MAXSIG, _SIG_MAXSIG)
K(SIGKILL, SIGKILL)
K(SIGSTOP, SIGSTOP)
K(SIGALRM, SIGALRM)
K(SA_SIGINFO, SA_SIGINFO)
K(SA_NODEFER, SA_NODEFER)
K(SA_RESETHAND, SA_RESETHAND)
K(SI_USER, SI_USER)
K(SI_KERNEL, SI_KERNEL)
K(SS_DISABLE, SS_DISABLE)
K(SIG_BLOCK, SIG_BLOCK)
K(SIG_UNBLOCK, SIG_UNBLOCK)
K(SIG_SETMASK, SIG_SETMASK)
K(ITIMER_REAL, ITIMER_REAL)
K(ITIMER_PROF, ITIMER_PROF)
K(PSL_USERCHANGE, PSL_USERCHANGE)
K(_MC_FPFMT_XMM, _MC_FPFMT_XMM)
K(_MC_FPOWNED_FPU, _MC_FPOWNED_FPU)
K(_MC_FPOWNED_NONE, _MC_FPOWNED_NONE)
K(_MC_HASBASES, _MC_HASBASES)
K(_MC_FLAG_MASK, _MC_FLAG_MASK)
K(ESRCH, ESRCH)
SIZE(sigaction)
OFF(sigaction, sa_flags)
OFF(sigaction, sa_mask)
SIZE(itimerval)
SIZE(sigframe)
OFF(sigframe, sf_uc)
OFF(sigframe, sf_si)
K(sizeof_ucontext, sizeof(ucontext_t))
K(uc_sigmask, offsetof(ucontext_t, uc_sigmask))
K(uc_mcontext, offsetof(ucontext_t, uc_mcontext))
K(uc_stack_ss_flags, offsetof(ucontext_t, uc_stack.ss_flags))
K(sizeof_mcontext, sizeof(mcontext_t))
K(mc_rdi, offsetof(mcontext_t, mc_rdi))
K(mc_rsi, offsetof(mcontext_t, mc_rsi))
K(mc_rdx, offsetof(mcontext_t, mc_rdx))
K(mc_rcx, offsetof(mcontext_t, mc_rcx))
K(mc_r8, offsetof(mcontext_t, mc_r8))
K(mc_r9, offsetof(mcontext_t, mc_r9))
K(mc_rax, offsetof(mcontext_t, mc_rax))
K(mc_rbx, offsetof(mcontext_t, mc_rbx))
K(mc_rbp, offsetof(mcontext_t, mc_rbp))
K(mc_r10, offsetof(mcontext_t, mc_r10))
K(mc_r11, offsetof(mcontext_t, mc_r11))
K(mc_r12, offsetof(mcontext_t, mc_r12))
K(mc_r13, offsetof(mcontext_t, mc_r13))
K(mc_r14, offsetof(mcontext_t, mc_r14))
K(mc_r15, offsetof(mcontext_t, mc_r15))
K(mc_flags, offsetof(mcontext_t, mc_flags))
K(mc_rip, offsetof(mcontext_t, mc_rip))
K(mc_cs, offsetof(mcontext_t, mc_cs))
K(mc_rflags, offsetof(mcontext_t, mc_rflags))
K(mc_rsp, offsetof(mcontext_t, mc_rsp))
K(mc_ss, offsetof(mcontext_t, mc_ss))
K(mc_len, offsetof(mcontext_t, mc_len))
K(mc_fpformat, offsetof(mcontext_t, mc_fpformat))
K(mc_ownedfp, offsetof(mcontext_t, mc_ownedfp))
K(mc_fpstate, offsetof(mcontext_t, mc_fpstate))
K(mc_fsbase, offsetof(mcontext_t, mc_fsbase))
K(mc_gsbase, offsetof(mcontext_t, mc_gsbase))
K(si_signo, offsetof(siginfo_t, si_signo))
K(si_code, offsetof(siginfo_t, si_code))
K(si_pid, offsetof(siginfo_t, si_pid))
K(si_uid, offsetof(siginfo_t, si_uid))

/* Threads (the personality's threads.rs): thr_new(2)'s parameters. */
SIZE(thr_param)
OFF(thr_param, start_func)
OFF(thr_param, arg)
OFF(thr_param, stack_base)
OFF(thr_param, stack_size)
OFF(thr_param, tls_base)
OFF(thr_param, child_tid)
OFF(thr_param, parent_tid)
