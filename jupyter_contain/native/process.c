/*
 * The payload and PID 1: the steps from "setsid" and "console" to "execve"
 * (and "exec-init", "fork-payload").
 *
 * Owns: the container's terminal (a pty of its own devpts; the master goes to
 * the caller), forking the payload and starting PID 1 (the static jc-init,
 * exec'd from a file the parent opened, or the in-process fallback init),
 * and the payload's own steps: stdio, session and controlling terminal,
 * rlimits, working directory, then (security.c) credentials, capabilities,
 * no_new_privs, closing every inherited fd above 2, seccomp, and execve with
 * a PATH search. Also hiding the caller's command line and environment
 * from the container's /proc/1/cmdline.
 * Must not: allocate, use stdio, or call anything that is not
 * async-signal-safe: this runs in a clone of a threaded Python process.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <linux/capability.h>
#include <linux/openat2.h>

#include "shim.h"
#include "init_loop.h"

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif
#ifndef TIOCGPTPEER
#define TIOCGPTPEER _IO('T', 0x41)
#endif
#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

/* the payload's stack until its execve (jc_exec's PATH search uses 4 KiB) */
#define JC_PAYLOAD_STACK (256 * 1024)

static const char *jc_rlimit_name(int r)
{
    static const char *const names[] = {
        "RLIMIT_CPU", "RLIMIT_FSIZE", "RLIMIT_DATA", "RLIMIT_STACK", "RLIMIT_CORE",
        "RLIMIT_RSS", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_MEMLOCK", "RLIMIT_AS",
        "RLIMIT_LOCKS", "RLIMIT_SIGPENDING", "RLIMIT_MSGQUEUE", "RLIMIT_NICE",
        "RLIMIT_RTPRIO", "RLIMIT_RTTIME",
    };
    return (r >= 0 && r < (int)(sizeof names / sizeof names[0])) ? names[r] : "RLIMIT_?";
}

void jc_reset_signals(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_DFL;
    for (int sig = 1; sig < _NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &sa, NULL); /* glibc-internal signals fail with EINVAL: fine */
}

/* The child is a copy of the Python process: its command line and
 * environment (a Jupyter token, say) would show in the container's
 * /proc/1/cmdline. Blank them (our own copy of the stack) and rename. */
