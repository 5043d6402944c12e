"""HTTP handlers of ``/jupyter-contain/api/v1/``: authentication, authorization, JSON in and out.

Owns the route table (:data:`ROUTES`, mirrored by ``openapi.yaml`` and checked
against it by a test), reading request bodies (size cap, JSON object, the
route's allowlist of fields checked before anything else), the error body
``{"error": {"code", "message"[, "step"]}}`` for every failure including
Jupyter Server's own 403s, and the server-sent event stream of an operation.
Must not do the work itself: every handler calls one :class:`~.service.Service`
method, and every handler method is ``@web.authenticated`` and ``@authorized``
on resource :data:`AUTH_RESOURCE` (XSRF is Jupyter Server's own check, as for
its REST API: token-authenticated requests need none, cookie-authenticated
writes need the ``_xsrf`` cookie echoed).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web
from tornado.iostream import StreamClosedError

from . import validate
from .operations import FINAL, Operation
from .service import NotFound, Service, error_status

log = logging.getLogger(__name__)

#: the resource name an Authorizer sees for every route of this API
AUTH_RESOURCE = "contain"
API = "jupyter-contain/api/v1"
#: server-sent events: at most this many per second per stream, and a comment line this often
SSE_INTERVAL = 0.2
SSE_KEEPALIVE = 15.0


class BaseHandler(ExtensionHandlerMixin, APIHandler):
    """JSON errors, body parsing with the allowlist, and the service."""

    auth_resource = AUTH_RESOURCE

    @property
    def service(self) -> Service:
        return self.settings["jupyter_contain_service"]

    def body(self, route: str) -> dict[str, Any]:
        raw = self.request.body or b""
        limit = validate.MAX_BODIES.get(route, validate.MAX_BODY)
        if len(raw) > limit:
            raise validate.BadRequest(f"request body larger than {limit} bytes", "body_too_large")
        if not raw.strip():
            data: Any = {}
        else:
            try:
                data = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise validate.BadRequest("the request body is not valid JSON", "invalid_json") from None
        return dict(validate.check_fields(route, data))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError):
            code = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                    405: "method_not_allowed"}.get(status_code, "http_error")
            err = {"code": code, "message": exc.log_message or self._reason}
        elif exc is not None:
            status_code, err = error_status(exc)
        else:
            err = {"code": "http_error", "message": self._reason}
        self.set_status(status_code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": err}))

    def _handle_request_exception(self, e: BaseException) -> None:
        # our own failures are answers, not server errors: no traceback in the log for a 4xx
        if not isinstance(e, web.HTTPError) and not self._finished:
            status, _ = error_status(e)
            if status < 500:
                self.send_error(status, exc_info=(type(e), e, e.__traceback__))
                return
        super()._handle_request_exception(e)

    def reply(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj, default=str))

    def operation_reply(self, op: Operation) -> None:
        self.set_header("Location", self.base_url + f"{API}/operations/{op.id}")
        self.reply({"operation": op.to_json()}, 202)


def _op(service: Service, op_id: str) -> Operation:
    op = service.operations.get(validate.operation_id(op_id))
    if op is None:
        raise NotFound(f"no operation {op_id}", "operation_not_found")
    return op


# --- images ----------------------------------------------------------------------------


class ImagesHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"images": await self.service.images()})


class ImageHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, name: str) -> None:
        self.reply({"image": await self.service.image(name)})

    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        await self.service.rmi(name)
        self.set_status(204)
        self.finish()


class ImageTagHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        self.reply({"image": await self.service.tag(name, self.body("tag"))}, 201)


class ImagePushHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        self.operation_reply(await self.service.push(name, self.body("push")))


class ImageSaveHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, name: str) -> None:
        self.reply(await self.service.save_image(name, self.body("save")))


class PullHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.operation_reply(self.service.pull(self.body("pull")))


class ImportHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.import_image(self.body("import")), 201)


class GcHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.body("gc")
        self.reply(await self.service.gc())


class DfHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.service.df())


class BuildsHandler(BaseHandler):
    """Build an image from a Containerfile in a server-side folder (an operation of kind build)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.operation_reply(await self.service.build(self.body("build")))


# --- operations ----------------------------------------------------------------------------


class OperationsHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"operations": [o.to_json() for o in self.service.operations.all()]})


class OperationHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, op_id: str) -> None:
        self.reply({"operation": _op(self.service, op_id).to_json()})

    @web.authenticated
    @authorized
    async def delete(self, op_id: str) -> None:
        op = _op(self.service, op_id)
        op.cancel()
        self.reply({"operation": op.to_json()}, 202)


class OperationEventsHandler(BaseHandler):
    """``text/event-stream`` of an operation: a snapshot at every change (at most 5/s), the last one final.

    With ``?cancel_on_close=1`` a client that goes away before the end cancels
    the operation (the remote CLI's Ctrl-C).
    """

    _watched: Operation | None = None

    @web.authenticated
    @authorized
    async def get(self, op_id: str) -> None:
        op = _op(self.service, op_id)
        cancel_on_close = self.get_query_argument("cancel_on_close", "0") in ("1", "true")
        if cancel_on_close:
            self._watched = op
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")
        sent = -1
        last_write = 0.0
        loop = asyncio.get_running_loop()
        try:
            while True:
                version = op.version
                if version != sent:
                    snap = op.to_json()
                    sent = snap["version"]
                    self.write(f"data: {json.dumps(snap, default=str)}\n\n")
                    await self.flush()
                    last_write = loop.time()
                    if snap["state"] in FINAL:
                        break
                elif loop.time() - last_write > SSE_KEEPALIVE:
                    self.write(": keep-alive\n\n")
                    await self.flush()
                    last_write = loop.time()
                await op.changed(sent, SSE_KEEPALIVE)
                if op.state not in FINAL:
                    await asyncio.sleep(SSE_INTERVAL)   # throttle: a burst of changes is one event
        except StreamClosedError:
            if cancel_on_close and op.state not in FINAL:
                log.info("operation %s: its client went away: cancelling", op.id)
                op.cancel()
            return
        self.finish()

    def on_connection_close(self) -> None:
        # the client went away while we wait for the next change: cancel now, not at the next write
        op = self._watched
        if op is not None and op.state not in FINAL:
            log.info("operation %s: its client went away: cancelling", op.id)
            op.cancel()
        super().on_connection_close()


