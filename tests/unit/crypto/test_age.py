"""The age format of vq_tasks.crypto.age: round trips at chunk boundaries, interoperability both ways with
the real `age` CLI and keys from the real `age-keygen`, refusal of every kind of tampering, and
memory that stays at about one chunk whatever the size."""

from __future__ import annotations

import io
import os
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vq_tasks.crypto import age
from vq_tasks.crypto.age import (
    CHUNK,
    SEALED_CHUNK,
    AgeEncryptStage,
    AgeError,
    AgeReader,
    NoIdentityMatch,
    X25519Identity,
    X25519Recipient,
    bech32_decode,
    bech32_encode,
    parse_identities,
)

SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17, 5 * 1024 * 1024 + 3]


def tool(name: str) -> str:
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} is missing: install Debian's age package (apt-get install age), as .ci/run does")
    return found


@pytest.fixture(scope="module")
def keygen(tmp_path_factory) -> tuple[Path, str]:
    """A key made by the real age-keygen: its identity file and its public key."""
    path = tmp_path_factory.mktemp("keys") / "key.txt"
    made = subprocess.run([tool("age-keygen"), "-o", str(path)], capture_output=True, text=True, check=True)
    public = made.stderr.strip().split()[-1]
    assert public.startswith("age1")
    return path, public


