"""A backup repository: config, chunks, manifests, on one target (docs/backup-repository.md).

The repository is the only code that knows the key layout; the block engine asks it for
"store this chunk" and "read that manifest" and never builds a key itself.
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass

from .. import clock
from ..crashpoint import crashpoint
from ..errors import Conflict, InvalidInput, NotFound, PyvolError, portable
from ..files import ALIGN
from .blobs import Codec, CorruptObject, Room
from .targets import Target, open_target

FORMAT = 1
CHUNK_SIZE = 4 << 20
CHUNK_SIZES = (64 << 10, 64 << 20)  # what a config may say: anything else is refused
# Largest plaintext of each kind of object (docs/backup-repository.md, "Objects"): a
# repository is untrusted input, and nothing it holds may make a reader allocate more.
CONFIG_CAP = 64 << 10
MANIFEST_CAP = 256 << 20  # a 10 TiB volume of 4 MiB chunks lists 2.6M chunks: about 200 MiB
LOCK_CAP = 64 << 10
SEAL_OVERHEAD = 1 + 1 + 12 + 16  # type byte, inner type byte, nonce, GCM tag
BACKUP_ID_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{8}")
VOLKEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CHUNK_RE = re.compile(r"[0-9a-f]{64}")
REPO_ID_RE = re.compile(r"[0-9a-f]{64}")
MANIFEST_THREADS = 2  # manifests fetched at once (parsed one at a time: _over_manifests)


def manifest_key(volkey: str, bid: str) -> str:
    return f"manifests/{volkey}/{bid}"


def utcnow() -> str:
    return clock.stamp()


def new_backup_id() -> str:
    """The time to the second, then 8 hex characters: the millisecond in the first 3, so
    that backups made within one second sort in the order they were made (retention keeps
    the newest, an incremental takes the newest as its parent), and 5 random ones."""
    now = time.time()
    return f"{clock.compact(now)}-{int(now % 1 * 1000):03x}{secrets.token_hex(3)[:5]}"


def split_backup_url(url) -> tuple[str, str, str]:
    """``REPO#VOLKEY/BACKUP-ID`` -> (repo url, volkey, backup id)."""
    if not isinstance(url, str) or url.count("#") != 1:
        raise InvalidInput(f"invalid backup URL {url!r}: accepted is REPOSITORY#VOLUME/BACKUP-ID"
                           " as printed by `pyvol backup create` or `pyvol backup ls`")
    repo, frag = url.split("#")
    volkey, _, bid = urllib.parse.unquote(frag).partition("/")
    if not VOLKEY_RE.fullmatch(volkey) or not BACKUP_ID_RE.fullmatch(bid):
        raise InvalidInput(f"invalid backup URL {url!r}: the part after '#' must be "
                           "VOLUME/YYYYmmddTHHMMSSZ-xxxxxxxx")
    return repo, volkey, bid


def _plain(chunk: bytes | memoryview | Room) -> bytes | memoryview:
    """A chunk's plaintext, wherever it was read."""
    return chunk.plain if isinstance(chunk, Room) else chunk


