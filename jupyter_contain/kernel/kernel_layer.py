"""The kernel layer: a Python with ipykernel that runs in any image, and the kernel site for image Pythons.

Owns two host-made, read-only folders that let images without a usable
ipykernel become kernels, their cache (once per machine, content-addressed,
built atomically), and the choice between them:

- The **kernel layer** (:func:`cached_kernel_layer`), mounted at
  :data:`LAYER_DIR`: the bootstrap image's own CPython (Debian bookworm's
  3.11), its standard library, ipykernel and the other Debian packages it
  brings, ipywidgets 8 (the pinned wheels the bootstrap image installs), pip,
  every shared library those link (the ELF ``DT_NEEDED`` closure, read here
  from the files, not by running ``ldd``) and glibc's dynamic loader. The
  copied ``python3.11`` is re-linked with ``patchelf``: its ``PT_INTERP`` names
  the loader inside the layer and its ``DT_RPATH`` the layer's ``lib``, so the
  binary itself runs in any image -- glibc of any age, musl, or no libc at all
  (busybox) -- with no ``LD_LIBRARY_PATH``, no ``PYTHONHOME``, no wrapper and no
  shell: ``sys.executable`` is a real executable, so ``%pip``, ``subprocess``
  of ``sys.executable``, and ``multiprocessing`` work, while every
  other program the kernel starts is the image's, with the image's libc.
  Why not ``ld.so --library-path`` as the kernel's argv: ``sys.executable``
  would then be a binary that cannot be exec'd in the image (``%pip`` runs
  it), and a wrapper script needs a shell the image may not have.
  ``DT_RPATH`` (not ``DT_RUNPATH``) because only the executable's RPATH is
  searched for the dependencies of extension modules it ``dlopen``s. The
  libraries manylinux wheels may link from the system (libstdc++, libgcc_s,
  libpthread, libdl, ...) are made ``DT_NEEDED`` of the binary, so a wheel a
  user installs (whose own ``RUNPATH`` skips the executable's RPATH) binds to
  the copies already loaded, never to the image's glibc pieces.
  ``pip install`` goes to the user site (``~/.local`` in the container's own
  writable layer: kept across restarts, captured by snapshots), set by the
  layer's site ``pip.conf``; a wrapper of IPython's ``%pip`` in both folders
  (:data:`PIP_MODULE`) puts a site folder the install just made on ``sys.path``,
  so the package imports at once.
- The **kernel site** (:func:`cached_kernel_site`), mounted at
  :data:`SITE_DIR`: for images with a Python (3.8+, glibc) but no ipykernel,
  ipykernel and ipywidgets 8 as wheels for *that* Python version from the
  package index the host's pip uses (``pip install --target`` with
  ``--python-version``/``--platform``), appended to the kernel's ``sys.path``
  (the image's own packages win). The image's Python runs the kernel.

Both are built into a temp folder beside the final one and renamed into place
under an exclusive lock: a killed build leaves only a ``.tmp`` folder that the
next build removes, never a half-made layer under a final name. Files are
written by the host, owned by the host user, mode 0644/0755; containers see
them only through read-only ``nosuid,nodev`` binds (the runtime's host-folder
attributes), which are never part of an image or of a snapshot (the snapshot
leaves out every bind target).

Must not: touch an image or the store, run anything in a container, or import
Jupyter packages (it runs in kernel start paths: only a ``stat`` when cached).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import posixpath
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import errors
from ..runtime import Bind
from ..runtime.fsutil import atomic_write

# the bootstrap images' build lock and progress reporter, shared (``locked`` is public here too:
# class bundles install layers under it)
from ..runtime.images.bootstrap import locked
from ..runtime.images.bootstrap import reporter as _reporter

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: where the kernel layer is mounted in every container that uses it; a dot folder at the
#: root, named for this project, which no image ships (and the snapshot leaves out, as a bind)
LAYER_DIR = "/.jupyter-contain-kernel"
#: where the kernel site is mounted (an image's own Python + ipykernel from wheels)
SITE_DIR = "/.jupyter-contain-site"
#: the kernel layer's Python inside the container
LAYER_PYTHON = f"{LAYER_DIR}/usr/bin/python3"
#: bump when the assembly changes what ends up in a layer or a site: every machine rebuilds
BUILDER_VERSION = 3

#: the kernel choices a kernelspec records (KernelOptions.kernel_layer): "" the image's own
#: Python with its ipykernel; "layer": the kernel layer; "site:X.Y": the image's Python X.Y with
#: the kernel site for X.Y
_SITE_RE = re.compile(r"^site:(3)\.(\d{1,2})$")
#: a choice pinned to the content of a folder that came with a class bundle (kernel/classroom.py):
#: "layer@sha256:<hex>" or "site:3.N@sha256:<hex>", found under :func:`bundled_name` only
_CONTENT_RE = re.compile(r"^sha256:[0-9a-f]{64}$")

#: the bootstrap image's Python, what the layer takes of it (paths in its root filesystem)
_PY = "python3.11"
_TREES = ("usr/lib/python3.11/", "usr/lib/python3/dist-packages/", "usr/local/lib/python3.11/dist-packages/")
#: left out of the layer: tests, GUIs and demos no kernel imports (a few MB)
_SKIP = re.compile(r"^usr/lib/python3\.11/(test|idlelib|tkinter|turtledemo|lib2to3/tests|ensurepip)/"
                   r"|^usr/lib/python3\.11/EXTERNALLY-MANAGED$")
#: libraries loaded at start whatever imports follow: the ones manylinux wheels take from the
#: system (PEP 599's list, as far as the layer has them), and libgcc_s, which glibc dlopens for
#: pthread_cancel and unwinding
_PRELOAD = ("libgcc_s.so.1", "libstdc++.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1",
            "libutil.so.1", "libresolv.so.2", "libz.so.1", "libexpat.so.1")
#: the layer's pip: user installs (~/.local, the container's writable layer), no version check
_PIP_CONF = """\
[global]
disable-pip-version-check = true
root-user-action = ignore
[install]
user = true
"""

#: what the kernel site holds (for the image's Python version, from the package index)
SITE_REQUIREMENTS = ("ipykernel>=6.17,<7", "ipywidgets==8.1.9", "comm==0.2.3", "pip")
#: the module both folders hold, loaded by the kernel's boot line: it wraps IPython's ``%pip``
PIP_MODULE = "jupyter_contain_pip"
_PIP_SOURCE = '''"""Written by jupyter-contain into the kernel layer or site (read-only in the container).