void jc_hide_origin(void)
{
    char buf[2048];
    unsigned long v[4] = {0, 0, 0, 0}; /* arg_start, arg_end, env_start, env_end */
    int fd = open("/proc/self/stat", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd >= 0 ? read(fd, buf, sizeof buf - 1) : -1;
    if (fd >= 0)
        close(fd);
    if (n > 0) {
        buf[n] = 0;
        char *p = strrchr(buf, ')');
        int field = 2;
        while (p && *p && field < 51) {
            while (*p && *p != ' ')
                p++;
            while (*p == ' ')
                p++;
            if (!*p)
                break;
            field++;
            if (field >= 48) {
                unsigned long x = 0;
                for (char *q = p; *q >= '0' && *q <= '9'; q++)
                    x = x * 10 + (unsigned long)(*q - '0');
                v[field - 48] = x;
            }
        }
        if (v[0] && v[1] > v[0]) {
            memset((void *)v[0], 0, v[1] - v[0]);
            jc_strlcpy((char *)v[0], "jc-init", v[1] - v[0]);
        }
        if (v[2] && v[3] > v[2])
            memset((void *)v[2], 0, v[3] - v[2]);
    }
    prctl(PR_SET_NAME, "jc-init", 0, 0, 0);
}

/* execve with a PATH search like execvp, without allocating. */
JC_NORETURN static void jc_exec(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;
    char *const *argv = (char *const *)cfg->argv;
    char *const *envp = (char *const *)cfg->envp;
    const char *name = cfg->argv[0];
    char buf[4096];

    if (!name || !*name)
        jc_fail_code(c, "execve", ENOENT, "", 127);
    if (strchr(name, '/')) {
        execve(name, argv, envp);
        int e = errno;
        jc_fail_code(c, "execve", e, name, e == ENOENT ? 127 : 126);
    }
    int seen_eacces = 0;
    const char *p = cfg->search_path ? cfg->search_path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    size_t nl = strlen(name);
    for (;;) {
        const char *end = strchrnul(p, ':');
        size_t dl = (size_t)(end - p);
        if (dl == 0) {
            buf[0] = '.';
            dl = 1;
        } else if (dl + nl + 2 <= sizeof buf) {
            memcpy(buf, p, dl);
        } else {
            dl = 0;
        }
        if (dl && dl + nl + 2 <= sizeof buf) {
            buf[dl] = '/';
            memcpy(buf + dl + 1, name, nl + 1);
            execve(buf, argv, envp);
            switch (errno) {
            case EACCES:
                seen_eacces = 1;
                /* fallthrough */
            case ENOENT:
            case ENOTDIR:
            case ESTALE:
            case ENODEV:
            case ETIMEDOUT:
            case ELOOP:
            case ENAMETOOLONG:
                break;
            default:
                jc_fail_code(c, "execve", errno, buf, 126);
            }
        }
        if (!*end)
            break;
        p = end + 1;
    }
    jc_fail_code(c, "execve", seen_eacces ? EACCES : ENOENT, name, seen_eacces ? 126 : 127);
}

/* The payload: from the second fork to execve. */
JC_NORETURN static void jc_payload(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;
    int tmp[3], term[3];
    const int *src = cfg->stdio;

    if (cfg->terminal) {
        term[0] = term[1] = term[2] = c->pty_slave;
        src = term;
        /* like runc: the payload's user owns its terminal (gid stays tty) */
        if (cfg->uid != 0 && fchown(c->pty_slave, cfg->uid, (gid_t)-1) < 0)
            jc_fail(c, "console", errno, "chown");
    }
    /* dup first so that stdio fds that overlap 0..2 are not clobbered, and
     * so that dup2 clears CLOEXEC on the three we keep */
    for (int i = 0; i < 3; i++) {
        tmp[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 3);
        if (tmp[i] < 0)
            jc_fail(c, "stdio", errno, "");
    }
    for (int i = 0; i < 3; i++)
        if (dup2(tmp[i], i) < 0)
            jc_fail(c, "stdio", errno, "");
    jc_reset_signals();
    if (setsid() < 0)
        jc_fail(c, "setsid", errno, "");
    if (cfg->terminal && ioctl(0, TIOCSCTTY, 0) < 0)
        jc_fail(c, "set-ctty", errno, "");
    for (int i = 0; i < cfg->n_rlimits; i++) {
        struct rlimit rl = {cfg->rlimits[i].soft, cfg->rlimits[i].hard};
        if (setrlimit(cfg->rlimits[i].resource, &rl) < 0)
            jc_fail(c, "setrlimit", errno, jc_rlimit_name(cfg->rlimits[i].resource));
    }
    if (cfg->cwd && chdir(cfg->cwd) < 0)
        jc_fail(c, "chdir", errno, cfg->cwd);
    jc_drop_privileges(c); /* user, groups, capabilities, no_new_privs */
    /* wait until jc-init runs and forwards signals: it closes the only
     * write end of the go pipe. A byte instead of EOF means nothing we
     * know: give up. (If jc-init could not be exec'd, the clone kills us.) */
    if (c->go_fd >= 0) {
        char b;
        ssize_t n;
        do
            n = read(c->go_fd, &b, 1);
        while (n < 0 && errno == EINTR);
        if (n != 0)
            _exit(JC_EXIT_ABORTED);
        close(c->go_fd);
        c->go_fd = -1;
    }
    /* every inherited fd above 2 goes, except the status socket, which is
     * CLOEXEC and tells the parent that execve succeeded by closing */
    if (c->sync_fd > 3 && syscall(SYS_close_range, 3U, (unsigned)c->sync_fd - 1, 0U) < 0)
        jc_fail(c, "close-fds", errno, "");
    if (syscall(SYS_close_range, (unsigned)c->sync_fd + 1, ~0U, 0U) < 0)
        jc_fail(c, "close-fds", errno, "");
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    jc_load_seccomp(c); /* always the very last step before execve */
    jc_exec(c);
}

/* What the payload's CLONE_VM clone starts from: the context copied before
 * the clone (init changes its own afterwards) and the go pipe's write end. */
struct jc_payload_args {
    struct jc_ctx ctx;
    int go_w;
};

static int jc_payload_entry(void *arg)
{
    const struct jc_payload_args *pa = arg;
    struct jc_ctx c = pa->ctx; /* on our own stack */
    close(pa->go_w);           /* our fd table is our own: only jc-init keeps the write end */
    jc_payload(&c);
}

/* Fallback PID 1 (no jc-init executable): the clone itself stays init. It
 * keeps a copy-on-write image of the caller's memory for its whole life. */
JC_NORETURN static void jc_init(struct jc_ctx *c, pid_t payload)
{
    const struct jc_config *cfg = c->cfg;
    int exit_fd = -1;

    /* keep only the exit fd (as fd 3); drop the rest (the status socket
     * included: from now on only the payload's copy keeps it open) and
     * stdio, so that pipes the caller reads reach EOF when the payload is
     * done with them */
    if (cfg->exit_fd >= 0) {
        int t = fcntl(cfg->exit_fd, F_DUPFD_CLOEXEC, 10);
        if (t >= 0 && dup3(t, 3, O_CLOEXEC) == 3)
            exit_fd = 3;
    }
    if (cfg->hold_fd >= 0) {  /* held as fd 4 until we exit */
        int t = fcntl(cfg->hold_fd, F_DUPFD_CLOEXEC, 10);
        if (t >= 0)
            dup3(t, 4, O_CLOEXEC);
    }
    syscall(SYS_close_range, cfg->hold_fd >= 0 ? 5U : exit_fd >= 0 ? 4U : 3U, ~0U, 0U);
    int nfd = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int i = 0; i < 3; i++) {
        if (nfd >= 0)
            dup2(nfd, i);
        else
            close(i);
    }
    if (nfd > 2)
        close(nfd);
    c->sync_fd = -1;
    /* init keeps only what it needs: kill() on a payload of another uid */
    jc_drop_bounding_to(cfg->cap_last, cfg->cap_keep);
    jc_capset(1ULL << CAP_KILL, 1ULL << CAP_KILL, 0);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    jc_init_loop(payload, exit_fd);
}

