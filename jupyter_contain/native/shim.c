/*
 * Native container start: everything from clone to execve runs in C, in the
 * files listed in shim.h. This one serves the first and the last step of every
 * start: "open-init" and the clone ("clone", "clone-into-cgroup"), then the
 * step protocol with the caller until execve ("sync", and each step's failure
 * record), and the child's sequence of steps in between.
 *
 * Owns: jc_spawn (clone3 into new namespaces, or the relay that setns into a
 * running container's through a pidfd: `exec`), jc_proceed, jc_release,
 * jc_discard; the child's order of steps (jc_child); the protocol's packets
 * and the (step, errno, path) failure records.
 * Must not: plan anything (the mount list comes ready from Python), touch
 * Python objects, or call anything that is not async-signal-safe in a child.
 *
 * Why raw syscalls: the caller is a threaded Python process. The child is
 * made with a raw clone3 (fork-style, no CLONE_VM), so glibc's atfork
 * handlers never run and no lock another thread held can be taken. In the
 * child we never allocate, never use stdio, and use raw setres[ug]id /
 * setgroups because glibc's wrappers would try to broadcast the change to
 * the parent's (non-existent here) threads.
 *
 * Protocol (one SOCK_SEQPACKET socketpair, CLOEXEC):
 *   parent: opens the cgroup v1 `tasks` files (cgroup_tasks) or the v2
 *           cgroup (cgroup_dir), then clone3 (into that v2 cgroup)
 *           -> returns pid + pidfd; the child blocks reading 1 byte
 *   parent: with a user namespace (CLONE_NEWUSER), still inside jc_spawn:
 *           writes the id maps and makes every mount of a host path as a
 *           detached mount (see "user namespace" below); then sends those
 *           (JC_TAG_MOUNT + one fd each, SCM_RIGHTS) and JC_TAG_SETUP
 *   child:  moves itself into its v1 cgroups, makes its cgroup namespace, every
 *           mount, pivot_root, hostname, loopback (with cgroup_by_caller:
 *           only the mounts that need no cgroup, n_early_mounts)
 *   parent: meanwhile its own setup (the record of the container, network;
 *           with cgroup_by_caller the cgroup attach), then jc_release()
 *           sends JC_TAG_RELEASE
 *   child:  the other steps; with a terminal it sends JC_TAG_PTY + the pty
 *           master (SCM_RIGHTS); a failure sends JC_TAG_FAILURE + struct
 *           jc_failure and exits
 *   parent: reads until EOF. EOF with no failure = execve succeeded (the
 *           payload's copy of the socket closed on exec, init's copy closed
 *           on its own exec of jc-init).
 *
 * PID 1: the cloned child forks the payload, then execs the separate static
 * jc-init (opened before pivot_root), so that the container's init does not
 * keep a copy-on-write image of the caller's heap. The payload waits for EOF
 * on a pipe that only jc-init holds open, so it never runs before init can
 * forward signals; signals to init stay blocked (pending, never lost) across
 * the exec. Without init_path the clone itself stays init (the fallback).
 *
 * User namespace: every namespace of the container is created by the same
 * clone3 and so owned by the new user namespace (container root has its
 * capabilities over its own network, mounts, hostname), but the child is
 * then container root, "nobody" to the host's files, and may not even look
 * up a path under a 0700 host directory. So the parent, with host
 * credentials, makes the rootfs overlay over idmapped layers (the upper
 * included: files keep container ids on disk) and every bind, detached,
 * and opens the mount point through /proc/PID/root; the child only attaches
 * them (move_mount into a mount namespace it owns). The overlay is created
 * in the initial user namespace, so overlayfs keeps trusted.* xattrs and
 * char 0:0 whiteouts exactly as without a user namespace. jc-init is opened
 * by the parent before the clone for the same reason (idmap.c).
 *
 * Host folders (JC_MF_IDMAP binds: a kernel's folder, the notebook folder)
 * are idmapped with one id only, container root <-> the folder's owner,
 * through a small user namespace of their own (jc_one_id_userns), never the
 * container's: a chown inside cannot reach any other host id there. With the
 * host's ids the child makes the same bind (container root = host root).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>

#include "shim.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif

/* struct clone_args (linux/sched.h clashes with <sched.h>, so our own copy) */
struct jc_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup; /* CLONE_ARGS_SIZE_VER2 (5.7) */
};

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

