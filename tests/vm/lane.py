"""The VM test lane's driver: the kernel-touching tests on Debian 12's own kernel with cgroup v2 only.

Owns the lane's cache (``/var/cache/jupyter-contain/vm``: Debian's ``linux-image`` 6.1
unpacked with ``dpkg-deb -x``, never installed into the host's /boot), the initramfs
(busybox-static, ``tests/vm/init.sh``, the modules that reach the disks), the scratch disk,
and one ``qemu-system-x86_64`` run under software emulation (``-accel tcg``: these machines
expose no vmx/svm). The guest runs the host's own root read-only over 9p (so the host's
``.venv`` and checkout run unchanged), ``tests/vm/guest.sh`` lays out cgroups as systemd does
and runs ``tests/vm/selection.txt`` under pytest, and the results come back through a
writable 9p share: ``junit.xml``, ``pytest.log``, ``guest.log``, ``rc``.

Must not touch the host beyond its cache and a temp folder: the guest cannot write to the
host's root (read-only share, and an overlay on top inside the guest).

``python tests/vm/lane.py prepare`` fetches and unpacks the kernel (scripts/setup runs it);
``python tests/vm/lane.py run`` runs the lane and exits with the guest's pytest code (the
guest's log is printed when it is not 0). ``scripts/test-vm`` is the short way.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("vm-lane")

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("JC_VM_CACHE", "/var/cache/jupyter-contain/vm"))
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")
#: the modules init.sh loads (and what they depend on, from modules.dep)
INITRD_MODULES = ("virtio_pci", "virtio_blk", "9pnet_virtio", "9p", "crc32c_generic", "ext4", "overlay")
#: a whole lane measured 10-12 min here under TCG on 2 busy cores; past this the guest is stuck
DEFAULT_TIMEOUT = 25 * 60
SUBID_USER = "jc-rootless"


def kernel_version(cache: Path = CACHE) -> str | None:
    mods = cache / "tree" / "lib" / "modules"
    versions = sorted(p.name for p in mods.iterdir()) if mods.is_dir() else []
    return versions[-1] if versions else None


def available() -> str | None:
    """Why the lane cannot run here (None: it can)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is missing (scripts/setup installs qemu-system-x86)"
    if not BUSYBOX.is_file():
        return "busybox-static is missing"
    if kernel_version() is None:
        return f"no Debian kernel in {CACHE} (run: python tests/vm/lane.py prepare)"
    return None


def prepare(cache: Path = CACHE) -> str:
    """Download Debian's current 6.1 kernel package and unpack it into ``cache/tree`` (once)."""
    have = kernel_version(cache)
    if have and (cache / "tree" / "boot" / f"vmlinuz-{have}").is_file() and \
            (cache / "tree" / "lib" / "modules" / have / "modules.dep").is_file():
        return have
    cache.mkdir(parents=True, exist_ok=True)
    def kernel_package() -> str | None:
        dep = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True, text=True,
                             check=False)
        return next((ln.split(":", 1)[1].strip() for ln in dep.stdout.splitlines()
                     if ln.strip().startswith("Depends:") and "linux-image-" in ln), None)

    pkg = kernel_package()
    if pkg is None:   # a machine whose package lists were never fetched
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        pkg = kernel_package()
    if pkg is None:
        raise SystemExit("apt-cache names no kernel package for linux-image-amd64 (is this Debian 12?)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run(["apt-get", "download", "-q", pkg], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        deb = next(Path(tmp).glob("*.deb"))
        staging = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True)
        version = next((staging / "lib" / "modules").iterdir()).name
        # Debian's package has no modules.dep (its postinst runs depmod): busybox's depmod makes
        # one for busybox's modprobe, which loads modules in the guest
        subprocess.run([str(BUSYBOX), "depmod", "-b", str(staging), version], check=True)
        if (cache / "tree").exists():
            shutil.rmtree(cache / "tree")
        staging.rename(cache / "tree")
    log.info("kernel %s unpacked in %s", version, cache / "tree")
    return version


def _module_closure(modroot: Path, names: tuple[str, ...]) -> list[str]:
    """modules.dep paths of ``names`` and everything they depend on."""
    deps: dict[str, list[str]] = {}
    for line in (modroot / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.removesuffix(".ko").replace("-", "_"): p for p in deps}
    out: list[str] = []
    todo = [by_name[n.replace("-", "_")] for n in names]
    while todo:
        p = todo.pop()
        if p not in out:
            out.append(p)
            todo.extend(deps[p])
    return out


def build_initrd(work: Path, version: str) -> Path:
    """An uncompressed newc cpio: busybox, init.sh and the modules init.sh loads."""
    root = work / "initrd"
    modroot = CACHE / "tree" / "lib" / "modules" / version
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    shutil.copy2(HERE / "init.sh", root / "init")
    (root / "init").chmod(0o755)
    dst = root / "lib" / "modules" / version
    for rel in _module_closure(modroot, INITRD_MODULES):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(modroot / rel, dst / rel)
    for f in ("modules.dep", "modules.alias", "modules.symbols", "modules.builtin"):
        if (modroot / f).exists():
            shutil.copy2(modroot / f, dst / f)
    out = work / "initrd.cpio"
    files = subprocess.run(["find", "."], cwd=root, capture_output=True, check=True).stdout
    with open(out, "wb") as f:
        subprocess.run([str(BUSYBOX), "cpio", "-o", "-H", "newc"], cwd=root, input=files, stdout=f,
                       stderr=subprocess.DEVNULL, check=True)
    return out


