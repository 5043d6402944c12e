"""The registry client: pull, push, login against OCI distribution / Docker Registry API v2.

Owns the HTTP side of images: the scheme choice (loopback and configured
insecure registries speak plain HTTP), the auth flow (anonymous, Basic, Bearer
tokens from the ``WWW-Authenticate`` challenge, cached per scope), retries with
backoff and ``Retry-After``, ``Range`` resume of an interrupted blob, redirects
to blob storage without the registry's ``Authorization``, manifest and index
resolution with platform choice (OCI and Docker schema2 forms, both kept as
served: same bytes, same digests), verification of every byte that comes in, and
the upload protocol (HEAD, cross-repository mount, monolithic PUT, chunked
PATCH, manifest PUT).

Must not: write the store except through :class:`Store` (blobs through
``BlobWriter``, layers through ``unpack_layer`` into a private folder of
``tmp/``, tags through ``Store.tag``), tag anything before every blob and
layer of the image is verified and in place, print, or read credentials any
other way than through :mod:`.auth`.

A pull is a transaction: layers download concurrently into ``BlobWriter`` temp
files while one unpacker (the calling thread) follows those growing files in
layer order and unpacks them into a private staging folder. Only when every
blob's digest and every layer's DiffID checked out are the blobs committed, the
layers moved into ``layers/`` and the tag written. A failure at any point
leaves the store as it was.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import ipaddress
import json
import logging
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import urllib3

from ...errors import (
    AuthenticationError,
    ContainError,
    DigestMismatch,
    ImageNotFound,
    ManifestError,
    RegistryError,
    StoreError,
)
from ..spec import (
    DEFAULT_REGISTRY,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    DOCKER_SCHEMA1,
    FOREIGN_LAYER_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    Reference,
    digest_hex,
    parse_document,
    sha256_digest,
)
from . import auth as _auth
from . import progress as _progress
from .store import MAX_DOCUMENT_SIZE, BlobWriter, ImageRecord, Store, remove_tree

log = logging.getLogger(__name__)

#: what we accept for a manifest; schema1 last, only so that we can name it in the error
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST, *DOCKER_SCHEMA1])
DOCKER_HUB_HOST = "registry-1.docker.io"
USER_AGENT = "jupyter-contain"
_READ_CHUNK = 256 << 10
_MAX_REDIRECTS = 5
_SOURCES_DIR = "registry-sources"


# --- configuration -------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryConfig:
    """How to reach registries; ``load`` reads ``ROOT/registries.json`` and the environment."""

    #: registries (``host[:port]``) allowed plain HTTP or unverified TLS
    insecure_registries: tuple[str, ...] = ()
    #: registry -> mirrors tried first for pulls (``host[:port]``, ``http://`` allowed)
    mirrors: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    max_concurrent_downloads: int = 3
    max_concurrent_uploads: int = 3
    #: attempts per request and per blob transfer (connection errors, 429, 5xx)
    retries: int = 5
    backoff: float = 0.25
    max_retry_after: float = 60.0
    timeout: float = 60.0
    #: blobs up to this size go up in one PUT; larger ones in PATCH chunks of ``chunk_size``
    chunk_threshold: int = 32 << 20
    chunk_size: int = 16 << 20
    #: where config.json lives (None: ``$DOCKER_CONFIG`` or ``~/.docker``)
    docker_config: Path | None = None

    @classmethod
    def load(cls, root: Path | str | None = None, *, environ: Mapping[str, str] | None = None) -> RegistryConfig:
        env = os.environ if environ is None else environ
        doc: dict[str, Any] = {}
        if root is not None:
            path = Path(root) / "registries.json"
            try:
                doc = json.loads(path.read_bytes())
            except FileNotFoundError:
                doc = {}
            except (OSError, ValueError) as exc:
                raise RegistryError(f"cannot read {path}: {exc}") from None
            if not isinstance(doc, dict):
                raise RegistryError(f"{path} is not a JSON object")
        insecure = [str(x) for x in doc.get("insecure_registries") or ()]
        insecure += [x.strip() for x in env.get("JUPYTER_CONTAIN_INSECURE_REGISTRIES", "").split(",") if x.strip()]
        mirrors = {_auth.normalize_server(k): tuple(str(m) for m in v)
                   for k, v in (doc.get("mirrors") or {}).items() if isinstance(v, list)}
        kwargs: dict[str, Any] = {}
        for key in ("max_concurrent_downloads", "max_concurrent_uploads", "retries", "chunk_threshold",
                    "chunk_size"):
            if isinstance(doc.get(key), int) and doc[key] > 0:
                kwargs[key] = doc[key]
        for key in ("backoff", "max_retry_after", "timeout"):
            if isinstance(doc.get(key), (int, float)) and doc[key] >= 0:
                kwargs[key] = float(doc[key])
        return cls(insecure_registries=tuple(dict.fromkeys(insecure)), mirrors=mirrors, **kwargs)


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 and ::1, with or without a port."""
    h = host
    if h.startswith("["):
        h = h[1:].split("]", 1)[0]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    if h == "localhost" or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


# --- HTTP with auth and retries ----------------------------------------------------------

