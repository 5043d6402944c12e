"""Snapshots and diffs of kernels' containers: what Jupyter adds to the runtime's commit.

Owns the Jupyter labels (the container label the provisioner sets,
:data:`KERNEL_LABEL`, and the image label a snapshot of a kernel carries,
:data:`IMAGE_KERNEL_LABEL`), the list of per-kernel runtime state a snapshot
leaves out by default (:data:`RUNTIME_STATE`), and the one way every entry
point (the CLI's ``commit`` and ``diff``, the host channel behind
``%container snapshot``/``diff`` and the widget, the REST API) commits or
diffs a container, so they all leave out the same things and say so.

Must not: walk layers or write images itself (``runtime.snapshot`` does,
given the patterns), or reach into the runtime's sub-modules.

What is never in a snapshot whatever the options (the runtime leaves it out):
``/etc/hosts``, ``/etc/hostname``, ``/etc/resolv.conf``, every bind-mount target
-- the notebook folder (so its ``__pycache__`` too), the kernel's folder with
its connection file and sockets (``/run/jupyter-contain``), the guest module
(``/.jupyter-contain``), the kernel layer and kernel site -- and sockets and
device nodes anywhere. What :data:`RUNTIME_STATE` adds is state a kernel
leaves in its own writable layer; ``include_runtime_state`` keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import errors
from ..runtime import diff as _runtime_diff
from ..runtime import diff_summary as _runtime_diff_summary
from ..runtime import snapshot as _runtime_snapshot

if TYPE_CHECKING:
    from ..runtime import Change, Container, DiffSummary, ImageRecord, Runtime

__all__ = ["IMAGE_KERNEL_LABEL", "KERNEL_LABEL", "RUNTIME_STATE", "LeaveOut", "diff", "diff_summary",
           "kernel_id_of", "leave_out", "snapshot", "snapshot_labels"]

#: the container label the provisioner sets: which kernel a container runs
KERNEL_LABEL = "jupyter-contain.kernel-id"
#: the image label a snapshot of a kernel carries: which kernel made it
IMAGE_KERNEL_LABEL = "io.jupyter-contain.kernel-id"

#: per-kernel runtime state a snapshot leaves out by default: (path pattern, what it is). Patterns
#: are container paths with globs (``**``: any number of folders), matched in the writable layer.
RUNTIME_STATE: tuple[tuple[str, str], ...] = (
    ("/**/.ipython/profile_*/history.sqlite*",
     "IPython's input history (history.sqlite and its -journal, -wal, -shm): the teacher's typing"),
    ("/**/.ipython/profile_*/db", "IPython's other per-user stores (%bookmark, directory history)"),
    ("/**/.ipython/profile_*/log", "IPython's logs"),
    ("/**/.ipython/profile_*/pid", "IPython's pid files"),
    ("/**/.ipython/profile_*/security", "IPython's connection files"),
    ("/**/.ipython/profile_*/startup/README", "the README IPython writes into every new profile"),
    ("/**/.local/share/jupyter/runtime", "Jupyter's runtime folder (kernel connection files)"),
    ("/**/.jupyter/runtime", "Jupyter's runtime folder, older location"),
    ("/tmp/ipykernel_*", "ipykernel's debugger cell files"),
    ("/**/.cache/pip", "pip's download cache"),
    ("/**/.cache/jedi", "the completion cache of jedi (IPython's completer)"),
)


class LeaveOut:
    """What a snapshot or diff of a kernel leaves out: the exclude and include path patterns.

    ``include_runtime_state``: keep :data:`RUNTIME_STATE` (the runtime's
    stubs are left out all the same); ``exclude``: more patterns to leave
    out; ``include``: patterns to keep although a pattern above matches them.
    Validated when a commit or diff uses them (``InvalidSpec``).
    """

    __slots__ = ("exclude", "include")

    def __init__(self, *, include_runtime_state: bool = False, exclude: Iterable[str] = (),
                 include: Iterable[str] = ()) -> None:
        if isinstance(exclude, str) or isinstance(include, str):
            raise errors.InvalidSpec("exclude and include take lists of path patterns, not one string")
        base = () if include_runtime_state else tuple(p for p, _ in RUNTIME_STATE)
        self.exclude: tuple[str, ...] = tuple(dict.fromkeys((*base, *exclude)))
        self.include: tuple[str, ...] = tuple(dict.fromkeys(include))

    def check(self) -> LeaveOut:
        """Raise InvalidSpec for patterns the runtime would refuse (before any work is queued)."""
        from ..runtime import PathPatterns

        PathPatterns(self.exclude, self.include)
        return self


def leave_out(*, include_runtime_state: bool = False, exclude: Sequence[str] = (),
              include: Sequence[str] = ()) -> LeaveOut:
    """The patterns for these options (see :class:`LeaveOut`)."""
    return LeaveOut(include_runtime_state=include_runtime_state, exclude=exclude, include=include)


def kernel_id_of(container: Container) -> str | None:
    """The kernel a container runs, from its label (None: not a kernel's container)."""
    kid = container.state.labels.get(KERNEL_LABEL)
    return str(kid) if kid else None


def snapshot_labels(container: Container) -> dict[str, str | None]:
    """Image labels for a snapshot of ``container``: the kernel that made it, never the base's."""
    # None removes the base's label: if the base was a kernel's snapshot too, that kernel is not ours
    return {IMAGE_KERNEL_LABEL: kernel_id_of(container)}


def snapshot(runtime: Runtime, container: Container | str, tag: str, *, include_runtime_state: bool = False,
             exclude: Sequence[str] = (), include: Sequence[str] = (), left_out: list[Change] | None = None,
             **kw: Any) -> ImageRecord:
    """``runtime.snapshot`` with the kernel labels, leaving out the runtime state (:class:`LeaveOut`).

    Other keywords (``message``, ``compress``, ``progress``, ``unpack``) as
    ``runtime.snapshot``; what was left out goes to ``left_out`` if given.
    """
    lo = leave_out(include_runtime_state=include_runtime_state, exclude=exclude, include=include)
    c = runtime.get(container) if isinstance(container, str) else container
    return _runtime_snapshot(runtime, c, tag, labels=snapshot_labels(c), left_out=left_out, exclude=lo.exclude,
                             include=lo.include, **kw)


def diff(container: Container, *, include_runtime_state: bool = False, exclude: Sequence[str] = (),
         include: Sequence[str] = (), left_out: list[Change] | None = None) -> list[Change]:
    """``runtime.diff`` as a snapshot of the kernel would see it (what it leaves out to ``left_out``)."""
    lo = leave_out(include_runtime_state=include_runtime_state, exclude=exclude, include=include)
    return _runtime_diff(container, left_out=left_out, exclude=lo.exclude, include=lo.include)


def diff_summary(container: Container, *, limit: int = 100, include_runtime_state: bool = False,
                 exclude: Sequence[str] = (), include: Sequence[str] = ()) -> DiffSummary:
    """``runtime.diff_summary`` as a snapshot of the kernel would see it (with what it leaves out)."""
    lo = leave_out(include_runtime_state=include_runtime_state, exclude=exclude, include=include)
    return _runtime_diff_summary(container, limit=limit, exclude=lo.exclude, include=lo.include)
