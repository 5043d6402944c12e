/*
 * Id maps: the steps "uid-map", "gid-map", "userns", "idmap-layer",
 * "idmap-upper", "idmap-bind" (and "mount-rootfs", "bind-mount" as the
 * parent makes them), in the parent between clone and release; and the
 * child's "setgroups"/"setgid"/"setuid" of becoming its namespace's root.
 *
 * Owns: writing a child's /proc/PID/[ug]id_map; the one-id user namespaces
 * that idmap a host folder to exactly one id (container root <-> the folder's
 * owner); and, for a child in a new user namespace made by root, every mount
 * of a host path made by the parent as a detached mount: the rootfs overlay
 * over idmapped layers (created in the initial user namespace, so overlayfs
 * keeps trusted.* xattrs and char 0:0 whiteouts) and every bind. The child
 * only attaches them (mounts.c).
 * Must not: decide the maps (idmap.py / spawn.py do), or run in the child
 * except jc_become_ns_root and jc_one_id_userns (raw calls, no stdio: safe
 * after clone).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <linux/capability.h>

#include "shim.h"
#include "init_loop.h"

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

int jc_idmap(int mntfd, int userns_fd, int recursive)
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
/* The same overlay for kernels whose overlayfs takes no detached layers:
 * before 6.15 overlayfs clones each layer with clone_private_mount(), which
 * refuses a mount outside the caller's mount namespace (EINVAL; seen on
 * Debian 12's 6.1, whose overlay has no "lowerdir+" either). A thread of our
 * own unshares a private mount namespace (its own fs struct: the process's
 * other threads and the host's mount table never see it), attaches each
 * idmapped clone over its own path there, and makes the overlay from those
 * paths the old way ("lowerdir=a:b"); overlayfs keeps private clones of
 * them, so the overlay outlives the thread and its namespace. */
struct jc_legacy_ovl {
    const struct jc_mount *m;
    const char *upper_parent; /* NULL without a writable layer */
    int userns_fd;
    long ruid, rgid;
    struct jc_failure *f;
    int mfd;
};

static void *jc_legacy_ovl_thread(void *arg)
{
    struct jc_legacy_ovl *L = arg;
    const struct jc_mount *m = L->m;
    char opts[4096];
    size_t n = 0;
    int fsfd = -1;

    if (unshare(CLONE_NEWNS | CLONE_FS) < 0 || mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) {
        jc_pfail(L->f, "mount-rootfs", errno, m->target);
        return NULL;
    }
    for (int i = 0; i <= m->n_lowerdirs; i++) {
        const char *path = i < m->n_lowerdirs ? m->lowerdirs[i] : L->upper_parent;
        if (!path)
            continue;
        int fd = jc_idmapped_clone(path, L->userns_fd, L->f, i < m->n_lowerdirs ? "idmap-layer" : "idmap-upper");
        if (fd < 0)
            return NULL;
        int r = move_mount(fd, "", AT_FDCWD, path, MOVE_MOUNT_F_EMPTY_PATH);
        int e = errno;
        close(fd);
        if (r < 0) {
            jc_pfail(L->f, "mount-rootfs", e, path);
            return NULL;
        }
        /* "lowerdir=a:b" cannot carry these; store paths never hold them */
        if (i < m->n_lowerdirs && (strpbrk(path, ":,\\") || n + strlen(path) + 2 >= sizeof opts)) {
            jc_pfail(L->f, "mount-rootfs", E2BIG, path);
            return NULL;
        }
        if (i < m->n_lowerdirs) {
            if (n)
                opts[n++] = ':';
            memcpy(opts + n, path, strlen(path) + 1);
            n += strlen(path);
        }
    }
    fsfd = fsopen("overlay", FSOPEN_CLOEXEC);
    if (fsfd < 0 || fsconfig(fsfd, FSCONFIG_SET_STRING, "lowerdir", opts, 0) < 0 ||
        (m->upperdir && fsconfig(fsfd, FSCONFIG_SET_STRING, "upperdir", m->upperdir, 0) < 0) ||
        (m->workdir && m->upperdir && fsconfig(fsfd, FSCONFIG_SET_STRING, "workdir", m->workdir, 0) < 0)) {
        jc_pfail(L->f, "mount-rootfs", errno, m->target);
        goto out;
    }
    for (int i = 0; i < m->n_options; i++) {
        const char *k = m->options[2 * i], *v = m->options[2 * i + 1];
        if ((v ? fsconfig(fsfd, FSCONFIG_SET_STRING, k, v, 0) : fsconfig(fsfd, FSCONFIG_SET_FLAG, k, NULL, 0)) < 0) {
            jc_pfail(L->f, "mount-rootfs", errno, m->target);
            goto out;
        }
    }
    if (jc_create_as(fsfd, L->ruid, L->rgid) < 0) {
        jc_pfail(L->f, "mount-rootfs", errno, m->target);
        goto out;
    }
    L->mfd = fsmount(fsfd, FSMOUNT_CLOEXEC, (unsigned int)(m->attrs & ~(uint64_t)JC_ATTR_RDONLY));
    if (L->mfd < 0)
        jc_pfail(L->f, "mount-rootfs", errno, m->target);
out:
    if (fsfd >= 0)
        close(fsfd);
    return NULL;
}

