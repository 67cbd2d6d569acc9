"""HTTP: Docker's VolumeDriver protocol, and the control API the ``pyvol`` CLI speaks.

No storage logic here: parse the body, check its shape, call the manager, turn errors into
``Err``. dockerd sends no Content-Type, so bodies are parsed from raw bytes; Opts may be null.
Docker endpoints answer 200 with ``Err`` for every error a caller can cause; the control API
uses HTTP status codes too. Nothing unexpected ever leaks a traceback: it is logged here and
the caller gets a one-line ``Err``.
"""

import functools
import json
import logging
import threading

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from .backup.job import Job
from .errors import InvalidInput, PyvolError
from .manager import Manager, parse_snap_ref

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10

DOCKER_ENDPOINTS = [
    "/Plugin.Activate", "/VolumeDriver.Create", "/VolumeDriver.Remove", "/VolumeDriver.Mount",
    "/VolumeDriver.Unmount", "/VolumeDriver.Path", "/VolumeDriver.Get", "/VolumeDriver.List",
    "/VolumeDriver.Capabilities",
]


def _json(payload, status=200) -> Response:
    return Response(json.dumps(payload), status=status,
                    mimetype="application/vnd.docker.plugins.v1+json")


def _body() -> dict:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"malformed JSON body: {e}; accepted is a JSON object") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidInput("invalid body: accepted is a JSON object")
    return body


def _field(body: dict, key: str, default=None, required: bool = True):
    if key not in body or body[key] is None:
        if required:
            raise InvalidInput(f"missing field {key!r} in the request body")
        return default
    return body[key]


def _streamed(what: str, work) -> Response:
    """Run ``work(job)``; with ``?stream=1`` answer NDJSON progress lines, then the result.

    The work runs in its own thread; the answer's generator reports on it twice a second. If
    the client goes away, the server closes the generator and the work is cancelled at its
    next step, so a killed CLI never leaves a backup finishing behind its back.
    """
    job = Job(what)
    if request.args.get("stream") != "1":
        return _json(work(job))
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = work(job)
        except PyvolError as e:
            outcome["Err"] = str(e)
        except BaseException as e:  # noqa: BLE001 - reported to the client, logged here
            log.exception("internal error in %s", what)
            outcome["Err"] = (f"internal error ({type(e).__name__}); the pyvol daemon's log "
                              "has the details")

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()

    def lines():
        try:
            while worker.is_alive():
                worker.join(0.5)
                yield json.dumps({"progress": job.snapshot()}) + "\n"
            yield json.dumps(outcome) + "\n"
        finally:
            if worker.is_alive():
                log.warning("client of %s went away: cancelling it", what)
                job.cancel()
                worker.join()

    return Response(lines(), mimetype="application/x-ndjson")


