"""The age v1 file format (https://age-encryption.org/v1), with X25519 recipients, streamed both ways.

An age file is a text header, then the payload. The header names the format, holds one stanza per
recipient (``-> X25519 <ephemeral share>`` and the 16-byte file key wrapped with ChaCha20-Poly1305
under a key derived by HKDF-SHA256 from the X25519 shared secret) and ends with a MAC of itself
(``--- <HMAC-SHA256>``, keyed by HKDF of the file key). The payload is a 16-byte nonce and the
plaintext in 64 KiB chunks, each sealed with ChaCha20-Poly1305 under HKDF(file key, nonce,
"payload"), its nonce an 11-byte big-endian counter and a byte that is 1 on the last chunk only:
truncation, reordering, appended bytes and a missing last chunk all fail to authenticate.

Written from the specification with ``cryptography``'s primitives; files open with the ``age`` CLI
(``age -d -i key.txt``) and files from it open here. Memory stays at about one chunk either way.
Every failure to read is an AgeError (a PermanentError) naming the file; a secret key never
appears in a message or a repr. Keys (bech32) and stanzas are in ``vq_tasks.crypto.age_keys``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from vq_tasks.crypto.age_keys import (
    LINE_COLUMNS,
    Stanza,
    X25519Identity,
    X25519Recipient,
    b64_decode,
    b64_encode,
    bech32_decode,
    bech32_encode,
    hkdf,
    parse_identities,
)
from vq_tasks.errors import PermanentError
from vq_tasks.streams.stages import Readable, Stage, Writer

__all__ = [
    "AgeEncryptStage",
    "AgeError",
    "AgeReader",
    "NoIdentityMatch",
    "Stanza",
    "X25519Identity",
    "X25519Recipient",
    "bech32_decode",
    "bech32_encode",
    "parse_identities",
]

VERSION_LINE = b"age-encryption.org/v1"
CHUNK = 64 * 1024
TAG = 16
SEALED_CHUNK = CHUNK + TAG
FILE_KEY_SIZE = 16
NONCE_SIZE = 16
MAX_LINE = 4096  # no line of a header we can open is near this long
MAX_HEADER = 1 << 20
LAST_COUNTER = (1 << 88) - 1
ARGUMENT = re.compile(rb"[\x21-\x7e]+")


class AgeError(PermanentError):
    """An age file that cannot be opened or read: not age, damaged, tampered with, or truncated."""


class NoIdentityMatch(AgeError):
    """None of the identities given opens the file (it was encrypted to other keys)."""


# --- writing ---


def _header(stanzas: Sequence[Stanza], file_key: bytes) -> bytes:
    without_mac = VERSION_LINE + b"\n" + b"".join(s.encode() for s in stanzas) + b"---"
    mac = hmac.new(hkdf(file_key, b"", b"header"), without_mac, hashlib.sha256).digest()
    return without_mac + b" " + b64_encode(mac) + b"\n"


def _chunk_nonce(counter: int, last: bool) -> bytes:
    if counter >= LAST_COUNTER:
        raise AgeError("the payload is too long for age's chunk counter")
    return counter.to_bytes(11, "big") + (b"\x01" if last else b"\x00")


class AgeEncryptStage(Stage):
    """Encrypt what is written to it for ``recipients`` and pass the age file on to ``downstream``.

    The header and the payload nonce go out with the first write (or at close); a full chunk is
    held until the next byte arrives, since only then is it known not to be the last. ``close``
    seals the last chunk (empty only when nothing was written). At most one chunk is buffered."""

    def __init__(self, downstream: Writer, recipients: Sequence[X25519Recipient]):
        super().__init__(downstream)
        if not recipients:
            raise ValueError("age encryption needs at least one recipient")
        self._recipients = list(recipients)
        self._aead: ChaCha20Poly1305 | None = None
        self._buffer = bytearray(CHUNK)
        self._filled = 0
        self._counter = 0
        self._closed = False
        self.plain_size = 0

    def _start(self) -> ChaCha20Poly1305:
        file_key = os.urandom(FILE_KEY_SIZE)
        nonce = os.urandom(NONCE_SIZE)
        self.downstream.write(_header([r.wrap(file_key) for r in self._recipients], file_key) + nonce)
        self._aead = ChaCha20Poly1305(hkdf(file_key, nonce, b"payload"))
        return self._aead

    def write(self, data: bytes) -> None:
        if self._closed:
            raise ValueError("write to a closed age stage")
        view = memoryview(data).cast("B")
        self.plain_size += len(view)
        while len(view):
            if self._filled == CHUNK:
                self._seal(last=False)
            take = min(CHUNK - self._filled, len(view))
            self._buffer[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]

    def _seal(self, last: bool) -> None:
        aead = self._aead or self._start()
        nonce = _chunk_nonce(self._counter, last)
        sealed = aead.encrypt(nonce, bytes(self._buffer[: self._filled]), None)
        self._counter += 1
        self._filled = 0
        self.downstream.write(sealed)

    def close(self) -> None:
        """Seal the last chunk, then close the stages downstream."""
        if not self._closed:
            self._seal(last=True)
            self._closed = True
        super().close()

    def abort(self) -> None:
        """Drop what is buffered without writing it (after an error)."""
        self._closed = True
        self._filled = 0


# --- reading ---


class AgeReader:
    """Read the plaintext of the age file ``source`` with the first of ``identities`` that opens
    it. The header is read and checked at once: raise NoIdentityMatch if no identity opens it,
    AgeError if it is not age or damaged. Each chunk is authenticated before any of it is
    returned; ``read`` raises AgeError for a chunk that does not (changed, truncated, appended
    to, or without its last chunk). ``name`` names the file in messages."""

    def __init__(self, source: Readable, identities: Sequence[X25519Identity], name: str = "the file"):
        self._source = source
        self.name = name
        self._pending = bytearray()
        self._eof = False
        stanzas, without_mac, mac = self._read_header()
        file_key = self._file_key(stanzas, identities)
        expected = hmac.new(hkdf(file_key, b"", b"header"), without_mac, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, mac):
            raise AgeError(f"{name}: the age header's MAC does not match: the header was changed or damaged")
        self._fill(NONCE_SIZE)
        if len(self._pending) < NONCE_SIZE:
            raise AgeError(f"{name}: the age file ends before its payload: truncated")
        nonce = bytes(self._pending[:NONCE_SIZE])
        del self._pending[:NONCE_SIZE]
        self._aead = ChaCha20Poly1305(hkdf(file_key, nonce, b"payload"))
        self._counter = 0
        self._plain = b""
        self._offset = 0
        self._done = False

    # header

    def _fail(self, reason: str) -> AgeError:
        return AgeError(f"{self.name}: {reason}")

    def _fill(self, size: int) -> None:
        """Read from the source until ``size`` bytes are pending or it ends."""
        while len(self._pending) < size and not self._eof:
            data = self._source.read(size - len(self._pending))
            if not data:
                self._eof = True
            self._pending += data

    def _line(self, header: bytearray) -> bytes:
        """Return the next header line without its newline; append it, newline included, to
        ``header``."""
        start = 0
        while (end := self._pending.find(b"\n", start)) < 0:
            if len(self._pending) > MAX_LINE or self._eof:
                raise self._fail("not an age file, or its header is damaged (a line without its end)")
            start = len(self._pending)
            self._fill(len(self._pending) + 512)
        line = bytes(self._pending[:end])
        del self._pending[: end + 1]
        header += line + b"\n"
        if len(header) > MAX_HEADER:
            raise self._fail("the age header is too long")
        return line

    def _read_header(self) -> tuple[list[Stanza], bytes, bytes]:
        header = bytearray()
        first = self._line(header)
        if first != VERSION_LINE:
            armored = first.startswith(b"-----BEGIN AGE ENCRYPTED FILE-----")
            raise self._fail("armored age files are not read here" if armored else "not an age v1 file")
        stanzas = []
        line = self._line(header)
        while line.startswith(b"-> "):
            args = line[3:].split(b" ")
            if not all(ARGUMENT.fullmatch(arg) for arg in args):
                raise self._fail("a stanza of the age header is malformed")
            stanzas.append(Stanza(args[0].decode(), tuple(a.decode() for a in args[1:]), self._body(header)))
            line = self._line(header)
        if not line.startswith(b"--- ") or not stanzas:
            raise self._fail("the age header is malformed (no stanza, or no MAC line)")
        mac = self._decoded(line[4:])
        if len(mac) != 32:
            raise self._fail("the age header's MAC is malformed")
        return stanzas, bytes(header[: -len(line) - 1]) + b"---", mac

    def _body(self, header: bytearray) -> bytes:
        """Read a stanza's body lines: full ones of 64 columns, then a shorter (maybe empty) one."""
        encoded = b""
        while True:
            line = self._line(header)
            if len(line) > LINE_COLUMNS:
                raise self._fail("a stanza body line of the age header is longer than 64 columns")
            encoded += line
            if len(line) < LINE_COLUMNS:
                return self._decoded(encoded)

    def _decoded(self, text: bytes) -> bytes:
        try:
            return b64_decode(text)
        except ValueError as exc:
            raise self._fail(str(exc)) from None

    def _file_key(self, stanzas: list[Stanza], identities: Sequence[X25519Identity]) -> bytes:
        """Return the file key the first of ``identities`` unwraps. A passphrase (scrypt) stanza must
        be the header's only one (age's spec: whoever opens it can trust that only the passphrase's
        holders made it), so a header mixing one with others is malformed, whoever the identities."""
        if any(s.type == "scrypt" for s in stanzas):
            if len(stanzas) > 1:
                raise self._fail(
                    "the age header mixes a passphrase (scrypt) stanza with others: age forbids it"
                )
            raise NoIdentityMatch(f"{self.name}: it is encrypted with a passphrase, not to X25519 identities")
        x25519 = [s for s in stanzas if s.type == "X25519"]
        for stanza in x25519:
            if len(stanza.args) != 1 or len(self._decoded(stanza.args[0].encode())) != 32:
                raise self._fail("an X25519 stanza of the age header is malformed")
            if len(stanza.body) != FILE_KEY_SIZE + TAG:
                raise self._fail("an X25519 stanza of the age header is malformed")
        for identity in identities:
            for stanza in x25519:
                try:
                    file_key = identity.unwrap(stanza)
                except ValueError as exc:
                    raise self._fail(str(exc)) from None
                if file_key is not None:
                    return file_key
        raise NoIdentityMatch(f"{self.name}: none of the identities given opens it")

    # payload

    def _next_chunk(self) -> bool:
        """Authenticate and decrypt the next chunk; return False after the last one."""
        if self._done:
            return False
        self._fill(SEALED_CHUNK + 1)  # one byte more: a chunk is the last only if nothing follows
        last = len(self._pending) <= SEALED_CHUNK
        size = len(self._pending) if last else SEALED_CHUNK
        number = self._counter + 1
        if size < TAG:
            where = "before its last chunk" if self._counter else "before its first chunk"
            raise self._fail(f"the age payload ends {where} (chunk {number}): truncated")
        try:
            plain = self._aead.decrypt(_chunk_nonce(self._counter, last), bytes(self._pending[:size]), None)
        except InvalidTag:
            raise self._fail(self._tamper_reason(number, last)) from None
        if last and not plain and self._counter:
            raise self._fail(f"the age payload's last chunk (chunk {number}) is empty, which age forbids")
        del self._pending[:size]
        self._counter += 1
        self._plain, self._offset, self._done = plain, 0, last
        return True

    def _tamper_reason(self, number: int, last: bool) -> str:
        if last:
            return (
                f"chunk {number} of the age payload does not authenticate as its last chunk: the file "
                "is truncated, has bytes appended, or was changed"
            )
        return f"chunk {number} of the age payload does not authenticate: the file was changed or damaged"

    def read(self, size: int = -1) -> bytes:
        """Return up to ``size`` bytes of plaintext (all the rest if negative); b"" at the end."""
        parts = []
        wanted = None if size is None or size < 0 else size
        got = 0
        while wanted is None or got < wanted:
            available = len(self._plain) - self._offset
            if not available:
                if not self._next_chunk():
                    break
                continue
            take = available if wanted is None else min(available, wanted - got)
            parts.append(self._plain[self._offset : self._offset + take])
            self._offset += take
            got += take
        return b"".join(parts)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True