_CHALLENGE_RE = re.compile(r'(\w+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))')


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> (``"bearer"``, params)."""
    scheme, _, rest = header.strip().partition(" ")
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
              for m in _CHALLENGE_RE.finditer(rest)}
    return scheme.lower(), params


def _retry_after(resp: requests.Response, default: float, cap: float) -> float:
    value = resp.headers.get("Retry-After")
    if not value:
        return default
    try:
        return min(max(float(value), 0.0), cap)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
        return min(max(when.timestamp() - time.time(), 0.0), cap)
    except (TypeError, ValueError):
        return default


def _error_codes(resp: requests.Response) -> list[str]:
    try:
        doc = json.loads(resp.content[:65536] or b"{}")
        return [str(e.get("code", "")) for e in doc.get("errors", []) if isinstance(e, dict)]
    except (ValueError, AttributeError, requests.RequestException):
        return []


_NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                   urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)


class _Aborted(Exception):
    """Another part of the pull failed: stop quietly."""


class Client:
    """One registry (``host[:port]``), one set of credentials, a token cache; close when done."""

    def __init__(self, registry: str, *, config: RegistryConfig, tls_verify: bool = True,
                 credentials: _auth.Credentials | None = None, use_stored_credentials: bool = True,
                 plain_http: bool | None = None) -> None:
        self.registry = registry
        self.host = DOCKER_HUB_HOST if registry == DEFAULT_REGISTRY else registry
        self.config = config
        self.tls_verify = tls_verify
        self._creds = credentials
        self._creds_loaded = credentials is not None or not use_stored_credentials
        self._plain_http = plain_http
        self._base: str | None = None
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}   # scope -> (header value, expiry)
        self._basic = False                              # the registry asked for Basic
        self._challenge: tuple[str, dict[str, str]] | None = None
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.verify = tls_verify and not self._insecure()
        self.requests_made = 0

    def close(self) -> None:
        # urllib3 2.8's PoolManager.clear() no longer closes its pools (it leaves the
        # sockets to the garbage collector): close them, so no socket outlives the client
        for adapter in self.session.adapters.values():
            manager = getattr(adapter, "poolmanager", None)
            if manager is None:
                continue
            for key in list(manager.pools.keys()):
                with contextlib.suppress(KeyError):
                    manager.pools[key].close()
        self.session.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # -- where

    def _insecure(self) -> bool:
        return self.registry in self.config.insecure_registries or self.host in self.config.insecure_registries

    @property
    def base(self) -> str:
        """``http(s)://host`` chosen once: loopback is plain HTTP (as Docker does)."""
        if self._base is None:
            with self._lock:
                if self._base is None:
                    self._base = self._choose_base()
        return self._base

    def _choose_base(self) -> str:
        if self._plain_http is True or is_loopback(self.host):
            return f"http://{self.host}"
        if self._plain_http is False or not (self._insecure() or not self.tls_verify):
            return f"https://{self.host}"
        # insecure: HTTPS without verification if the registry speaks it, else plain HTTP
        try:
            self.session.get(f"https://{self.host}/v2/", timeout=min(self.config.timeout, 10), verify=False).close()
            return f"https://{self.host}"
        except requests.exceptions.SSLError:
            return f"http://{self.host}"
        except requests.ConnectionError:
            return f"http://{self.host}"

    def url(self, path: str) -> str:
        return self.base + path

    # -- credentials and tokens

    def _credentials(self) -> _auth.Credentials | None:
        if not self._creds_loaded:
            self._creds = _auth.get_credentials(self.registry, directory=self.config.docker_config)
            self._creds_loaded = True
        return self._creds

    def _auth_header(self, scope: str) -> str | None:
        with self._lock:
            if self._basic:
                creds = self._credentials()
                return _basic_header(creds) if creds else None
            tok = self._tokens.get(scope)
            if tok and tok[1] > time.monotonic():
                return tok[0]
        return None

    def _authenticate(self, resp: requests.Response, scope: str) -> bool:
        """Answer a 401's challenge; True if there is something new to retry with."""
        header = resp.headers.get("WWW-Authenticate", "")
        scheme, params = parse_challenge(header)
        creds = self._credentials()
        if scheme == "basic":
            with self._lock:
                self._basic = True
            if creds is None:
                raise AuthenticationError(f"registry {self.registry} requires authentication "
                                          f"(run `jupyter contain login {self.registry}`)")
            # retry only a request that went out without them (threads may race here)
            sent = resp.request.headers.get("Authorization", "") if resp.request is not None else ""
            return not sent.lower().startswith("basic ")
        if scheme == "bearer" and params.get("realm"):
            self._challenge = (scheme, params)
            token = self._fetch_token(params, scope, creds)
            with self._lock:
                self._tokens[scope] = token
            return True
        raise AuthenticationError(f"registry {self.registry} asks for unsupported authentication {header!r}")

    def _fetch_token(self, params: Mapping[str, str], scope: str, creds: _auth.Credentials | None
                     ) -> tuple[str, float]:
        realm = params["realm"]
        query: list[tuple[str, str]] = []
        if params.get("service"):
            query.append(("service", params["service"]))
        for s in scope.split():
            query.append(("scope", s))
        try:
            if creds is not None and creds.identity_token:
                form = dict(query)
                form.update(grant_type="refresh_token", refresh_token=creds.identity_token, client_id=USER_AGENT)
                resp = self.session.post(realm, data=[*query, ("grant_type", "refresh_token"),
                                                      ("refresh_token", creds.identity_token),
                                                      ("client_id", USER_AGENT)],
                                         timeout=self.config.timeout)
            else:
                headers = {"Authorization": _basic_header(creds)} if creds else {}
                if creds:
                    query.append(("account", creds.username))
                resp = self.session.get(realm, params=query, headers=headers, timeout=self.config.timeout)
        except _NETWORK_ERRORS as exc:
            raise RegistryError(f"cannot reach the token server of {self.registry} ({realm}): {_why(exc)}") from None
        with resp:
            if resp.status_code in (401, 403):
                if creds:
                    raise AuthenticationError(f"registry {self.registry} refused the credentials of "
                                              f"{creds.username or 'the identity token'} (wrong username or password?)")
                raise AuthenticationError(f"registry {self.registry} requires authentication "
                                          f"(run `jupyter contain login {self.registry}`)")
            if resp.status_code != 200:
                raise RegistryError(f"token server of {self.registry} answered {resp.status_code}")
            try:
                doc = resp.json()
                token = doc.get("token") or doc.get("access_token")
                expires = float(doc.get("expires_in") or 60)
            except (ValueError, AttributeError, TypeError):
                raise RegistryError(f"token server of {self.registry} answered nonsense") from None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"token server of {self.registry} gave no token")
        # renew a little early: a token must not expire between our check and the request
        return f"Bearer {token}", time.monotonic() + max(expires - 10, 5)

    # -- requests

    def request(self, method: str, path_or_url: str, *, scope: str, headers: Mapping[str, str] | None = None,
                data: bytes | Callable[[], Any] | None = None, stream: bool = False,
                what: str = "") -> requests.Response:
        """Send with auth, retries (connection errors, 429, 5xx) and redirects handled.

        ``data`` may be a callable returning a fresh body, so that a retry can resend it.
        Returns any final response (the caller judges its status); raises
        :class:`RegistryError` when the registry cannot be reached.
        """
        url = path_or_url if "://" in path_or_url else self.url(path_or_url)
        what = what or f"{method} {urllib.parse.urlsplit(url).path}"
        attempt = 0
        auth_tries = 0
        while True:
            attempt += 1
            try:
                resp = self._send_following(method, url, scope=scope, headers=headers, data=data, stream=stream)
            except _NETWORK_ERRORS as exc:
                if attempt >= self.config.retries:
                    raise RegistryError(f"cannot reach registry {self.registry} ({what}): {_why(exc)}") from None
                delay = self.config.backoff * 2 ** (attempt - 1)
                log.info("%s: %s; retrying in %.1f s", what, _why(exc), delay)
                time.sleep(delay)
                continue
            if resp.status_code == 401 and auth_tries < 2:
                auth_tries += 1
                resp.close()
                if self._authenticate(resp, scope):
                    attempt -= 1  # an auth round trip is not a failed attempt
                    continue
                return self._auth_failed(resp, scope)
            if resp.status_code == 401:
                return self._auth_failed(resp, scope)
            if resp.status_code in (429, 500, 502, 503, 504) and attempt < self.config.retries:
                delay = _retry_after(resp, self.config.backoff * 2 ** (attempt - 1), self.config.max_retry_after)
                log.info("%s: HTTP %d; retrying in %.1f s", what, resp.status_code, delay)
                resp.close()
                time.sleep(delay)
                continue
            return resp

    def _auth_failed(self, resp: requests.Response, scope: str) -> requests.Response:
        creds = self._credentials()
        if creds is None:
            raise AuthenticationError(f"registry {self.registry} requires authentication for {scope or 'this'} "
                                      f"(run `jupyter contain login {self.registry}`)")
        raise AuthenticationError(f"registry {self.registry} refused access to {scope or 'this'} for "
                                  f"{creds.username or 'the identity token'} (wrong credentials or no permission)")

    def _send_following(self, method: str, url: str, *, scope: str, headers: Mapping[str, str] | None,
                        data: bytes | Callable[[], Any] | None, stream: bool) -> requests.Response:
        origin = _origin(url)
        for _ in range(_MAX_REDIRECTS + 1):
            h = dict(headers or {})
            # the registry's credentials never go to another origin (blob storage, a CDN)
            if _origin(url) == origin:
                auth = self._auth_header(scope)
                if auth:
                    h["Authorization"] = auth
            body = data() if callable(data) else data
            self.requests_made += 1
            resp = self.session.request(method, url, headers=h, data=body, stream=stream, allow_redirects=False,
                                        timeout=self.config.timeout)
            if resp.status_code in (301, 302, 303, 307, 308) and resp.headers.get("Location"):
                url = urllib.parse.urljoin(url, resp.headers["Location"])
                resp.close()
                if resp.status_code == 303:
                    method, data = "GET", None
                continue
            return resp
        raise RegistryError(f"registry {self.registry}: too many redirects for {url}")

    def ping(self) -> None:
        """GET /v2/ with whatever auth it takes; raise if the registry refuses or is down."""
        resp = self.request("GET", "/v2/", scope="", what="GET /v2/")
        with resp:
            if resp.status_code != 200:
                raise RegistryError(f"registry {self.registry} answered {resp.status_code} to /v2/")


