/*
 * Native container start: everything from clone to execve runs here, in C.
 *
 * Owns: the child side of a container start (namespaces, the mount plan,
 * pivot_root, hostname, loopback, the container's pty, starting jc-init as
 * PID 1 (or the in-process fallback init), credentials, capabilities,
 * no_new_privs, fd hygiene, the seccomp slot, execve) and `exec` into a
 * running container (setns through a pidfd).
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
 *           ('M' + one fd each, SCM_RIGHTS) and 'S'
 *   child:  moves itself into its v1 cgroups, makes its cgroup namespace, every
 *           mount, pivot_root, hostname, loopback (with cgroup_by_caller:
 *           only the mounts that need no cgroup, n_early_mounts)
 *   parent: meanwhile its own setup (the record of the container, network;
 *           with cgroup_by_caller the cgroup attach), then jc_release()
 *           sends 'R'
 *   child:  the other steps; with a terminal it sends 'P' + the pty master
 *           (SCM_RIGHTS); a failure sends 'F' + struct jc_failure and exits
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
 * by the parent before the clone for the same reason.
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
#include <grp.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/openat2.h>
#include <linux/seccomp.h>

#include "shim.h"
#include "init_loop.h"

#ifndef CLONE_PIDFD
#define CLONE_PIDFD 0x00001000
#endif
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

/* struct clone_args (linux/sched.h clashes with <sched.h>, so our own copy) */
struct jc_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls;
    uint64_t set_tid, set_tid_size, cgroup; /* CLONE_ARGS_SIZE_VER2 (5.7) */
};

#ifndef CLONE_INTO_CGROUP
#define CLONE_INTO_CGROUP 0x200000000ULL
#endif

/* the payload's stack until its execve (jc_exec's PATH search uses 4 KiB) */
#define JC_PAYLOAD_STACK (256 * 1024)

struct jc_ctx {
    const struct jc_config *cfg;
    int sync_fd;   /* child end of the socketpair */
    int rootfd;    /* O_PATH fd of the merged rootfs, once mounted */
    int pty_slave; /* terminal: the slave of the container's pty */
    int go_fd;     /* payload: read end of the go pipe (EOF = init is ready) */
    int prepped;   /* user namespace made by root: mounts of host paths come prepared */
    const int *prep; /* the parent's detached mounts, in plan order */
    int n_prep;
    int next_prep;
    int files_fd;  /* JC_MOUNT_FILE: the detached tmpfs holding those files */
    int n_files;
};

/* ---- helpers safe in the child ------------------------------------------ */

static size_t jc_strlcpy(char *dst, const char *src, size_t size)
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
static ssize_t jc_send_fd(int sock, char tag, int fd)
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

/* Read one packet of the parent's: its first byte, and the fd it carried (or -1). */
static ssize_t jc_recv_tag(int sock, char *tag, int *fd)
{
    char buf[8];
    union {
        struct cmsghdr h;
        char buf[CMSG_SPACE(sizeof(int) * 4)];
    } u;
    struct iovec iov = {buf, sizeof buf};
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
    *tag = buf[0];
    return n;
}

/* Report (step, errno, path) to the parent and exit. */
__attribute__((noreturn)) static void jc_fail_code(struct jc_ctx *c, const char *step, int err,
                                                   const char *path, int code)
{
    char msg[1 + sizeof(struct jc_failure)];
    struct jc_failure f;
    memset(&f, 0, sizeof f);
    jc_strlcpy(f.step, step, sizeof f.step);
    f.err = err;
    jc_strlcpy(f.path, path, sizeof f.path);
    msg[0] = 'F';
    memcpy(msg + 1, &f, sizeof f);
    if (c->sync_fd >= 0)
        jc_write_all(c->sync_fd, msg, sizeof msg); /* one packet */
    _exit(code);
}

__attribute__((noreturn)) static void jc_fail(struct jc_ctx *c, const char *step, int err, const char *path)
{
    jc_fail_code(c, step, err, path, JC_EXIT_ABORTED);
}

static int jc_openat2(int dirfd, const char *path, uint64_t flags, uint64_t resolve)
{
    struct open_how how;
    memset(&how, 0, sizeof how);
    how.flags = flags;
    how.resolve = resolve;
    return (int)syscall(SYS_openat2, dirfd, path, &how, sizeof how);
}

/* Open a container path inside the rootfs: symlinks and ".." can never leave it. */
static int jc_open_in_root(int rootfd, const char *path, int extra_flags)
{
    return jc_openat2(rootfd, path, O_PATH | O_CLOEXEC | extra_flags,
                      RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS);
}

/* Resolve (and create when missing: create 1 = directory, 2 = empty file) a
 * container path inside the rootfs; returns an O_PATH fd or -1 with errno. */
