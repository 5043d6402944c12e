/*
 * jc-init: PID 1 of a container (and the relay of an exec), a tiny static
 * executable the shim runs with execveat after it forked the payload.
 *
 * Why a separate executable: before, PID 1 was a copy-on-write clone of the
 * (large, threaded) Python server, and every page the server later wrote
 * stayed duplicated in each container's init for the container's life.
 * Exec'ing this binary drops that address space; what remains is a few
 * pages. It is statically linked because it starts after pivot_root, where
 * no host dynamic loader is reachable.
 *
 * Contract with the shim (shim.c, jc_exec_init):
 *   argv    = { "jc-init" } (nothing of the host's command line)
 *   envp    = { "JC_PAYLOAD=<pid of the payload as we see it>" }
 *   fd 0-2  = /dev/null
 *   fd 3    = write end of the payload's go pipe: closing it lets the
 *             payload exec (it only waits for EOF), so it never runs before
 *             we forward signals
 *   fd 4    = (optional) where the payload's status goes: "code N\n" or
 *             "signal N\n", written before we exit. An empty file after
 *             we are gone means we were killed: every signal is blocked
 *             and we are PID 1 of our namespace, so only SIGKILL ends us
 *             without a word (the runtime records SIGKILL then; our
 *             parent, if it is the runtime, sees it in the wait status)
 *   fd 5    = (optional) held open, unused, until we exit: a helper that
 *             serves the container (slirp4netns) watches the other end
 *   every signal blocked; signals sent before we ran are still pending.
 * Must not: read files, allocate, or outlive the payload.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <sys/prctl.h>

#include "shim.h"
#include "init_loop.h"

int main(int argc, char **argv, char **envp)
{
    (void)argc;
    (void)argv;
    /* first: not dumpable, so nothing in the container can ptrace us, read
     * /proc/1/{mem,environ} or open /proc/1/exe (a host file). The payload
     * cannot run yet: it waits for fd 3. */
    prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);

    long payload = 0;
    for (char **e = envp; e && *e; e++) {
        if (strncmp(*e, "JC_PAYLOAD=", 11) == 0) {
            for (const char *p = *e + 11; *p >= '0' && *p <= '9'; p++)
                payload = payload * 10 + (*p - '0');
        }
    }
    if (payload <= 0 || payload > 0x7fffffff)
        _exit(JC_EXIT_ABORTED);
    int exit_fd = fcntl(4, F_GETFD) >= 0 ? 4 : -1;
    if (exit_fd >= 0)
        fcntl(exit_fd, F_SETFD, FD_CLOEXEC);
    close(3); /* go: the payload may exec now */
    jc_init_loop((pid_t)payload, exit_fd);
}
