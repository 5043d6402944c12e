"""Reproducible teaching: kernelspecs pinned to an image digest, and class bundles.

Owns the pinned form of a kernelspec's image (``NAME@sha256:...``,
:func:`pinned_reference`), the start-time rule that a pinned kernel runs
exactly that content or does not start (:func:`resolve_pinned`, with an error
that says how to get it), and the *class bundle*: one tar holding a
kernelspec, its image and optionally a folder of notebooks
(:func:`export_bundle`), installed on another machine with no network into
any store (:func:`import_bundle`): the air-gapped classroom.

A bundle is an uncompressed tar::

    jupyter-contain-bundle.json   what it holds: format, kernelspec (name, display name, options),
                                  the pinned image reference and digest, the notebooks' paths
    image.oci.tar                 the image as an oci-archive (``skopeo``/``podman load`` read it too)
    notebooks/...                 the notebooks folder, regular files only
    kernel-layer/...              for a kernelspec whose kernels run from the kernel layer or a
                                  kernel site: that folder (~125 MB), which a student's machine
                                  cannot make offline (the layer needs the bootstrap tarball, the
                                  site a package index)

Must not: trust a bundle. Everything in it is hostile input: members are
read as a stream, only the names above, regular files only (no links,
devices, absolute paths, ``..``, duplicates), within size and count limits,
into a private folder; the kernelspec is rebuilt from an allowlist of
options (never a bundle's ``argv``, mounts, environment, store or security
settings; network ``host`` is refused), the image's digest is checked
against the pinned one before anything is stored and again after (every blob
is verified by the store), and an import that fails undoes what it did
(untags the image it added, removes the notebooks folder it made): nothing
half-written, nothing existing replaced.

The kernel layer or site a bundle carries is hostile too, though it is only
ever bind-mounted read-only (``nosuid,nodev``) into containers and never run
on the host: only folders, regular files and symbolic links that resolve
inside its tree (followed through each other, as the kernel would), no
setuid/setgid/sticky bits, no hard links or devices, within size and count
limits, never written through a link; modes are set here (0644/0755, the
host user). Its content digest (:func:`kernel_layer.tree_digest`) is computed
from what was unpacked and must be the manifest's; it is installed under a
name made of that digest (``bundle-layer-<sha256>``, beside the machine's own
layers, atomically, an existing one never replaced), which no local build
ever uses, and the imported kernelspec names that content
(``kernel_layer: layer@sha256:...``): a bundle's layer serves its own
kernels only.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .. import errors
from ..runtime import ImageRecord, Reference, Runtime, Store, parse_cpus, parse_memory
from . import kernel_layer, kernelspec

log = logging.getLogger(__name__)

__all__ = ["BUNDLE_FORMAT", "BundleInfo", "export_bundle", "import_bundle", "pinned_reference", "read_bundle",
           "resolve_pinned"]

BUNDLE_FORMAT = "jupyter-contain-bundle"
BUNDLE_VERSION = 1
MANIFEST = "jupyter-contain-bundle.json"
IMAGE_MEMBER = "image.oci.tar"
NOTEBOOKS = "notebooks"
#: the kernel layer's (or kernel site's) folder, when the kernelspec runs from one
LAYER_MEMBER = "kernel-layer"

#: kernelspec options a bundle carries (machine-independent, checked again on import); anything
#: else a kernelspec holds (mounts, env, store_root, userns, seccomp, python, ...) stays behind
BUNDLE_OPTIONS = ("memory", "cpus", "pids", "network", "kernel_layer")
#: networks an imported kernelspec may ask for (``host`` would give a stranger's kernel the host's)
IMPORT_NETWORKS = ("none", "bridge")
_KERNEL_LAYER_RE = re.compile(r"^(|layer|site:3\.\d{1,2})$")
_KERNEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")

#: limits on what an imported bundle may hold
MAX_MANIFEST = 1 << 20
MAX_NOTEBOOK_FILES = 10_000
MAX_NOTEBOOKS_BYTES = 2 << 30
MAX_PATH = 1024
#: notebook-folder entries never exported (editor and interpreter debris)
_SKIP_DIRS = {".ipynb_checkpoints", "__pycache__", ".git"}
#: limits on a bundle's kernel layer or site (the layer: about 36,000 entries, 141 MB)
MAX_LAYER_ENTRIES = 200_000
MAX_LAYER_BYTES = 2 << 30
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


# --- pinned images ---------------------------------------------------------------------------


def pinned_reference(image: ImageRecord) -> str:
    """``registry/repository@sha256:...`` of ``image``: its name, with the manifest digest for the tag."""
    ref = Reference.parse(image.name)
    return str(Reference(ref.registry, ref.repository, None, image.digest))


def _how_to_get(ref: Reference) -> str:
    return (f"pull it: jupyter contain pull {ref.name}@{ref.digest} (or, with no registry, install the class "
            f"bundle: jupyter contain kernelspec import BUNDLE.tar)")


def _other_tags(store: Store, ref: Reference) -> str:
    """The same repository's other content in the store, for an error message."""
    seen = []
    for rec in store.images():
        r = Reference.parse(rec.name)
        if r.name == ref.name and ref.digest not in (rec.digest, rec.index_digest):
            seen.append(f"{r.familiar} is {rec.digest[:19]}...")
    return ("; the store has other content under that name (" + ", ".join(seen[:3]) + ")") if seen else ""


