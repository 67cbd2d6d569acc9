"""How an object's bytes are sealed: compression, encryption, and the names of chunks.

See docs/backup-repository.md ("Keys and names", "Objects"). A ``Codec`` is built once per
repository from its config and the daemon's key (or none); it is safe to share across threads
because each thread gets its own zstd contexts.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading

from ..errors import PyvolError
from ..files import ALIGN, aligned_buffer

# zstandard and cryptography are imported where a Codec uses them, not here: every daemon
# worker imports this module (the backup service names its errors), and only the backup job
# process and repository reads need them.

RAW, ZSTD, SEALED = 0x00, 0x01, 0x02
ZSTD_LEVEL = 3
KEY_BYTES = 32
NONCE, TAG = 12, 16  # AES-GCM's nonce and tag lengths
PROBE = 16 << 10  # bytes of each of the three samples that decide whether to compress
PROBE_GAIN = 0.97  # compress when the samples shrink below this fraction


class CorruptObject(PyvolError):
    """An object's bytes do not decode, or do not hash to their name."""


def read_key_file(path: str) -> bytes:
    """The repository key: 32 raw bytes, or 64 hex characters, in a file only root reads."""
    try:
        raw = open(path, "rb").read()
    except OSError as e:
        raise PyvolError(f"cannot read the backup key file {path}: {e.strerror}") from None
    text = raw.strip()
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise PyvolError(f"backup key file {path} holds no key: accepted are 32 raw bytes or "
                         "64 hex characters (make one with `pyvol backup keygen FILE`)")
    return key


