"""Image and container vocabulary: references, descriptors, manifests, image configs.

Owns the parsing and validation of the OCI image-spec and Docker schema2
documents, and of image references with Docker's normalisation rules. Frozen
dataclasses only; pure functions only. Must not do I/O (no files, no network,
no syscalls): callers hand it bytes and get values or a clear error.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidReference, ManifestError

# --- media types ---------------------------------------------------------------

OCI_LAYOUT_VERSION = "1.0.0"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_ND = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_ND_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_ND_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
#: not in Docker's schema2 text: containerd's name for a zstd layer in a Docker manifest
DOCKER_LAYER_ZSTD = "application/vnd.docker.image.rootfs.diff.tar.zstd"
DOCKER_FOREIGN_LAYER = "application/vnd.docker.image.rootfs.foreign.diff.tar"
DOCKER_FOREIGN_LAYER_GZIP = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
SCHEMA1_ERROR = ("Docker schema1 manifests (application/vnd.docker.distribution.manifest.v1, schemaVersion 1) "
                 "are not supported: the image is too old (schema1 is deprecated since Docker 1.10, 2016); "
                 "re-push it with a current Docker, podman or skopeo (they write schema 2 or OCI)")

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})

#: every layer media type we unpack -> (compression, OCI equivalent). The OCI
#: equivalent names the same bytes in an OCI manifest (a blob's digest does not
#: depend on the media type a manifest gives it), as ``skopeo copy`` converts them.
LAYER_MEDIA_TYPES: Mapping[str, tuple[str, str]] = {
    OCI_LAYER: ("tar", OCI_LAYER),
    OCI_LAYER_GZIP: ("gzip", OCI_LAYER_GZIP),
    OCI_LAYER_ZSTD: ("zstd", OCI_LAYER_ZSTD),
    OCI_LAYER_ND: ("tar", OCI_LAYER_ND),
    OCI_LAYER_ND_GZIP: ("gzip", OCI_LAYER_ND_GZIP),
    OCI_LAYER_ND_ZSTD: ("zstd", OCI_LAYER_ND_ZSTD),
    DOCKER_LAYER: ("tar", OCI_LAYER),
    DOCKER_LAYER_GZIP: ("gzip", OCI_LAYER_GZIP),
    DOCKER_LAYER_ZSTD: ("zstd", OCI_LAYER_ZSTD),
    DOCKER_FOREIGN_LAYER: ("tar", OCI_LAYER_ND),
    DOCKER_FOREIGN_LAYER_GZIP: ("gzip", OCI_LAYER_ND_GZIP),
}
LAYER_TYPES = frozenset(LAYER_MEDIA_TYPES)
#: layers a registry need not serve (Windows base layers, licensed content): ``urls`` say where they are
FOREIGN_LAYER_TYPES = frozenset({OCI_LAYER_ND, OCI_LAYER_ND_GZIP, OCI_LAYER_ND_ZSTD, DOCKER_FOREIGN_LAYER,
                                 DOCKER_FOREIGN_LAYER_GZIP})

ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_CREATED = "org.opencontainers.image.created"
#: manifests in an index that describe attestations, not runnable images
ATTESTATION_REF_TYPE = "vnd.docker.reference.type"

# --- digests -------------------------------------------------------------------

_DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}$")


def sha256_digest(data: bytes) -> str:
    """The ``sha256:<hex>`` digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is a well-formed sha256 digest, else raise."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise ManifestError(f"not a sha256 digest: {digest!r}")
    return digest


def digest_hex(digest: str) -> str:
    """The hex part of a checked sha256 digest (safe to use as a file name)."""
    return check_digest(digest).split(":", 1)[1]


# --- references ----------------------------------------------------------------

DEFAULT_REGISTRY = "docker.io"
LOCAL_REGISTRY = "localhost"
_LEGACY_REGISTRIES = {"index.docker.io", "registry-1.docker.io"}
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(rf"^{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*$")
_DOMAIN_RE = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$"
)
_TAG_RE = re.compile(r"^[\w][\w.-]{0,127}$")


