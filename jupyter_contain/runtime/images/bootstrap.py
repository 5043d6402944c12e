"""Offline-friendly root filesystem tarballs for the base images (busybox, Debian).

Owns: turning a :class:`RootfsRecipe` into one uncompressed, reproducible
root-filesystem tar (the future image's single layer) and caching it once per
machine, keyed by a hash of the recipe. The busybox tarball is assembled in pure
Python from the host's ``busybox-static``; the Debian tarball comes from
``mmdebstrap`` talking only to the Debian mirror the host's apt already uses,
plus pinned wheels (:data:`WIDGET_WHEELS`: ipywidgets 8 and what it requires)
fetched once from the package index the host's pip uses, checked against their
sha256 and cached beside the tarballs (:func:`cached_wheels`).

Must not: touch the image store (another module imports these tarballs and
computes the DiffID itself), contact any registry, or leave a half-written file
under the cache directory. Nothing here runs at import time.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from jupyter_contain.errors import ImageError
from jupyter_contain.runtime.fsutil import atomic_write, fsync_dir

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Bump whenever the build steps change what ends up in a tarball, so every
#: machine's cache rebuilds instead of serving a stale rootfs under a new recipe.
BUILDER_VERSION = 3

#: mtime for every entry (busybox) and upper clamp for mmdebstrap output;
#: fixed (2024-01-01T00:00:00Z) so the same inputs give the same DiffID.
SOURCE_DATE_EPOCH = 1704067200

#: Where the host's busybox-static lives (merged /usr: /bin is a symlink).
BUSYBOX_BINARY = Path("/bin/busybox")

_MERGED_USR_HOOKS = "/usr/share/mmdebstrap/hooks/maybe-merged-usr"

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: /etc/pip.conf for the Debian kernel image. Debian marks its python as
#: "externally managed" (PEP 668); a user typing ``pip install x`` in a notebook
#: expects it to work. We ship pip.conf rather than deleting
#: /usr/lib/python3.11/EXTERNALLY-MANAGED because (a) dpkg would restore the
#: marker on the next python3.11 upgrade inside the container, while /etc is
#: the admin's and survives; (b) it is pip's documented switch and visible to
#: anyone who wonders; (c) Debian's pip installs into /usr/local/lib/python3.11/
#: dist-packages, so user packages shadow but never overwrite dpkg's files.
#: The version check is off because it would reach out to PyPI on every run.
PIP_CONF = """\
[global]
break-system-packages = true
root-user-action = ignore
disable-pip-version-check = true
"""


_WHEEL_NAME_RE = re.compile(r"^[A-Za-z0-9_.]+-[A-Za-z0-9_.!+]+-py3-none-any\.whl$")


@dataclass(frozen=True)
class Wheel:
    """One pinned, pure-Python wheel: a project, its version, its file name and the file's sha256."""

    project: str
    version: str
    filename: str
    sha256: str

    def __post_init__(self) -> None:
        if not _WHEEL_NAME_RE.match(self.filename) or "/" in self.filename:
            raise ImageError(f"wheel {self.filename!r}: not a pure-Python wheel file name (*-py3-none-any.whl)")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ImageError(f"wheel {self.filename}: sha256 must be 64 lowercase hex digits")

    @property
    def requirement(self) -> str:
        """The line for a ``--require-hashes`` requirements file."""
        return f"{self.project}=={self.version} --hash=sha256:{self.sha256}"


