/*
 * The mount plan in the child: the steps "make-private" (shim.c), "mount-rootfs",
 * "bind-mount", "idmap-bind", "mount", "symlink", "mask-path", "readonly-path",
 * "file-mount", "remount-readonly", then "pivot-root", "sethostname" and
 * "loopback".
 *
 * Owns: executing struct jc_mount entries in plan order, one function per
 * JC_MOUNT_* kind (jc_do_mount dispatches), with the new mount API
 * (fsopen/fsmount, open_tree, move_mount, mount_setattr); resolving every
 * container path inside the rootfs (openat2 RESOLVE_IN_ROOT: a symlink or
 * ".." in an image can never lead out of it); pivot_root into the rootfs,
 * the hostname and the loopback interface. And, for the warm pool's hand-out
 * ("bind-mount", "idmap-bind", "attach-*"), attaching a bind to a running
 * container (jc_attach_bind, from the caller's side).
 * Must not: plan (rootfs.py made the list; a kind or order this file does not
 * know is an error, never a guess), or reach a host path as container root
 * in a user namespace (the parent made those mounts: idmap.c).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <linux/openat2.h>

#include "shim.h"
#include "init_loop.h"

int jc_openat2(int dirfd, const char *path, uint64_t flags, uint64_t resolve)
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
int jc_resolve(int rootfd, const char *path, int create)
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

int jc_move_to(int mntfd, int targetfd)
{
    return move_mount(mntfd, "", targetfd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH);
}

int jc_setattr(int fd, int recursive, uint64_t attrs)
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
    /* Many long layer paths do not fit in the page: name them by fds instead
     * (overlayfs follows /proc/self/fd/N to the directory; 16 bytes a layer) */
    size_t total = 0;
    for (int i = 0; i < m->n_lowerdirs; i++)
        total += strlen(m->lowerdirs[i]) + 1;
    int by_fd = total > cap / 2, nfd = 0;
    int fds[m->n_lowerdirs > 0 ? m->n_lowerdirs : 1];
    JC_APPEND("lowerdir=");
    for (int i = 0; i < m->n_lowerdirs; i++) {
        if (i)
            JC_APPEND(":");
        if (by_fd) {
            char fdpath[32] = "/proc/self/fd/";
            fds[nfd] = open(m->lowerdirs[i], O_PATH | O_DIRECTORY | O_CLOEXEC);
            if (fds[nfd] < 0)
                jc_fail(c, "mount-rootfs", errno, m->lowerdirs[i]);
            jc_utoa(fdpath + strlen(fdpath), (unsigned)fds[nfd++]);
            JC_APPEND(fdpath);
        } else {
            JC_APPEND(m->lowerdirs[i]);
        }
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
    for (int i = 0; i < nfd; i++)
        close(fds[i]);
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
                /* kernel without lowerdir+ (6.5-6.7: refused at once; before 6.5 the
                 * old-style parser takes it as text until its page is full) */
                if (errno == EINVAL) {
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

/* JC_MOUNT_BIND: a host path onto a container path (with a user namespace
 * made by root: the parent's prepared mount, attributes and idmap set). */
static void jc_mount_bind(struct jc_ctx *c, const struct jc_mount *m)
{
    int rec = (m->flags & JC_MF_RECURSIVE) ? AT_RECURSIVE : 0;
    struct stat st;
    int sfd, tfd;

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
}

/* JC_MOUNT_FS: a new filesystem instance (proc, tmpfs, devpts, ...). */
static void jc_mount_fs(struct jc_ctx *c, const struct jc_mount *m)
{
    int sfd = jc_new_fs(c, "mount", m);
    int tfd = jc_resolve(c->rootfd, m->target, 1);
    if (tfd < 0)
        jc_fail(c, "mount", errno, m->target);
    if (jc_move_to(sfd, tfd) < 0)
        jc_fail(c, "mount", errno, m->target);
    close(sfd);
    close(tfd);
}

/* JC_MOUNT_SYMLINK: a symlink at target pointing to source (its folder made). */
static void jc_mount_symlink(struct jc_ctx *c, const struct jc_mount *m)
{
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
}

/* JC_MOUNT_MASK: hide target, /dev/null (or source) over a file, an empty
 * read-only tmpfs over a folder; nothing to do where it does not exist. */
static void jc_mount_mask(struct jc_ctx *c, const struct jc_mount *m)
{
    struct stat st;
    int sfd, tfd = jc_open_in_root(c->rootfd, m->target, 0);
    if (tfd < 0) {
        if (errno == ENOENT)
            return; /* nothing to hide */
        jc_fail(c, "mask-path", errno, m->target);
    }
    if (fstat(tfd, &st) < 0)
        jc_fail(c, "mask-path", errno, m->target);
    if (S_ISDIR(st.st_mode)) {
        const struct jc_mount t = {
            .fstype = "tmpfs",
            .target = m->target,
            .attrs = JC_ATTR_RDONLY | JC_ATTR_NOSUID | JC_ATTR_NODEV | JC_ATTR_NOEXEC,
        };
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
}

/* JC_MOUNT_READONLY: bind target onto itself, read-only, recursively. */
static void jc_mount_readonly(struct jc_ctx *c, const struct jc_mount *m)
{
    int sfd, tfd = jc_open_in_root(c->rootfd, m->target, 0);
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
}

/* JC_MOUNT_FILE: a new 0644 file holding source, on a small tmpfs of the
 * container's own (made at the first such entry), bound at target. */
static void jc_mount_file(struct jc_ctx *c, const struct jc_mount *m)
{
    /* the tmpfs has no mount point: it lives as long as a bind of it */
    if (c->files_fd < 0) {
        /* small: the container may write these files, not fill memory */
        static const char *const opts[] = {"size", "1m", "nr_inodes", "64", "mode", "0755"};
        const struct jc_mount t = {
            .fstype = "tmpfs",
            .target = m->target,
            .options = opts,
            .n_options = 3,
            .attrs = JC_ATTR_NOSUID | JC_ATTR_NODEV | JC_ATTR_NOEXEC,
        };
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
    int sfd = open_tree(c->files_fd, name, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    if (sfd < 0 && errno == EINVAL) {
        /* Before 6.15 a detached mount cannot be cloned (EINVAL; seen on
         * Debian 12's 6.1): attach the tmpfs first (once: then clones work),
         * stacked on the new root, which nothing of the container sees before
         * jc_enter_rootfs takes it off again (lookups here start at rootfd,
         * beneath it). In a user namespace the child can reach no host folder,
         * so the root is the one place that serves both kinds of start. */
        if (move_mount(c->files_fd, "", c->rootfd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0)
            jc_fail(c, "file-mount", errno, m->target);
        sfd = open_tree(c->files_fd, name, OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC);
    }
    if (sfd < 0)
        jc_fail(c, "file-mount", errno, m->target);
    int tfd = jc_resolve(c->rootfd, m->target, 2);
    if (tfd < 0)
        jc_fail(c, "file-mount", errno, m->target);
    if (jc_move_to(sfd, tfd) < 0)
        jc_fail(c, "file-mount", errno, m->target);
    close(sfd);
    close(tfd);
}

/* JC_MOUNT_REMOUNT_RO: the mount at target read-only (not recursive). */
static void jc_mount_remount_ro(struct jc_ctx *c, const struct jc_mount *m)
{
    int tfd = jc_open_in_root(c->rootfd, m->target, 0);
    if (tfd < 0)
        jc_fail(c, "remount-readonly", errno, m->target);
    if (jc_setattr(tfd, 0, JC_ATTR_RDONLY | m->attrs) < 0)
        jc_fail(c, "remount-readonly", errno, m->target);
    close(tfd);
}

/* One entry of the plan. Every kind but the overlay needs the rootfs first. */
void jc_do_mount(struct jc_ctx *c, const struct jc_mount *m)
{
    if (m->kind != JC_MOUNT_OVERLAY && c->rootfd < 0)
        jc_fail(c, "mount", EBADF, m->target); /* plan without a rootfs first */

    switch (m->kind) {
    case JC_MOUNT_OVERLAY:
        jc_mount_overlay(c, m);
        return;
    case JC_MOUNT_BIND:
        jc_mount_bind(c, m);
        return;
    case JC_MOUNT_FS:
        jc_mount_fs(c, m);
        return;
    case JC_MOUNT_SYMLINK:
        jc_mount_symlink(c, m);
        return;
    case JC_MOUNT_MASK:
        jc_mount_mask(c, m);
        return;
    case JC_MOUNT_READONLY:
        jc_mount_readonly(c, m);
        return;
    case JC_MOUNT_FILE:
        jc_mount_file(c, m);
        return;
    case JC_MOUNT_REMOUNT_RO:
        jc_mount_remount_ro(c, m);
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

/* pivot_root into the rootfs, hostname, loopback: the last steps of the
 * container's own setup */
void jc_enter_rootfs(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;
    if (c->files_fd >= 0) { /* its files are bound where they belong */
        char path[32] = "/proc/self/fd/";
        jc_utoa(path + strlen(path), (unsigned)c->files_fd);
        /* attached over the root (kernels < 6.15, see jc_mount_file): off again;
         * a detached one is no mount of ours (EINVAL), nothing to do */
        if (umount2(path, MNT_DETACH) < 0 && errno != EINVAL)
            jc_fail(c, "file-mount", errno, "/");
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
