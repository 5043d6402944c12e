"""The guest's widgets: a snapshot form and a live resources panel, from stock ipywidgets.

Runs in the image's Python. Works with ipywidgets 6 as well as 7 and 8 (only
JupyterLab 4 needs 8, which kernels get from the image or the host: see
``boot.py``): only what all three share is used (``observe``, ``on_click``,
``description``, ``bar_style``, ``layout``; ``style`` where there); ipywidgets is
imported on first use, so without it the magics still work and these
functions raise a clear :class:`HostError`. Owns no host access of its own:
every request goes through :mod:`.channel`.
"""

import re
import threading
import time

from . import format as fmt
from .channel import HostError, request

__all__ = ["register_control_target", "resources_widget", "snapshot_widget", "valid_tag"]

_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_TAG_RE = re.compile(r"^%s(?:/%s)*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$" % (_COMPONENT, _COMPONENT))
_classes = {}  # type: dict  # the widget classes, made once ipywidgets is imported
#: the description column of the forms: wide enough for "Compression", "Kernel name" and
#: "Processes" (ipywidgets' default, 80px, cut them to "Compress..." and "Kernel na...")
DESCRIPTION_WIDTH = "7.5em"


def valid_tag(text):
    """None if ``text`` looks like a plain local name (``myenv:v1``), else why not (the host decides)."""
    if not text:
        return "enter a tag, e.g. myenv:v1"
    first, sep, _ = text.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return "only a local name like myenv:v1 (no registry or host part)"
    if "@" in text or not _TAG_RE.match(text):
        return "lowercase letters, digits and . _ - / in the name; an optional :tag"
    return None


def _ipywidgets():
    try:
        import ipywidgets
    except Exception as exc:  # ImportError, or a broken install
        raise HostError("widgets need ipywidgets, which this kernel cannot import (%s); "
                        "the %%container magics work without them" % exc) from None
    return ipywidgets


def _html_escape(text):
    import html

    return html.escape(str(text))


def _described(W, cls, description, **kwargs):
    """``cls(description=..., **kwargs)`` with the forms' description width (ipywidgets >= 7 has ``style``)."""
    if "style" in getattr(W, cls).class_traits():
        kwargs.setdefault("style", {"description_width": DESCRIPTION_WIDTH})
    return getattr(W, cls)(description=description, **kwargs)