static int jc_resolve(int rootfd, const char *path, int create)
{
    char buf[4096];
    int fd = jc_open_in_root(rootfd, path, 0);
    if (fd >= 0 || errno != ENOENT || !create)
        return fd;

    while (*path == '/')
        path++;
    if (jc_strlcpy(buf, path, sizeof buf) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    char *p = buf;
    for (;;) {
        char *slash = strchr(p, '/');
        int leaf = slash == NULL || slash[1] == 0;
        if (slash)
            *slash = 0;
        fd = jc_open_in_root(rootfd, buf, 0);
        if (fd < 0 && errno == ENOENT) {
            int pfd = rootfd, r;
            if (p != buf) {
                p[-1] = 0;
                pfd = jc_open_in_root(rootfd, buf, O_DIRECTORY);
                p[-1] = '/';
                if (pfd < 0)
                    return -1;
            }
            if (leaf && create == 2) {
                r = openat(pfd, p, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC | O_NOFOLLOW, 0644);
                if (r >= 0)
                    close(r);
            } else {
                r = mkdirat(pfd, p, 0755);
            }
            int e = errno;
            if (pfd != rootfd)
                close(pfd);
            if (r < 0 && e != EEXIST) {
                errno = e;
                return -1;
            }
            fd = jc_open_in_root(rootfd, buf, 0);
        }
        if (fd < 0 || leaf)
            return fd;
        close(fd);
        *slash = '/';
        p = slash + 1;
        while (*p == '/')
            p++;
        if (!*p)
            return jc_open_in_root(rootfd, buf, 0);
    }
}

/* The next detached mount the parent prepared (user namespace), in plan order. */
static int jc_next_prep(struct jc_ctx *c, const char *step, const char *path)
{
    if (c->next_prep >= c->n_prep)
        jc_fail(c, step, EPROTO, path);
    return c->prep[c->next_prep++];
}

static int jc_move_to(int mntfd, int targetfd)
{
    return move_mount(mntfd, "", targetfd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
}

static int jc_setattr(int fd, int recursive, uint64_t attrs)
{
    struct mount_attr a;
    memset(&a, 0, sizeof a);
    a.attr_set = attrs;
    if (attrs & (JC_ATTR_NOATIME | JC_ATTR_STRICTATIME))
        a.attr_clr = MOUNT_ATTR__ATIME;
    return mount_setattr(fd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &a, sizeof a);
}

/* fsopen + fsconfig + fsmount: a detached mount of a new filesystem. */
static int jc_new_fs(struct jc_ctx *c, const char *step, const struct jc_mount *m)
{
    int fsfd = fsopen(m->fstype, FSOPEN_CLOEXEC);
    if (fsfd < 0)
        jc_fail(c, step, errno, m->target);
    if (m->source && fsconfig(fsfd, FSCONFIG_SET_STRING, "source", m->source, 0) < 0)
        jc_fail(c, step, errno, m->target);
    for (int i = 0; i < m->n_options; i++) {
        const char *k = m->options[2 * i], *v = m->options[2 * i + 1];
        int r = v ? fsconfig(fsfd, FSCONFIG_SET_STRING, k, v, 0)
                  : fsconfig(fsfd, FSCONFIG_SET_FLAG, k, NULL, 0);
        if (r < 0)
            jc_fail(c, step, errno, m->target);
    }
    if (fsconfig(fsfd, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0)
        jc_fail(c, step, errno, m->target);
    int mfd = fsmount(fsfd, FSMOUNT_CLOEXEC, (unsigned int)m->attrs);
    if (mfd < 0)
        jc_fail(c, step, errno, m->target);
    close(fsfd);
    return mfd;
}

/* The legacy mount(2) path for kernels without "lowerdir+" (< 6.8). The
 * option string must fit in one page; beyond that we give up with E2BIG. */
static void jc_overlay_legacy(struct jc_ctx *c, const struct jc_mount *m)
{
    char data[4096];
    size_t n = 0, cap = sizeof data;
#define JC_APPEND(s)                                                  \
    do {                                                              \
        size_t l_ = strlen(s);                                        \
        if (n + l_ + 1 > cap)                                         \
            jc_fail(c, "mount-rootfs", E2BIG, m->target);             \
        memcpy(data + n, s, l_);                                      \
        n += l_;                                                      \
        data[n] = 0;                                                  \
    } while (0)
    JC_APPEND("lowerdir=");
    for (int i = 0; i < m->n_lowerdirs; i++) {
        if (i)
            JC_APPEND(":");
        JC_APPEND(m->lowerdirs[i]);
    }
    if (m->upperdir) {
        JC_APPEND(",upperdir=");
        JC_APPEND(m->upperdir);
        JC_APPEND(",workdir=");
        JC_APPEND(m->workdir);
    }
    for (int i = 0; i < m->n_options; i++) { /* e.g. userxattr for a rootless overlay */
        JC_APPEND(",");
        JC_APPEND(m->options[2 * i]);
        if (m->options[2 * i + 1]) {
            JC_APPEND("=");
            JC_APPEND(m->options[2 * i + 1]);
        }
    }
#undef JC_APPEND
    if (mount("overlay", m->target, "overlay", 0, data) < 0)
        jc_fail(c, "mount-rootfs", errno, m->target);
}

static void jc_mount_overlay(struct jc_ctx *c, const struct jc_mount *m)
{
    if (c->prepped) {
        /* made by the parent (initial namespace, idmapped layers): only
         * attach it, at the target the parent opened in our mount tree */
        int mfd = jc_next_prep(c, "mount-rootfs", m->target);
        int tfd = jc_next_prep(c, "mount-rootfs", m->target);
        if (jc_move_to(mfd, tfd) < 0)
            jc_fail(c, "mount-rootfs", errno, m->target);
        close(tfd);
        if (c->rootfd >= 0)
            close(c->rootfd);
        c->rootfd = mfd; /* the overlay's root, now attached here */
        return;
    }
    int fsfd = fsopen("overlay", FSOPEN_CLOEXEC);
    if (fsfd < 0) {
        if (errno != ENOSYS)
            jc_fail(c, "mount-rootfs", errno, m->target);
        jc_overlay_legacy(c, m);
    } else {
        for (int i = 0; i < m->n_lowerdirs; i++) {
            if (fsconfig(fsfd, FSCONFIG_SET_STRING, "lowerdir+", m->lowerdirs[i], 0) < 0) {
                if (i == 0 && errno == EINVAL) { /* kernel without lowerdir+ */
                    close(fsfd);
                    fsfd = -1;
                    break;
                }
                jc_fail(c, "mount-rootfs", errno, m->lowerdirs[i]);
            }
        }
        if (fsfd < 0) {
            jc_overlay_legacy(c, m);
        } else {
            if (m->upperdir && fsconfig(fsfd, FSCONFIG_SET_STRING, "upperdir", m->upperdir, 0) < 0)
                jc_fail(c, "mount-rootfs", errno, m->upperdir);
            if (m->workdir && fsconfig(fsfd, FSCONFIG_SET_STRING, "workdir", m->workdir, 0) < 0)
                jc_fail(c, "mount-rootfs", errno, m->workdir);
            for (int i = 0; i < m->n_options; i++) {
                const char *k = m->options[2 * i], *v = m->options[2 * i + 1];
                int r = v ? fsconfig(fsfd, FSCONFIG_SET_STRING, k, v, 0)
                          : fsconfig(fsfd, FSCONFIG_SET_FLAG, k, NULL, 0);
                if (r < 0)
                    jc_fail(c, "mount-rootfs", errno, m->target);
            }
            if (fsconfig(fsfd, FSCONFIG_CMD_CREATE, NULL, NULL, 0) < 0) {
                /* Before 6.5 overlay parses its options the old way: fsconfig
                 * takes "lowerdir+" as text and only the create refuses it
                 * (EINVAL; seen on Debian 12's 6.1). Mount it the old way. */
                if (errno != EINVAL)
                    jc_fail(c, "mount-rootfs", errno, m->target);
                close(fsfd);
                jc_overlay_legacy(c, m);
                goto attached;
            }
            /* read-only comes last (REMOUNT_RO) so mount points can still be made */
            int mfd = fsmount(fsfd, FSMOUNT_CLOEXEC, (unsigned int)(m->attrs & ~(uint64_t)JC_ATTR_RDONLY));
            if (mfd < 0)
                jc_fail(c, "mount-rootfs", errno, m->target);
            if (move_mount(mfd, "", AT_FDCWD, m->target, MOVE_MOUNT_F_EMPTY_PATH) < 0)
                jc_fail(c, "mount-rootfs", errno, m->target);
            close(mfd);
            close(fsfd);
        }
    }
attached:
    if (c->rootfd >= 0)
        close(c->rootfd);
    c->rootfd = open(m->target, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (c->rootfd < 0)
        jc_fail(c, "mount-rootfs", errno, m->target);
}

static int jc_idmap(int mntfd, int userns_fd, int recursive);
static int jc_one_id_userns(unsigned long uid_in, long uid_out, unsigned long gid_in, long gid_out);

static void jc_do_mount(struct jc_ctx *c, const struct jc_mount *m)
{
    int tfd, sfd;
    struct stat st;

    if (m->kind != JC_MOUNT_OVERLAY && c->rootfd < 0)
        jc_fail(c, "mount", EBADF, m->target); /* plan without a rootfs first */

    switch (m->kind) {
    case JC_MOUNT_OVERLAY:
        jc_mount_overlay(c, m);
        return;

    case JC_MOUNT_BIND: {
        int rec = (m->flags & JC_MF_RECURSIVE) ? AT_RECURSIVE : 0;
        if (c->prepped) {
            sfd = jc_next_prep(c, "bind-mount", m->source); /* attributes set by the parent */
        } else {
            sfd = open_tree(AT_FDCWD, m->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | rec);
            if (sfd < 0)
                jc_fail(c, "bind-mount", errno, m->source);
            if (m->attrs && jc_setattr(sfd, rec != 0, m->attrs) < 0)
                jc_fail(c, "bind-mount", errno, m->target);
            /* the host's ids (no user namespace): container root is host
             * root, so the same one-id bind as with a user namespace, onto
             * host root (0). Rootless, the child cannot idmap (that takes
             * CAP_SYS_ADMIN over the folder's filesystem): a plain bind. */
            if ((m->flags & JC_MF_IDMAP) && !(c->cfg->clone_flags & CLONE_NEWUSER)) {
                int nsfd;
                if (fstat(sfd, &st) < 0 || (nsfd = jc_one_id_userns(st.st_uid, 0, st.st_gid, 0)) < 0)
                    jc_fail(c, "idmap-bind", errno, m->source);
                if (jc_idmap(sfd, nsfd, rec != 0) < 0)
                    jc_fail(c, "idmap-bind", errno, m->source);
                close(nsfd);
            }
        }
        if (fstat(sfd, &st) < 0)
            jc_fail(c, "bind-mount", errno, m->source);
        tfd = jc_resolve(c->rootfd, m->target, S_ISDIR(st.st_mode) ? 1 : 2);
        if (tfd < 0)
            jc_fail(c, "bind-mount", errno, m->target);
        if (jc_move_to(sfd, tfd) < 0)
            jc_fail(c, "bind-mount", errno, m->target);
        close(sfd);
        close(tfd);
        return;
    }

    case JC_MOUNT_FS:
        sfd = jc_new_fs(c, "mount", m);
        tfd = jc_resolve(c->rootfd, m->target, 1);
        if (tfd < 0)
            jc_fail(c, "mount", errno, m->target);
        if (jc_move_to(sfd, tfd) < 0)
            jc_fail(c, "mount", errno, m->target);
        close(sfd);
        close(tfd);
        return;

    case JC_MOUNT_SYMLINK: {
        char dir[4096];
        const char *t = m->target;
        const char *slash = strrchr(t, '/');
        size_t dl = slash ? (size_t)(slash - t) : 0;
        if (dl >= sizeof dir)
            jc_fail(c, "symlink", ENAMETOOLONG, t);
        memcpy(dir, t, dl);
        dir[dl] = 0;
        int pfd = dl ? jc_resolve(c->rootfd, dir, 1) : jc_open_in_root(c->rootfd, "/", O_DIRECTORY);
        if (pfd < 0)
            jc_fail(c, "symlink", errno, dir);
        if (symlinkat(m->source, pfd, slash ? slash + 1 : t) < 0 &&
            !(errno == EEXIST && (m->flags & JC_MF_OPTIONAL)))
            jc_fail(c, "symlink", errno, t);
        close(pfd);
        return;
    }

    case JC_MOUNT_MASK:
        tfd = jc_open_in_root(c->rootfd, m->target, 0);
        if (tfd < 0) {
            if (errno == ENOENT)
                return; /* nothing to hide */
            jc_fail(c, "mask-path", errno, m->target);
        }
        if (fstat(tfd, &st) < 0)
            jc_fail(c, "mask-path", errno, m->target);
        if (S_ISDIR(st.st_mode)) {
            struct jc_mount t = {0};
            t.fstype = "tmpfs";
            t.target = m->target;
            t.attrs = JC_ATTR_RDONLY | JC_ATTR_NOSUID | JC_ATTR_NODEV | JC_ATTR_NOEXEC;
            sfd = jc_new_fs(c, "mask-path", &t);
        } else {
            sfd = open_tree(AT_FDCWD, m->source ? m->source : "/dev/null", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
            if (sfd < 0)
                jc_fail(c, "mask-path", errno, m->source ? m->source : "/dev/null");
        }
        if (jc_move_to(sfd, tfd) < 0)
            jc_fail(c, "mask-path", errno, m->target);
        close(sfd);
        close(tfd);
        return;

    case JC_MOUNT_READONLY:
        tfd = jc_open_in_root(c->rootfd, m->target, 0);
        if (tfd < 0) {
            if (errno == ENOENT && (m->flags & JC_MF_OPTIONAL))
                return;
            jc_fail(c, "readonly-path", errno, m->target);
        }
        sfd = open_tree(tfd, "", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_EMPTY_PATH | AT_RECURSIVE);
        if (sfd < 0)
            jc_fail(c, "readonly-path", errno, m->target);
        if (jc_setattr(sfd, 1, JC_ATTR_RDONLY | m->attrs) < 0)
            jc_fail(c, "readonly-path", errno, m->target);
        if (jc_move_to(sfd, tfd) < 0)
            jc_fail(c, "readonly-path", errno, m->target);
        close(sfd);
        close(tfd);
        return;

    case JC_MOUNT_FILE: {
        /* the tmpfs has no mount point: it lives as long as a bind of it */
        if (c->files_fd < 0) {
            /* small: the container may write these files, not fill memory */
            static const char *const opts[] = {"size", "1m", "nr_inodes", "64", "mode", "0755"};
            struct jc_mount t = {0};
            t.fstype = "tmpfs";
            t.target = m->target;
            t.options = opts;
            t.n_options = 3;
            t.attrs = JC_ATTR_NOSUID | JC_ATTR_NODEV | JC_ATTR_NOEXEC;
            c->files_fd = jc_new_fs(c, "file-mount", &t);
        }
        char name[16] = "f";
        jc_utoa(name + 1, (unsigned)c->n_files++);
        int ffd = openat(c->files_fd, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (ffd < 0)
            jc_fail(c, "file-mount", errno, m->target);
        /* the umask must not narrow it */
        if (fchmod(ffd, 0644) < 0)
            jc_fail(c, "file-mount", errno, m->target);
        const char *text = m->source ? m->source : "";
        for (size_t off = 0, len = strlen(text); off < len;) {
            ssize_t w = write(ffd, text + off, len - off);
            if (w < 0 && errno == EINTR)
                continue;
            if (w <= 0)
                jc_fail(c, "file-mount", w < 0 ? errno : EIO, m->target);
            off += (size_t)w;
        }
        close(ffd);
        sfd = open_tree(c->files_fd, name, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
        if (sfd < 0)
            jc_fail(c, "file-mount", errno, m->target);
        tfd = jc_resolve(c->rootfd, m->target, 2);
        if (tfd < 0)
            jc_fail(c, "file-mount", errno, m->target);
        if (jc_move_to(sfd, tfd) < 0)
            jc_fail(c, "file-mount", errno, m->target);
        close(sfd);
        close(tfd);
        return;
    }

    case JC_MOUNT_REMOUNT_RO:
        tfd = jc_open_in_root(c->rootfd, m->target, 0);
        if (tfd < 0)
            jc_fail(c, "remount-readonly", errno, m->target);
        if (jc_setattr(tfd, 0, JC_ATTR_RDONLY | m->attrs) < 0)
            jc_fail(c, "remount-readonly", errno, m->target);
        close(tfd);
        return;

    default:
        jc_fail(c, "mount", EINVAL, m->target);
    }
}

static void jc_pivot(struct jc_ctx *c)
{
    const char *r = c->cfg->rootfs;
    if (c->rootfd < 0)
        jc_fail(c, "pivot-root", EBADF, r);
    if (fchdir(c->rootfd) < 0)
        jc_fail(c, "pivot-root", errno, r);
    /* new root and old root on the same directory: the old root ends up
     * stacked on top and is detached right away, no temporary dir needed */
    if (syscall(SYS_pivot_root, ".", ".") < 0)
        jc_fail(c, "pivot-root", errno, r);
    if (umount2(".", MNT_DETACH) < 0)
        jc_fail(c, "pivot-root", errno, r);
    if (chdir("/") < 0)
        jc_fail(c, "pivot-root", errno, r);
    close(c->rootfd);
    c->rootfd = -1;
}

static void jc_loopback_up(struct jc_ctx *c)
{
    struct ifreq ifr;
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        jc_fail(c, "loopback", errno, "lo");
    memset(&ifr, 0, sizeof ifr);
    jc_strlcpy(ifr.ifr_name, "lo", sizeof ifr.ifr_name);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0)
        jc_fail(c, "loopback", errno, "lo");
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
        jc_fail(c, "loopback", errno, "lo");
    close(s);
}

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

static int jc_capset(uint64_t eff, uint64_t prm, uint64_t inh)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct d[2];
    d[0].effective = (uint32_t)eff;
    d[1].effective = (uint32_t)(eff >> 32);
    d[0].permitted = (uint32_t)prm;
    d[1].permitted = (uint32_t)(prm >> 32);
    d[0].inheritable = (uint32_t)inh;
    d[1].inheritable = (uint32_t)(inh >> 32);
    return (int)syscall(SYS_capset, &hdr, d);
}

static int jc_drop_bounding_to(int cap_last, uint64_t keep)
{
    for (int cap = 0; cap <= cap_last && cap < 64; cap++) {
        if (keep & (1ULL << cap))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -1;
    }
    return 0;
}

static int jc_drop_bounding(const struct jc_config *cfg)
{
    return jc_drop_bounding_to(cfg->cap_last, cfg->cap_keep);
}

static void jc_reset_signals(void)
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
static void jc_hide_origin(void)
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
__attribute__((noreturn)) static void jc_exec(struct jc_ctx *c)
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
__attribute__((noreturn)) static void jc_payload(struct jc_ctx *c)
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
    if (jc_drop_bounding(cfg) < 0)
        jc_fail(c, "capabilities", errno, "bounding set");
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0)
        jc_fail(c, "capabilities", errno, "keepcaps");
    /* a rootless namespace of the caller's one gid has setgroups denied (the
     * kernel's condition for an unprivileged gid_map): no groups to drop */
    if (syscall(SYS_setgroups, (size_t)cfg->n_groups, cfg->groups) < 0 &&
        !(errno == EPERM && cfg->caller_maps && cfg->n_groups == 0))
        jc_fail(c, "setgroups", errno, "");
    if (syscall(SYS_setresgid, cfg->gid, cfg->gid, cfg->gid) < 0)
        jc_fail(c, "setgid", errno, "");
    if (syscall(SYS_setresuid, cfg->uid, cfg->uid, cfg->uid) < 0)
        jc_fail(c, "setuid", errno, "");
    /* like Docker: a non-root user gets no effective/permitted capabilities,
     * only the bounding set; root gets the kept set. Never inheritable. */
    uint64_t keep = cfg->uid == 0 ? cfg->cap_keep : 0;
    if (jc_capset(keep, keep, 0) < 0)
        jc_fail(c, "capabilities", errno, "capset");
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        jc_fail(c, "capabilities", errno, "ambient");
    if (cfg->no_new_privs && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        jc_fail(c, "no-new-privs", errno, "");
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
    /* the seccomp slot: always the very last step before execve */
    if (cfg->seccomp_filter && cfg->seccomp_len > 0) {
        struct sock_fprog prog;
        prog.len = (unsigned short)cfg->seccomp_len;
        prog.filter = (struct sock_filter *)cfg->seccomp_filter;
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
            jc_fail(c, "seccomp", errno, "");
    }
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
__attribute__((noreturn)) static void jc_init(struct jc_ctx *c, pid_t payload)
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
    jc_drop_bounding(cfg);
    jc_capset(1ULL << CAP_KILL, 1ULL << CAP_KILL, 0);
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    jc_init_loop(payload, exit_fd);
}

/* Exec jc-init as PID 1 (or as the exec relay): see jc-init.c for the fd
 * contract. Only returns (as a failure report) if execveat fails. */
__attribute__((noreturn)) static void jc_exec_init(struct jc_ctx *c, int init_fd, int go_w, pid_t payload)
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
static void jc_open_pty(struct jc_ctx *c)
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

    ssize_t n = jc_send_fd(c->sync_fd, 'P', m);
    if (n != 1)
        jc_fail(c, "console", n < 0 ? errno : EPROTO, "send master");
    close(m);
    c->pty_slave = sl;
}

/* In a user namespace, first of all: become its root. Until then we are the
 * host's root seen from inside (unmapped: "nobody"), with host root's
 * supplementary groups, and could not create a file on an idmapped mount. */
static void jc_become_ns_root(struct jc_ctx *c)
{
    if (syscall(SYS_setgroups, (size_t)0, NULL) < 0 && !(errno == EPERM && c->cfg->caller_maps))
        jc_fail(c, "setgroups", errno, "user namespace");
    if (syscall(SYS_setresgid, 0, 0, 0) < 0)
        jc_fail(c, "setgid", errno, "user namespace");
    if (syscall(SYS_setresuid, 0, 0, 0) < 0)
        jc_fail(c, "setuid", errno, "user namespace");
}

/* Into the container's cgroups (v1), as the very first step: before the
 * first mount (which is charged to the memory cgroup of whoever makes it)
 * and before anything forks. The fds were opened by the parent, whose
 * credentials the kernel checks (those of the opener), so this works from
 * inside a user namespace too. */
static void jc_enter_cgroups(struct jc_ctx *c, const int *cg_fds)
{
    for (int i = 0; i < c->cfg->n_cgroup_tasks; i++) {
        ssize_t w;
        do
            w = write(cg_fds[i], "0", 1);
        while (w < 0 && errno == EINTR);
        if (w != 1)
            jc_fail(c, "cgroup-attach", w < 0 ? errno : EIO, c->cfg->cgroup_tasks[i]);
        close(cg_fds[i]);
    }
}

/* pivot_root into the rootfs, hostname, loopback: the last steps of the
 * container's own setup */
static void jc_enter_rootfs(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;
    if (c->files_fd >= 0) { /* its files are bound where they belong */
        close(c->files_fd);
        c->files_fd = -1;
    }
    if (cfg->rootfs)
        jc_pivot(c);
    if (c->rootfd >= 0) {
        close(c->rootfd);
        c->rootfd = -1;
    }
    if (cfg->hostname && sethostname(cfg->hostname, strlen(cfg->hostname)) < 0)
        jc_fail(c, "sethostname", errno, cfg->hostname);
    if (cfg->loopback_up)
        jc_loopback_up(c);
}

__attribute__((noreturn)) static void jc_child(const struct jc_config *cfg, int sync_fd, int init_fd,
                                               const int *cg_fds)
{
    int prep[JC_MAX_PREPARED];
    struct jc_ctx ctx = {cfg, sync_fd, -1, -1, -1, 0, prep, 0, 0, -1, 0};
    struct jc_ctx *c = &ctx;
    char b = 0;
    ssize_t n;

    /* stdio setup dup2s onto 0..2: keep the status socket out of the way */
    if (sync_fd < 3) {
        int fd = fcntl(sync_fd, F_DUPFD_CLOEXEC, 3);
        if (fd < 0)
            _exit(JC_EXIT_ABORTED);
        close(sync_fd);
        ctx.sync_fd = sync_fd = fd;
    }

    /* with a user namespace, the parent's detached mounts come first ('M'
     * packets, one fd each); 'S' (set up) follows once the id maps exist */
    for (;;) {
        int fd = -1;
        n = jc_recv_tag(sync_fd, &b, &fd);
        if (n == 1 && b == 'M' && fd >= 0 && ctx.n_prep < JC_MAX_PREPARED) {
            prep[ctx.n_prep++] = fd;
            continue;
        }
        if (fd >= 0)
            close(fd);
        if (n != 1 || b != 'S')
            _exit(JC_EXIT_ABORTED); /* the parent aborted (or died) */
        break;
    }
    /* no Python-level handlers survive, and no SIG_IGN either. Done here,
     * before the payload exists: setting SIGCHLD to SIG_DFL later would
     * discard a SIGCHLD already pending (default action "ignore") */
    jc_reset_signals();
    jc_hide_origin();
    /* the init executable (init_fd) lives on the host: the parent opened it
     * before the clone, while it is reachable with the host's credentials */
    jc_enter_cgroups(c, cg_fds);

    /* Before the release: the container's own setup, while the parent
     * records it (and attaches its network). With cgroup_by_caller only the
     * mounts that do not depend on the cgroup: meanwhile the parent moves us
     * into it. Nothing here forks or runs container code, so nothing escapes
     * the limits by running early. */
    int early = 0;
    if (cfg->join_pidfd < 0) {
        if (cfg->clone_flags & CLONE_NEWUSER) {
            ctx.prepped = !cfg->caller_maps;
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
        } else {
            /* in its final cgroup already: the namespace's root is that cgroup */
            if (cfg->new_cgroupns && unshare(CLONE_NEWCGROUP) < 0)
                jc_fail(c, "unshare-cgroupns", errno, "");
            for (int i = 0; i < cfg->n_mounts; i++)
                jc_do_mount(c, &cfg->mounts[i]);
            jc_enter_rootfs(c);
        }
    }

    /* the release byte: the parent attached the cgroup (and the network) */
    {
        int fd = -1;
        n = jc_recv_tag(sync_fd, &b, &fd);
        if (fd >= 0)
            close(fd);
        if (n != 1 || b != 'R')
            _exit(JC_EXIT_ABORTED);
    }
    /* not dumpable from here on: the container cannot read this copy of the
     * parent's memory through /proc/1/{mem,environ,maps} (no CAP_SYS_PTRACE
     * in it). Not before: until the release nothing of the container runs, and
     * the parent (rootless too: the same uid, the owner of our user namespace)
     * opens folders of our new root through /proc/PID/root once we pivoted
     * (Container.start's pin), which a non-dumpable child refuses it. With a
     * user namespace of other host ids, becoming its root made us
     * non-dumpable already; root's CAP_SYS_PTRACE reaches us anyway. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);

    if (cfg->join_pidfd >= 0) {
        if (setns(cfg->join_pidfd, cfg->join_flags) < 0)
            jc_fail(c, "setns", errno, "");
        if (cfg->join_flags & CLONE_NEWUSER)
            jc_become_ns_root(c);
    } else if (cfg->cgroup_by_caller) {
        /* after the attach: the namespace's root is the container's cgroup */
        if (cfg->new_cgroupns && unshare(CLONE_NEWCGROUP) < 0)
            jc_fail(c, "unshare-cgroupns", errno, "");
        for (int i = early; i < cfg->n_mounts; i++)
            jc_do_mount(c, &cfg->mounts[i]);
        jc_enter_rootfs(c);
    }
    if (setsid() < 0 && errno != EPERM)
        jc_fail(c, "setsid", errno, "");
    if (cfg->terminal)
        jc_open_pty(c); /* inside the container: after pivot_root / setns */

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

/* ---- parent side ----------------------------------------------------------- */

static int jc_pfail(struct jc_failure *f, const char *step, int err, const char *path)
{
    memset(f, 0, sizeof *f);
    jc_strlcpy(f->step, step, sizeof f->step);
    f->err = err;
    jc_strlcpy(f->path, path ? path : "", sizeof f->path);
    return 1;
}

/* /proc/PID/[ug]id_map take the whole map in one write */
static int jc_write_map(pid_t pid, const char *name, const char *text)
{
    char path[64] = "/proc/";
    size_t pl = 6 + jc_utoa(path + 6, (unsigned)pid);
    path[pl++] = '/';
    memcpy(path + pl, name, strlen(name) + 1); /* "uid_map" / "gid_map" */
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    size_t len = text ? strlen(text) : 0;
    ssize_t n = write(fd, text ? text : "", len);
    int e = errno;
    close(fd);
    if (n != (ssize_t)len || len == 0) {
        errno = len == 0 ? EINVAL : n < 0 ? e : EIO;
        return -1;
    }
    return 0;
}

static int jc_idmap(int mntfd, int userns_fd, int recursive)
{
    struct mount_attr a;
    memset(&a, 0, sizeof a);
    a.attr_set = MOUNT_ATTR_IDMAP;
    a.userns_fd = (uint64_t)userns_fd;
    return mount_setattr(mntfd, "", AT_EMPTY_PATH | (recursive ? AT_RECURSIVE : 0), &a, sizeof a);
}

/* A detached, idmapped clone of a host directory. */
static int jc_idmapped_clone(const char *path, int userns_fd, struct jc_failure *f, const char *step)
{
    int fd = open_tree(AT_FDCWD, path, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (fd < 0)
        return -jc_pfail(f, step, errno, path);
    if (jc_idmap(fd, userns_fd, 0) < 0) {
        int e = errno;
        close(fd);
        return -jc_pfail(f, step, e, path);
    }
    return fd;
}

/* The host id that container id 0 maps to in a "inside outside count" map. */
static long jc_map_root(const char *map)
{
    const char *p = map;
    while (p && *p) {
        unsigned long in, out, cnt;
        if (sscanf(p, "%lu %lu %lu", &in, &out, &cnt) == 3 && in == 0 && cnt > 0)
            return (long)out;
        p = strchr(p, '\n');
        if (p)
            p++;
    }
    return -1;
}

/* fsconfig(CMD_CREATE) with this thread's fsuid/fsgid set to the container
 * root's host ids. overlayfs keeps the creating task's credentials as its
 * mounter credentials and creates its own files (work dir, whiteouts,
 * copy-up temporaries) with them: host root (uid 0) has no id on an
 * idmapped upper (EOVERFLOW), container root does. Only this thread's
 * credentials change (raw syscalls, creds are per thread), and only for
 * this one call; capabilities are kept (setfsuid would drop the file
 * ones from the effective set) and restored exactly afterwards. */
static int jc_create_as(int fsfd, long uid, long gid)
{
    struct __user_cap_header_struct hdr = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct saved[2];
    int r, e;

    if (syscall(SYS_capget, &hdr, saved) < 0)
        return -1;
    syscall(SYS_setfsgid, (gid_t)gid);
    syscall(SYS_setfsuid, (uid_t)uid);
    if ((long)syscall(SYS_setfsuid, (uid_t)-1) != uid || (long)syscall(SYS_setfsgid, (gid_t)-1) != gid ||
        syscall(SYS_capset, &hdr, saved) < 0) {
        r = -1;
        e = errno ? errno : EPERM;
    } else {
        r = fsconfig(fsfd, FSCONFIG_CMD_CREATE, NULL, NULL, 0);
        e = errno;
    }
    syscall(SYS_setfsuid, (uid_t)0);
    syscall(SYS_setfsgid, (gid_t)0);
    syscall(SYS_capset, &hdr, saved);
    errno = e;
    return r;
}

/* The rootfs overlay as a detached mount, made here in the initial user
 * namespace (so overlayfs keeps using trusted.* xattrs and char 0:0
 * whiteouts, with host credentials) over idmapped layers: what is owned by
 * uid N on disk is owned by container uid N, in the image layers and in the
 * writable layer alike (a snapshot sees container ids, a restart with other
 * host ids sees the same files). Upper and work must be on one mount for
 * overlayfs, so their common directory is cloned once. */
static int jc_prep_overlay(const struct jc_config *cfg, const struct jc_mount *m, int userns_fd,
                           struct jc_failure *f)
{
    char buf[4200];
    int fsfd = -1, pfd = -1, mfd = -1, nl = 0;
    int *lfds = NULL;
    const char *up = NULL, *wk = NULL;
    long ruid = jc_map_root(cfg->uid_map), rgid = jc_map_root(cfg->gid_map);

    if (ruid < 0 || rgid < 0)
        return -jc_pfail(f, "uid-map", EINVAL, "container root is not mapped");

    if (m->upperdir) {
        const char *us = strrchr(m->upperdir, '/'), *ws = m->workdir ? strrchr(m->workdir, '/') : NULL;
        size_t ul = us ? (size_t)(us - m->upperdir) : 0;
        if (!us || !ws || ul == 0 || ul >= sizeof buf || (size_t)(ws - m->workdir) != ul ||
            memcmp(m->upperdir, m->workdir, ul) != 0)
            return -jc_pfail(f, "idmap-upper", EINVAL, m->upperdir);
        memcpy(buf, m->upperdir, ul);
        buf[ul] = 0;
        pfd = jc_idmapped_clone(buf, userns_fd, f, "idmap-upper");
        if (pfd < 0)
            return -1;
        up = us + 1;
        wk = ws + 1;
    }
    fsfd = fsopen("overlay", FSOPEN_CLOEXEC);
    if (fsfd < 0) {
        jc_pfail(f, "mount-rootfs", errno, m->target);
        goto out;
    }
    /* the detached layer mounts must live until the overlay is made: the
     * last close of one dissolves it, and overlayfs clones them then */
    lfds = calloc((size_t)m->n_lowerdirs + 1, sizeof(int));
    if (!lfds) {
        jc_pfail(f, "mount-rootfs", ENOMEM, m->target);
        goto out;
    }
    for (int i = 0; i < m->n_lowerdirs; i++) {
        int lfd = jc_idmapped_clone(m->lowerdirs[i], userns_fd, f, "idmap-layer");
        if (lfd < 0)
            goto out;
        lfds[nl++] = lfd;
        snprintf(buf, sizeof buf, "/proc/self/fd/%d", lfd);
        if (fsconfig(fsfd, FSCONFIG_SET_STRING, "lowerdir+", buf, 0) < 0) {
            jc_pfail(f, "mount-rootfs", errno, m->lowerdirs[i]);
            goto out;
        }
    }
    if (up) {
        snprintf(buf, sizeof buf, "/proc/self/fd/%d/%s", pfd, up);
        if (fsconfig(fsfd, FSCONFIG_SET_STRING, "upperdir", buf, 0) < 0) {
            jc_pfail(f, "mount-rootfs", errno, m->upperdir);
            goto out;
        }
        snprintf(buf, sizeof buf, "/proc/self/fd/%d/%s", pfd, wk);
        if (fsconfig(fsfd, FSCONFIG_SET_STRING, "workdir", buf, 0) < 0) {
            jc_pfail(f, "mount-rootfs", errno, m->workdir);
            goto out;
        }
    }
    for (int i = 0; i < m->n_options; i++) {
        const char *k = m->options[2 * i], *v = m->options[2 * i + 1];
        int r = v ? fsconfig(fsfd, FSCONFIG_SET_STRING, k, v, 0) : fsconfig(fsfd, FSCONFIG_SET_FLAG, k, NULL, 0);
        if (r < 0) {
            jc_pfail(f, "mount-rootfs", errno, m->target);
            goto out;
        }
    }
    if (jc_create_as(fsfd, ruid, rgid) < 0) {
        jc_pfail(f, "mount-rootfs", errno, m->target);
        goto out;
    }
    mfd = fsmount(fsfd, FSMOUNT_CLOEXEC, (unsigned int)(m->attrs & ~(uint64_t)JC_ATTR_RDONLY));
    if (mfd < 0)
        jc_pfail(f, "mount-rootfs", errno, m->target);
out:
    for (int i = 0; i < nl; i++)
        close(lfds[i]);
    free(lfds);
    if (fsfd >= 0)
        close(fsfd);
    if (pfd >= 0)
        close(pfd);
    return mfd;
}

/* The one-id user namespaces of a start's binds, by mapping (a kernel's
 * binds usually share one owner: one namespace serves them all). */
struct jc_one_id {
    unsigned long uid_in, gid_in;
    int fd;
};
#define JC_MAX_ONE_ID 16

struct jc_prep_ctx {
    int userns_fd;      /* the container's own user namespace (layers, upper) */
    long ruid, rgid;    /* container root's host ids */
    struct jc_one_id ns[JC_MAX_ONE_ID];
    int n_ns;
};

struct jc_ns_helper {
    int wait[2];   /* EOF on wait[0] (the caller closes wait[1]) ends the helper */
    int ready[2];  /* one byte on ready[1] once `pid` is filled in */
    char pid[16];  /* the helper's pid as this /proc names it */
};

static int jc_ns_helper_main(void *arg)
{
    struct jc_ns_helper *h = arg;
    char b = 0;
    /* raw syscalls only: this CLONE_VM child shares the caller's memory
     * (not its fd table: its copies of the caller's ends are closed here, so
     * that either side's end reads EOF when the other is gone).
     * Its pid as /proc shows it: a container's child, in a new pid
     * namespace but still on the host's /proc, gets another number back
     * from clone than the one /proc knows this helper by */
    syscall(SYS_close, h->wait[1]);
    syscall(SYS_close, h->ready[0]);
    long n = syscall(SYS_readlink, "/proc/self", h->pid, sizeof h->pid - 1);
    h->pid[n > 0 ? n : 0] = 0;
    syscall(SYS_write, h->ready[1], &b, 1);
    for (int i = 0; i < 64 && syscall(SYS_read, h->wait[0], &b, 1) < 0; i++)
        ; /* only EINTR can fail it */
    syscall(SYS_exit, 0);
    return 0;
}

/* "inside outside 1\n" at dst (no stdio: also used in a child after clone) */
static void jc_one_line(char *dst, unsigned long in, long out)
{
    size_t n = jc_utoa(dst, (unsigned)in);
    dst[n++] = ' ';
    n += jc_utoa(dst + n, (unsigned)out);
    memcpy(dst + n, " 1\n", 4);
}

/* Write `text` to /proc/<pid>/<name>, pid given as /proc names it. */
static int jc_write_proc(const char *pid, const char *name, const char *text)
{
    char path[64] = "/proc/";
    size_t pl = strlen(pid), nl = strlen(name), len = strlen(text);
    if (pl == 0 || 6 + pl + 1 + nl + 1 > sizeof path) {
        errno = ESRCH;
        return -1;
    }
    memcpy(path + 6, pid, pl);
    path[6 + pl] = '/';
    memcpy(path + 7 + pl, name, nl + 1);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, text, len);
    int e = errno;
    close(fd);
    if (n != (ssize_t)len) {
        errno = n < 0 ? e : EIO;
        return -1;
    }
    return 0;
}

/* A user namespace that maps exactly one uid and one gid: host `uid_in` /
 * `gid_in` (what a file is owned by on disk) to `uid_out` / `gid_out`
 * (container root's host ids), for MOUNT_ATTR_IDMAP. Its creator is a
 * CLONE_VM child that only waits on a pipe (a raw unshare is refused to a
 * threaded caller); the namespace outlives it through the returned fd.
 * Raw calls and no stdio, so that a container's child may make one too.
 * Cost: ~0.17 ms here (clone, two map writes, one open, one wait; a
 * kernel start needs one or two: its folder, the notebook folder). */
static int jc_one_id_userns(unsigned long uid_in, long uid_out, unsigned long gid_in, long gid_out)
{
    char stack[16384] __attribute__((aligned(16)));
    char map[64];
    struct jc_ns_helper h;
    int fd = -1, e = 0, st;
    char b;
    pid_t pid;

    memset(&h, 0, sizeof h);
    if (pipe2(h.wait, O_CLOEXEC) < 0)
        return -1;
    if (pipe2(h.ready, O_CLOEXEC) < 0) {
        e = errno;
        close(h.wait[0]);
        close(h.wait[1]);
        errno = e;
        return -1;
    }
    /* no exit signal: only a waitpid(__WALL) for this pid reaps it, never
     * another thread's waitpid(-1), and Python sees no SIGCHLD */
    pid = clone(jc_ns_helper_main, stack + sizeof stack, CLONE_VM | CLONE_NEWUSER, &h);
    close(h.ready[1]); /* a helper gone before its byte: EOF, not a hang */
    if (pid < 0) {
        e = errno;
        close(h.wait[0]);
        close(h.wait[1]);
        close(h.ready[0]);
        errno = e;
        return -1;
    }
    if (read(h.ready[0], &b, 1) != 1) {
        e = errno ? errno : ECHILD;
        goto out;
    }
    jc_one_line(map, uid_in, uid_out);
    if (jc_write_proc(h.pid, "uid_map", map) < 0) {
        e = errno;
        goto out;
    }
    jc_one_line(map, gid_in, gid_out);
    if (jc_write_proc(h.pid, "gid_map", map) < 0) {
        e = errno;
        goto out;
    }
    {
        char path[64] = "/proc/";
        size_t pl = strlen(h.pid);
        memcpy(path + 6, h.pid, pl);
        memcpy(path + 6 + pl, "/ns/user", 9);
        fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            e = errno;
    }
out:
    close(h.wait[1]); /* EOF: the helper exits */
    while (waitpid(pid, &st, __WALL) < 0 && errno == EINTR)
        ;
    close(h.wait[0]);
    close(h.ready[0]);
    errno = e;
    return fd;
}

/* The cached one-id namespace for (uid_in, gid_in), made on first use. */
static int jc_one_id_fd(struct jc_prep_ctx *pc, unsigned long uid_in, unsigned long gid_in)
{
    for (int i = 0; i < pc->n_ns; i++)
        if (pc->ns[i].uid_in == uid_in && pc->ns[i].gid_in == gid_in)
            return pc->ns[i].fd;
    if (pc->n_ns >= JC_MAX_ONE_ID) {
        errno = E2BIG;
        return -1;
    }
    int fd = jc_one_id_userns(uid_in, pc->ruid, gid_in, pc->rgid);
    if (fd < 0)
        return -1;
    pc->ns[pc->n_ns].uid_in = uid_in;
    pc->ns[pc->n_ns].gid_in = gid_in;
    pc->ns[pc->n_ns].fd = fd;
    pc->n_ns++;
    return fd;
}

/* A bind of a host path as a detached mount (attributes set, idmapped on request).
 *
 * JC_MF_IDMAP: container root <-> the owner of the folder (uid and gid, as
 * fstat of the cloned tree says: the very folder mounted, no path looked up
 * twice), and nothing else: every other id of the container is unmapped on
 * this mount, so nothing it writes there can be owned by another host id
 * (chown fails with EOVERFLOW), and the folder's files of other owners show
 * as the overflow id, read-only (the kernel writes no inode whose owner is
 * unmapped on the mount). Before, such a bind was idmapped with the
 * container's own namespace: all 65536 ids, so a chown inside reached host
 * ids 0..65535, host root's included. */
static int jc_prep_bind(const struct jc_mount *m, struct jc_prep_ctx *pc, struct jc_failure *f)
{
    int rec = (m->flags & JC_MF_RECURSIVE) ? AT_RECURSIVE : 0;
    int fd = open_tree(AT_FDCWD, m->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | rec);
    const char *step = "bind-mount";
    struct stat st;
    int e;

    if (fd < 0)
        return -jc_pfail(f, step, errno, m->source);
    if (m->attrs && jc_setattr(fd, rec != 0, m->attrs) < 0)
        goto fail;
    if (m->flags & JC_MF_IDMAP) {
        int nsfd;
        step = "idmap-bind";
        if (fstat(fd, &st) < 0 || (nsfd = jc_one_id_fd(pc, st.st_uid, st.st_gid)) < 0 ||
            jc_idmap(fd, nsfd, rec != 0) < 0)
            goto fail;
    }
    return fd;
fail:
    e = errno;
    close(fd);
    return -jc_pfail(f, step, e, m->source);
}

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

/* Between clone and release, for a child in a new user namespace: write its
 * id maps, then make every mount of a host path (the child, container root
 * already, may not even be able to look such paths up). */
static int jc_prepare_userns(const struct jc_config *cfg, pid_t pid, struct jc_handle *h, struct jc_failure *f)
{
    char path[4200];
    int userns_fd, fd, ret = 0;
    struct jc_prep_ctx pc;

    if (jc_write_map(pid, "uid_map", cfg->uid_map) < 0)
        return jc_pfail(f, "uid-map", errno, cfg->uid_map);
    if (jc_write_map(pid, "gid_map", cfg->gid_map) < 0)
        return jc_pfail(f, "gid-map", errno, cfg->gid_map);
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
    userns_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (userns_fd < 0)
        return jc_pfail(f, "userns", errno, path);
    h->prepared = calloc((size_t)cfg->n_mounts + 2, sizeof(int));
    if (!h->prepared) {
        close(userns_fd);
        return jc_pfail(f, "mount-plan", ENOMEM, "");
    }
    memset(&pc, 0, sizeof pc);
    pc.userns_fd = userns_fd;
    pc.ruid = jc_map_root(cfg->uid_map);
    pc.rgid = jc_map_root(cfg->gid_map);
    for (int i = 0; i < cfg->n_mounts && ret == 0; i++) {
        const struct jc_mount *m = &cfg->mounts[i];
        if (m->kind != JC_MOUNT_OVERLAY && m->kind != JC_MOUNT_BIND)
            continue;
        if (h->n_prepared + 2 > JC_MAX_PREPARED) {
            ret = jc_pfail(f, "mount-plan", E2BIG, m->target);
            break;
        }
        fd = m->kind == JC_MOUNT_OVERLAY ? jc_prep_overlay(cfg, m, userns_fd, f) : jc_prep_bind(m, &pc, f);
        if (fd < 0) {
            ret = 1;
            break;
        }
        h->prepared[h->n_prepared++] = fd;
        if (m->kind == JC_MOUNT_OVERLAY) {
            /* the mount point, looked up in the child's mount tree */
            if ((size_t)snprintf(path, sizeof path, "/proc/%d/root%s", (int)pid, m->target) >= sizeof path) {
                ret = jc_pfail(f, "mount-rootfs", ENAMETOOLONG, m->target);
                break;
            }
            fd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (fd < 0) {
                ret = jc_pfail(f, "mount-rootfs", errno, m->target);
                break;
            }
            h->prepared[h->n_prepared++] = fd;
        }
    }
    for (int i = 0; i < pc.n_ns; i++)
        close(pc.ns[i].fd); /* the mounts keep what they need of them */
    close(userns_fd);
    return ret;
}

static void jc_close_fds(const int *fds, int n)
{
    for (int i = 0; i < n; i++)
        close(fds[i]);
}

int jc_spawn(const struct jc_config *cfg, struct jc_handle *out, struct jc_failure *failure)
{
    int sv[2], pidfd = -1, e, init_fd = -1, cg_fds[JC_MAX_CGROUP_TASKS], cg_dirfd = -1;
    sigset_t all, old;
    struct jc_clone_args args;

    memset(failure, 0, sizeof *failure);
    out->prepared = NULL;
    out->n_prepared = 0;
    /* the init executable is a host file: open it with the host's
     * credentials (a child in a user namespace may not reach it) */
    if (cfg->init_path) {
        init_fd = open(cfg->init_path, O_PATH | O_CLOEXEC);
        if (init_fd < 0)
            return jc_pfail(failure, "open-init", errno, cfg->init_path);
    }
    if (cfg->n_cgroup_tasks < 0 || cfg->n_cgroup_tasks > JC_MAX_CGROUP_TASKS) {
        if (init_fd >= 0)
            close(init_fd);
        return jc_pfail(failure, "cgroup-attach", E2BIG, "");
    }
    for (int i = 0; i < cfg->n_cgroup_tasks; i++) {
        cg_fds[i] = open(cfg->cgroup_tasks[i], O_WRONLY | O_CLOEXEC);
        if (cg_fds[i] < 0) {
            e = errno;
            jc_close_fds(cg_fds, i);
            if (init_fd >= 0)
                close(init_fd);
            return jc_pfail(failure, "cgroup-attach", e, cfg->cgroup_tasks[i]);
        }
    }
    if (cfg->cgroup_dir) {
        cg_dirfd = open(cfg->cgroup_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (cg_dirfd < 0) {
            e = errno;
            jc_close_fds(cg_fds, cfg->n_cgroup_tasks);
            if (init_fd >= 0)
                close(init_fd);
            return jc_pfail(failure, "cgroup-attach", e, cfg->cgroup_dir);
        }
    }
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) < 0) {
        e = errno;
        if (cg_dirfd >= 0)
            close(cg_dirfd);
        jc_close_fds(cg_fds, cfg->n_cgroup_tasks);
        if (init_fd >= 0)
            close(init_fd);
        return -e;
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
    long pid = syscall(SYS_clone3, &args, sizeof args);
    if (pid == 0) {
        close(sv[0]);
        jc_child(cfg, sv[1], init_fd, cg_fds);
    }
    e = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    close(sv[1]);
    jc_close_fds(cg_fds, cfg->n_cgroup_tasks);
    if (cg_dirfd >= 0)
        close(cg_dirfd);
    if (init_fd >= 0)
        close(init_fd);
    if (pid < 0) {
        close(sv[0]);
        /* the kernel refuses a cgroup that is not a v2 leaf it may use */
        if (cfg->cgroup_dir)
            return jc_pfail(failure, "clone-into-cgroup", e, cfg->cgroup_dir);
        return -e;
    }
    out->pid = (int)pid;
    out->pidfd = pidfd;
    out->sync_fd = sv[0];
    out->pty_master = -1;
    if (cfg->join_pidfd < 0 && (cfg->clone_flags & CLONE_NEWUSER) && cfg->caller_maps)
        return 0; /* the caller writes the maps, then jc_proceed */
    if (cfg->join_pidfd < 0 && (cfg->clone_flags & CLONE_NEWUSER) &&
        jc_prepare_userns(cfg, (pid_t)pid, out, failure) != 0) {
        /* without the release byte the child exits; reap it */
        jc_discard(out);
        close(sv[0]);
        out->sync_fd = -1;
        kill((pid_t)pid, SIGKILL);
        while (waitpid((pid_t)pid, NULL, 0) < 0 && errno == EINTR)
            ;
        close(pidfd);
        out->pidfd = -1;
        return 1;
    }
    /* the detached mounts (user namespace), then 'S': the child may set up
     * its mounts while the caller attaches the cgroup. A failed send means
     * the child is gone: jc_release sees EOF or its failure record. */
    for (int i = 0; i < out->n_prepared; i++)
        if (jc_send_fd(sv[0], 'M', out->prepared[i]) != 1)
            break;
    jc_discard(out);
    jc_proceed(out);
    return 0;
}

int jc_proceed(struct jc_handle *h)
{
    char s = 'S';
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
    char b = 'R';
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
        union {
            struct cmsghdr h;
            char buf[CMSG_SPACE(sizeof(int) * 4)];
        } u;
        struct iovec iov = {buf, sizeof buf};
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = &iov;
        msg.msg_iovlen = 1;
        msg.msg_control = u.buf;
        msg.msg_controllen = sizeof u.buf;
        n = recvmsg(h->sync_fd, &msg, MSG_CMSG_CLOEXEC);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            ret = -errno;
            break;
        }
        int got_fd = -1;
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
                continue;
            size_t k = (cm->cmsg_len - CMSG_LEN(0)) / sizeof(int);
            for (size_t i = 0; i < k; i++) {
                int fd;
                memcpy(&fd, CMSG_DATA(cm) + i * sizeof(int), sizeof fd);
                if (got_fd < 0)
                    got_fd = fd;
                else
                    close(fd);
            }
        }
        if (n == 0) { /* EOF: every copy of the child's end is closed */
            if (got_fd >= 0)
                close(got_fd);
            break;
        }
        if (buf[0] == 'P' && n == 1 && got_fd >= 0 && h->pty_master < 0) {
            h->pty_master = got_fd;
            continue;
        }
        if (got_fd >= 0)
            close(got_fd);
        if (buf[0] == 'F' && (size_t)n == sizeof buf) {
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

/* ---- attaching a bind to a running container ------------------------------- */

struct jc_attach {
    int pidfd;            /* the container's init */
    int join;             /* CLONE_NEW* to join: CLONE_NEWNS, | CLONE_NEWUSER with a user namespace */
    int rootfd;           /* O_PATH of the container's root (/proc/PID/root, opened by the caller) */
    int mntfd;            /* the detached mount */
    const char *target;
    char step[32];
    int err;
};

/* The helper: a CLONE_VM child with its own fs_struct and fd table copy, so
 * that setns(CLONE_NEWNS) (refused to a process whose fs_struct is shared,
 * i.e. any thread of the threaded caller) and setns(CLONE_NEWUSER) (refused
 * to a thread group of more than one) work. Raw syscalls only, as in
 * jc_ns_helper_main: it shares the caller's memory; the result goes back
 * through `a` (the caller reads it after reaping us). */
static int jc_attach_main(void *arg)
{
    struct jc_attach *a = arg;
    int tfd;

    if (syscall(SYS_setns, a->pidfd, a->join) < 0) {
        jc_strlcpy(a->step, "attach-setns", sizeof a->step);
        goto fail;
    }
    if (a->join & CLONE_NEWUSER) {
        /* container root, as the cold start's child is: mount points it makes are
         * owned by container root, through the writable layer's idmap */
        if (syscall(SYS_setgroups, (size_t)0, NULL) < 0 || syscall(SYS_setresgid, 0, 0, 0) < 0 ||
            syscall(SYS_setresuid, 0, 0, 0) < 0) {
            jc_strlcpy(a->step, "attach-setuid", sizeof a->step);
            goto fail;
        }
    }
    /* resolved and made inside the container's root: a symlink or ".." the
     * container planted on the way stays inside it (RESOLVE_IN_ROOT) */
    tfd = jc_resolve(a->rootfd, a->target, 1);
    if (tfd < 0) {
        jc_strlcpy(a->step, "attach-mountpoint", sizeof a->step);
        goto fail;
    }
    if (jc_move_to(a->mntfd, tfd) < 0) {
        jc_strlcpy(a->step, "attach-move-mount", sizeof a->step);
        goto fail;
    }
    syscall(SYS_exit, 0);
    return 0;
fail:
    a->err = errno ? errno : EIO;
    syscall(SYS_exit, 1);
    return 1;
}

int jc_attach_bind(int pid, const struct jc_mount *m, long ruid, long rgid, struct jc_failure *failure)
{
    struct jc_attach a;
    char path[64];
    struct stat st;
    int rec = (m->flags & JC_MF_RECURSIVE) ? AT_RECURSIVE : 0;
    int mfd = -1, nsfd = -1, ret = 0, status;
    void *stack = MAP_FAILED;
    const size_t stack_size = 256 * 1024;
    long child;

    memset(&a, 0, sizeof a);
    a.pidfd = a.rootfd = -1;
    memset(failure, 0, sizeof *failure);
    /* the bind, made with the caller's (host) credentials, as jc_prep_bind makes it */
    mfd = open_tree(AT_FDCWD, m->source, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | rec);
    if (mfd < 0) {
        ret = jc_pfail(failure, "bind-mount", errno, m->source);
        goto out;
    }
    if (m->attrs && jc_setattr(mfd, rec != 0, m->attrs) < 0) {
        ret = jc_pfail(failure, "bind-mount", errno, m->source);
        goto out;
    }
    if ((m->flags & JC_MF_IDMAP) && ruid >= 0) {
        if (fstat(mfd, &st) < 0 || (nsfd = jc_one_id_userns(st.st_uid, ruid, st.st_gid, rgid)) < 0 ||
            jc_idmap(mfd, nsfd, rec != 0) < 0) {
            ret = jc_pfail(failure, "idmap-bind", errno, m->source);
            goto out;
        }
    }
    a.pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (a.pidfd < 0) {
        ret = jc_pfail(failure, "pidfd-open", errno, "");
        goto out;
    }
    snprintf(path, sizeof path, "/proc/%d/root", pid);
    a.rootfd = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (a.rootfd < 0) {
        ret = jc_pfail(failure, "attach-root", errno, path);
        goto out;
    }
    a.join = CLONE_NEWNS | (ruid >= 0 ? CLONE_NEWUSER : 0);
    a.mntfd = mfd;
    a.target = m->target;
    stack = mmap(NULL, stack_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
        ret = jc_pfail(failure, "attach-helper", errno, "");
        goto out;
    }
    /* no exit signal: only our waitpid(__WALL) reaps it (see jc_one_id_userns) */
    child = clone(jc_attach_main, (char *)stack + stack_size, CLONE_VM, &a);
    if (child < 0) {
        ret = jc_pfail(failure, "attach-helper", errno, "");
        goto out;
    }
    while (waitpid((pid_t)child, &status, __WALL) < 0 && errno == EINTR)
        ;
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        ret = jc_pfail(failure, a.step[0] ? a.step : "attach-helper", a.err ? a.err : EIO, m->target);
out:
    if (stack != MAP_FAILED)
        munmap(stack, stack_size);
    if (a.rootfd >= 0)
        close(a.rootfd);
    if (a.pidfd >= 0)
        close(a.pidfd);
    if (nsfd >= 0)
        close(nsfd);
    if (mfd >= 0)
        close(mfd);
    return ret;
}
