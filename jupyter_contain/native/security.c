/*
 * Credentials, capabilities, no_new_privs and seccomp: the payload's steps
 * "capabilities", "setgroups", "setgid", "setuid", "no-new-privs" and
 * "seccomp", and the capabilities PID 1 keeps.
 *
 * Owns: dropping the bounding set to the kept capabilities, the payload's
 * user and groups (raw setres[ug]id / setgroups: glibc's wrappers would try
 * to broadcast the change to the threads of the caller, which this copy of
 * it does not have), its effective/permitted/ambient sets, no_new_privs,
 * and loading the seccomp program, always the very last step before execve.
 * Must not: decide the capability set or compile a filter (the runtime
 * hands both in: spawn.py, seccomp.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

#include "shim.h"

#ifndef PR_CAP_AMBIENT
#define PR_CAP_AMBIENT 47
#define PR_CAP_AMBIENT_CLEAR_ALL 4
#endif

int jc_capset(uint64_t eff, uint64_t prm, uint64_t inh)
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

int jc_drop_bounding_to(int cap_last, uint64_t keep)
{
    for (int cap = 0; cap <= cap_last && cap < 64; cap++) {
        if (keep & (1ULL << cap))
            continue;
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -1;
    }
    return 0;
}

/* The payload's user, groups and capabilities, then no_new_privs. */
void jc_drop_privileges(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;

    if (jc_drop_bounding_to(cfg->cap_last, cfg->cap_keep) < 0)
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
}

/* The seccomp slot: always the very last step before execve (the program
 * comes compiled from the runtime; no filter when it is empty). */
void jc_load_seccomp(struct jc_ctx *c)
{
    const struct jc_config *cfg = c->cfg;

    if (cfg->seccomp_filter && cfg->seccomp_len > 0) {
        struct sock_fprog prog;
        prog.len = (unsigned short)cfg->seccomp_len;
        prog.filter = (struct sock_filter *)cfg->seccomp_filter;
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0) < 0)
            jc_fail(c, "seccomp", errno, "");
    }
}
