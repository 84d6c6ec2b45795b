/*
 * LD_PRELOAD shim letting Debian's oxenstored (xen-utils-4.17) run without a hypervisor
 * (and its C xenstored, for the tests of what only that daemon does).
 *
 * Built at first use by shyped/sandbox/xenstored.py (gcc -shared -fPIC ... -ldl).
 * Why each piece exists (see docs/sandbox.md):
 *
 *  - xc_interface_open/close: domains.ml opens a libxenctrl handle at module
 *    initialisation (`let xc = Xenctrl.interface_open ()`), which fails without
 *    /dev/xen/privcmd and kills the daemon.  We hand back a dummy non-NULL handle.
 *  - xenevtchn_*: Event.init opens the event channel device and binds VIRQ_DOM_EXC.
 *    The "device" is a FIFO in the run directory: each byte written to it is one
 *    VIRQ_DOM_EXC (what Xen raises when a domain shuts down or dies).  Binding
 *    calls hand out fresh port numbers; notifications go nowhere.
 *  - xc_domain_getinfolist: answers from $RUNDIR/domain-state/<domid> files, so
 *    on VIRQ_DOM_EXC oxenstored's Domains.cleanup sees the state the sandbox
 *    toolstack set and fires @releaseDomain by itself, as on a real host.
 *  - xc_map_foreign_range: returns a zeroed anonymous page, so XS_INTRODUCE from
 *    the sandbox toolstack succeeds (and fires @introduceDomain) with a ring no
 *    guest ever drives.  xc_get_last_error: a static "no error" for failwith_xc.
 *  - setrlimit(RLIMIT_NOFILE): oxenstored raises the limit to fs.nr_open and
 *    dies with EPERM without CAP_SYS_RESOURCE; we clamp to the hard limit.
 *  - Paths: the daemon's run directory is compiled in as /var/run/xenstored
 *    (socket, live-update db).  When SHYPED_XENSTORED_RUNDIR is set, every
 *    path under /var/run/xenstored or /run/xenstored is rewritten below it in
 *    open/openat/unlink/mkdir/rename/stat/access/chmod/bind/connect, so several
 *    instances run side by side and the host's real xenstored is never touched.
 *  - C xenstored (/usr/lib/xen-4.17/bin/xenstored, tests/cxenstored_helpers.py)
 *    needs a little more: xengnttab_* (the grant device, opened at start, and
 *    the ring of an introduced domain), xc_domain_getinfo (the same state
 *    files), chmod of its socket, and /proc/xen (dom0's xsd_kva and xsd_port)
 *    rewritten below the run directory like /var/run/xenstored.
 *  - SHYPED_XENSTORED_PARENT_PID: if set, the daemon asks for SIGKILL when its
 *    parent dies (PR_SET_PDEATHSIG) and exits at once if that parent is already
 *    gone, so killed test runs leave no oxenstored behind.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

/* ------------------------------------------------------------------ */
/* parent-death signal                                                 */

__attribute__((constructor)) static void shyped_preload_init(void)
{
    const char *ppid = getenv("SHYPED_XENSTORED_PARENT_PID");
    if (ppid == NULL || *ppid == '\0')
        return;
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        return;
    /* The parent may have died between fork and the prctl above. */
    if ((long)getppid() != strtol(ppid, NULL, 10))
        _exit(99);
}

/* ------------------------------------------------------------------ */
/* path rewriting                                                      */

/* /proc/xen: C xenstored reads dom0's ring (xsd_kva) and port (xsd_port) there. */
static const char *const run_prefixes[] = {"/var/run/xenstored", "/run/xenstored", "/proc/xen",
                                           NULL};

/* Return `path` or, if it lies under the daemon's run directory, a rewritten
 * copy in `buf`.  Rewriting only happens when SHYPED_XENSTORED_RUNDIR is set. */
static const char *rewrite(const char *path, char *buf, size_t size)
{
    const char *rundir;
    size_t i;

    if (path == NULL)
        return path;
    rundir = getenv("SHYPED_XENSTORED_RUNDIR");
    if (rundir == NULL || *rundir == '\0')
        return path;
    for (i = 0; run_prefixes[i] != NULL; i++) {
        size_t n = strlen(run_prefixes[i]);
        if (strncmp(path, run_prefixes[i], n) == 0 && (path[n] == '\0' || path[n] == '/')) {
            int len = snprintf(buf, size, "%s%s", rundir, path + n);
            if (len < 0 || (size_t)len >= size)
                return NULL; /* caller fails with ENAMETOOLONG */
            return buf;
        }
    }
    return path;
}

