"""Per-start options of a contained kernel: what a user picks in the start dialog.

Owns :class:`StartOptions` (memory, CPUs, network and image tag chosen for one
kernel, over its kernelspec's values), parsing it from a client's JSON under
the server's ceilings (:class:`StartLimits`), and applying it to a kernelspec's
provisioner config. The server extension builds a :class:`StartOptions` from a
request and hands the object (never the raw JSON) to the kernel manager's
``start_kernel(contain_options=...)``; the provisioner takes it in
``pre_launch`` and validates the merged config again like any kernelspec's.
Must not start anything or read the store: callers check that a tag exists.

A kernel started through Jupyter's own ``POST /api/kernels`` or
``/api/sessions`` cannot carry these (those handlers pass only a name, a path
and an id), so every per-start option went through :func:`StartOptions.parse`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .. import errors
from ..runtime import NETWORK_MODES, Reference, parse_cpus, parse_memory

#: the keyword a kernel start carries the options under (through jupyter_client to ``pre_launch``)
START_KWARG = "contain_options"

#: OCI distribution's tag grammar
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_FIELDS = ("memory", "cpus", "network", "tag")


@dataclass(frozen=True)
class StartLimits:
    """The server's ceilings for a start (None: no ceiling)."""

    max_memory: int | None = None
    max_cpus: float | None = None
    networks: tuple[str, ...] = ("none", "bridge")


@dataclass(frozen=True)
class StartOptions:
    """One kernel start's choices; None keeps the kernelspec's value.

    ``memory`` and ``cpus`` are kept in the CLI's spelling ("512m", "1.5") so
    the merged config reads like a kernelspec's; ``memory="none"`` asks for no
    limit and passes only where the server has no ceiling.
    """

    memory: str | None = None
    cpus: str | None = None
    network: str | None = None
    tag: str | None = None

    @classmethod
    def parse(cls, body: Any, *, limits: StartLimits) -> StartOptions:
        """Check a client's JSON object; every problem is an :class:`~jupyter_contain.errors.InvalidSpec`."""
        if body is None:
            return cls()
        if not isinstance(body, Mapping):
            raise errors.InvalidSpec("start options must be a JSON object")
        unknown = sorted(str(k)[:40] for k in body if k not in _FIELDS)
        if unknown:
            raise errors.InvalidSpec(f"unknown start option(s) {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
        values: dict[str, str | None] = {}
        for name in _FIELDS:
            v = body.get(name)
            if v is None or v == "":
                values[name] = None
                continue
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or len(str(v)) > 128:
                raise errors.InvalidSpec(f"start option {name} must be a short string or a number")
            values[name] = str(v).strip()
        memory, cpus, network, tag = (values[n] for n in _FIELDS)
        if memory is not None:
            if memory.lower() in ("none", "0"):
                if limits.max_memory is not None:
                    raise errors.InvalidSpec(f"memory: this server allows at most {_mib(limits.max_memory)}, "
                                             f"not an unlimited kernel")
                memory = "none"
            elif limits.max_memory is not None and parse_memory(memory) > limits.max_memory:
                raise errors.InvalidSpec(f"memory {memory} is above this server's maximum "
                                         f"({_mib(limits.max_memory)})")
            else:
                parse_memory(memory)
        if cpus is not None:
            parsed = parse_cpus(cpus)
            if limits.max_cpus is not None and parsed > limits.max_cpus:
                raise errors.InvalidSpec(f"cpus {cpus} is above this server's maximum ({limits.max_cpus:g})")
        if network is not None:
            if network not in NETWORK_MODES:
                raise errors.InvalidSpec(f"unknown network mode {network[:20]!r} (none, bridge or host)")
            if network not in limits.networks:
                raise errors.InvalidSpec(f"network {network} is not allowed on this server "
                                         f"(allowed: {', '.join(limits.networks)})")
        if tag is not None and not _TAG.match(tag):
            raise errors.InvalidSpec(f"invalid image tag {tag[:40]!r} (letters, digits, _ . -; at most 128)")
        return cls(memory=memory, cpus=cpus, network=network, tag=tag)

    @property
    def empty(self) -> bool:
        return all(getattr(self, n) is None for n in _FIELDS)

    def to_json(self) -> dict[str, str]:
        """The chosen values only (what a notebook records and sends back next time)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def apply(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """A kernelspec's provisioner ``config`` with these choices over it."""
        out = dict(config)
        if self.memory is not None:
            out["memory"] = self.memory   # "none": no limit (empty would mean the machine's default)
        if self.cpus is not None:
            out["cpus"] = self.cpus
        if self.network is not None:
            out["network"] = self.network
        if self.tag is not None:
            out["image"] = retag(str(out.get("image") or ""), self.tag)
        return out


def retag(image: str, tag: str) -> str:
    """``image`` (the kernelspec's reference) with ``tag``: the same repository only, never another image."""
    try:
        ref = Reference.parse(image)
        if ref.digest:
            raise errors.InvalidSpec(f"the kernelspec's image is pinned ({image}): it takes no other tag")
        # familiar form: "debian:bookworm" keeps resolving to localhost/debian:... as the kernelspec's did
        return ref.with_tag(tag).familiar
    except errors.ContainError as exc:
        raise errors.InvalidSpec(f"the kernelspec's image {image!r} cannot take tag {tag!r}: {exc}") from None


def from_kwargs(kwargs: dict[str, Any]) -> StartOptions | None:
    """Pop the start options a kernel start carries (a :class:`StartOptions`; anything else is refused)."""
    got = kwargs.pop(START_KWARG, None)
    if got is None or isinstance(got, StartOptions):
        return got
    raise errors.InvalidSpec(f"{START_KWARG} must be a StartOptions (made by StartOptions.parse), "
                             f"not {type(got).__name__}")


def _mib(n: int) -> str:
    return f"{n // (1 << 20)} MiB"