def _class(name):
    """The widget classes, made on first use (they subclass ipywidgets.VBox)."""
    if name in _classes:
        return _classes[name]
    W = _ipywidgets()

    class SnapshotWidget(W.VBox):
        """The diff summary, a tag, a message, a compression, a button, progress, the result."""

        def __init__(self, **kwargs):
            self.summary = W.HTML(value="")
            self.tag = _described(W, "Text", "Tag", placeholder="myenv:v1")
            self.feedback = W.HTML(value="")
            self.message = _described(W, "Textarea", "Message", placeholder="what this environment holds")
            self.compress = _described(W, "Dropdown", "Compression", options=["gzip", "zstd"], value="gzip")
            # left out by default: IPython's history and caches (the summary above lists them)
            self.keep_state = _described(W, "Checkbox", "Keep runtime state", value=False)
            self.button = W.Button(description="Snapshot", button_style="primary")
            self.progress = W.IntProgress(value=0, min=0, max=100, description="")
            self.result = W.HTML(value="")
            self.display_name = _described(W, "Text", "Kernel name", placeholder="(default)")
            self.install_button = W.Button(description="Install as kernel", disabled=True)
            self.image = None
            kwargs.setdefault("children", [
                self.summary, self.tag, self.feedback, self.message, self.compress, self.keep_state, self.button,
                self.progress, self.result, W.HBox(children=[self.display_name, self.install_button]),
            ])
            super(SnapshotWidget, self).__init__(**kwargs)
            self.tag.observe(self._on_tag, names="value")
            self.button.on_click(self._on_click)
            self.install_button.on_click(self._on_install)
            self.refresh()

        def refresh(self):
            """Show the writable layer's changes (a diff summary by top folder)."""
            try:
                self.summary.value = fmt.diff_html(request("diff", limit=0, _timeout=120))
            except HostError as exc:
                self.summary.value = "<p style='color:#b00'>%s</p>" % _html_escape(exc)

        def _say(self, text, ok=True):
            colour = "#070" if ok else "#b00"
            self.feedback.value = "<span style='color:%s'>%s</span>" % (colour, _html_escape(text)) if text else ""

        def _on_tag(self, change):
            why = valid_tag(change["new"])
            self._say(why or "", ok=why is None)
            self.button.disabled = why is not None

        def snapshot(self):
            """Take the snapshot with the form's values; returns the host's answer (raises HostError)."""
            tag = self.tag.value.strip()
            why = valid_tag(tag)
            if why:
                self._say(why, ok=False)
                raise HostError("invalid tag %r: %s" % (tag, why))
            self.button.disabled = True
            self.install_button.disabled = True
            self.progress.value = 0
            self.progress.bar_style = "info"
            self.result.value = ""
            self._say("snapshot running: the kernel holds still meanwhile")

            def on_event(ev):
                if ev.get("event") == "progress":
                    total = ev.get("total") or 0
                    done = ev.get("done") or 0
                    self.progress.value = 100 if ev.get("stage") == "commit" or not total else \
                        min(99, int(done * 100 / total))
            try:
                keep = {"include_runtime_state": True} if self.keep_state.value else {}
                answer = request("snapshot", tag=tag, message=self.message.value, compress=self.compress.value,
                                 _on_event=on_event, **keep)
            except HostError as exc:
                self.progress.bar_style = "danger"
                self._say(str(exc), ok=False)
                raise
            finally:
                self.button.disabled = False
            self.progress.value = 100
            self.progress.bar_style = "success"
            self.image = answer["image"]
            self._say("")
            self.result.value = "Created <code>%s</code> <code>%s</code> (%s)" % (
                _html_escape(answer["image"]), _html_escape(answer["digest"]), fmt.size(answer.get("size")))
            self.install_button.disabled = False
            return answer

        def install(self):
            """Install a kernelspec for the snapshot just made; returns the host's answer."""
            if not self.image:
                raise HostError("take a snapshot first")
            fields = {"image": self.image}
            if self.display_name.value.strip():
                fields["display_name"] = self.display_name.value.strip()
            try:
                answer = request("install_kernelspec", _timeout=120, **fields)
            except HostError as exc:
                self._say(str(exc), ok=False)
                raise
            self._say("installed kernel %s (%s): pick it in the launcher" % (
                answer["display_name"], answer["kernel_name"]))
            return answer

        def _on_click(self, _button):
            try:
                self.snapshot()
            except HostError:
                pass   # shown in the form

        def _on_install(self, _button):
            try:
                self.install()
            except HostError:
                pass

    class ResourcesWidget(W.VBox):
        """Memory, CPU and processes against the container's limits, polled in a background thread."""

        def __init__(self, interval=1.0, **kwargs):
            self.interval = float(interval)
            self.memory_bar = _described(W, "FloatProgress", "Memory", value=0.0, min=0.0, max=1.0)
            self.memory_label = W.Label(value="")
            self.cpu_bar = _described(W, "FloatProgress", "CPU", value=0.0, min=0.0, max=100.0)
            self.cpu_label = W.Label(value="")
            self.pids_bar = _described(W, "FloatProgress", "Processes", value=0.0, min=0.0, max=1.0)
            self.pids_label = W.Label(value="")
            self.stats = None
            self.updates = 0
            self.error = None
            self._last = None
            self._stop = threading.Event()
            self._thread = None
            kwargs.setdefault("children", [
                W.HBox(children=[self.memory_bar, self.memory_label]),
                W.HBox(children=[self.cpu_bar, self.cpu_label]),
                W.HBox(children=[self.pids_bar, self.pids_label]),
            ])
            super(ResourcesWidget, self).__init__(**kwargs)

        def update(self):
            """One poll of ``stats``; bars in MiB, percent of the CPU limit, process count."""
            st = request("stats", _timeout=10)["stats"]
            mib = 1024.0 * 1024.0
            mem = (st.get("memory_current") or 0) / mib
            lim = st.get("memory_limit")
            self.memory_bar.max = max(lim / mib if lim else _host_memory_mib(), mem, 1.0)
            self.memory_bar.value = mem
            self.memory_label.value = "%s of %s (peak %s)" % (
                fmt.size(st.get("memory_current")), fmt.size(lim) if lim else "no limit",
                fmt.size(st.get("memory_peak")))
            cores = st.get("cpus_limit") or st.get("cpu_count") or 1
            now, used = st.get("time") or time.time(), st.get("cpu_usage_ns") or 0
            pct = 0.0
            if self._last is not None and now > self._last[0]:
                pct = (used - self._last[1]) / 1e9 / (now - self._last[0]) * 100.0
            self._last = (now, used)
            self.cpu_bar.max = cores * 100.0
            self.cpu_bar.value = max(0.0, min(pct, cores * 100.0))
            self.cpu_label.value = "%.0f%% of %g core(s), %.1f s in all" % (pct, cores, used / 1e9)
            pids, plim = st.get("pids_current") or 0, st.get("pids_limit")
            self.pids_bar.max = float(max(plim or 0, pids, 1))
            self.pids_bar.value = float(pids)
            self.pids_label.value = "%d of %s" % (pids, plim or "no limit")
            for bar, frac in ((self.memory_bar, mem / self.memory_bar.max),
                              (self.pids_bar, pids / self.pids_bar.max)):
                bar.bar_style = "danger" if frac > 0.9 else "warning" if frac > 0.7 else ""
            self.stats = st
            self.updates += 1
            return st

        def start(self):
            """Poll every ``interval`` seconds until :meth:`stop` (or :meth:`close`)."""
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="jupyter-contain-resources", daemon=True)
            self._thread.start()

        def _run(self):
            while not self._stop.is_set():
                try:
                    self.update()
                    self.error = None
                except HostError as exc:
                    self.error = str(exc)
                    self.memory_label.value = "(%s)" % exc
                except Exception as exc:   # a widget update failing must not kill the poller
                    self.error = repr(exc)
                self._stop.wait(self.interval)

        def stop(self):
            self._stop.set()
            t = self._thread
            if t is not None and t is not threading.current_thread():
                t.join(self.interval + 15)
            self._thread = None

        def close(self):
            self.stop()
            super(ResourcesWidget, self).close()

    _classes["snapshot"] = SnapshotWidget
    _classes["resources"] = ResourcesWidget
    return _classes[name]