def resolve_pinned(rt: Runtime, image: str, *, pull_policy: str = "missing") -> ImageRecord:
    """The image a kernelspec pins by digest: exactly that content, pulled if missing and allowed.

    Raises KernelError naming the digest and how to get it when the store
    lacks it (and it cannot be pulled), or when what the store or a
    registry gives has a different digest.
    """
    try:
        ref = Reference.parse(image)
    except errors.InvalidReference as exc:
        raise errors.KernelError(f"the kernelspec's image {image!r}: {exc}") from None
    if not ref.digest:
        return rt.store.resolve(image)
    pinned = f"{ref.name}@{ref.digest}"
    try:
        rec = rt.store.resolve(pinned)
    except errors.ImageNotFound:
        if pull_policy == "never":
            raise errors.KernelError(
                f"this kernel is pinned to {pinned}, which is not in the store{_other_tags(rt.store, ref)} "
                f"(pull_policy is 'never'): {_how_to_get(ref)}") from None
        try:
            rec = _pull_once(rt.store, pinned, ref.digest)
        except (errors.RegistryError, errors.ImageError) as exc:
            raise errors.KernelError(
                f"this kernel is pinned to {pinned}, which is not in the store{_other_tags(rt.store, ref)}, "
                f"and pulling it failed ({exc}): {_how_to_get(ref)}") from None
    if ref.digest not in (rec.digest, rec.index_digest):
        raise errors.KernelError(
            f"this kernel is pinned to {pinned}, but the image found is {rec.digest} (different content): "
            f"refusing to start; {_how_to_get(ref)}")
    return rec


#: one pull per (store, digest) at a time in this process; :func:`_pull_once` adds a file lock for
#: other processes. Measured: 6 kernels of a class starting at once in a fresh store each pulled and
#: unpacked the same 112 MB layer, 27-64 s to ready on 2 cores; sharing one pull removes that.
_PULLS: dict[tuple[str, str], threading.Lock] = {}
_PULLS_GUARD = threading.Lock()