class Repository:
    def __init__(self, target: Target, codec: Codec, config: dict):
        self.target = target
        self.codec = codec
        self.config = config
        self.chunk_size = int(config["chunk_size"])
        self.url = target.url
        self._known: set[str] | None = None
        self._uploading: set[str] = set()
        self._known_lock = threading.Lock()
        #: the manifest ``open_manifest`` read last, for an engine's job to take by reference
        self.opened: dict[tuple[str, str], dict] = {}
        #: the chunk lists of this process's backup jobs (``HeldChunks``)
        self.held: dict[str, list] = {}

    # opening
    @classmethod
    def open(cls, url: str, key: bytes | None, settings: dict[str, str] | None = None,
             create: bool = False) -> Repository:
        """Open the repository at ``url``; with ``create``, initialise it if it has no config.

        A new repository is encrypted exactly when a key is configured.
        """
        target = open_target(url, settings)
        try:
            config = _read_config(target)
        except NotFound:
            if not create:
                raise NotFound(f"no pyvol repository at {target.url} (no config object); "
                               f"`pyvol backup init {target.url}` or the first "
                               "`pyvol backup create` makes one") from None
            config = cls._init(target, key)
        return cls._checked(target, config, key)

    @classmethod
    def attach(cls, url: str, config: dict, key: bytes | None,
               settings: dict[str, str] | None = None) -> Repository:
        """The repository at ``url`` with the config its opener read (a job process,
        backup/engine.py, works on what the daemon checked, not on a second read); the
        config is checked again against the key all the same."""
        return cls._checked(open_target(url, settings), config, key)

    @classmethod
    def init(cls, url: str, key: bytes | None,
             settings: dict[str, str] | None = None) -> Repository:
        """Create a repository at ``url`` (``pyvol backup init``), a file:// target's
        directory too; refused where there is one already. Encrypted exactly when a key is
        configured."""
        target = open_target(url, settings, make=True)
        try:
            found = _read_config(target)
        except NotFound:
            config = cls._new_config(key)
            if target.put_if_absent("config", json.dumps(config, indent=1).encode()):
                return cls._checked(target, config, key)
            found = _read_config(target)  # another host initialised it at the same moment
        except CorruptObject:
            raise Conflict(f"{target.url} holds an object named config that is not a pyvol "
                           "repository's: refusing to initialise over it") from None
        ident = found.get("id") if isinstance(found, dict) else None
        raise Conflict(f"{target.url} is a pyvol repository already (id {str(ident)[:64]}); "
                       "nothing was changed: back up into it with `pyvol backup create VOLUME "
                       f"--dest {target.url}`")

    @staticmethod
    def _new_config(key: bytes | None) -> dict:
        config = {"format": FORMAT, "id": secrets.token_hex(32), "created": utcnow(),
                  "chunk_size": CHUNK_SIZE, "compression": "zstd", "encryption": None}
        if key is not None:
            codec = Codec(config["id"], key)
            config["encryption"] = {"cipher": "AES-256-GCM", "kdf": "HKDF-SHA256",
                                    "key_check": codec.key_check}
            config["encryption"]["config_mac"] = codec.config_mac(config)
        return config

    @classmethod
    def _init(cls, target: Target, key: bytes | None) -> dict:
        config = cls._new_config(key)
        if not target.put_if_absent("config", json.dumps(config, indent=1).encode()):
            return _read_config(target)  # another host initialised it first
        return config

    @classmethod
    def _checked(cls, target: Target, config, key: bytes | None) -> Repository:
        """The config, checked field by field: it is the one object nobody can encrypt, so
        whoever can write the repository can write it. With a key it must carry a MAC made
        with that key, so encryption cannot be switched off, nor the chunk size changed."""
        url = target.url
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else None
            raise PyvolError(f"{url}: repository format {found!r} is not one this pyvol "
                             f"reads (it reads format {FORMAT}); use a matching pyvol release")
        if not isinstance(config.get("id"), str) or not REPO_ID_RE.fullmatch(config["id"]):
            raise CorruptObject(f"{url}: the config object's id is not 64 hex characters")
        cs = config.get("chunk_size")
        if type(cs) is not int or not CHUNK_SIZES[0] <= cs <= CHUNK_SIZES[1]:
            raise CorruptObject(f"{url}: the config object's chunk_size {cs!r} is not a whole "
                                f"number from {CHUNK_SIZES[0]} to {CHUNK_SIZES[1]}")
        if config.get("compression") != "zstd":
            raise CorruptObject(f"{url}: the config object's compression "
                                f"{config.get('compression')!r} is not one this pyvol reads "
                                "(zstd)")
        enc = config.get("encryption")
        if enc is None:
            if key is not None:
                raise PyvolError(
                    f"{url}: the repository's config object says it is not encrypted, but "
                    "this daemon has a backup key (PYVOL_BACKUP_KEY_FILE), so it writes and "
                    "reads only repositories encrypted with that key. Either the repository "
                    "was made by a daemon without a key (use one without a key to read it), "
                    "or someone who can write the repository switched its encryption off; "
                    "refusing either way, so no backup goes out in plaintext")
            return cls(target, Codec(config["id"], None), config)
        if key is None:
            raise PyvolError(f"{url} is an encrypted repository and this daemon has no "
                             "backup key: set PYVOL_BACKUP_KEY_FILE to the repository's key file")
        if not isinstance(enc, dict) or enc.get("cipher") != "AES-256-GCM" or \
                enc.get("kdf") != "HKDF-SHA256":
            raise CorruptObject(f"{url}: the config object's encryption {enc!r} is not one this "
                                "pyvol reads (AES-256-GCM with HKDF-SHA256)")
        codec = Codec(config["id"], key)
        if codec.key_check != enc.get("key_check"):
            raise PyvolError(f"{url}: wrong key for this repository (the key file's check "
                             "value differs from the one the repository was created with)")
        mac = enc.get("config_mac")
        if not isinstance(mac, str) or not hmac.compare_digest(mac, codec.config_mac(config)):
            raise CorruptObject(f"{url}: the config object was altered: its MAC does not match "
                                "this repository's key (someone who can write the repository "
                                "changed it); refusing to read or write this repository")
        return cls(target, codec, config)

    @property
    def encrypted(self) -> bool:
        return self.codec.encrypted

    # chunks
    @staticmethod
    def chunk_key(name: str) -> str:
        return f"chunks/{name[:2]}/{name}"

    def known_chunks(self) -> set[str]:
        """Names of the chunks stored, listed once and then kept up to date by put_chunk."""
        with self._known_lock:
            if self._known is None:
                self._known = {k.rpartition("/")[2] for k, _ in self.target.list("chunks/")}
            return self._known

    def store_chunk(self, plaintext: bytes | memoryview | Room) -> tuple[str, int, bool]:
        """Name a chunk and upload it unless the repository has it or another thread is
        uploading it right now: (name, bytes stored, whether this call uploaded it). A
        chunk read into a ``Room`` may be sealed where it lies, and is overwritten."""
        name = self.codec.chunk_name(_plain(plaintext))
        known = self.known_chunks()
        with self._known_lock:
            fresh = name not in known and name not in self._uploading
            if fresh:
                self._uploading.add(name)
        if not fresh:
            return name, 0, False
        try:
            return name, self.put_chunk(name, plaintext), True
        finally:
            with self._known_lock:
                self._uploading.discard(name)

    def put_chunk(self, name: str, plaintext: bytes | memoryview | Room) -> int:
        """Seal and store a chunk; the number of bytes stored."""
        key = self.chunk_key(name)
        if isinstance(plaintext, Room) and not self.target.aligned_puts:
            blob = self.codec.seal_in_place(key, plaintext)
        else:
            blob = self.codec.seal(key, _plain(plaintext), reuse=True)
        self.target.put(key, blob)
        with self._known_lock:
            if self._known is not None:
                self._known.add(name)
        return len(blob)

    def read_object(self, key: str, cap: int, reuse: bool = False) -> bytes | memoryview:
        """An object's plaintext, of at most ``cap`` bytes: the stored bytes are refused
        before decoding when longer than any honest writer makes them. With ``reuse``, both
        may be in buffers of this thread's (``Target.get_view``, ``Codec.open``)."""
        limit = cap + SEAL_OVERHEAD
        if reuse:  # the body on a page boundary once decrypted in place
            blob = self.target.get_view(key, limit, lead=ALIGN - self.codec.body_at)
        else:
            blob = self.target.get(key, limit)
        if len(blob) > limit:
            raise CorruptObject(f"object {key} in {self.url} is larger than any object of its "
                                f"kind may be ({cap} bytes)")
        return self.codec.open(key, blob, limit=cap, reuse=reuse)

    def chunk_view(self, name: str) -> memoryview:
        """A chunk's plaintext, checked against its name, in this thread's buffers: valid
        until the thread reads its next chunk (a restore writes it out, a verify drops it)."""
        key = self.chunk_key(name)
        try:
            data = memoryview(self.read_object(key, self.chunk_size, reuse=True))
        except NotFound:
            raise CorruptObject(f"chunk {name} is missing from {self.url}") from None
        if self.codec.chunk_name(data) != name:
            raise CorruptObject(f"chunk {name} in {self.url} is corrupt: its content does not "
                                "hash to its name")
        return data

    def get_chunk(self, name: str) -> bytes:
        """A chunk's plaintext, checked against its name, the caller's to keep."""
        return self.chunk_view(name).tobytes()

    # manifests
    def volume_key(self, volume: str) -> str:
        return self.codec.volume_key(volume)

    def backup_url(self, volkey: str, bid: str) -> str:
        return f"{self.url}#{volkey}/{bid}"

    def put_manifest(self, manifest: dict) -> str:
        volkey = self.volume_key(manifest["volume"])
        key = manifest_key(volkey, manifest["id"])
        self.target.put(key, self.codec.seal(key, json.dumps(manifest).encode()))
        return self.backup_url(volkey, manifest["id"])

    def get_manifest(self, volkey: str, bid: str) -> dict:
        return self.parse_manifest(volkey, bid, self.fetch_manifest(volkey, bid))

    def fetch_manifest(self, volkey: str, bid: str) -> bytes:
        """A manifest's plaintext, not yet parsed (``parse_manifest``)."""
        try:
            return self.read_object(manifest_key(volkey, bid), MANIFEST_CAP)
        except NotFound:
            raise NotFound(f"no backup {volkey}/{bid} in {self.url}") from None

    def parse_manifest(self, volkey: str, bid: str, plain: bytes) -> dict:
        """The manifest ``plain`` is the plaintext of, checked field by field."""
        key = manifest_key(volkey, bid)
        try:
            manifest = json.loads(plain)
        except (ValueError, RecursionError):
            raise CorruptObject(f"manifest {key} in {self.url} is not JSON") from None
        if isinstance(manifest, dict) and manifest.get("format") != FORMAT:
            raise PyvolError(f"backup {volkey}/{bid} has format {manifest.get('format')!r}; "
                             f"this pyvol reads format {FORMAT}")
        check_manifest(manifest, f"manifest {key} in {self.url}", bid, self.chunk_size)
        manifest["url"] = self.backup_url(volkey, bid)
        return manifest

    def backup_ids(self, volume: str | None = None) -> list[tuple[str, str]]:
        """(volkey, backup id) of every complete backup, oldest first."""
        prefix = "manifests/" + (self.volume_key(volume) + "/" if volume else "")
        out = []
        for key, _ in self.target.list(prefix):
            parts = key.split("/")
            if len(parts) == 3 and VOLKEY_RE.fullmatch(parts[1]) and \
                    BACKUP_ID_RE.fullmatch(parts[2]):
                out.append((parts[1], parts[2]))
        return sorted(out, key=lambda p: (p[1], p[0]))

    def delete_manifest(self, volkey: str, bid: str) -> None:
        self.target.delete(manifest_key(volkey, bid))

    # locks
    @staticmethod
    def holder() -> dict:
        """Who a lock taken through this repository names as its holder: the process that
        has it open. The daemon's job process holds its worker's repository
        (backup/session.py), so a lock outlives neither: once that process is gone, whoever
        takes a lock next finds its holder dead and breaks it at once."""
        return holder_identity()