def create_app(manager: Manager) -> Flask:
    app = Flask("pyvol")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    def docker(path):
        """A Docker protocol endpoint: every error becomes ``Err`` in a 200 answer."""
        def wrap(fn):
            @functools.wraps(fn)
            def handler():
                try:
                    result = fn(_body())
                except PyvolError as e:
                    log.info("%s refused: %s", path, e)
                    return _json({"Err": str(e)})
                return _json({**result, "Err": ""} if path != "/Plugin.Activate" else result)
            app.add_url_rule(path, fn.__name__, handler, methods=["POST"])
            return fn
        return wrap

    @docker("/Plugin.Activate")
    def activate(_):
        return {"Implements": ["VolumeDriver"]}

    @docker("/VolumeDriver.Capabilities")
    def capabilities(_):
        scopes = {b.scope for b in manager.backends.values()}
        # global only when every backend's volumes are visible from every host
        return {"Capabilities": {"Scope": "global" if scopes == {"global"} else "local"}}

    @docker("/VolumeDriver.Create")
    def create(b):
        name, opts = _field(b, "Name"), b.get("Opts")
        job = None
        if isinstance(opts, dict) and opts.get("from-backup"):
            # Docker gives up on a plugin call after 30 s; stop before it does, undo, and say
            # how to do it instead, rather than finish a volume Docker no longer waits for.
            timeout = manager.config.docker_timeout
            job = Job("restore", deadline=max(1.0, timeout - 5), late=(
                f"restoring {opts['from-backup']} takes longer than Docker waits for a plugin "
                f"({timeout:g} s), so it was stopped and nothing was created: run `pyvol restore "
                f"'{opts['from-backup']}' {name}` (it shows progress), then use volume "
                f"{name} in Docker by name"))
        manager.create(name, opts, job=job)
        return {}

    @docker("/VolumeDriver.Remove")
    def remove(b):
        manager.remove(_field(b, "Name"))
        return {}

    @docker("/VolumeDriver.Mount")
    def mount(b):
        return {"Mountpoint": manager.mount(_field(b, "Name"), _field(b, "ID", "", False))}

    @docker("/VolumeDriver.Unmount")
    def unmount(b):
        manager.unmount(_field(b, "Name"), _field(b, "ID", "", False))
        return {}

    @docker("/VolumeDriver.Path")
    def path(b):
        return {"Mountpoint": manager.path(_field(b, "Name"))}

    @docker("/VolumeDriver.Get")
    def get(b):
        return {"Volume": manager.get(_field(b, "Name"))}

    @docker("/VolumeDriver.List")
    def list_(_):
        return {"Volumes": manager.mountpoints()}

    # The control API, for the CLI: REST-ish, JSON in and out, errors as {"Err": ...}.
    def control(rule, methods):
        def wrap(fn):
            @functools.wraps(fn)
            def handler(**kw):
                try:
                    body = _body() if request.method in ("POST", "PUT") else {}
                    result = fn(body, **kw)
                except PyvolError as e:
                    return _json({"Err": str(e)}, e.http_status)
                if isinstance(result, Response):
                    return result
                return _json(result if result is not None else {})
            app.add_url_rule("/pyvol/v1" + rule, "ctl_" + fn.__name__, handler, methods=methods)
            return fn
        return wrap

    @control("/info", ["GET"])
    def info(_):
        return manager.info()

    @control("/volumes", ["GET"])
    def volumes(_):
        return manager.list()

    @control("/volumes", ["POST"])
    def volume_create(b):
        return manager.create(_field(b, "Name"), b.get("Opts"))

    @control("/volumes/<name>", ["GET"])
    def volume_get(_, name):
        return manager.get(name)

    @control("/volumes/<name>", ["DELETE"])
    def volume_remove(_, name):
        manager.remove(name)

    @control("/volumes/<name>/mount", ["POST"])
    def volume_mount(b, name):
        return {"Mountpoint": manager.mount(name, _field(b, "ID", "", False))}

    @control("/volumes/<name>/unmount", ["POST"])
    def volume_unmount(b, name):
        manager.unmount(name, _field(b, "ID", "", False))

    @control("/snapshots", ["GET"])
    def snapshots(_):
        return manager.snapshot_list(request.args.get("volume"))

    @control("/volumes/<name>/snapshots", ["POST"])
    def snapshot_create(b, name):
        return manager.snapshot_create(name, _field(b, "Name", None, False))

    @control("/snapshots/<ref>", ["GET"])
    def snapshot_get(_, ref):
        return manager.snapshot_get(*parse_snap_ref(ref))

    @control("/snapshots/<ref>", ["DELETE"])
    def snapshot_remove(_, ref):
        manager.snapshot_remove(*parse_snap_ref(ref))

    @control("/volumes/<name>/changes", ["GET"])
    def volume_changes(_, name):
        base, snap = request.args.get("base") or None, request.args.get("snap")
        if not snap:
            raise InvalidInput("missing query parameter 'snap'")
        return [list(r) for r in manager.changed_ranges(name, base, snap)]

    @control("/volumes/<name>/leases", ["GET"])
    def volume_leases(_, name):
        return manager.leases(name)

    @control("/volumes/<name>/leases/clear", ["POST"])
    def volume_lease_clear(b, name):
        return manager.clear_lease(name, _field(b, "Host"))

    # backups: long work streams progress (see _streamed); a backup URL goes in the body or
    # the query string because it holds '/' and '#'
    backups = manager.backups

    def _arg(name: str) -> str:
        value = request.args.get(name)
        if not value:
            raise InvalidInput(f"missing query parameter {name!r}")
        return value

    @control("/backups", ["POST"])
    def backup_create(b):
        ref, dest = _field(b, "Volume"), _field(b, "Dest")
        return _streamed("backup", lambda job: backups.create(ref, dest, job))

    @control("/backups", ["GET"])
    def backup_list(_):
        return backups.list(_arg("repo"), request.args.get("volume") or None)

    @control("/backup", ["GET"])
    def backup_inspect(_):
        return backups.inspect(_arg("url"))

    @control("/backup", ["DELETE"])
    def backup_remove(_):
        return backups.remove(_arg("url"))

    @control("/backup/verify", ["POST"])
    def backup_verify(b):
        url = _field(b, "Url")
        return _streamed("verify", lambda job: backups.verify(url, job))

    @control("/repository/gc", ["POST"])
    def repository_gc(b):
        return backups.gc(_field(b, "Repo"))

    @control("/restore", ["POST"])
    def restore(b):
        url, name = _field(b, "Url"), _field(b, "Name")
        size, backend = _field(b, "Size", None, False), _field(b, "Backend", None, False)
        return _streamed("restore", lambda job: backups.restore(url, name, size, backend, job))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code == 404:
            msg = (f"unknown endpoint {request.path}: accepted are "
                   f"{', '.join(DOCKER_ENDPOINTS)} and /pyvol/v1/...")
        elif e.code == 413:
            msg = f"request body too large: accepted is at most {MAX_BODY // 1024} KiB"
        elif e.code == 405:
            msg = f"method {request.method} not allowed on {request.path}"
        else:
            msg = e.description or e.name
        return _json({"Err": msg}, e.code or 500)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("internal error on %s", request.path)
        return _json({"Err": f"internal error ({type(e).__name__}); the pyvol daemon's log "
                             "has the details"}, 500)

    return app