def _origin(url: str) -> tuple[str, str]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.netloc


def _basic_header(creds: _auth.Credentials) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()


def _why(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "Connection reset",
                   "IncompleteRead", "Connection broken", "Remote end closed", "certificate verify failed"):
        if marker in text:
            return marker.lower() if marker != "IncompleteRead" else "connection cut mid-transfer"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _status_error(resp: requests.Response, what: str, registry: str) -> ContainError:
    codes = _error_codes(resp)
    if resp.status_code == 404 or any(c in ("NAME_UNKNOWN", "MANIFEST_UNKNOWN", "BLOB_UNKNOWN") for c in codes):
        return ImageNotFound(f"{what}: not found in registry {registry}")
    if resp.status_code == 403 or "DENIED" in codes:
        return AuthenticationError(f"{what}: access denied by registry {registry}")
    detail = f" ({', '.join(codes)})" if codes else ""
    return RegistryError(f"{what}: registry {registry} answered HTTP {resp.status_code}{detail}")


# --- blob sources (for cross-repository mounts) ------------------------------------------


def record_sources(store: Store, digests: Iterable[str], repo_name: str) -> None:
    """Remember that these blobs are in ``registry/repository`` (one small append-only file per blob)."""
    d = store.root / _SOURCES_DIR
    d.mkdir(exist_ok=True)
    line = (repo_name + "\n").encode()
    for digest in dict.fromkeys(digests):
        path = d / digest_hex(digest)
        if repo_name in known_sources(store, digest):
            continue
        # O_APPEND of one short line is atomic: concurrent pulls cannot interleave
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def known_sources(store: Store, digest: str) -> list[str]:
    try:
        return [ln for ln in (store.root / _SOURCES_DIR / digest_hex(digest)).read_text().splitlines() if ln]
    except FileNotFoundError:
        return []


