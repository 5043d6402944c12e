"""Build an image from a Containerfile: plan the stages, run each step, cache, tag at the end.

Owns the build's semantics (Docker's, as BuildKit's dockerfile frontend
implements them): stages (``FROM ... AS``, ``scratch``, ``--target``; only
the stages the target needs are built), ARG scoping (before the first FROM:
for FROM lines; inside a stage once declared; build args over defaults; ENV
wins over an ARG of the same name), the config changes of metadata
instructions (history entries with ``empty_layer``), RUN in one of our
containers (its writable layer committed as the step's layer with the
snapshot code), COPY/ADD written as a layer without a container, ONBUILD
triggers of a base image, and the layer cache (:mod:`.cache`).

Must not: tag anything before the last step succeeded (a failed build
leaves no image and no tag: only committed blobs of completed steps, which
the cache names and ``gc`` removes when nothing does), leave a container
behind (each RUN container is removed whatever happens), read the context
other than through :mod:`.context`, or import the kernel/server rooms.

Steps are planned before any runs (:func:`plan`: stages, which are needed,
syntax of every instruction), so a syntax error or an unknown stage fails
before the first container starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import posixpath
import re
import stat
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ... import errors
from ...errors import BuildError, BuildStepFailed
from ..images.store import ImageRecord, Store, now_rfc3339, remove_tree
from ..spec import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    Descriptor,
    Manifest,
    Platform,
    Reference,
    canonical_json,
    local_name,
    sha256_digest,
)
from . import files as filesmod
from .cache import BuildCache, CacheEntry, step_key
from .context import ContextTree, Entry, IgnoreRules, ImageTree, load_ignore
from .parser import (
    Containerfile,
    Instruction,
    expand,
    expand_heredoc,
    expand_words,
    parse,
    parse_instruction,
    parse_key_values,
    split_words,
)

if TYPE_CHECKING:
    from ..containers.container import Container, Runtime

log = logging.getLogger(__name__)

DEFAULT_SHELL = ("/bin/sh", "-c")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: build args every build accepts without an ARG (Docker's predefined ones; not kept in history)
PREDEFINED_ARGS = frozenset({"HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY", "ftp_proxy",
                             "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"})
LABEL_CONTAINERFILE = "io.jupyter-contain.build.containerfile.digest"
LABEL_BUILD_ARGS = "io.jupyter-contain.build.args"
#: the tail of a failed RUN's output an error keeps
_OUTPUT_TAIL = 64 << 10
#: where a RUN heredoc with a #! line is bound in (the runtime's own tree: never part of a layer)
HEREDOC_DIR = "/.jupyter-contain/build-heredoc"
#: largest ADD download (a URL is untrusted: a server could stream forever)
MAX_DOWNLOAD = 8 << 30
Network = Literal["none", "host", "bridge"]
PullPolicy = Literal["missing", "always", "never"]


# --- options, events, results ---------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    """What to build. ``containerfile``: a path (default ``Containerfile`` or ``Dockerfile`` in the
    context); ``containerfile_text``: the text itself (``-f -``, a notebook cell)."""

    context: Path
    containerfile: Path | None = None
    containerfile_text: bytes | None = None
    tags: tuple[str, ...] = ()
    build_args: Mapping[str, str] = field(default_factory=dict)
    target: str | None = None
    network: Network = "none"
    no_cache: bool = False
    pull: PullPolicy = "missing"
    platform: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.network not in ("none", "host", "bridge"):
            raise BuildError(f"unknown network mode {self.network!r} (none, bridge or host)")
        if self.pull not in ("missing", "always", "never"):
            raise BuildError(f"unknown pull policy {self.pull!r} (missing, always or never)")
        for t in self.tags:
            ref = local_name(t)   # InvalidReference for a malformed name
            if ref.digest:
                raise BuildError(f"cannot tag a build by digest: {t!r}")
        if self.platform is not None and not Platform.parse(self.platform).matches(Platform.host()):
            raise BuildError(f"cannot build for {self.platform}: this machine runs {Platform.host()} "
                             "and builds run no emulation")
        for k in self.build_args:
            if not k or "=" in k:
                raise BuildError(f"invalid build arg name {k!r}")


class Reporter:
    """What a build tells as it goes; the CLI, the magic and the API give their own.

    An exception raised by ``step`` or ``done`` stops the build at that step boundary with
    the undo of any failure (no tag, no container): the REST API's cancel works so.
    """

    def step(self, n: int, total: int, stage: str, text: str) -> None:
        """A step begins."""

    def done(self, *, cached: bool, seconds: float, layer: Descriptor | None) -> None:
        """The step just begun ended (``cached``: from the cache, nothing ran)."""

    def output(self, data: bytes) -> None:
        """Live output of a RUN step."""

    def note(self, text: str) -> None:
        """Anything else worth a line (warnings, the commit)."""


@dataclass(frozen=True)
class BuildResult:
    image_id: str                 # the config digest (Docker's image id)
    digest: str                   # the manifest digest
    names: tuple[str, ...]        # the tags it got
    steps: int
    cached: int
    seconds: float
    record: ImageRecord | None = None


# --- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    index: int
    name: str | None              # the AS name, lower case
    base: str                     # the FROM text (unexpanded)
    from_ins: Instruction
    steps: tuple[Instruction, ...]


@dataclass(frozen=True)
class Plan:
    containerfile: Containerfile
    global_args: tuple[Instruction, ...]
    stages: tuple[Stage, ...]
    needed: tuple[int, ...]       # stage indices to build, in order
    target: int


def _from_parts(ins: Instruction) -> tuple[str, str | None]:
    words = split_words(ins.text, "\\")
    if len(words) == 3 and words[1].lower() == "as":
        name = words[2].lower()
        if not re.fullmatch(r"[a-z][a-z0-9._-]*", name):
            raise ins.error(f"invalid name for build stage: {words[2]!r}, name can't start with a number or "
                            "contain symbols")
        return words[0], name
    if len(words) != 1:
        raise ins.error("FROM requires either one or three arguments (FROM IMAGE [AS NAME])")
    return words[0], None


def plan(cf: Containerfile, *, target: str | None = None) -> Plan:
    """Stages and what the target needs; every instruction checked before anything runs."""
    global_args: list[Instruction] = []
    stages: list[Stage] = []
    cur: list[Instruction] | None = None
    from_ins: Instruction | None = None
    names: dict[str, int] = {}
    for ins in cf.instructions:
        if ins.keyword == "FROM":
            if cur is not None and from_ins is not None:
                base, name = _from_parts(from_ins)
                stages.append(Stage(len(stages), name, base, from_ins, tuple(cur)))
            base, name = _from_parts(ins)
            if name is not None:
                if name in names:
                    raise ins.error(f"duplicate stage name {name!r}")
                names[name] = len(stages) + (1 if cur is not None else 0)
            cur, from_ins = [], ins
        elif cur is None:
            if ins.keyword != "ARG":
                raise ins.error("no build stage in current context: the first instruction must be FROM "
                                "(only ARG may come before it)")
            global_args.append(ins)
        else:
            cur.append(ins)
    if cur is None or from_ins is None:
        raise BuildError("the Containerfile has no FROM instruction", file=cf.file)
    base, name = _from_parts(from_ins)
    stages.append(Stage(len(stages), name, base, from_ins, tuple(cur)))
    names = {s.name: s.index for s in stages if s.name}
    if target is not None:
        t = names.get(target.lower())
        if t is None:
            raise BuildError(f"target stage {target!r} could not be found", file=cf.file)
    else:
        t = len(stages) - 1

    def refs(stage: Stage) -> set[int]:
        out = set()
        cands = [stage.base]
        for ins in stage.steps:
            if ins.keyword in ("COPY", "ADD") and ins.flag("from"):
                cands.append(ins.flag("from") or "")
            if ins.keyword == "RUN":
                for m in ins.flag_all("mount"):
                    for kv in m.split(","):
                        k, _, v = kv.partition("=")
                        if k == "from":
                            cands.append(v)
        for c in cands:
            c = c.lower()
            if c in names and names[c] < stage.index:
                out.add(names[c])
            elif c.isdigit() and int(c) < stage.index:
                out.add(int(c))
        return out

    needed = {t}
    todo = [t]
    while todo:
        for r in refs(stages[todo.pop()]):
            if r not in needed:
                needed.add(r)
                todo.append(r)
    for s in stages:
        for ins in s.steps:
            _check(ins)
    return Plan(cf, tuple(global_args), tuple(stages), tuple(sorted(needed)), t)


def _check(ins: Instruction) -> None:
    """Checks a step's syntax that the parser leaves to the builder."""
    if ins.keyword in ("ENV", "LABEL"):
        parse_key_values(ins)
    elif ins.keyword == "HEALTHCHECK":
        words = split_words(ins.text)
        if not words or words[0].upper() not in ("NONE", "CMD"):
            raise ins.error("HEALTHCHECK takes NONE or CMD ...")
        for f in ("interval", "timeout", "start-period", "start-interval"):
            if ins.flag(f) is not None:
                _duration(ins, ins.flag(f) or "")
    elif ins.keyword == "RUN":
        for m in ins.flag_all("mount"):
            _parse_mount(ins, m)
        net = ins.flag("network")
        if net is not None and net not in ("none", "host", "default"):
            raise ins.error(f"unknown network mode {net!r} (none, host or default)")
        if ins.flag("security") not in (None, "sandbox"):
            raise ins.error("--security=insecure is not supported: build steps always run sandboxed")
    elif ins.keyword in ("COPY", "ADD") and ins.flag("chmod") is not None:
        _chmod(ins)


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")


