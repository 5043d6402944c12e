/* The one header of the C shim, in two parts. The first is the extension's
 * API: build.py hands it to the cffi cdef verbatim, so it holds only plain
 * declarations (no #include, no #ifdef, only integer #defines; types from
 * <stdint.h> are known to cffi and are included by the C preamble before this
 * header). The second, after the "C only" line, is what the shim's files
 * share among themselves. */

/* struct jc_mount.kind */
#define JC_MOUNT_OVERLAY 1     /* overlay rootfs at a host path (target) */
#define JC_MOUNT_BIND 2        /* bind host path source onto container target */
#define JC_MOUNT_FS 3          /* new filesystem instance (proc, tmpfs, ...) */
#define JC_MOUNT_SYMLINK 4     /* symlink at target pointing to source */
#define JC_MOUNT_MASK 5        /* hide target: /dev/null over files, ro tmpfs over dirs */
#define JC_MOUNT_READONLY 6    /* bind target onto itself, read-only, recursively */
#define JC_MOUNT_REMOUNT_RO 7  /* make the mount at target read-only (not recursive) */
#define JC_MOUNT_FILE 8        /* a new 0644 file holding source (text), on a tmpfs of the
                                * container's own, bound at target: /etc/hosts and the like
                                * need no file on the host */

/* struct jc_mount.flags */
#define JC_MF_RECURSIVE 1      /* bind: whole subtree (AT_RECURSIVE) */
#define JC_MF_OPTIONAL 2       /* skip silently when the target does not exist */
#define JC_MF_IDMAP 4          /* bind: idmapped so that container root is the host folder's
                                * owner on it, and no other id is mapped (its files of other
                                * owners show as the overflow id, read-only; a chown to any
                                * other id fails). With a user namespace made by root and with
                                * the host's ids; ignored rootless */

/* at most this many cgroup v1 hierarchies (cgroup_tasks) */
#define JC_MAX_CGROUP_TASKS 16

/* user namespace: at most this many detached mounts go from parent to child */
#define JC_MAX_PREPARED 512

/* struct jc_mount.attrs: the kernel's MOUNT_ATTR_* values */
#define JC_ATTR_RDONLY 1
#define JC_ATTR_NOSUID 2
#define JC_ATTR_NODEV 4
#define JC_ATTR_NOEXEC 8
#define JC_ATTR_NOATIME 16
#define JC_ATTR_STRICTATIME 32

/* exit status of a container whose start was aborted or failed */
#define JC_EXIT_ABORTED 125

struct jc_mount {
    int kind;
    int flags;
    uint64_t attrs;
    const char *source;
    const char *target;
    const char *fstype;
    const char *const *options;   /* n_options (key, value) pairs; a NULL value sets a flag */
    int n_options;
    const char *const *lowerdirs; /* overlay: topmost first */
    int n_lowerdirs;
    const char *upperdir;
    const char *workdir;
};

struct jc_rlimit {
    int resource;
    uint64_t soft;
    uint64_t hard;
};

