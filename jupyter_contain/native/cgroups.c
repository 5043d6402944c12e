/*
 * Cgroup attach: the step "cgroup-attach" of a container start.
 *
 * Owns: opening the container's cgroups in the parent, before the clone
 * (v1: each hierarchy's `tasks` file; v2: the cgroup directory that clone3
 * puts the child into, CLONE_INTO_CGROUP), and the child's first step on v1,
 * moving itself into them.
 * Must not: create or configure cgroups (the runtime's cgroups.py does), or
 * move any process but the child itself.
 *
 * Why the child moves itself: a process moved by another takes the write side
 * of the kernel's cgroup_threadgroup_rwsem and waits for an RCU grace period
 * (5-13 ms per start here); a thread that moves itself skips it. On v2 the
 * child is born in its cgroup and nothing moves at all.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

#include "shim.h"

/* Open what the child needs to be in its cgroups: cg_fds[n_cgroup_tasks]
 * (v1) and *cg_dirfd (v2, or -1). 0, or 1 with f filled and nothing left open. */
int jc_open_cgroups(const struct jc_config *cfg, int *cg_fds, int *cg_dirfd, struct jc_failure *f)
{
    int n = 0, ret = 0;

    *cg_dirfd = -1;
    if (cfg->n_cgroup_tasks < 0 || cfg->n_cgroup_tasks > JC_MAX_CGROUP_TASKS) {
        ret = jc_pfail(f, "cgroup-attach", E2BIG, "");
        goto out;
    }
    for (; n < cfg->n_cgroup_tasks; n++) {
        cg_fds[n] = open(cfg->cgroup_tasks[n], O_WRONLY | O_CLOEXEC);
        if (cg_fds[n] < 0) {
            ret = jc_pfail(f, "cgroup-attach", errno, cfg->cgroup_tasks[n]);
            goto out;
        }
    }
    if (cfg->cgroup_dir) {
        *cg_dirfd = open(cfg->cgroup_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (*cg_dirfd < 0)
            ret = jc_pfail(f, "cgroup-attach", errno, cfg->cgroup_dir);
    }
out:
    if (ret != 0)
        jc_close_fds(cg_fds, n);
    return ret;
}

/* Into the container's cgroups (v1), as the very first step: before the
 * first mount (which is charged to the memory cgroup of whoever makes it)
 * and before anything forks. The fds were opened by the parent, whose
 * credentials the kernel checks (those of the opener), so this works from
 * inside a user namespace too. */
void jc_enter_cgroups(struct jc_ctx *c, const int *cg_fds)
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