def _read_config(target: Target) -> dict:
    blob = target.get("config", CONFIG_CAP)
    if len(blob) > CONFIG_CAP:
        raise CorruptObject(f"{target.url}: the config object is larger than {CONFIG_CAP} "
                            "bytes; it is not a pyvol config")
    try:
        return json.loads(blob)
    except (ValueError, RecursionError):
        raise CorruptObject(f"{target.url}: the config object is not JSON") from None


def check_manifest(m, what: str, bid: str, chunk_size: int) -> None:
    """Every field a reader relies on, of the type and in the range it relies on: a manifest
    is untrusted input (in a plain repository anyone who can write the repository wrote it)."""
    def bad(why: str):
        raise CorruptObject(f"{what} is malformed: {why}")

    if not isinstance(m, dict):
        bad("not a JSON object")
    if m.get("id") != bid:
        bad(f"its id {m.get('id')!r} is not the backup id {bid} it is stored under")
    if m.get("kind") not in ("block", "tree"):
        bad(f"kind {m.get('kind')!r} is neither 'block' nor 'tree'")
    if not isinstance(m.get("volume"), str) or not VOLKEY_RE.fullmatch(m["volume"]):
        bad("its volume is not a volume name")
    src = m.get("source")
    if not isinstance(src, dict):
        bad("source is not an object")
    size = src.get("size")
    if type(size) is not int or not 0 < size < 1 << 63:
        bad(f"source.size {size!r} is not a positive whole number of bytes")
    if m["kind"] == "block":
        if src.get("fs", "ext4") not in ("ext4", "xfs"):
            bad(f"source.fs {src.get('fs')!r} is neither ext4 nor xfs")
        if m.get("chunk_size") != chunk_size:
            bad(f"chunk_size {m.get('chunk_size')!r} is not the repository's ({chunk_size})")
    elif type(src.get("stream", 0)) is not int or src.get("stream", 0) < 0:
        bad("source.stream is not a whole number of bytes")
    chunks = m.get("chunks")
    if not isinstance(chunks, list):
        bad("chunks is not a list")
    seen = set()
    for c in chunks:
        if not (isinstance(c, list) and len(c) == 2 and type(c[0]) is int and c[0] >= 0
                and isinstance(c[1], str) and CHUNK_RE.fullmatch(c[1])):
            bad(f"chunk entry {str(c)[:80]} is not [index, 64 hex characters]")
        if c[0] in seen:
            bad(f"chunk index {c[0]} is listed twice")
        seen.add(c[0])
        if m["kind"] == "block" and c[0] * chunk_size >= size:
            bad(f"chunk index {c[0]} lies past the volume's end ({size} bytes)")
    for key in ("snapshot", "snapshot_created", "instance", "backend"):
        if src.get(key) is not None and not isinstance(src[key], str):
            bad(f"source.{key} is not a string")
    for key in ("parent", "parent_snapshot", "schedule_of"):
        if m.get(key) is not None and not isinstance(m[key], str):
            bad(f"{key} is not a string")
    if not isinstance(m.get("stats", {}), dict):
        bad("stats is not an object")


