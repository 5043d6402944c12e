"""A real local OCI registry for tests: Debian's ``docker-registry`` on 127.0.0.1.

Owns: starting and stopping one ``docker-registry`` (distribution v2) process per
context, with a generated ``config.yml`` and a temporary storage directory, in
three auth modes (none, htpasswd Basic, Bearer token with a small in-process
token server); pushing and inspecting images with ``skopeo``; building a tiny
OCI layout with ``umoci``.

Must not: be a conftest (tests/conftest.py imports from here and wires the
fixtures), listen anywhere but loopback, or leave a process or a directory
behind: registries are ended by PID, the token server thread is shut down, and
the directory this module created is removed.

Credentials: the htpasswd file is written in Python with the ``bcrypt`` package
(pip-installed into the venv); the token server signs ES256 JWTs with a P-256
key and a self-signed certificate made with ``cryptography``; the registry
trusts that certificate through ``auth.token.rootcertbundle`` and finds the key
through the JWT's ``kid`` (libtrust key ID of the certificate's public key).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import http.server
import json
import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

REGISTRY_BINARY = "/usr/bin/docker-registry"
TOKEN_SERVICE = "jupyter-contain-test-registry"
TOKEN_ISSUER = "jupyter-contain-test-token-server"

AuthMode = Literal["none", "basic", "token"]


@dataclass(frozen=True)
class RegistryInfo:
    """Where a running test registry is and how to talk to it."""

    host: str                       # "127.0.0.1"
    port: int
    storage: Path                   # the registry's rootdirectory
    auth: AuthMode
    users: Mapping[str, str]        # username -> password (plain, for clients)
    pid: int
    config_path: Path
    log_path: Path
    token_realm: str | None = None  # http://127.0.0.1:N/token in token mode
    service: str | None = None      # the token "service" in token mode
    #: (method, path+query, username or None, HTTP status) of every request the
    #: token server answered, in order; lets tests assert the client's flow.
    token_requests: list[tuple[str, str, str | None, int]] = field(default_factory=list)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the registry part of an image reference."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def credentials(self) -> tuple[str, str] | None:
        """The first user's (username, password), or None without users."""
        return next(iter(self.users.items()), None)


# ------------------------------------------------------------------ registry

