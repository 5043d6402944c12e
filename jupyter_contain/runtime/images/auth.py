"""Registry credentials as Docker keeps them: ``config.json`` and credential helpers.

Owns reading and writing ``$DOCKER_CONFIG/config.json`` (default ``~/.docker``):
the ``auths`` map (base64 ``user:password`` in ``auth``, or ``username`` and
``password``, or an ``identitytoken``), ``credsStore`` and ``credHelpers``
(``docker-credential-NAME get|store|erase`` with the server URL on stdin), and
the file's safety rules (written atomically, mode 0600, unknown keys kept).
Must not talk to registries (``registry.login`` checks credentials first, then
calls :func:`store_credentials`) and must never log a secret.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import AuthenticationError, RegistryError
from ..fsutil import atomic_write

log = logging.getLogger(__name__)

#: the key Docker uses in ``auths`` for Docker Hub
DOCKER_HUB_KEY = "https://index.docker.io/v1/"
_HUB_NAMES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = ""
    #: an OAuth2 refresh token (Docker's ``identitytoken``), used instead of a password
    identity_token: str = ""

    def __repr__(self) -> str:  # never show the secret in a traceback or log
        return f"Credentials(username={self.username!r}, password=***)"


def config_dir() -> Path:
    """``$DOCKER_CONFIG``, else ``~/.docker``."""
    env = os.environ.get("DOCKER_CONFIG")
    return Path(env) if env else Path(os.path.expanduser("~")) / ".docker"


def config_path(directory: Path | None = None) -> Path:
    return (directory or config_dir()) / "config.json"


def normalize_server(server: str) -> str:
    """``https://index.docker.io/v1/`` -> ``docker.io``; ``http://h:5000/x`` -> ``h:5000``."""
    s = server.strip()
    for prefix in ("https://", "http://"):
        if s.startswith(prefix):
            s = s[len(prefix):]
    s = s.split("/", 1)[0]
    return "docker.io" if s in _HUB_NAMES else s


def _auth_key(registry: str) -> str:
    """The key Docker writes into ``auths`` for ``registry``."""
    return DOCKER_HUB_KEY if normalize_server(registry) == "docker.io" else normalize_server(registry)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise AuthenticationError(f"cannot read {path}: {exc.strerror}") from None
    if not data.strip():
        return {}
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise AuthenticationError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise AuthenticationError(f"{path} is not a JSON object")
    return doc


def _write_config(path: Path, doc: dict[str, Any]) -> None:
    """Atomic replace with mode 0600 (the file holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps(doc, indent="\t").encode() + b"\n", mode=0o600)


def _helper_for(doc: dict[str, Any], registry: str) -> str | None:
    helpers = doc.get("credHelpers") or {}
    if isinstance(helpers, dict):
        for key, name in helpers.items():
            if normalize_server(key) == registry and isinstance(name, str) and name:
                return name
    store = doc.get("credsStore")
    return store if isinstance(store, str) and store else None


def _run_helper(name: str, action: str, payload: str) -> subprocess.CompletedProcess:
    exe = shutil.which(f"docker-credential-{name}")
    if exe is None:
        raise AuthenticationError(f"credential helper docker-credential-{name} not found on PATH "
                                  f"(named in {config_path()})")
    try:
        return subprocess.run([exe, action], input=payload, capture_output=True, text=True, timeout=60,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AuthenticationError(f"credential helper docker-credential-{name} failed: {exc}") from None


def _helper_get(name: str, registry: str) -> Credentials | None:
    # helpers key by what `docker login` stored: try the URL forms Docker uses
    for server in dict.fromkeys([_auth_key(registry), registry, f"https://{registry}"]):
        proc = _run_helper(name, "get", server)
        if proc.returncode == 0:
            try:
                doc = json.loads(proc.stdout)
                user, secret = doc.get("Username", ""), doc.get("Secret", "")
            except (ValueError, AttributeError):
                raise AuthenticationError(f"credential helper docker-credential-{name} answered nonsense") from None
            if user == "<token>":
                return Credentials(username="", identity_token=secret)
            return Credentials(username=user, password=secret)
        if "credentials not found" not in (proc.stdout + proc.stderr).lower():
            raise AuthenticationError(f"credential helper docker-credential-{name} failed: "
                                      f"{(proc.stderr or proc.stdout).strip()[:200]}")
    return None


def get_credentials(registry: str, *, directory: Path | None = None) -> Credentials | None:
    """Credentials for ``registry`` (``host[:port]`` or ``docker.io``), or None."""
    registry = normalize_server(registry)
    doc = _read_config(config_path(directory))
    helper = _helper_for(doc, registry)
    if helper:
        creds = _helper_get(helper, registry)
        if creds is not None:
            return creds
    auths = doc.get("auths") or {}
    if not isinstance(auths, dict):
        return None
    for key, entry in auths.items():
        if normalize_server(key) != registry or not isinstance(entry, dict):
            continue
        if entry.get("identitytoken"):
            return Credentials(username=entry.get("username", ""), identity_token=entry["identitytoken"])
        if entry.get("auth"):
            try:
                user, sep, pw = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                raise AuthenticationError(f"{config_path(directory)}: the auth entry for {key} is not "
                                          "base64 of user:password") from None
            if not sep:
                raise AuthenticationError(f"{config_path(directory)}: the auth entry for {key} has no ':'")
            return Credentials(user, pw)
        if entry.get("username"):
            return Credentials(entry["username"], entry.get("password", ""))
    return None


def store_credentials(registry: str, creds: Credentials, *, directory: Path | None = None) -> str:
    """Save ``creds`` (in the helper if one is configured, else in ``auths``); returns where."""
    registry = normalize_server(registry)
    path = config_path(directory)
    doc = _read_config(path)
    helper = _helper_for(doc, registry)
    if helper:
        payload = json.dumps({"ServerURL": _auth_key(registry), "Username": creds.username,
                              "Secret": creds.password})
        proc = _run_helper(helper, "store", payload)
        if proc.returncode != 0:
            raise AuthenticationError(f"credential helper docker-credential-{helper} could not store: "
                                      f"{(proc.stderr or proc.stdout).strip()[:200]}")
        return f"docker-credential-{helper}"
    auths = doc.get("auths")
    if not isinstance(auths, dict):
        auths = {}
    # drop other spellings of the same registry, so lookups are unambiguous
    auths = {k: v for k, v in auths.items() if normalize_server(k) != registry}
    auths[_auth_key(registry)] = {
        "auth": base64.b64encode(f"{creds.username}:{creds.password}".encode()).decode()
    }
    doc["auths"] = auths
    try:
        _write_config(path, doc)
    except OSError as exc:
        raise RegistryError(f"cannot write {path}: {exc.strerror}") from None
    return str(path)


def erase_credentials(registry: str, *, directory: Path | None = None) -> bool:
    """Forget the credentials for ``registry``; True if there were any."""
    registry = normalize_server(registry)
    path = config_path(directory)
    doc = _read_config(path)
    found = False
    helper = _helper_for(doc, registry)
    if helper:
        proc = _run_helper(helper, "erase", _auth_key(registry))
        found = proc.returncode == 0
    auths = doc.get("auths")
    if isinstance(auths, dict):
        kept = {k: v for k, v in auths.items() if normalize_server(k) != registry}
        if len(kept) != len(auths):
            found = True
            doc["auths"] = kept
            try:
                _write_config(path, doc)
            except OSError as exc:
                raise RegistryError(f"cannot write {path}: {exc.strerror}") from None
    return found
