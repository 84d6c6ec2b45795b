/*
 * xenpeer: what two colluding guests do to talk without xenstore, for the e2e tier's FLASK
 * scenarios (tests/e2e/scenarios/flask.sh).  Built static at image build (tests/e2e/builder.py)
 * into the domU initramfs as /usr/bin/xenpeer.
 *
 * The offering guest (a) allocates an unbound event channel port for the peer domain
 * (/dev/xen/evtchn, IOCTL_EVTCHN_BIND_UNBOUND_PORT) and (b) grants the peer a page
 * (/dev/xen/gntalloc, IOCTL_GNTALLOC_ALLOC_GREF, writable) holding a known text.  The peer
 * binds the port (IOCTL_EVTCHN_BIND_INTERDOMAIN) and sends an event, maps the grant
 * (/dev/xen/gntdev, IOCTL_GNTDEV_MAP_GRANT_REF + mmap: the map hypercall happens in mmap),
 * reads the text, writes a reply into the page, and copies the page with a grant copy
 * (IOCTL_GNTDEV_GRANT_COPY), whose per-segment status is Xen's own GNTST_* code.
 *
 * Port and grant numbers never travel between the guests: each guest prints them on its
 * console ("XENPEER <id> key=value ..." lines, which dom0 reads from xenconsoled's log) and
 * takes its commands from the xenstore node xenpeer/cmd under its own home, which dom0 writes
 * and only that guest (and dom0) can read:
 *   "<id> offer <peer>"                 (a) and (b) for <peer>; the state is kept
 *   "<id> take <peer> <port> <gref>"    bind, notify, map, read, reply, copy (port "-":
 *                                       no port was offered, skip the bind)
 *   "<id> notify"                       send an event on the port the last take bound
 *   "<id> check"                        an event pending on the offered port? the page text
 * Every result line names the operation and either its outcome or "errno=<n> (<name>)"; the
 * last line of a command is "XENPEER <id> done".
 *
 * Usage: xenpeer serve        (poll xenpeer/cmd five times a second, run each new command)
 *        xenpeer <command words without the id>   (once, id 0; for trying it by hand)
 *
 * UAPI from Debian's linux-libc-dev (<xen/evtchn.h>, <xen/gntalloc.h>, <xen/gntdev.h>); the
 * xenstore wire format and GNTCOPY_* flags are Xen's public headers
 * (xen/include/public/io/xs_wire.h, xen/include/public/grant_table.h), defined below.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

typedef uint16_t domid_t;     /* xen/include/public/xen.h */
typedef uint32_t grant_ref_t; /* xen/include/public/grant_table.h */
#include <xen/evtchn.h>
#include <xen/gntalloc.h>
#include <xen/gntdev.h>

/* xen/include/public/grant_table.h */
#define GNTCOPY_source_gref (1 << 0)
/* xen/include/public/io/xs_wire.h */
struct xsd_sockmsg {
    uint32_t type, req_id, tx_id, len;
};
#define XS_READ 2
#define XS_ERROR 16

#define PAGE 4096
#define MAGIC "xenpeer-page-of-domain"

static const char *cmd_id = "0";