@dataclass(frozen=True)
class Reference:
    """A normalised image reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, text: str, *, default_tag: str = "latest") -> Reference:
        """Parse with Docker's rules (``ubuntu`` -> ``docker.io/library/ubuntu:latest``)."""
        if not isinstance(text, str) or not text or text != text.strip():
            raise InvalidReference(f"invalid image reference {text!r}")
        rest, digest = text, None
        if "@" in rest:
            rest, digest = rest.split("@", 1)
            if not _DIGEST_RE.match(digest):
                raise InvalidReference(f"invalid digest in image reference {text!r}")
        tag = None
        slash = rest.rfind("/")
        colon = rest.rfind(":")
        if colon > slash:
            rest, tag = rest[:colon], rest[colon + 1:]
            if not _TAG_RE.match(tag):
                raise InvalidReference(f"invalid tag {tag!r} in image reference {text!r}")
        first, _, remainder = rest.partition("/")
        if remainder and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
            registry, path = first, remainder
            if not _DOMAIN_RE.match(registry):
                raise InvalidReference(f"invalid registry {registry!r} in image reference {text!r}")
        else:
            registry, path = DEFAULT_REGISTRY, rest
        if registry in _LEGACY_REGISTRIES:
            registry = DEFAULT_REGISTRY
        if registry == DEFAULT_REGISTRY and "/" not in path:
            path = "library/" + path
        if not _PATH_RE.match(path):
            hint = " (repository names must be lowercase)" if path.lower() != path else ""
            raise InvalidReference(f"invalid repository name in image reference {text!r}{hint}")
        if len(registry) + 1 + len(path) > 255:
            raise InvalidReference(f"image reference too long: {text!r}")
        if tag is None and digest is None:
            tag = default_tag
        return cls(registry=registry, repository=path, tag=tag, digest=digest)

    @property
    def name(self) -> str:
        """``registry/repository`` without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def familiar(self) -> str:
        """The short form people type (``debian:bookworm`` for Docker Hub's library)."""
        name = self.name
        if self.registry == DEFAULT_REGISTRY:
            name = self.repository.removeprefix("library/")
        return name + self._suffix()

    def with_tag(self, tag: str) -> Reference:
        if not _TAG_RE.match(tag):
            raise InvalidReference(f"invalid tag {tag!r}")
        return Reference(self.registry, self.repository, tag, None)

    def _suffix(self) -> str:
        return (f":{self.tag}" if self.tag else "") + (f"@{self.digest}" if self.digest else "")

    def __str__(self) -> str:
        return self.name + self._suffix()


def local_alternative(text: str) -> Reference | None:
    """For a name typed without a registry, its ``localhost/`` form (as Podman does).

    Images made here (bootstrap, import, snapshot) live under ``localhost/``, so
    ``debian:bookworm`` finds ``localhost/debian:bookworm`` when Docker Hub's is absent.
    """
    ref = Reference.parse(text)
    first, sep, _ = text.partition("/")
    explicit = sep and ("." in first or ":" in first or first == "localhost")
    if explicit:
        return None
    return Reference(LOCAL_REGISTRY, ref.repository.removeprefix("library/"), ref.tag, ref.digest)


def local_name(text: str) -> Reference:
    """The name an image made here gets: ``foo:1`` -> ``localhost/foo:1``; explicit registries kept."""
    return local_alternative(text) or Reference.parse(text)


# --- descriptors and documents ------------------------------------------------------


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str | None = None

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``linux/amd64`` or ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidReference(f"invalid platform {text!r} (expected os/arch[/variant])")
        return cls(parts[0], normalize_arch(parts[1]), parts[2] if len(parts) == 3 else None)

    @classmethod
    def host(cls) -> Platform:
        arch = normalize_arch(_platform.machine())
        return cls("linux", arch, "v8" if arch == "arm64" else None)

    def matches(self, other: Platform) -> bool:
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if self.variant and other.variant and self.variant != other.variant:
            return False
        return True

    def to_json(self) -> dict[str, str]:
        d = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            d["variant"] = self.variant
        return d

    def __str__(self) -> str:
        return f"{self.os}/{self.architecture}" + (f"/{self.variant}" if self.variant else "")


_ARCH_ALIASES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386", "i386": "386"}


def normalize_arch(arch: str) -> str:
    return _ARCH_ALIASES.get(arch, arch)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, d: Any, *, where: str = "descriptor") -> Descriptor:
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: not an object")
        mt, digest, size = d.get("mediaType"), d.get("digest"), d.get("size")
        if not isinstance(mt, str) or not mt:
            raise ManifestError(f"{where}: missing mediaType")
        if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
            raise ManifestError(f"{where}: invalid digest {digest!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ManifestError(f"{where}: invalid size {size!r}")
        ann = d.get("annotations") or {}
        if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
            raise ManifestError(f"{where}: invalid annotations")
        plat = None
        if isinstance(d.get("platform"), dict):
            p = d["platform"]
            if not isinstance(p.get("os"), str) or not isinstance(p.get("architecture"), str):
                raise ManifestError(f"{where}: invalid platform")
            plat = Platform(p["os"], normalize_arch(p["architecture"]), p.get("variant") or None)
        urls = d.get("urls") or []
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise ManifestError(f"{where}: invalid urls")
        return cls(mt, digest, size, dict(ann), plat, tuple(urls))

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        if self.platform:
            d["platform"] = self.platform.to_json()
        if self.urls:
            d["urls"] = list(self.urls)
        return d

    def with_annotations(self, annotations: Mapping[str, str]) -> Descriptor:
        return Descriptor(self.media_type, self.digest, self.size, dict(annotations), self.platform, self.urls)


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema2)."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def is_oci(self) -> bool:
        return self.media_type == OCI_MANIFEST

    def oci_form(self) -> Manifest:
        """The same image as an OCI manifest: the same config and layer blobs, OCI media types.

        What ``skopeo copy --format oci`` makes of a Docker schema2 manifest; peers that
        read only OCI layouts (umoci, skopeo's ``oci:`` transport) need it.
        """
        if self.is_oci:
            return self
        config = Descriptor(OCI_CONFIG, self.config.digest, self.config.size, self.config.annotations)
        layers = tuple(Descriptor(oci_layer_type(d.media_type), d.digest, d.size, d.annotations, None, d.urls)
                       for d in self.layers)
        return Manifest(OCI_MANIFEST, config, layers, self.annotations)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": self.config.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.annotations:
            d["annotations"] = dict(self.annotations)
        return d