def _duration(ins: Instruction, text: str) -> int:
    """A Go duration (``30s``, ``1m30s``, ``500ms``) in nanoseconds."""
    units = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    pos = 0
    total = 0.0
    for m in _DURATION_RE.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ins.error(f"invalid duration {text!r}")
    return int(total)


def _chmod(ins: Instruction) -> int:
    v = ins.flag("chmod") or ""
    if not re.fullmatch(r"[0-7]{3,4}", v):
        raise ins.error(f"invalid --chmod={v}: an octal mode such as 0755 (symbolic modes are not supported)")
    return int(v, 8)


@dataclass(frozen=True)
class Mount:
    type: str
    target: str
    source: str = ""
    id: str = ""
    sharing: str = "shared"
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    readonly: bool = False
    size: int = 64 << 20
    from_: str = ""


def _parse_mount(ins: Instruction, text: str) -> Mount:
    fields: dict[str, str] = {}
    for kv in text.split(","):
        k, eq, v = kv.partition("=")
        fields[k.strip().lower()] = v.strip() if eq else "true"
    kind = fields.pop("type", "bind")
    target = fields.pop("target", fields.pop("dst", fields.pop("destination", "")))
    if kind not in ("cache", "tmpfs", "bind"):
        raise ins.error(f"--mount=type={kind} is not supported (cache, tmpfs and bind are; "
                        "secrets and ssh need a secret store this builder does not have)")
    if not target or not target.startswith("/"):
        raise ins.error(f"--mount needs an absolute target (got {target!r})")
    ro = fields.pop("ro", fields.pop("readonly", "false")).lower() in ("true", "1", "")
    rw = fields.pop("rw", fields.pop("readwrite", "false")).lower() in ("true", "1", "")
    try:
        mode = int(fields.pop("mode", "0755"), 8)
        uid = int(fields.pop("uid", "0"))
        gid = int(fields.pop("gid", "0"))
        size = int(fields.pop("size", str(64 << 20)))
    except ValueError:
        raise ins.error(f"--mount={text}: mode, uid, gid and size are numbers") from None
    m = Mount(kind, posixpath.normpath(target), source=fields.pop("source", fields.pop("src", "")),
              id=fields.pop("id", ""), sharing=fields.pop("sharing", "shared"), mode=mode, uid=uid, gid=gid,
              readonly=ro if kind == "cache" else not rw, size=size, from_=fields.pop("from", ""))
    if m.sharing not in ("shared", "private", "locked"):
        raise ins.error(f"--mount sharing={m.sharing}: shared, private or locked")
    if kind == "bind" and not m.readonly:
        raise ins.error("--mount=type=bind,rw is not supported: a bind of the context is read-only here")
    if kind == "bind" and m.from_:
        raise ins.error("--mount=type=bind,from=... is not supported (a stage has no single host folder); "
                        "COPY --from instead")
    if fields:
        raise ins.error(f"--mount: unknown option(s) {', '.join(sorted(fields))}")
    return m


# --- the state of a stage -------------------------------------------------------------------------