/* Exec jc-init as PID 1 (or as the exec relay): see jc-init.c for the fd
 * contract. Only returns (as a failure report) if execveat fails. */
JC_NORETURN static void jc_exec_init(struct jc_ctx *c, int init_fd, int go_w, pid_t payload)
{
    const struct jc_config *cfg = c->cfg;
    char env0[32] = "JC_PAYLOAD=";
    char *argv[] = {(char *)"jc-init", NULL};
    char *envp[] = {env0, NULL};
    int src[6] = {c->sync_fd, init_fd, go_w, cfg->exit_fd, -1, cfg->hold_fd};
    int fd[6];
    int e = 0;

    /* move every fd we need above the small numbers first, so that the
     * dup2s onto 0..5 clobber nothing (F_DUPFD gives fresh numbers) */
    src[4] = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (src[4] < 0) {
        e = errno;
        goto fail;
    }
    for (int i = 0; i < 6; i++) {
        fd[i] = src[i] >= 0 ? fcntl(src[i], F_DUPFD_CLOEXEC, 10) : -1;
        if (src[i] >= 0 && fd[i] < 0) {
            e = errno;
            goto fail;
        }
    }
    c->sync_fd = fd[0];
    /* dup2 onto another number clears CLOEXEC: 0..4 survive the exec */
    for (int i = 0; i < 3; i++)
        if (dup2(fd[4], i) < 0) {
            e = errno;
            goto fail;
        }
    /* an absent exit or hold fd is a CLOEXEC /dev/null that the exec closes,
     * not a close(2) that might fail: the payload shares our memory (errno
     * included) until our execveat */
    if (dup2(fd[2], 3) < 0 || (fd[3] >= 0 ? dup2(fd[3], 4) : dup3(fd[4], 4, O_CLOEXEC)) < 0 ||
        (fd[5] >= 0 ? dup2(fd[5], 5) : dup3(fd[4], 5, O_CLOEXEC)) < 0) {
        e = errno;
        goto fail;
    }
    /* everything else goes at exec; the status socket stays open until
     * then, so an execveat failure can still be reported */
    if (syscall(SYS_close_range, 6U, ~0U, CLOSE_RANGE_CLOEXEC) < 0) {
        e = errno;
        goto fail;
    }
    /* as root, the exec'd init gets the bounding set as its capabilities:
     * leave it only what it needs, kill() on a payload of another uid */
    if (jc_drop_bounding_to(cfg->cap_last, 1ULL << CAP_KILL) < 0 ||
        jc_capset(1ULL << CAP_KILL, 1ULL << CAP_KILL, 0) < 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        e = errno;
        goto fail;
    }
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0);
    jc_utoa(env0 + strlen(env0), (unsigned)payload);
    syscall(SYS_execveat, fd[1], "", argv, envp, AT_EMPTY_PATH);
    e = errno;
