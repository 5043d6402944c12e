"""The guest's end of the host channel: one request, its events, its answer.

Runs in the image's Python (3.7+, standard library only). Owns the client side
of the protocol the host serves on ``$JUPYTER_CONTAIN_KERNEL_DIR/host.sock``:
newline-delimited JSON, one request per line; the host answers with zero or
more event lines and then one ``{"ok": ...}`` line. Must not talk to anything
but that socket.
"""

import json
import os
import socket

SOCKET_NAME = "host.sock"


class HostError(RuntimeError):
    """The host refused or failed a request (or cannot be reached); shown without a traceback."""

    def _render_traceback_(self):
        # IPython shows this instead of a traceback: the message is the whole story
        return ["%s: %s" % (type(self).__name__, self)]


def socket_path():
    kdir = os.environ.get("JUPYTER_CONTAIN_KERNEL_DIR")
    if not kdir:
        raise HostError("this is not a contained kernel: there is no host channel "
                        "(JUPYTER_CONTAIN_KERNEL_DIR is not set)")
    return os.path.join(kdir, SOCKET_NAME)


def request(op, _on_event=None, _timeout=None, **fields):
    """Send request ``op`` with ``fields``; call ``_on_event(event)`` for each event; return the answer.

    Raises HostError with the host's message when the answer is not ok.
    ``_timeout`` (seconds, None: no limit) bounds each wait for a line.
    """
    path = socket_path()
    msg = dict(fields)
    msg["op"] = op
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(_timeout)
        try:
            s.connect(path)
        except OSError as exc:
            raise HostError("cannot reach the host channel (%s): was the kernel started by the "
                            "jupyter-contain provisioner?" % (exc.strerror or exc)) from None
        s.sendall(json.dumps(msg).encode("utf-8") + b"\n")
        f = s.makefile("rb")
        try:
            for line in f:
                try:
                    answer = json.loads(line.decode("utf-8"))
                except ValueError:
                    raise HostError("the host sent a malformed line") from None
                if "event" in answer:
                    if _on_event is not None:
                        _on_event(answer)
                    continue
                if not answer.get("ok"):
                    raise HostError(answer.get("error") or "the host refused the request")
                return answer
        finally:
            f.close()
        raise HostError("the host closed the channel without an answer")
    except socket.timeout:
        raise HostError("the host did not answer %r in time" % op) from None
    finally:
        s.close()