/* ---- the protocol: packets and failure records (safe in the child) ------- */

size_t jc_strlcpy(char *dst, const char *src, size_t size)
{
    size_t n = src ? strlen(src) : 0;
    if (size) {
        size_t c = n < size - 1 ? n : size - 1;
        if (c)
            memcpy(dst, src, c);
        dst[c] = 0;
    }
    return n;
}

static void jc_write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        ssize_t n = write(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;
        p += n;
        len -= (size_t)n;
    }
}

/* One packet: a tag byte, with fd attached (SCM_RIGHTS) unless fd < 0. */
ssize_t jc_send_fd(int sock, char tag, int fd)
{
    struct iovec iov = {&tag, 1};
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int))];
    } u;
    struct msghdr msg;
    ssize_t n;
    memset(&msg, 0, sizeof msg);
    memset(&u, 0, sizeof u);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (fd >= 0) {
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
        cm->cmsg_level = SOL_SOCKET;
        cm->cmsg_type = SCM_RIGHTS;
        cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &fd, sizeof(int));
    }
    do
        n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n;
}

/* Read one packet: at most len bytes of it into buf, and the first fd it
 * carried (SCM_RIGHTS) into *fd, or -1; any further fds are closed. The
 * packet's length, 0 at EOF, or -1 with errno. */
static ssize_t jc_recv_packet(int sock, void *buf, size_t len, int *fd)
{
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * 4)];
    } u;
    struct iovec iov = {buf, len};
    struct msghdr msg;
    ssize_t n;
    *fd = -1;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = u.buf;
    msg.msg_controllen = sizeof u.buf;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n <= 0)
        return n;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        for (size_t i = 0; i < k; i++) {
            int f;
            memcpy(&f, CMSG_DATA(cm) + i * sizeof(int), sizeof f);
            if (*fd < 0)
                *fd = f;
            else
                close(f);
        }
    }
    return n;
}

/* Read one packet of the parent's: its first byte, and the fd it carried (or -1). */
static ssize_t jc_recv_tag(int sock, char *tag, int *fd)
{
    char buf[8];
    ssize_t n = jc_recv_packet(sock, buf, sizeof buf, fd);
    if (n > 0)
        *tag = buf[0];
    return n;
}

/* Report (step, errno, path) to the parent and exit. */
void jc_fail_code(struct jc_ctx *c, const char *step, int err, const char *path, int code)
{
    char msg[1 + sizeof(struct jc_failure)];
    struct jc_failure f;
    memset(&f, 0, sizeof f);
    jc_strlcpy(f.step, step, sizeof f.step);
    f.err = err;
    jc_strlcpy(f.path, path, sizeof f.path);
    msg[0] = JC_TAG_FAILURE;
    memcpy(msg + 1, &f, sizeof f);
    if (c->sync_fd >= 0)
        jc_write_all(c->sync_fd, msg, sizeof msg); /* one packet */
    _exit(code);
}

void jc_fail(struct jc_ctx *c, const char *step, int err, const char *path)
{
    jc_fail_code(c, step, err, path, JC_EXIT_ABORTED);
}

int jc_pfail(struct jc_failure *f, const char *step, int err, const char *path)
{
    memset(f, 0, sizeof *f);
    jc_strlcpy(f->step, step, sizeof f->step);
    f->err = err;
    jc_strlcpy(f->path, path ? path : "", sizeof f->path);
    return 1;
}

void jc_close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

/* ---- the child: its steps in order ------------------------------------------ */

/* With a user namespace, the parent's detached mounts come first
 * (JC_TAG_MOUNT packets, one fd each, into prep); JC_TAG_SETUP follows once
 * the id maps exist. Anything else: the parent aborted (or died). */