# --- pull ----------------------------------------------------------------------------


def _read_limited(resp: requests.Response, limit: int, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > limit:
        raise ManifestError(f"{what} is larger than {limit} bytes")
    buf = bytearray()
    for chunk in resp.iter_content(65536):
        buf += chunk
        if len(buf) > limit:
            raise ManifestError(f"{what} is larger than {limit} bytes")
    return bytes(buf)


def _fetch_manifest(client: Client, repo: str, ref: str, *, scope: str, expected: Descriptor | None = None
                    ) -> tuple[bytes, str, Manifest | Index]:
    what = f"manifest {client.registry}/{repo}:{ref}" if not ref.startswith("sha256:") else \
        f"manifest {client.registry}/{repo}@{ref}"
    try:
        resp = client.request("GET", f"/v2/{repo}/manifests/{ref}", scope=scope,
                              headers={"Accept": MANIFEST_ACCEPT}, what=what)
        with resp:
            if resp.status_code != 200:
                raise _status_error(resp, what, client.registry)
            body = _read_limited(resp, MAX_DOCUMENT_SIZE, what)
            ctype = resp.headers.get("Content-Type", "").split(";", 1)[0].strip() or None
            header_digest = resp.headers.get("Docker-Content-Digest")
    except _NETWORK_ERRORS as exc:
        raise RegistryError(f"{what}: connection lost: {_why(exc)}") from None
    actual = sha256_digest(body)
    if ref.startswith("sha256:") and actual != ref:
        raise DigestMismatch(what, ref, actual)
    if header_digest and header_digest.startswith("sha256:") and header_digest != actual:
        raise DigestMismatch(f"{what} (Docker-Content-Digest)", header_digest, actual)
    if expected is not None and len(body) != expected.size:
        raise DigestMismatch(f"{what}: size", str(expected.size), str(len(body)))
    if ctype in ("text/plain", "application/octet-stream", "application/json"):
        ctype = None
    doc = parse_document(body, media_type=ctype)
    media_type = doc.media_type
    return body, media_type, doc


class _Transfer:
    """One layer blob on its way in: the writer, the reader following it, and its state."""

    def __init__(self, index: int, desc: Descriptor, diff_id: str, *, download: bool, unpack: bool) -> None:
        self.index = index
        self.desc = desc
        self.diff_id = diff_id
        self.download = download
        self.unpack = unpack
        self.writer: BlobWriter | None = None
        self.read_fd: int | None = None
        self.written = 0
        self.complete = False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.staged_dir: Path | None = None
        self.range_requests = 0


class _Follower:
    """A file-like reader of a blob's temp file that waits for the downloader to catch up."""

    def __init__(self, t: _Transfer, abort: threading.Event) -> None:
        self._t = t
        self._abort = abort
        self._pos = 0

    def read(self, n: int = -1) -> bytes:
        t = self._t
        if n is None or n < 0:
            n = _READ_CHUNK
        while True:
            with t.cond:
                while self._pos >= t.written and not t.complete and t.error is None and not self._abort.is_set():
                    t.cond.wait(0.5)
                if t.error is not None or self._abort.is_set():
                    raise _Aborted()
                avail = t.written - self._pos
                if avail <= 0 and t.complete:
                    return b""
            assert t.read_fd is not None
            data = os.pread(t.read_fd, min(n, avail), self._pos)
            if data:
                self._pos += len(data)
                return data


def _download_blob(client: Client, repo: str, t: _Transfer, *, scope: str, tracker: _progress.Tracker,
                   abort: threading.Event) -> None:
    """Download into ``t.writer``, resuming with Range after a cut; verifies size and digest."""
    desc = t.desc
    w = t.writer
    assert w is not None
    what = f"layer {desc.digest}"
    failures = 0
    tracker.status(desc.digest, _progress.DOWNLOADING)
    while w.size < desc.size or w.size == 0 and desc.size == 0:
        if abort.is_set():
            raise _Aborted()
        headers = {"Accept-Encoding": "identity"}
        if w.size:
            headers["Range"] = f"bytes={w.size}-"
            t.range_requests += 1
        skip = 0
        try:
            resp = client.request("GET", f"/v2/{repo}/blobs/{desc.digest}", scope=scope, headers=headers,
                                  stream=True, what=what)
            with resp:
                if resp.status_code == 206 and w.size and resp.headers.get("Content-Range", "").startswith(
                        f"bytes {w.size}-"):
                    pass
                elif resp.status_code in (200, 206):
                    # the registry ignored our Range: the transfer starts over, and the bytes we
                    # already hold are dropped from the new stream (the digest checks them all)
                    skip = w.size
                    if skip:
                        log.info("%s: registry ignored Range; starting over", what)
                elif resp.status_code == 416 and w.size >= desc.size:
                    break
                elif resp.status_code == 404 and desc.media_type in FOREIGN_LAYER_TYPES:
                    raise _foreign_layer_error(desc, client.registry)
                else:
                    raise _status_error(resp, what, client.registry)
                for chunk in resp.raw.stream(_READ_CHUNK, decode_content=False):
                    if abort.is_set():
                        raise _Aborted()
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk = chunk[skip:]
                        skip = 0
                    w.write(chunk)  # raises DigestMismatch past the announced size
                    w.flush()
                    with t.cond:
                        t.written = w.size
                        t.cond.notify_all()
                    tracker.advance(desc.digest, len(chunk))
            if w.size < desc.size:
                raise requests.exceptions.ChunkedEncodingError("IncompleteRead: stream ended early")
            if desc.size == 0:
                break
        except _NETWORK_ERRORS as exc:
            failures += 1
            if failures >= client.config.retries:
                raise RegistryError(f"{what}: connection to registry {client.registry} lost "
                                    f"({_why(exc)}) after {failures} attempts") from None
            tracker.status(desc.digest, _progress.RETRYING, f"{_why(exc)} at {w.size} bytes")
            time.sleep(client.config.backoff * 2 ** (failures - 1))
            tracker.status(desc.digest, _progress.DOWNLOADING)
    w.verify()


def _foreign_layer_error(desc: Descriptor, registry: str) -> ManifestError:
    # a non-distributable layer's urls lead outside the registry (Windows base layers,
    # licensed content); a pull follows the registry only, as it must verify what it trusts
    where = f" (the image says it is at {', '.join(desc.urls)})" if desc.urls else ""
    return ManifestError(f"layer {desc.digest} is a non-distributable (foreign) layer ({desc.media_type}) "
                         f"that registry {registry} does not serve{where}: jupyter-contain takes layers from "
                         f"the registry only; push the image with its foreign layers included (e.g. "
                         f"`skopeo copy` from a copy that has them) or use an image without them")


def _enospc(exc: OSError, store: Store, what: str) -> StoreError:
    return StoreError(f"no space left on device under {store.root} while {what}")


def pull(store: Store, reference: str, *, platform: Platform | None = None,
         progress: _progress.ProgressCallback | None = None, tls_verify: bool = True,
         config: RegistryConfig | None = None) -> ImageRecord:
    """Pull ``reference`` into ``store``, unpack its layers and tag it; returns the image.

    Every blob's size and digest and every layer's DiffID is checked before
    anything is committed; on failure the store is left as it was.
    """
    ref = Reference.parse(reference)
    config = config or RegistryConfig.load(store.root)
    platform = platform or Platform.host()
    tracker = _progress.Tracker("pull", str(ref), progress)
    hosts: list[tuple[str, bool | None]] = []
    for mirror in config.mirrors.get(ref.registry, ()):
        plain = True if mirror.startswith("http://") else (False if mirror.startswith("https://") else None)
        hosts.append((_auth.normalize_server(mirror), plain))
    hosts.append((ref.registry, None))
    last_exc: ContainError | None = None
    for i, (host, plain) in enumerate(hosts):
        is_mirror = i < len(hosts) - 1
        client = Client(host, config=config, tls_verify=tls_verify, plain_http=plain)
        try:
            return _pull_from(client, store, ref, platform=platform, tracker=tracker, config=config)
        except (RegistryError, ImageNotFound) as exc:
            if not is_mirror:
                raise
            log.warning("mirror %s failed for %s: %s; trying the next", host, ref, exc)
            last_exc = exc
        finally:
            client.close()
    raise last_exc or RegistryError(f"no registry to pull {ref} from")


def _pull_from(client: Client, store: Store, ref: Reference, *, platform: Platform,
               tracker: _progress.Tracker, config: RegistryConfig) -> ImageRecord:
    repo = ref.repository
    scope = f"repository:{repo}:pull"
    try:
        # 1. the manifest (through an index if need be), verified
        body, media_type, doc = _fetch_manifest(client, repo, ref.digest or ref.tag or "latest", scope=scope)
        top_digest = sha256_digest(body)
        index_body: bytes | None = None
        if isinstance(doc, Index):
            chosen = doc.select(platform)
            index_body = body   # kept as served: NAME@<its digest> must find the image again
            body, media_type, doc = _fetch_manifest(client, repo, chosen.digest, scope=scope, expected=chosen)
            if isinstance(doc, Index):
                raise ManifestError(f"{ref}: an index inside an index is not supported")
            if doc.media_type != chosen.media_type:
                raise ManifestError(f"{ref}: the index says {chosen.digest} is a {chosen.media_type}, "
                                    f"the registry served a {doc.media_type}")
        manifest: Manifest = doc
        manifest_desc = Descriptor(media_type, sha256_digest(body), len(body))

        with store.writing():
            # 2. the config (small: read into memory, verified)
            config_bytes = _fetch_small_blob(client, repo, manifest.config, scope=scope, store=store)
            image_config = ImageConfig.parse(config_bytes)
            if len(image_config.diff_ids) != len(manifest.layers):
                raise ManifestError(f"{ref}: {len(manifest.layers)} layers but "
                                    f"{len(image_config.diff_ids)} diff_ids in the config")
            tracker.resolved([(manifest.config.digest, -1, manifest.config.size)]
                             + [(d.digest, i, d.size) for i, d in enumerate(manifest.layers)])
            tracker.status(manifest.config.digest, _progress.DONE)

            # 3. the layers: download concurrently, unpack in order while they stream
            _pull_layers(client, store, repo, manifest, image_config, scope=scope, tracker=tracker, config=config)

            # 4. the documents, then the tag: nothing names a blob that is not in place
            if not store.has_blob(manifest.config.digest):
                store.write_blob(config_bytes, expected_digest=manifest.config.digest, what="image config")
            store.write_blob(body, expected_digest=manifest_desc.digest, what="manifest")
            if index_body is not None:
                store.write_blob(index_body, expected_digest=top_digest, what="index")
            record_sources(store, [manifest.config.digest, *(d.digest for d in manifest.layers),
                                   manifest_desc.digest], f"{ref.registry}/{repo}")
            # pulled by digest only: a tag derived from the digest keeps it from gc
            tag = ref.tag or "sha256-" + digest_hex(ref.digest or top_digest)
            name = Reference(ref.registry, repo, tag)
            store.tag(name, manifest_desc, index_digest=top_digest if index_body is not None else None)
    except _NETWORK_ERRORS as exc:
        raise RegistryError(f"pulling {ref}: connection to registry {client.registry} lost: {_why(exc)}") from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _enospc(exc, store, f"pulling {ref}") from None
        raise StoreError(f"pulling {ref}: {exc}") from None
    tracker.finished()
    return ImageRecord(name=str(name), descriptor=manifest_desc, manifest=manifest, config=image_config,
                       index_digest=top_digest if index_body is not None else None)


def _fetch_small_blob(client: Client, repo: str, desc: Descriptor, *, scope: str, store: Store) -> bytes:
    if store.has_blob(desc.digest):
        return store.read_blob(desc.digest)
    what = f"blob {desc.digest}"
    try:
        resp = client.request("GET", f"/v2/{repo}/blobs/{desc.digest}", scope=scope, what=what,
                              headers={"Accept-Encoding": "identity"})
        with resp:
            if resp.status_code != 200:
                raise _status_error(resp, what, client.registry)
            data = _read_limited(resp, MAX_DOCUMENT_SIZE, what)
    except _NETWORK_ERRORS as exc:
        raise RegistryError(f"{what}: connection lost: {_why(exc)}") from None
    if len(data) != desc.size:
        raise DigestMismatch(f"{what}: size", str(desc.size), str(len(data)))
    if sha256_digest(data) != desc.digest:
        raise DigestMismatch(what, desc.digest, sha256_digest(data))
    return data


def _pull_layers(client: Client, store: Store, repo: str, manifest: Manifest, image_config: ImageConfig, *,
                 scope: str, tracker: _progress.Tracker, config: RegistryConfig) -> None:
    from .layers import unpack_layer  # compression libraries: import when needed

    transfers: list[_Transfer] = []
    seen: set[str] = set()
    for i, (desc, diff_id) in enumerate(zip(manifest.layers, image_config.diff_ids)):
        if diff_id in seen:  # the same layer twice (empty layers): one transfer
            tracker.status(desc.digest, _progress.EXISTS)
            continue
        seen.add(diff_id)
        have_blob, have_dir = store.has_blob(desc.digest), store.unpacked(diff_id)
        if have_blob and have_dir:
            tracker.status(desc.digest, _progress.EXISTS)
            continue
        transfers.append(_Transfer(i, desc, diff_id, download=not have_blob, unpack=not have_dir))
    # lower dirs for every layer: final ones where the store has them, staged ones otherwise
    dirs: dict[int, Path] = {}
    staging = Path(store.tmp_dir) / f"pull-{os.getpid()}-{threading.get_ident()}-{time.monotonic_ns()}"
    abort = threading.Event()
    pool: ThreadPoolExecutor | None = None
    futures: list[Future] = []
    try:
        staging.mkdir()
        for t in transfers:
            if t.download:
                t.writer = store.blob_writer(expected_digest=t.desc.digest, expected_size=t.desc.size,
                                             what=f"layer {t.desc.digest}")
                t.read_fd = os.open(t.writer.path, os.O_RDONLY | os.O_CLOEXEC)
            elif t.unpack:  # blob already stored: read it whole
                t.read_fd = os.open(store.blob_path(t.desc.digest), os.O_RDONLY | os.O_CLOEXEC)
                t.written = t.desc.size
                t.complete = True
        downloads = [t for t in transfers if t.download]
        if downloads:
            pool = ThreadPoolExecutor(max_workers=max(1, config.max_concurrent_downloads),
                                      thread_name_prefix="pull")

            def run(t: _Transfer) -> None:
                try:
                    _download_blob(client, repo, t, scope=scope, tracker=tracker, abort=abort)
                except BaseException as exc:
                    with t.cond:
                        t.error = exc
                        t.cond.notify_all()
                    raise
                with t.cond:
                    t.complete = True
                    t.cond.notify_all()
                if not t.unpack:
                    tracker.status(t.desc.digest, _progress.DONE)

            futures = [pool.submit(run, t) for t in downloads]

        # unpack in layer order, each following its download
        for i, diff_id in enumerate(image_config.diff_ids):
            if store.unpacked(diff_id):
                dirs.setdefault(i, store.layer_dir(diff_id))
        by_diff: dict[str, Path] = {}
        for t in transfers:
            if not t.unpack:
                continue
            lowers = [dirs[j] for j in sorted(dirs) if j < t.index]
            t.staged_dir = staging / digest_hex(t.diff_id)
            if not t.download:
                tracker.status(t.desc.digest, _progress.UNPACKING)
            try:
                unpack_layer(_Follower(t, abort), t.staged_dir, media_type=t.desc.media_type,
                             layer=t.desc.digest, expected_diff_id=t.diff_id, lower_dirs=list(reversed(lowers)),
                             rootless=store.rootless)
            except _Aborted:
                break
            except BaseException:
                # a corrupt blob usually breaks the unpack before its digest can be checked:
                # let the download finish, and tell its failure (the cause) if it has one
                if t.download:
                    with t.cond:
                        while not t.complete and t.error is None:
                            t.cond.wait(0.5)
                    if t.error is not None and not isinstance(t.error, _Aborted):
                        raise t.error from None
                raise
            dirs[t.index] = t.staged_dir
            by_diff[t.diff_id] = t.staged_dir
            if not t.download or t.complete:
                tracker.status(t.desc.digest, _progress.DONE)
        for i, diff_id in enumerate(image_config.diff_ids):
            dirs.setdefault(i, by_diff.get(diff_id, store.layer_dir(diff_id)))
        # wait for every download, and tell the first failure
        first: BaseException | None = None
        for f in futures:
            try:
                f.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                if first is None and not isinstance(exc, _Aborted):
                    first = exc
        if first is None:
            for t in transfers:
                if t.error is not None and not isinstance(t.error, _Aborted):
                    first = t.error
                    break
        if first is not None:
            raise first
        for t in transfers:
            if t.unpack and t.staged_dir is None:
                raise RegistryError(f"layer {t.desc.digest} was not unpacked")
        # every blob and layer checked out: commit the blobs, then move the layers into place
        for t in transfers:
            if t.writer is not None:
                t.writer.commit()
        for t in transfers:
            if t.unpack and t.staged_dir is not None:
                with store.layer_lock(t.diff_id):
                    dest = store.layer_dir(t.diff_id)
                    if dest.is_dir():  # another pull got there first: the same content
                        remove_tree(t.staged_dir)
                    else:
                        os.rename(t.staged_dir, dest)
                tracker.status(t.desc.digest, _progress.DONE)
    except BaseException:
        abort.set()
        raise
    finally:
        abort.set()  # after success every download is done; after a failure they stop
        if pool is not None:
            pool.shutdown(wait=True)
        for t in transfers:
            if t.read_fd is not None:
                os.close(t.read_fd)
            if t.writer is not None and t.writer.digest is None:
                t.writer.abort()
        remove_tree(staging)


# --- push ----------------------------------------------------------------------------


@dataclass(frozen=True)
class PushResult:
    reference: str                  # where it went, e.g. "127.0.0.1:5000/busybox:latest"
    digest: str                     # the manifest digest the registry stored
    uploaded: tuple[str, ...]       # blob digests sent
    mounted: tuple[str, ...]        # blobs mounted from another repository
    existing: tuple[str, ...]       # blobs the registry already had


def _upload_url(client: Client, resp: requests.Response, what: str) -> str:
    loc = resp.headers.get("Location")
    if not loc:
        raise RegistryError(f"{what}: registry {client.registry} gave no upload location")
    return urllib.parse.urljoin(client.base + "/", loc)


def _with_query(url: str, **params: str) -> str:
    parts = urllib.parse.urlsplit(url)
    q = urllib.parse.parse_qsl(parts.query, keep_blank_values=True) + list(params.items())
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(q)))


