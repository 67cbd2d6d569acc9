"""HTTP: Docker's VolumeDriver protocol, and the control API the ``pyvol`` CLI speaks.

No storage logic here: parse the body, check its shape, call the part that does it (the
volume lifecycle, snapshots, backups), turn errors into
``Err``. dockerd sends no Content-Type, so bodies are parsed from raw bytes; Opts may be null.
Docker endpoints answer 200 with ``Err`` for every error a caller can cause; the control API
uses HTTP status codes too. Whatever a caller sends (a body that cannot be read, JSON nested
too deep, strings that are not Unicode, fields of the wrong type) is refused with a sentence
saying what was wrong and what is accepted. Nothing unexpected ever leaks a traceback: it is
logged here and the caller gets a one-line ``Err``.
"""

import functools
import json
import logging
import threading
import time

from flask import Flask, Response, request
from gunicorn.http.errors import ParseException
from werkzeug.exceptions import ClientDisconnected, HTTPException

from .backup.job import Job
from .errors import InvalidInput, PyvolError
from .names import parse_snap_ref
from .parts import Parts

log = logging.getLogger(__name__)

MAX_BODY = 64 << 10
MAX_DEPTH = 32  # no request nests deeper than 3; the limit keeps reprs and walks shallow
ACCEPTED_BODY = "accepted is a JSON object"