# --- containers -----------------------------------------------------------------------------


class ContainersHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        all_ = self.get_query_argument("all", "1") not in ("0", "false")
        self.reply({"containers": await self.service.containers(all_=all_)})


class ContainerHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.reply({"container": await self.service.container(ref)})

    @web.authenticated
    @authorized
    async def delete(self, ref: str) -> None:
        force = self.get_query_argument("force", "0") in ("1", "true")
        await self.service.remove(ref, force=force)
        self.set_status(204)
        self.finish()


class ContainerStatsHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.reply({"stats": await self.service.stats(ref)})


class ContainerDiffHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.reply(await self.service.diff(ref))


class ContainerLogsHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, ref: str) -> None:
        self.reply(await self.service.logs(ref))


class ContainerCommitHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        self.operation_reply(await self.service.commit(ref, self.body("commit")))


class ContainerStopHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        self.reply(await self.service.stop(ref, self.body("stop")))


class ContainerResetHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, ref: str) -> None:
        self.body("reset")
        await self.service.reset(ref)
        self.reply({"reset": "done"})


# --- kernels' containers ----------------------------------------------------------------------


class KernelsHandler(BaseHandler):
    """Start a contained kernel with per-start options (memory, CPUs, network, image tag)."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        self.reply(await self.service.start_kernel(self.body("kernel_start")), 201)


class KernelContainerHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, kid: str) -> None:
        self.reply(await self.service.kernel(kid))


class KernelStatsHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, kid: str) -> None:
        self.reply({"stats": await self.service.kernel_stats(kid)})


class KernelDiffHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self, kid: str) -> None:
        self.reply(await self.service.kernel_diff(kid))


class KernelCommitHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, kid: str) -> None:
        self.operation_reply(await self.service.kernel_commit(kid, self.body("kernel_commit")))


class KernelResetHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def post(self, kid: str) -> None:
        self.body("reset")
        self.reply(await self.service.kernel_reset(kid), 202)


# --- kernelspecs and config ---------------------------------------------------------------------


class KernelspecsHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply({"kernelspecs": await self.service.kernelspecs()})

    @web.authenticated
    @authorized
    async def post(self) -> None:
        req = validate.kernelspec_request(self.body("kernelspec"), self.service.limits)
        self.reply({"kernelspec": await self.service.install_kernelspec(req)}, 201)


class KernelspecHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        await self.service.remove_kernelspec(name)
        self.set_status(204)
        self.finish()


class ConfigHandler(BaseHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(self.service.config_json())


class NotFoundHandler(BaseHandler):
    """Anything else under the API prefix: a JSON 404, after the same authentication."""

    @web.authenticated
    @authorized
    async def get(self, rest: str) -> None:
        raise NotFound(f"no such route: {rest[:100]}", "no_route")

    post = delete = put = patch = get


_SEG = r"([^/]+)"
#: (path under the API prefix, handler); the order matters where a literal shadows a name
ROUTES: list[tuple[str, type[BaseHandler]]] = [
    ("config", ConfigHandler),
    ("images", ImagesHandler),
    ("images/df", DfHandler),
    ("images/gc", GcHandler),
    ("images/pull", PullHandler),
    ("images/import", ImportHandler),
    (f"images/{_SEG}", ImageHandler),
    (f"images/{_SEG}/tag", ImageTagHandler),
    (f"images/{_SEG}/push", ImagePushHandler),
    (f"images/{_SEG}/save", ImageSaveHandler),
    ("builds", BuildsHandler),
    ("operations", OperationsHandler),
    (f"operations/{_SEG}", OperationHandler),
    (f"operations/{_SEG}/events", OperationEventsHandler),
    ("containers", ContainersHandler),
    (f"containers/{_SEG}", ContainerHandler),
    (f"containers/{_SEG}/stats", ContainerStatsHandler),
    (f"containers/{_SEG}/diff", ContainerDiffHandler),
    (f"containers/{_SEG}/logs", ContainerLogsHandler),
    (f"containers/{_SEG}/commit", ContainerCommitHandler),
    (f"containers/{_SEG}/stop", ContainerStopHandler),
    (f"containers/{_SEG}/reset", ContainerResetHandler),
    ("kernels", KernelsHandler),
    (f"kernels/{_SEG}/container", KernelContainerHandler),
    (f"kernels/{_SEG}/container/stats", KernelStatsHandler),
    (f"kernels/{_SEG}/container/diff", KernelDiffHandler),
    (f"kernels/{_SEG}/container/commit", KernelCommitHandler),
    (f"kernels/{_SEG}/container/reset", KernelResetHandler),
    ("kernelspecs", KernelspecsHandler),
    (f"kernelspecs/{_SEG}", KernelspecHandler),
]


def handlers() -> list[tuple[str, type]]:
    """The route table as ExtensionApp takes it (it prepends the server's base_url and our name)."""
    out: list[tuple[str, type]] = [(f"/{API}/{path}/?$", cls) for path, cls in ROUTES]
    out.append((f"/{API}/(.*)", NotFoundHandler))
    return out