@contextlib.contextmanager
def start_registry(
    tmp: Path,
    *,
    auth: AuthMode = "none",
    users: Mapping[str, str] | None = None,
    anonymous_pull: bool = False,
    startup_timeout: float = 20.0,
) -> Iterator[RegistryInfo]:
    """Run a registry on 127.0.0.1 for the duration of the ``with`` block.

    ``users`` default to ``{"tester": "<random>"}`` for ``basic`` and ``token``.
    In token mode, ``anonymous_pull`` lets requests without credentials get a
    pull-only token (Docker Hub's public-repository behaviour); otherwise they
    get a token with no access at all.
    """
    if not os.access(REGISTRY_BINARY, os.X_OK):
        raise RuntimeError(f"{REGISTRY_BINARY} missing: apt-get install docker-registry")
    if auth not in ("none", "basic", "token"):
        raise ValueError(f"auth must be none, basic or token, not {auth!r}")
    if users is None or (not users and auth != "none"):
        # "p" first: a token_urlsafe password may start with "-", which a
        # command line's "-p PASSWORD" would take for an option
        users = {} if auth == "none" else {"tester": "p" + secrets.token_urlsafe(12)}
    users = dict(users)

    Path(tmp).mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="registry-", dir=tmp))
    token_server: _TokenServer | None = None
    proc: subprocess.Popen | None = None
    try:
        storage = root / "storage"
        storage.mkdir()
        cfg_auth: dict = {}
        requests_log: list[tuple[str, str, str | None, int]] = []
        if auth == "basic":
            htpasswd = root / "htpasswd"
            htpasswd.write_text(make_htpasswd(users))
            cfg_auth = {"htpasswd": {"realm": "jupyter-contain-test", "path": str(htpasswd)}}
        elif auth == "token":
            key_pem, cert_pem, kid = _make_signing_key()
            (root / "token-cert.pem").write_bytes(cert_pem)
            token_server = _TokenServer(key_pem=key_pem, kid=kid, users=users,
                                        anonymous_pull=anonymous_pull,
                                        requests_log=requests_log)
            token_server.start()
            cfg_auth = {"token": {
                "realm": token_server.realm,
                "service": TOKEN_SERVICE,
                "issuer": TOKEN_ISSUER,
                "rootcertbundle": str(root / "token-cert.pem"),
            }}

        log_path = root / "registry.log"
        config_path = root / "config.yml"
        last_error = ""
        for _attempt in range(3):  # a free port can be taken between probe and bind
            port = _free_port()
            config = {
                "version": 0.1,
                "log": {"level": "info", "accesslog": {"disabled": False}},
                "storage": {
                    "filesystem": {"rootdirectory": str(storage)},
                    "delete": {"enabled": True},
                    "maintenance": {"uploadpurging": {"enabled": False}},
                    "redirect": {"disable": True},
                },
                "http": {"addr": f"127.0.0.1:{port}", "secret": secrets.token_hex(16),
                         "headers": {"X-Content-Type-Options": ["nosniff"]}},
                "health": {"storagedriver": {"enabled": False}},
            }
            if cfg_auth:
                config["auth"] = cfg_auth
            # JSON is YAML; no PyYAML needed.
            config_path.write_text(json.dumps(config, indent=2))
            with open(log_path, "ab") as logf:
                proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config_path)],
                                        stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                        cwd=root)
            ok, last_error = _wait_ready(proc, f"http://127.0.0.1:{port}/v2/", log_path,
                                         timeout=startup_timeout)
            if ok:
                break
            _stop(proc)
            proc = None
            if "address already in use" not in last_error:
                break
        if proc is None:
            raise RuntimeError(f"docker-registry did not start: {last_error}")
        info = RegistryInfo(
            host="127.0.0.1", port=port, storage=storage, auth=auth, users=users, pid=proc.pid,
            config_path=config_path, log_path=log_path,
            token_realm=token_server.realm if token_server else None,
            service=TOKEN_SERVICE if token_server else None,
            token_requests=requests_log,
        )
        yield info
    finally:
        if proc is not None:
            _stop(proc)
        if token_server is not None:
            token_server.stop()
        shutil.rmtree(root, ignore_errors=True)


def make_htpasswd(users: Mapping[str, str]) -> str:
    """An htpasswd file body with bcrypt hashes (the only kind distribution accepts)."""
    import bcrypt

    lines = []
    for name, password in users.items():
        if ":" in name:
            raise ValueError(f"user name {name!r} must not contain ':'")
        # Low cost: bcrypt at the default 12 rounds costs the registry ~250 ms
        # per request here; security of a throwaway test password is moot.
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
        lines.append(f"{name}:{hashed}\n")
    return "".join(lines)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(proc: subprocess.Popen, url: str, log_path: Path, *, timeout: float) -> tuple[bool, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False, f"exited with {proc.returncode}: {_tail(log_path)}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return True, ""
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # alive and asking for credentials
                return True, ""
        except OSError:
            pass
        time.sleep(0.05)
    return False, f"no answer on {url} within {timeout} s: {_tail(log_path)}"


def _stop(proc: subprocess.Popen) -> None:
    """End the registry we started, by its PID (SIGTERM, then SIGKILL)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------- token server

def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _libtrust_key_id(public_key) -> str:
    """docker/libtrust's key ID: base32 of sha256(SPKI DER)[:30], in 4-char groups."""
    from cryptography.hazmat.primitives import serialization

    der = public_key.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def _make_signing_key() -> tuple[bytes, bytes, str]:
    """(private key PEM, self-signed certificate PEM, libtrust kid) for ES256."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TOKEN_ISSUER)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM), _libtrust_key_id(key.public_key())


def make_jwt(key_pem: bytes, kid: str, claims: Mapping) -> str:
    """A compact JWS (ES256) over ``claims`` with ``kid`` in the header."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    key = serialization.load_pem_private_key(key_pem, password=None)
    header = {"typ": "JWT", "alg": "ES256", "kid": kid}
    signing_input = (_b64url(json.dumps(header, separators=(",", ":")).encode()) + "."
                     + _b64url(json.dumps(dict(claims), separators=(",", ":")).encode()))
    der = key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)  # JWS wants raw r||s, not DER
    return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def _parse_scopes(values: list[str]) -> list[dict]:
    """``repository:NAME:pull,push`` (repeated or space-separated) -> access entries."""
    access = []
    for value in values:
        for scope in value.split():
            parts = scope.split(":")
            if len(parts) < 3:
                continue
            # The name itself may hold a ':' only as a registry port; keep it whole.
            typ, name, actions = parts[0], ":".join(parts[1:-1]), parts[-1]
            access.append({"type": typ, "name": name,
                           "actions": [a for a in actions.split(",") if a]})
    return access