def _pull_once(store: Store, pinned: str, digest: str) -> ImageRecord:
    """Pull ``pinned`` unless another start (thread or process) is pulling it: then wait and use theirs."""
    from ..runtime.images.registry import pull

    with _PULLS_GUARD:
        lock = _PULLS.setdefault((str(store.root), digest), threading.Lock())
    with lock:
        fd = os.open(store.locks_dir / f"pull-{digest.split(':', 1)[-1][:64]}.lock",
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with contextlib.suppress(errors.ImageNotFound):
                return store.resolve(pinned)   # pulled meanwhile by the start we waited for
            log.info("pulling the pinned image %s", pinned)
            return pull(store, pinned)
        finally:
            os.close(fd)


# --- bundles: shared checks ----------------------------------------------------------------------


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle holds (read from its manifest, checked)."""

    kernel_name: str
    display_name: str
    options: dict[str, Any]
    image: str          # NAME@sha256:... (pinned)
    digest: str
    notebooks: tuple[str, ...]
    #: the kernel layer or site it carries: (choice "layer" or "site:3.N", content digest, machine)
    layer: tuple[str, str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
               "kernelspec": {"name": self.kernel_name, "display_name": self.display_name,
                              "options": self.options},
               "image": {"reference": self.image, "digest": self.digest},
               "notebooks": list(self.notebooks)}
        if self.layer is not None:
            doc["kernel_layer"] = dict(zip(("choice", "digest", "machine"), self.layer, strict=True))
        return doc


def _bad(what: str) -> errors.KernelError:
    return errors.KernelError(f"not a usable class bundle: {what}")


def _check_options(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _bad("kernelspec options must be an object")
    unknown = sorted(set(raw) - set(BUNDLE_OPTIONS))
    if unknown:
        raise _bad(f"the kernelspec asks for options a bundle may not carry: {', '.join(u[:40] for u in unknown)} "
                   f"(allowed: {', '.join(BUNDLE_OPTIONS)})")
    out: dict[str, Any] = {}
    try:
        if raw.get("memory") is not None:
            parse_memory(str(raw["memory"]))
            out["memory"] = str(raw["memory"])
        if raw.get("cpus") is not None:
            parse_cpus(str(raw["cpus"]))
            out["cpus"] = str(raw["cpus"])
    except (errors.ContainError, ValueError) as exc:
        raise _bad(f"kernelspec option: {exc}") from None
    if raw.get("pids") is not None:
        if not isinstance(raw["pids"], int) or isinstance(raw["pids"], bool) or not 0 <= raw["pids"] <= 1 << 22:
            raise _bad("kernelspec option pids must be a whole number")
        out["pids"] = raw["pids"]
    if raw.get("network") is not None:
        if raw["network"] not in IMPORT_NETWORKS:
            raise _bad(f"kernelspec option network {str(raw['network'])[:20]!r}: an imported kernelspec may use "
                       f"{' or '.join(IMPORT_NETWORKS)} only")
        out["network"] = raw["network"]
    if raw.get("kernel_layer") is not None:
        if not isinstance(raw["kernel_layer"], str) or not _KERNEL_LAYER_RE.match(raw["kernel_layer"]):
            raise _bad("kernelspec option kernel_layer must be '', 'layer' or 'site:3.N'")
        if raw["kernel_layer"]:
            out["kernel_layer"] = raw["kernel_layer"]
    return out


def _check_notebook_path(p: Any) -> str:
    if not isinstance(p, str) or not p or len(p) > MAX_PATH or "\0" in p or p.startswith("/") or "\\" in p:
        raise _bad(f"notebook path {str(p)[:80]!r} is not a relative path")
    parts = p.split("/")
    if any(part in ("", ".", "..") for part in parts) or any(
            unicodedata.category(ch).startswith("C") for ch in p):
        raise _bad(f"notebook path {p[:80]!r} is not a plain relative path")
    return p


def _parse_manifest(data: bytes) -> BundleInfo:
    try:
        doc = json.loads(data)
    except ValueError:
        raise _bad(f"{MANIFEST} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != BUNDLE_FORMAT:
        raise _bad(f"{MANIFEST} does not say format {BUNDLE_FORMAT!r}")
    if doc.get("version") != BUNDLE_VERSION:
        raise _bad(f"bundle version {str(doc.get('version'))[:10]!r}; this jupyter-contain reads version "
                   f"{BUNDLE_VERSION} (a newer jupyter-contain wrote it?)")
    ks, img = doc.get("kernelspec"), doc.get("image")
    if not isinstance(ks, dict) or not isinstance(img, dict):
        raise _bad("kernelspec and image must be objects")
    name, display = ks.get("name"), ks.get("display_name")
    if not isinstance(name, str) or not _KERNEL_NAME_RE.match(name):
        raise _bad(f"kernel name {str(name)[:80]!r} (lowercase letters, digits, . _ -)")
    if not isinstance(display, str) or not display.strip() or len(display) > 200 or any(
            unicodedata.category(ch).startswith("C") for ch in display):
        raise _bad("display name must be a line of text, at most 200 characters")
    reference, digest = img.get("reference"), img.get("digest")
    try:
        ref = Reference.parse(reference) if isinstance(reference, str) else None
    except errors.InvalidReference:
        ref = None
    if ref is None or not ref.digest or ref.tag or ref.digest != digest:
        raise _bad(f"image reference {str(reference)[:120]!r} must be NAME@sha256:... and agree with the digest")
    notebooks = doc.get("notebooks") or []
    if not isinstance(notebooks, list) or len(notebooks) > MAX_NOTEBOOK_FILES:
        raise _bad(f"notebooks must be a list of at most {MAX_NOTEBOOK_FILES} paths")
    paths = tuple(_check_notebook_path(p) for p in notebooks)
    if len(set(paths)) != len(paths):
        raise _bad("a notebook path is listed twice")
    options = _check_options(ks.get("options") or {})
    layer = None
    if doc.get("kernel_layer") is not None:
        kl = doc["kernel_layer"]
        if not isinstance(kl, dict) or set(kl) != {"choice", "digest", "machine"} or not all(
                isinstance(v, str) for v in kl.values()):
            raise _bad("kernel_layer must be an object with choice, digest and machine")
        if not kl["choice"] or kl["choice"] != options.get("kernel_layer"):
            raise _bad(f"the kernel layer it carries ({kl['choice'][:20]!r}) is not the kernelspec's "
                       f"({options.get('kernel_layer', '')!r})")
        if not _DIGEST_RE.match(kl["digest"]):
            raise _bad("the kernel layer's digest must be sha256:<64 hex>")
        layer = (kl["choice"], kl["digest"], kl["machine"][:40])
    return BundleInfo(name, display, options, f"{ref.name}@{ref.digest}", ref.digest, paths, layer)


# --- export ------------------------------------------------------------------------------------------


def _notebook_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative path, file) of the regular files beneath ``folder``; links and debris are skipped."""
    for top, dirs, files in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not os.path.islink(os.path.join(top, d)))
        for f in sorted(files):
            p = Path(top) / f
            st = p.lstat()
            if not stat.S_ISREG(st.st_mode):
                log.warning("bundle: skipping %s (not a regular file)", p)
                continue
            yield p.relative_to(folder).as_posix(), p