CONTROL_TARGET = "jupyter.widget.control"


def register_control_target(ip):
    """Answer JupyterLab's widget-control comm without importing ipywidgets at every kernel start.

    JupyterLab 4's widget manager opens ``jupyter.widget.control`` as soon as it
    connects, to restore the widgets of a page that was reloaded; ipywidgets
    registers that target only once imported, so a kernel that has not
    imported it yet logs "No such comm target registered" (an ERROR in the
    server's log at every start) and the page falls back. Importing ipywidgets
    in every kernel costs its start ~0.3 s; this stand-in imports it only
    when the comm arrives (after the kernel is ready), then hands the comm to
    ipywidgets, whose import registers its own targets in place of this one.
    """
    kernel = getattr(ip, "kernel", None)
    manager = getattr(kernel, "comm_manager", None)
    if manager is None or CONTROL_TARGET in getattr(manager, "targets", {}):
        return False

    def opened(comm, msg):
        try:
            import ipywidgets
            from ipywidgets import Widget
        except Exception:
            return   # no ipywidgets: nothing to restore; the page carries on without
        if int(str(getattr(ipywidgets, "__version__", "0")).split(".")[0] or 0) < 8:
            return   # ipywidgets 7 and older have no control comm
        Widget.handle_control_comm_opened(comm, msg)

    manager.register_target(CONTROL_TARGET, opened)
    return True


def _host_memory_mib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return 1024.0


def snapshot_widget(tag=None):
    """The snapshot form: diff summary, tag, message, compression, button, progress, result, install."""
    w = _class("snapshot")()
    if tag:
        w.tag.value = tag
    return w


def resources_widget(interval=1.0, start=True):
    """Live memory, CPU and processes against the limits (``.stop()`` ends the polling)."""
    w = _class("resources")(interval=interval)
    try:
        w.update()
    except HostError as exc:
        w.error = str(exc)
    if start:
        w.start()
    return w