class _TokenServer:
    """The distribution token spec's GET /token (and OAuth2 POST /token) on loopback."""

    def __init__(self, *, key_pem: bytes, kid: str, users: Mapping[str, str],
                 anonymous_pull: bool, requests_log: list, expires_in: int = 300) -> None:
        self.key_pem, self.kid, self.users = key_pem, kid, dict(users)
        self.anonymous_pull, self.log, self.expires_in = anonymous_pull, requests_log, expires_in
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, fmt, *args):  # quiet: route to logging
                log.debug("token server: " + fmt, *args)

            def _reply(self, status: int, body: dict, user: str | None,
                       headers: Mapping[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)
                outer.log.append((self.command, self.path, user, status))

            def _basic_user(self) -> tuple[str | None, bool]:
                """(username, ok): (None, True) without an Authorization header."""
                header = self.headers.get("Authorization", "")
                if not header:
                    return None, True
                if not header.lower().startswith("basic "):
                    return None, False
                try:
                    user, _, pw = base64.b64decode(header[6:]).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return None, False
                ok = user in outer.users and secrets.compare_digest(outer.users[user], pw)
                return user, ok

            def _issue(self, user: str | None, ok: bool, service: str, scopes: list[str]) -> None:
                if not ok:
                    self._reply(401, {"errors": [{"code": "UNAUTHORIZED",
                                                  "message": "bad credentials"}]}, user,
                                {"WWW-Authenticate": 'Basic realm="token"'})
                    return
                if service != TOKEN_SERVICE:
                    self._reply(400, {"errors": [{"code": "INVALID_SERVICE",
                                                  "message": service}]}, user)
                    return
                access = _parse_scopes(scopes)
                if user is None:  # anonymous: pull at most, and only if allowed
                    for entry in access:
                        entry["actions"] = (["pull"] if outer.anonymous_pull
                                            and "pull" in entry["actions"] else [])
                token = outer.issue(user or "", access)
                self._reply(200, {"token": token, "access_token": token,
                                  "expires_in": outer.expires_in,
                                  "issued_at": _rfc3339(time.time())}, user)

            def do_GET(self):
                url = urllib.parse.urlsplit(self.path)
                if url.path != "/token":
                    self._reply(404, {"errors": [{"code": "NOT_FOUND"}]}, None)
                    return
                q = urllib.parse.parse_qs(url.query)
                user, ok = self._basic_user()
                self._issue(user, ok, q.get("service", [""])[0], q.get("scope", []))

            def do_POST(self):  # OAuth2 password grant, as docker login uses
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                if url.path != "/token" or form.get("grant_type", [""])[0] != "password":
                    self._reply(404 if url.path != "/token" else 400,
                                {"errors": [{"code": "UNSUPPORTED"}]}, None)
                    return
                user = form.get("username", [""])[0]
                pw = form.get("password", [""])[0]
                ok = user in outer.users and secrets.compare_digest(outer.users[user], pw)
                self._issue(user, ok, form.get("service", [""])[0], form.get("scope", []))

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="token-server",
                                       daemon=True)

    def issue(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        claims = {"iss": TOKEN_ISSUER, "sub": subject, "aud": TOKEN_SERVICE,
                  "exp": now + self.expires_in, "nbf": now - 10, "iat": now,
                  "jti": secrets.token_hex(8), "access": access}
        return make_jwt(self.key_pem, self.kid, claims)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def _rfc3339(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------ skopeo, umoci

def _image_source(source: Path | str, tag: str | None) -> str:
    """A skopeo source reference for an OCI layout dir, an archive or a ref with transport."""
    text = str(source)
    if text.split(":", 1)[0] in ("oci", "oci-archive", "docker-archive", "dir", "docker",
                                 "containers-storage", "docker-daemon"):
        return text
    path = Path(source)
    suffix = f":{tag}" if tag else ""
    if path.is_dir():
        if (path / "oci-layout").is_file():
            return f"oci:{path}{suffix}"
        return f"dir:{path}"
    import tarfile

    with tarfile.open(path) as tar:
        names = {n.lstrip("./") for n in tar.getnames()}
    return (f"oci-archive:{path}{suffix}" if "oci-layout" in names
            else f"docker-archive:{path}{suffix}")


def _creds_args(prefix: str, creds: tuple[str, str] | None) -> list[str]:
    """skopeo's ``--[PREFIX-]creds U:P`` or ``--[PREFIX-]no-creds``."""
    p = f"--{prefix}-" if prefix else "--"
    return [f"{p}creds", f"{creds[0]}:{creds[1]}"] if creds else [f"{p}no-creds"]


def _skopeo(args: list[str], *, timeout: float) -> subprocess.CompletedProcess:
    exe = shutil.which("skopeo")
    if exe is None:
        raise RuntimeError("skopeo missing: apt-get install skopeo")
    # --insecure-policy: test images are unsigned; never rely on the host's policy.json.
    # An empty auth file keeps the host's ~/.docker or containers auth out of it.
    with tempfile.TemporaryDirectory(prefix="skopeo-auth-") as d:
        env = dict(os.environ, REGISTRY_AUTH_FILE=os.path.join(d, "auth.json"))
        proc = subprocess.run([exe, "--insecure-policy", *args], check=False,
                              capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo {' '.join(args[:1])} failed ({proc.returncode}): "
                           f"{proc.stderr.strip()[-2000:]}")
    return proc


def push_with_skopeo(
    source: Path | str,
    dest: str,
    creds: tuple[str, str] | None = None,
    *,
    tag: str | None = None,
    timeout: float = 300,
) -> None:
    """Copy an OCI layout dir / archive to ``docker://{dest}`` (e.g. ``127.0.0.1:PORT/name:tag``).

    ``tag`` picks the image inside an OCI layout (``oci:DIR:TAG``). TLS is off
    (the test registry speaks plain HTTP on loopback).
    """
    src = _image_source(source, tag)
    _skopeo(["copy", "--dest-tls-verify=false", *_creds_args("dest", creds),
             src, f"docker://{dest}"], timeout=timeout)


def inspect_with_skopeo(ref: str, creds: tuple[str, str] | None = None, *,
                        raw: bool = False, timeout: float = 60) -> dict:
    """``skopeo inspect docker://{ref}`` as a dict (``raw`` = the manifest itself)."""
    args = ["inspect", "--tls-verify=false", *_creds_args("", creds)]
    if raw:
        args.append("--raw")
    return json.loads(_skopeo([*args, f"docker://{ref}"], timeout=timeout).stdout)


def make_oci_image(
    layout: Path,
    tag: str,
    layer_tars: list[Path],
    *,
    config: Mapping | None = None,
) -> Path:
    """Make (or extend) an OCI image layout at ``layout`` with ``tag`` using umoci.

    Each uncompressed tar in ``layer_tars`` becomes one layer (gzip, as umoci
    writes them). ``config`` takes ``Cmd``, ``Entrypoint``, ``Env`` and
    ``WorkingDir`` from an OCI image config's ``config`` section.
    """
    exe = shutil.which("umoci")
    if exe is None:
        raise RuntimeError("umoci missing: apt-get install umoci")

    def run(*args: str) -> None:
        proc = subprocess.run([exe, *args], check=False, capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"umoci {args[0]} failed: {proc.stderr.strip()}")

    layout = Path(layout)
    if not (layout / "oci-layout").exists():
        run("init", "--layout", str(layout))
    image = f"{layout}:{tag}"
    run("new", "--image", image)
    for tar in layer_tars:
        run("raw", "add-layer", "--image", image, str(tar))
    if config:
        args = ["config", "--image", image]
        for env in config.get("Env", ()):
            args += ["--config.env", env]
        if config.get("Cmd") is not None:
            args += ["--clear=config.cmd"]
            for c in config["Cmd"]:
                args += ["--config.cmd", c]
        if config.get("Entrypoint") is not None:
            args += ["--clear=config.entrypoint"]
            for c in config["Entrypoint"]:
                args += ["--config.entrypoint", c]
        if config.get("WorkingDir"):
            args += ["--config.workingdir", config["WorkingDir"]]
        run(*args)
    return layout