fail:
    /* the payload waits for the go pipe: it must never run without init */
    kill(payload, SIGKILL);
    jc_fail(c, "exec-init", e, cfg->init_path);
}

/* The container's terminal, like runc's console socket: a pty of the
 * container's own devpts instance; the master goes to the caller. */
void jc_open_pty(struct jc_ctx *c)
{
    struct stat st;
    int unlock = 0;
    /* never through a symlink the container may have planted: /dev/pts is
     * a mount point (cannot be renamed) and devpts holds only kernel nodes */
    int m = jc_openat2(AT_FDCWD, "/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC,
                       RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS);
    if (m < 0)
        jc_fail(c, "console", errno, "/dev/pts/ptmx");
    if (fstat(m, &st) < 0)
        jc_fail(c, "console", errno, "/dev/pts/ptmx");
    if (!S_ISCHR(st.st_mode) || major(st.st_rdev) != 5 || minor(st.st_rdev) != 2)
        jc_fail(c, "console", ENOTTY, "/dev/pts/ptmx");
    if (ioctl(m, TIOCSPTLCK, &unlock) < 0)
        jc_fail(c, "console", errno, "unlockpt");
    int sl = ioctl(m, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (sl < 0)
        jc_fail(c, "console", errno, "open slave");

    ssize_t n = jc_send_fd(c->sync_fd, JC_TAG_PTY, m);
    if (n != 1)
        jc_fail(c, "console", n < 0 ? errno : EPROTO, "send master");
    close(m);
    c->pty_slave = sl;
}

/* Fork the payload and become (or exec) PID 1: the last step of the child.
 * With jc-init (init_fd >= 0) this ends in its execveat; without it the
 * clone itself stays init beside the payload. */
void jc_start_init(struct jc_ctx *c, int init_fd)
{
    int go[2] = {-1, -1};
    if (init_fd >= 0 && pipe2(go, O_CLOEXEC) < 0)
        jc_fail(c, "go-pipe", errno, "");
    long pid;
    if (init_fd >= 0) {
        /* The payload (PID 2 in a new pid namespace) shares our memory
         * (CLONE_VM) on a stack of its own, with its own copy of the
         * context made before the clone: a fork would copy this process's
         * page tables (a copy of the caller's, a Python heap: about a
         * millisecond), and tearing down two such address spaces at the two
         * execs costs as much again. Until our execveat of jc-init below, the
         * only memory both of us write is errno, and nothing we call here
         * fails in a way that writes it (jc_exec_init: no close of an fd that
         * may not be open). The payload still waits for jc-init (go pipe). */
        struct jc_payload_args pa = {*c, go[1]};
        pa.ctx.go_fd = go[0];
        void *stack = mmap(NULL, JC_PAYLOAD_STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED)
            jc_fail(c, "fork-payload", errno, "stack");
        pid = clone(jc_payload_entry, (char *)stack + JC_PAYLOAD_STACK, CLONE_VM | SIGCHLD, &pa);
        if (pid < 0)
            jc_fail(c, "fork-payload", errno, "");
        close(go[0]);
        jc_exec_init(c, init_fd, go[1], (pid_t)pid);
    }
    /* no jc-init: we stay init, running beside the payload: a real fork */
    pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0UL, 0UL, 0UL, 0UL);
    if (pid < 0)
        jc_fail(c, "fork-payload", errno, "");
    if (pid == 0)
        jc_payload(c);
    jc_init(c, (pid_t)pid);
}