struct jc_config {
    /* namespaces */
    uint64_t clone_flags;         /* CLONE_NEW* passed to clone3 (never CLONE_NEWCGROUP) */
    int new_cgroupns;             /* unshare(CLONE_NEWCGROUP) once in the container's cgroup */
    /* cgroup v1: the container's `tasks` file in each hierarchy. The parent
     * opens them before the clone; the child moves itself into each (writes
     * "0") before anything else. A thread that moves itself skips the write
     * side of cgroup_threadgroup_rwsem, which costs whoever moves another
     * process an RCU grace period per batch of moves (5-13 ms here). */
    const char *const *cgroup_tasks;
    int n_cgroup_tasks;
    /* cgroup v2: the container's cgroup directory. The child is cloned
     * straight into it (clone3 CLONE_INTO_CGROUP), which likewise skips
     * that lock: no move at all */
    const char *cgroup_dir;
    /* the caller moves the child into its cgroup between jc_spawn and
     * jc_release: the cgroup namespace and the mounts from
     * mounts[n_early_mounts] on wait for the release */
    int cgroup_by_caller;
    int join_pidfd;               /* >= 0: setns into this process's namespaces instead */
    int join_flags;               /* CLONE_NEW* namespaces to join */
    /* user namespace (CLONE_NEWUSER in clone_flags): the parent writes these
     * maps ("inside outside count\n" lines), then makes the rootfs overlay
     * (idmapped layers) and every bind as detached mounts and hands them to
     * the child, which cannot reach host paths as container root */
    const char *uid_map;
    const char *gid_map;
    /* rootless: the caller writes the maps itself (newuidmap/newgidmap, or
     * its own id) between jc_spawn and jc_proceed; no idmapped mounts (an
     * unprivileged caller cannot make them): the child mounts everything
     * itself, as root of its user namespace */
    int caller_maps;
    /* filesystem */
    const struct jc_mount *mounts;
    int n_mounts;
    int n_early_mounts;           /* with cgroup_by_caller: mounts[0..n_early_mounts) are made
                                   * right after the clone, while the caller attaches the cgroup;
                                   * the rest, which need the container's cgroup namespace,
                                   * after the release. Without: every mount, the pivot_root,
                                   * hostname and loopback come before the release */
    const char *rootfs;           /* host path of the merged rootfs; pivot_root into it (NULL: none) */
    const char *hostname;         /* NULL: leave unchanged */
    int loopback_up;
    /* the payload process */
    const char *const *argv;      /* NULL-terminated */
    const char *const *envp;      /* NULL-terminated */
    const char *search_path;      /* PATH used to find an argv[0] without a slash */
    const char *cwd;
    uint32_t uid;
    uint32_t gid;
    const uint32_t *groups;
    int n_groups;
    const struct jc_rlimit *rlimits;
    int n_rlimits;
    uint64_t cap_keep;            /* bounding set (bit per capability) */
    int cap_last;                 /* /proc/sys/kernel/cap_last_cap */
    int no_new_privs;
    int stdio[3];                 /* ignored when terminal is set */
    int terminal;                 /* a pty inside the container: its slave is the payload's
                                   * stdio and controlling tty, its master goes to the caller */
    /* the init */
    const char *init_path;        /* host path of the jc-init executable, opened before
                                   * pivot_root (NULL: the in-process fallback init) */
    int exit_fd;                  /* >= 0: init writes "code N\n" / "signal N\n" here */
    int hold_fd;                  /* >= 0: init keeps this open for the container's life (the
                                   * write end of a pipe a helper, e.g. slirp4netns, watches) */
    const void *seccomp_filter;   /* struct sock_filter[seccomp_len], loaded last; may be NULL */
    int seccomp_len;
};

struct jc_handle {
    int pid;                      /* as seen from the caller's pid namespace */
    int pidfd;
    int sync_fd;                  /* parent end of the release/status socket */
    int pty_master;               /* after release: the container pty's master (or -1) */
    int *prepared;                /* user namespace: detached mounts sent at release */
    int n_prepared;
};

struct jc_failure {
    char step[32];
    int err;
    char path[1024];
};

/* 0: spawned; 1: a parent-side step failed (failure filled, child reaped); -errno */
int jc_spawn(const struct jc_config *cfg, struct jc_handle *out, struct jc_failure *failure);
/* close what the parent prepared for a child that will not be released */
void jc_discard(struct jc_handle *handle);
/* with caller_maps: the maps are written, the child may set up (0 or -errno) */
int jc_proceed(struct jc_handle *handle);
int jc_release(struct jc_handle *handle, struct jc_failure *failure);
/* Attach a bind of host m->source (JC_MOUNT_BIND: attrs, JC_MF_RECURSIVE, JC_MF_IDMAP with
 * container root's host ids ruid/rgid; -1: no user namespace) at container path m->target
 * inside the running container whose init is `pid`, making the mount point (inside the
 * container's root, as container root). 0, or 1 with failure filled. */
int jc_attach_bind(int pid, const struct jc_mount *m, long ruid, long rgid, struct jc_failure *failure);

/* ==== C only from here on ====================================================
 * build.py hands cffi only the part above this line; below it are the
 * declarations the shim's own files share (not callable from Python, hidden
 * from the extension's symbol table).
 *
 * The shim, by concern (each file's opening comment says which start step
 * it serves):
 *   shim.c      clone and the step protocol: jc_spawn, the child's sequence of
 *               steps, jc_proceed, jc_release, the packets and failure records
 *   cgroups.c   cgroup attach: v1 tasks files, the v2 cgroup for clone3
 *   idmap.c     id maps: the user namespace's maps, one-id namespaces, and the
 *               detached mounts the parent makes for a child in a user namespace
 *   mounts.c    the mount plan in the child, one function per JC_MOUNT_* kind;
 *               pivot_root, hostname, loopback; jc_attach_bind (a bind into a
 *               running container: the warm pool's hand-out)
 *   security.c  credentials, capabilities, no_new_privs, seccomp
 *   process.c   the payload and PID 1: stdio, terminal, rlimits, exec, jc-init
 */
