/*
 * LD_PRELOAD shim for Debian bookworm's User-mode Linux (6.1) on hosts whose XSAVE area is
 * larger than the one UML was built for (AVX-512, AMX: several KiB instead of 832 bytes).
 *
 * UML saves and restores each guest process's FPU state with
 * ptrace(PTRACE_GETREGSET/PTRACE_SETREGSET, NT_X86_XSTATE) using a fixed 832-byte buffer.
 * The host kernel accepts a shorter buffer for GETREGSET but refuses SETREGSET unless the
 * buffer is the host's full XSAVE size (EFAULT), so the guest's first process dies at start
 * ("userspace - ptrace set fp regs failed, errno = 14", then "Attempted to kill init").
 *
 * Here both calls go through a full-size buffer kept per UML buffer address (one per guest
 * task): GET reads the whole state and hands UML its first part; SET puts UML's part back
 * over the whole state last read for that buffer, so the components UML does not know about
 * (AVX-512, ...) survive a guest context switch instead of being lost. A buffer never read
 * (a task just forked inside UML) starts from the initial state for the components UML does
 * not hold. Every other ptrace request goes straight to libc.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/types.h>
#include <sys/uio.h>

#ifndef NT_X86_XSTATE
#define NT_X86_XSTATE 0x202
#endif
#define PROBE_SIZE (256 * 1024)
#define XSTATE_BV_OFFSET 512          /* the XSAVE header follows the 512-byte legacy area */
#define LEGACY_AND_HEADER 576

typedef long (*ptrace_fn)(int, pid_t, void *, void *);
static ptrace_fn real_ptrace;
static size_t full_size;             /* the host's XSAVE size, learnt from the first GET */

struct slot { void *key; unsigned char *full; };
static struct slot *slots;
static size_t nslots, used;

static struct slot *find(void *key, int create)
{
    if (nslots == 0 || (create && used * 2 >= nslots)) {
        size_t n = nslots ? nslots * 2 : 1024;
        struct slot *grown = calloc(n, sizeof *grown);
        if (!grown) return NULL;
        for (size_t i = 0; i < nslots; i++) {
            if (!slots[i].key) continue;
            size_t j = ((uintptr_t)slots[i].key >> 4) % n;
            while (grown[j].key) j = (j + 1) % n;
            grown[j] = slots[i];
        }
        free(slots);
        slots = grown;
        nslots = n;
    }
    size_t j = ((uintptr_t)key >> 4) % nslots;
    while (slots[j].key && slots[j].key != key) j = (j + 1) % nslots;
    if (slots[j].key) return &slots[j];
    if (!create) return NULL;
    slots[j].full = calloc(1, full_size);
    if (!slots[j].full) return NULL;
    slots[j].key = key;
    used++;
    return &slots[j];
}

static long raw(int req, pid_t pid, void *addr, void *data)
{
    if (!real_ptrace) real_ptrace = (ptrace_fn)dlsym(RTLD_NEXT, "ptrace");
    return real_ptrace(req, pid, addr, data);
}

static int learn_size(pid_t pid)
{
    if (full_size) return 0;
    unsigned char *probe = malloc(PROBE_SIZE);
    if (!probe) return -1;
    struct iovec iov = { probe, PROBE_SIZE };
    long r = raw(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov);
    free(probe);
    if (r < 0) return -1;
    full_size = iov.iov_len;
    return 0;
}

static long xstate_get(pid_t pid, struct iovec *uiov)
{
    if (learn_size(pid) < 0 || uiov->iov_len >= full_size)
        return raw(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, uiov);
    struct slot *s = find(uiov->iov_base, 1);
    if (!s) { errno = ENOMEM; return -1; }
    struct iovec iov = { s->full, full_size };
    long r = raw(PTRACE_GETREGSET, pid, (void *)NT_X86_XSTATE, &iov);
    if (r < 0) return r;
    memcpy(uiov->iov_base, s->full, uiov->iov_len);
    return r;
}

static long xstate_set(pid_t pid, struct iovec *uiov)
{
    if (learn_size(pid) < 0 || uiov->iov_len >= full_size || uiov->iov_len < LEGACY_AND_HEADER)
        return raw(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, uiov);
    struct slot *s = find(uiov->iov_base, 0);
    int fresh = s == NULL;
    if (fresh) s = find(uiov->iov_base, 1);
    if (!s) { errno = ENOMEM; return -1; }
    memcpy(s->full, uiov->iov_base, uiov->iov_len);
    if (fresh) {
        /* only the components inside UML's buffer are meaningful: x87, SSE, AVX */
        uint64_t bv;
        memcpy(&bv, s->full + XSTATE_BV_OFFSET, sizeof bv);
        bv &= 0x7;
        memcpy(s->full + XSTATE_BV_OFFSET, &bv, sizeof bv);
        memset(s->full + XSTATE_BV_OFFSET + 8, 0, 56);     /* XCOMP_BV and reserved */
    }
    struct iovec iov = { s->full, full_size };
    return raw(PTRACE_SETREGSET, pid, (void *)NT_X86_XSTATE, &iov);
}

long ptrace(enum __ptrace_request request, ...)
{
    va_list ap;
    va_start(ap, request);
    pid_t pid = va_arg(ap, pid_t);
    void *addr = va_arg(ap, void *);
    void *data = va_arg(ap, void *);
    va_end(ap);
    if ((request == PTRACE_GETREGSET || request == PTRACE_SETREGSET)
        && (uintptr_t)addr == NT_X86_XSTATE && data) {
        if (request == PTRACE_GETREGSET) return xstate_get(pid, data);
        return xstate_set(pid, data);
    }
    return raw(request, pid, addr, data);
}