#define NEXT(ret, name, ...)                                                      \
    static ret (*real_##name)(__VA_ARGS__);                                       \
    if (real_##name == NULL)                                                      \
        real_##name = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name);

#define REWRITE_OR_FAIL(var, src, buf)                                            \
    const char *var = rewrite((src), (buf), sizeof(buf));                         \
    if (var == NULL) {                                                            \
        errno = ENAMETOOLONG;                                                     \
        return -1;                                                                \
    }

static int open_common(const char *sym, int dirfd, int at, const char *path, int flags,
                       mode_t mode)
{
    char buf[4096];
    REWRITE_OR_FAIL(p, path, buf);
    if (at) {
        int (*real)(int, const char *, int, ...) =
            (int (*)(int, const char *, int, ...))dlsym(RTLD_NEXT, sym);
        return real(dirfd, p, flags, mode);
    }
    int (*real)(const char *, int, ...) = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, sym);
    return real(p, flags, mode);
}

static mode_t open_mode(int flags, va_list ap)
{
    if ((flags & O_CREAT) || (flags & __O_TMPFILE) == __O_TMPFILE)
        return (mode_t)va_arg(ap, int);
    return 0;
}

EXPORT int open(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("open", 0, 0, path, flags, mode);
}

EXPORT int open64(const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("open64", 0, 0, path, flags, mode);
}

EXPORT int openat(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("openat", dirfd, 1, path, flags, mode);
}

EXPORT int openat64(int dirfd, const char *path, int flags, ...)
{
    va_list ap;
    va_start(ap, flags);
    mode_t mode = open_mode(flags, ap);
    va_end(ap);
    return open_common("openat64", dirfd, 1, path, flags, mode);
}

EXPORT int unlink(const char *path)
{
    char buf[4096];
    NEXT(int, unlink, const char *);
    REWRITE_OR_FAIL(p, path, buf);
    return real_unlink(p);
}

EXPORT int mkdir(const char *path, mode_t mode)
{
    char buf[4096];
    NEXT(int, mkdir, const char *, mode_t);
    REWRITE_OR_FAIL(p, path, buf);
    return real_mkdir(p, mode);
}

EXPORT int rmdir(const char *path)
{
    char buf[4096];
    NEXT(int, rmdir, const char *);
    REWRITE_OR_FAIL(p, path, buf);
    return real_rmdir(p);
}

EXPORT int rename(const char *from, const char *to)
{
    char buf1[4096], buf2[4096];
    NEXT(int, rename, const char *, const char *);
    REWRITE_OR_FAIL(f, from, buf1);
    REWRITE_OR_FAIL(t, to, buf2);
    return real_rename(f, t);
}

EXPORT int chmod(const char *path, mode_t mode)
{
    char buf[4096];
    NEXT(int, chmod, const char *, mode_t);
    REWRITE_OR_FAIL(p, path, buf);
    return real_chmod(p, mode);
}

EXPORT int access(const char *path, int mode)
{
    char buf[4096];
    NEXT(int, access, const char *, int);
    REWRITE_OR_FAIL(p, path, buf);
    return real_access(p, mode);
}

EXPORT int stat(const char *path, struct stat *st)
{
    char buf[4096];
    NEXT(int, stat, const char *, struct stat *);
    REWRITE_OR_FAIL(p, path, buf);
    return real_stat(p, st);
}

EXPORT int lstat(const char *path, struct stat *st)
{
    char buf[4096];
    NEXT(int, lstat, const char *, struct stat *);
    REWRITE_OR_FAIL(p, path, buf);
    return real_lstat(p, st);
}

/* Rewrite an AF_UNIX address; returns the address to use (maybe `out`). */
static const struct sockaddr *rewrite_sockaddr(const struct sockaddr *addr, socklen_t *len,
                                               struct sockaddr_un *out, int *err)
{
    char buf[4096];
    const struct sockaddr_un *un = (const struct sockaddr_un *)addr;
    char path[sizeof(un->sun_path) + 1];
    const char *p;
    size_t plen;

    *err = 0;
    if (addr == NULL || addr->sa_family != AF_UNIX || *len <= offsetof(struct sockaddr_un, sun_path))
        return addr;
    plen = *len - offsetof(struct sockaddr_un, sun_path);
    if (plen > sizeof(un->sun_path))
        plen = sizeof(un->sun_path);
    memcpy(path, un->sun_path, plen);
    path[plen] = '\0';
    if (path[0] == '\0') /* abstract socket */
        return addr;
    p = rewrite(path, buf, sizeof(buf));
    if (p == NULL || strlen(p) >= sizeof(out->sun_path)) {
        *err = ENAMETOOLONG;
        return NULL;
    }
    if (p == path)
        return addr;
    memset(out, 0, sizeof(*out));
    out->sun_family = AF_UNIX;
    strcpy(out->sun_path, p);
    *len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(p) + 1);
    return (const struct sockaddr *)out;
}