def _kernelspec_config(name: str) -> tuple[str, dict[str, Any]]:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise errors.KernelError(f"no such kernelspec: {name}") from None
    prov = (spec.metadata or {}).get("kernel_provisioner", {})
    if prov.get("provisioner_name") != kernelspec.PROVISIONER_NAME:
        raise errors.KernelError(f"kernelspec {name} is not a jupyter-contain kernel: nothing to export")
    return spec.display_name, dict(prov.get("config") or {})


def export_bundle(name: str, dest: Path, *, notebooks: Path | None = None, store: Store | None = None,
                  progress: Callable[[str], None] | None = None) -> BundleInfo:
    """Write kernelspec ``name``, its image (pinned to the digest it has now) and ``notebooks`` to ``dest``.

    The bundle's kernelspec carries only :data:`BUNDLE_OPTIONS`; the others
    are named in a warning. ``dest`` is written whole or not at all.
    """
    display, config = _kernelspec_config(name)
    image_text = config.get("image")
    if not isinstance(image_text, str) or not image_text:
        raise errors.KernelError(f"kernelspec {name} names no image")
    store = store or Store(config["store_root"] if config.get("store_root") else None)
    rec = resolve_pinned(Runtime(store), image_text, pull_policy="never") if "@" in image_text \
        else store.resolve(image_text)
    dropped = sorted(set(config) - set(BUNDLE_OPTIONS) - {"image"})
    if dropped:
        log.warning("bundle: kernelspec %s's options %s are this machine's and stay out of the bundle",
                    name, ", ".join(dropped))
    options = {k: config[k] for k in BUNDLE_OPTIONS if config.get(k) not in (None, "")}
    layer_dir, layer = None, None
    if options.get("kernel_layer"):
        choice = kernel_layer.KernelChoice.parse(str(options["kernel_layer"]))
        options["kernel_layer"] = choice.base   # the content pin is this machine's: the bundle has its own
        if progress:
            progress(f"taking the kernel {'layer' if choice.mode == 'layer' else 'site'} along (no network on the "
                     "students' side to make it)")
        layer_dir = kernel_layer.local_folder(choice, progress=progress)
        digest = kernel_layer.tree_digest(layer_dir)
        if choice.content is not None and digest != choice.content:
            raise errors.KernelError(f"{layer_dir} is not what kernelspec {name} names ({choice.content[:19]}...): "
                                     "it was changed on disk")
        layer = (choice.base, digest, platform.machine())
    if options.get("network") not in (None, *IMPORT_NETWORKS):
        log.warning("bundle: network %s stays out of the bundle (an imported kernel gets none)", options["network"])
        del options["network"]
    files = list(_notebook_files(Path(notebooks))) if notebooks is not None else []
    if notebooks is not None and not Path(notebooks).is_dir():
        raise errors.KernelError(f"{notebooks} is not a folder")
    info = BundleInfo(name, display, _check_options(options), pinned_reference(rec), rec.digest,
                      tuple(rel for rel, _ in files), layer)
    from ..runtime.fsutil import atomic_writer
    from ..runtime.images import archive

    with tempfile.TemporaryDirectory(dir=store.tmp_dir, prefix="bundle-") as tmp:
        image_tar = Path(tmp) / IMAGE_MEMBER
        if progress:
            progress(f"writing image {rec.familiar} ({rec.digest[:19]}...)")
        archive.save_oci_archive(store, rec, image_tar)
        with atomic_writer(Path(dest)) as out, tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            data = json.dumps(info.to_json(), indent=1).encode()
            ti = tarfile.TarInfo(MANIFEST)
            ti.size, ti.mode = len(data), 0o644
            tar.addfile(ti, _BytesReader(data))
            tar.add(image_tar, arcname=IMAGE_MEMBER, recursive=False, filter=_plain)
            for rel, path in files:
                tar.add(path, arcname=f"{NOTEBOOKS}/{rel}", recursive=False, filter=_plain)
            if layer_dir is not None:
                _add_tree(tar, layer_dir, LAYER_MEMBER)
    log.info("bundle %s: kernelspec %s, image %s, %d notebook files", dest, name, info.image, len(files))
    return info


