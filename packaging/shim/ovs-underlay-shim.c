/* The native hand-off client of the warm path (cni/warm.py has the protocol), for both CNI
 * plugins: built twice from this one source, as `ovs-underlay` (default) and as
 * `ovs-underlay-ipam` (-DPLUGIN_NAME='"ovs-underlay-ipam"'); each sends its name with the call,
 * and one warm server serves both.
 *
 * Why C: the plugin exec'd by the runtime used to be the frozen Python binary, whose bootstrap
 * alone costs ~40 ms before it can hand a call to the warm server. This program is that client
 * and nothing else: it sends exactly what warm.call() sends and reads the same replies. ALL
 * policy stays in Python (dispatch/run_call in cni/warm.py); whenever the call is not a plain
 * successful hand-off, it execs the Python plugin `<PLUGIN_NAME>-py` that sits next to its own
 * real path:
 *   - argv given, CNI_COMMAND not ADD/DEL/CHECK/STATUS/GC, OVS_UNDERLAY_WARM=0, no socket file:
 *     exec at once, stdin untouched (VERSION and human calls);
 *   - any failure before "G", or the worker's "N" (nothing ran): stdin restored,
 *     OVS_UNDERLAY_WARM=0, exec;
 *   - the worker died after "G" without its report ("X"): stdin restored, exec with
 *     `--warm-recover FD`, FD a sealed memfd holding what we saw (warm.read_recovery); the
 *     record names this process's pid, which exec keeps, so it is valid for this exec only and
 *     no environment variable can fake it. warm.dispatch applies the post-commit rules (re-run,
 *     DEL-then-ADD, or exit 1 when output was written).
 * The runtime's stdout/stderr and the netns and mount namespace fds travel with "G", after the
 * server has answered: a stopped or hung server never holds the runtime's pipes.
 * stdout is the CNI protocol: this program never writes to it, except the error JSON when the
 * Python plugin cannot be exec'd at all.
 *
 * Environment encoding: Python's client sends os.environ through json.dumps (ensure_ascii),
 * where undecodable bytes are surrogate escapes (U+DC80..U+DCFF); the worker turns them back
 * into the same bytes. We emit byte-identical JSON: strict UTF-8, one \udcXX per invalid byte,
 * first occurrence of a duplicated name (Python's os.environ keeps the first too), found in
 * O(n log n) by sorting the names.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef PLUGIN_NAME
#define PLUGIN_NAME "ovs-underlay"
#endif
#define MAX_REQUEST (16u * 1024 * 1024) /* warm.MAX_REQUEST: json + stdin */
#define DEFAULT_SOCKET "/run/ovs-underlay/cni-warm.sock"
/* Must match cni/warm.py DEFAULT_HANDOFF_MS (tests/unit/test_shim.py checks). */
#define DEFAULT_HANDOFF_MS 1000

extern char **environ;
static char py[PATH_MAX];

struct buf { char *p; size_t len, cap; };

static int put(struct buf *b, const void *s, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 8192;
        while (cap < b->len + n) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p, b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    return 0;
}

static int puts_(struct buf *b, const char *s) { return put(b, s, strlen(s)); }

static int put_u(struct buf *b, unsigned u) { /* \uXXXX, lower-case hex like json.dumps */
    char e[7];
    snprintf(e, sizeof e, "\\u%04x", u & 0xffffu);
    return put(b, e, 6);
}

/* Length of the valid UTF-8 sequence at s (0 if invalid: Python's strict decoder rules). */
static size_t utf8_seq(const unsigned char *s, size_t n, unsigned *cp) {
    size_t len;
    unsigned c = s[0];
    if (c >= 0xc2 && c <= 0xdf) len = 2, c &= 0x1f;
    else if (c >= 0xe0 && c <= 0xef) len = 3, c &= 0x0f;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, c &= 0x07;
    else return 0;
    if (n < len) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xc0) != 0x80) return 0;
        c = c << 6 | (s[k] & 0x3f);
    }
    if ((len == 3 && c < 0x800) || (len == 4 && (c < 0x10000 || c > 0x10ffff)) ||
        (c >= 0xd800 && c <= 0xdfff))
        return 0;
    *cp = c;
    return len;
}

