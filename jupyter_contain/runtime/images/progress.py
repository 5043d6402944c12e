"""Progress of registry transfers: the event type callers receive, the tracker that
makes events, and two renderers for the command line.

Owns :class:`ProgressEvent` (a frozen dataclass: per-layer and total bytes, rate,
ETA), :class:`Tracker` (thread-safe bookkeeping shared by the download and upload
threads, rate-limited so a fast loopback transfer does not call back a thousand
times a second) and the CLI renderers (:class:`BarRenderer` for a terminal,
:class:`LineRenderer` for logs and pipes). Must not do any I/O besides the
renderers writing to the stream they are given, and must not know HTTP.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TextIO

#: what a layer (or blob) is doing; ``status`` of an event
WAITING = "waiting"
DOWNLOADING = "downloading"
UPLOADING = "uploading"
RETRYING = "retrying"
UNPACKING = "unpacking"
DONE = "done"
EXISTS = "exists"        # already in the store (pull) or in the registry (push)
MOUNTED = "mounted"      # push: mounted from another repository of the same registry
FAILED = "failed"

#: event kinds
RESOLVED = "resolved"    # manifest known: the layer list and the totals are set
LAYER = "layer"          # a layer's status or byte count changed
FINISHED = "finished"    # the whole operation ended (successfully)

_MIN_INTERVAL = 0.1      # seconds between byte-count events of one blob


@dataclass(frozen=True)
class ProgressEvent:
    """One step of a pull or push, as a progress callback receives it."""

    operation: str            # "pull" or "push"
    reference: str            # the image reference being moved
    kind: str                 # RESOLVED, LAYER or FINISHED
    layer: str | None         # blob digest for LAYER events
    layer_index: int          # position in the manifest (0 = base), -1 for the config / none
    layer_count: int
    status: str               # WAITING, DOWNLOADING, ... for LAYER events; DONE for FINISHED
    layer_bytes: int          # bytes of this blob moved so far
    layer_total: int          # size of this blob
    bytes_done: int           # bytes moved over all blobs (skipped blobs count as done)
    bytes_total: int          # bytes of all blobs
    rate: float               # bytes per second over the operation so far
    eta: float | None         # seconds left at that rate, None while unknown
    elapsed: float            # seconds since the operation started
    message: str = ""         # e.g. why a retry happened

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.bytes_total if self.bytes_total else 1.0


ProgressCallback = Callable[[ProgressEvent], None]


@dataclass
class _Blob:
    index: int
    total: int
    done: int = 0
    status: str = WAITING
    last_emit: float = 0.0


class Tracker:
    """Thread-safe counters behind the events; a no-op without a callback."""

    def __init__(self, operation: str, reference: str, callback: ProgressCallback | None) -> None:
        self.operation = operation
        self.reference = reference
        self._cb = callback
        self._lock = threading.Lock()
        self._blobs: dict[str, _Blob] = {}
        self._count = 0
        self._start = time.monotonic()
        self._moved = 0          # bytes really transferred (rate counts only these)

    def resolved(self, blobs: list[tuple[str, int, int]]) -> None:
        """Declare the blobs: (digest, layer index or -1, size)."""
        with self._lock:
            for digest, index, size in blobs:
                self._blobs.setdefault(digest, _Blob(index, size))
            self._count = sum(1 for b in self._blobs.values() if b.index >= 0)
        self._emit(RESOLVED, None, WAITING, "")

    def status(self, digest: str, status: str, message: str = "") -> None:
        with self._lock:
            b = self._blobs.get(digest)
            if b is None:
                return
            b.status = status
            if status in (DONE, EXISTS, MOUNTED):
                b.done = b.total
        self._emit(LAYER, digest, status, message)

    def restart(self, digest: str, done: int) -> None:
        """A transfer starts over from ``done`` bytes (a 200 instead of a 206, a new upload)."""
        with self._lock:
            b = self._blobs.get(digest)
            if b is not None:
                b.done = done

    def advance(self, digest: str, n: int) -> None:
        now = time.monotonic()
        with self._lock:
            b = self._blobs.get(digest)
            if b is None:
                return
            b.done += n
            self._moved += n
            if now - b.last_emit < _MIN_INTERVAL:
                return
            b.last_emit = now
            status = b.status
        self._emit(LAYER, digest, status, "")

    def finished(self) -> None:
        self._emit(FINISHED, None, DONE, "")

    def _emit(self, kind: str, digest: str | None, status: str, message: str) -> None:
        if self._cb is None:
            return
        with self._lock:
            elapsed = max(time.monotonic() - self._start, 1e-6)
            done = sum(min(b.done, b.total) for b in self._blobs.values())
            total = sum(b.total for b in self._blobs.values())
            rate = self._moved / elapsed
            eta = (total - done) / rate if rate > 0 and total >= done else None
            b = self._blobs.get(digest) if digest else None
            ev = ProgressEvent(
                operation=self.operation, reference=self.reference, kind=kind, layer=digest,
                layer_index=b.index if b else -1, layer_count=self._count, status=status,
                layer_bytes=min(b.done, b.total) if b else 0, layer_total=b.total if b else 0,
                bytes_done=done, bytes_total=total, rate=rate, eta=eta, elapsed=elapsed,
                message=message,
            )
        self._cb(ev)


# --- renderers -------------------------------------------------------------------


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _short(digest: str | None) -> str:
    return (digest or "").removeprefix("sha256:")[:12]


class LineRenderer:
    """Plain lines, one per status change of a blob, for logs and pipes."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._last: dict[str, str] = {}

    def __call__(self, ev: ProgressEvent) -> None:
        with self._lock:
            if ev.kind == RESOLVED:
                self._stream.write(f"{ev.operation} {ev.reference}: {ev.layer_count} layers, "
                                   f"{_size(ev.bytes_total)}\n")
            elif ev.kind == LAYER and ev.layer and self._last.get(ev.layer) != ev.status:
                self._last[ev.layer] = ev.status
                what = "config" if ev.layer_index < 0 else f"layer {ev.layer_index + 1}/{ev.layer_count}"
                extra = f" ({ev.message})" if ev.message else ""
                self._stream.write(f"{_short(ev.layer)}: {what} {ev.status} {_size(ev.layer_total)}{extra}\n")
            elif ev.kind == FINISHED:
                self._stream.write(f"{ev.operation} {ev.reference}: done, {_size(ev.bytes_total)} in "
                                   f"{ev.elapsed:.1f} s\n")
            self._stream.flush()


