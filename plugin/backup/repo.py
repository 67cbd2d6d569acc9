"""A backup repository: config, chunks, manifests, on one target (docs/backup-repository.md).

The repository is the only code that knows the key layout; the block engine asks it for
"store this chunk" and "read that manifest" and never builds a key itself.
"""

from __future__ import annotations

import json
import re
import secrets
import socket
import threading
import time
import urllib.parse
from datetime import datetime, timezone

from ..errors import InvalidInput, NotFound, PyvolError
from .blobs import Codec, CorruptObject
from .targets import Target, open_target

FORMAT = 1
CHUNK_SIZE = 4 << 20
BACKUP_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")
VOLKEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
CHUNK_RE = re.compile(r"^[0-9a-f]{64}$")


def utcnow() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_backup_id() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)


def split_backup_url(url) -> tuple[str, str, str]:
    """``REPO#VOLKEY/BACKUP-ID`` -> (repo url, volkey, backup id)."""
    if not isinstance(url, str) or url.count("#") != 1:
        raise InvalidInput(f"invalid backup URL {url!r}: accepted is REPOSITORY#VOLUME/BACKUP-ID"
                           " as printed by `pyvol backup create` or `pyvol backup ls`")
    repo, frag = url.split("#")
    volkey, _, bid = urllib.parse.unquote(frag).partition("/")
    if not VOLKEY_RE.match(volkey) or not BACKUP_ID_RE.match(bid):
        raise InvalidInput(f"invalid backup URL {url!r}: the part after '#' must be "
                           "VOLUME/YYYYmmddTHHMMSSZ-xxxxxxxx")
    return repo, volkey, bid


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

    # opening
    @classmethod
    def open(cls, url: str, key: bytes | None, settings: dict[str, str] | None = None,
             create: bool = False) -> Repository:
        """Open the repository at ``url``; with ``create``, initialise it if it has no config.

        A new repository is encrypted exactly when a key is configured.
        """
        target = open_target(url, settings)
        try:
            config = json.loads(target.get("config"))
        except NotFound:
            if not create:
                raise NotFound(f"no pyvol repository at {target.url} (no config object); "
                               "`pyvol backup create` makes one") from None
            config = cls._init(target, key)
        except ValueError:
            raise CorruptObject(f"{target.url}: the config object is not JSON") from None
        return cls._checked(target, config, key)

    @staticmethod
    def _init(target: Target, key: bytes | None) -> dict:
        config = {"format": FORMAT, "id": secrets.token_hex(32), "created": utcnow(),
                  "chunk_size": CHUNK_SIZE, "compression": "zstd", "encryption": None}
        if key is not None:
            config["encryption"] = {"cipher": "AES-256-GCM", "kdf": "HKDF-SHA256",
                                    "key_check": Codec(config["id"], key).key_check}
        if not target.put_if_absent("config", json.dumps(config, indent=1).encode()):
            return json.loads(target.get("config"))  # another host initialised it first
        return config

    @classmethod
    def _checked(cls, target: Target, config: dict, key: bytes | None) -> Repository:
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            found = config.get("format") if isinstance(config, dict) else None
            raise PyvolError(f"{target.url}: repository format {found!r} is not one this pyvol "
                             f"reads (it reads format {FORMAT}); use a matching pyvol release")
        enc = config.get("encryption")
        if enc is None:
            return cls(target, Codec(config["id"], None), config)
        if key is None:
            raise PyvolError(f"{target.url} is an encrypted repository and this daemon has no "
                             "backup key: set PYVOL_BACKUP_KEY_FILE to the repository's key file")
        codec = Codec(config["id"], key)
        if codec.key_check != enc.get("key_check"):
            raise PyvolError(f"{target.url}: wrong key for this repository (the key file's check "
                             "value differs from the one the repository was created with)")
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

    def store_chunk(self, plaintext) -> tuple[str, int, bool]:
        """Name a chunk and upload it unless the repository has it or another thread is
        uploading it right now: (name, bytes stored, whether this call uploaded it)."""
        name = self.codec.chunk_name(plaintext)
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

    def put_chunk(self, name: str, plaintext) -> int:
        """Seal and store a chunk; the number of bytes stored."""
        key = self.chunk_key(name)
        blob = self.codec.seal(key, plaintext)
        self.target.put(key, blob)
        with self._known_lock:
            if self._known is not None:
                self._known.add(name)
        return len(blob)

    def get_chunk(self, name: str) -> bytes:
        """A chunk's plaintext, checked against its name."""
        key = self.chunk_key(name)
        try:
            blob = self.target.get(key)
        except NotFound:
            raise CorruptObject(f"chunk {name} is missing from {self.url}") from None
        data = self.codec.open(key, blob, limit=self.chunk_size)
        if self.codec.chunk_name(data) != name:
            raise CorruptObject(f"chunk {name} in {self.url} is corrupt: its content does not "
                                "hash to its name")
        return data

    # manifests
    def volume_key(self, volume: str) -> str:
        return self.codec.volume_key(volume)

    def backup_url(self, volkey: str, bid: str) -> str:
        return f"{self.url}#{volkey}/{bid}"

    def put_manifest(self, manifest: dict) -> str:
        volkey = self.volume_key(manifest["volume"])
        key = f"manifests/{volkey}/{manifest['id']}"
        self.target.put(key, self.codec.seal(key, json.dumps(manifest).encode()))
        return self.backup_url(volkey, manifest["id"])

    def get_manifest(self, volkey: str, bid: str) -> dict:
        key = f"manifests/{volkey}/{bid}"
        try:
            blob = self.target.get(key)
        except NotFound:
            raise NotFound(f"no backup {volkey}/{bid} in {self.url}") from None
        try:
            manifest = json.loads(self.codec.open(key, blob))
        except ValueError:
            raise CorruptObject(f"manifest {key} in {self.url} is not JSON") from None
        if manifest.get("format") != FORMAT:
            raise PyvolError(f"backup {volkey}/{bid} has format {manifest.get('format')!r}; "
                             f"this pyvol reads format {FORMAT}")
        manifest["url"] = self.backup_url(volkey, bid)
        return manifest

    def backup_ids(self, volume: str | None = None) -> list[tuple[str, str]]:
        """(volkey, backup id) of every complete backup, oldest first."""
        prefix = "manifests/" + (self.volume_key(volume) + "/" if volume else "")
        out = []
        for key, _ in self.target.list(prefix):
            parts = key.split("/")
            if len(parts) == 3 and BACKUP_ID_RE.match(parts[2]):
                out.append((parts[1], parts[2]))
        return sorted(out, key=lambda p: (p[1], p[0]))

    def delete_manifest(self, volkey: str, bid: str) -> None:
        self.target.delete(f"manifests/{volkey}/{bid}")


def host_id() -> str:
    return socket.gethostname()
