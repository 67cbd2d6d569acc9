"""Where a repository's objects live: an S3 bucket prefix or a directory.

A target only stores named byte strings. It knows nothing of chunks or manifests, which keeps
the two implementations small and lets the repository code be tested against either. Every
failure becomes a ``TargetError`` whose message names the endpoint and the operation, never a
credential.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from ..errors import InvalidInput, NotFound, PyvolError
from ..files import TEMP_PREFIX, aligned_buffer, write_whole

READ_PIECE = 256 << 10  # an S3 body is read into a chunk's buffer this much at a time
ACCEPTED = "accepted are s3://BUCKET[/PREFIX] and file:///ABSOLUTE/PATH"


class TargetError(PyvolError):
    """The storage behind a repository failed or could not be reached."""

    http_status = 502


class Target(ABC):
    url: str
    #: whether ``put`` wants an object that starts on a page boundary (a file target writes
    #: a chunk with O_DIRECT, and copies anything else into an aligned buffer first): then a
    #: chunk is sealed into a buffer of the thread's, not where it was read (``Room``)
    aligned_puts = False

    @abstractmethod
    def get(self, key: str, limit: int) -> bytes:
        """The object's bytes, at most ``limit`` + 1 of them (the caller refuses an object
        longer than ``limit``: a repository's objects are untrusted); NotFound if it does not
        exist."""

    def get_view(self, key: str, limit: int, lead: int = 0) -> memoryview:
        """As ``get``, but the bytes may be in a buffer of this thread's, valid until its next
        ``get_view``, and writable: a backup's chunks are read and dropped by the thousand, a
        fresh 4 MiB allocation for each costs more in page faults than decrypting it does,
        and they are decrypted where they are. In such a buffer they start ``lead`` bytes
        past a page boundary, so that the body of a chunk can be written with O_DIRECT."""
        return memoryview(self.get(key, limit))

    @abstractmethod
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        """Store the object whole, replacing any old one; a reader never sees a partial one.
        A view (a chunk sealed in a thread's buffer) is read before ``put`` returns, never
        after."""

    @abstractmethod
    def put_if_absent(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Store the object only if no object has that key; False if one had."""

    @abstractmethod
    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """(key, size) of every object whose key starts with ``prefix``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object; one already gone is not an error."""


def _read_into_buffer(limit: int, lead: int, read_at) -> memoryview:
    """An object read into this thread's buffer for objects (``Target.get_view``), at most
    ``limit`` + 1 bytes: ``read_at(view, offset)`` fills the start of ``view`` with the
    object's bytes from ``offset`` and says how many (0 at its end)."""
    view = memoryview(aligned_buffer(lead + limit + 1, "object"))[lead:lead + limit + 1]
    n = 0
    while n < len(view):
        got = read_at(view[n:], n)
        if not got:
            break
        n += got
    return view[:n]


def shown_url(url) -> str:
    """``url`` as an error may show it: no query or fragment, no user or password (either
    may hold a secret), at most 200 characters."""
    if not isinstance(url, str):
        return f"(a {type(url).__name__}, not a string)"
    cut = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = cut.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        cut = f"{scheme}://...@{rest.split('/', 1)[0].rpartition('@')[2]}" + \
            (f"/{rest.split('/', 1)[1]}" if "/" in rest else "")
    elif "@" in cut:
        cut = "..." + cut.rpartition("@")[2]
    return repr(cut[:200])


def parse_repo_url(url) -> tuple[str, str, str]:
    """A repository URL -> ("file", "", PATH) or ("s3", BUCKET, PREFIX), with nothing opened:
    the one check of what ``open_target`` takes, shared with the schedules that store a URL
    long before they open it. Errors never echo a query string or credentials."""
    if not isinstance(url, str) or "://" not in url:
        raise InvalidInput(f"invalid repository URL {shown_url(url)}: {ACCEPTED}")
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:  # an unbalanced '[' (an IPv6 host that is not one)
        raise InvalidInput(f"invalid repository URL {shown_url(url)}: {ACCEPTED}") from None
    if parsed.query or parsed.fragment or "?" in url or "#" in url:
        raise InvalidInput(f"invalid repository URL {shown_url(url)}: no '?' or '#' part; "
                           f"{ACCEPTED}")
    if "@" in parsed.netloc:
        raise InvalidInput(f"invalid repository URL {shown_url(url)}: a repository URL carries "
                           "no credentials; give them to the daemon's environment (AWS_*) "
                           f"instead; {ACCEPTED}")
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise InvalidInput(f"invalid repository URL {shown_url(url)}: {ACCEPTED}")
        return "file", "", urllib.parse.unquote(parsed.path)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise InvalidInput(f"invalid repository URL {shown_url(url)}: no bucket; {ACCEPTED}")
        return "s3", parsed.netloc, parsed.path.strip("/")
    raise InvalidInput(f"invalid repository URL {shown_url(url)}: unknown scheme "
                       f"{parsed.scheme[:20]!r}; {ACCEPTED}")


def open_target(url, settings: dict[str, str] | None = None, make: bool = False) -> Target:
    """The target ``url`` names; with ``make`` (``pyvol backup init``), a file:// directory
    that does not exist yet is made."""
    scheme, bucket, path = parse_repo_url(url)
    if scheme == "file":
        return FileTarget(Path(path), make)
    return S3Target(bucket, path, settings or {})


class FileTarget(Target):
    """A directory, local or NFS-mounted: each object a file, written to a temporary name,
    fsynced, then renamed (or hard-linked, for a put that must not replace)."""

    aligned_puts = True

    def __init__(self, path: Path, make: bool = False):
        self.path = path
        self.url = "file://" + urllib.parse.quote(str(path))
        if make and not path.exists():
            try:
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as e:
                raise TargetError(f"cannot make the repository directory {path}: "
                                  f"{e.strerror}") from None
        # the caller's mistake, not the target's failure: a 4xx
        if path.exists() and not path.is_dir():
            raise InvalidInput(f"repository path {path} is not a directory; accepted is "
                               "file:// and a directory's absolute path")
        if not path.is_dir():
            raise InvalidInput(f"repository directory {path} does not exist: make it and the "
                               f"repository with `pyvol backup init {self.url}`")

    def _file(self, key: str) -> Path:
        return self.path / key

    @contextlib.contextmanager
    def _reading(self, key: str):
        """The object's descriptor; any OSError while reading it becomes a TargetError."""
        # never through a link, never from a device or a FIFO: whoever can write the
        # directory must not make pyvol read /dev/zero or block on a pipe
        try:
            fd = os.open(self._file(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"{self.url}: no object {key}") from None
        except OSError as e:
            raise TargetError(f"{self.url}: cannot read {key}: {e.strerror}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise TargetError(f"{self.url}: object {key} is not a regular file")
            yield fd
        except OSError as e:
            raise TargetError(f"{self.url}: cannot read {key}: {e.strerror}") from None
        finally:
            os.close(fd)

    def get(self, key: str, limit: int) -> bytes:
        with self._reading(key) as fd, os.fdopen(fd, "rb", closefd=False) as f:
            return f.read(limit + 1)

    def get_view(self, key: str, limit: int, lead: int = 0) -> memoryview:
        with self._reading(key) as fd:
            return _read_into_buffer(limit, lead, lambda view, at: os.preadv(fd, [view], at))

    def _write(self, key: str, data: bytes, exclusive: bool) -> bool:
        try:
            # chunks are written once and read back only by a restore or verify
            return write_whole(self._file(key), data, exclusive,
                               direct=key.startswith("chunks/"))
        except OSError as e:
            raise TargetError(f"{self.url}: cannot write {key}: {e.strerror}") from None

    def put(self, key: str, data: bytes) -> None:
        self._write(key, data, exclusive=False)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        return self._write(key, data, exclusive=True)

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.path / prefix.rpartition("/")[0]
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if f.startswith(TEMP_PREFIX):
                    continue
                p = Path(dirpath) / f
                key = str(p.relative_to(self.path))
                if key.startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        yield key, p.stat().st_size

    def delete(self, key: str) -> None:
        try:
            self._file(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            if e.errno != errno.ENOENT:
                raise TargetError(f"{self.url}: cannot delete {key}: {e.strerror}") from None


def s3_environment() -> dict:
    """What this process's S3 targets use, for ``pyvol info``: the endpoint and region the
    client resolves from the environment, and the name of the botocore provider that found
    credentials ("env", "shared-credentials-file", "iam-role", ...; None when none did).
    Never a key or a secret."""
    import botocore.exceptions as bx

    try:
        with _session_lock:
            session = _boto_session()
            client = session.create_client("s3")
            creds = session.get_credentials()
    except (bx.BotoCoreError, ValueError) as e:
        return {"error": f"the daemon's AWS configuration cannot be used: {e}"}
    endpoint = urllib.parse.urlsplit(client.meta.endpoint_url)
    if endpoint.password is not None or endpoint.username is not None:  # never shown
        endpoint = endpoint._replace(netloc=endpoint.netloc.rpartition("@")[2])
    return {"endpoint": endpoint.geturl(), "region": client.meta.region_name,
            "credentials": creds.method if creds is not None else None}


_session = None
_session_lock = threading.Lock()


def _boto_session():
    """This process's one botocore session; the caller holds ``_session_lock`` (sessions are
    not thread-safe, the clients they make are). A session parses botocore's S3 model once
    (about 50 ms of JSON, holding the interpreter lock that Docker's calls wait on in a
    worker): a new session for every repository call parsed it every time, where a client
    from a warm session takes about 3 ms.

    botocore's, not boto3's: a target uses the client's own calls (put_object, get_object,
    list_objects_v2, delete_object), and boto3 adds only its resource layer and s3transfer's
    managed transfers over them, about 4 MiB of every S3 job process's memory (60 modules)
    for nothing it calls (bench/README, session 19)."""
    global _session
    import botocore.session

    if _session is None:
        core = botocore.session.Session()
        core.register_component("data_loader", _quick_loader(core))
        _session = core
    return _session


def _quick_loader(core):
    """botocore's model loader, knowing its services from their directories' names alone.

    Before it loads a model, botocore's loader checks that the service exists by looking into
    every one of its 400-odd service directories for that kind of model (about 900 listings
    and 2,800 stats), once for each kind a client needs: about 80 ms of each job process's
    first S3 client from a cold cache, 15 warm (by hand, cProfile; bench/README). A
    service's directory is enough to know it exists; a kind of model it lacks is still a
    DataNotFoundError when loaded (UnknownServiceError is one). Every service stays
    available: credentials from a role or SSO make their STS or SSO clients here too."""
    from botocore.loaders import Loader

    class QuickLoader(Loader):
        def list_available_services(self, type_name):
            names = set()
            for path in self.search_paths:
                with contextlib.suppress(OSError), os.scandir(path) as entries:
                    names.update(e.name for e in entries if e.is_dir())
            return sorted(names)

    extra = core.get_config_variable("data_path")  # AWS_DATA_PATH, as botocore reads it
    paths = [os.path.expanduser(os.path.expandvars(p)) for p in extra.split(os.pathsep)] \
        if extra else None
    return QuickLoader(extra_search_paths=paths)


class _ViewBody:
    """A view of memory as botocore takes a body it has not got whole: a file it reads in
    pieces (1 MiB for its checksum and signature, a socket's worth to send, again from the
    start for a retry). botocore takes bytes or a bytearray whole, never a memoryview; so
    a chunk sealed in a thread's buffer went out through a fresh 4 MiB copy, or was sealed
    into a fresh bytearray for it, and a backup's thread held two chunk-sized buffers.

    botocore sends such a body with ``Expect: 100-continue``, as it already sent every body
    but a bytearray (manifests, leases, and over https every chunk): over plain http a
    chunk's put now waits one round trip for the server's go-ahead."""

    def __init__(self, view: memoryview):
        self._view, self._at = view, 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, size: int | None = -1) -> bytes:
        end = len(self._view) if size is None or size < 0 else min(len(self._view),
                                                                   self._at + size)
        out = self._view[self._at:end].tobytes()
        self._at = max(self._at, end)
        return out

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        bases = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: len(self._view)}
        if whence not in bases:
            raise ValueError(f"invalid whence ({whence}): accepted are 0, 1 and 2")
        self._at = max(0, bases[whence] + offset)
        return self._at

    def tell(self) -> int:
        return self._at

    def seekable(self) -> bool:
        return True


def _sendable(data) -> bytes | bytearray | _ViewBody:
    """``data`` as botocore takes a body: bytes and bytearrays as they are, a view of a
    thread's buffer (a chunk) as a file over it."""
    return data if isinstance(data, bytes | bytearray) else _ViewBody(memoryview(data))


def _client(cfg):
    with _session_lock:
        return _boto_session().create_client("s3", config=cfg)


class S3Target(Target):
    """A bucket and key prefix, through botocore and the standard AWS configuration.

    Timeouts and retries are always bounded: botocore's defaults wait minutes on a hung endpoint.
    Settings (daemon env ``PYVOL_BACKUP_*``): connect_timeout, read_timeout, max_attempts.
    """

    def __init__(self, bucket: str, prefix: str, settings: dict[str, str]):
        import botocore.config

        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.url = f"s3://{bucket}/{prefix}".rstrip("/")
        try:
            cfg = botocore.config.Config(
                connect_timeout=float(settings.get("connect_timeout", 5)),
                read_timeout=float(settings.get("read_timeout", 30)),
                retries={"max_attempts": int(settings.get("max_attempts", 4)),
                         "mode": "standard"},
                max_pool_connections=32,
                tcp_keepalive=True,
            )
        except ValueError as e:
            raise InvalidInput(f"invalid backup setting: {e}; accepted are numbers") from None
        self.endpoint = (os.environ.get("AWS_ENDPOINT_URL_S3")
                         or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3")
        self.s3 = _client(cfg)

    def _err(self, op: str, key: str, e: Exception) -> PyvolError:
        import botocore.exceptions as bx

        if isinstance(e, bx.ClientError):
            code = e.response.get("Error", {}).get("Code", "?")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
            if code in ("NoSuchBucket",):
                return TargetError(f"{self.url}: no such bucket {self.bucket} at "
                                   f"{self.endpoint}; create it first")
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return TargetError(f"{self.url}: {op} {key} refused by {self.endpoint} ({code}):"
                                   " check the daemon's AWS credentials and bucket policy")
            return TargetError(f"{self.url}: {op} {key} failed at {self.endpoint}: HTTP "
                               f"{status} {code}")
        if isinstance(e, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return TargetError(f"{self.url}: cannot reach {self.endpoint} to {op} {key} "
                               f"({type(e).__name__}); is the endpoint up?")
        if isinstance(e, bx.ReadTimeoutError):
            return TargetError(f"{self.url}: {self.endpoint} did not answer {op} {key} in time "
                               "(read timeout, retried); the endpoint is stalled")
        return TargetError(f"{self.url}: {op} {key} failed at {self.endpoint}: "
                           f"{type(e).__name__}")

    def _call(self, op: str, key: str, fn, **kw):
        import botocore.exceptions as bx

        try:
            return fn(Bucket=self.bucket, **kw)
        except (bx.BotoCoreError, bx.ClientError) as e:
            raise self._err(op, key, e) from None

    @contextlib.contextmanager
    def _reading(self, key: str):
        """The object's body as a stream; any failure, asking for it or reading it, becomes
        NotFound or a TargetError."""
        import botocore.exceptions as bx

        try:
            resp = self.s3.get_object(Bucket=self.bucket, Key=self.prefix + key)
            with contextlib.closing(resp["Body"]) as body:
                yield body
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise NotFound(f"{self.url}: no object {key}") from None
            raise self._err("get", key, e) from None
        except bx.BotoCoreError as e:
            raise self._err("get", key, e) from None

    def get(self, key: str, limit: int) -> bytes:
        with self._reading(key) as body:
            return body.read(limit + 1)

    def get_view(self, key: str, limit: int, lead: int = 0) -> memoryview:
        # in pieces, into the thread's buffer (decrypted there in place): for
        # ``read(limit + 1)`` http.client filled a fresh bytearray of the whole chunk and
        # copied it into bytes, so a restore's thread held three chunk-sized buffers at
        # once (those two and the decrypted chunk); now it holds one and a piece
        with self._reading(key) as body:
            def piece(view: memoryview, _at: int) -> int:
                got = body.read(min(READ_PIECE, len(view)))
                view[:len(got)] = got
                return len(got)

            return _read_into_buffer(limit, lead, piece)

    def put(self, key: str, data: bytes) -> None:
        self._call("put", key, self.s3.put_object, Key=self.prefix + key, Body=_sendable(data))

    def put_if_absent(self, key: str, data: bytes) -> bool:
        import botocore.exceptions as bx

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=_sendable(data),
                               IfNoneMatch="*")
            return True
        except bx.ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed",
                                                            "ConditionalRequestConflict"):
                return False
            raise self._err("put", key, e) from None
        except bx.BotoCoreError as e:
            raise self._err("put", key, e) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        import botocore.exceptions as bx

        pages = self.s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self.prefix):], obj["Size"]
        except (bx.BotoCoreError, bx.ClientError) as e:
            raise self._err("list", prefix, e) from None

    def delete(self, key: str) -> None:
        self._call("delete", key, self.s3.delete_object, Key=self.prefix + key)
