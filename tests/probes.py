"""The static C probe the escape tests run inside containers (root, user namespace, rootless).

It issues each syscall Docker's default seccomp profile denies (and a few it
allows) and prints ``name=errno`` per call (0: it went through).
"""

PROBE_C = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void report(const char *name, long rc) { printf("%s=%d\n", name, rc < 0 ? errno : 0); }
static void child_exit(long rc) { if (rc == 0) syscall(SYS_exit_group, 0); }

/* a state-changing call runs in a forked child, so the probe itself stays as it was */
#define IN_CHILD(name, call) do {                                         \
        pid_t pid_ = fork();                                              \
        if (pid_ == 0) { long r_ = (call); _exit(r_ < 0 ? errno : 0); }   \
        int st_ = 0;                                                      \
        waitpid(pid_, &st_, 0);                                           \
        printf("%s=%d\n", name, WIFEXITED(st_) ? WEXITSTATUS(st_) : 255); \
    } while (0)

#if defined(__x86_64__)
static long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    if (ret < 0 && ret > -4096) { errno = -ret; return -1; }
    return ret;
}
#endif

int main(void) {
    long rc;
    setvbuf(stdout, NULL, _IOLBF, 0);
    report("getpid", syscall(SYS_getpid));
    report("keyctl", syscall(SYS_keyctl, 9999, 0, 0, 0, 0));
    report("add_key", syscall(SYS_add_key, NULL, NULL, NULL, 0, 0));
    report("bpf", syscall(SYS_bpf, 9999, NULL, 0));
    report("perf_event_open", syscall(SYS_perf_event_open, NULL, 0, -1, -1, 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 1000000, NULL, 0));
    report("reboot", syscall(SYS_reboot, 0, 0, 0, NULL));   /* bad magic: EINVAL if it got through */
    report("init_module", syscall(SYS_init_module, NULL, 0, ""));
    report("open_by_handle_at", syscall(SYS_open_by_handle_at, -1, NULL, 0));
    report("mount", syscall(SYS_mount, "none", "/nonexistent-probe-target", "tmpfs", 0, NULL));
    report("umount2", syscall(SYS_umount2, "/nonexistent-probe-target", 0));
    report("setns", syscall(SYS_setns, -1, 0));
    IN_CHILD("unshare_user", syscall(SYS_unshare, CLONE_NEWUSER));
    report("personality_query", syscall(SYS_personality, 0xffffffffUL));
    IN_CHILD("personality_addr_no_randomize", syscall(SYS_personality, 0x0040000UL));
    report("clone3", syscall(SYS_clone3, NULL, 0));
    report("listmount", syscall(458, NULL, NULL, 0, 0));
    rc = syscall(SYS_clone, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0);
    child_exit(rc);
    report("clone_newuser", rc);
    if (rc > 0) waitpid(rc, NULL, 0);
    rc = syscall(SYS_clone, SIGCHLD, 0, 0, 0, 0);
    child_exit(rc);
    report("clone_fork", rc);
    if (rc > 0) waitpid(rc, NULL, 0);
    rc = syscall(SYS_socket, 2, 1, 0);             /* AF_INET, SOCK_STREAM */
    report("socket_inet", rc);
    if (rc >= 0) close(rc);
    rc = syscall(SYS_socket, 40, 1, 0);            /* AF_VSOCK */
    report("socket_vsock", rc);
    if (rc >= 0) close(rc);
#if defined(__x86_64__)
    report("i386_getpid", int80(20, 0, 0, 0));
    IN_CHILD("i386_unshare_user", int80(310, CLONE_NEWUSER, 0, 0));
#endif
    return 0;
}
"""