def _push_blob(client: Client, store: Store, repo: str, desc: Descriptor, *, scope: str,
               mount_from: list[str], tracker: _progress.Tracker, config: RegistryConfig) -> str:
    """Make ``desc`` present in ``repo``; returns EXISTS, MOUNTED or DONE (uploaded)."""
    what = f"blob {desc.digest}"
    resp = client.request("HEAD", f"/v2/{repo}/blobs/{desc.digest}", scope=scope, what=what)
    resp.close()
    if resp.status_code == 200:
        tracker.status(desc.digest, _progress.EXISTS)
        return _progress.EXISTS
    if resp.status_code != 404:
        raise _status_error(resp, what, client.registry)
    location = None
    for source in mount_from:
        query = urllib.parse.urlencode({"mount": desc.digest, "from": source})
        resp = client.request("POST", f"/v2/{repo}/blobs/uploads/?{query}", scope=scope, what=f"mount {what}")
        resp.close()
        if resp.status_code == 201:
            tracker.status(desc.digest, _progress.MOUNTED, f"from {source}")
            return _progress.MOUNTED
        if resp.status_code == 202:  # mount refused, an upload session started instead
            location = _upload_url(client, resp, what)
            break
    if location is None:
        resp = client.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope, what=f"upload {what}")
        resp.close()
        if resp.status_code != 202:
            raise _status_error(resp, f"upload {what}", client.registry)
        location = _upload_url(client, resp, what)
    tracker.status(desc.digest, _progress.UPLOADING)
    path = store.blob_path(desc.digest)
    if desc.size <= config.chunk_threshold:
        bodies: list[_CountingFile] = []

        def body() -> Any:  # a fresh file for each attempt
            tracker.restart(desc.digest, 0)
            bodies.append(_CountingFile(path, lambda n: tracker.advance(desc.digest, n)))
            return bodies[-1]
        try:
            resp = client.request("PUT", _with_query(location, digest=desc.digest), scope=scope, data=body,
                                  headers={"Content-Type": "application/octet-stream",
                                           "Content-Length": str(desc.size)}, what=f"upload {what}")
            resp.close()
        finally:
            for b in bodies:
                b.close()
    else:
        offset = 0
        with open(path, "rb") as f:
            while offset < desc.size:
                chunk = f.read(config.chunk_size)
                end = offset + len(chunk) - 1
                resp = client.request("PATCH", location, scope=scope, data=chunk, what=f"upload {what}",
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Range": f"{offset}-{end}",
                                               "Content-Length": str(len(chunk))})
                resp.close()
                if resp.status_code != 202:
                    raise _status_error(resp, f"upload {what} (chunk at {offset})", client.registry)
                location = _upload_url(client, resp, what)
                offset += len(chunk)
                tracker.advance(desc.digest, len(chunk))
        resp = client.request("PUT", _with_query(location, digest=desc.digest), scope=scope, data=b"",
                              headers={"Content-Length": "0"}, what=f"upload {what}")
        resp.close()
    if resp.status_code != 201:
        raise _status_error(resp, f"upload {what}", client.registry)
    tracker.status(desc.digest, _progress.DONE)
    return _progress.DONE