Wraps IPython's %pip for kernels whose Python comes from the kernel layer, or
whose ipykernel comes from the kernel site:

- afterwards, site folders that the install just made (the user site
  ~/.local/lib/python3.N/site-packages on a first %pip in a kernel layer, or the
  image's /usr/local/lib/python3.N/dist-packages) are put on sys.path and the
  import caches cleared, so the package imports in this kernel, as it would
  had the folder existed at start;
- with the kernel site and no pip in the image: %pip runs the site's pip, with
  this folder on PYTHONPATH and PEP 668's marker of a distribution's Python
  lifted for that command only (the site is on the kernel's sys.path only, so
  the image's other Python programs never see it); packages go to the
  container's own layer.
"""
import os
import shlex
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _place():
    """Where a new site folder goes on sys.path: before the first one, as site.py would have put it."""
    for i, p in enumerate(sys.path):
        if p.endswith(("-packages", "/.jupyter-contain-site", "/.jupyter-contain")):
            return i
    return len(sys.path)


def _new_site_folders():
    import importlib
    import site

    found = [site.getusersitepackages()] if site.ENABLE_USER_SITE else []
    try:
        found += list(site.getsitepackages())
    except AttributeError:
        pass
    for d in found:
        if d not in sys.path and os.path.isdir(d):
            sys.path.insert(_place(), d)
    importlib.invalidate_caches()


def install():
    try:
        from IPython.core.magics import packaging
    except Exception:
        return
    shown = packaging.PackagingMagics.pip

    def pip(self, line):
        import importlib.util

        spec = importlib.util.find_spec("pip")
        if spec is not None and (spec.origin or "").startswith(os.path.join(HERE, "")) \\
                and HERE.startswith("/.jupyter-contain-site"):
            self.shell.system("PYTHONPATH=%s PIP_BREAK_SYSTEM_PACKAGES=1 %s -m pip %s"
                              % (shlex.quote(HERE), shlex.quote(sys.executable), line))
            print("Note: you may need to restart the kernel to use updated packages.")
        else:
            shown(self, line)
        _new_site_folders()

    pip.__doc__ = shown.__doc__
    packaging.PackagingMagics.pip = pip
'''
#: the Python versions the kernel site is made for (ipykernel 6.29 supports 3.8 and later)
SITE_MIN_PYTHON = (3, 8)


def _multiarch() -> str:
    machine = platform.machine()
    arch = {"x86_64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu"}.get(machine)
    if arch is None:
        raise errors.KernelError(f"the kernel layer is made for x86_64 and aarch64 hosts, not {machine}")
    return arch


#: overrides where layers and sites are cached (tests; a machine whose /var/cache is small)
CACHE_ENV = "JUPYTER_CONTAIN_KERNEL_LAYERS"


def default_cache_dir() -> Path:
    """Beside the bootstrap tarballs: /var/cache/jupyter-contain for root, else the XDG cache folder."""
    from ..runtime.images import bootstrap

    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return bootstrap.default_cache_dir().parent / "kernel-layers"


# ----------------------------------------------------------------------- the choice


@dataclass(frozen=True)
class KernelChoice:
    """How a kernelspec's kernels get ipykernel (validated at construction).

    ``mode``: "image" (its own Python and ipykernel), "layer" (the kernel
    layer's Python), "site" (its own Python, ipykernel from the kernel site
    for ``python_version``).
    """

    mode: str = "image"
    python_version: tuple[int, int] | None = None
    #: "sha256:..." of the folder's content (:func:`tree_digest`) when it came with a class bundle:
    #: that folder, under its own name, never one this machine builds
    content: str | None = None

    def __post_init__(self) -> None:
        if self.content is not None and (self.mode == "image" or not _CONTENT_RE.match(self.content)):
            raise errors.InvalidSpec(f"kernel_layer: content {str(self.content)[:80]!r} must be sha256:<64 hex> "
                                     "of a layer or a site")
        if self.mode not in ("image", "layer", "site"):
            raise errors.InvalidSpec(f"kernel_layer: unknown mode {self.mode!r}")
        if (self.mode == "site") != (self.python_version is not None):
            raise errors.InvalidSpec("kernel_layer: a site needs a Python version, and only a site has one")
        if self.python_version is not None and not (self.python_version[0] == 3 and 0 <= self.python_version[1] < 100):
            raise errors.InvalidSpec(f"kernel_layer: Python version {self.python_version!r} out of range")
        if self.python_version is not None and tuple(self.python_version) < SITE_MIN_PYTHON:
            raise errors.InvalidSpec(f"kernel_layer: Python {self.python_version[0]}.{self.python_version[1]} "
                                     f"is older than the kernel site supports")

    @classmethod
    def parse(cls, text: str) -> KernelChoice:
        """From a kernelspec's ``kernel_layer`` option: "", "layer" or "site:3.11" (each may end in @sha256:...)."""
        base, at, content = text.partition("@")
        if at:
            choice = cls.parse(base)
            return cls(choice.mode, choice.python_version, content)
        if text in ("", "image"):
            return cls()
        if text == "layer":
            return cls("layer")
        m = _SITE_RE.match(text)
        if m is None:
            raise errors.InvalidSpec(f"kernel_layer: {text!r} is not one of '', 'layer', 'site:3.N'")
        return cls("site", (int(m.group(1)), int(m.group(2))))

    def __str__(self) -> str:
        return self.base + (f"@{self.content}" if self.content else "")

    @property
    def base(self) -> str:
        """The choice without its content pin: "", "layer" or "site:3.N"."""
        if self.mode == "site":
            assert self.python_version is not None
            return f"site:{self.python_version[0]}.{self.python_version[1]}"
        return "" if self.mode == "image" else "layer"


def bundled_name(choice: KernelChoice) -> str:
    """The cache folder name of a layer or site that came with a class bundle: its content digest.

    A prefix of its own: a local build (``layer-<key>``, ``site-3.N-<key>``)
    never finds an imported folder, so a bundle's folder serves only the
    kernelspecs that name its content.
    """
    assert choice.content is not None and choice.mode != "image"
    return f"bundle-{choice.base.replace(':', '-')}-{choice.content.split(':', 1)[1]}"


def local_folder(choice: KernelChoice, *, progress: Progress | None = None) -> Path:
    """The host folder of ``choice`` on this machine (built if it is a local build not made yet)."""
    if choice.content is not None:
        path = default_cache_dir() / bundled_name(choice)
        if not path.is_dir():
            raise errors.KernelError(
                f"this kernel's {'kernel layer' if choice.mode == 'layer' else 'kernel site'} came with a class "
                f"bundle ({choice.content[:19]}...) and is not in {path.parent}: import the bundle again "
                f"(jupyter contain kernelspec import BUNDLE.tar --name OTHER), or reinstall the kernelspec "
                f"(jupyter contain kernelspec install IMAGE) to build one here")
        return path
    if choice.mode == "layer":
        return cached_kernel_layer(progress=progress)
    assert choice.mode == "site" and choice.python_version is not None
    return cached_kernel_site(choice.python_version, progress=progress)


def tree_digest(root: Path) -> str:
    """``sha256:`` of a folder's content: each entry's path, kind, executable bit, size and bytes or link target.

    Never follows a link. Owners, times and other mode bits are left out:
    an import sets them itself (host user, 0644/0755).
    """
    h = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel_dir = os.path.relpath(dirpath, root)
        # os.walk lists links to folders among dirs, and does not descend into them
        for name in sorted([*dirs, *files]):
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            entry: list[object]
            if stat.S_ISLNK(st.st_mode):
                entry = ["l", rel, os.readlink(path)]
            elif stat.S_ISDIR(st.st_mode):
                entry = ["d", rel]
            elif stat.S_ISREG(st.st_mode):
                entry = ["f", rel, bool(st.st_mode & 0o111), st.st_size, _sha256_file(Path(path))]
            else:
                raise errors.KernelError(f"{path} is neither a file, a folder nor a link")
            h.update(json.dumps(entry).encode() + b"\n")
    return "sha256:" + h.hexdigest()


def boot_path_lines(choice: KernelChoice) -> str:
    """The kernel's boot line prefix: the kernel site on ``sys.path`` (last: the image's wins), our %pip wrapper."""
    if choice.mode == "layer":
        return f"import {PIP_MODULE}; {PIP_MODULE}.install(); "
    if choice.mode != "site":
        return ""
    return f"sys.path.append({SITE_DIR!r}); import {PIP_MODULE}; {PIP_MODULE}.install(); "


def site_unsupported(info: dict) -> str | None:
    """Why no kernel site can serve an image Python described by a probe (None: one can)."""
    major, minor = info["python"]
    if major != 3 or not 0 <= minor < 100:
        return f"its Python {major}.{minor} is not one the kernel site knows"
    if (major, minor) < SITE_MIN_PYTHON:
        return f"its Python {major}.{minor} is older than the kernel site supports (3.8)"
    if info.get("libc") != "glibc":
        return f"its C library is {info.get('libc') or 'not glibc'} (the kernel site's wheels are manylinux)"
    try:
        libc = tuple(int(x) for x in str(info.get("libc_version")).split(".")[:2])
    except ValueError:
        libc = (0, 0)
    if libc < (2, 17):
        return f"its glibc {info.get('libc_version')} is older than manylinux wheels need (2.17)"
    if info.get("machine") != platform.machine():
        return f"its Python runs on {info.get('machine')}, this host on {platform.machine()}"
    return None


def kernel_python(choice: KernelChoice, image_python: tuple[str, ...]) -> tuple[str, ...]:
    """The Python that runs the kernel inside the container."""
    return (LAYER_PYTHON,) if choice.mode == "layer" else image_python


def binds(choice: KernelChoice, *, progress: Progress | None = None) -> list[Bind]:
    """The read-only binds a kernel with ``choice`` needs (building the folder once if it is missing)."""
    if choice.content is not None:
        return [Bind(local_folder(choice), LAYER_DIR if choice.mode == "layer" else SITE_DIR, readonly=True)]
    if choice.mode == "layer":
        return [Bind(cached_kernel_layer(progress=progress), LAYER_DIR, readonly=True)]
    if choice.mode == "site":
        assert choice.python_version is not None
        return [Bind(cached_kernel_site(choice.python_version, progress=progress), SITE_DIR, readonly=True)]
    return []


# ------------------------------------------------------------------------ ELF reading


@dataclass(frozen=True)
class ElfInfo:
    interpreter: str | None
    needed: tuple[str, ...]


def read_elf(data: bytes) -> ElfInfo | None:
    """``PT_INTERP`` and ``DT_NEEDED`` of a 64-bit little-endian ELF file; None if ``data`` is not one."""
    if data[:4] != b"\x7fELF":
        return None
    if data[4] != 2 or data[5] != 1:
        raise errors.KernelError("the kernel layer reads 64-bit little-endian ELF files only")
    try:
        e_phoff, = struct.unpack_from("<Q", data, 0x20)
        e_phentsize, e_phnum = struct.unpack_from("<HH", data, 0x36)
        loads: list[tuple[int, int, int]] = []
        dynamic: tuple[int, int] | None = None
        interp = None
        for i in range(e_phnum):
            p_type, _flags, p_offset, p_vaddr, _paddr, p_filesz = struct.unpack_from(
                "<IIQQQQ", data, e_phoff + i * e_phentsize)
            if p_type == 1:        # PT_LOAD
                loads.append((p_vaddr, p_offset, p_filesz))
            elif p_type == 2:      # PT_DYNAMIC
                dynamic = (p_offset, p_filesz)
            elif p_type == 3:      # PT_INTERP
                interp = data[p_offset:p_offset + p_filesz].split(b"\0", 1)[0].decode()
        if dynamic is None:
            return ElfInfo(interp, ())
        entries = []
        strtab = None
        for off in range(dynamic[0], dynamic[0] + dynamic[1], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 5:           # DT_STRTAB (a virtual address)
                strtab = val
            elif tag == 1:         # DT_NEEDED (an offset into the string table)
                entries.append(val)
        if strtab is None:
            return ElfInfo(interp, ())
        base = next(off + strtab - vaddr for vaddr, off, size in loads if vaddr <= strtab < vaddr + size)
        needed = tuple(data[base + n:data.index(b"\0", base + n)].decode() for n in entries)
    except (struct.error, StopIteration, ValueError, UnicodeDecodeError) as exc:
        raise errors.KernelError(f"a malformed ELF file in the bootstrap image: {exc}") from None
    return ElfInfo(interp, needed)


# ------------------------------------------------------------------------ the layer


def _source_tar(progress: Progress | None) -> tuple[Path, str]:
    """The bootstrap image's root filesystem tar (built once per machine) and its DiffID."""
    from ..runtime.images import bootstrap

    tar = bootstrap.cached_rootfs_tar(bootstrap.DEBIAN_KERNEL, progress=progress)
    try:
        diff_id = json.loads(tar.with_suffix(".json").read_text())["diff_id"]
    except (OSError, ValueError, KeyError):
        diff_id = "sha256:" + _sha256_file(tar)
    return tar, str(diff_id)


def _rules() -> dict:
    """Everything but the source that decides a layer's content."""
    return {"builder": BUILDER_VERSION, "at": LAYER_DIR, "preload": list(_PRELOAD), "pip": _PIP_CONF,
            "arch": _multiarch(), "module": _PIP_SOURCE}


def layer_key(diff_id: str) -> str:
    doc = {**_rules(), "source": diff_id}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cached_kernel_layer(*, cache_dir: Path | None = None, progress: Progress | None = None) -> Path:
    """The kernel layer's folder, built once per machine (see the module docstring).

    A kernel start finds it through a pointer file named after the bootstrap
    recipe and these build rules (no tar is read, nothing hashed but a few
    constants), so a start never waits for the bootstrap root filesystem, even
    when its tarball has been removed from the cache since.
    """
    from ..runtime.images import bootstrap

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    memo = f"{cache_dir}/layer"
    found = _memo.get(memo)
    if found is not None and found.is_dir():
        return found
    rules = hashlib.sha256(json.dumps(_rules(), sort_keys=True).encode()).hexdigest()
    pointer = cache_dir / f".layer-for-{bootstrap.DEBIAN_KERNEL.cache_key()[:16]}-{rules[:16]}"
    try:
        name = pointer.read_text().strip()
    except OSError:
        name = ""
    if re.fullmatch(r"layer-[0-9a-f]{16}", name) and (cache_dir / name).is_dir():
        _memo[memo] = path = cache_dir / name
        return path
    tar, diff_id = _source_tar(progress)
    path = _cached(cache_dir, f"layer-{layer_key(diff_id)[:16]}",
                   lambda tmp, say: _build_layer(tar, tmp, say), progress=progress,
                   # no host path: the file is readable inside every container that mounts the layer
                   meta={"source_diff_id": diff_id, "builder_version": BUILDER_VERSION})
    atomic_write(pointer, path.name.encode() + b"\n")
    _memo[memo] = path
    return path


#: folders found once per process (a kernel start after the first stats one folder, nothing more)
_memo: dict[str, Path] = {}


def _cached(cache_dir: Path, name: str, build: Callable[[Path, Progress], dict | None], *,
            progress: Progress | None, meta: dict) -> Path:
    final = cache_dir / name
    if not final.is_dir():
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        say = _reporter(progress)
        with locked(cache_dir / f".{name}.lock", say):
            if not final.is_dir():
                # we hold the lock: any temp folder for this name is a killed build's
                for stale in cache_dir.glob(f".{name}.*.tmp"):
                    _rmtree(stale)
                tmp = cache_dir / f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
                t0 = time.monotonic()
                try:
                    tmp.mkdir(mode=0o755)
                    more = build(tmp, say) or {}
                    seconds = time.monotonic() - t0
                    size = _tree_size(tmp)
                    info = {**meta, **more, "name": name, "size": size, "build_seconds": round(seconds, 1),
                            "built_at": int(time.time())}
                    (tmp / "jupyter-contain-kernel.json").write_text(json.dumps(info, indent=2) + "\n")
                    os.chmod(tmp / "jupyter-contain-kernel.json", 0o644)
                    os.sync()   # the rename below must not name a folder whose files a crash loses
                    os.rename(tmp, final)
                except BaseException:
                    _rmtree(tmp)
                    raise
                say(f"built {final} ({size / 1e6:.0f} MB, {seconds:.1f} s)")
                log.info("kernel layer: built %s (%.0f MB, %.1f s)", final, size / 1e6, seconds)
    return final


def _build_layer(tar_path: Path, dest: Path, say: Progress) -> dict:
    patchelf = shutil.which("patchelf")
    if patchelf is None:
        raise errors.KernelError("patchelf not found: the kernel layer needs it to point its Python at its own "
                                 "loader and libraries (apt-get install patchelf; scripts/setup does)")
    arch = _multiarch()
    lib_dirs = (f"usr/lib/{arch}", f"lib/{arch}", "usr/lib", "lib", "usr/lib64", "lib64")
    say(f"kernel layer: taking Python, ipykernel and ipywidgets from {tar_path.name}")
    with tarfile.open(tar_path, mode="r:") as tar:
        members = {m.name.removeprefix("./").rstrip("/"): m for m in tar.getmembers()}

        def resolve(path: str) -> tarfile.TarInfo | None:
            """The regular file ``path`` names in the root filesystem (following symlinks, also in parents)."""
            for _ in range(40):
                parts = path.strip("/").split("/")
                for i in range(1, len(parts) + 1):
                    m = members.get("/".join(parts[:i]))
                    if m is not None and m.issym():
                        target = m.linkname if m.linkname.startswith("/") else \
                            posixpath.join("/".join(parts[:i - 1]), m.linkname)
                        path = posixpath.normpath("/" + "/".join([target.lstrip("/"), *parts[i:]]))
                        break
                else:
                    m = members.get(path.strip("/"))
                    return m if m is not None and m.isreg() else None
            return None

        def read(m: tarfile.TarInfo) -> bytes:
            f = tar.extractfile(m)
            assert f is not None
            return f.read()

        def put(rel: str, m: tarfile.TarInfo, data: bytes | None = None) -> None:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            with open(target, "xb") as f:
                f.write(read(m) if data is None else data)
            os.chmod(target, 0o755 if m.mode & 0o111 else 0o644)
            os.utime(target, (m.mtime, m.mtime))   # the pyc files check their sources' mtimes

        elves: list[bytes] = []
        count = 0
        for name, m in members.items():
            if not name.startswith(_TREES) or _SKIP.search(name):
                continue
            rel = name
            if m.isdir():
                (dest / rel).mkdir(parents=True, exist_ok=True, mode=0o755)
            elif m.issym():
                target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
                if m.linkname.startswith("/") or not (target + "/").startswith(_TREES):
                    continue   # Debian's links out of these trees (/etc, /usr/share): not needed
                (dest / rel).parent.mkdir(parents=True, exist_ok=True, mode=0o755)
                os.symlink(m.linkname, dest / rel)
            elif m.isreg():
                data = read(m)
                put(rel, m, data)
                count += 1
                if name.endswith(".so") or ".so." in name:
                    elves.append(data)
        python = resolve(f"usr/bin/{_PY}")
        if python is None:
            raise errors.KernelError(f"the bootstrap image has no /usr/bin/{_PY}")
        py_data = read(python)
        put(f"usr/bin/{_PY}", python, py_data)
        os.symlink(_PY, dest / "usr/bin/python3")
        info = read_elf(py_data)
        assert info is not None and info.interpreter
        loader = resolve(info.interpreter)
        if loader is None:
            raise errors.KernelError(f"the bootstrap image has no loader {info.interpreter}")
        loader_name = posixpath.basename(info.interpreter)
        libs: dict[str, tarfile.TarInfo] = {loader_name: loader}
        todo = [py_data, *elves]
        wanted = list(_PRELOAD)
        while todo or wanted:
            names = list(wanted)
            wanted = []
            for blob in todo:
                got = read_elf(blob)
                if got is not None:
                    names.extend(got.needed)
            todo = []
            for soname in names:
                if soname in libs:
                    continue
                lib = next((r for d in lib_dirs if (r := resolve(f"{d}/{soname}")) is not None), None)
                if lib is None:
                    if soname in _PRELOAD:
                        continue   # not in this image: nothing to preload
                    raise errors.KernelError(f"the bootstrap image has no {soname} (needed by the kernel layer)")
                libs[soname] = lib
                todo.append(read(lib))
        for soname, m in sorted(libs.items()):
            put(f"lib/{soname}", m)
        (dest / "usr/pip.conf").write_text(_PIP_CONF)
        os.chmod(dest / "usr/pip.conf", 0o644)
        module = dest / "usr/local/lib/python3.11/dist-packages" / f"{PIP_MODULE}.py"
        module.write_text(_PIP_SOURCE)
        os.chmod(module, 0o644)
    say(f"kernel layer: {count} files, {len(libs)} libraries")
    exe = dest / "usr/bin" / _PY
    preload = [n for n in _PRELOAD if n in libs and n not in info.needed]
    # one change per run: patchelf 0.14 (bookworm) garbles the string table when one run
    # adds entries and sets the rpath
    for change in ([a for n in preload for a in ("--add-needed", n)],
                   ["--set-interpreter", f"{LAYER_DIR}/lib/{loader_name}"],
                   ["--force-rpath", "--set-rpath", f"{LAYER_DIR}/lib"]):
        if change:
            _run([patchelf, *change, str(exe)], what="patchelf")
    got = read_elf(exe.read_bytes())
    if got is None or got.interpreter != f"{LAYER_DIR}/lib/{loader_name}" or not set(preload) <= set(got.needed):
        raise errors.KernelError(f"patchelf did not re-link {exe} as asked ({got})")
    # a check of the result, and the bytecode the layer needs (it is read-only in containers):
    # run through the loader by hand, as the layer's path does not exist on the host
    run_py = [str(dest / "lib" / loader_name), "--library-path", str(dest / "lib"), str(exe)]
    _run([*run_py, "-I", "-m", "compileall", "-q", "-j0", *[str(dest / t) for t in _TREES]], what="compileall",
         ok=(0, 1))
    imports = ("import ipykernel.kernelapp, ipywidgets, zmq, sqlite3, ssl, ctypes, pip, readline, lzma, bz2, "
               "hashlib, uuid, decimal, json")
    _run([*run_py, "-I", "-c", imports], what="a check of the layer")
    return {"libraries": sorted(libs), "files": count}


# ------------------------------------------------------------------------- the site


def site_key(version: tuple[int, int]) -> str:
    doc = {"builder": BUILDER_VERSION, "python": list(version), "requirements": list(SITE_REQUIREMENTS),
           "arch": _multiarch(), "module": _PIP_SOURCE}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def cached_kernel_site(version: tuple[int, int], *, cache_dir: Path | None = None,
                       progress: Progress | None = None, python: str | None = None) -> Path:
    """The kernel site for CPython ``version`` (glibc), fetched with the host's pip once per machine."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = f"{version[0]}.{version[1]}"
    memo = f"{cache_dir}/site-{tag}"
    found = _memo.get(memo)
    if found is not None and found.is_dir():
        return found
    _memo[memo] = path = _cached(cache_dir, f"site-{tag}-{site_key(version)[:16]}",
                   lambda tmp, say: _build_site(version, tmp, say, python=python or sys.executable),
                   progress=progress, meta={"python": tag, "requirements": list(SITE_REQUIREMENTS),
                                            "builder_version": BUILDER_VERSION})
    return path


def _build_site(version: tuple[int, int], dest: Path, say: Progress, *, python: str) -> dict:
    machine = platform.machine()
    tag = f"{version[0]}{version[1]}"
    platforms = [f"manylinux_2_{n}_{machine}" for n in (28, 27, 26, 24, 17)] + [f"manylinux2014_{machine}"]
    say(f"kernel site for Python {version[0]}.{version[1]}: {' '.join(SITE_REQUIREMENTS)} from the package index")
    argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-input", "--no-cache-dir",
            "--quiet", "--target", str(dest), "--only-binary=:all:", "--implementation", "cp",
            "--python-version", f"{version[0]}.{version[1]}", "--abi", f"cp{tag}", "--abi", "abi3",
            "--abi", "none", *[a for p in platforms for a in ("--platform", p)], "--platform", "any",
            "--no-compile", *SITE_REQUIREMENTS]
    _run(argv, what="pip install of the kernel site", timeout=600)
    # scripts (jupyter, ipython ...) were made for the host's Python: no use in an image
    _rmtree(dest / "bin")
    (dest / f"{PIP_MODULE}.py").write_text(_PIP_SOURCE)
    if sys.version_info[:2] == tuple(version):
        # this Python writes the bytecode the image's own would (the site is read-only in containers)
        _run([sys.executable, "-I", "-m", "compileall", "-q", "-j0",
              "--invalidation-mode", "unchecked-hash", str(dest)], what="compileall", ok=(0, 1))
    for p in dest.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() or p.stat().st_mode & 0o111 else 0o644)
    # what the index gave (the requirements float within their ranges): for people and bug reports
    return {"installed": sorted(p.name.removesuffix(".dist-info") for p in dest.glob("*.dist-info"))}


# ------------------------------------------------------------------------- helpers


def _run(argv: list[str], *, what: str, ok: tuple[int, ...] = (0,), timeout: float = 300) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "LD_"))}
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                             stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise errors.KernelError(f"{what} failed: {exc}") from exc
    if out.returncode not in ok:
        detail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
        raise errors.KernelError(f"{what} failed (exit {out.returncode}):\n{detail}")


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.lstat(os.path.join(dirpath, f))
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)




def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