def data_of(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def encrypt(data: bytes, recipients, pieces: int = 7919) -> bytes:
    out = io.BytesIO()
    stage = AgeEncryptStage(out, recipients)
    for i in range(0, len(data), pieces):
        stage.write(data[i : i + pieces])
    stage.close()
    return out.getvalue()


def decrypt(blob: bytes, identities, name: str = "test.age", size: int = 100_000) -> bytes:
    reader = AgeReader(io.BytesIO(blob), identities, name)
    parts = []
    while chunk := reader.read(size):
        parts.append(chunk)
    return b"".join(parts)


def age_cli(*args: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([tool("age"), *args], input=data, capture_output=True, timeout=60)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_at_chunk_boundaries(size):
    identity = X25519Identity.generate()
    data = data_of(size, size)
    blob = encrypt(data, [identity.recipient])
    chunks = max(1, -(-size // CHUNK))
    header_end = blob.index(b"\n---") + 1
    header_end = blob.index(b"\n", header_end) + 1
    assert len(blob) == header_end + 16 + size + 16 * chunks  # nonce, and a tag per chunk, no more
    assert decrypt(blob, [identity]) == data
    assert decrypt(blob, [identity], size=1 + size // 3) == data


@pytest.mark.parametrize("size", SIZES)
def test_the_age_cli_opens_ours_and_we_open_its(size, keygen):
    key_file, public = keygen
    data = data_of(size, size + 1)
    ours = encrypt(data, [X25519Recipient.parse(public)])
    opened = age_cli("-d", "-i", str(key_file), data=ours)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == data

    theirs = age_cli("-r", public, data=data)
    assert theirs.returncode == 0, theirs.stderr
    identities = parse_identities(key_file.read_text())
    assert decrypt(theirs.stdout, identities) == data


def test_several_recipients_each_open_it_with_the_cli_and_with_us(keygen, tmp_path):
    key_file, public = keygen
    escrow = X25519Identity.generate()
    escrow_file = tmp_path / "escrow.txt"
    escrow_file.write_text(f"# escrow\n{escrow.secret_text()}\n")
    escrow_file.chmod(0o600)
    data = data_of(3 * CHUNK + 5)
    blob = encrypt(data, [X25519Recipient.parse(public), escrow.recipient])
    for identity_file in (key_file, escrow_file):
        opened = age_cli("-d", "-i", str(identity_file), data=blob)
        assert opened.returncode == 0 and opened.stdout == data, opened.stderr
    assert decrypt(blob, [escrow]) == data
    assert decrypt(blob, parse_identities(key_file.read_text())) == data
    # an identity file with several keys: the one that fits is found, wherever it is
    assert decrypt(blob, [X25519Identity.generate(), escrow]) == data
    theirs = age_cli("-r", public, "-r", str(escrow.recipient), data=data).stdout
    assert decrypt(theirs, [escrow]) == data


def test_keys_parse_as_age_keygen_writes_them(keygen):
    key_file, public = keygen
    text = key_file.read_text()
    assert "# public key: " + public in text
    [identity] = parse_identities(text)
    assert str(identity.recipient) == public
    assert X25519Recipient.parse(public.upper()) == identity.recipient  # bech32 is case-insensitive
    assert "AGE-SECRET-KEY" not in repr(identity) and public in repr(identity)
    assert identity.secret_text() in text
    hrp, data = bech32_decode(public)
    assert hrp == "age" and bech32_encode(hrp, data) == public


def test_bad_keys_are_refused_without_being_echoed():
    identity = X25519Identity.generate()
    secret = identity.secret_text()
    public = str(identity.recipient)
    damaged = public[:-1] + ("q" if public[-1] != "q" else "p")
    for bad in (damaged, "age1", public.replace("age1", "agf1"), public[:10] + public[10:].upper(), secret):
        with pytest.raises(ValueError) as failure:
            X25519Recipient.parse(bad)
        assert secret not in str(failure.value)
    with pytest.raises(ValueError, match="line 3 is not an age") as failure:
        parse_identities(f"# comment\n\n{secret[:-1]}x\n")
    assert secret[:-1] not in str(failure.value)
    with pytest.raises(ValueError, match="no identity"):
        parse_identities("# only a comment\n")


def test_a_key_that_is_not_a_recipient_is_named_with_the_file():
    blob = encrypt(b"secret data", [X25519Identity.generate().recipient])
    with pytest.raises(NoIdentityMatch, match=r"^x\.tar\.gz\.age: none of the identities given opens it"):
        AgeReader(io.BytesIO(blob), [X25519Identity.generate()], "x.tar.gz.age")


# --- tampering ---


def reference() -> tuple[X25519Identity, bytes, bytes]:
    identity = X25519Identity.generate()
    data = data_of(3 * CHUNK + 100, 7)
    return identity, data, encrypt(data, [identity.recipient, X25519Identity.generate().recipient])


def refused(blob: bytes, identity: X25519Identity) -> str:
    with pytest.raises(AgeError) as failure:
        decrypt(blob, [identity], name="bundle.tar.gz.age")
    message = str(failure.value)
    assert message.startswith("bundle.tar.gz.age: ")
    return message


def payload_start(blob: bytes) -> int:
    return blob.index(b"\n", blob.index(b"\n--- ") + 1) + 1


def test_a_flipped_byte_anywhere_is_refused():
    identity, data, blob = reference()
    start = payload_start(blob)
    positions = {
        "version line": 3,
        "first stanza's share": blob.index(b"-> X25519 ") + 12,
        "first stanza's body": blob.index(b"\n", blob.index(b"-> X25519 ")) + 5,
        "MAC": blob.index(b"\n--- ") + 8,
        "payload nonce": start + 3,
        "first chunk": start + 16 + 10,
        "a middle chunk's tag": start + 16 + 2 * SEALED_CHUNK - 3,
        "last chunk": len(blob) - 40,
        "last byte": len(blob) - 1,
    }
    for where, position in positions.items():
        damaged = bytearray(blob)
        damaged[position] ^= 0x20
        message = refused(bytes(damaged), identity)
        assert message, where
    mac_flip = bytearray(blob)
    position = blob.index(b"\n--- ") + 8  # a character of the MAC, changed to another base64 one
    mac_flip[position] = ord("A") if mac_flip[position] != ord("A") else ord("B")
    assert "MAC does not match" in refused(bytes(mac_flip), identity)
    middle = bytearray(blob)
    middle[start + 16 + SEALED_CHUNK + 100] ^= 0x01
    assert "chunk 2 of the age payload does not authenticate" in refused(bytes(middle), identity)
    assert decrypt(blob, [identity]) == data  # the untouched file still opens


def test_truncated_or_extended_files_are_refused():
    identity, _, blob = reference()
    start = payload_start(blob)
    cuts = {
        "empty": 0,
        "inside the header": start - 20,
        "before the nonce": start,
        "inside the nonce": start + 5,
        "after the nonce": start + 16,
        "inside a chunk": start + 16 + 1000,
        "at a chunk boundary (the last chunks missing)": start + 16 + 2 * SEALED_CHUNK,
        "one byte short": len(blob) - 1,
    }
    for where, length in cuts.items():
        assert refused(blob[:length], identity), where
    at_boundary = refused(blob[: start + 16 + 2 * SEALED_CHUNK], identity)
    assert "chunk 2 of the age payload does not authenticate as its last chunk" in at_boundary
    for extra in (b"\0", b"x" * 16, os.urandom(SEALED_CHUNK), blob[start + 16 : start + 16 + SEALED_CHUNK]):
        assert "does not authenticate" in refused(blob + extra, identity)
    assert "has bytes appended" in refused(blob + b"\0", identity)


def forge(identity: X25519Identity, chunks: list[tuple[bytes, bool]]) -> bytes:
    """An age file sealed by hand from the format's primitives, each chunk with the last-chunk flag
    given: to build the files a correct writer never makes."""
    file_key = os.urandom(16)
    nonce = os.urandom(16)
    header = age._header([identity.recipient.wrap(file_key)], file_key)
    aead = ChaCha20Poly1305(age.hkdf(file_key, nonce, b"payload"))
    sealed = [aead.encrypt(age._chunk_nonce(i, last), data, None) for i, (data, last) in enumerate(chunks)]
    return header + nonce + b"".join(sealed)


def test_a_missing_last_chunk_flag_an_empty_last_chunk_and_reordering_are_refused(keygen):
    key_file, _ = keygen
    [identity] = parse_identities(key_file.read_text())
    full = data_of(CHUNK, 3)
    good = forge(identity, [(full, False), (b"tail", True)])
    assert decrypt(good, [identity]) == full + b"tail"
    assert age_cli("-d", "-i", str(key_file), data=good).stdout == full + b"tail"  # the forger is right

    no_flag = forge(identity, [(full, False), (b"tail", False)])
    assert "does not authenticate as its last chunk" in refused(no_flag, identity)
    assert age_cli("-d", "-i", str(key_file), data=no_flag).returncode != 0
    all_full_no_flag = forge(identity, [(full, False), (full, False)])
    assert "does not authenticate as its last chunk" in refused(all_full_no_flag, identity)
    empty_last = forge(identity, [(full, False), (b"", True)])
    assert "last chunk (chunk 2) is empty" in refused(empty_last, identity)
    assert age_cli("-d", "-i", str(key_file), data=empty_last).returncode != 0
    assert decrypt(forge(identity, [(b"", True)]), [identity]) == b""  # empty only when all is

    three = forge(identity, [(full, False), (data_of(CHUNK, 4), False), (b"end", True)])
    start = payload_start(three) + 16
    first, second = (
        three[start : start + SEALED_CHUNK],
        three[start + SEALED_CHUNK : start + 2 * SEALED_CHUNK],
    )
    swapped = three[:start] + second + first + three[start + 2 * SEALED_CHUNK :]
    assert "chunk 1 of the age payload does not authenticate" in refused(swapped, identity)


def test_what_is_not_an_age_file_is_named_as_such():
    identity = X25519Identity.generate()
    assert "not an age v1 file" in refused(b"hello\nworld\n", identity)
    assert "armored" in refused(b"-----BEGIN AGE ENCRYPTED FILE-----\nYWdl\n", identity)
    assert "a line without its end" in refused(b"x" * 10_000, identity)
    no_stanza = b"age-encryption.org/v1\n--- " + age.b64_encode(bytes(32)) + b"\n" + bytes(40)
    assert "no stanza" in refused(no_stanza, identity)
    blob = encrypt(b"data", [identity.recipient])
    long_body = blob.replace(b"\n--- ", b"\n-> x\n" + b"A" * 65 + b"\n--- ", 1)
    assert "longer than 64 columns" in refused(long_body, identity)


def test_an_unknown_stanza_is_skipped_and_bodies_wrap_at_64_columns():
    stanza = age.Stanza("example.com/other", ("a", "b"), bytes(range(48)))
    encoded = stanza.encode().split(b"\n")
    assert encoded[0] == b"-> example.com/other a b" and len(encoded[1]) == 64 and encoded[2] == b""
    assert age.Stanza("x", (), b"").encode() == b"-> x\n\n"
    identity = X25519Identity.generate()
    file_key = os.urandom(16)
    header = age._header([stanza, identity.recipient.wrap(file_key)], file_key)
    nonce = os.urandom(16)
    aead = ChaCha20Poly1305(age.hkdf(file_key, nonce, b"payload"))
    blob = header + nonce + aead.encrypt(age._chunk_nonce(0, True), b"hello", None)
    assert decrypt(blob, [identity]) == b"hello"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.integers(min_value=0, max_value=3 * CHUNK + 10),
    pieces=st.lists(st.integers(min_value=1, max_value=CHUNK + 7), min_size=1, max_size=8),
    read_size=st.integers(min_value=1, max_value=2 * CHUNK),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_any_split_of_writes_and_reads_round_trips(size, pieces, read_size, seed):
    identity = X25519Identity.generate()
    data = data_of(size, seed)
    out = io.BytesIO()
    stage = AgeEncryptStage(out, [identity.recipient])
    offset, turn = 0, 0
    while offset < size:
        step = pieces[turn % len(pieces)]
        stage.write(data[offset : offset + step])
        offset, turn = offset + step, turn + 1
    stage.close()
    reader = AgeReader(io.BytesIO(out.getvalue()), [identity])
    got = bytearray()
    buffer = bytearray(read_size)
    while n := reader.readinto(buffer):
        got += buffer[:n]
    assert bytes(got) == data


MEMORY_SCRIPT = textwrap.dedent(
    """
    import hashlib, os, resource, sys
    from vq_tasks.crypto.age import AgeEncryptStage, AgeReader, X25519Identity

    MIB = 1 << 20
    class Sink:
        def __init__(self, f):
            self.f, self.size = f, 0
        def write(self, data):
            self.size += len(data)
            self.f.write(data)

    path, total = sys.argv[1], int(sys.argv[2])
    identity = X25519Identity.generate()
    piece = os.urandom(MIB)
    digest = hashlib.sha256()
    with open(os.devnull, "wb") as f:  # warm up: imports, allocator, one run of each path
        AgeEncryptStage(Sink(f), [identity.recipient]).write(piece)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(path, "wb") as f:
        stage = AgeEncryptStage(Sink(f), [identity.recipient])
        for i in range(total // MIB):
            stage.write(piece)
            digest.update(piece)
        stage.close()
    after_encrypt = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    check = hashlib.sha256()
    with open(path, "rb") as f:
        reader = AgeReader(f, [identity])
        while chunk := reader.read(MIB):
            check.update(chunk)
    after_decrypt = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert check.digest() == digest.digest()
    print(before, after_encrypt, after_decrypt)
    """
)


def test_memory_stays_bounded_for_50_mb_each_way(tmp_path):
    total = 50 * 1024 * 1024
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "big.age"), str(total)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr
    before, after_encrypt, after_decrypt = (int(v) for v in run.stdout.split())  # KiB
    assert (tmp_path / "big.age").stat().st_size > total
    assert after_encrypt - before < 8 * 1024, (before, after_encrypt)
    assert after_decrypt - before < 8 * 1024, (before, after_decrypt)


def test_the_stage_buffers_one_chunk_at_most():
    identity = X25519Identity.generate()
    written: list[int] = []

    class Sink:
        def write(self, data: bytes) -> None:
            written.append(len(data))

    stage = AgeEncryptStage(Sink(), [identity.recipient])
    stage.write(bytes(10 * CHUNK + 5))  # one big write: sealed as it goes, one chunk held back
    assert len(stage._buffer) == CHUNK and stage._filled == 5
    assert written[1:] == [SEALED_CHUNK] * 10  # after the header and nonce
    stage.close()
    assert written[-1] == 5 + 16
