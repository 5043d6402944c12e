/*
 * The loop of a container's PID 1 (and of an exec relay), shared by the
 * separate jc-init executable and the shim's in-process fallback.
 *
 * Owns: forwarding signals to the payload, reaping every child, writing the
 * payload's status to the exit fd, exiting with that status.
 * Must not: allocate, use stdio, or call anything that is not
 * async-signal-safe (the fallback runs in a clone of a threaded process).
 * Not a cffi header: only C files include it.
 */
#ifndef JC_INIT_LOOP_H
#define JC_INIT_LOOP_H

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>
#include <sys/types.h>
#include <sys/wait.h>

static inline int jc_is_forwarded(int sig)
{
    switch (sig) {
    case SIGTERM: case SIGINT: case SIGHUP: case SIGQUIT: case SIGUSR1:
    case SIGUSR2: case SIGWINCH: case SIGCONT: case SIGALRM:
        return 1;
    default:
        return 0;
    }
}

/* "code N\n" or "signal N\n": a process that is not our parent reads it
 * after we are gone (the only record of a detached container's exit). No
 * fsync: readers go through the page cache, and after a crash of the
 * machine the container is gone anyway (recorded then as ended unknown).
 * Best effort: nothing to report a failure to. */
/* Append v in decimal at dst, NUL-terminated (at most 11 bytes); returns
 * the number of digits. No stdio: safe in a child after clone. */
static inline size_t jc_utoa(char *dst, unsigned v)
{
    char digits[12];
    size_t n = 0, d = 0;
    do {
        digits[d++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (d)
        dst[n++] = digits[--d];
    dst[n] = 0;
    return n;
}

static inline void jc_write_exit(int fd, int status)
{
    char buf[32];
    const char *word = WIFEXITED(status) ? "code " : "signal ";
    unsigned v = WIFEXITED(status) ? (unsigned)WEXITSTATUS(status) : (unsigned)WTERMSIG(status);
    size_t n = strlen(word);

    memcpy(buf, word, n);
    n += jc_utoa(buf + n, v);
    buf[n++] = '\n';
    for (size_t off = 0; off < n;) {
        ssize_t w = write(fd, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += (size_t)w;
    }
}

/* Every signal is blocked on entry (and stays blocked): a signal sent before
 * we got here is pending, not lost, and sigwaitinfo picks it up. */
__attribute__((noreturn)) static inline void jc_init_loop(pid_t payload, int exit_fd)
{
    sigset_t all;
    siginfo_t si;

    sigfillset(&all);
    sigprocmask(SIG_SETMASK, &all, NULL);
    for (int sig = 0;; sig = sigwaitinfo(&all, &si)) {
        /* the first pass (sig 0) reaps a payload that ended before we got
         * here; later, any SIGCHLD (pending while blocked) leads here */
        if (sig < 0)
            continue;
        if (jc_is_forwarded(sig))
            kill(payload, sig);
        for (;;) {
            int st;
            pid_t w = waitpid(-1, &st, WNOHANG);
            if (w <= 0)
                break;
            if (w == payload) {
                if (exit_fd >= 0)
                    jc_write_exit(exit_fd, st);
                _exit(WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st));
            }
        }
    }
}

#endif
