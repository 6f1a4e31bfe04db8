"""The keys of the age format (https://age-encryption.org/v1): X25519 recipients (``age1...``) and
identities (``AGE-SECRET-KEY-1...``) in bech32, the stanzas of a header, and how an X25519
stanza wraps and unwraps a file key. Used by ``vq_tasks.crypto.age``; every failure is a ValueError that
never quotes a key.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

X25519_INFO = b"age-encryption.org/v1/X25519"
RECIPIENT_HRP = "age"
IDENTITY_HRP = "age-secret-key-"
LINE_COLUMNS = 64
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
BASE64 = re.compile(rb"[A-Za-z0-9+/]*")


# --- bech32 (BIP 173), as age writes recipients (age1...) and identities (AGE-SECRET-KEY-1...) ---

BECH32_CHARSET = "qpzry9x8gf2tvdw0s3jn54khce6mua7l"
BECH32_GENERATOR = (0x3B6A57B2, 0x26508E6D, 0x1EA119FA, 0x3D4233DD, 0x2A1462B3)


def _polymod(values: Iterable[int]) -> int:
    check = 1
    for value in values:
        top = check >> 25
        check = (check & 0x1FFFFFF) << 5 ^ value
        for bit, generator in enumerate(BECH32_GENERATOR):
            if top >> bit & 1:
                check ^= generator
    return check


def _hrp_expand(hrp: str) -> list[int]:
    return [ord(c) >> 5 for c in hrp] + [0] + [ord(c) & 31 for c in hrp]


def _regroup(data: Iterable[int], source_bits: int, target_bits: int, pad: bool) -> list[int]:
    """Regroup a sequence of ``source_bits``-bit values into ``target_bits``-bit values. Raise
    ValueError when, without ``pad``, the leftover bits are too many or not zero."""
    accumulator, bits, out = 0, 0, []
    mask = (1 << target_bits) - 1
    for value in data:
        accumulator = accumulator << source_bits | value
        bits += source_bits
        while bits >= target_bits:
            bits -= target_bits
            out.append(accumulator >> bits & mask)
    if pad and bits:
        out.append(accumulator << (target_bits - bits) & mask)
    elif not pad and (bits >= source_bits or accumulator << (target_bits - bits) & mask):
        raise ValueError("bech32: leftover bits")
    return out


def bech32_encode(hrp: str, data: bytes) -> str:
    """Return ``data`` in bech32 with the human-readable part ``hrp`` (lower case)."""
    words = _regroup(data, 8, 5, pad=True)
    polymod = _polymod([*_hrp_expand(hrp), *words, 0, 0, 0, 0, 0, 0]) ^ 1
    checksum = [polymod >> 5 * (5 - i) & 31 for i in range(6)]
    return hrp + "1" + "".join(BECH32_CHARSET[w] for w in [*words, *checksum])


def bech32_decode(text: str) -> tuple[str, bytes]:
    """Return the human-readable part (lower case) and the data of a bech32 string. Raise
    ValueError (without quoting the string) if it is not valid bech32."""
    if text.lower() != text and text.upper() != text:
        raise ValueError("bech32: mixed case")
    text = text.lower()
    separator = text.rfind("1")
    if separator < 1 or len(text) - separator - 1 < 6 or not text.isascii():
        raise ValueError("bech32: no separator, or too short")
    hrp, rest = text[:separator], text[separator + 1 :]
    if any(not 33 <= ord(c) <= 126 for c in hrp) or any(c not in BECH32_CHARSET for c in rest):
        raise ValueError("bech32: invalid character")
    words = [BECH32_CHARSET.index(c) for c in rest]
    if _polymod([*_hrp_expand(hrp), *words]) != 1:
        raise ValueError("bech32: bad checksum")
    return hrp, bytes(_regroup(words[:-6], 5, 8, pad=False))


# --- keys ---


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=32, salt=salt or None, info=info).derive(ikm)


@dataclass(frozen=True)
class Stanza:
    """One recipient stanza of a header: its type, its arguments and its body."""

    type: str
    args: tuple[str, ...]
    body: bytes

    def encode(self) -> bytes:
        """Return the stanza as it appears in a header: its line, then the body in base64 lines
        of 64 columns, the last one shorter (empty when the base64 fills whole lines)."""
        encoded = b64_encode(self.body)
        lines = [encoded[i : i + LINE_COLUMNS] for i in range(0, len(encoded), LINE_COLUMNS)]
        if not lines or len(lines[-1]) == LINE_COLUMNS:
            lines.append(b"")
        first = " ".join(("->", self.type, *self.args)).encode()
        return b"".join(line + b"\n" for line in [first, *lines])


@dataclass(frozen=True)
class X25519Recipient:
    """A public key to encrypt to: ``age1...``."""

    public: bytes

    @classmethod
    def parse(cls, text: str) -> X25519Recipient:
        """Return the recipient ``text`` (``age1...``) names. Raise ValueError if it is not one."""
        hrp, data = bech32_decode(text.strip())
        if hrp != RECIPIENT_HRP:
            raise ValueError("not an age X25519 recipient (age1...)")
        if len(data) != 32:
            raise ValueError("an age X25519 recipient holds 32 bytes")
        return cls(data)

    def __str__(self) -> str:
        return bech32_encode(RECIPIENT_HRP, self.public)

    def wrap(self, file_key: bytes) -> Stanza:
        """Return the stanza that gives ``file_key`` to the holder of this recipient's identity."""
        ephemeral = X25519PrivateKey.generate()
        share = ephemeral.public_key().public_bytes(*RAW)
        shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(self.public))
        wrap_key = hkdf(shared, share + self.public, X25519_INFO)
        body = ChaCha20Poly1305(wrap_key).encrypt(bytes(12), file_key, None)
        return Stanza("X25519", (b64_encode(share).decode(),), body)