def _add_tree(tar: tarfile.TarFile, root: Path, arcname: str) -> None:
    """``root``'s folders, files and links as ``arcname/...``, without hard links (the import refuses them)."""
    for top, dirs, files in os.walk(root):
        dirs.sort()
        for entry in sorted([*dirs, *files]):
            path = os.path.join(top, entry)
            got = tar.gettarinfo(path, arcname=f"{arcname}/{os.path.relpath(path, root)}")
            if got is None or not (got.isdir() or got.isreg() or got.issym() or got.islnk()):
                raise errors.KernelError(f"{path} is not a file, a folder or a link: the kernel layer was "
                                         "changed on disk (remove it; the next kernelspec install builds it again)")
            ti = got
            if ti.islnk():   # the same inode twice: store the content again
                ti.type, ti.size = tarfile.REGTYPE, os.lstat(path).st_size
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = ""
            if ti.isreg():
                ti.mode = 0o755 if ti.mode & 0o111 else 0o644
                with open(path, "rb") as f:
                    tar.addfile(ti, f)
            else:
                ti.mode = 0o755 if ti.isdir() else 0o777
                tar.addfile(ti)


def _plain(ti: tarfile.TarInfo) -> tarfile.TarInfo:
    """No owner names or ids of the teacher's machine in the archive."""
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.mode = 0o644 if ti.isfile() else 0o755
    return ti


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self._data) if n < 0 else self._pos + n
        out = self._data[self._pos:end]
        self._pos += len(out)
        return out


# --- import -------------------------------------------------------------------------------------------


