"""``jupyter contain --url URL --token T VERB``: the same verbs against a Jupyter Server's REST API.

Owns the HTTP client of ``/jupyter-contain/api/v1/`` (token header, JSON
errors turned into :class:`RemoteError` with the server's code), following an
operation's server-sent events into the same progress renderers the local
verbs use, and printing results exactly as the local verbs print them (like
``docker -H``). Must not touch the local store: with ``--url`` (or
``$JUPYTER_CONTAIN_URL``) nothing local is read or written. Verbs that need the
local machine (run, exec, bundle, bootstrap, login) are refused with a clear
message; paths for import and save, and a build's context and ``-f FILE``, are
the server's paths, inside the root it allows (``-f -`` sends the Containerfile
read from the local standard input).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from ..errors import ContainError
from .output import emit_json, human_size, print_containers, print_stats, shown, table

API = "jupyter-contain/api/v1/"


class RemoteError(ContainError):
    """The server answered with an error (or could not be reached)."""

    def __init__(self, message: str, *, status: int | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Client:
    """One server: ``url`` (its base URL, with the server's base_url path) and a token."""

    def __init__(self, url: str, token: str | None, *, timeout: float = 300.0) -> None:
        import requests

        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise RemoteError(f"invalid server URL {url!r} (expected http[s]://HOST:PORT[/base_url/])")
        self.base = url.rstrip("/") + "/" + API
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = "jupyter-contain-cli"
        if token:
            self.session.headers["Authorization"] = f"token {token}"

    def close(self) -> None:
        self.session.close()

    def url(self, *segments: str) -> str:
        return self.base + "/".join(urllib.parse.quote(s, safe="") for s in segments)

    def request(self, method: str, *segments: str, body: dict[str, Any] | None = None,
                params: dict[str, str] | None = None) -> Any:
        import requests

        try:
            resp = self.session.request(method, self.url(*segments), json=body, params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise RemoteError(f"cannot reach {self.base}: {exc}") from None
        with resp:
            if resp.status_code >= 400:
                raise _error(resp.status_code, resp.content)
            if resp.status_code == 204 or not resp.content:
                return None
            try:
                return resp.json()
            except ValueError:
                raise RemoteError(f"{method} {'/'.join(segments)}: the server answered with no JSON "
                                  f"(status {resp.status_code}): is {self.base} a jupyter-contain server?") from None

    def events(self, op_id: str, *, cancel_on_close: bool = True) -> Iterator[dict[str, Any]]:
        """The operation's snapshots from its server-sent event stream, the last one final."""
        import requests

        params = {"cancel_on_close": "1"} if cancel_on_close else {}
        try:
            resp = self.session.get(self.url("operations", op_id, "events"), params=params, stream=True,
                                    timeout=(30, None))
        except requests.RequestException as exc:
            raise RemoteError(f"cannot reach {self.base}: {exc}") from None
        with resp:
            if resp.status_code >= 400:
                raise _error(resp.status_code, resp.content)
            data: list[str] = []
            for line in resp.iter_lines(decode_unicode=True):
                if line is None:
                    continue
                if line == "":
                    if data:
                        yield json.loads("\n".join(data))
                        data = []
                elif line.startswith("data:"):
                    data.append(line[5:].lstrip())


def _error(status: int, content: bytes) -> RemoteError:
    try:
        err = json.loads(content)["error"]
        return RemoteError(err["message"], status=status, code=err.get("code", ""))
    except (ValueError, KeyError, TypeError):
        text = content[:200].decode(errors="replace").strip()
        hint = " (wrong or missing token?)" if status in (401, 403) else ""
        return RemoteError(f"server answered {status}{hint}: {text}", status=status)


# --- operations with progress ---------------------------------------------------------------


def follow(client: Client, op: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Wait for an operation, drawing its progress on stderr as the local verbs do; returns its result."""
    from ..runtime.images import progress as p

    render = None if quiet else p.renderer_for(sys.stderr)
    last_state: dict[str, tuple[str, int]] = {}
    printed: dict[str, str] = {}
    final = op
    resolved = False
    for snap in client.events(op["id"]):
        final = snap
        prog = snap["progress"]
        if render is not None and snap["kind"] in ("pull", "push"):
            resolved = _render_transfer(render, snap, prog, last_state, resolved)
        elif snap["kind"] == "build":
            if not quiet:
                _print_steps(prog, printed)
        elif render is not None and snap["kind"] == "commit" and prog.get("total"):
            sys.stderr.write(f"\r{prog['stage']}: {human_size(prog['done'])} / {human_size(prog['total'])}\x1b[K")
            sys.stderr.flush()
    if render is not None and final["kind"] == "commit":
        sys.stderr.write("\n")
    if final["state"] == "succeeded":
        return final.get("result") or {}
    err = final.get("error") or {}
    if final["kind"] == "build" and err.get("output"):   # a failed RUN: the end of its output (a container's)
        sys.stderr.write("".join(shown(line) + "\n" for line in str(err["output"]).splitlines()))
    exc = RemoteError(err.get("message") or f"{final['kind']} {final['state']}", code=err.get("code", ""))
    if err.get("code") in ("build_step_failed", "build_failed"):
        exc.exit_code = 1   # as the local verb (and docker build) exit for a failed build
    raise exc


def _print_steps(prog: dict[str, Any], printed: dict[str, str]) -> None:
    """A build's step lines as the local verb prints them (``--progress plain``), each line once.

    A snapshot may show a step already done (snapshots come at most 5 per second): then both its
    lines at once. The text is the server's (an instruction of a Containerfile on the server).
    """
    for item in sorted(prog.get("items", []), key=lambda i: int(i.get("index") or 0)):
        seen = printed.get(item["id"])
        if seen is None:
            sys.stdout.write(f"STEP {item.get('index')}/{item.get('total')}: {shown(str(item.get('text', '')))}\n")
            seen = printed[item["id"]] = "running"
        if item.get("state") == "done" and seen != "done":
            what = "Using cache" if item.get("status") == "cached" else f"{float(item.get('seconds') or 0):.2f} s"
            sys.stdout.write(f"--> {what}\n")
            printed[item["id"]] = "done"
    sys.stdout.flush()


def _render_transfer(render: Callable[[Any], None], snap: dict[str, Any], prog: dict[str, Any],
                     last: dict[str, tuple[str, int]], resolved: bool) -> bool:
    """Feed the local renderer ProgressEvents rebuilt from an operation snapshot (only what changed)."""
    from ..runtime.images import progress as p

    def event(kind: str, item: dict[str, Any] | None, status: str) -> p.ProgressEvent:
        rate = float(prog.get("rate") or 0.0)
        total, done = int(prog.get("total") or 0), int(prog.get("done") or 0)
        return p.ProgressEvent(
            operation=snap["kind"], reference=snap["target"], kind=kind, layer=item["id"] if item else None,
            layer_index=int(item.get("index", -1)) if item else -1, layer_count=int(prog.get("count") or 0),
            status=status, layer_bytes=int(item["done"] or 0) if item else 0,
            layer_total=int(item["total"] or 0) if item else 0, bytes_done=done, bytes_total=total, rate=rate,
            eta=(total - done) / rate if rate > 0 and total >= done else None,
            elapsed=max(0.0, (snap.get("finished") or snap["created"]) - snap["created"]))

    if not resolved and prog.get("stage") in ("resolved", "transfer", "done"):
        render(event(p.RESOLVED, None, p.WAITING))
        resolved = True
    for item in prog.get("items", []):
        status = item.get("status") or item.get("state")
        key = (status, int(item.get("done") or 0))
        if last.get(item["id"]) != key:
            last[item["id"]] = key
            render(event(p.LAYER, item, status))
    if snap["state"] == "succeeded":
        render(event(p.FINISHED, None, p.DONE))
    return resolved


# --- verbs --------------------------------------------------------------------------------


def _local_image_json(img: dict[str, Any]) -> dict[str, Any]:
    """``jupyter contain inspect``'s shape (cli/images.py) from the API's image detail."""
    return {"name": img["name"], "digest": img["digest"], "media_type": img.get("media_type"),
            "index_digest": img.get("index_digest"), "id": img["id"], "size": img["size"],
            "created": img.get("created"),
            "layers": [{"mediaType": d["media_type"], "digest": d["digest"], "size": d["size"]}
                       for d in img.get("layers", [])],
            "diff_ids": img.get("diff_ids", []), "platform": img.get("platform"), "config": img.get("config", {})}


def _split_familiar(familiar: str) -> tuple[str, str]:
    repo, sep, tag = familiar.rpartition(":")
    if not sep or "/" in tag:
        return familiar, "<none>"
    return repo, tag


def v_images(c: Client, args: argparse.Namespace) -> int:
    imgs = c.request("GET", "images")["images"]
    if args.json:
        emit_json([_local_image_json(c.request("GET", "images", i["name"])["image"]) for i in imgs])
    elif args.quiet:
        for i in imgs:
            print(i["id"].removeprefix("sha256:")[:12])
    else:
        table(["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"], [
            (*_split_familiar(i["familiar"]), i["id"].removeprefix("sha256:")[:12],
             (i.get("created") or "")[:19].replace("T", " "), human_size(i["size"])) for i in imgs])
    return 0


def v_inspect(c: Client, args: argparse.Namespace) -> int:
    emit_json([_local_image_json(c.request("GET", "images", n)["image"]) for n in args.images])
    return 0


def v_tag(c: Client, args: argparse.Namespace) -> int:
    c.request("POST", "images", args.source, "tag", body={"target": args.target})
    return 0


def v_rmi(c: Client, args: argparse.Namespace) -> int:
    if args.force:
        raise RemoteError("rmi --force is not available remotely (the server refuses to remove images in use)")
    for name in args.images:
        img = c.request("GET", "images", name)["image"]
        c.request("DELETE", "images", name)
        print(f"Untagged: {img['familiar']}")
    return 0


def v_gc(c: Client, args: argparse.Namespace) -> int:
    r = c.request("POST", "images", "gc")["removed"]
    if args.json:
        emit_json({"blobs_removed": r["blobs"], "layers_removed": r["layers"], "bytes_freed": r["bytes"],
                   "containers_cleaned": r["containers"]})
    else:
        if r["containers"]:
            print(f"cleaned {len(r['containers'])} dead containers and stray cgroups")
        print(f"removed {r['blobs']} blobs and {r['layers']} unpacked layers, freed {human_size(r['bytes'])}")
    return 0


def v_df(c: Client, args: argparse.Namespace) -> int:
    du = c.request("GET", "images", "df")
    if args.json:
        emit_json({"blobs": du["blobs_bytes"], "layers": du["layers_bytes"], "containers": du["containers_bytes"],
                   "images": du["per_image"]})
        return 0
    table(["TYPE", "SIZE"], [("blobs (compressed)", human_size(du["blobs_bytes"])),
                             ("unpacked layers", human_size(du["layers_bytes"])),
                             ("containers", human_size(du["containers_bytes"]))])
    if du["per_image"]:
        from ..runtime import Reference

        print()
        table(["IMAGE", "UNIQUE", "SHARED"], [(Reference.parse(r["name"]).familiar, human_size(r["unique"]),
                                               human_size(r["shared"])) for r in du["per_image"]])
    return 0


def v_pull(c: Client, args: argparse.Namespace) -> int:
    body = {"reference": args.image, **({"platform": args.platform} if args.platform else {})}
    op = c.request("POST", "images", "pull", body=body)["operation"]
    img = follow(c, op, quiet=args.quiet)["image"]
    print(f"{img['familiar']} {img['digest']}")
    return 0


def v_push(c: Client, args: argparse.Namespace) -> int:
    op = c.request("POST", "images", args.image, "push", body={"target": args.dest} if args.dest else {})["operation"]
    r = follow(c, op, quiet=args.quiet)
    print(f"{r['reference']} {r['digest']} (uploaded {len(r['uploaded'])}, mounted {len(r['mounted'])}, "
          f"already there {len(r['existing'])})")
    return 0


def v_build(c: Client, args: argparse.Namespace) -> int:
    from .build import _key_values

    if args.pull not in ("missing", "always", "never"):
        if args.context is not None:
            raise RemoteError(f"--pull {args.pull!r}: missing, always or never")
        args.context, args.pull = args.pull, "always"   # `build --pull CONTEXT`, as the local verb
    if args.context is None:
        raise RemoteError("give the build context folder (CONTEXT, a folder on the server)")
    if args.platform or args.label:
        raise RemoteError("build --platform and --label are not available remotely")
    body: dict[str, Any] = {"context": args.context, "tags": list(args.tag or []), "network": args.network,
                            "no_cache": args.no_cache, "pull": args.pull,
                            "build_args": _key_values(args.build_arg or [], "--build-arg", env_fallback=True)}
    if args.file == "-":
        body["containerfile"] = sys.stdin.read()
    elif args.file:
        body["file"] = args.file
    if args.target:
        body["target"] = args.target
    if args.kernelspec is not None:
        body["kernelspec"] = args.kernelspec or True
    op = c.request("POST", "builds", body=body)["operation"]
    r = follow(c, op, quiet=args.quiet)
    if args.iidfile:
        with open(args.iidfile, "w") as f:
            f.write(r["image_id"])
    if args.quiet:
        print(r["image_id"])
        return 0
    print(f"--> {r['image_id'][7:19]} ({r['steps']} steps, {r['cached']} cached, {r['seconds']:.2f} s)")
    for n in r["names"]:
        print(f"Successfully tagged {n}")
    print(r["image_id"])
    if r.get("kernelspec"):
        print(f"installed kernelspec {r['kernelspec']} on the server")
    return 0


def v_import(c: Client, args: argparse.Namespace) -> int:
    if args.env or args.cmd or args.entrypoint or args.workdir or args.user:
        raise RemoteError("import options for root filesystems (-e, --cmd, ...) are not available remotely")
    body: dict[str, Any] = {"path": args.source, "format": args.format}
    if args.name:
        body["name"] = args.name
    img = c.request("POST", "images", "import", body=body)["image"]
    if args.json:
        emit_json(_local_image_json(c.request("GET", "images", img["name"])["image"]))
    else:
        print(f"{img['familiar']} {img['digest']}")
    return 0


def v_save(c: Client, args: argparse.Namespace) -> int:
    r = c.request("POST", "images", args.image, "save", body={"path": args.output, "format": args.format})
    print(f"saved {r['image']['familiar']} to {args.output} ({args.format}) on the server")
    return 0


def v_ps(c: Client, args: argparse.Namespace) -> int:
    rows = c.request("GET", "containers", params={"all": "1" if args.all else "0"})["containers"]
    print_containers(rows, as_json=args.json, quiet=args.quiet)
    return 0


def v_stats(c: Client, args: argparse.Namespace) -> int:
    targets = args.containers or [r["id"] for r in c.request("GET", "containers", params={"all": "0"})["containers"]]
    rows = []
    for ref in targets:
        info = c.request("GET", "containers", ref)["container"]
        s = c.request("GET", "containers", ref, "stats")["stats"]
        rows.append({"id": info["id"], "name": info["name"], "memory_current": s["memory"]["current"],
                     "memory_peak": s["memory"]["peak"], "memory_limit": s["memory"]["limit"],
                     "cpu_usage_ns": s["cpu"]["usage_ns"], "pids_current": s["pids"]["current"],
                     "pids_limit": s["pids"]["limit"], "oom_kills": s.get("oom_kills")})
    print_stats(rows, as_json=args.json)
    return 0


def v_diff(c: Client, args: argparse.Namespace) -> int:
    d = c.request("GET", "containers", args.container, "diff")
    if args.json:
        emit_json({"changes": d["changes"], "summary": [
            {"folder": s["path"], "count": s["added"] + s["changed"] + s["deleted"], "bytes": s["bytes"]}
            for s in d["summary"]], "truncated": d["truncated"]})
        return 0
    for ch in d["changes"]:
        print(f"{ch['kind']} {shown(ch['path'])}")   # names the container chose
    counts = {k: sum(s[k] for s in d["summary"]) for k in ("added", "changed", "deleted")}
    folders = ", ".join(f"{shown(s['path'])} {s['added'] + s['changed'] + s['deleted']} ({human_size(s['bytes'])})"
                        for s in d["summary"])
    more = f" (the first {len(d['changes'])} listed)" if d["truncated"] else ""
    print(f"{d['total']} changes{more}: {counts['added']} added, {counts['changed']} changed, {counts['deleted']} "
          f"deleted, {human_size(d['bytes'])}" + (f"; {folders}" if folders else ""), file=sys.stderr)
    return 0


def v_commit(c: Client, args: argparse.Namespace) -> int:
    body = {"tag": args.tag, "compress": args.compress, **({"message": args.message} if args.message else {})}
    op = c.request("POST", "containers", args.container, "commit", body=body)["operation"]
    img = follow(c, op, quiet=args.json)["image"]
    if args.json:
        detail = c.request("GET", "images", img["name"])["image"]
        emit_json({"name": img["name"], "digest": img["digest"], "id": img["id"], "size": img["size"],
                   "diff_ids": detail.get("diff_ids", [])})
    else:
        print(f"{img['familiar']} {img['digest']}")
    return 0


def v_stop(c: Client, args: argparse.Namespace) -> int:
    for ref in args.containers:
        c.request("POST", "containers", ref, "stop", body={"timeout": args.time})
        print(ref)
    return 0


def v_rm(c: Client, args: argparse.Namespace) -> int:
    for ref in args.containers:
        c.request("DELETE", "containers", ref, params={"force": "1" if args.force else "0"})
        print(ref)
    return 0


def v_logs(c: Client, args: argparse.Namespace) -> int:
    if args.follow:
        raise RemoteError("logs --follow is not available remotely")
    sys.stdout.write(c.request("GET", "containers", args.container, "logs")["logs"])
    return 0


def v_reset(c: Client, args: argparse.Namespace) -> int:
    r = c.request("GET", "containers", args.container)["container"]
    c.request("POST", "containers", args.container, "reset")
    print(f"reset {r['name']} to its image")
    return 0


def v_kernelspec(c: Client, args: argparse.Namespace) -> int:
    if args.ks_verb == "list":
        specs = c.request("GET", "kernelspecs")["kernelspecs"]
        if args.json:
            emit_json(specs)
        else:
            table(["NAME", "DISPLAY NAME", "IMAGE"], [(s["name"], s["display_name"], s["image"] or "") for s in specs])
    elif args.ks_verb == "remove":
        for name in args.names:
            c.request("DELETE", "kernelspecs", name)
            print(f"removed kernelspec {name}")
    else:
        if args.userns or args.security_opt or args.user or args.sys_prefix or args.prefix:
            raise RemoteError("kernelspec install options --userns, --security-opt and the install location are "
                              "not available remotely (the server decides)")
        body: dict[str, Any] = {"image": args.image, "probe": not args.no_probe}
        for key, value in (("name", args.name), ("display_name", args.display_name), ("memory", args.memory),
                           ("cpus", args.cpus), ("pids", args.pids_limit), ("network", args.network)):
            if value is not None:
                body[key] = value
        ks = c.request("POST", "kernelspecs", body=body)["kernelspec"]
        print(f"installed kernelspec {ks['name']} on the server")
    return 0


VERBS: dict[str, Callable[[Client, argparse.Namespace], int]] = {
    "images": v_images, "inspect": v_inspect, "tag": v_tag, "rmi": v_rmi, "gc": v_gc, "df": v_df,
    "pull": v_pull, "push": v_push, "import": v_import, "save": v_save, "build": v_build,
    "ps": v_ps, "stats": v_stats, "diff": v_diff, "commit": v_commit, "stop": v_stop, "rm": v_rm,
    "logs": v_logs, "reset": v_reset, "kernelspec": v_kernelspec,
}


def run(args: argparse.Namespace) -> int:
    """Run the parsed verb against the server at ``args.url``."""
    fn = VERBS.get(args.verb)
    if fn is None:
        raise RemoteError(f"`{args.verb}` is not available with --url (remote verbs: {', '.join(sorted(VERBS))})")
    client = Client(args.url, args.token)
    try:
        return fn(client, args)
    finally:
        client.close()