EXPORT int bind(int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_un out;
    int err;
    NEXT(int, bind, int, const struct sockaddr *, socklen_t);
    const struct sockaddr *a = rewrite_sockaddr(addr, &len, &out, &err);
    if (a == NULL) {
        errno = err;
        return -1;
    }
    return real_bind(fd, a, len);
}

EXPORT int connect(int fd, const struct sockaddr *addr, socklen_t len)
{
    struct sockaddr_un out;
    int err;
    NEXT(int, connect, int, const struct sockaddr *, socklen_t);
    const struct sockaddr *a = rewrite_sockaddr(addr, &len, &out, &err);
    if (a == NULL) {
        errno = err;
        return -1;
    }
    return real_connect(fd, a, len);
}

/* ------------------------------------------------------------------ */
/* setrlimit clamp                                                     */

static int clamp_rlimit(int resource, const struct rlimit *rl, struct rlimit *out)
{
    struct rlimit cur;
    if (resource != RLIMIT_NOFILE || rl == NULL || getrlimit(resource, &cur) != 0)
        return 0;
    *out = *rl;
    if (out->rlim_max > cur.rlim_max)
        out->rlim_max = cur.rlim_max;
    if (out->rlim_cur > out->rlim_max)
        out->rlim_cur = out->rlim_max;
    return 1;
}

EXPORT int setrlimit(__rlimit_resource_t resource, const struct rlimit *rl)
{
    struct rlimit clamped;
    NEXT(int, setrlimit, __rlimit_resource_t, const struct rlimit *);
    if (clamp_rlimit((int)resource, rl, &clamped))
        rl = &clamped;
    return real_setrlimit(resource, rl);
}

EXPORT int setrlimit64(__rlimit_resource_t resource, const struct rlimit64 *rl)
{
    struct rlimit clamped;
    NEXT(int, setrlimit64, __rlimit_resource_t, const struct rlimit64 *);
    if (clamp_rlimit((int)resource, (const struct rlimit *)rl, &clamped))
        rl = (const struct rlimit64 *)&clamped;
    return real_setrlimit64(resource, rl);
}

/* ------------------------------------------------------------------ */
/* libxenctrl                                                          */

static int dummy_xc_handle;

EXPORT void *xc_interface_open(void *logger, void *dombuild_logger, unsigned open_flags)
{
    (void)logger;
    (void)dombuild_logger;
    (void)open_flags;
    return &dummy_xc_handle;
}

EXPORT int xc_interface_close(void *xch)
{
    (void)xch;
    return 0;
}

/* XS_INTRODUCE maps the guest's xenstore ring page (domains.ml: Domains.create).  We hand
 * back a private zeroed page: the ring stays empty forever (no guest drives it), but the
 * introduction succeeds, so oxenstored registers the domain and fires @introduceDomain, and a
 * later XS_RELEASE fires @releaseDomain, as on a real host.  Xenmmap.unmap munmaps it. */
EXPORT void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot, unsigned long mfn)
{
    void *page;
    (void)xch;
    (void)dom;
    (void)mfn;
    page = mmap(NULL, (size_t)size, prot | PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1,
                0);
    return page == MAP_FAILED ? NULL : page;
}

/* Without a hypervisor, a domain's state comes from $RUNDIR/domain-state/<domid>, written by
 * SandboxXenstored.set_domain_state(): absent or "running" -> running; "shutdown <code>";
 * "dying"; "gone" (no such domain).  oxenstored asks for it (Domains.cleanup, via the OCaml
 * stub_xc_domain_getinfo) when the VIRQ_DOM_EXC event fires, exactly as on a real host. */