static int jc_prep_overlay_legacy(const struct jc_mount *m, const char *upper_parent, int userns_fd, long ruid,
                                  long rgid, struct jc_failure *f)
{
    struct jc_legacy_ovl L = {.m = m, .upper_parent = upper_parent, .userns_fd = userns_fd,
                              .ruid = ruid, .rgid = rgid, .f = f, .mfd = -1};
    pthread_t t;
    int e = pthread_create(&t, NULL, jc_legacy_ovl_thread, &L);
    if (e != 0)
        return -jc_pfail(f, "mount-rootfs", e, m->target);
    pthread_join(t, NULL);
    return L.mfd;
}

static int jc_prep_overlay(const struct jc_config *cfg, const struct jc_mount *m, int userns_fd,
                           struct jc_failure *f)
{
    char buf[4200], upper_parent[4200] = "";
    int fsfd = -1, pfd = -1, mfd = -1, nl = 0, legacy = 0;
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
        memcpy(upper_parent, buf, ul + 1);
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
            legacy = i == 0 && errno == EINVAL; /* 6.5-6.7: no "lowerdir+" */
            if (!legacy)
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
        /* < 6.15: detached layers refused (< 6.5: "lowerdir+" too, seen only now) */
        legacy = errno == EINVAL;
        if (!legacy)
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
    if (legacy)
        return jc_prep_overlay_legacy(m, m->upperdir ? upper_parent : NULL, userns_fd, ruid, rgid, f);
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
int jc_one_id_userns(unsigned long uid_in, long uid_out, unsigned long gid_in, long gid_out)
{
    char stack[16384] __attribute__((aligned(16)));
    char map[64], path[64] = "/proc/";
    struct jc_ns_helper h;
    int fd = -1, e = 0, st, ready_w = -1;
    size_t pl;
    char b;
    pid_t pid = -1;

    memset(&h, 0, sizeof h);
    h.wait[0] = h.wait[1] = h.ready[0] = h.ready[1] = -1;
    if (pipe2(h.wait, O_CLOEXEC) < 0 || pipe2(h.ready, O_CLOEXEC) < 0) {
        e = errno;
        goto out;
    }
    ready_w = h.ready[1];
    /* no exit signal: only a waitpid(__WALL) for this pid reaps it, never
     * another thread's waitpid(-1), and Python sees no SIGCHLD. From here on
     * `h` is shared with the helper: only it writes there (h.pid) */
    pid = clone(jc_ns_helper_main, stack + sizeof stack, CLONE_VM | CLONE_NEWUSER, &h);
    e = errno;
    close(ready_w); /* a helper gone before its byte: EOF, not a hang */
    ready_w = -1;
    if (pid < 0)
        goto out;
    if (read(h.ready[0], &b, 1) != 1) {
        e = errno ? errno : ECHILD;
        goto out;
    }
    e = 0;
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
    pl = strlen(h.pid);
    memcpy(path + 6, h.pid, pl);
    memcpy(path + 6 + pl, "/ns/user", 9);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        e = errno;
out:
    if (ready_w >= 0)
        close(ready_w);
    if (h.wait[1] >= 0) {
        /* a byte, not only EOF: a container child that another thread cloned
         * meanwhile (no CLONE_FILES: a copy of our fd table) holds a copy of
         * this write end until it execs, and may be waiting for a release
         * that thread cannot give until its own helper exits: 30 concurrent
         * kernel starts deadlocked so (bench_kernel.py --concurrent 30) */
        b = 0;
        (void)!write(h.wait[1], &b, 1);
        close(h.wait[1]);
    }
    if (pid > 0)
        while (waitpid(pid, &st, __WALL) < 0 && errno == EINTR)
            ;
    if (h.wait[0] >= 0)
        close(h.wait[0]);
    if (h.ready[0] >= 0)
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
    int nsfd, e;

    if (fd < 0)
        return -jc_pfail(f, step, errno, m->source); /* nothing made yet */
    if (m->attrs && jc_setattr(fd, rec != 0, m->attrs) < 0)
        goto out;
    if (m->flags & JC_MF_IDMAP) {
        step = "idmap-bind";
        if (fstat(fd, &st) < 0 || (nsfd = jc_one_id_fd(pc, st.st_uid, st.st_gid)) < 0 ||
            jc_idmap(fd, nsfd, rec != 0) < 0)
            goto out;
    }
    return fd;
out: /* a step failed: errno says why */
    e = errno;
    close(fd);
    return -jc_pfail(f, step, e, m->source);
}

/* Between clone and release, for a child in a new user namespace: write its
 * id maps, then make every mount of a host path (the child, container root
 * already, may not even be able to look such paths up). */
int jc_prepare_userns(const struct jc_config *cfg, pid_t pid, struct jc_handle *h, struct jc_failure *f)
{
    char path[4200];
    int userns_fd = -1, fd, ret = 0;
    struct jc_prep_ctx pc;

    memset(&pc, 0, sizeof pc);
    if (jc_write_map(pid, "uid_map", cfg->uid_map) < 0) {
        ret = jc_pfail(f, "uid-map", errno, cfg->uid_map);
        goto out;
    }
    if (jc_write_map(pid, "gid_map", cfg->gid_map) < 0) {
        ret = jc_pfail(f, "gid-map", errno, cfg->gid_map);
        goto out;
    }
    snprintf(path, sizeof path, "/proc/%d/ns/user", (int)pid);
    userns_fd = open(path, O_RDONLY | O_CLOEXEC);
    if (userns_fd < 0) {
        ret = jc_pfail(f, "userns", errno, path);
        goto out;
    }
    h->prepared = calloc((size_t)cfg->n_mounts + 2, sizeof(int));
    if (!h->prepared) {
        ret = jc_pfail(f, "mount-plan", ENOMEM, "");
        goto out;
    }
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
out:
    for (int i = 0; i < pc.n_ns; i++)
        close(pc.ns[i].fd); /* the mounts keep what they need of them */
    if (userns_fd >= 0)
        close(userns_fd);
    return ret;
}

/* In a user namespace, first of all: become its root. Until then we are the
 * host's root seen from inside (unmapped: "nobody"), with host root's
 * supplementary groups, and could not create a file on an idmapped mount. */
void jc_become_ns_root(struct jc_ctx *c)
{
    if (syscall(SYS_setgroups, (size_t)0, NULL) < 0 && !(errno == EPERM && c->cfg->caller_maps))
        jc_fail(c, "setgroups", errno, "user namespace");
    if (syscall(SYS_setresgid, 0, 0, 0) < 0)
        jc_fail(c, "setgid", errno, "user namespace");
    if (syscall(SYS_setresuid, 0, 0, 0) < 0)
        jc_fail(c, "setuid", errno, "user namespace");
}
