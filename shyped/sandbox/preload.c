/*
 * LD_PRELOAD shim letting Debian's oxenstored (xen-utils-4.17) run without a hypervisor.
 *
 * Built at first use by shyped/sandbox/xenstored.py (gcc -shared -fPIC ... -ldl).
 * Why each piece exists (see docs/sandbox.md):
 *
 *  - xc_interface_open/close: domains.ml opens a libxenctrl handle at module
 *    initialisation (`let xc = Xenctrl.interface_open ()`), which fails without
 *    /dev/xen/privcmd and kills the daemon.  We hand back a dummy non-NULL handle.
 *  - xenevtchn_*: xenstored.ml calls Event.init (xenevtchn_open) unconditionally.
 *    The handle owns a pipe whose read end is the "event channel fd": nothing
 *    ever writes it, so no event ever fires.  Binding calls return fake ports.
 *  - xc_map_foreign_range: fails (ENOSYS) so XS_INTRODUCE of a domain fails
 *    cleanly instead of mapping a ring no one services.
 *  - setrlimit(RLIMIT_NOFILE): oxenstored raises the limit to fs.nr_open and
 *    dies with EPERM without CAP_SYS_RESOURCE; we clamp to the hard limit.
 *  - Paths: the daemon's run directory is compiled in as /var/run/xenstored
 *    (socket, live-update db).  When SHYPED_XENSTORED_RUNDIR is set, every
 *    path under /var/run/xenstored or /run/xenstored is rewritten below it in
 *    open/openat/unlink/mkdir/rename/stat/access/bind/connect, so several
 *    instances run side by side and the host's real xenstored is never touched.
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

static const char *const run_prefixes[] = {"/var/run/xenstored", "/run/xenstored", NULL};

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

EXPORT void *xc_map_foreign_range(void *xch, uint32_t dom, int size, int prot, unsigned long mfn)
{
    (void)xch;
    (void)dom;
    (void)size;
    (void)prot;
    (void)mfn;
    errno = ENOSYS;
    return NULL;
}

/* ------------------------------------------------------------------ */
/* libxenevtchn                                                        */

struct shyped_evtchn {
    int pipe[2];
    int next_port;
};

EXPORT void *xenevtchn_open(void *logger, unsigned open_flags)
{
    struct shyped_evtchn *h;
    (void)logger;
    (void)open_flags;
    h = calloc(1, sizeof(*h));
    if (h == NULL)
        return NULL;
    if (pipe2(h->pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
        free(h);
        return NULL;
    }
    h->next_port = 1;
    return h;
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
    close(h->pipe[0]);
    close(h->pipe[1]);
    free(h);
    return 0;
}

EXPORT int xenevtchn_fd(void *xh)
{
    return ((struct shyped_evtchn *)xh)->pipe[0];
}

EXPORT int xenevtchn_bind_virq(void *xh, unsigned int virq)
{
    (void)virq;
    return ((struct shyped_evtchn *)xh)->next_port++;
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
    (void)xh;
    errno = EAGAIN;
    return -1;
}

EXPORT int xenevtchn_unmask(void *xh, int port)
{
    (void)xh;
    (void)port;
    return 0;
}