def _copy_member(src: IO[bytes], dest: Path, limit: int) -> int:
    """Copy a member's data into a new file (never through a link); returns its size."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    n = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := src.read(1 << 20):
            n += len(chunk)
            if n > limit:
                raise _bad(f"{dest.name} is larger than allowed")
            out.write(chunk)
    return n


def read_bundle(bundle: Path, into: Path) -> BundleInfo:
    """Unpack ``bundle`` into the empty folder ``into`` (image tar, notebooks), checking every member.

    Raises KernelError for anything but the members a bundle has, as regular files.
    """
    seen: set[str] = set()
    notebook_bytes = 0
    info: BundleInfo | None = None
    layer = _LayerReader(into / LAYER_MEMBER)
    try:
        with open(bundle, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                name = m.name
                if name.startswith(LAYER_MEMBER + "/"):
                    if name.rstrip("/") in seen:
                        raise _bad(f"member {name[:80]!r} appears twice")
                    seen.add(name.rstrip("/"))
                    layer.add(m, tar)
                    continue
                if m.isdir():   # folders are made as their files need them; their names are checked
                    folder = name.rstrip("/")
                    if folder != NOTEBOOKS:
                        if not folder.startswith(NOTEBOOKS + "/"):
                            raise _bad(f"unexpected folder {name[:80]!r}")
                        _check_notebook_path(folder[len(NOTEBOOKS) + 1:])
                    continue
                if not m.isfile():
                    kind = "a symlink" if m.issym() else "a hard link" if m.islnk() else "a device or FIFO"
                    raise _bad(f"member {name[:80]!r} is {kind} (a bundle holds regular files only)")
                if name in seen:
                    raise _bad(f"member {name[:80]!r} appears twice")
                seen.add(name)
                src = tar.extractfile(m)
                assert src is not None
                if name == MANIFEST:
                    if m.size > MAX_MANIFEST:
                        raise _bad(f"{MANIFEST} is too large")
                    info = _parse_manifest(src.read(MAX_MANIFEST + 1))
                elif name == IMAGE_MEMBER:
                    _copy_member(src, into / IMAGE_MEMBER, 1 << 40)
                elif name.startswith(NOTEBOOKS + "/"):
                    rel = _check_notebook_path(name[len(NOTEBOOKS) + 1:])
                    if len(seen) - layer.entries > MAX_NOTEBOOK_FILES + 2:
                        raise _bad(f"more than {MAX_NOTEBOOK_FILES} notebook files")
                    target = into / NOTEBOOKS / rel
                    # folders made here, beneath ``into`` only (the path has no .. and no links exist)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    notebook_bytes += _copy_member(src, target, MAX_NOTEBOOKS_BYTES - notebook_bytes)
                else:
                    raise _bad(f"unexpected member {name[:80]!r}")
    except (tarfile.TarError, EOFError) as exc:
        raise _bad(f"{bundle} is not a readable tar archive ({exc})") from None
    except FileNotFoundError:
        raise errors.KernelError(f"no such file: {bundle}") from None
    if info is None:
        raise _bad(f"no {MANIFEST}")
    if IMAGE_MEMBER not in seen:
        raise _bad(f"no {IMAGE_MEMBER}")
    got = {n[len(NOTEBOOKS) + 1:] for n in seen if n.startswith(NOTEBOOKS + "/")}
    if got != set(info.notebooks):
        raise _bad("the notebooks in the archive are not the ones its manifest lists")
    if (info.layer is None) != (layer.entries == 0):
        raise _bad("its manifest and its members disagree on whether it carries a kernel layer")
    layer.check_links()
    return info


class _LayerReader:
    """Unpacks a bundle's ``kernel-layer/`` members into ``root``, refusing anything but a plain tree.

    Folders, regular files (modes set here: 0644, or 0755 if the member is
    executable) and symbolic links whose targets stay inside the tree; a
    member is never written through a link (its parents must be folders made
    here), and links are checked once all are known (:meth:`check_links`).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.links: dict[str, str] = {}
        self.dirs: set[str] = set()
        self.entries = 0
        self.bytes = 0

    def _unsafe(self, rel: str, what: str) -> errors.KernelError:
        return _bad(f"its kernel layer's {rel[:120]!r} {what}; nothing was installed")

    def _parent(self, rel: str) -> Path:
        """The folder ``rel`` goes into, made here (never a link: each parent is a folder this reader made)."""
        if not self.root.is_dir():
            self.root.mkdir(mode=0o755)
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folder = "/".join(parts[:i])
            if folder in self.links:
                raise self._unsafe(rel, f"would be written through the link {folder!r}")
            if folder not in self.dirs:
                os.mkdir(self.root / folder, 0o755)   # FileExistsError: a file of that name (caught below)
                self.dirs.add(folder)
        return self.root / "/".join(parts) if parts else self.root

    def add(self, m: tarfile.TarInfo, tar: tarfile.TarFile) -> None:
        rel = m.name[len(LAYER_MEMBER) + 1:].rstrip("/")
        if not rel:
            return   # the tree's own folder
        if len(rel) > MAX_PATH or "\0" in rel or "\\" in rel or rel.startswith("/") or any(
                part in ("", ".", "..") for part in rel.split("/")) or any(
                unicodedata.category(ch).startswith("C") for ch in rel):
            raise self._unsafe(rel, "is not a plain relative path")
        self.entries += 1
        if self.entries > MAX_LAYER_ENTRIES:
            raise _bad(f"its kernel layer has more than {MAX_LAYER_ENTRIES} entries")
        if m.mode & ~0o777:
            raise self._unsafe(rel, f"has mode {m.mode:o} (setuid, setgid or sticky: a layer has none)")
        try:
            if m.isdir():
                self._parent(rel + "/x")
            elif m.isreg():
                parent = self._parent(rel)
                src = tar.extractfile(m)
                assert src is not None
                target = parent / rel.rsplit("/", 1)[-1]
                self.bytes += _copy_member(src, target, MAX_LAYER_BYTES - self.bytes)
                os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
                # the pyc files check their sources' times (the layer is read-only in containers)
                with contextlib.suppress(OverflowError, ValueError, OSError):
                    os.utime(target, (int(m.mtime), int(m.mtime)), follow_symlinks=False)
            elif m.issym():
                target_text = m.linkname
                if not target_text or target_text.startswith("/") or "\0" in target_text or len(target_text) > MAX_PATH:
                    raise self._unsafe(rel, f"is a link to {target_text[:120]!r} (a layer's links stay inside it)")
                os.symlink(target_text, self._parent(rel) / rel.rsplit("/", 1)[-1])
                self.links[rel] = target_text
            else:
                kind = "a hard link" if m.islnk() else "a device or FIFO"
                raise self._unsafe(rel, f"is {kind} (a layer holds folders, files and links inside it only)")
        except (FileExistsError, NotADirectoryError):
            raise self._unsafe(rel, "appears twice or beneath a file") from None

    def check_links(self) -> None:
        """Every link, followed through the others as the kernel would, stays inside the tree."""
        for rel in self.links:
            parts = [*rel.split("/")[:-1], *self.links[rel].split("/")]
            stack: list[str] = []
            hops = 0
            while parts:
                part = parts.pop(0)
                if part in ("", "."):
                    continue
                if part == "..":
                    if not stack:
                        raise self._unsafe(rel, f"is a link to {self.links[rel][:120]!r}, which leaves the layer")
                    stack.pop()
                    continue
                stack.append(part)
                here = "/".join(stack)
                if here in self.links:
                    hops += 1
                    if hops > 40:
                        raise self._unsafe(rel, "is a link in a loop")
                    stack.pop()
                    parts = [*self.links[here].split("/"), *parts]