#: ipywidgets 8 for the Debian kernel image. JupyterLab 4 and Notebook 7 speak widget
#: protocol 2 (ipywidgets 8); bookworm's python3-ipywidgets is 6.0 and renders nowhere
#: there. ipywidgets 8.1 carries a shim for ipykernel < 6.18 (bookworm has 6.17), so it
#: works with Debian's ipykernel. widgetsnbextension and jupyterlab_widgets are only
#: front-end files the kernel never serves, but ipywidgets requires them: with them,
#: ``pip check`` and a user's later ``pip install`` see a consistent environment.
#: The same versions as the test extra's host ipywidgets (pyproject.toml), so the
#: browser tests run the kernel and the front-end of one release.
WIDGET_WHEELS: tuple[Wheel, ...] = (
    Wheel("ipywidgets", "8.1.9", "ipywidgets-8.1.9-py3-none-any.whl",
          "f2b8cbcaae10252b809fbe4d7470db75c09b769a32cbf816d20e5ca6d3c5a79d"),
    Wheel("comm", "0.2.3", "comm-0.2.3-py3-none-any.whl",
          "c615d91d75f7f04f095b30d1c1711babd43bdc6419c1be9886a85f2f4e489417"),
    Wheel("widgetsnbextension", "4.0.16", "widgetsnbextension-4.0.16-py3-none-any.whl",
          "a31a8774885b96fe825462f5d6496166f0c7cae111195b6465c801d230eb5a4e"),
    Wheel("jupyterlab_widgets", "3.0.17", "jupyterlab_widgets-3.0.17-py3-none-any.whl",
          "40ac1e9955acf116c4d995d9bfa082d86ad9ec6d91c4f134827cf5e0a5eb75e0"),
)