static int json_str(struct buf *b, const char *str, size_t n) {
    const unsigned char *s = (const unsigned char *)str;
    int rc = put(b, "\"", 1);
    for (size_t i = 0; i < n && rc == 0;) {
        unsigned c = s[i], cp;
        size_t len;
        if (c == '"' || c == '\\') rc = put(b, "\\", 1) || put(b, &s[i], 1), i++;
        else if (c >= 0x20 && c < 0x7f) rc = put(b, &s[i], 1), i++;
        else if (c < 0x80) {
            const char *esc = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
                            : c == '\b' ? "\\b" : c == '\f' ? "\\f" : NULL;
            rc = esc ? puts_(b, esc) : put_u(b, c), i++;
        } else if ((len = utf8_seq(s + i, n - i, &cp)) == 0) rc = put_u(b, 0xdc00 | c), i++;
        else if (cp < 0x10000) rc = put_u(b, cp), i += len;
        else cp -= 0x10000, rc = put_u(b, 0xd800 | cp >> 10) || put_u(b, 0xdc00 | (cp & 0x3ff)), i += len;
    }
    return rc || put(b, "\"", 1);
}

/* Never returns. Exec failure: no Python to report it, so the minimal CNI error is ours. */
__attribute__((noreturn)) static void exec_py(char **argv) {
    char *def[] = {py, NULL};
    execv(py, argv && argv[0] ? argv : def);
    char msg[PATH_MAX + 256];
    snprintf(msg, sizeof msg, PLUGIN_NAME ": cannot exec %s: %s", py, strerror(errno));
    struct buf b = {0};
    if (puts_(&b, "{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":") == 0 && json_str(&b, msg, strlen(msg)) == 0 &&
        puts_(&b, "}\n") == 0 && write(1, b.p, b.len) < 0) { /* nothing left to tell */ }
    fprintf(stderr, "%s\n", msg);
    _exit(1);
}

static void note(const char *msg) {
    const char *q = getenv("OVS_UNDERLAY_WARM_QUIET");
    if (!q || strcmp(q, "1") != 0) fprintf(stderr, PLUGIN_NAME ": %s\n", msg);
}

/* Put the stdin bytes back on fd 0 (then `tail`, then the unread rest of fd `more` if >= 0), exec. */
__attribute__((noreturn)) static void exec_py_with_stdin(char **argv, const struct buf *in, const char *tail, size_t tlen, int more) {
    int fd = memfd_create("ovs-underlay-stdin", MFD_CLOEXEC);
    if (fd < 0 && more < 0 && tlen == 0 && in->len <= 65536) {
        int p[2];
        if (pipe2(p, O_CLOEXEC) == 0) {
            if (write(p[1], in->p, in->len) == (ssize_t)in->len && dup2(p[0], 0) == 0) {
                close(p[0]), close(p[1]);
                exec_py(argv);
            }
            close(p[0]), close(p[1]);
        }
    }
    if (fd >= 0 && (in->len == 0 || write(fd, in->p, in->len) == (ssize_t)in->len) &&
        (tlen == 0 || write(fd, tail, tlen) == (ssize_t)tlen)) {
        char chunk[65536];
        ssize_t n = 0;
        while (more >= 0 && ((n = read(more, chunk, sizeof chunk)) > 0 || (n < 0 && errno == EINTR)))
            if (n > 0 && write(fd, chunk, (size_t)n) != n) break;
        if (n == 0 && lseek(fd, 0, SEEK_SET) == 0 && dup2(fd, 0) == 0) {
            close(fd);
            exec_py(argv);
        }
    }
    char msg[256];
    snprintf(msg, sizeof msg, "{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"" PLUGIN_NAME ": cannot "
             "restore stdin for the in-process run: %s\"}\n", strerror(errno));
    if (write(1, msg, strlen(msg)) < 0) { /* nothing left to tell */ }
    _exit(1);
}

struct reply { int ready, declined, output, have_exit, exit_code, have_status, status; unsigned char pend[5]; size_t npend; };

/* warm.Reply.feed: -1 on an unexpected byte. */
static int feed(struct reply *r, const unsigned char *d, size_t n) {
    for (size_t i = 0; i < n; i++) {
        r->pend[r->npend++] = d[i];
        unsigned char t = r->pend[0];
        if (t == 'R') r->ready = 1, r->npend = 0;
        else if (t == 'N') r->declined = 1, r->npend = 0;
        else if (t == 'O') r->output = 1, r->npend = 0;
        else if (t == 'X' && r->npend == 2) r->have_exit = 1, r->exit_code = r->pend[1], r->npend = 0;
        else if (t == 'E' && r->npend == 5) {
            uint32_t v = (uint32_t)r->pend[1] << 24 | (uint32_t)r->pend[2] << 16 | (uint32_t)r->pend[3] << 8 | r->pend[4];
            r->have_status = 1, r->status = (int32_t)v, r->npend = 0;
        } else if (t != 'X' && t != 'E') return -1;
    }
    return 0;
}

/* The netns as core.netns.open_netns opens it: O_PATH first (no open handler runs: a FIFO would
 * block until a writer comes, a device such as a watchdog would start), a regular file only
 * (namespace files are), then read-only through /proc/self/fd. -1 when it is anything else:
 * the worker's skel then reports the path (code 8). */
static int open_netns(const char *path) {
    int pfd = open(path, O_PATH | O_CLOEXEC), fd = -1;
    struct stat st;
    char proc[64];
    if (pfd < 0) return -1;
    if (fstat(pfd, &st) == 0 && S_ISREG(st.st_mode) &&
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", pfd) < (int)sizeof proc)
        fd = open(proc, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    close(pfd);
    return fd;
}

static long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static int wait_fd(int fd, short ev, long long deadline) {
    struct pollfd p = {.fd = fd, .events = ev};
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) return errno = ETIMEDOUT, -1;
        int n = poll(&p, 1, (int)left);
        if (n > 0) return 0;
        if (n < 0 && errno != EINTR) return -1;
    }
}

/* Everything up to and including "G". 0: committed; -1: nothing ran (*why says why). The
 * fds ride on "G" only: before the server has answered it holds nothing of the caller's. */
static int handoff(int s, const char *path, const struct buf *req, const int *fds, int nfds, int ms,
                   struct reply *r, const char **why) {
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    long long deadline = now_ms() + ms;
    if (strlen(path) >= sizeof sa.sun_path) return *why = "socket path too long", -1;
    strcpy(sa.sun_path, path);
    if (connect(s, (struct sockaddr *)&sa, sizeof sa) < 0) {
        int err = 0;
        socklen_t el = sizeof err;
        if (errno != EINPROGRESS || wait_fd(s, POLLOUT, deadline) < 0) return *why = strerror(errno), -1;
        if (getsockopt(s, SOL_SOCKET, SO_ERROR, &err, &el) < 0 || err) return *why = strerror(err ? err : errno), -1;
    }
    struct ucred cred;
    socklen_t cl = sizeof cred;
    if (getsockopt(s, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) return *why = strerror(errno), -1;
    if (cred.uid != 0 && cred.uid != geteuid()) return *why = "the server runs as another user", -1;
    for (size_t off = 0; off < req->len;) {
        ssize_t n = send(s, req->p + off, req->len - off, MSG_NOSIGNAL);
        if (n > 0) off += (size_t)n;
        else if (n < 0 && errno != EAGAIN && errno != EINTR) return *why = strerror(errno), -1;
        else if (n < 0 && errno == EAGAIN && wait_fd(s, POLLOUT, deadline) < 0) return *why = strerror(errno), -1;
    }
    while (!r->ready) {
        unsigned char d[64];
        if (wait_fd(s, POLLIN, deadline) < 0) return *why = strerror(errno), -1;
        ssize_t n = recv(s, d, sizeof d, 0);
        if (n == 0) return *why = "server closed the connection before the hand-off", -1;
        if (n < 0 && errno != EAGAIN && errno != EINTR) return *why = strerror(errno), -1;
        if (n > 0 && feed(r, d, (size_t)n) < 0) return *why = "bad reply", -1;
    }
    char cbuf[CMSG_SPACE(4 * sizeof(int))] = {0};
    struct iovec iov = {.iov_base = "G", .iov_len = 1};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf,
                        .msg_controllen = CMSG_SPACE(nfds * sizeof(int))};
    struct cmsghdr *cm = CMSG_FIRSTHDR(&mh);
    cm->cmsg_level = SOL_SOCKET, cm->cmsg_type = SCM_RIGHTS, cm->cmsg_len = CMSG_LEN(nfds * sizeof(int));
    memcpy(CMSG_DATA(cm), fds, nfds * sizeof(int));
    if (wait_fd(s, POLLOUT, deadline) < 0 || sendmsg(s, &mh, MSG_NOSIGNAL) != 1) return *why = strerror(errno), -1;
    return 0;
}

struct name { const char *s; size_t len, idx; };

static int by_name(const void *a, const void *b) {
    const struct name *x = a, *y = b;
    int c = memcmp(x->s, y->s, x->len < y->len ? x->len : y->len);
    if (c) return c;
    if (x->len != y->len) return x->len < y->len ? -1 : 1;
    return x->idx < y->idx ? -1 : x->idx > y->idx; /* equal names: the first occurrence first */
}

/* skip[i] = 1 for environ[i] without "=" or whose name appeared before: O(n log n). */
static unsigned char *env_skips(size_t *count) {
    size_t n = 0;
    while (environ[n]) n++;
    *count = n;
    unsigned char *skip = calloc(n + 1, 1);
    struct name *names = malloc((n + 1) * sizeof *names);
    if (!skip || !names) return free(skip), free(names), NULL;
    size_t m = 0;
    for (size_t i = 0; i < n; i++) {
        const char *eq = strchr(environ[i], '=');
        if (!eq) skip[i] = 1;
        else names[m++] = (struct name){environ[i], (size_t)(eq - environ[i]), i};
    }
    qsort(names, m, sizeof *names, by_name);
    for (size_t k = 1; k < m; k++)
        if (names[k].len == names[k - 1].len && memcmp(names[k].s, names[k - 1].s, names[k].len) == 0)
            skip[names[k].idx] = 1;
    free(names);
    return skip;
}

/* The recovery record for warm.read_recovery on a sealed memfd (fd >= 3, inherited by the exec);
 * -1 when it cannot be made (the Python plugin then answers 11: it cannot know what ran). */
static int recovery_fd(const struct reply *r) {
    char rec[96];
    int len;
    if (r->have_status) len = snprintf(rec, sizeof rec, "OUWR1 pid=%d output=%d status=%d\n", (int)getpid(), r->output, r->status);
    else len = snprintf(rec, sizeof rec, "OUWR1 pid=%d output=%d status=unknown\n", (int)getpid(), r->output);
    int fd = memfd_create("ovs-underlay-warm-recover", MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    if (fd < 3) { /* never on stdin/stdout/stderr */
        int moved = fcntl(fd, F_DUPFD, 3);
        close(fd);
        if ((fd = moved) < 0) return -1;
    }
    if (write(fd, rec, (size_t)len) != len || lseek(fd, 0, SEEK_SET) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) < 0)
        return close(fd), -1;
    return fd;
}

int main(int argc, char **argv) {
    char self[PATH_MAX];
    ssize_t sl = readlink("/proc/self/exe", self, sizeof self - 1);
    char *slash = sl > 0 ? (self[sl] = 0, strrchr(self, '/')) : NULL;
    if (!slash || snprintf(py, sizeof py, "%.*s/" PLUGIN_NAME "-py", (int)(slash - self), self) >= (int)sizeof py)
        snprintf(py, sizeof py, PLUGIN_NAME "-py (/proc/self/exe unreadable)");

    const char *cmd = getenv("CNI_COMMAND"), *on = getenv("OVS_UNDERLAY_WARM");
    const char *path = getenv("OVS_UNDERLAY_WARM_SOCKET"), *hms = getenv("OVS_UNDERLAY_WARM_HANDOFF_MS");
    struct stat st;
    if (!path || !*path) path = DEFAULT_SOCKET;
    if (argc > 1 || !cmd || (strcmp(cmd, "ADD") && strcmp(cmd, "DEL") && strcmp(cmd, "CHECK") &&
                             strcmp(cmd, "STATUS") && strcmp(cmd, "GC")) ||
        (on && strcmp(on, "0") == 0) || stat(path, &st) < 0)
        exec_py(argv);

    struct buf in = {0}, req = {0};
    char chunk[65536], why_buf[160];
    const char *why = "cannot read stdin";
    for (;;) {
        ssize_t n = read(0, chunk, sizeof chunk);
        if (n == 0) break;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && in.len == 0) exec_py(argv); /* nothing consumed: Python sees the same fd 0 */
        int stored = n > 0 && put(&in, chunk, (size_t)n) == 0;
        if (!stored || in.len > MAX_REQUEST) {
            note("warm path not used (stdin too large or unreadable); running in-process");
            setenv("OVS_UNDERLAY_WARM", "0", 1);
            exec_py_with_stdin(argv, &in, chunk, stored || n < 0 ? 0 : (size_t)n, n < 0 ? -1 : 0);
        }
    }
    /* stdout, stderr, our mount namespace (the worker enters it: it sees our filesystem) and the
     * pod netns, opened as core.netns does (open_netns: a FIFO or a device is never opened). */
    int fds[4] = {1, 2, open("/proc/self/ns/mnt", O_RDONLY | O_CLOEXEC), -1}, nfds = 3, ns_fd = -1;
    const char *netns = getenv("CNI_NETNS");
    if (netns && *netns && (ns_fd = open_netns(netns)) >= 0) fds[nfds++] = ns_fd;

    char cwd[PATH_MAX];
    if (!getcwd(cwd, sizeof cwd)) strcpy(cwd, "/");
    int rc = put(&req, "OUW2\0\0\0\0\0\0\0\0", 12) || puts_(&req, "{\"env\": {");
    size_t nenv = 0;
    unsigned char *skip = env_skips(&nenv);
    rc = rc || !skip;
    int first = 1;
    for (size_t i = 0; i < nenv && rc == 0; i++) {
        if (skip[i]) continue;
        const char *e = environ[i], *eq = strchr(e, '=');
        rc = (first ? 0 : put(&req, ", ", 2)) || json_str(&req, e, (size_t)(eq - e)) || put(&req, ": ", 2) ||
             json_str(&req, eq + 1, strlen(eq + 1));
        first = 0;
    }
    free(skip);
    rc = rc || puts_(&req, "}, \"cwd\": ") || json_str(&req, cwd, strlen(cwd)) ||
         puts_(&req, ", \"plugin\": \"" PLUGIN_NAME "\"") ||
         puts_(&req, ns_fd >= 0 ? ", \"netns_fd\": true}" : ", \"netns_fd\": false}");
    uint32_t jlen = (uint32_t)(req.len - 12), slen = (uint32_t)in.len;
    rc = rc || (size_t)jlen + slen > MAX_REQUEST || put(&req, in.p, in.len);

    struct reply r = {0};
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    char *end;
    long ms = hms ? strtol(hms, &end, 10) : DEFAULT_HANDOFF_MS;
    if (!hms || end == hms || *end || ms > 600000) ms = DEFAULT_HANDOFF_MS;
    if (rc) why = "request too large";
    else if (fds[2] < 0) why = "cannot open /proc/self/ns/mnt";
    else if (s < 0) why = strerror(errno);
    else {
        unsigned char be[8] = {jlen >> 24, jlen >> 16, jlen >> 8, jlen, slen >> 24, slen >> 16, slen >> 8, slen};
        memcpy(req.p + 4, be, 8);
        rc = handoff(s, path, &req, fds, nfds, ms < 1 ? 1 : (int)ms, &r, &why);
    }
    if (s < 0 || rc || fds[2] < 0) { /* nothing ran: in-process, and Python must not try the warm path again */
        if (s >= 0) close(s);
        snprintf(why_buf, sizeof why_buf, "warm path not used (%s); running in-process", why);
        note(why_buf);
        setenv("OVS_UNDERLAY_WARM", "0", 1);
        exec_py_with_stdin(argv, &in, NULL, 0, -1);
    }
    int fl = fcntl(s, F_GETFL);
    if (fl >= 0) fcntl(s, F_SETFL, fl & ~O_NONBLOCK);
    while (!r.have_exit && !r.declined && !r.have_status) { /* committed: wait as long as the runtime lets us */
        unsigned char d[64];
        ssize_t n = recv(s, d, sizeof d, 0);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0 || feed(&r, d, (size_t)n) < 0) break;
    }
    if (r.have_exit) return r.exit_code; /* only the worker's own report is a result */
    close(s);
    if (r.declined) { /* the worker did not run the verb (it says why in the server's log) */
        note("warm path not used (the warm worker declined the call); running in-process");
        setenv("OVS_UNDERLAY_WARM", "0", 1);
        exec_py_with_stdin(argv, &in, NULL, 0, -1);
    }
    int rfd = recovery_fd(&r);
    char num[16], *rargv[] = {argv[0] ? argv[0] : py, "--warm-recover", num, NULL};
    snprintf(num, sizeof num, "%d", rfd);
    exec_py_with_stdin(rargv, &in, NULL, 0, -1);
}