/* struct xen_domctl_getdomaininfo, xen/include/public/domctl.h, Xen 4.17 (x86). */
struct shyped_domaininfo {
    uint16_t domain;
    uint16_t pad1;
    uint32_t flags;
    uint64_t tot_pages, max_pages, outstanding_pages, shr_pages, paged_pages;
    uint64_t shared_info_frame, cpu_time;
    uint32_t nr_online_vcpus, max_vcpu_id, ssidref;
    uint8_t handle[16];
    uint32_t cpupool;
    uint8_t gpaddr_bits;
    uint8_t pad2[7];
    uint32_t emulation_flags, misc_flags; /* struct xen_arch_domainconfig */
};

#define DOMINF_DYING (1U << 0)
#define DOMINF_SHUTDOWN (1U << 2)
#define DOMINF_RUNNING (1U << 5)
#define DOMINF_SHUTDOWNSHIFT 16

/* The state file of `domid`: fills `state` ("running" if absent) and `code`. */
static void domain_state(uint32_t domid, char state[64], unsigned *code)
{
    char path[4096];
    const char *rundir = getenv("SHYPED_XENSTORED_RUNDIR");

    strcpy(state, "running");
    *code = 0;
    if (rundir != NULL && *rundir != '\0') {
        FILE *f;
        snprintf(path, sizeof(path), "%s/domain-state/%u", rundir, domid);
        f = fopen(path, "re");
        if (f != NULL) {
            if (fscanf(f, "%63s %u", state, code) < 1)
                strcpy(state, "running");
            fclose(f);
        }
    }
}

EXPORT int xc_domain_getinfolist(void *xch, uint32_t first_domain, unsigned int max_domains,
                                 struct shyped_domaininfo *info)
{
    char state[64];
    unsigned code;
    (void)xch;

    if (max_domains == 0)
        return 0;
    domain_state(first_domain, state, &code);
    if (strcmp(state, "gone") == 0)
        return 0;
    memset(info, 0, sizeof(*info));
    info->domain = (uint16_t)first_domain;
    info->nr_online_vcpus = 1;
    if (strcmp(state, "dying") == 0)
        info->flags = DOMINF_DYING;
    else if (strcmp(state, "shutdown") == 0)
        info->flags = DOMINF_SHUTDOWN | ((code & 0xff) << DOMINF_SHUTDOWNSHIFT);
    else
        info->flags = DOMINF_RUNNING;
    return 1;
}

/* C xenstored (tools/xenstore/xenstored_domain.c get_domain_info) asks through the older
 * xc_domain_getinfo: xc_dominfo_t, tools/include/xenctrl.h (4.17), starts with domid,
 * ssidref, then the flag bits dying:1 crashed:1 shutdown:1 paused:1 blocked:1 running:1 ...
 * and shutdown_reason; only those are filled (the caller reads no more). */
struct shyped_dominfo_head {
    uint32_t domid;
    uint32_t ssidref;
    uint32_t flags;
    uint32_t shutdown_reason;
};

EXPORT int xc_domain_getinfo(void *xch, uint32_t first_domid, unsigned int max_doms,
                             struct shyped_dominfo_head *info)
{
    char state[64];
    unsigned code;
    (void)xch;

    if (max_doms == 0)
        return 0;
    domain_state(first_domid, state, &code);
    if (strcmp(state, "gone") == 0)
        return 0;
    info->domid = first_domid;
    info->ssidref = 0;
    info->shutdown_reason = 0;
    if (strcmp(state, "dying") == 0)
        info->flags = 1U << 0;
    else if (strcmp(state, "shutdown") == 0) {
        info->flags = 1U << 2;
        info->shutdown_reason = code;
    } else
        info->flags = 1U << 5;
    return 1;
}

/* xc_error, tools/include/xenctrl.h: failwith_xc() reads it from our dummy handle. */
static struct {
    int code;
    char message[1024];
} no_xc_error;

EXPORT const void *xc_get_last_error(void *xch)
{
    (void)xch;
    return &no_xc_error;
}

/* ------------------------------------------------------------------ */
/* libxenevtchn                                                        */

/* The "event channel device" is a FIFO, $RUNDIR/evtchn (a pipe when RUNDIR is unset).  Every
 * byte written to it is one VIRQ_DOM_EXC, the virtual interrupt Xen raises when a domain
 * shuts down or dies; nothing else is ever pending.  Binding calls hand out fresh ports;
 * notifications go nowhere. */
