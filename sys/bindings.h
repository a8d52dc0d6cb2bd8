/*-
 * SPDX-License-Identifier: BSD-2-Clause
 *
 * What bindgen reads (build.rs): the kernel headers the kld uses, in the
 * order FreeBSD needs them, and the shim's own header.
 */

#define	KQEMU_BINDGEN	1

#include <sys/param.h>
#include <sys/systm.h>
#include <sys/conf.h>
#include <sys/errno.h>
#include <sys/fcntl.h>
#include <sys/kernel.h>
#include <sys/malloc.h>
#include <sys/module.h>
#include <sys/pcpu.h>
#include <sys/proc.h>

#include <vm/vm.h>
#include <vm/pmap.h>
#include <vm/vm_extern.h>
#include <vm/vm_map.h>
#include <vm/vm_object.h>
#include <vm/vm_page.h>
#include <vm/vm_pageout.h>
#include <vm/vm_param.h>

#include "kqemu_kmod.h"

/*
 * Values bindgen cannot evaluate from their macros (casts, or defined on
 * the command line), as enumerators it can.
 */
enum {
	KQEMU_FREEBSD_VERSION = __FreeBSD_version,
	KQEMU_VM_PROT_READ = VM_PROT_READ,
	KQEMU_VM_PROT_WRITE = VM_PROT_WRITE,
};