static void jc_await_setup(struct jc_ctx *c, int *prep)
{
    for (;;) {
        char b = 0;
        int fd = -1;
        ssize_t n = jc_recv_tag(c->sync_fd, &b, &fd);
        if (n == 1 && b == JC_TAG_MOUNT && fd >= 0 && c->n_prep < JC_MAX_PREPARED) {
            prep[c->n_prep++] = fd;
            continue;
        }
        if (fd >= 0)
            close(fd);
        if (n != 1 || b != JC_TAG_SETUP)
            _exit(JC_EXIT_ABORTED);
        return;
    }
}

/* Before the release: the container's own setup, while the parent records it
 * (and attaches its network). With cgroup_by_caller only the mounts that do
 * not depend on the cgroup: meanwhile the parent moves us into it. Nothing
 * here forks or runs container code, so nothing escapes the limits by running
 * early. Returns how many mounts of the plan are made. */
static int jc_setup_before_release(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;
    int early = 0;

    if (cfg->join_pidfd >= 0)
        return 0; /* exec: everything happens in the container's namespaces */
    if (cfg->clone_flags & CLONE_NEWUSER) {
        c->prepped = !cfg->caller_maps;
        jc_become_ns_root(c);
    }
    if (cfg->clone_flags & CLONE_NEWNS) {
        if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
            jc_fail(c, "make-private", errno, "/");
    }
    if (cfg->cgroup_by_caller) {
        early = cfg->n_early_mounts < cfg->n_mounts ? cfg->n_early_mounts : cfg->n_mounts;
        for (int i = 0; i < early; i++)
            jc_do_mount(c, &cfg->mounts[i]);
        return early;
    }
    /* in its final cgroup already: the namespace's root is that cgroup */
    if (cfg->new_cgroupns && unshare(CLONE_NEWCGROUP) < 0)
        jc_fail(c, "unshare-cgroupns", errno, "");
    for (int i = 0; i < cfg->n_mounts; i++)
        jc_do_mount(c, &cfg->mounts[i]);
    jc_enter_rootfs(c);
    return cfg->n_mounts;
}

/* The release byte: the parent attached the cgroup (and the network). */
static void jc_await_release(struct jc_ctx *c)
{
    char b = 0;
    int fd = -1;
    ssize_t n = jc_recv_tag(c->sync_fd, &b, &fd);
    if (fd >= 0)
        close(fd);
    if (n != 1 || b != JC_TAG_RELEASE)
        _exit(JC_EXIT_ABORTED);
}

/* After the release: exec joins the running container's namespaces; a start
 * with cgroup_by_caller makes the rest of its mounts (from `done` on), now
 * in its cgroup. */
static void jc_setup_after_release(struct jc_ctx *c, int done)
{
    const struct jc_config *cfg = c->cfg;

    if (cfg->join_pidfd >= 0) {
        if (setns(cfg->join_pidfd, cfg->join_flags) < 0)
            jc_fail(c, "setns", errno, "");
        if (cfg->join_flags & CLONE_NEWUSER)
            jc_become_ns_root(c);
    } else if (cfg->cgroup_by_caller) {
        /* after the attach: the namespace's root is the container's cgroup */
        if (cfg->new_cgroupns && unshare(CLONE_NEWCGROUP) < 0)
            jc_fail(c, "unshare-cgroupns", errno, "");
        for (int i = done; i < cfg->n_mounts; i++)
            jc_do_mount(c, &cfg->mounts[i]);
        jc_enter_rootfs(c);
    }
}