def _archive_digest(image_tar: Path) -> set[str]:
    """The manifest digests an oci-archive's index names (and their served forms), before importing."""
    from ..runtime.images.store import ANNOTATION_MANIFEST

    try:
        with tarfile.open(image_tar, mode="r|") as tar:
            for m in tar:
                if m.name.lstrip("./") == "index.json" and m.isfile():
                    if m.size > MAX_MANIFEST:
                        raise _bad("the image's index.json is too large")
                    src = tar.extractfile(m)
                    assert src is not None
                    doc = json.loads(src.read())
                    entries = doc.get("manifests") if isinstance(doc, dict) else None
                    if not isinstance(entries, list) or len(entries) != 1 or not isinstance(entries[0], dict):
                        raise _bad("the image archive must hold exactly one image")
                    e = entries[0]
                    ann = e.get("annotations")
                    ann = ann if isinstance(ann, dict) else {}
                    return {str(e.get("digest")), str(ann.get(ANNOTATION_MANIFEST))}
    except (tarfile.TarError, EOFError, ValueError) as exc:
        raise _bad(f"the image archive is not readable ({exc})") from None
    raise _bad("the image archive has no index.json")


def import_bundle(bundle: Path, *, store: Store | None = None, name: str | None = None,
                  notebooks_dir: Path | None = None, user: bool = False, prefix: str | None = None,
                  progress: Callable[[str], None] | None = None) -> tuple[BundleInfo, str, Path | None]:
    """Install a bundle's image into ``store`` and its kernelspec, pinned; returns (info, kernelspec path, notebooks).

    No network: the image comes from the bundle, verified blob by blob and
    against the pinned digest. The kernelspec is named ``name`` (default: the
    bundle's) and must not exist yet; the notebooks go to ``notebooks_dir``
    (default ``./<kernel name>-notebooks``), which must not exist yet. On any
    failure nothing stays: the image tag added is removed, the folders made
    are removed, no kernelspec is written.
    """
    from jupyter_client.kernelspec import KernelSpecManager

    from ..runtime.images import archive

    store = store or Store()
    with contextlib.ExitStack() as undo, tempfile.TemporaryDirectory(dir=store.tmp_dir, prefix="bundle-") as tmp:
        info = read_bundle(Path(bundle), Path(tmp))
        kname = name or info.kernel_name
        if not _KERNEL_NAME_RE.match(kname):
            raise errors.InvalidSpec(f"invalid kernel name {kname!r} (lowercase letters, digits, . _ -)")
        ksm = KernelSpecManager()
        if kname in ksm.find_kernel_specs():
            raise errors.KernelError(f"a kernelspec named {kname} exists already: remove it "
                                     f"(jupyter contain kernelspec remove {kname}) or import with --name")
        nb_dest: Path | None = None
        if info.notebooks:
            nb_dest = Path(notebooks_dir) if notebooks_dir is not None else Path.cwd() / f"{kname}-notebooks"
            if nb_dest.exists() or nb_dest.is_symlink():
                raise errors.KernelError(f"{nb_dest} exists already: choose another folder for the notebooks "
                                         "(--notebooks-dir)")
        # the image: its digest checked before anything is stored, and again after
        if info.digest not in _archive_digest(Path(tmp) / IMAGE_MEMBER):
            raise _bad(f"the image in the archive is not {info.image} (a different digest)")
        ref = Reference.parse(info.image)
        tag = str(Reference(ref.registry, ref.repository, "sha256-" + info.digest.split(":", 1)[1][:64], None))
        existed = True
        try:
            store.resolve(tag)
        except errors.ImageNotFound:
            existed = False
        if progress:
            progress(f"importing image {info.image}")
        rec = archive.import_oci_archive(store, Path(tmp) / IMAGE_MEMBER, name=tag)
        if not existed:
            undo.callback(_untag, store, tag)
        if info.digest not in (rec.digest, rec.index_digest):
            raise _bad(f"the imported image is {rec.digest}, not the pinned {info.digest}")
        layer_choice = None
        if info.layer is not None:
            layer_choice = _install_layer(info, Path(tmp) / LAYER_MEMBER, undo, progress)
        if nb_dest is not None:
            nb_dest.parent.mkdir(parents=True, exist_ok=True)
            staged = Path(tempfile.mkdtemp(dir=nb_dest.parent, prefix=f".{nb_dest.name}.tmp-"))
            undo.callback(shutil.rmtree, staged, ignore_errors=True)
            shutil.copytree(Path(tmp) / NOTEBOOKS, staged, dirs_exist_ok=True, symlinks=True)
            os.chmod(staged, 0o755)
            os.rename(staged, nb_dest)   # whole or not at all (refused if it appeared meanwhile)
            undo.callback(shutil.rmtree, nb_dest, ignore_errors=True)
        config: dict[str, Any] = {**info.options, "image": info.image}
        if layer_choice is not None:
            config["kernel_layer"] = str(layer_choice)
        if store.root != Store().root:
            config["store_root"] = str(store.root)
        spec = kernelspec.kernel_json(image=rec, display_name=info.display_name, config=config)
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "kernel.json").write_text(json.dumps(spec, indent=1))
            kernelspec.write_logos(Path(d))
            path = ksm.install_kernel_spec(d, kname, user=user, prefix=prefix)
        undo.pop_all()
    log.info("bundle %s: installed kernelspec %s (%s), image %s", bundle, kname, path, info.image)
    return info, path, nb_dest


