"""The build cache: which config and layer a build step made from which inputs; RUN cache mounts.

Owns ``build-cache/`` in the store (one small JSON file per step key: the
step's resulting image config and its layer descriptor, if any) and
``build-mounts/`` (the folders ``RUN --mount=type=cache`` keeps across
builds, one per cache id). A key is the sha256 of the parent image's config
digest, the instruction as written, the build args in scope, and the
content hash of what a COPY/ADD reads. An entry is written only after its
step completed and its layer blob was committed; a lookup whose blob has
gone (``gc`` removes blobs no tag holds) is a miss.

Must not run steps or write images. The entries hold no secrets beyond what
the image's history shows anyway (build args, as Docker's history does).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import ManifestError
from ..fsutil import atomic_write, file_lock, read_small
from ..images.store import Store
from ..spec import Descriptor, canonical_json

log = logging.getLogger(__name__)

#: bump when what a key covers changes: old entries then simply miss
KEY_VERSION = "jc-build-1"
FILE_HASHES = "file-hashes.json"
MAX_FILE_HASHES = 200_000


@dataclass(frozen=True)
class CacheEntry:
    config: Mapping[str, Any]
    layer: Descriptor | None = None
    diff_id: str | None = None


def step_key(*, parent: str, instruction: str, args: Mapping[str, str], content: str = "",
             extra: Mapping[str, Any] | None = None) -> str:
    doc = {"v": KEY_VERSION, "parent": parent, "instruction": instruction, "args": sorted(args.items()),
           "content": content, "extra": dict(extra or {})}
    return hashlib.sha256(canonical_json(doc)).hexdigest()


class BuildCache:
    """The cache of one store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.dir = store.root / "build-cache"
        self.mounts_dir = store.root / "build-mounts"

    def get(self, key: str) -> CacheEntry | None:
        try:
            doc = json.loads(read_small(self.dir / f"{key}.json"))
            layer = Descriptor.from_json(doc["layer"]) if doc.get("layer") else None
            entry = CacheEntry(doc["config"], layer, doc.get("diff_id"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, ManifestError) as e:
            log.warning("ignoring unreadable build cache entry %s: %s", key[:12], e)
            return None
        if layer is not None and not self.store.has_blob(layer.digest):
            return None
        return entry

    def put(self, key: str, entry: CacheEntry) -> None:
        self.dir.mkdir(exist_ok=True)
        doc: dict[str, Any] = {"config": entry.config}
        if entry.layer is not None:
            doc["layer"] = entry.layer.to_json()
            doc["diff_id"] = entry.diff_id
        # not fsynced: a cache entry lost in a power cut is a rebuilt step, nothing worse
        atomic_write(self.dir / f"{key}.json", json.dumps(doc).encode(), durable=False)

    # file digests by stat stamp (see files.content_hash) --------------------------------

    def file_hashes(self) -> dict[str, str]:
        """The known file digests; a damaged or missing file is an empty cache."""
        try:
            doc = json.loads(read_small(self.dir / FILE_HASHES))
        except (OSError, ValueError):
            return {}
        if not isinstance(doc, dict):
            return {}
        return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str) and len(v) == 64}

    def save_file_hashes(self, known: Mapping[str, str]) -> None:
        if len(known) > MAX_FILE_HASHES:   # bounded: start over rather than grow without end
            known = {}
        self.dir.mkdir(exist_ok=True)
        atomic_write(self.dir / FILE_HASHES, json.dumps(known, separators=(",", ":")).encode(), durable=False)

    def clear(self) -> int:
        n = 0
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n

    @contextlib.contextmanager
    def mount(self, cache_id: str, *, mode: int, uid: int, gid: int, locked: bool) -> Iterator[Path]:
        """The folder of cache mount ``cache_id`` (made on first use); ``locked``: one build at a time."""
        name = hashlib.sha256(cache_id.encode()).hexdigest()[:32]
        path = self.mounts_dir / name
        self.mounts_dir.mkdir(mode=0o700, exist_ok=True)
        with file_lock(self.mounts_dir / f".{name}.lock", shared=not locked):
            if not path.is_dir():
                tmp = self.mounts_dir / f".{name}.{os.getpid()}.new"
                os.mkdir(tmp, 0o700)
                os.chown(tmp, uid, gid)
                os.chmod(tmp, mode)
                try:
                    os.rename(tmp, path)
                except OSError:   # made meanwhile by another build
                    os.rmdir(tmp)
            yield path


__all__ = ["BuildCache", "CacheEntry", "step_key"]