def run(*, timeout: int = DEFAULT_TIMEOUT, memory_mib: int = 3072, cpus: int = 2, keep: bool = False,
        select: list[str] | None = None, pytest_args: str = "", native: Path | None = None) -> int:
    why = available()
    if why:
        print(f"vm-lane: cannot run: {why}", file=sys.stderr)
        return 2
    version = kernel_version()
    assert version is not None
    work = Path(tempfile.mkdtemp(prefix="jc-vm-lane-"))
    try:
        results = work / "results"
        results.mkdir()
        if select:
            (results / "selection.txt").write_text("\n".join(select) + "\n")
        if pytest_args:
            (results / "pytest-args").write_text(pytest_args)
        if native is not None:
            shutil.copy2(native, results / "_native.abi3.so")
        initrd = build_initrd(work, version)
        scratch = work / "scratch.img"
        with open(scratch, "wb") as f:
            f.truncate(8 << 30)   # sparse: only what the guest writes takes disk space
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1", str(scratch)],
                       check=True)
        cmdline = " ".join([
            "console=ttyS0", "panic=-1", "loglevel=3",
            # the unified hierarchy only, as every current distribution has it
            "cgroup_no_v1=all", "systemd.unified_cgroup_hierarchy=1",
            f"jc.repo={REPO}", f"jc.cache={CACHE}", f"jc.user={SUBID_USER}",
            f"jc.timeout={max(60, timeout - 120)}",
        ])
        argv = [
            QEMU, "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(cpus), "-m", str(memory_mib),
            "-nodefaults", "-no-reboot", "-display", "none", "-monitor", "none",
            "-serial", f"file:{work / 'console.log'}",
            "-kernel", str(CACHE / "tree" / "boot" / f"vmlinuz-{version}"), "-initrd", str(initrd),
            "-append", cmdline,
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={results},mount_tag=results,security_model=none",
            "-drive", f"file={scratch},if=virtio,format=raw,cache=unsafe",
        ]
        print(f"vm-lane: booting Debian's {version} under TCG ({cpus} cpus, {memory_mib} MiB), "
              f"timeout {timeout} s", flush=True)
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        shown = 0
        timed_out = False
        while proc.poll() is None:
            time.sleep(2)
            shown = _follow(results / "pytest.log", shown)
            if time.monotonic() - t0 > timeout:
                timed_out = True
                proc.kill()
                proc.wait()
        _follow(results / "pytest.log", shown)
        took = time.monotonic() - t0
        rc_file = results / "rc"
        rc = int(rc_file.read_text().strip()) if rc_file.is_file() else 3
        print(f"vm-lane: guest finished in {took:.0f} s, pytest exit code {rc}"
              + (" (timed out)" if timed_out else ""), flush=True)
        if rc != 0 or timed_out:
            for name in ("console.log",):
                _dump(work / name)
            _dump(results / "guest.log")
            rc = rc or 3
        if keep or os.environ.get("JC_VM_KEEP"):
            print(f"vm-lane: results kept in {work}")
            keep = True
        return rc
    finally:
        if not keep and not os.environ.get("JC_VM_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


def _follow(path: Path, shown: int) -> int:
    """Print what the guest's pytest wrote since ``shown`` bytes; the new offset."""
    try:
        with open(path, "rb") as f:
            f.seek(shown)
            data = f.read()
    except FileNotFoundError:
        return shown
    if data:
        sys.stdout.write(data.decode(errors="replace"))
        sys.stdout.flush()
    return shown + len(data)


def _dump(path: Path, tail: int = 200) -> None:
    if path.is_file():
        lines = path.read_text(errors="replace").splitlines()
        print(f"--- {path.name} (last {min(tail, len(lines))} lines) ---")
        print("\n".join(lines[-tail:]))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch and unpack Debian's kernel into the lane's cache")
    r = sub.add_parser("run", help="run the lane")
    r.add_argument("--timeout", type=int, default=DEFAULT_TIMEOUT)
    r.add_argument("--memory", type=int, default=3072, help="guest memory, MiB")
    r.add_argument("--keep", action="store_true", help="keep the work folder (console log, results)")
    r.add_argument("--select", action="append", help="a test (file, ::node) instead of tests/vm/selection.txt")
    r.add_argument("--pytest-args", default="", help="more pytest arguments, e.g. '-x -k oom'")
    r.add_argument("--native", type=Path, help="a built _native.abi3.so to try in the guest instead of the checkout's")
    sub.add_parser("available", help="exit 0 if the lane can run here, else say why")
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        print(prepare())
        return 0
    if args.cmd == "available":
        why = available()
        if why:
            print(why)
        return 1 if why else 0
    return run(timeout=args.timeout, memory_mib=args.memory, keep=args.keep, select=args.select,
               pytest_args=args.pytest_args, native=args.native)


if __name__ == "__main__":
    sys.exit(main())