/* The child, from clone3 to the exec of PID 1: the steps in order. */
JC_NORETURN static void jc_child(const struct jc_config *cfg, int sync_fd, int init_fd, const int *cg_fds)
{
    int prep[JC_MAX_PREPARED];
    struct jc_ctx ctx = {
        .cfg = cfg,
        .sync_fd = sync_fd,
        .rootfd = -1,
        .pty_slave = -1,
        .go_fd = -1,
        .prepped = 0,
        .prep = prep,
        .n_prep = 0,
        .next_prep = 0,
        .files_fd = -1,
        .n_files = 0,
    };
    struct jc_ctx *c = &ctx;

    /* stdio setup dup2s onto 0..2: keep the status socket out of the way */
    if (sync_fd < 3) {
        int fd = fcntl(sync_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
            _exit(JC_EXIT_ABORTED);
        close(sync_fd);
        ctx.sync_fd = fd;
    }
    jc_await_setup(c, prep);
    /* no Python-level handlers survive, and no SIG_IGN either. Done here,
     * before the payload exists: setting SIGCHLD to SIG_DFL later would
     * discard a SIGCHLD already pending (default action "ignore") */
    jc_reset_signals();
    jc_hide_origin();
    /* the init executable (init_fd) lives on the host: the parent opened it
     * before the clone, while it is reachable with the host's credentials */
    jc_enter_cgroups(c, cg_fds);
    int done = jc_setup_before_release(c);
    jc_await_release(c);
    /* not dumpable from here on: the container cannot read this copy of the
     * parent's memory through /proc/1/{mem,environ,maps} (no CAP_SYS_PTRACE
     * in it). Not before: until the release nothing of the container runs, and
     * the parent (rootless too: the same uid, the owner of our user namespace)
     * opens folders of our new root through /proc/PID/root once we pivoted
     * (Container.start's pin), which a non-dumpable child refuses it. With a
     * user namespace of other host ids, becoming its root made us
     * non-dumpable already; root's CAP_SYS_PTRACE reaches us anyway. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    jc_setup_after_release(c, done);
    if (setsid() < 0 && errno != EPERM)
        jc_fail(c, "setsid", errno, "");
    if (cfg->terminal)
        jc_open_pty(c); /* inside the container: after pivot_root / setns */
    jc_start_init(c, init_fd); /* the payload, and PID 1 (process.c) */
}

/* ---- the parent: clone, hand-over, release ------------------------------------ */

void jc_discard(struct jc_handle *h)
{
    if (h->prepared) {
        for (int i = 0; i < h->n_prepared; i++)
            if (h->prepared[i] >= 0)
                close(h->prepared[i]);
        free(h->prepared);
    }
    h->prepared = NULL;
    h->n_prepared = 0;
}

/* Open what the child needs (jc-init, its cgroups), clone it, close our
 * copies: 0 with out->pid, pidfd and sync_fd set; 1 (failure filled); -errno. */
static int jc_clone_child(const struct jc_config *cfg, struct jc_handle *out, struct jc_failure *failure)
{
    int sv[2] = {-1, -1}, pidfd = -1, init_fd = -1, cg_fds[JC_MAX_CGROUP_TASKS], cg_dirfd = -1;
    int n_cg = 0, ret = 0, e;
    sigset_t all, old;
    struct jc_clone_args args;
    long pid;

    /* the init executable is a host file: open it with the host's
     * credentials (a child in a user namespace may not reach it) */
    if (cfg->init_path) {
        init_fd = open(cfg->init_path, O_PATH | O_CLOEXEC);
        if (init_fd < 0) {
            ret = jc_pfail(failure, "open-init", errno, cfg->init_path);
            goto out;
        }
    }
    if (jc_open_cgroups(cfg, cg_fds, &cg_dirfd, failure) != 0) {
        ret = 1;
        goto out;
    }
    n_cg = cfg->n_cgroup_tasks;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        ret = -errno;
        goto out;
    }
    memset(&args, 0, sizeof args);
    args.flags = (cfg->clone_flags & ~(uint64_t)CLONE_NEWCGROUP) | CLONE_PIDFD;
    args.pidfd = (uint64_t)(uintptr_t)&pidfd;
    args.exit_signal = SIGCHLD;
    if (cg_dirfd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (uint64_t)cg_dirfd;
    }

    /* the child starts with every signal blocked: no Python-level handler
     * can ever run in it */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) {
        close(sv[0]);
        jc_child(cfg, sv[1], init_fd, cg_fds);
    }
    e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (pid < 0) {
        /* the kernel refuses a cgroup that is not a v2 leaf it may use */
        ret = cfg->cgroup_dir ? jc_pfail(failure, "clone-into-cgroup", e, cfg->cgroup_dir) : -e;
        goto out;
    }
    out->pid = (int)pid;
    out->pidfd = pidfd;
    out->sync_fd = sv[0];
    out->pty_master = -1;
    sv[0] = -1; /* the handle's now */
