"""Payload encryption: an AES-256-GCM `PayloadCodec` for every payload Temporal stores.

Workflow inputs, results, activity arguments, memos and (with the encoded failure attributes
of `data_converter`) failure messages and stack traces name agents, owners, scopes and ARNs;
with `NHI_PAYLOAD_KEYS` set they reach Temporal's database only as ciphertext. Search
attributes are indexed by the server and stay in clear by design.

Keys are `kid:base64key` pairs separated by commas. The first encrypts; every one decrypts, so
a key rotates without downtime: put the new key first and keep the old one after it until no
open history holds payloads encrypted with it. Payloads written before encryption was turned on
have no `binary/encrypted` encoding and decode as they are, so those histories still replay.

Format of an encrypted payload: metadata `encoding: binary/encrypted` and
`encryption-key-id: <kid>`; data = 12-byte random nonce + AES-GCM(serialized inner payload),
authenticated together with the key id (a payload cannot be passed off under another id).
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
SETTING = "NHI_PAYLOAD_KEYS"
NONCE_BYTES = 12
KEY_BYTES = 32  # AES-256
_KID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_AAD_PREFIX = b"nhi-lifecycle/payload/v1:"


class PayloadKeyError(ValueError):
    """`NHI_PAYLOAD_KEYS` is malformed. The message names the entry, never key material."""


class PayloadDecryptError(ValueError):
    """A payload cannot be decrypted (unknown key id, or it fails authentication)."""


@dataclass(frozen=True)
class PayloadKeys:
    """The parsed key ring: `current` encrypts, every key in `by_id` decrypts."""

    current: str
    by_id: dict[str, bytes]

    def __repr__(self) -> str:  # never key material in a log line or a traceback
        return f"PayloadKeys(current={self.current!r}, ids={list(self.by_id)!r})"


def _key_bytes(text: str) -> bytes | None:
    """Standard or URL-safe base64 (padded or not) of exactly 32 bytes, else None."""
    padded = text + "=" * (-len(text) % 4)
    for alphabet in (b"+/", b"-_"):
        try:
            raw = base64.b64decode(padded, altchars=alphabet, validate=True)
        except (binascii.Error, ValueError):
            continue
        if len(raw) == KEY_BYTES:
            return raw
    return None


def parse_keys(text: str) -> PayloadKeys:
    """`kid1:base64key,kid2:base64key` -> key ring; `PayloadKeyError` naming the bad entry."""
    entries = [e.strip() for e in text.split(",")]
    if not any(entries):
        raise PayloadKeyError(f"{SETTING}: no key given (expected `kid:base64key[,kid:...]`)")
    by_id: dict[str, bytes] = {}
    for n, entry in enumerate(entries, start=1):
        kid, sep, encoded = entry.partition(":")
        kid = kid.strip()
        where = f"{SETTING}: entry {n}"
        if not sep:
            raise PayloadKeyError(f"{where}: expected `kid:base64key`")
        if not _KID.match(kid):
            raise PayloadKeyError(
                f"{where}: the key id must be 1-64 characters of letters, digits, '.', '_', '-'"
            )
        if kid in by_id:
            raise PayloadKeyError(f"{where}: key id {kid!r} appears twice")
        key = _key_bytes(encoded.strip())
        if key is None:
            raise PayloadKeyError(
                f"{where} ({kid!r}): the key must be base64 of exactly {KEY_BYTES} bytes "
                "(e.g. `openssl rand -base64 32`)"
            )
        by_id[kid] = key
    return PayloadKeys(current=next(iter(by_id)), by_id=by_id)


def _aad(kid: str) -> bytes:
    return _AAD_PREFIX + kid.encode()


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM over each whole payload (its metadata included: even the encoding of the
    value inside is hidden)."""

    def __init__(self, keys: PayloadKeys) -> None:
        self.key_id = keys.current
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.by_id.items()}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.key_id].encrypt(
            nonce, payload.SerializeToString(), _aad(self.key_id)
        )
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID: self.key_id.encode()}, data=nonce + sealed
        )

    def decrypt(self, payload: Payload) -> Payload:
        # Written before encryption was turned on: as it is, so those histories still replay.
        if payload.metadata.get("encoding") != ENCODING:
            return payload
        kid = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(kid)
        if cipher is None:
            raise PayloadDecryptError(
                f"payload encrypted with key id {kid!r}, which {SETTING} does not hold "
                "(keep retired keys after the current one until no open history uses them)"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], _aad(kid))
            return Payload.FromString(plain)
        except (InvalidTag, DecodeError) as err:
            raise PayloadDecryptError(
                f"payload with key id {kid!r} fails authentication (altered, or another key "
                "now has that id)"
            ) from err


def is_encrypted(payload: Payload) -> bool:
    """Whether `payload` is one this codec wrote."""
    return payload.metadata.get("encoding") == ENCODING