#ifndef JC_SHIM_INTERNAL_H
#define JC_SHIM_INTERNAL_H

#include <stddef.h>
#include <sys/types.h>

#define JC_HIDDEN __attribute__((visibility("hidden")))
#define JC_NORETURN __attribute__((noreturn))

/* The packets of the step protocol (one SOCK_SEQPACKET socketpair): the
 * first byte of each packet. See shim.c for the order. */
enum jc_tag {
    JC_TAG_MOUNT = 'M',   /* parent -> child: one detached mount (SCM_RIGHTS), user namespace */
    JC_TAG_SETUP = 'S',   /* parent -> child: the id maps exist, set up */
    JC_TAG_RELEASE = 'R', /* parent -> child: the caller's setup is done, go on */
    JC_TAG_PTY = 'P',     /* child -> parent: the container pty's master (SCM_RIGHTS) */
    JC_TAG_FAILURE = 'F', /* child -> parent: a struct jc_failure follows; the child exits */
};

/* The child's state, from clone to execve. */
struct jc_ctx {
    const struct jc_config *cfg;
    int sync_fd;     /* child end of the socketpair */
    int rootfd;      /* O_PATH fd of the merged rootfs, once mounted */
    int pty_slave;   /* terminal: the slave of the container's pty */
    int go_fd;       /* payload: read end of the go pipe (EOF = init is ready) */
    int prepped;     /* user namespace made by root: mounts of host paths come prepared */
    const int *prep; /* the parent's detached mounts, in plan order */
    int n_prep;
    int next_prep;
    int files_fd;    /* JC_MOUNT_FILE: the detached tmpfs holding those files */
    int n_files;
};

/* shim.c: the protocol, failure records */
JC_HIDDEN size_t jc_strlcpy(char *dst, const char *src, size_t size);
JC_HIDDEN ssize_t jc_send_fd(int sock, char tag, int fd);
JC_HIDDEN JC_NORETURN void jc_fail_code(struct jc_ctx *c, const char *step, int err, const char *path,
                                        int code);
JC_HIDDEN JC_NORETURN void jc_fail(struct jc_ctx *c, const char *step, int err, const char *path);
JC_HIDDEN int jc_pfail(struct jc_failure *f, const char *step, int err, const char *path);
JC_HIDDEN void jc_close_fds(const int *fds, int n);

/* cgroups.c */
JC_HIDDEN int jc_open_cgroups(const struct jc_config *cfg, int *cg_fds, int *cg_dirfd, struct jc_failure *f);
JC_HIDDEN void jc_enter_cgroups(struct jc_ctx *c, const int *cg_fds);

/* idmap.c */
JC_HIDDEN int jc_prepare_userns(const struct jc_config *cfg, pid_t pid, struct jc_handle *h,
                                struct jc_failure *f);
JC_HIDDEN void jc_become_ns_root(struct jc_ctx *c);
JC_HIDDEN int jc_idmap(int mntfd, int userns_fd, int recursive);
JC_HIDDEN int jc_one_id_userns(unsigned long uid_in, long uid_out, unsigned long gid_in, long gid_out);

/* mounts.c */
JC_HIDDEN int jc_openat2(int dirfd, const char *path, uint64_t flags, uint64_t resolve);
JC_HIDDEN int jc_resolve(int rootfd, const char *path, int create);
JC_HIDDEN int jc_move_to(int mntfd, int targetfd);
JC_HIDDEN int jc_setattr(int fd, int recursive, uint64_t attrs);
JC_HIDDEN void jc_do_mount(struct jc_ctx *c, const struct jc_mount *m);
JC_HIDDEN void jc_enter_rootfs(struct jc_ctx *c);

/* security.c */
JC_HIDDEN int jc_capset(uint64_t eff, uint64_t prm, uint64_t inh);
JC_HIDDEN int jc_drop_bounding_to(int cap_last, uint64_t keep);
JC_HIDDEN void jc_drop_privileges(struct jc_ctx *c);
JC_HIDDEN void jc_load_seccomp(struct jc_ctx *c);

/* process.c */
JC_HIDDEN void jc_reset_signals(void);
JC_HIDDEN void jc_hide_origin(void);
JC_HIDDEN void jc_open_pty(struct jc_ctx *c);
JC_HIDDEN JC_NORETURN void jc_start_init(struct jc_ctx *c, int init_fd);

#endif /* JC_SHIM_INTERNAL_H */