def _install_layer(info: BundleInfo, unpacked: Path, undo: contextlib.ExitStack,
                   progress: Callable[[str], None] | None) -> kernel_layer.KernelChoice:
    """Put the bundle's kernel layer or site into the machine's cache under its content's name."""
    assert info.layer is not None
    choice_text, digest, machine = info.layer
    if machine != platform.machine():
        raise _bad(f"its kernel layer was made for {machine}, this machine is {platform.machine()}")
    got = kernel_layer.tree_digest(unpacked)
    if got != digest:
        raise _bad(f"its kernel layer's content is {got[:19]}..., not the {digest[:19]}... its manifest names")
    choice = kernel_layer.KernelChoice.parse(f"{choice_text}@{got}")
    cache = kernel_layer.default_cache_dir()
    final = cache / kernel_layer.bundled_name(choice)
    if final.is_dir():
        log.info("bundle: kernel layer %s is here already (imported before)", final)
        return choice
    if progress:
        progress(f"installing the kernel {'layer' if choice.mode == 'layer' else 'site'} as {final}")
    cache.mkdir(parents=True, exist_ok=True, mode=0o755)
    with kernel_layer.locked(cache / f".{final.name}.lock", progress or log.debug):
        # we hold the lock: any temp folder for this name is a killed import's
        for stale in cache.glob(f".{final.name}.*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.is_dir():   # imported meanwhile
            return choice
        return _move_layer(unpacked, final, choice, undo)


def _move_layer(unpacked: Path, final: Path, choice: kernel_layer.KernelChoice,
                undo: contextlib.ExitStack) -> kernel_layer.KernelChoice:
    staged = final.parent / f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        try:
            os.rename(unpacked, staged)
        except OSError:   # another file system: copy (links as links)
            shutil.copytree(unpacked, staged, symlinks=True)
        os.chmod(staged, 0o755)
        os.sync()   # the rename below must not name a folder whose files a crash loses
        os.rename(staged, final)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        if final.is_dir():   # another import of the same content won the race: theirs is ours
            return choice
        raise errors.KernelError(f"could not install the bundle's kernel layer as {final}: {exc}") from None
    undo.callback(shutil.rmtree, final, ignore_errors=True)
    return choice


def _untag(store: Store, tag: str) -> None:
    with contextlib.suppress(errors.ContainError):
        store.untag(tag)