class BarRenderer:
    """One bar per layer plus a total line, redrawn in place on a terminal."""

    def __init__(self, stream: TextIO, *, width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._lock = threading.Lock()
        self._rows: dict[str, ProgressEvent] = {}
        self._drawn = 0
        self._last_draw = 0.0

    def _bar(self, done: int, total: int) -> str:
        frac = done / total if total else 1.0
        n = int(frac * self._width)
        return "[" + "=" * n + (">" if n < self._width else "") + " " * max(self._width - n - 1, 0) + "]"

    def __call__(self, ev: ProgressEvent) -> None:
        with self._lock:
            if ev.kind == LAYER and ev.layer:
                self._rows[ev.layer] = ev
            now = time.monotonic()
            if ev.kind == LAYER and ev.status in (DOWNLOADING, UPLOADING) and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            lines = []
            for digest, row in sorted(self._rows.items(), key=lambda kv: kv[1].layer_index):
                lines.append(f"{_short(digest)} {row.status:<11} {self._bar(row.layer_bytes, row.layer_total)} "
                             f"{_size(row.layer_bytes)}/{_size(row.layer_total)}")
            eta = f" ETA {ev.eta:.0f} s" if ev.eta is not None and ev.kind != FINISHED else ""
            lines.append(f"{'total':<24} {self._bar(ev.bytes_done, ev.bytes_total)} "
                         f"{_size(ev.bytes_done)}/{_size(ev.bytes_total)} {_size(ev.rate)}/s{eta}")
            out = []
            if self._drawn:
                out.append(f"\x1b[{self._drawn}F")  # back to the first line we drew
            out.extend(line + "\x1b[K\n" for line in lines)
            self._stream.write("".join(out))
            self._stream.flush()
            self._drawn = len(lines)


def renderer_for(stream: TextIO) -> ProgressCallback:
    """Bars on a terminal, plain lines otherwise."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return BarRenderer(stream) if tty else LineRenderer(stream)