out: /* the child has its own copies of what we opened for it */
    if (sv[1] >= 0)
        close(sv[1]);
    jc_close_fds(cg_fds, n_cg);
    if (cg_dirfd >= 0)
        close(cg_dirfd);
    if (init_fd >= 0)
        close(init_fd);
    if (sv[0] >= 0)
        close(sv[0]);
    return ret;
}

/* A child that will not be released: without the release byte it exits; reap it. */
static void jc_abandon(struct jc_handle *h)
{
    jc_discard(h);
    close(h->sync_fd);
    h->sync_fd = -1;
    kill((pid_t)h->pid, SIGKILL);
    while (waitpid((pid_t)h->pid, NULL, 0) < 0 && errno == EINTR)
        ;
    close(h->pidfd);
    h->pidfd = -1;
}

int jc_spawn(const struct jc_config *cfg, struct jc_handle *out, struct jc_failure *failure)
{
    int userns = cfg->join_pidfd < 0 && (cfg->clone_flags & CLONE_NEWUSER);
    int ret;

    memset(failure, 0, sizeof *failure);
    out->prepared = NULL;
    out->n_prepared = 0;
    ret = jc_clone_child(cfg, out, failure);
    if (ret != 0)
        return ret;
    if (userns && cfg->caller_maps)
        return 0; /* the caller writes the maps, then jc_proceed */
    if (userns && jc_prepare_userns(cfg, (pid_t)out->pid, out, failure) != 0) {
        jc_abandon(out);
        return 1;
    }
    /* the detached mounts (user namespace), then JC_TAG_SETUP: the child may
     * set up its mounts while the caller attaches the cgroup. A failed send
     * means the child is gone: jc_release sees EOF or its failure record. */
    for (int i = 0; i < out->n_prepared; i++)
        if (jc_send_fd(out->sync_fd, JC_TAG_MOUNT, out->prepared[i]) != 1)
            break;
    jc_discard(out);
    jc_proceed(out);
    return 0;
}

int jc_proceed(struct jc_handle *h)
{
    char s = JC_TAG_SETUP;
    ssize_t n;
    do
        n = send(h->sync_fd, &s, 1, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n == 1 ? 0 : -errno;
}

/* Let the child go on; wait until execve succeeded (returns 0) or a failure
 * record came back (returns 1, *failure filled). -errno on a broken protocol.
 * A terminal's master arrives on the way (h->pty_master; closed on failure). */
int jc_release(struct jc_handle *h, struct jc_failure *failure)
{
    char b = JC_TAG_RELEASE;
    ssize_t n;
    int ret = 0;

    memset(failure, 0, sizeof *failure);
    h->pty_master = -1;
    do
        n = send(h->sync_fd, &b, 1, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    /* a child that died early shows up as EPIPE here and EOF below */
    for (;;) {
        char buf[1 + sizeof(struct jc_failure)];
        int got_fd;
        n = jc_recv_packet(h->sync_fd, buf, sizeof buf, &got_fd);
        if (n < 0) {
            ret = -errno;
            break;
        }
        if (n == 0) /* EOF: every copy of the child's end is closed */
            break;
        if (buf[0] == JC_TAG_PTY && n == 1 && got_fd >= 0 && h->pty_master < 0) {
            h->pty_master = got_fd;
            continue;
        }
        if (got_fd >= 0)
            close(got_fd);
        if (buf[0] == JC_TAG_FAILURE && (size_t)n == sizeof buf) {
            memcpy(failure, buf + 1, sizeof *failure);
            ret = 1;
        } else {
            ret = -EPROTO;
        }
        break;
    }
    if (ret != 0 && h->pty_master >= 0) {
        close(h->pty_master);
        h->pty_master = -1;
    }
    close(h->sync_fd);
    h->sync_fd = -1;
    return ret;
}