def oci_layer_type(media_type: str) -> str:
    """The OCI media type for a layer of either family (same compression, same bytes)."""
    try:
        return LAYER_MEDIA_TYPES[media_type][1]
    except KeyError:
        raise ManifestError(f"unsupported layer media type {media_type!r}") from None


def layer_compression(media_type: str) -> str:
    """``tar``, ``gzip`` or ``zstd`` for a layer media type of either family."""
    try:
        return LAYER_MEDIA_TYPES[media_type][0]
    except KeyError:
        raise ManifestError(f"unsupported layer media type {media_type!r}") from None


@dataclass(frozen=True)
class Index:
    """An image index or Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict)

    def runnable(self) -> tuple[Descriptor, ...]:
        """Entries that are images, not attestations or unknown platforms."""
        return tuple(
            m for m in self.manifests
            if m.media_type in MANIFEST_TYPES | INDEX_TYPES
            and m.annotations.get(ATTESTATION_REF_TYPE) != "attestation-manifest"
            and not (m.platform and m.platform.os == "unknown")
        )

    def select(self, platform: Platform) -> Descriptor:
        """The entry for ``platform``; a clear error naming what is offered otherwise.

        Entries are ranked, not taken in order: an index may list other platforms or
        attestations first. An entry naming this platform and variant wins, then one
        naming the platform with another or no variant, then one naming no platform.
        """
        runnable = self.runnable()
        ranked = sorted(
            (m for m in runnable if m.platform is None or m.platform.matches(platform)),
            key=lambda m: 2 if m.platform is None else 0 if m.platform.variant == platform.variant else 1,
        )
        if ranked:
            return ranked[0]
        offered = ", ".join(sorted({str(m.platform) for m in runnable if m.platform})) or "none"
        raise ManifestError(f"no image for platform {platform} (offered: {offered})")


def parse_document(data: bytes, *, media_type: str | None = None) -> Manifest | Index:
    """Parse a manifest or index; reject schema1 and anything malformed with a clear error.

    ``media_type`` is what the source announced (a registry's Content-Type, a
    descriptor); when the document names its own type, the two must agree.
    """
    if media_type in DOCKER_SCHEMA1:
        raise ManifestError(SCHEMA1_ERROR)
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError("manifest is not a JSON object")
    if doc.get("schemaVersion") == 1 or doc.get("mediaType") in DOCKER_SCHEMA1:
        raise ManifestError(SCHEMA1_ERROR)
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"unsupported manifest schemaVersion {doc.get('schemaVersion')!r}")
    if media_type in ("application/json", "application/octet-stream", "text/plain"):
        media_type = None
    own = doc.get("mediaType")
    if own is not None and not isinstance(own, str):
        raise ManifestError("manifest mediaType is not a string")
    if media_type and own and media_type != own:
        raise ManifestError(f"the document's mediaType {own!r} differs from the {media_type!r} its source "
                            "announced")
    mt = own or media_type
    if mt is None:  # OCI allows omitting mediaType: tell by shape
        mt = OCI_INDEX if "manifests" in doc else OCI_MANIFEST
    ann = doc.get("annotations") or {}
    if not isinstance(ann, dict):
        raise ManifestError("manifest annotations are not an object")
    if mt in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise ManifestError("index has no manifests list")
        return Index(mt, tuple(Descriptor.from_json(e, where=f"index entry {i}") for i, e in enumerate(entries)),
                     dict(ann))
    if mt in MANIFEST_TYPES:
        layers = doc.get("layers")
        if not isinstance(layers, list):
            raise ManifestError("manifest has no layers list")
        config = Descriptor.from_json(doc.get("config"), where="manifest config")
        if config.media_type not in CONFIG_TYPES:
            raise ManifestError(f"not a container image: its config has media type {config.media_type!r} "
                                f"(an artifact, signature or attestation?)")
        descs = tuple(Descriptor.from_json(e, where=f"layer {i}") for i, e in enumerate(layers))
        for i, d in enumerate(descs):
            if d.media_type not in LAYER_TYPES:
                raise ManifestError(f"layer {i}: unsupported media type {d.media_type!r}")
        return Manifest(mt, config, descs, dict(ann))
    raise ManifestError(f"unsupported manifest media type {mt!r}")


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the runtime uses; ``raw`` keeps everything."""

    raw: Mapping[str, Any]

    @classmethod
    def parse(cls, data: bytes) -> ImageConfig:
        try:
            doc = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ManifestError(f"image config is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ManifestError("image config is not a JSON object")
        rootfs = doc.get("rootfs")
        if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(
            rootfs.get("diff_ids"), list
        ):
            raise ManifestError("image config has no rootfs.diff_ids")
        for d in rootfs["diff_ids"]:
            if not isinstance(d, str) or not _DIGEST_RE.match(d):
                raise ManifestError(f"image config: invalid diff_id {d!r}")
        cfg = doc.get("config")
        if cfg is not None and not isinstance(cfg, dict):
            raise ManifestError("image config: 'config' is not an object")
        return cls(doc)

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(self.raw["rootfs"]["diff_ids"])

    @property
    def _cfg(self) -> Mapping[str, Any]:
        return self.raw.get("config") or {}

    @property
    def env(self) -> tuple[str, ...]:
        return tuple(self._cfg.get("Env") or ())

    @property
    def entrypoint(self) -> tuple[str, ...]:
        return tuple(self._cfg.get("Entrypoint") or ())

    @property
    def cmd(self) -> tuple[str, ...]:
        return tuple(self._cfg.get("Cmd") or ())

    @property
    def working_dir(self) -> str:
        return self._cfg.get("WorkingDir") or "/"

    @property
    def user(self) -> str:
        return self._cfg.get("User") or ""

    @property
    def labels(self) -> Mapping[str, str]:
        return dict(self._cfg.get("Labels") or {})

    @property
    def created(self) -> str | None:
        return self.raw.get("created")

    @property
    def platform(self) -> Platform:
        return Platform(self.raw.get("os", "linux"), normalize_arch(self.raw.get("architecture", "amd64")),
                        self.raw.get("variant"))


def canonical_json(doc: Any) -> bytes:
    """Deterministic JSON bytes for documents we write (same content, same digest)."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