class _CountingFile:
    """A file body for requests that reports bytes as they are read."""

    def __init__(self, path: Path, on_read: Callable[[int], None]) -> None:
        self._f = open(path, "rb")
        self._on_read = on_read
        self.len = os.fstat(self._f.fileno()).st_size  # requests uses it for Content-Length

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n if n and n > 0 else 1 << 20)
        if data:
            self._on_read(len(data))
        else:
            self._f.close()
        return data

    def __iter__(self) -> Iterator[bytes]:  # requests streams iterables; read in 1 MiB pieces
        while data := self.read(1 << 20):
            yield data

    def close(self) -> None:
        self._f.close()


def push(store: Store, image_name: str, dest: str | None = None, *,
         progress: _progress.ProgressCallback | None = None, tls_verify: bool = True,
         config: RegistryConfig | None = None) -> PushResult:
    """Push image ``image_name`` from the store to ``dest`` (default: its own name)."""
    rec = store.resolve(image_name)
    target = Reference.parse(dest) if dest else Reference.parse(rec.name)
    if target.tag is None and target.digest is None:
        target = target.with_tag("latest")
    if target.registry == "localhost" and not dest:
        raise RegistryError(f"{rec.familiar} is a local image: give a destination (REGISTRY/NAME[:TAG])")
    config = config or RegistryConfig.load(store.root)
    repo = target.repository
    tracker = _progress.Tracker("push", str(target), progress)
    blobs = [*rec.manifest.layers, rec.manifest.config]
    mount_sources: dict[str, list[str]] = {}
    for b in blobs:
        srcs = []
        for s in known_sources(store, b.digest):
            reg, _, r = s.partition("/")
            if reg == target.registry and r != repo and r not in srcs:
                srcs.append(r)
        mount_sources[b.digest] = srcs[:3]
    scope = " ".join([f"repository:{repo}:pull,push",
                      *sorted({f"repository:{r}:pull" for v in mount_sources.values() for r in v})])
    tracker.resolved([(rec.manifest.config.digest, -1, rec.manifest.config.size)]
                     + [(d.digest, i, d.size) for i, d in enumerate(rec.manifest.layers)])
    manifest_bytes = store.read_blob(rec.digest)
    results: dict[str, str] = {}
    with Client(target.registry, config=config, tls_verify=tls_verify) as client:
        unique = list({b.digest: b for b in blobs}.values())
        with ThreadPoolExecutor(max_workers=max(1, config.max_concurrent_uploads),
                                thread_name_prefix="push") as pool:
            futs = {b.digest: pool.submit(_push_blob, client, store, repo, b, scope=scope,
                                          mount_from=mount_sources[b.digest], tracker=tracker, config=config)
                    for b in unique}
            for d, f in futs.items():
                try:
                    results[d] = f.result()
                except _NETWORK_ERRORS as exc:
                    raise RegistryError(f"pushing {target}: connection lost: {_why(exc)}") from None
        tag = target.tag or target.digest
        what = f"manifest {target}"
        resp = client.request("PUT", f"/v2/{repo}/manifests/{tag}", scope=scope, data=manifest_bytes,
                              headers={"Content-Type": rec.descriptor.media_type or rec.manifest.media_type},
                              what=what)
        resp.close()
        if resp.status_code not in (200, 201):
            raise _status_error(resp, what, client.registry)
        got = resp.headers.get("Docker-Content-Digest")
        if got and got != rec.digest:
            raise DigestMismatch(f"{what} (as stored by the registry)", rec.digest, got)
    record_sources(store, [*(b.digest for b in blobs), rec.digest], f"{target.registry}/{repo}")
    tracker.finished()
    return PushResult(
        reference=str(target), digest=rec.digest,
        uploaded=tuple(d for d, r in results.items() if r == _progress.DONE),
        mounted=tuple(d for d, r in results.items() if r == _progress.MOUNTED),
        existing=tuple(d for d, r in results.items() if r == _progress.EXISTS),
    )


# --- login ---------------------------------------------------------------------------


def login(registry: str, username: str, password: str, *, tls_verify: bool = True,
          config: RegistryConfig | None = None) -> str:
    """Check the credentials against ``registry`` and save them; returns where they went."""
    registry = _auth.normalize_server(registry or DEFAULT_REGISTRY)
    config = config or RegistryConfig.load(None)
    creds = _auth.Credentials(username, password)
    with Client(registry, config=config, tls_verify=tls_verify, credentials=creds) as client:
        client.ping()
    return _auth.store_credentials(registry, creds, directory=config.docker_config)


def logout(registry: str, *, config: RegistryConfig | None = None) -> bool:
    """Forget the saved credentials of ``registry``; True if there were any."""
    registry = _auth.normalize_server(registry or DEFAULT_REGISTRY)
    config = config or RegistryConfig.load(None)
    return _auth.erase_credentials(registry, directory=config.docker_config)