@dataclass(frozen=True)
class RootfsRecipe:
    """What a base root filesystem is made of.

    ``config`` is the ``config`` section (Env, Cmd, WorkingDir, ...) of the OCI
    image config the importer should write next to the tarball. ``wheels`` are
    installed (Debian only) with the image's own pip, from local files, after
    the packages.
    """

    name: str  # "busybox" | "debian"
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    config: Mapping = field(default_factory=dict)
    wheels: tuple[Wheel, ...] = ()

    def cache_key(self) -> str:
        """Hex sha256 over everything that changes the tarball's content."""
        doc = {
            "builder": BUILDER_VERSION,
            "epoch": SOURCE_DATE_EPOCH,
            "name": self.name,
            "suite": self.suite,
            "packages": sorted(self.packages),
            "config": _jsonable(self.config),
            # the file hashes pin the content; the names say where it goes
            "wheels": sorted([w.filename, w.sha256] for w in self.wheels),
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


BUSYBOX = RootfsRecipe(
    name="busybox",
    config={"Env": [f"PATH={_PATH}"], "Cmd": ["sh"], "WorkingDir": "/"},
)

#: The default kernel image: Debian's Python and ipykernel, ipywidgets 8 from pinned wheels
#: (bookworm's python3-ipywidgets is 6.0: see WIDGET_WHEELS).
DEBIAN_KERNEL = RootfsRecipe(
    name="debian",
    suite="bookworm",
    packages=(
        "python3",
        "python3-ipykernel",
        "python3-pip",
        # `python -m venv` is what users reach for after pip; without it venv
        # fails with a message telling them to apt-get install this package.
        "python3-venv",
        # pip (and requests, urllib) need a CA bundle for https to PyPI.
        "ca-certificates",
    ),
    config={
        "Env": [f"PATH={_PATH}", "LANG=C.UTF-8", "PYTHONUNBUFFERED=1"],
        "Cmd": ["python3"],
        "WorkingDir": "/root",
    },
    wheels=WIDGET_WHEELS,
)


def created_rfc3339() -> str:
    """SOURCE_DATE_EPOCH as the images' creation time: the same tarball, the same image digest."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(SOURCE_DATE_EPOCH))


def suggested_image_config(recipe: RootfsRecipe, *, architecture: str = "amd64") -> dict:
    """The OCI image config (minus ``rootfs``/``history``) to import the tarball with."""
    return {"architecture": architecture, "os": "linux", "config": _jsonable(recipe.config)}


def default_cache_dir() -> Path:
    """/var/cache/jupyter-contain/rootfs for root, else the XDG cache directory."""
    if os.geteuid() == 0:
        return Path("/var/cache/jupyter-contain/rootfs")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jupyter-contain" / "rootfs"


# --------------------------------------------------------------------------- API

def build_rootfs_tar(
    recipe: RootfsRecipe,
    dest: Path,
    *,
    mirror: str | None = None,
    progress: Progress | None = None,
    wheel_dir: Path | None = None,
) -> Path:
    """Build ``recipe`` into an uncompressed tar at ``dest`` and return ``dest``.

    ``dest`` appears atomically (written beside it, then renamed); on any
    failure no file is left at or beside it. ``mirror`` overrides the host's apt
    sources for Debian builds: a URI (``http://deb.debian.org/debian``) or one
    or more full ``deb ...`` lines separated by newlines. The recipe's wheels
    come from ``wheel_dir`` (default: ``wheels`` in the machine's cache), fetched
    there first if missing (:func:`cached_wheels`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    say = reporter(progress)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    start = time.monotonic()
    try:
        if recipe.name == "busybox":
            _build_busybox(recipe, tmp, say)
        elif recipe.name == "debian":
            wheels = cached_wheels(recipe.wheels, wheel_dir=wheel_dir if wheel_dir is not None
                                   else default_cache_dir() / "wheels", progress=progress)
            _build_debian(recipe, tmp, mirror=mirror, say=say, wheels=wheels)
        else:
            raise ImageError(f"unknown rootfs recipe {recipe.name!r} (known: busybox, debian)")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    say(f"built {recipe.name} rootfs {dest} ({dest.stat().st_size} bytes, "
        f"{time.monotonic() - start:.1f} s)")
    return dest


def cached_rootfs_tar(
    recipe: RootfsRecipe,
    *,
    cache_dir: Path | None = None,
    mirror: str | None = None,
    progress: Progress | None = None,
) -> Path:
    """Return the cached tarball for ``recipe``, building it once per machine.

    An exclusive ``flock`` per recipe key makes a second process wait for the
    first one's build instead of starting its own. Beside the tar, a ``.json``
    records the recipe, the sha256 (= DiffID of the uncompressed layer), the
    size and the build time, for the importer and for humans.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = recipe.cache_key()
    final = cache_dir / f"{recipe.name}-{recipe.suite}-{key[:16]}.tar"
    if final.exists():
        return final
    cache_dir.mkdir(parents=True, exist_ok=True)
    say = reporter(progress)
    with locked(cache_dir / f".{final.name}.lock", say):
        if final.exists():  # someone else built it while we waited
            return final
        # We hold the lock, so any temp file for this key is a crashed build's.
        for stale in cache_dir.glob(f".{final.name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        start = time.monotonic()
        build_rootfs_tar(recipe, final, mirror=mirror, progress=progress, wheel_dir=cache_dir / "wheels")
        seconds = time.monotonic() - start
        meta = {
            "recipe": {"name": recipe.name, "suite": recipe.suite,
                       "packages": list(recipe.packages), "config": _jsonable(recipe.config),
                       "wheels": [{"project": w.project, "version": w.version, "filename": w.filename,
                                   "sha256": w.sha256} for w in recipe.wheels]},
            "key": key,
            "builder_version": BUILDER_VERSION,
            "diff_id": "sha256:" + _sha256_file(final),
            "size": final.stat().st_size,
            "build_seconds": round(seconds, 1),
            "built_at": int(time.time()),
        }
        atomic_write(final.with_suffix(".json"), json.dumps(meta, indent=2).encode() + b"\n")
    return final


def host_apt_sources(suite: str, *, etc_apt: Path = Path("/etc/apt")) -> list[str]:
    """One-line ``deb URI SUITE COMPONENTS`` entries of the host for ``suite``.

    Reads ``sources.list``, ``sources.list.d/*.list`` and ``*.sources`` (deb822)
    and keeps the binary entries whose suite is ``suite`` or ``suite-*``
    (``bookworm-updates``, ``bookworm-security``): that is Debian's own mirror
    set and drops third-party repositories (their suites are named otherwise).
    """
    entries: list[tuple[str, str, list[str]]] = []
    files: list[Path] = []
    if (etc_apt / "sources.list").is_file():
        files.append(etc_apt / "sources.list")
    d = etc_apt / "sources.list.d"
    if d.is_dir():
        files.extend(sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources")))
    for path in files:
        try:
            text = path.read_text()
        except OSError as exc:
            log.debug("skipping unreadable %s: %s", path, exc)
            continue
        entries.extend(_parse_deb822(text) if path.suffix == ".sources" else _parse_one_line(text))
    lines: list[str] = []
    for uri, s, comps in entries:
        if s == suite or s.startswith(suite + "-"):
            line = f"deb {uri} {s} {' '.join(comps) or 'main'}"
            if line not in lines:
                lines.append(line)
    return lines


def cached_wheels(
    wheels: tuple[Wheel, ...] | list[Wheel],
    *,
    wheel_dir: Path | None = None,
    progress: Progress | None = None,
    python: str | None = None,
) -> list[Path]:
    """The files of ``wheels`` in ``wheel_dir``, fetched with pip where missing.

    A cached file is used only if its sha256 is the pinned one (a bad one is
    fetched again). The missing ones come from the package index the host's
    pip is configured for (``pip download --require-hashes --no-deps``, so a
    local mirror or devpi works; nothing is fetched when all are cached), into a
    temp folder first: only checked files are renamed into the cache.
    """
    if not wheels:
        return []
    wheel_dir = Path(wheel_dir) if wheel_dir is not None else default_cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    say = reporter(progress)

    def good(w: Wheel) -> bool:
        path = wheel_dir / w.filename
        return path.is_file() and _sha256_file(path) == w.sha256

    missing = [w for w in wheels if not good(w)]
    if missing:
        with locked(wheel_dir / ".wheels.lock", say):
            missing = [w for w in wheels if not good(w)]
            if missing:
                _download_wheels(missing, wheel_dir, say=say, python=python or sys.executable)
    return [wheel_dir / w.filename for w in wheels]


def _download_wheels(wheels: list[Wheel], wheel_dir: Path, *, say: Progress, python: str) -> None:
    tmp = wheel_dir / f".download.{os.getpid()}.{threading.get_ident()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        req = tmp / "requirements.txt"
        req.write_text("".join(w.requirement + "\n" for w in wheels))
        argv = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
                "--disable-pip-version-check", "--no-input", "-q", "-d", str(tmp), "-r", str(req)]
        say("pip download " + " ".join(f"{w.project}=={w.version}" for w in wheels))
        try:
            out = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise ImageError(f"could not run pip to fetch {', '.join(w.filename for w in wheels)}: {exc}") from exc
        if out.returncode != 0:
            detail = "\n".join((out.stderr or out.stdout).strip().splitlines()[-15:])
            raise ImageError(
                f"pip could not fetch {', '.join(w.filename for w in wheels)} (exit {out.returncode}); "
                f"with no access to the package index, put these files in {wheel_dir} "
                f"(e.g. `pip download --no-deps {' '.join(f'{w.project}=={w.version}' for w in wheels)}` "
                f"on a machine that has it). pip said:\n{detail}")
        for w in wheels:
            got = tmp / w.filename
            if not got.is_file():
                raise ImageError(f"pip download did not produce {w.filename} in {tmp}")
            digest = _sha256_file(got)
            if digest != w.sha256:   # pip checks too; this guards the rename
                raise ImageError(f"{w.filename}: sha256 {digest}, expected {w.sha256}")
            os.replace(got, wheel_dir / w.filename)
        fsync_dir(wheel_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ busybox

def _build_busybox(recipe: RootfsRecipe, dest: Path, say: Progress) -> None:
    binary = BUSYBOX_BINARY
    if not binary.is_file():
        raise ImageError(f"{binary} not found: install Debian's busybox-static package "
                         "(apt-get install busybox-static)")
    try:
        out = subprocess.run([str(binary), "--list-full"], check=True, capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ImageError(f"{binary} --list-full failed: {exc}; is it busybox-static?") from exc
    applets = sorted({p.strip().lstrip("/") for p in out.split() if "/" in p.strip()})
    if "bin/sh" not in applets:
        raise ImageError(f"{binary} has no sh applet; is it Debian's busybox-static?")
    say(f"busybox: {len(applets)} applets from {binary}")

    dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "home": 0o755, "proc": 0o555,
            "root": 0o700, "sbin": 0o755, "sys": 0o555, "tmp": 0o1777, "usr": 0o755,
            "usr/bin": 0o755, "usr/sbin": 0o755, "var": 0o755, "var/tmp": 0o1777}
    for a in applets:  # any further parent an applet path needs
        parent = os.path.dirname(a)
        while parent and parent not in dirs:
            dirs[parent] = 0o755
            parent = os.path.dirname(parent)
    files: dict[str, tuple[bytes | Path, int]] = {
        "bin/busybox": (binary, 0o755),
        "etc/passwd": ((b"root:x:0:0:root:/root:/bin/sh\n"
                        b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"), 0o644),
        "etc/group": (b"root:x:0:\nnogroup:x:65534:\nnobody:x:65534:\n", 0o644),
        "etc/hostname": (b"localhost\n", 0o644),
        "etc/hosts": (b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n", 0o644),
    }
    copyright_file = Path("/usr/share/doc/busybox-static/copyright")
    if copyright_file.is_file():  # GPL: ship the licence with the binary
        for p in ("usr/share", "usr/share/doc", "usr/share/doc/busybox-static"):
            dirs.setdefault(p, 0o755)
        files["usr/share/doc/busybox-static/copyright"] = (copyright_file, 0o644)
    links = {a: "/bin/busybox" for a in applets if a != "bin/busybox"}

    names = sorted(set(dirs) | set(files) | set(links))
    with open(dest, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            ti = tarfile.TarInfo(name)
            ti.mtime = SOURCE_DATE_EPOCH
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            if name in dirs:
                ti.type, ti.mode = tarfile.DIRTYPE, dirs[name]
                tar.addfile(ti)
            elif name in files:
                content, ti.mode = files[name]
                data = content.read_bytes() if isinstance(content, Path) else content
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
            else:
                ti.type, ti.mode, ti.linkname = tarfile.SYMTYPE, 0o777, links[name]
                tar.addfile(ti)


# ------------------------------------------------------------------- debian

#: where the wheels sit inside the chroot while its pip installs them (removed after)
_CHROOT_WHEELS = "/tmp/jupyter-contain-wheels"


def _wheel_hooks(recipe: RootfsRecipe, wheels: list[Path]) -> list[str]:
    """mmdebstrap hooks that install ``wheels`` with the image's own pip, offline.

    The image's pip (not files unpacked by us) so the result is what a user's
    ``pip install`` makes: a RECORD that ``pip uninstall`` follows, INSTALLER,
    data files under /usr/local, bytecode. Requirements by name from
    ``--find-links`` (not wheel paths, which pip would record as a direct URL
    that ``pip freeze`` shows) and with dependencies resolved, so a pin that
    misses a dependency fails the build instead of shipping a broken set.
    SOURCE_DATE_EPOCH makes py_compile write hash-checked .pyc files (no
    mtimes inside: reproducible, and never stale after the tar clamps mtimes,
    so a first import writes nothing to a container's writable layer).
    """
    for w in wheels:
        if any(c.isspace() for c in str(w)):
            # mmdebstrap splits a special hook's arguments at white space
            raise ImageError(f"wheel path {w} holds white space: use a cache folder without any")
    pins = " ".join(f"{w.project}=={w.version}" for w in recipe.wheels)
    return [
        f"--customize-hook=mkdir -p \"$1{_CHROOT_WHEELS}\"",
        "--customize-hook=copy-in " + " ".join(str(w) for w in wheels) + " " + _CHROOT_WHEELS,
        (f"--customize-hook=chroot \"$1\" env SOURCE_DATE_EPOCH={SOURCE_DATE_EPOCH} PYTHONHASHSEED=0 "
         f"python3 -m pip install --no-index --find-links {_CHROOT_WHEELS} --no-cache-dir "
         f"--break-system-packages --root-user-action=ignore --disable-pip-version-check "
         f"--no-warn-script-location --progress-bar off {pins}"),
        f"--customize-hook=rm -rf \"$1{_CHROOT_WHEELS}\"",
    ]


def _build_debian(recipe: RootfsRecipe, dest: Path, *, mirror: str | None, say: Progress,
                  wheels: list[Path] | None = None) -> None:
    exe = shutil.which("mmdebstrap")
    if exe is None:
        raise ImageError("mmdebstrap not found: building the Debian base image needs it "
                         "(apt-get install mmdebstrap)")
    if mirror:
        sources = ([ln.strip() for ln in mirror.splitlines() if ln.strip()]
                   if mirror.lstrip().startswith("deb ")
                   else [f"deb {mirror} {recipe.suite} main",
                         f"deb {mirror} {recipe.suite}-updates main"])
    else:
        sources = host_apt_sources(recipe.suite)
    if not sources:
        log.info("host apt has no source for %s; mmdebstrap picks deb.debian.org", recipe.suite)
    pip_conf = PIP_CONF.replace("\n", "\\n")
    argv = [
        exe, "--variant=minbase", "--format=tar", "--mode=auto",
        # debian:*-slim's trimming; written to the chroot's dpkg.cfg.d so it
        # also holds for what users apt-get install later.
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        # Kernel messages are English; gettext falls back silently. -30 MB.
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        # Debian's Jupyter packages drag in the classic notebook's JS (MathJax,
        # CodeMirror, ...); the kernel never serves it, the host's Jupyter
        # server does. -55 MB, and dpkg's state stays consistent.
        "--dpkgopt=path-exclude=/usr/share/javascript/*",
        "--dpkgopt=path-exclude=/usr/share/fonts/*",
        "--aptopt=Acquire::Languages \"none\"",
        "--aptopt=APT::Install-Recommends \"false\"",
    ]
    if Path(_MERGED_USR_HOOKS).is_dir():
        # merged /usr via usr-is-merged instead of the usrmerge package, which
        # would pull the whole of perl (~50 MB) into the image.
        argv.append(f"--hook-dir={_MERGED_USR_HOOKS}")
    if recipe.packages:
        argv.append("--include=" + ",".join(recipe.packages))
    if recipe.wheels:
        argv += _wheel_hooks(recipe, wheels or [])
    argv += [
        f"--customize-hook=printf '{pip_conf}' > \"$1/etc/pip.conf\"",
        # The runtime provides these per container; keep the image's copies
        # identical across build hosts.
        "--customize-hook=: > \"$1/etc/resolv.conf\"",
        "--customize-hook=echo localhost > \"$1/etc/hostname\"",
        ("--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/* "
         "\"$1\"/var/cache/debconf/*-old \"$1\"/var/lib/dpkg/*-old"),
        recipe.suite, "-", *sources,
    ]
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), LC_ALL="C.UTF-8")
    say("mmdebstrap: " + " ".join(recipe.packages) + " from " + ("; ".join(sources) or "default")
        + ("; then pip: " + " ".join(f"{w.project}=={w.version}" for w in recipe.wheels) if recipe.wheels else ""))
    log.debug("running %s", argv)

    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)

    def pump_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            say(line)

    reader = threading.Thread(target=pump_stderr, name="mmdebstrap-stderr", daemon=True)
    reader.start()
    error: BaseException | None = None
    try:
        assert proc.stdout is not None
        _filter_tar(proc.stdout, dest)
    except BaseException as exc:  # noqa: BLE001 - also ^C: stop mmdebstrap first
        error = exc
    finally:
        if error is not None and proc.poll() is None:
            # SIGTERM, not SIGKILL: mmdebstrap unmounts /proc, /sys, /dev of
            # its temporary chroot in its signal handler.
            proc.terminate()
        try:
            rc = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        reader.join(timeout=10)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if rc != 0 or error is not None:
        if isinstance(error, KeyboardInterrupt):
            raise error
        detail = "\n".join(tail)
        # A ReadError only echoes mmdebstrap dying before it wrote a tar.
        cause = f" ({error})" if error is not None and not isinstance(error, tarfile.ReadError) else ""
        raise ImageError(f"mmdebstrap failed with exit code {rc}{cause}; last lines:\n{detail}") from error


def _filter_tar(stream: IO[bytes], dest: Path) -> None:
    """Copy mmdebstrap's tar stream to ``dest``, dropping device nodes and /dev.

    The runtime builds a minimal /dev per container; image layers carry none
    (as Docker's images), so our store never sees a device node from us.
    mtimes are clamped (files written at build time, e.g. pip.conf).
    """
    with open(dest, "wb") as raw, \
            tarfile.open(fileobj=stream, mode="r|") as src, \
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
        for m in src:
            name = m.name.removeprefix("./")
            if m.ischr() or m.isblk() or m.isfifo():
                continue
            if name.startswith("dev/") and name != "dev/":
                continue
            m.pax_headers = {k: v for k, v in m.pax_headers.items() if k not in ("mtime", "atime", "ctime")}
            m.mtime = min(int(m.mtime), SOURCE_DATE_EPOCH)
            out.addfile(m, src.extractfile(m) if m.isreg() else None)


# ----------------------------------------------------------------- helpers

def _parse_one_line(text: str) -> Iterator[tuple[str, str, list[str]]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        rest = line[4:].strip()
        if rest.startswith("["):  # options such as [signed-by=...]
            rest = rest.split("]", 1)[1].strip() if "]" in rest else ""
        parts = rest.split()
        if len(parts) >= 2:
            yield parts[0], parts[1], parts[2:]


def _parse_deb822(text: str) -> Iterator[tuple[str, str, list[str]]]:
    stanzas: list[dict[str, str]] = [{}]
    last = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if stanzas[-1]:
                stanzas.append({})
            last = None
            continue
        if line[0] in " \t" and last:  # continuation line
            stanzas[-1][last] += " " + line.strip()
            continue
        if ":" in line:
            k, v = line.split(":", 1)
            last = k.strip().lower()
            stanzas[-1][last] = v.strip()
    for st in stanzas:
        if "deb" not in st.get("types", "").split() or st.get("enabled", "yes").lower() == "no":
            continue
        for uri in st.get("uris", "").split():
            for suite in st.get("suites", "").split():
                yield uri, suite, st.get("components", "").split()


def reporter(progress: Progress | None) -> Progress:
    """A progress callback that also logs each message at debug level."""
    def say(msg: str) -> None:
        log.debug("%s", msg)
        if progress is not None:
            progress(msg)
    return say


@contextlib.contextmanager
def locked(path: Path, say: Progress) -> Iterator[None]:
    """An exclusive lock on ``path`` (made if missing) for a build, saying so when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process building {path.name[1:-5]}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _jsonable(value: Any) -> Any:
    """Mappings/tuples -> plain dicts/lists so recipes hash and serialise stably."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


__all__ = [
    "BUSYBOX", "DEBIAN_KERNEL", "RootfsRecipe", "WIDGET_WHEELS", "Wheel",
    "build_rootfs_tar", "cached_rootfs_tar", "cached_wheels", "created_rfc3339",
    "default_cache_dir", "host_apt_sources", "suggested_image_config",
]
