"""The ``%container`` and ``%%container`` magics of contained kernels.

Runs in the image's Python (3.7+) with IPython. Owns the command lines the
user types; every action is a request over the host channel (:mod:`.channel`),
which answers about this kernel's container only. Must not touch the host any
other way.

``%container stats | diff [-n N] | snapshot [TAG [-m MSG] [--compress zstd]] |
install IMAGE [--display-name NAME] | reset | images | ps | resources``

``%%container [IMAGE] [--memory M] [--cpus C] [--network none] [--shell]``
runs the cell in a fresh container and streams its output here.
"""

import argparse
import shlex
import sys

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from . import format as fmt
from .channel import HostError, request

#: what ``%container help`` prints (plain text: a notebook shows it as is, so no reST markup)
USAGE = """\
%container stats                  memory, CPU and processes of this kernel's container
%container resources              the same, live (a widget)
%container diff [-n N]            what changed against the image (lists N changes, default 50)
%container snapshot               a form that makes an image of those changes (a widget)
%container snapshot TAG [-m MSG] [--compress gzip|zstd]
                                  make that image now, tagged TAG (e.g. myenv:v1)
    diff and snapshot leave out the kernel's runtime state (IPython history, caches);
    --include-runtime-state keeps it, --exclude PATTERN / --include PATTERN adjust the list
%container install IMAGE [--display-name NAME]
                                  install a kernelspec for IMAGE (e.g. a snapshot)
%container images                 the images this kernel may use
%container ps                     this kernel's container: image, status, limits, network
%container reset                  the next restart starts from a fresh writable layer
%container help                   this text

%%container [IMAGE] [--memory M] [--cpus C] [--network none] [--shell]
                                  run the cell in a fresh container, its output streamed here"""


class ContainerCellError(HostError):
    """A ``%%container`` cell's container ended badly (non-zero exit, a signal, out of memory)."""

    def __init__(self, exit_info):
        self.exit = exit_info
        super(ContainerCellError, self).__init__("the cell's container %s" % exit_info.get("reason", "failed"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError("%s: %s\n%s" % (self.prog, message, USAGE))

    def exit(self, status=0, message=None):
        raise UsageError(message or USAGE)


def _line_parser():
    p = _Parser(prog="%container", add_help=False)
    sub = p.add_subparsers(dest="cmd")
    for name in ("stats", "reset", "images", "ps", "resources", "help"):
        sub.add_parser(name, add_help=False)
    d = sub.add_parser("diff", add_help=False)
    d.add_argument("-n", type=int, default=50, help="changes to list")
    s = sub.add_parser("snapshot", add_help=False)
    s.add_argument("tag", nargs="?")
    s.add_argument("-m", "--message", default="")
    s.add_argument("--compress", choices=("gzip", "zstd"), default="gzip")
    for sp in (d, s):
        sp.add_argument("--include-runtime-state", action="store_true")
        sp.add_argument("--exclude", action="append", default=[])
        sp.add_argument("--include", action="append", default=[])
    i = sub.add_parser("install", add_help=False)
    i.add_argument("image")
    i.add_argument("--display-name", default=None)
    for sp in sub.choices.values():
        sp.error = p.error   # subparsers are plain ArgumentParsers: route their errors too
        sp.exit = p.exit
    return p


def _leave_out(args):
    """The request fields for what a diff or snapshot leaves out (only those the user set)."""
    fields = {}
    if args.include_runtime_state:
        fields["include_runtime_state"] = True
    if args.exclude:
        fields["exclude"] = list(args.exclude)
    if args.include:
        fields["include"] = list(args.include)
    return fields


def _cell_parser():
    p = _Parser(prog="%%container", add_help=False)
    p.add_argument("image", nargs="?")
    p.add_argument("--memory")
    p.add_argument("--cpus")
    p.add_argument("--network", default="none")
    p.add_argument("--shell", action="store_true")
    return p


def _display(obj):
    from IPython.display import display

    display(obj)


@magics_class
class ContainerMagics(Magics):

    @line_cell_magic
    def container(self, line, cell=None):
        """Ask the host about this kernel's container, or run a cell in a fresh one (see %container help)."""
        if cell is not None:
            return self._run_cell(line, cell)
        try:
            args = _line_parser().parse_args(shlex.split(line))
        except ValueError as exc:   # shlex: unbalanced quotes
            raise UsageError("%%container: %s" % exc) from None
        cmd = args.cmd or "help"
        if cmd == "help":
            print(USAGE)
        elif cmd == "stats":
            print(fmt.stats_text(request("stats", _timeout=30)["stats"]))
        elif cmd == "diff":
            print(fmt.diff_text(request("diff", limit=max(0, min(args.n, 1000)), _timeout=300,
                                        **_leave_out(args))))
        elif cmd == "snapshot":
            if not args.tag:
                from .widgets import snapshot_widget

                _display(snapshot_widget())
                return None
            return self._snapshot(args)
        elif cmd == "install":
            fields = {"image": args.image}
            if args.display_name:
                fields["display_name"] = args.display_name
            a = request("install_kernelspec", _timeout=120, **fields)
            print("installed kernel %s (%s)" % (a["display_name"], a["kernel_name"]))
        elif cmd == "reset":
            print(request("reset", _timeout=30)["message"])
        elif cmd == "images":
            print("\n".join(request("images", _timeout=60)["images"]))
        elif cmd == "ps":
            c = request("ps", _timeout=30)["container"]
            lim = c.get("limits") or {}
            print("%s  %s  %s  %s  memory %s  cpus %s  pids %s  network %s" % (
                c["id"][:12], c["name"], c["image"], c["status"],
                fmt.size(lim.get("memory")) if lim.get("memory") else "-", lim.get("cpus") or "-",
                lim.get("pids") or "-", c.get("network")))
        elif cmd == "resources":
            from .widgets import resources_widget

            _display(resources_widget())
        return None

    def _snapshot(self, args):
        shown = [-1]

        def on_event(ev):
            if ev.get("event") != "progress":
                return
            total, done = ev.get("total") or 0, ev.get("done") or 0
            pct = 100 if ev.get("stage") == "commit" or not total else int(done * 100 / total)
            if pct // 25 != shown[0] // 25 or pct == 100:   # a few lines, not hundreds
                shown[0] = pct
                print("snapshot: %s %d%%" % (ev.get("stage"), pct))
        a = request("snapshot", tag=args.tag, message=args.message, compress=args.compress, _on_event=on_event,
                    **_leave_out(args))
        print("%s %s (%s)" % (a["image"], a["digest"], fmt.size(a.get("size"))))
        if a.get("left_out_total"):
            print(fmt.left_out_text(a))
        return None

    def _run_cell(self, line, cell):
        try:
            args = _cell_parser().parse_args(shlex.split(line))
        except ValueError as exc:
            raise UsageError("%%%%container: %s" % exc) from None
        fields = {"code": cell, "shell": bool(args.shell), "network": args.network}
        for name in ("image", "memory", "cpus"):
            value = getattr(args, name)
            if value:
                fields[name] = value

        def on_event(ev):
            if ev.get("event") == "output":
                stream = sys.stderr if ev.get("stream") == "stderr" else sys.stdout
                stream.write(ev.get("text", ""))
                stream.flush()
        a = request("run_cell", _on_event=on_event, **fields)
        info = a.get("exit") or {}
        if info.get("code", 1) != 0:
            raise ContainerCellError(info)
        return None


def register(ip):
    ip.register_magics(ContainerMagics)
