"""The one exception tree of jupyter-contain.

Owns every exception type the package raises on purpose. Must not import any
other module of the package (every room depends on it, it depends on none).

Each exception carries a one-line, user-facing message; the CLI prints it
without a traceback and exits with ``exit_code``.
"""

from __future__ import annotations


class ContainError(Exception):
    """Base of every error jupyter-contain raises on purpose."""

    #: process exit code the CLI uses for this error (Docker's convention:
    #: 125 = the engine itself failed, 126 = cannot invoke, 127 = not found).
    exit_code: int = 125


# --- images -----------------------------------------------------------------

class ImageError(ContainError):
    """Something is wrong with an image, a manifest or a blob."""


class InvalidReference(ImageError):
    """An image reference (name, tag, digest) does not parse."""


class ImageNotFound(ImageError):
    """No image in the store (or registry) answers to that reference."""


class ManifestError(ImageError):
    """A manifest, index or image config is malformed or unsupported."""


class DigestMismatch(ImageError):
    """Content does not match the size or digest it was announced with."""

    def __init__(self, what: str, expected: str, actual: str) -> None:
        super().__init__(f"{what}: expected {expected}, got {actual}")
        self.what = what
        self.expected = expected
        self.actual = actual


class UnsafeLayer(ImageError):
    """A layer tar holds an entry that could escape or harm the host."""

    def __init__(self, layer: str, path: str, reason: str) -> None:
        super().__init__(f"layer {layer}: {path!r}: {reason}")
        self.layer = layer
        self.path = path
        self.reason = reason


class LayerTooLarge(UnsafeLayer):
    """A layer inflates past the configured size limit."""


class ImageInUse(ImageError):
    """An image cannot be removed because a container uses it."""


# --- store ------------------------------------------------------------------

class StoreError(ContainError):
    """The on-disk store is unreadable, locked or inconsistent."""


# --- registry ---------------------------------------------------------------

class RegistryError(ContainError):
    """A registry refused, failed or answered nonsense."""


class AuthenticationError(RegistryError):
    """The registry refused the credentials (or demanded some)."""


# --- containers -------------------------------------------------------------

class ContainerError(ContainError):
    """A container could not be created, started or managed."""


class ContainerNotFound(ContainerError):
    """No container answers to that name or id."""


class InvalidSpec(ContainerError):
    """A container or kernel option is malformed (a limit, a mount, a user)."""


class CommandNotFound(ContainerError):
    """The command to run does not exist in the image."""

    exit_code = 127


class CommandNotExecutable(ContainerError):
    """The command exists in the image but cannot be executed."""

    exit_code = 126


class CgroupError(ContainerError):
    """A cgroup could not be created, configured or read."""


class SpawnError(ContainerError, OSError):
    """A step of the native container start failed.

    Carries the named step (``mount-rootfs``, ``pivot-root``, ``execve``, ...),
    the errno and the path involved, so the message says exactly what broke.
    """

    def __init__(self, step: str, errno_: int, path: str = "") -> None:
        import os

        self.step = step
        self.path = path
        where = f" {path!r}" if path else ""
        OSError.__init__(self, errno_, f"container start failed at step {step}{where}: {os.strerror(errno_)}")

    def __str__(self) -> str:  # OSError's str() shows "[Errno n] msg"; keep ours
        return self.strerror or super().__str__()


# --- kernels ----------------------------------------------------------------

class KernelError(ContainError):
    """A contained kernel could not be provisioned or managed."""


class NetworkError(ContainerError):
    """A container's network (bridge, veth, address lease, nftables rules) could not be set up."""


class ChannelError(KernelError):
    """A request over a kernel's host channel (the sandbox's narrow line to the host) was refused or failed."""


# --- builds -----------------------------------------------------------------

class BuildError(ContainError):
    """A Containerfile build failed: a syntax error, a bad context path, a failing step.

    ``file``/``line``/``instruction`` name where, when the failure belongs to
    one instruction; ``exit_code`` is 1 as ``docker build`` exits for a failed
    step (125 stays the engine's own failures).
    """

    exit_code = 1

    def __init__(self, message: str, *, file: str = "", line: int = 0, instruction: str = "") -> None:
        where = f"{file}:{line}: " if file and line else (f"{file}: " if file else "")
        what = f"{instruction}: " if instruction else ""
        super().__init__(f"{where}{what}{message}")
        self.file = file
        self.line = line
        self.instruction = instruction


class BuildStepFailed(BuildError):
    """A RUN step exited non-zero (its exit code and the tail of its output are kept)."""

    def __init__(self, message: str, *, code: int, output: str = "", file: str = "", line: int = 0,
                 instruction: str = "") -> None:
        super().__init__(message, file=file, line=line, instruction=instruction)
        self.code = code
        self.output = output