def host_id() -> str:
    """This host's name, for people (manifests' and locks' ``host``). Names change and
    repeat, so nothing is decided on it alone: holder_identity() says precisely who holds a
    lock."""
    return socket.gethostname()


# Who holds a repository lock (docs/backup-repository.md, "Locks"): a lock names its holder
# precisely enough that a reader on the same host can tell, without waiting for the lease,
# that the holder is dead.

def _first_line(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.readline().strip() or None
    except OSError:
        return None


def boot_id() -> str | None:
    """The running kernel's random boot id: a new one at every boot, never shared by two
    hosts."""
    return _first_line("/proc/sys/kernel/random/boot_id")


def machine_id() -> str:
    """The host's identity: /etc/machine-id when it holds one (it survives renames and
    reboots), else the boot id and hostname (which at least tell this boot from others)."""
    mid = _first_line("/etc/machine-id")
    if mid and re.fullmatch(r"[0-9a-f]{32}", mid) and mid != "0" * 32:
        return mid
    return f"boot-{boot_id() or 'unknown'}-{socket.gethostname()}"


def pid_namespace() -> int | None:
    """The inode of this process's pid namespace: a pid means the same process only to a
    reader in the same namespace (a container sees other pids than its host)."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat);
    None if there is no such process, or only its zombie."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name, in parentheses, may hold anything
    try:
        if fields[0] in ("Z", "X"):
            return None
        return int(fields[19])  # fields[0] is field 3 (the state)
    except (IndexError, ValueError):
        return None


def holder_identity() -> dict:
    """The fields that name this process as a lock's holder."""
    pid = os.getpid()
    return {"host": host_id(), "pid": pid, "machine": machine_id(), "boot": boot_id(),
            "pidns": pid_namespace(), "start": process_start(pid)}


def holder_dead(doc: dict) -> str | None:
    """Why the holder a lock object names is certainly dead, or None when that cannot be
    known here (another host, another pid namespace, fields missing): such a lock goes only
    when its lease has expired.

    Dead: on this machine, the boot it ran in is over (same machine id and hostname, another
    boot id); or, in this very boot and pid namespace, its pid is gone or is another process
    (another start time).
    """
    me = holder_identity()
    if not isinstance(doc.get("machine"), str) or doc["machine"] != me["machine"]:
        return None
    boot = doc.get("boot")
    if not isinstance(boot, str) or not me["boot"]:
        return None
    if boot != me["boot"]:
        # a machine id copied into another host (a cloned image) must not make that host's
        # locks look dead: the hostname must match too (a renamed host's locks just expire)
        if doc.get("host") == me["host"]:
            return f"host {me['host']} has rebooted since (boot {boot} is over)"
        return None
    pid, start = doc.get("pid"), doc.get("start")
    if type(doc.get("pidns")) is not int or doc["pidns"] != me["pidns"] or \
            type(pid) is not int or pid <= 0 or type(start) is not int:
        return None
    now = process_start(pid)
    if now is None:
        return f"process {pid} no longer exists on this host"
    if now != start:
        return (f"pid {pid} on this host is another process now (started at tick {now}, "
                f"the holder at tick {start})")
    return None


def missing_chunks(repo: Repository, chunks) -> list[str]:
    """The chunks of a manifest's chunk list (``[[at, name], ...]``) that the repository
    does not hold now: listed afresh, not taken from the set ``known_chunks`` listed when a
    backup began."""
    want = {name for _, name in chunks}
    if want:
        for key, _ in repo.target.list("chunks/"):
            want.discard(key.rpartition("/")[2])
            if not want:
                break
    return sorted(want)


def _over_manifests(repo: Repository, ids, use):
    """``use((volkey, id), manifest, None)``, or ``use((volkey, id), None, error)`` for one
    that could not be read, for each of ``ids``: its results in the order of ``ids``.

    Fetched MANIFEST_THREADS at a time, for an object store's latency; parsed, checked and
    used one at a time (``use`` runs under that turn, so it must not wait on anything).
    json.loads holds the interpreter lock throughout, so two parses at once were no
    faster, and a parsed manifest is several times its JSON (a hostile repository's may
    each be MANIFEST_CAP): two of them at once held twice that memory."""
    from concurrent.futures import ThreadPoolExecutor

    parsing = threading.Lock()

    def one(item):
        manifest = error = None
        try:
            plain = repo.fetch_manifest(*item)
        except PyvolError as e:
            plain, error = None, _detached(e)
        with parsing:
            if error is None:
                try:
                    manifest = repo.parse_manifest(*item, plain)
                except PyvolError as e:
                    error = _detached(e)
            plain = None  # parsed or refused: the plaintext is not needed now
            return use(item, manifest, error)

    with ThreadPoolExecutor(MANIFEST_THREADS, thread_name_prefix="pyvol-manifests") as pool:
        yield from pool.map(one, [tuple(i) for i in ids])


def _detached(e: PyvolError) -> PyvolError:
    """``e`` without its traceback and the exception it was raised from: their frames hold
    the manifest's plaintext or its parse, which a caller that keeps the error (a listing
    reports each bad manifest) would keep too."""
    e.__context__ = e.__cause__ = None
    return e.with_traceback(None)


def manifest_head(manifest: dict) -> dict:
    """A manifest without its chunk map (which lists every chunk of its volume), and the
    number of chunks it lists."""
    out = {k: v for k, v in manifest.items() if k != "chunks"}
    out["chunk_count"] = len(manifest.get("chunks", []))
    return out


def manifest_heads(repo: Repository, ids) -> list[tuple[str, str, dict | None,
                                                        PyvolError | None]]:
    """(volkey, id, head, None), or (volkey, id, None, the error) for a manifest that could
    not be read, for each of ``ids``, in their order: the caller judges the errors.

    Listings and retention need only the heads. Read here, in the job process, a few at a
    time: a manifest of a 1 TiB volume lists 262,144 chunks (about 20 MB of JSON, several
    times that once parsed), and the worker that answers Docker reading a repository's
    worth of them, one call and one pickle at a time, held that memory and the interpreter
    lock that Docker's calls wait on."""
    def head(item, manifest, error):
        if error is not None:
            return *item, None, portable(error)
        return *item, manifest_head(manifest), None

    return list(_over_manifests(repo, ids, head))


def unreferenced_chunks(repo: Repository) -> dict:
    """What a gc may delete: every manifest read (any one that cannot be read fails it: what
    it lists is unknown), then the chunks listed, in that order (docs/backup-repository.md,
    "What garbage collection may delete"). The unreferenced chunks stay here, for
    ``delete_unreferenced``; the worker gets the counts."""
    ids = repo.backup_ids()
    live: set[str] = set()

    # merged as each is read (under _over_manifests' lock): results kept for their turn in
    # order could pile up behind a slow one
    def mark(_item, manifest, error):
        if error is not None:
            raise error
        live.update(n for _, n in manifest["chunks"])

    for _ in _over_manifests(repo, ids, mark):  # the first manifest that fails raises here
        pass
    kept, unreferenced = 0, []
    for key, size in repo.target.list("chunks/"):
        if key.rpartition("/")[2] in live:
            kept += 1
        else:
            unreferenced.append((key, size))
    repo.held["gc"] = unreferenced
    return {"backups": len(ids), "kept": kept, "unreferenced": len(unreferenced),
            "unreferenced_bytes": sum(size for _, size in unreferenced)}


def delete_unreferenced(repo: Repository, most: int, until: float) -> tuple[int, int]:
    """Delete up to ``most`` more of the chunks ``unreferenced_chunks`` found, each while
    ``clock.steady()`` is before ``until`` (the worker's lease, checked: ``checked_until``):
    how many, and their bytes (0, 0 once none is left). The worker checks its lease again,
    renewing it, between two calls."""
    left = repo.held.get("gc", [])
    n = size = 0
    while left and n < most and clock.steady() < until:
        key, length = left[-1]
        repo.target.delete(key)
        left.pop()
        crashpoint("gc.deleting")
        n += 1
        size += length
    return n, size


@dataclass(frozen=True)
class OpenedManifest:
    """A manifest the job process holds (``open_manifest``), named in a job's arguments in
    its place: the engine's job gets that very manifest, and its chunk map never crosses
    the pipe to the worker and back."""

    volkey: str
    bid: str


def open_manifest(repo: Repository, volkey: str, bid: str) -> dict:
    """Read a backup's manifest and keep it in this process, in place of the one opened
    before, for a job that restores, verifies or (as its parent) extends it
    (``OpenedManifest``); its head goes to the worker, which so checks the head (kind, size,
    filesystem, snapshot) of the very object the job then takes, read once."""
    manifest = repo.get_manifest(volkey, bid)
    repo.opened = {(volkey, bid): manifest}
    return manifest_head(manifest)


@dataclass
class BackupResult:
    """What a backup's engine function returns: the chunk list, ``[[at, chunk name], ...]``
    in order as a manifest lists them (a piece's index, or a tree's stream offset), and the
    counts. The job process answers the worker with a ``HeldChunks`` for the list."""

    chunks: list
    stats: dict


@dataclass(frozen=True)
class HeldChunks:
    """A backup job's chunk list, which the job process keeps (``Repository.held``): the
    worker's manifest names it in its place, and the calls that check and write that
    manifest take it there, so the list (262,144 entries for 1 TiB) never crosses to the
    worker."""

    key: str
    count: int

    def __len__(self) -> int:
        return self.count