static void out(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void out(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    printf("XENPEER %s %s\n", cmd_id, line);
    fflush(stdout);
}

static void out_errno(const char *what, int err)
{
    out("%s errno=%d (%s)", what, err, strerrorname_np(err) ? strerrorname_np(err) : "?");
}

/* Printable text of a page (up to NUL), for a result line. */
static void page_text(const char *page, char *buf, size_t size)
{
    size_t i;
    for (i = 0; i + 1 < size && i < PAGE && page[i]; i++)
        buf[i] = (page[i] >= 0x20 && page[i] < 0x7f && page[i] != ' ') ? page[i] : '_';
    buf[i] = 0;
}

/* ---------------------------------------------------------------------- xenstore (read) */

static int xs_fd = -1;

/* Read a xenstore node (relative paths are under the domain's home); 0 or -errno. */
static int xs_read(const char *path, char *value, size_t size)
{
    char msg[sizeof(struct xsd_sockmsg) + 256];
    struct xsd_sockmsg hdr = { XS_READ, 1, 0, (uint32_t)strlen(path) + 1 };
    if (hdr.len > 256)
        return -ENAMETOOLONG;
    if (xs_fd < 0 && (xs_fd = open("/dev/xen/xenbus", O_RDWR)) < 0)
        return -errno;
    memcpy(msg, &hdr, sizeof(hdr));
    memcpy(msg + sizeof(hdr), path, hdr.len);
    if (write(xs_fd, msg, sizeof(hdr) + hdr.len) != (ssize_t)(sizeof(hdr) + hdr.len))
        return -EIO;
    char reply[sizeof(struct xsd_sockmsg) + 4096];
    size_t got = 0;
    while (got < sizeof(hdr) || got < sizeof(hdr) + ((struct xsd_sockmsg *)reply)->len) {
        ssize_t n = read(xs_fd, reply + got, sizeof(reply) - got);
        if (n <= 0)
            return -EIO;
        got += (size_t)n;
        if (got >= sizeof(hdr) && ((struct xsd_sockmsg *)reply)->len > 4096)
            return -E2BIG;
    }
    struct xsd_sockmsg *r = (struct xsd_sockmsg *)reply;
    if (r->type == XS_ERROR)
        return strncmp(reply + sizeof(hdr), "ENOENT", 6) == 0 ? -ENOENT : -EACCES;
    size_t len = r->len < size - 1 ? r->len : size - 1;
    memcpy(value, reply + sizeof(hdr), len);
    value[len] = 0;
    return 0;
}

/* --------------------------------------------------------------------------- the work */

static int self_domid = -1;
static int evtchn_fd = -1;
static int offered_port = -1;
static char *offered_page;
static int taken_fd = -1, taken_port = -1;

static int open_dev(const char *path)
{
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        out_errno(path, errno);
    return fd;
}

static void offer(unsigned peer)
{
    if (evtchn_fd < 0 && (evtchn_fd = open_dev("/dev/xen/evtchn")) < 0)
        return;
    struct ioctl_evtchn_bind_unbound_port unbound = { .remote_domain = peer };
    int port = ioctl(evtchn_fd, IOCTL_EVTCHN_BIND_UNBOUND_PORT, &unbound);
    if (port < 0) {
        out_errno("evtchn-alloc-unbound", errno);
    } else {
        offered_port = port;
        out("evtchn-alloc-unbound port=%d peer=%u", port, peer);
    }

    int gfd = open_dev("/dev/xen/gntalloc");
    if (gfd < 0)
        return;
    struct ioctl_gntalloc_alloc_gref alloc = {
        .domid = (uint16_t)peer, .flags = GNTALLOC_FLAG_WRITABLE, .count = 1 };
    if (ioctl(gfd, IOCTL_GNTALLOC_ALLOC_GREF, &alloc) < 0) {
        out_errno("gntalloc", errno);
        return;
    }
    char *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, (off_t)alloc.index);
    if (page == MAP_FAILED) {
        out_errno("gntalloc-mmap", errno);
        return;
    }
    snprintf(page, PAGE, MAGIC "-%d-for-%u", self_domid, peer);
    offered_page = page; /* kept mapped (and gfd open): the grant lives as long as we do */
    out("gntalloc gref=%u peer=%u", alloc.gref_ids[0], peer);
}

static void notify(void)
{
    if (taken_port < 0) {
        out("evtchn-notify no-port");
        return;
    }
    struct ioctl_evtchn_notify notify = { .port = (unsigned)taken_port };
    if (ioctl(taken_fd, IOCTL_EVTCHN_NOTIFY, &notify) < 0)
        out_errno("evtchn-notify", errno);
    else
        out("evtchn-notify ok port=%d", taken_port);
}