class X25519Identity:
    """A private key to decrypt with: ``AGE-SECRET-KEY-1...``. Its repr shows only its recipient."""

    def __init__(self, secret: bytes):
        self._key = X25519PrivateKey.from_private_bytes(secret)
        self.recipient = X25519Recipient(self._key.public_key().public_bytes(*RAW))

    @classmethod
    def generate(cls) -> X25519Identity:
        return cls(os.urandom(32))

    @classmethod
    def parse(cls, text: str) -> X25519Identity:
        """Return the identity ``text`` encodes. Raise ValueError (never quoting it) otherwise."""
        text = text.strip()
        try:
            hrp, data = bech32_decode(text)
        except ValueError:
            raise ValueError("not an age identity (AGE-SECRET-KEY-1...)") from None
        if hrp != IDENTITY_HRP or len(data) != 32:
            raise ValueError("not an age X25519 identity (AGE-SECRET-KEY-1...)")
        return cls(data)

    def secret_text(self) -> str:
        """Return the identity as ``age-keygen`` writes it: a secret, for a key file only."""
        raw = self._key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return bech32_encode(IDENTITY_HRP, raw).upper()

    def __repr__(self) -> str:
        return f"X25519Identity(recipient={self.recipient})"

    def unwrap(self, stanza: Stanza) -> bytes | None:
        """Return the file key if ``stanza`` (an X25519 one, checked well-formed) is for this
        identity, else None. Raise ValueError for an invalid share."""
        share = b64_decode(stanza.args[0].encode())
        try:
            shared = self._key.exchange(X25519PublicKey.from_public_bytes(share))
        except ValueError:  # a low-order share: the shared secret would be all zeros
            raise ValueError("an X25519 stanza holds an invalid ephemeral share") from None
        wrap_key = hkdf(shared, share + self.recipient.public, X25519_INFO)
        try:
            return ChaCha20Poly1305(wrap_key).decrypt(bytes(12), stanza.body, None)
        except InvalidTag:
            return None


def parse_identities(text: str) -> list[X25519Identity]:
    """Return the identities of an identity file's text (``age-keygen``'s: ``#`` comments, blank
    lines, one ``AGE-SECRET-KEY-1...`` a line). Raise ValueError naming the first bad line by its
    number, never its content, or if there is none."""
    found = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            found.append(X25519Identity.parse(line))
        except ValueError as exc:
            raise ValueError(f"line {number} is {exc}") from None
    if not found:
        raise ValueError("it holds no identity (AGE-SECRET-KEY-1...)")
    return found


def b64_encode(data: bytes) -> bytes:
    """Base64 without padding, as age writes it."""
    return base64.b64encode(data).rstrip(b"=")


def b64_decode(text: bytes) -> bytes:
    """Decode canonical unpadded base64. Raise ValueError for anything else."""
    if not BASE64.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("malformed base64 in the header")
    try:
        data = base64.b64decode(text + b"=" * (-len(text) % 4), validate=True)
    except binascii.Error:
        raise ValueError("malformed base64 in the header") from None
    if b64_encode(data) != text:
        raise ValueError("non-canonical base64 in the header")
    return data