struct shyped_evtchn {
    int fd;
    int write_fd;
    int next_port;
    int virq_port;
};

EXPORT void *xenevtchn_open(void *logger, unsigned open_flags)
{
    struct shyped_evtchn *h;
    const char *rundir = getenv("SHYPED_XENSTORED_RUNDIR");
    (void)logger;
    (void)open_flags;
    h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    h->write_fd = -1;
    if (rundir != NULL && *rundir != '\0') {
        char path[4096];
        snprintf(path, sizeof(path), "%s/evtchn", rundir);
        if (mkfifo(path, 0600) != 0 && errno != EEXIST)
            goto fail;
        /* O_RDWR: the open never blocks and the FIFO never reports EOF. */
        h->fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
        if (h->fd < 0)
            goto fail;
    } else {
        int p[2];
        if (pipe2(p, O_CLOEXEC | O_NONBLOCK) != 0)
            goto fail;
        h->fd = p[0];
        h->write_fd = p[1];
    }
    h->next_port = 1;
    h->virq_port = -1;
    return h;
fail:
    free(h);
    return NULL;
}

EXPORT void *xenevtchn_fdopen(void *logger, int fd, unsigned open_flags)
{
    (void)fd;
    return xenevtchn_open(logger, open_flags);
}

EXPORT int xenevtchn_close(void *xh)
{
    struct shyped_evtchn *h = xh;
    if (h == NULL)
        return 0;
    close(h->fd);
    if (h->write_fd >= 0)
        close(h->write_fd);
    free(h);
    return 0;
}

EXPORT int xenevtchn_fd(void *xh)
{
    return ((struct shyped_evtchn *)xh)->fd;
}

EXPORT int xenevtchn_bind_virq(void *xh, unsigned int virq)
{
    struct shyped_evtchn *h = xh;
    (void)virq;
    h->virq_port = h->next_port++;
    return h->virq_port;
}

EXPORT int xenevtchn_bind_interdomain(void *xh, uint32_t domid, int remote_port)
{
    (void)domid;
    (void)remote_port;
    return ((struct shyped_evtchn *)xh)->next_port++;
}

EXPORT int xenevtchn_bind_unbound_port(void *xh, uint32_t domid)
{
    (void)domid;
    return ((struct shyped_evtchn *)xh)->next_port++;
}

EXPORT int xenevtchn_unbind(void *xh, int port)
{
    (void)xh;
    (void)port;
    return 0;
}

EXPORT int xenevtchn_notify(void *xh, int port)
{
    (void)xh;
    (void)port;
    return 0;
}

EXPORT int xenevtchn_pending(void *xh)
{
    struct shyped_evtchn *h = xh;
    char byte;
    ssize_t n = read(h->fd, &byte, 1);
    if (n == 1 && h->virq_port >= 0)
        return h->virq_port;
    errno = EAGAIN;
    return -1;
}

EXPORT int xenevtchn_unmask(void *xh, int port)
{
    (void)xh;
    (void)port;
    return 0;
}

/* ------------------------------------------------------------------ */
/* libxengnttab (C xenstored only)                                     */

/* C xenstored opens the grant device at start and maps a guest's ring with the reserved
 * xenstore grant at XS_INTRODUCE: the same zeroed private page as xc_map_foreign_range. */
static int dummy_gnttab_handle;

EXPORT void *xengnttab_open(void *logger, unsigned open_flags)
{
    (void)logger;
    (void)open_flags;
    return &dummy_gnttab_handle;
}

EXPORT int xengnttab_close(void *xgt)
{
    (void)xgt;
    return 0;
}

EXPORT int xengnttab_set_max_grants(void *xgt, uint32_t nr_grants)
{
    (void)xgt;
    (void)nr_grants;
    return 0;
}

EXPORT void *xengnttab_map_grant_ref(void *xgt, uint32_t domid, uint32_t ref, int prot)
{
    void *page;
    (void)xgt;
    (void)domid;
    (void)ref;
    page = mmap(NULL, 4096, prot | PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    return page == MAP_FAILED ? NULL : page;
}

EXPORT int xengnttab_unmap(void *xgt, void *start_address, uint32_t count)
{
    (void)xgt;
    return munmap(start_address, 4096 * (size_t)count);
}