def canonical_config(config: dict) -> bytes:
    """The bytes the config MAC covers: the config without its MAC, keys sorted, no spaces."""
    body = {k: v for k, v in config.items()}
    if isinstance(body.get("encryption"), dict):
        body["encryption"] = {k: v for k, v in body["encryption"].items() if k != "config_mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _hkdf(key: bytes, salt: bytes, info: str) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(hashes.SHA256(), 32, salt, info.encode()).derive(key)


class Room:
    """Where a chunk is read so that it can be sealed where it lies (``Codec.seal_in_place``):
    its plaintext on a page boundary of this thread's buffer (an O_DIRECT read takes it
    there), the page before it free for the sealed object's head and room after it for the
    tag. A target that stores any view of memory (S3) then sends the object from there: one
    chunk-sized buffer a thread, where a buffer read into and one sealed into took two.
    Valid until the thread's next room."""

    def __init__(self, length: int):
        self.buffer = memoryview(aligned_buffer(ALIGN + length + TAG, "room"))
        self.plain = self.buffer[ALIGN:ALIGN + length]


class Codec:
    def __init__(self, repo_id: str, key: bytes | None):
        self.encrypted = key is not None
        self._local = threading.local()
        if key is not None:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            salt = bytes.fromhex(repo_id)
            self._object_key = _hkdf(key, salt, "pyvol/1 chunk encryption")
            self._aead = AESGCM(self._object_key)
            self._id_key = _hkdf(key, salt, "pyvol/1 chunk id")
            self._config_key = _hkdf(key, salt, "pyvol/1 config mac")
            self.key_check = hmac.new(self._id_key, b"pyvol/1 key check",
                                      "sha256").digest()[:16].hex()
        else:
            self._aead = None
            self._object_key = None
            self._id_key = None
            self._config_key = None
            self.key_check = None

    def config_mac(self, config: dict) -> str:
        """What binds the repository's config to the key: a writer of the repository without
        the key cannot switch encryption off or change how chunks are cut."""
        assert self._config_key is not None
        return hmac.new(self._config_key, canonical_config(config), "sha256").hexdigest()

    def _zstd(self):
        local = self._local
        if not hasattr(local, "c"):
            import zstandard

            local.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
            local.probe = zstandard.ZstdCompressor(level=1)
            local.d = zstandard.ZstdDecompressor()
        return local

    def chunk_name(self, plaintext) -> str:
        if self._id_key is None:
            return hashlib.sha256(plaintext).hexdigest()
        return hmac.new(self._id_key, plaintext, "sha256").hexdigest()

    def volume_key(self, volume: str) -> str:
        if self._id_key is None:
            return volume
        return hmac.new(self._id_key, volume.encode(), "sha256").hexdigest()[:32]

    @property
    def body_at(self) -> int:
        """Where an object's body starts in its stored bytes: after the type byte, and when
        encrypted after the marker, the nonce and the type byte sealed with it."""
        return 1 + NONCE + 1 if self._aead is not None else 1

    def seal(self, key: str, plaintext, reuse: bool = False) -> bytes | bytearray | memoryview:
        """Compress when it saves at least 1/16, then encrypt with the object key as AAD.

        The cipher reads the plaintext (or its compressed form) where it is and writes
        straight into the stored object. With ``reuse`` (a chunk), that object is a buffer
        of this thread's, valid until its next sealing: a fresh 4 MiB allocation for every
        chunk, page-faulted in, costs more than the cipher.
        """
        view = memoryview(plaintext).cast("B")
        kind, body = self._pack(view)
        out = _buffer(self.body_at + len(body) + self._tag, "sealed", reuse)
        self._seal_into(key, kind, body, out)
        return out

    def seal_in_place(self, key: str, room: Room) -> memoryview:
        """As ``seal``, but the object is built where the room's plaintext lies, which it
        overwrites: its head in the page before, its body over the plaintext (encrypted in
        place, as AES-GCM allows, or its compressed form written there), its tag after.
        Valid until the room's buffer is used again."""
        view = room.plain
        kind, body = self._pack(view)
        start = ALIGN - self.body_at
        out = room.buffer[start:ALIGN + len(body) + self._tag]
        self._seal_into(key, kind, body, out, in_place=body is view)
        return out

    @property
    def _tag(self) -> int:
        return TAG if self._aead is not None else 0

    def _pack(self, view: memoryview) -> tuple[int, memoryview | bytes]:
        """The object's type and body: the plaintext itself, or its zstd frame where that is
        at least 1/16 smaller. Data that a sample shows to be incompressible (already
        compressed or encrypted files, random pages) is not compressed at all: zstd would
        spend as long on it as the encryption does, to save nothing."""
        if _worth_compressing(self._zstd().probe, view):
            packed = self._zstd().c.compress(view)
            if len(packed) <= len(view) - len(view) // 16:
                return ZSTD, packed
        return RAW, view

    def _seal_into(self, key: str, kind: int, body, out: memoryview | bytearray,
                   in_place: bool = False) -> None:
        """Write the object of ``kind`` and ``body`` into ``out``, exactly its length;
        ``in_place``: the body already lies where the object's body goes."""
        at = self.body_at
        if self._aead is None:
            out[0] = kind
            if not in_place:
                out[at:] = body
            return
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        nonce = os.urandom(NONCE)
        out[0] = SEALED
        out[1:1 + NONCE] = nonce
        # AES-GCM over the type byte and the body as one message, written in place: the
        # same bytes as encrypting their concatenation, without building it. update_into
        # asks for room for one block more than it writes, which the tag's place gives.
        enc = Cipher(algorithms.AES(self._object_key), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(key.encode())
        stream = memoryview(out)
        written = enc.update_into(bytes([kind]), stream[at - 1:at + TAG])
        written += enc.update_into(body, stream[at:])
        enc.finalize()
        if written != 1 + len(body):
            raise RuntimeError("AES-GCM wrote a different length than it was given")
        stream[-TAG:] = enc.tag

    def open(self, key: str, blob, limit: int, reuse: bool = False) -> bytes | memoryview:
        """The plaintext of the object at ``key``, refusing more than ``limit`` bytes of it.

        The limit is checked before anything is allocated: a zstd frame that declares its
        content size is refused on that declaration, and one that does not is cut off at
        the limit, so a small hostile blob cannot claim gigabytes of memory. With ``reuse``
        (a chunk) the plaintext may be a view of this thread's buffer, valid until its next
        ``open``.
        """
        if not blob:
            raise CorruptObject(f"object {key} is empty")
        blob = memoryview(blob)
        kind = blob[0]
        if kind == SEALED:
            if self._aead is None:
                raise PyvolError(f"object {key} is encrypted and no backup key is configured")
            blob = self._decrypt(key, blob, reuse)
            if not blob:
                raise CorruptObject(f"object {key} holds no type byte inside its encryption")
            kind = blob[0]
        elif self._aead is not None:
            raise CorruptObject(f"object {key} is not encrypted in an encrypted repository")
        if kind == RAW:
            if len(blob) - 1 > limit:
                raise CorruptObject(f"object {key} holds {len(blob) - 1} bytes, more than the "
                                    f"{limit} an object of its kind may hold")
            return blob[1:] if reuse else blob[1:].tobytes()
        if kind == ZSTD:
            return self._decompress(key, blob[1:], limit, reuse)
        raise CorruptObject(f"object {key} has unknown type byte {kind:#04x}")

    def _decrypt(self, key: str, blob: memoryview, reuse: bool) -> memoryview:
        from cryptography.exceptions import InvalidTag

        nonce, sealed = blob[1:1 + NONCE], blob[1 + NONCE:]
        try:
            if not reuse or len(sealed) < TAG or not hasattr(self._aead, "decrypt_into"):
                return memoryview(self._aead.decrypt(nonce, sealed, key.encode()))
            n = len(sealed) - TAG
            if not sealed.readonly:
                # in place (AES-GCM's output may be its input): a restore's thread holds one
                # 4 MiB buffer less. The body stays where the reader put it, on a page
                # boundary for O_DIRECT (Repository.read_object)
                plain = sealed[:n]
            else:
                # the type byte just before a page boundary: a raw chunk's bytes start on
                # one, and a restore hands them to O_DIRECT without another copy
                at = ALIGN - 1
                plain = memoryview(aligned_buffer(ALIGN + n, "opening"))[at:at + n]
            self._aead.decrypt_into(nonce, sealed, key.encode(), plain)
            return plain
        except InvalidTag:
            raise CorruptObject(f"object {key} fails authentication: it is corrupt, was "
                                "moved, or the key is wrong") from None

    def _decompress(self, key: str, frame, limit: int, reuse: bool) -> bytes | memoryview:
        import zstandard

        try:
            declared = zstandard.frame_content_size(frame)
        except zstandard.ZstdError as e:
            raise CorruptObject(f"object {key} does not decompress: {e}") from None
        if declared > limit:
            raise CorruptObject(f"object {key} declares {declared} bytes of content, more than "
                                f"the {limit} an object of its kind may hold")
        try:
            if reuse and declared >= 0:
                # into this thread's page-aligned buffer: a restore writes it as it is. A
                # stream reader stops quietly where a cut-off frame ends: the declared size
                # is what tells the two apart
                room = memoryview(aligned_buffer(declared + 1, "unpacking"))[:declared + 1]
                out = _unpack_into(self._zstd().d, frame, room)
                if len(out) != declared:
                    held = "more than" if len(out) > declared else f"only {len(out)} of"
                    raise CorruptObject(f"object {key} does not decompress: it holds {held} "
                                        f"the {declared} bytes its frame declares")
            else:  # without a declared size, python-zstandard stops at max_output_size
                out = self._zstd().d.decompress(frame, max_output_size=limit)
        except zstandard.ZstdError as e:
            raise CorruptObject(f"object {key} does not decompress within {limit} bytes: "
                                f"{e}") from None
        if len(out) > limit:
            raise CorruptObject(f"object {key} decompresses past the {limit} bytes an object "
                                "of its kind may hold")
        return out


def _unpack_into(decompressor, frame, into: memoryview) -> memoryview:
    """``frame`` decompressed into ``into``, stopping where ``into`` is full. Unlike
    ``decompress``, the reader goes on past the first frame, so a chunk with anything after
    its frame comes out longer than declared, and is refused (pyvol never writes one)."""
    n = 0
    with decompressor.stream_reader(frame) as reader:
        while n < len(into):
            got = reader.readinto(into[n:])
            if not got:
                break
            n += got
    return into[:n]


def _buffer(size: int, use: str, reuse: bool) -> bytearray | memoryview:
    """``size`` bytes to build an object in: this thread's buffer for ``use`` when the caller
    drops the object before the thread's next one, else a new bytearray."""
    if reuse:
        return memoryview(aligned_buffer(size, use))[:size]
    return bytearray(size)


def _worth_compressing(probe, view: memoryview) -> bool:
    """Whether three small samples (start, middle, end) compress at all at zstd's fastest
    level; small data is always tried, it costs nothing."""
    n = len(view)
    if n <= 4 * PROBE:
        return True
    sample = b"".join(view[at:at + PROBE] for at in (0, n // 2, n - PROBE))
    return len(probe.compress(sample)) < PROBE_GAIN * len(sample)