static void take(unsigned peer, int port, unsigned gref)
{
    int efd = port < 0 ? -1 : open_dev("/dev/xen/evtchn");
    if (port < 0)
        out("evtchn-bind-interdomain skipped (no port)");
    if (efd >= 0) {
        struct ioctl_evtchn_bind_interdomain bind = { .remote_domain = peer, .remote_port = (unsigned)port };
        int local = ioctl(efd, IOCTL_EVTCHN_BIND_INTERDOMAIN, &bind);
        if (local < 0) {
            out_errno("evtchn-bind-interdomain", errno);
        } else {
            out("evtchn-bind-interdomain local-port=%d", local);
            taken_fd = efd;
            taken_port = local;
            notify();
        }
        /* efd stays open: closing it would unbind the port. */
    }

    int gfd = open_dev("/dev/xen/gntdev");
    if (gfd < 0)
        return;
    struct ioctl_gntdev_map_grant_ref map = { .count = 1 };
    map.refs[0].domid = peer;
    map.refs[0].ref = gref;
    if (ioctl(gfd, IOCTL_GNTDEV_MAP_GRANT_REF, &map) < 0) {
        out_errno("gntdev-map-grant-ref", errno);
    } else {
        char *page = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, gfd, (off_t)map.index);
        if (page == MAP_FAILED) {
            out_errno("gntdev-mmap", errno);
        } else {
            char text[128];
            page_text(page, text, sizeof(text));
            out("gntdev-mmap ok text=%s", text);
            snprintf(page, PAGE, "reply-from-domain-%d", self_domid);
            munmap(page, PAGE);
        }
        struct ioctl_gntdev_unmap_grant_ref unmap = { .index = map.index, .count = 1 };
        ioctl(gfd, IOCTL_GNTDEV_UNMAP_GRANT_REF, &unmap);
    }

    char buf[128] = { 0 };
    struct gntdev_grant_copy_segment seg = { 0 };
    seg.source.foreign.ref = gref;
    seg.source.foreign.offset = 0;
    seg.source.foreign.domid = (domid_t)peer;
    seg.dest.virt = buf;
    seg.len = sizeof(buf) - 1;
    seg.flags = GNTCOPY_source_gref;
    struct ioctl_gntdev_grant_copy copy = { .count = 1, .segments = &seg };
    if (ioctl(gfd, IOCTL_GNTDEV_GRANT_COPY, &copy) < 0) {
        out_errno("gntdev-grant-copy", errno);
    } else {
        char text[128];
        page_text(buf, text, sizeof(text));
        out("gntdev-grant-copy status=%d text=%s", seg.status, seg.status == 0 ? text : "-");
    }
    close(gfd);
}

static void check(void)
{
    if (evtchn_fd >= 0 && offered_port >= 0) {
        struct pollfd p = { .fd = evtchn_fd, .events = POLLIN };
        unsigned fired;
        if (poll(&p, 1, 0) == 1 && read(evtchn_fd, &fired, sizeof(fired)) == sizeof(fired)) {
            out("event port=%u", fired);
            write(evtchn_fd, &fired, sizeof(fired)); /* unmask */
        } else {
            out("event none port=%d", offered_port);
        }
    } else {
        out("event no-port");
    }
    if (offered_page) {
        char text[128];
        page_text(offered_page, text, sizeof(text));
        out("page text=%s", text);
    } else {
        out("page none");
    }
}

/* Run one command (words after the id); 0 done, 1 unknown. */
static int run(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[0], "offer") == 0)
        offer((unsigned)strtoul(argv[1], NULL, 0));
    else if (argc == 4 && strcmp(argv[0], "take") == 0)
        take((unsigned)strtoul(argv[1], NULL, 0),
             strcmp(argv[2], "-") == 0 ? -1 : (int)strtoul(argv[2], NULL, 0),
             (unsigned)strtoul(argv[3], NULL, 0));
    else if (argc == 1 && strcmp(argv[0], "notify") == 0)
        notify();
    else if (argc == 1 && strcmp(argv[0], "check") == 0)
        check();
    else {
        out("unknown-command argc=%d", argc);
        return 1;
    }
    out("done");
    return 0;
}

static void read_domid(void)
{
    char value[32];
    int rc = xs_read("domid", value, sizeof(value));
    if (rc < 0)
        out_errno("xenstore-read-domid", -rc);
    else
        self_domid = atoi(value);
}

static __attribute__((noreturn)) void serve(void)
{
    char last[256] = "", cmd[256];
    read_domid();
    cmd_id = "-";
    out("serving domid=%d", self_domid);
    for (;;) {
        int rc = xs_read("xenpeer/cmd", cmd, sizeof(cmd));
        if (rc == 0 && strcmp(cmd, last) != 0) {
            char copy[256], *words[8];
            int n = 0;
            strcpy(last, cmd);
            strcpy(copy, cmd);
            for (char *tok = strtok(copy, " "); tok && n < 8; tok = strtok(NULL, " "))
                words[n++] = tok;
            if (n >= 2) {
                cmd_id = words[0];
                run(n - 1, words + 1);
                cmd_id = "-";
            }
        } else if (rc < 0 && rc != -ENOENT) {
            out_errno("xenstore-read-cmd", -rc);
            sleep(5);
        }
        struct timespec ts = { 0, 200 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
}

int main(int argc, char **argv)
{
    if (argc == 2 && strcmp(argv[1], "serve") == 0)
        serve();
    if (argc < 2) {
        fprintf(stderr, "usage: xenpeer serve | offer PEER | take PEER PORT GREF | notify | check\n");
        return 2;
    }
    read_domid();
    return run(argc - 1, argv + 1);
}
