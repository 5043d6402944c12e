"""Snapshots and diffs of kernels' containers: what Jupyter adds to the runtime's commit.

Owns the Jupyter labels (the container label the provisioner sets,
:data:`KERNEL_LABEL`, and the image label a snapshot of a kernel carries,
:data:`IMAGE_KERNEL_LABEL`) and the one way every entry point (the CLI's
``commit``, the host channel behind ``%container snapshot`` and the widget,
the REST API) commits or diffs a container, so they all leave out the same
things. Must not: walk layers or write images itself (``runtime.snapshot``
does), or reach into the runtime's sub-modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..runtime import diff as _runtime_diff, diff_summary as _runtime_diff_summary, snapshot as _runtime_snapshot

if TYPE_CHECKING:
    from ..runtime import Change, Container, DiffSummary, ImageRecord, Runtime

__all__ = ["IMAGE_KERNEL_LABEL", "KERNEL_LABEL", "diff", "diff_summary", "kernel_id_of", "snapshot",
           "snapshot_labels"]

#: the container label the provisioner sets: which kernel a container runs
KERNEL_LABEL = "jupyter-contain.kernel-id"
#: the image label a snapshot of a kernel carries: which kernel made it
IMAGE_KERNEL_LABEL = "io.jupyter-contain.kernel-id"


def kernel_id_of(container: Container) -> str | None:
    """The kernel a container runs, from its label (None: not a kernel's container)."""
    kid = container.state.labels.get(KERNEL_LABEL)
    return str(kid) if kid else None


def snapshot_labels(container: Container) -> dict[str, str | None]:
    """Image labels for a snapshot of ``container``: the kernel that made it, never the base's."""
    kid = kernel_id_of(container)
    # None removes the base's label: if the base was a kernel's snapshot too, that kernel is not ours
    return {IMAGE_KERNEL_LABEL: kid}


def snapshot(runtime: Runtime, container: Container | str, tag: str, **kw: Any) -> ImageRecord:
    """``runtime.snapshot`` with the kernel labels (see :func:`snapshot_labels`); same keywords."""
    c = runtime.get(container) if isinstance(container, str) else container
    return _runtime_snapshot(runtime, c, tag, labels=snapshot_labels(c), **kw)


def diff(container: Container) -> list[Change]:
    """``runtime.diff`` as a snapshot of a kernel would see it."""
    return _runtime_diff(container)


def diff_summary(container: Container, *, limit: int = 100) -> DiffSummary:
    """``runtime.diff_summary`` as a snapshot of a kernel would see it."""
    return _runtime_diff_summary(container, limit=limit)