def _short(value) -> str:
    """``value`` as a message may show it: repr'd, and cut if long."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


# errors raised while reading a body off the socket: the request's fault, never ours
_READ_ERRORS = (ParseException, OSError, ValueError)


def _read_body() -> bytes:
    try:
        return request.get_data(cache=False)
    except ClientDisconnected:
        raise InvalidInput("malformed request body: the request ended before its body did; "
                           "accepted is a body as long as its Content-Length or chunks say"
                           ) from None
    except HTTPException:
        raise  # a body too large: 413, said as such
    except _READ_ERRORS as e:
        raise InvalidInput(f"malformed request body: {e} ({type(e).__name__}); accepted is "
                           "a body sent whole, with Content-Length or as well-formed chunks"
                           ) from None


def _check_decoded(body) -> None:
    """Refuse what JSON can carry but no field accepts: deep nesting and lone surrogates.

    Iterative, so the walk itself never runs out of stack.
    """
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            _check_text(value)
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                raise InvalidInput(f"invalid body: JSON nested more than {MAX_DEPTH} levels "
                                   f"deep; {ACCEPTED_BODY} of the fields each endpoint takes")
            if isinstance(value, dict):
                for k, v in value.items():
                    _check_text(k)
                    stack.append((v, depth + 1))
            else:
                stack.extend((v, depth + 1) for v in value)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(
            f"invalid string {_short(text)} in the body: it is not valid UTF-8 (a lone "
            f"surrogate {text[e.start]!r} at character {e.start}); accepted are JSON strings "
            "of Unicode characters") from None


def _body() -> dict:
    raw = _read_body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidInput(f"malformed JSON body: nested too deeply to read; {ACCEPTED_BODY} "
                           f"nested at most {MAX_DEPTH} levels deep") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"malformed JSON body: {e}; {ACCEPTED_BODY}") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidInput(f"invalid body: {ACCEPTED_BODY}")
    _check_decoded(body)
    return body


def _field(body: dict, key: str, default=None, required: bool = True):
    if key not in body or body[key] is None:
        if required:
            raise InvalidInput(f"missing field {key!r} in the request body")
        return default
    return body[key]


def _text(body: dict, key: str, accepted: str, required: bool = True) -> str | None:
    """A field that must be a string (the part it goes to checks what the string says)."""
    value = _field(body, key, None, required)
    if value is not None and not isinstance(value, str):
        raise InvalidInput(f"invalid field {key!r}: {_short(value)} is a "
                           f"{type(value).__name__}; accepted is a string: {accepted}")
    return value


def _json(payload, status=200) -> Response:
    return Response(json.dumps(payload), status=status,
                    mimetype="application/vnd.docker.plugins.v1+json")


# Docker's VolumeDriver protocol: route -> (call with the parts and the body, reply field).
# Every error becomes ``Err`` in a 200 answer; a success answers {field: result, "Err": ""}.

def _docker_create(p: Parts, b: dict) -> None:
    name, opts = _field(b, "Name"), b.get("Opts")
    job = None
    if isinstance(opts, dict) and opts.get("from-backup"):
        # Docker gives up on a plugin call after 30 s; stop before it does, undo, and say
        # how to do it instead, rather than finish a volume Docker no longer waits for.
        timeout = p.host.config.docker_timeout
        job = Job("restore", deadline=max(1.0, timeout - 5), late=(
            f"restoring {opts['from-backup']} takes longer than Docker waits for a plugin "
            f"({timeout:g} s), so it was stopped and nothing was created: run `pyvol restore "
            f"'{opts['from-backup']}' {name}` (it shows progress), then use volume "
            f"{name} in Docker by name"))
    p.volumes.create(name, opts, job=job)


def _docker_capabilities(p: Parts, _b: dict) -> dict:
    scopes = {backend.scope for backend in p.host.backends.values()}
    # global only when every backend's volumes are visible from every host
    return {"Scope": "global" if scopes == {"global"} else "local"}


def _docker_deadline(p: Parts) -> float:
    """When Docker stops waiting for this call (its plugin timeout, less a margin for the
    answer to reach it): a Mount done later would be counted for nobody."""
    timeout = p.host.config.docker_timeout
    return time.monotonic() + timeout - min(2.0, timeout / 4)


def _mount_id(b: dict):
    return _field(b, "ID", "", False)


DOCKER_CALLS = {
    "/Plugin.Activate": (lambda p, b: ["VolumeDriver"], "Implements"),
    "/VolumeDriver.Create": (_docker_create, None),
    "/VolumeDriver.Remove": (lambda p, b: p.volumes.remove(_field(b, "Name")), None),
    "/VolumeDriver.Mount": (lambda p, b: p.volumes.mount(
        _field(b, "Name"), _mount_id(b), deadline=_docker_deadline(p)), "Mountpoint"),
    "/VolumeDriver.Unmount": (lambda p, b: p.volumes.unmount(_field(b, "Name"), _mount_id(b)),
                              None),
    "/VolumeDriver.Path": (lambda p, b: p.volumes.path(_field(b, "Name")), "Mountpoint"),
    "/VolumeDriver.Get": (lambda p, b: p.volumes.get(_field(b, "Name")), "Volume"),
    "/VolumeDriver.List": (lambda p, b: p.volumes.mountpoints(), "Volumes"),
    "/VolumeDriver.Capabilities": (_docker_capabilities, "Capabilities"),
}
DOCKER_ENDPOINTS = list(DOCKER_CALLS)


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


def create_app(parts: Parts) -> Flask:
    volumes, snapshots = parts.volumes, parts.snapshots
    app = Flask("pyvol")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    # an empty path part ("/volumes//mount") is refused, not redirected with an HTML page
    app.url_map.merge_slashes = False

    def route(rule, endpoint, handler, methods):
        # no automatic OPTIONS: it would answer 200 with an empty body, not JSON
        app.add_url_rule(rule, endpoint, handler, methods=methods,
                         provide_automatic_options=False)

    def docker(path, call, field):
        def handler():
            try:
                result = call(parts, _body())
            except PyvolError as e:
                log.info("%s refused: %s", path, e)
                return _json({"Err": str(e)})
            if path == "/Plugin.Activate":  # Docker's handshake: no Err field
                return _json({field: result})
            return _json({field: result, "Err": ""} if field else {"Err": ""})
        route(path, path, handler, ["POST"])

    for path, (call, field) in DOCKER_CALLS.items():
        docker(path, call, field)

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
            route("/pyvol/v1" + rule, "ctl_" + fn.__name__, handler, methods)
            return fn
        return wrap

    @control("/info", ["GET"])
    def info(_):
        data = parts.host.info()
        if request.args.get("backups") == "1":  # `pyvol info`; botocore's setup costs, so asked
            data["backups"] = parts.backups.info()
        return data

    @control("/volumes", ["GET"])
    def volume_list(_):
        return volumes.list()

    @control("/volumes", ["POST"])
    def volume_create(b):
        return volumes.create(_field(b, "Name"), b.get("Opts"))

    @control("/volumes/<name>", ["GET"])
    def volume_get(_, name):
        return volumes.get(name)

    @control("/volumes/<name>", ["DELETE"])
    def volume_remove(_, name):
        volumes.remove(name)

    @control("/volumes/<name>/mount", ["POST"])
    def volume_mount(b, name):
        return {"Mountpoint": volumes.mount(name, _mount_id(b))}

    @control("/volumes/<name>/unmount", ["POST"])
    def volume_unmount(b, name):
        volumes.unmount(name, _mount_id(b), every=_field(b, "All", False, False) is True)

    @control("/volumes/<name>/resize", ["POST"])
    def volume_resize(b, name):
        return volumes.resize(name, _text(b, "Size", "a size such as 20G"))

    @control("/snapshots/<ref>/rollback", ["POST"])
    def snapshot_rollback(b, ref):
        discard = _field(b, "DiscardCurrent", False, False)
        if not isinstance(discard, bool):
            raise InvalidInput(f"invalid field 'DiscardCurrent': {_short(discard)}; accepted "
                               "is true or false")
        return snapshots.rollback(*parse_snap_ref(ref), discard_current=discard)

    @control("/snapshots", ["GET"])
    def snapshot_list(_):
        return snapshots.list(request.args.get("volume"))

    @control("/volumes/<name>/snapshots", ["POST"])
    def snapshot_create(b, name):
        return snapshots.create(name, _field(b, "Name", None, False))

    @control("/snapshots/<ref>", ["GET"])
    def snapshot_get(_, ref):
        return snapshots.get(*parse_snap_ref(ref))

    @control("/snapshots/<ref>", ["DELETE"])
    def snapshot_remove(_, ref):
        snapshots.remove(*parse_snap_ref(ref))

    @control("/volumes/<name>/changes", ["GET"])
    def volume_changes(_, name):
        base, snap = request.args.get("base") or None, request.args.get("snap")
        if not snap:
            raise InvalidInput("missing query parameter 'snap'")
        return [list(r) for r in snapshots.changed_ranges(name, base, snap)]

    @control("/volumes/<name>/claims", ["GET"])
    def volume_claims(_, name):
        return parts.catalogue.claims(name)

    @control("/volumes/<name>/claims/clear", ["POST"])
    def volume_claim_clear(b, name):
        return parts.catalogue.clear_claim(name, _field(b, "Host"))

    # schedules: set (the options a create takes: snapshot-every, backup-keep, ...), list, rm
    @control("/schedules", ["GET"])
    def schedule_list(_):
        return parts.schedules.list(request.args.get("volume") or None)

    @control("/volumes/<name>/schedules", ["PUT"])
    def schedule_set(b, name):
        return parts.schedules.set(name, _field(b, "Opts"))

    @control("/volumes/<name>/schedules", ["DELETE"])
    def schedule_remove(_, name):
        return parts.schedules.remove(name, request.args.get("what") or None)

    # backups: long work streams progress (see _streamed); a backup URL goes in the body or
    # the query string because it holds '/' and '#'
    backups = parts.backups

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

    @control("/repository/forget", ["POST"])
    def repository_forget(b):
        flags = {}
        for key in ("DryRun", "Gc"):
            flags[key] = _field(b, key, False, False)
            if not isinstance(flags[key], bool):
                raise InvalidInput(f"invalid field {key!r}: {_short(flags[key])}; accepted is "
                                   "true or false")
        return backups.forget(
            _text(b, "Repo", "a repository URL, s3://BUCKET[/PREFIX] or file:///PATH"),
            _text(b, "Volume", "a volume name, or none for every volume", False),
            _field(b, "Keep", {}, False), dry_run=flags["DryRun"], gc=flags["Gc"])

    @control("/repository/init", ["POST"])
    def repository_init(b):
        return backups.init(_text(b, "Repo", "a repository URL, s3://BUCKET[/PREFIX] or "
                                             "file:///PATH"))

    @control("/restore", ["POST"])
    def restore(b):
        # strings, like Docker's Opts they become; each says what it takes
        url = _text(b, "Url", "a backup URL, REPOSITORY#VOLUME/BACKUP-ID")
        name = _field(b, "Name")
        size = _text(b, "Size", "a size such as 10G, or none for the backed-up size", False)
        backend = _text(b, "Backend", "a backend name, or none for the default", False)
        # a restore is a create whose source is the backup
        opts = {"from-backup": url, **({"size": size} if size else {}),
                **({"backend": backend} if backend else {})}
        return _streamed("restore", lambda job: volumes.create(name, opts, job=job))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException):
        if e.code == 404:
            msg = (f"unknown endpoint {request.path}: accepted are "
                   f"{', '.join(DOCKER_ENDPOINTS)} and /pyvol/v1/...")
        elif e.code == 413:
            msg = f"request body too large: accepted is at most {MAX_BODY // 1024} KiB"
        elif e.code == 405:
            allowed = sorted(set(getattr(e, "valid_methods", None) or []) - {"HEAD"})
            msg = f"method {request.method} not allowed on {request.path}" + (
                f": accepted is {' or '.join(allowed)}" if allowed else "")
        else:
            msg = e.description or e.name
        return _json({"Err": msg}, e.code or 500)

    @app.errorhandler(Exception)
    def unexpected(e: Exception):
        log.exception("internal error on %s", request.path)
        return _json({"Err": f"internal error ({type(e).__name__}); the pyvol daemon's log "
                             "has the details"}, 500)

    return app