def _env_map(env: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in env:
        k, _, v = e.partition("=")
        out[k] = v
    return out


@dataclass
class _State:
    """A stage being built: its image config (OCI, with rootfs and history) and layers."""

    config: dict[str, Any]
    layers: list[Descriptor]
    base_name: str = ""
    args: dict[str, str] = field(default_factory=dict)   # ARGs declared in this stage, with their values
    shell: tuple[str, ...] = DEFAULT_SHELL
    cmd_from_base: bool = True

    @property
    def inner(self) -> dict[str, Any]:
        return self.config.setdefault("config", {})

    @property
    def env(self) -> dict[str, str]:
        return _env_map(self.inner.get("Env") or [])

    def expand_env(self) -> dict[str, str]:
        """What ``$VAR`` sees: declared args, with ENV over them."""
        out = dict(self.args)
        out.update(self.env)
        return out

    @property
    def diff_ids(self) -> list[str]:
        return list(self.config["rootfs"]["diff_ids"])

    def digest(self) -> str:
        return sha256_digest(canonical_json(self.config))

    def set_env(self, key: str, value: str) -> None:
        env = list(self.inner.get("Env") or [])
        for i, e in enumerate(env):
            if e.partition("=")[0] == key:
                env[i] = f"{key}={value}"
                break
        else:
            env.append(f"{key}={value}")
        self.inner["Env"] = env

    def add_history(self, created_by: str, *, empty: bool, created: str) -> None:
        entry: dict[str, Any] = {"created": created, "created_by": created_by, "comment": "jupyter-contain build"}
        if empty:
            entry["empty_layer"] = True
        self.config["history"] = list(self.config.get("history") or []) + [entry]
        self.config["created"] = created

    def add_layer(self, desc: Descriptor, diff_id: str) -> None:
        self.layers.append(desc)
        self.config["rootfs"] = {"type": "layers", "diff_ids": self.diff_ids + [diff_id]}


def _scratch() -> dict[str, Any]:
    p = Platform.host()
    return {"architecture": p.architecture, "os": p.os, "config": {"Env": [f"PATH={DEFAULT_PATH}"]},
            "rootfs": {"type": "layers", "diff_ids": []}, "history": []}


# --- the build ------------------------------------------------------------------------------------


class _Build:
    def __init__(self, runtime: Runtime | None, store: Store, options: BuildOptions, reporter: Reporter) -> None:
        self._rt = runtime
        self.store = store
        self.opt = options
        self.rep = reporter
        self.cache = BuildCache(self.store)
        self.used_args: set[str] = set()
        self.stages: dict[int, _State] = {}
        self.stack = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="build-", dir=self.store.tmp_dir))
        self.stack.callback(remove_tree, self.tmp)
        self.cached = self.ran = 0
        self._pool: Any = None
        self._removing: list[Any] = []
        self.file_hashes = self.cache.file_hashes()
        self._hashes_known = len(self.file_hashes)

    @property
    def rt(self) -> Runtime:
        """The container runtime, made on the first RUN: a build from the cache never loads it
        (the container modules are about 100 ms of a CLI start)."""
        if self._rt is None:
            from ..containers.container import Runtime
            self._rt = Runtime(self.store)
        return self._rt

    # containerfile ------------------------------------------------------------------

    def load(self) -> Containerfile:
        ctx = self.opt.context
        if not ctx.is_dir():
            raise BuildError(f"build context {ctx} is not a folder")
        if self.opt.containerfile_text is not None:
            text, name = self.opt.containerfile_text, "Containerfile"
            if self.opt.containerfile is not None:
                name = str(self.opt.containerfile)
        else:
            path = self.opt.containerfile
            if path is None:
                for cand in ("Containerfile", "Dockerfile"):
                    if (ctx / cand).is_file():
                        path = ctx / cand
                        break
                else:
                    raise BuildError(f"no Containerfile or Dockerfile in {ctx} (give one with -f)")
            elif not path.is_absolute() and not path.exists():
                path = ctx / path
            try:
                with open(path, "rb") as f:
                    text = f.read(8 << 20)
            except OSError as e:
                raise BuildError(f"cannot read {path}: {e.strerror}") from None
            name = str(path)
        self.cf_bytes = text
        self.cf_name = name
        return parse(text, file=name)

    # images ------------------------------------------------------------------------

    def _image(self, text: str, ins: Instruction) -> ImageRecord:
        platform = Platform.parse(self.opt.platform) if self.opt.platform else None
        if self.opt.pull != "always":
            try:
                return self.store.resolve(text)
            except errors.ImageNotFound:
                if self.opt.pull == "never":
                    raise ins.error(f"image {text!r} is not in the store and --pull=never") from None
        self.rep.note(f"pulling {text}")
        from ..images import registry  # requests and TLS: only when a pull is needed
        try:
            return registry.pull(self.store, text, platform=platform)
        except errors.ContainError as e:
            raise ins.error(f"cannot pull {text!r}: {e}") from None

    def _state_from(self, rec: ImageRecord) -> _State:
        cfg = json.loads(json.dumps(rec.config.raw))
        cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        cfg["history"] = list(cfg.get("history") or [])
        shell = tuple((cfg.get("config") or {}).get("Shell") or DEFAULT_SHELL)
        return _State(cfg, list(rec.manifest.oci_form().layers), base_name=rec.name, shell=shell)

    def _record(self, st: _State, name: str = "build-step") -> ImageRecord:
        """The stage as an (untagged) image in the store: what a RUN container starts from."""
        cfg_bytes = canonical_json(st.config)
        cfg_digest = sha256_digest(cfg_bytes)
        if not self.store.has_blob(cfg_digest):   # (a cached rebuild has them all: no fsyncs)
            self.store.write_blob(cfg_bytes, expected_digest=cfg_digest, what="image config")
        manifest = Manifest(OCI_MANIFEST, Descriptor(OCI_CONFIG, cfg_digest, len(cfg_bytes)), tuple(st.layers), {})
        m_bytes = canonical_json(manifest.to_json())
        m_digest = sha256_digest(m_bytes)
        if not self.store.has_blob(m_digest):
            self.store.write_blob(m_bytes, expected_digest=m_digest, what="manifest")
        return self.store.record(f"localhost/{name}:{m_digest[7:19]}", m_digest)

    def _lowers(self, st: _State) -> list[Path]:
        """The stage's unpacked layers, topmost first (unpacked now if needed)."""
        if not st.layers:
            return []
        return self.store.ensure_unpacked(self._record(st))

    # the run ---------------------------------------------------------------------------

    def run(self) -> BuildResult:
        t0 = time.monotonic()
        cf = self.load()
        p = plan(cf, target=self.opt.target)
        self.plan = p
        ignore = load_ignore(self.opt.context, posixpath.basename(self.cf_name)
                             if self.opt.containerfile is not None else None)
        self.ctx = self.stack.enter_context(ContextTree(self.opt.context, ignore))
        self.escape = cf.escape
        # global args: for FROM lines (and re-declared ARGs inside stages)
        # BuildKit's automatic platform args: in FROM lines, and in a stage once declared (ARG TARGETARCH)
        self.global_args: dict[str, str] = _platform_args()
        for ins in p.global_args:
            self._declare(ins, self.global_args, self.global_args)
        total = sum(1 + len(p.stages[i].steps) for i in p.needed)
        n = 0
        for i in p.needed:
            stage = p.stages[i]
            n += 1
            st = self._from(stage, n, total)
            self.stages[i] = st
            for ins in stage.steps:
                n += 1
                self._step(stage, st, ins, n, total)
            self._ensure_workdir(st)
        final = self.stages[p.target]
        unused = set(self.opt.build_args) - self.used_args - PREDEFINED_ARGS
        if unused:
            self.rep.note(f"[Warning] one or more build args were not consumed: {', '.join(sorted(unused))}")
        result = self._commit(final, t0)
        if len(self.file_hashes) != self._hashes_known:
            self.cache.save_file_hashes(self.file_hashes)
        return result

    def _remover(self) -> Any:
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="jc-build-rm")
        return self._pool

    def close(self) -> None:
        try:
            for f in self._removing:
                exc = f.exception()
                if exc is not None:   # gc finds what is left (its creator, this process, will be gone)
                    log.warning("could not remove a build container: %s", exc)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self.stack.close()

    # FROM ----------------------------------------------------------------------------

    def _from(self, stage: Stage, n: int, total: int) -> _State:
        ins = stage.from_ins
        self.rep.step(n, total, stage.name or str(stage.index), ins.original)
        t = time.monotonic()
        text = expand(stage.base, self.global_args, escape=self.escape, fail=ins.error, used=self.used_args)
        plat = ins.flag("platform")
        if plat is not None:
            want = expand(plat, self.global_args, escape=self.escape, fail=ins.error)
            try:
                ok = Platform.parse(want).matches(Platform.host())
            except errors.InvalidReference as e:
                raise ins.error(str(e)) from None
            if not ok:
                raise ins.error(f"--platform={want}: this machine runs {Platform.host()} and builds run no emulation")
        if not text:
            raise ins.error(f"base name ({stage.base}) should not be blank")
        names = {s.name: s.index for s in self.plan.stages if s.name}
        if text.lower() in names and names[text.lower()] < stage.index:
            src = self.stages[names[text.lower()]]
            st = _State(json.loads(json.dumps(src.config)), list(src.layers), base_name=src.base_name,
                        shell=src.shell)
        elif text == "scratch":
            st = _State(_scratch(), [])
        else:
            rec = self._image(text, ins)
            st = self._state_from(rec)
            triggers = list(st.inner.get("OnBuild") or [])
            if triggers:
                st.inner["OnBuild"] = None
                self.rep.done(cached=False, seconds=time.monotonic() - t, layer=None)
                for trig in triggers:
                    sub = parse_instruction(trig, file=ins.file, line=ins.line, escape=self.escape)
                    _check(sub)
                    self.rep.note(f"executing ONBUILD trigger: {trig}")
                    self._step(stage, st, sub, n, total, announce=False)
                return st
        self.rep.done(cached=False, seconds=time.monotonic() - t, layer=None)
        return st

    # ARG ----------------------------------------------------------------------------

    def _declare(self, ins: Instruction, into: dict[str, str], scope: Mapping[str, str]) -> list[str]:
        out = []
        for w in split_words(ins.text, self.escape):
            name, eq, default = w.partition("=")
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ins.error(f"invalid ARG name {name!r}")
            if name in self.opt.build_args:
                value: str | None = self.opt.build_args[name]
                self.used_args.add(name)
            elif eq:
                value = expand(default, scope, escape=self.escape, fail=ins.error)
            elif name in self.global_args:
                value = self.global_args[name]
            else:
                value = None
            if value is not None:
                into[name] = value   # else declared without a value: unset, "$NAME" expands to nothing
            out.append(name)
        return out

    # steps ------------------------------------------------------------------------------

    def _step(self, stage: Stage, st: _State, ins: Instruction, n: int, total: int, *, announce: bool = True) -> None:
        if announce:
            self.rep.step(n, total, stage.name or str(stage.index), ins.original)
        t = time.monotonic()
        kw = ins.keyword
        created = now_rfc3339()
        if kw in ("RUN", "COPY", "ADD"):
            self._layer_step(stage, st, ins, created, t)
            return
        parent = st.digest()
        if kw == "ARG":
            self._declare(ins, st.args, st.expand_env())
        else:
            self._metadata(st, ins)
        # cached too, though nothing runs: the step's config (its history entry's time) is the next
        # step's parent, so a metadata step made anew would miss the cache for every step after it
        key = step_key(parent=parent, instruction=ins.original, args=st.args, extra={"kind": "metadata"})
        hit = None if self.opt.no_cache else self.cache.get(key)
        if hit is not None:
            st.config = json.loads(json.dumps(hit.config))
            self.cached += 1
        else:
            st.add_history(ins.original, empty=True, created=created)
            self.cache.put(key, CacheEntry(json.loads(json.dumps(st.config))))
            self.ran += 1
        self.rep.done(cached=hit is not None, seconds=time.monotonic() - t, layer=None)

    def _metadata(self, st: _State, ins: Instruction) -> None:
        kw = ins.keyword
        env = st.expand_env()
        x = self._expander(env, ins)
        cfg = st.inner
        if kw == "ENV":
            for k, v in parse_key_values(ins, escape=self.escape):
                st.set_env(x(k), x(v))   # all values of one ENV see the values before it
        elif kw == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            for k, v in parse_key_values(ins, escape=self.escape):
                labels[x(k)] = x(v)
            cfg["Labels"] = labels
        elif kw == "USER":
            cfg["User"] = x(ins.text.strip())
        elif kw == "WORKDIR":
            # the folder is made when a step needs it (a RUN) or at the stage's end, if no COPY made
            # it first: what buildah does, so a COPY --chown into a new WORKDIR owns it, as in podman
            wd = x(ins.text.strip())
            if not wd:
                raise ins.error("WORKDIR needs a path")
            if not wd.startswith("/"):
                wd = posixpath.join(cfg.get("WorkingDir") or "/", wd)
            cfg["WorkingDir"] = posixpath.normpath(wd)
        elif kw == "CMD":
            cfg["Cmd"] = list(ins.exec_form) if ins.exec_form is not None else [*st.shell, ins.text]
            st.cmd_from_base = False
        elif kw == "ENTRYPOINT":
            cfg["Entrypoint"] = list(ins.exec_form) if ins.exec_form is not None else [*st.shell, ins.text]
            if st.cmd_from_base:
                cfg["Cmd"] = None   # Docker: an ENTRYPOINT resets a CMD inherited from the base
        elif kw == "SHELL":
            assert ins.exec_form is not None
            if not ins.exec_form:
                raise ins.error("SHELL needs at least one word")
            st.shell = ins.exec_form
            cfg["Shell"] = list(ins.exec_form)
        elif kw == "EXPOSE":
            ports = dict(cfg.get("ExposedPorts") or {})
            for w in expand_words(ins.text, env, escape=self.escape, fail=ins.error, used=self.used_args):
                for p in _ports(ins, w):
                    ports[p] = {}
            cfg["ExposedPorts"] = ports
        elif kw == "VOLUME":
            vols = dict(cfg.get("Volumes") or {})
            words = [x(w) for w in ins.exec_form] if ins.exec_form is not None else \
                expand_words(ins.text, env, escape=self.escape, fail=ins.error, used=self.used_args)
            for w in words:
                if not w.strip():
                    raise ins.error("VOLUME specified can not be an empty string")
                vols[w] = {}
            cfg["Volumes"] = vols
        elif kw == "STOPSIGNAL":
            sig = x(ins.text.strip())
            if not re.fullmatch(r"(SIG)?[A-Z0-9+\-]+|\d+", sig):
                raise ins.error(f"invalid signal {sig!r}")
            cfg["StopSignal"] = sig
        elif kw == "HEALTHCHECK":
            words = split_words(ins.text)
            if words[0].upper() == "NONE":
                cfg["Healthcheck"] = {"Test": ["NONE"]}
            else:
                rest = ins.text.strip()[len(words[0]):].strip()
                sub_exec = None
                if rest.startswith("["):
                    try:
                        doc = json.loads(rest)
                        if isinstance(doc, list) and all(isinstance(w, str) for w in doc):
                            sub_exec = doc
                    except ValueError:
                        pass
                hc: dict[str, Any] = {"Test": ["CMD", *sub_exec] if sub_exec is not None else ["CMD-SHELL", rest]}
                for flag, key in (("interval", "Interval"), ("timeout", "Timeout"), ("start-period", "StartPeriod"),
                                  ("start-interval", "StartInterval")):
                    if ins.flag(flag) is not None:
                        hc[key] = _duration(ins, ins.flag(flag) or "")
                if ins.flag("retries") is not None:
                    try:
                        hc["Retries"] = int(ins.flag("retries") or "")
                    except ValueError:
                        raise ins.error("--retries takes a number") from None
                cfg["Healthcheck"] = hc
        elif kw == "ONBUILD":
            cfg["OnBuild"] = list(cfg.get("OnBuild") or []) + [ins.text.strip()]
        elif kw == "MAINTAINER":
            st.config["author"] = x(ins.text.strip())
        else:   # pragma: no cover - the parser knows every keyword
            raise ins.error("not supported")

    def _expander(self, env: Mapping[str, str], ins: Instruction) -> Callable[[str], str]:
        def x(word: str) -> str:
            return expand(word, env, escape=self.escape, fail=ins.error, used=self.used_args)
        return x

    # steps that make layers -------------------------------------------------------------

    def _layer_step(self, stage: Stage, st: _State, ins: Instruction, created: str, t: float) -> None:
        kw = ins.keyword
        content = ""
        extra: dict[str, Any] = {}
        work: Callable[[], tuple[Descriptor, str] | None]
        env = st.expand_env()
        if kw == "RUN":
            self._ensure_workdir(st)   # the step's parent: the folder made, if it had to be
            argv = self._run_argv(st, ins, env)
            mounts = tuple(_parse_mount(ins, m) for m in ins.flag_all("mount"))
            net = ins.flag("network")
            network: Network = self.opt.network if net in (None, "default") else ("host" if net == "host" else "none")
            extra = {"argv": argv, "network": network}
            # a bind of the context changes what the step reads: its content is part of the key
            for m in mounts:
                if m.type == "bind":
                    content += self._bind_hash(ins, m)

            def work() -> tuple[Descriptor, str] | None:
                return self._run(st, ins, argv, mounts, network)
        else:
            plan_, view, extra_key, cleanup, owner = self._copy_plan(st, ins, env)
            content = filesmod.content_hash(plan_, extra=extra_key, known=self.file_hashes)

            def work() -> tuple[Descriptor, str] | None:
                try:
                    # parents a COPY makes belong to --chown's user, as in buildah
                    return self._write_files(view, plan_, new_dir_owner=owner or (0, 0))
                finally:
                    cleanup()
        args_in_scope = {k: v for k, v in st.args.items()}
        key = step_key(parent=st.digest(), instruction=ins.original + "".join(
            f"\n<<{h.name}\n{h.content}" for h in ins.heredocs), args=args_in_scope, content=content, extra=extra)
        hit = None if self.opt.no_cache else self.cache.get(key)
        if hit is not None:
            st.config = json.loads(json.dumps(hit.config))
            if hit.layer is not None:
                st.layers.append(hit.layer)
            self.cached += 1
            self.rep.done(cached=True, seconds=time.monotonic() - t, layer=hit.layer)
            return
        result = work()
        self.ran += 1
        if result is not None:
            desc, diff_id = result
            st.add_layer(desc, diff_id)
        st.add_history(self._created_by(ins, st), empty=result is None, created=created)
        self.cache.put(key, CacheEntry(json.loads(json.dumps(st.config)), result[0] if result else None,
                                       result[1] if result else None))
        self.rep.done(cached=False, seconds=time.monotonic() - t, layer=result[0] if result else None)

    def _ensure_workdir(self, st: _State) -> None:
        """Make the stage's WORKDIR (0755, root) as a layer of its own if the image lacks it."""
        wd = st.inner.get("WorkingDir") or "/"
        if wd == "/" or not st.layers:
            return
        view = ImageTree(self._lowers(st))
        real = view.resolve(wd.lstrip("/"), "WORKDIR")
        if not real or view.lstat(real) is not None:
            return
        plan_ = [filesmod.Planned(real, "dir", 0o755, 0, 0, filesmod.fixed_mtime())]
        key = step_key(parent=st.digest(), instruction=f"(make WORKDIR) {real}", args={},
                       content=filesmod.content_hash(plan_))
        hit = None if self.opt.no_cache else self.cache.get(key)
        if hit is not None and hit.layer is not None:
            st.config = json.loads(json.dumps(hit.config))
            st.layers.append(hit.layer)
            return
        desc, diff_id = self._write_files(view, plan_)
        st.add_layer(desc, diff_id)
        st.add_history(f"WORKDIR {wd} (made)", empty=False, created=now_rfc3339())
        self.cache.put(key, CacheEntry(json.loads(json.dumps(st.config)), desc, diff_id))

    def _created_by(self, ins: Instruction, st: _State) -> str:
        if ins.keyword == "RUN" and st.args:
            # as Docker's history: the build args a RUN saw
            return f"RUN |{len(st.args)} " + " ".join(f"{k}={v}" for k, v in sorted(st.args.items())) + " " + \
                ins.original[4:]
        return ins.original

    # RUN ------------------------------------------------------------------------------

    def _run_argv(self, st: _State, ins: Instruction, env: Mapping[str, str]) -> list[str]:
        if ins.exec_form is not None:
            if not ins.exec_form:
                raise ins.error("RUN needs a command")
            return list(ins.exec_form)
        text = ins.text
        if ins.heredocs:
            bodies = list(ins.heredocs)   # the shell expands them itself, as BuildKit leaves it
            if len(bodies) == 1 and re.fullmatch(r"<<-?(['\"]?)" + re.escape(bodies[0].name) + r"\1", text.strip()):
                if bodies[0].content.startswith("#!"):
                    # a script with its own interpreter: a file, bound in read-only and executed (as
                    # BuildKit does at /dev/pipes/NAME; here in the runtime's tree, never in a layer)
                    return [HEREDOC_DIR + "/" + bodies[0].name]
                # RUN <<EOF: the body is the script (BuildKit runs it with the shell)
                return [*st.shell, bodies[0].content]
            # RUN cmd <<EOF ...: the shell reads the heredocs itself, so hand it the whole text
            script = text + "\n" + "".join(f"{h.content}{h.name}\n" for h in bodies)
            return [*st.shell, script]
        if not text.strip():
            raise ins.error("RUN needs a command")
        return [*st.shell, text]

    def _bind_hash(self, ins: Instruction, m: Mount) -> str:
        rel = self.ctx.resolve(self.ctx.clean(m.source or ".", "RUN --mount"), "RUN --mount")
        entries = list(self.ctx.walk(rel))
        plan_ = filesmod.plan_entries(self.ctx, entries, src_root=rel, dest="", is_dir_source=entries[0].kind == "dir",
                                      dest_is_dir=False, owner=None, keep_owner=False, chmod=None)
        return filesmod.content_hash(plan_, known=self.file_hashes)

    def _run(self, st: _State, ins: Instruction, argv: list[str], mounts: Sequence[Mount],
             network: Network) -> tuple[Descriptor, str]:
        from ..containers.container import ContainerSpec
        from ..containers.rootfs import Bind, Tmpfs

        rec = self._record(st)
        env_cfg = st.env
        run_env = {k: v for k, v in st.args.items() if k not in env_cfg}
        run_env.update({k: v for k, v in self.opt.build_args.items() if k in PREDEFINED_ARGS and k not in env_cfg})
        binds: list[Bind] = []
        tmpfs: list[Tmpfs] = []
        if len(argv) == 1 and argv[0].startswith(HEREDOC_DIR + "/") and ins.heredocs:
            script = Path(tempfile.mkdtemp(dir=self.tmp, prefix="heredoc-")) / "script"
            script.write_text(ins.heredocs[0].content)
            script.chmod(0o755)
            binds.append(Bind(script, argv[0], readonly=True))
        with contextlib.ExitStack() as stack:
            for m in mounts:
                if m.type == "cache":
                    cid = m.id or m.target
                    d = stack.enter_context(self.cache.mount(cid, mode=m.mode, uid=m.uid, gid=m.gid,
                                                             locked=m.sharing == "locked"))
                    if m.sharing == "private":
                        priv = Path(tempfile.mkdtemp(dir=self.tmp, prefix="cache-"))
                        os.chown(priv, m.uid, m.gid)
                        os.chmod(priv, m.mode)
                        d = priv
                    binds.append(Bind(d, m.target, readonly=m.readonly))
                elif m.type == "tmpfs":
                    tmpfs.append(Tmpfs(m.target, size=m.size, nr_inodes=max(1024, m.size // 16384), mode=0o1777))
                else:
                    rel = self.ctx.resolve(self.ctx.clean(m.source or ".", "RUN --mount"), "RUN --mount")
                    binds.append(Bind(Path(self.ctx._real) / rel if rel else Path(self.ctx._real), m.target,
                                      readonly=True))
            spec = ContainerSpec(image=rec.name, command=tuple(argv), entrypoint=(), env=run_env,
                                 network=network, binds=tuple(binds), tmpfs=tuple(tmpfs),
                                 labels={"io.jupyter-contain.build": "1"})
            try:
                c = self.rt.create(spec, image=rec)
            except errors.InvalidSpec as e:
                raise ins.error(str(e)) from None
            try:
                code, tail = self._run_container(c)
                if code != 0:
                    raise BuildStepFailed(f"the command {_show(argv)} returned a non-zero code: {code}",
                                          code=code, output=tail, file=ins.file, line=ins.line,
                                          instruction=ins.keyword)
                layer = _commit_layer(self.store, c, self.store.ensure_unpacked(rec), self.tmp)
            except BaseException:
                c.remove(force=True)
                raise
            # its writable layer is committed: removing its files (thousands, for a pip install) runs
            # beside the next steps; close() waits for it, so a build never returns with it still there
            self._removing.append(self._remover().submit(c.remove, force=True))
            return layer

    def _run_container(self, c: Container) -> tuple[int, str]:
        r, w = os.pipe2(os.O_CLOEXEC)
        null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        tail = bytearray()
        try:
            try:
                c.start(stdio=(null, w, w))
            except errors.ContainError as e:
                raise BuildError(f"cannot start the step's container: {e}") from None
            finally:
                os.close(w)
                os.close(null)
            while chunk := os.read(r, 65536):
                self.rep.output(chunk)
                tail += chunk
                if len(tail) > _OUTPUT_TAIL:
                    del tail[:-_OUTPUT_TAIL]
        finally:
            os.close(r)
        info = c.wait()
        assert info is not None
        return info.code, tail.decode("utf-8", "replace")

    # COPY / ADD ---------------------------------------------------------------------------

    def _source_tree(self, ins: Instruction, env: Mapping[str, str]) -> tuple[Any, bool]:
        """(tree, keep owners) a COPY reads from: the context, a stage, an image."""
        frm = ins.flag("from")
        if frm is None:
            return self.ctx, False
        if ins.keyword == "ADD":
            raise ins.error("ADD has no --from (use COPY --from)")
        name = expand(frm, env, escape=self.escape, fail=ins.error)
        names = {s.name: s.index for s in self.plan.stages if s.name}
        idx = names.get(name.lower())
        if idx is None and name.isdigit():
            idx = int(name)
        if idx is not None:
            if idx not in self.stages:
                raise ins.error(f"stage {name!r} is not built before this one (a stage can only copy from an "
                                "earlier stage)")
            return ImageTree(self._lowers(self.stages[idx])), True
        rec = self._image(name, ins)
        return ImageTree(self.store.ensure_unpacked(rec)), True

    def _copy_plan(self, st: _State, ins: Instruction, env: Mapping[str, str]
                   ) -> tuple[list[filesmod.Planned], ImageTree, bytes, Callable[[], None], tuple[int, int] | None]:
        kw = ins.keyword
        x = self._expander(env, ins)
        if ins.exec_form is not None:
            words = [x(w) for w in ins.exec_form]
        else:
            words = expand_words(ins.text, env, escape=self.escape, fail=ins.error, used=self.used_args)
        if ins.flag("parents") is not None:
            raise ins.error("--parents is not supported")
        heredoc_names = {h.name for h in ins.heredocs}
        srcs_words, dest = words[:-1], words[-1] if words else ""
        if not dest:
            raise ins.error(f"{kw} needs a destination")
        if not srcs_words:
            raise ins.error(f"{kw} requires at least two arguments")
        # the destination, in the image as a container would see it
        wd = st.inner.get("WorkingDir") or "/"
        dest_is_dir = dest.endswith(("/", "/.")) or dest in (".", "/")
        abs_dest = posixpath.normpath(dest if dest.startswith("/") else posixpath.join(wd, dest))
        view = ImageTree(self._lowers(st))
        real_dest = view.resolve(abs_dest.lstrip("/"), kw)
        dst_st = view.lstat(real_dest) if real_dest else None
        if real_dest == "" or (dst_st is not None and stat.S_ISDIR(dst_st.st_mode)):
            dest_is_dir = True
        owner = self._chown(ins, view, x) if ins.flag("chown") else None
        chmod = _chmod(ins) if ins.flag("chmod") is not None else None
        excl = IgnoreRules.parse("\n".join(x(e) for e in ins.flag_all("exclude"))) if ins.flag_all("exclude") else None
        tree, keep_owner = self._source_tree(ins, env)
        cleanups: list[Callable[[], None]] = []
        plan_: list[filesmod.Planned] = []
        extra_key = b""
        count = 0
        checksum = ins.flag("checksum")
        if checksum is not None and kw == "ADD" and not all(_is_url(s) for s in srcs_words):
            raise ins.error("--checksum is only supported for HTTP(S) sources")
        for src in srcs_words:
            if src in heredoc_names and ins.heredocs:
                h = next(h for h in ins.heredocs if h.name == src)
                data = (expand_heredoc(h.content, env, escape=self.escape, fail=ins.error) if h.expand
                        else h.content).encode()
                target = posixpath.join(real_dest, src) if dest_is_dir else real_dest
                plan_.append(filesmod.Planned(target, "file", chmod if chmod is not None else 0o644,
                                              *(owner or (0, 0)), filesmod.fixed_mtime(), len(data), data=data))
                count += 1
                continue
            if kw == "ADD" and _is_url(src):
                path, name, mtime = self._download(ins, src, checksum)
                size = path.stat().st_size
                target = posixpath.join(real_dest, name) if dest_is_dir else real_dest
                plan_.append(filesmod.Planned(target, "file", chmod if chmod is not None else 0o600,
                                              *(owner or (0, 0)), mtime, size, path=path))
                count += 1
                continue
            if _is_url(src) or src.startswith("git@"):
                raise ins.error(f"{kw} of a URL or git repository: {src!r} (COPY takes local paths; ADD takes "
                                "http(s) URLs; git sources are not supported)")
            cleaned = tree.clean(src, kw)
            matches = tree.glob(cleaned, kw) if tree.has_glob(cleaned) else [cleaned]
            if not matches:
                raise ins.error(f"no source files were specified: {src!r} matches nothing in the "
                                + ("build context" if tree is self.ctx else "stage"))
            count += len(matches) if tree.has_glob(cleaned) else 1
            for rel in matches:
                real = tree.resolve(rel, kw)
                if tree is self.ctx and ignore_hit(self.ctx, real):
                    raise ins.error(f"{src!r} is excluded by {self.ctx.ignore.source or '.containerignore'}")
                entries = list(tree.walk(real, excludes=excl))
                if not entries:
                    raise ins.error(f"{src!r} not found")
                root = entries[0]
                if kw == "ADD" and root.kind == "file" and tree is self.ctx:
                    kind = _archive_kind(tree, root)
                    if kind is not None:
                        extracted, cleanup = self._extract(ins, tree, root, kind)
                        cleanups.append(cleanup)
                        sub = ContextTree(extracted, IgnoreRules())
                        cleanups.append(sub.close)
                        sub_entries = list(sub.walk(""))
                        extra_key += f"{root.rel}\0".encode()
                        plan_ += filesmod.plan_entries(sub, sub_entries, src_root="", dest=real_dest,
                                                       is_dir_source=True, dest_is_dir=True, owner=owner,
                                                       keep_owner=True, chmod=chmod)
                        continue
                plan_ += filesmod.plan_entries(tree, entries, src_root=root.rel, dest=real_dest,
                                               is_dir_source=root.kind == "dir",
                                               dest_is_dir=dest_is_dir or len(srcs_words) > 1,
                                               owner=owner, keep_owner=keep_owner, chmod=chmod)
        if count > 1 and not dest_is_dir:
            raise ins.error(f"when using {kw} with more than one source file, the destination must be a "
                            "directory and end with a /")
        if dest_is_dir and real_dest and (dst_st is None):
            # the destination folder itself, made by this step (owned by --chown's user, as BuildKit does)
            plan_.insert(0, filesmod.Planned(real_dest, "dir", 0o755, *(owner or (0, 0)), filesmod.fixed_mtime()))
        # (kept in source order: a later source replaces an earlier one, as in Docker; the layer's
        # tar sorts its entries anyway)

        def undo() -> None:
            for c in reversed(cleanups):
                c()
        self.stack.callback(undo)
        return plan_, view, extra_key, undo, owner

    def _chown(self, ins: Instruction, view: ImageTree, x: Callable[[str], str]) -> tuple[int, int]:
        from ..containers.container import resolve_user

        text = x(ins.flag("chown") or "")
        user, _, group = text.partition(":")
        try:
            uid, gid, _ = resolve_user(text, [Path(p) for p in view.lowers])
        except errors.InvalidSpec as e:
            raise ins.error(f"--chown={text}: {e}") from None
        if not group and user.isdigit():
            gid = uid   # Docker: --chown=UID without a group uses the same number as the group
        return uid, gid

    def _write_files(self, view: ImageTree, plan_: Sequence[filesmod.Planned], *,
                     new_dir_owner: tuple[int, int] = (0, 0)) -> tuple[Descriptor, str]:
        def meta(rel: str) -> filesmod.ParentMeta | None:
            s = view.lstat(rel)
            if s is None or not stat.S_ISDIR(s.st_mode):
                return None
            return filesmod.ParentMeta(stat.S_IMODE(s.st_mode), s.st_uid, s.st_gid, int(s.st_mtime))

        stage = Path(tempfile.mkdtemp(dir=self.store.layers_dir, prefix=".build-"))
        try:
            filesmod.write_layer(stage, plan_, parent_meta=meta, new_dir_owner=new_dir_owner)
            desc, diff_id = _store_layer_dir(self.store, stage)
            dest = self.store.layer_dir(diff_id)
            with self.store.layer_lock(diff_id):
                if dest.is_dir():
                    remove_tree(stage)
                else:
                    os.rename(stage, dest)
        except BaseException:
            remove_tree(stage)
            raise
        return desc, diff_id

    def _extract(self, ins: Instruction, tree: ContextTree, e: Entry, kind: str) -> tuple[Path, Callable[[], None]]:
        import tarfile

        out = Path(tempfile.mkdtemp(dir=self.tmp, prefix="add-"))
        fd = tree.open_file(e)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                src: Any = f
                if kind == "zst":
                    import zstandard

                    src, mode = zstandard.ZstdDecompressor().stream_reader(f), "r|"
                else:
                    mode = {"gz": "r:gz", "bz2": "r:bz2", "xz": "r:xz", "tar": "r:"}[kind]
                try:
                    with tarfile.open(fileobj=src, mode=mode) as tar:  # type: ignore[call-overload]
                        tar.extraction_filter = _safe_filter
                        tar.extractall(out)
                except (tarfile.TarError, OSError, EOFError, ValueError) as err:
                    raise ins.error(f"cannot extract {e.rel!r}: {err}") from None
        finally:
            os.close(fd)
        return out, lambda: remove_tree(out)

    def _download(self, ins: Instruction, url: str, checksum: str | None) -> tuple[Path, str, int]:
        import urllib.parse
        import urllib.request
        from email.utils import parsedate_to_datetime

        name = posixpath.basename(urllib.parse.urlparse(url).path) or "index.html"
        dest = Path(tempfile.mkdtemp(dir=self.tmp, prefix="url-")) / "data"
        h = hashlib.sha256()
        try:
            req = urllib.request.Request(url, headers={"User-Agent": "jupyter-contain-build"})
            with urllib.request.urlopen(req, timeout=60) as resp, open(dest, "wb") as out:
                total = 0
                while chunk := resp.read(1 << 20):
                    total += len(chunk)
                    if total > MAX_DOWNLOAD:
                        raise ins.error(f"{url}: larger than {MAX_DOWNLOAD >> 30} GiB")
                    h.update(chunk)
                    out.write(chunk)
                lm = resp.headers.get("Last-Modified")
        except OSError as e:
            raise ins.error(f"cannot download {url}: {e}") from None
        mtime = filesmod.fixed_mtime()
        if lm:
            with contextlib.suppress(TypeError, ValueError):
                mtime = int(parsedate_to_datetime(lm).timestamp())
        if checksum is not None and checksum != "sha256:" + h.hexdigest():
            raise ins.error(f"{url}: checksum mismatch: expected {checksum}, got sha256:{h.hexdigest()}")
        return dest, name, mtime

    # the end --------------------------------------------------------------------------

    def _commit(self, st: _State, t0: float) -> BuildResult:
        cfg = json.loads(json.dumps(st.config))
        labels = dict((cfg.get("config") or {}).get("Labels") or {})
        labels.update(self.opt.labels)
        labels[LABEL_CONTAINERFILE] = sha256_digest(self.cf_bytes)
        given = {k: v for k, v in self.opt.build_args.items() if k in self.used_args}
        if given:
            labels[LABEL_BUILD_ARGS] = json.dumps(given, sort_keys=True)
        cfg.setdefault("config", {})["Labels"] = labels
        cfg.setdefault("created", now_rfc3339())
        if self.opt.tags and self._tagged_already(cfg, st.layers) is not None:
            # a rebuild that made the same image: the tags already name it, nothing to write (an
            # image's config and manifest blobs and index.json cost six fsyncs, ~20 ms here)
            rec = self._tagged_already(cfg, st.layers)
            assert rec is not None
            names = [self.store.resolve(t).name for t in self.opt.tags]
            self.rep.note(f"COMMIT {', '.join(Reference.parse(n).familiar for n in names)} (unchanged)")
        elif self.opt.tags:
            first, *rest = self.opt.tags
            rec = self.store.add_image(name=first, config=cfg, layers=st.layers)
            names = [rec.name]
            for t in rest:
                names.append(self.store.tag(t, rec.descriptor))
            self.rep.note(f"COMMIT {', '.join(Reference.parse(n).familiar for n in names)}")
        else:
            tmp = _State(cfg, st.layers)
            rec = self._record(tmp, "untagged")
            names = []
            self.rep.note("COMMIT (untagged: gc removes it; give -t NAME to keep it)")
        return BuildResult(image_id=rec.id, digest=rec.digest, names=tuple(names), steps=self.cached + self.ran,
                           cached=self.cached, seconds=time.monotonic() - t0, record=rec)


    def _tagged_already(self, cfg: Mapping[str, Any], layers: Sequence[Descriptor]) -> ImageRecord | None:
        """The stored image if every tag already names exactly this config and these layers."""
        cfg_bytes = canonical_json(cfg)
        manifest = Manifest(OCI_MANIFEST, Descriptor(OCI_CONFIG, sha256_digest(cfg_bytes), len(cfg_bytes)),
                            tuple(layers), {})
        digest = sha256_digest(canonical_json(manifest.to_json()))
        rec = None
        for t in self.opt.tags:
            try:
                rec = self.store.resolve(str(local_name(t)))
            except errors.ImageNotFound:
                return None
            if rec.digest != digest:
                return None
        return rec


def _platform_args() -> dict[str, str]:
    p = Platform.host()
    out = {}
    for prefix in ("TARGET", "BUILD"):
        out.update({f"{prefix}PLATFORM": str(p), f"{prefix}OS": p.os, f"{prefix}ARCH": p.architecture,
                    f"{prefix}VARIANT": p.variant or ""})
    return out


def ignore_hit(ctx: ContextTree, rel: str) -> bool:
    return bool(rel) and ctx.ignore.excluded(rel)


def _is_url(s: str) -> bool:
    return s.startswith(("http://", "https://"))


def _archive_kind(tree: ContextTree, e: Entry) -> str | None:
    """A tar ADD extracts (plain, gzip, bzip2, xz, zstd as moby's archive package), by its first bytes."""
    fd = tree.open_file(e)
    try:
        head = os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    if head.startswith(b"\x1f\x8b"):
        return "gz"
    if head.startswith(b"BZh"):
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return "zst"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    return None


def _safe_filter(member: Any, path: str) -> Any:
    """Python's ``tar`` filter (no absolute paths, nothing outside, no links out), and no device nodes."""
    import tarfile

    if member.ischr() or member.isblk():
        raise tarfile.FilterError(f"{member.name}: device nodes are not extracted")
    return tarfile.tar_filter(member, path)


def _ports(ins: Instruction, w: str) -> list[str]:
    port, _, proto = w.partition("/")
    proto = (proto or "tcp").lower()
    if proto not in ("tcp", "udp", "sctp"):
        raise ins.error(f"invalid proto {proto!r} in EXPOSE {w}")
    lo, dash, hi = port.partition("-")
    if not lo.isdigit() or (dash and not hi.isdigit()):
        raise ins.error(f"invalid containerPort: {port}")
    a, b = int(lo), int(hi) if dash else int(lo)
    if not (0 < a <= b <= 65535):
        raise ins.error(f"invalid port range {port}")
    return [f"{p}/{proto}" for p in range(a, b + 1)]


def _show(argv: Sequence[str]) -> str:
    s = json.dumps(list(argv))
    return s if len(s) <= 200 else s[:197] + "..."


# --- layers through the snapshot code -------------------------------------------------------------


def _layer_code() -> tuple[Any, Any]:
    """(layer module, commit module): the tar/scan code and the container excludes a snapshot uses.

    They moved (``images/snapshot.py`` -> public names there, container parts in
    ``runtime/commit.py``) while this was written: take whichever form is here.
    """
    import types

    from ..images import snapshot as layer
    cm: types.ModuleType
    try:
        from .. import commit as cm
    except ImportError:
        cm = layer
    return layer, cm


def _pick(mod: Any, *names: str) -> Any:
    for n in names:
        if hasattr(mod, n):
            return getattr(mod, n)
    raise AttributeError(f"{mod.__name__} has none of {names}")


def _store_layer_dir(store: Store, root: Path) -> tuple[Descriptor, str]:
    layer, _ = _layer_code()
    return layer.store_layer_dir(store, root)


def _commit_layer(store: Store, c: Container, lowers: Sequence[Path], tmp_dir: Path) -> tuple[Descriptor, str]:
    """A RUN container's writable layer -> a committed layer blob and its unpacked copy in the store.

    The same scan, whiteouts, stubs and tar as a snapshot (so a build layer
    and a snapshot of the same change are the same layer), with the unpacked
    copy made beside the archive, as ``snapshot(unpack=True)`` does: the next
    step's container then starts without extracting it.
    """
    import threading
    from concurrent.futures import ThreadPoolExecutor

    layer, cm = _layer_code()
    view = _pick(layer, "LowerView", "_LowerView")(lowers)
    excl = _pick(cm, "_container_excludes")(c.state)
    ids = _pick(cm, "_id_view")(c.state)
    items = _pick(layer, "scan", "_scan")(c.upper, view, excl)
    copy_items = _pick(layer, "copy_items", "_copy_items")
    archive = _pick(layer, "archive", "_archive")
    tmp = tempfile.mkdtemp(dir=store.layers_dir, prefix=".build-run-")
    try:
        with store.blob_writer(what="build layer") as w:
            stop = threading.Event()
            with ThreadPoolExecutor(1, thread_name_prefix="jc-build-copy") as pool:
                copy = pool.submit(copy_items, c.upper, items, tmp, stop, ids)
                try:
                    diff_id = archive(c.upper, items, w.write, compress="gzip", ids=ids)
                except BaseException:
                    stop.set()
                    raise
                copy.result()
            digest = w.commit()
        desc = Descriptor(OCI_LAYER_GZIP, digest, w.size)
        dest = store.layer_dir(diff_id)
        with store.layer_lock(diff_id):
            if dest.is_dir():
                remove_tree(Path(tmp))
            else:
                os.rename(tmp, dest)
    except BaseException:
        remove_tree(Path(tmp))
        raise
    return desc, diff_id


# --- the entry point --------------------------------------------------------------------------------


def build(runtime: Runtime | Store, options: BuildOptions, *, reporter: Reporter | None = None) -> BuildResult:
    """Build ``options`` into ``runtime``'s store; returns the image (tagged with every ``tags`` name).

    ``runtime``: a :class:`Runtime` for the RUN steps' containers, or just a
    :class:`Store` (a runtime over it is made at the first RUN that misses
    the cache).

    Raises :class:`~jupyter_contain.errors.BuildError` (syntax, context,
    a failed step: :class:`~jupyter_contain.errors.BuildStepFailed`) and
    leaves no tag, container or half-written layer behind on any failure.
    """
    if os.geteuid() != 0:
        # COPY/ADD layers carry owners (0:0, --chown, a tar's) that only root can write into the
        # unpacked layer; a rootless store keeps them shifted through its user namespace, which
        # this builder does not do yet
        raise BuildError("building images needs root for now (rootless builds are not supported yet)")
    if isinstance(runtime, Store):
        b = _Build(None, runtime, options, reporter or Reporter())
    else:
        b = _Build(runtime, runtime.store, options, reporter or Reporter())
    try:
        with b.store.writing():
            return b.run()
    finally:
        b.close()


__all__ = ["BuildOptions", "BuildResult", "Plan", "Reporter", "Stage", "build", "plan"]
