"""Authenticated encryption of stored tokens (AES-256-GCM from `cryptography`).

A ciphertext is `b"\\x01" + key_id(4) + nonce(12) + AESGCM(plaintext, aad)`. The associated
data binds the ciphertext to its account slug and column, so a value copied into another
row or field fails to decrypt. The key id says which configured key opened it: the first
key encrypts, every key decrypts, and `needs_rotation` tells which values to re-encrypt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nbgateway.errors import ConfigError, DecryptError
from nbgateway.redact import Secret

_VERSION = b"\x01"
_KID_LEN = 4
_NONCE_LEN = 12


def generate_key() -> str:
    """A fresh 256-bit key, url-safe base64 (what `nbgateway keygen` prints)."""
    return base64.urlsafe_b64encode(AESGCM.generate_key(bit_length=256)).decode("ascii")


def _decode_key(key: Secret) -> bytes | None:
    try:
        raw = base64.urlsafe_b64decode(key.reveal().encode("ascii"))
    except (binascii.Error, ValueError, UnicodeEncodeError):
        return None
    return raw if len(raw) == 32 else None


def validate_key(key: Secret) -> bool:
    """True when `key` is a 32-byte url-safe base64 key."""
    return _decode_key(key) is not None


def _key_id(raw: bytes) -> bytes:
    return hashlib.sha256(b"nbgateway-key-id:" + raw).digest()[:_KID_LEN]


def _aad(slug: str, field: str) -> bytes:
    return f"nbgateway/v1/{slug}/{field}".encode()


class Cipher:
    """Encrypts with the first key, decrypts with any. Never includes secrets in errors."""

    def __init__(self, keys: Sequence[Secret]) -> None:
        if not keys:
            raise ConfigError("NBGW_ENCRYPTION_KEY is required: no key given")
        self._keys: list[tuple[bytes, AESGCM]] = []
        for index, key in enumerate(keys):
            raw = _decode_key(key)
            if raw is None:
                raise ConfigError(
                    f"NBGW_ENCRYPTION_KEY is invalid: key #{index + 1} is not a 32-byte "
                    "url-safe base64 key"
                )
            self._keys.append((_key_id(raw), AESGCM(raw)))
        self._by_id = {kid: aead for kid, aead in reversed(self._keys)}

    @property
    def key_ids(self) -> list[str]:
        """Hex ids of the configured keys, the encrypting one first."""
        return [kid.hex() for kid, _ in self._keys]

    @property
    def primary_key_id(self) -> str:
        return self._keys[0][0].hex()

    def encrypt(self, plaintext: str, *, slug: str, field: str) -> bytes:
        kid, aead = self._keys[0]
        nonce = os.urandom(_NONCE_LEN)
        return _VERSION + kid + nonce + aead.encrypt(nonce, plaintext.encode(), _aad(slug, field))

    def key_id_of(self, blob: bytes) -> str:
        """The hex id of the key that sealed `blob` (whether or not it is configured)."""
        if len(blob) < 1 + _KID_LEN or blob[:1] != _VERSION:
            raise DecryptError("not an nbgateway ciphertext")
        return blob[1 : 1 + _KID_LEN].hex()

    def needs_rotation(self, blob: bytes) -> bool:
        """True when `blob` was sealed with a key other than the first."""
        return self.key_id_of(blob) != self.primary_key_id

    def decrypt(self, blob: bytes, *, slug: str, field: str) -> Secret:
        if len(blob) < 1 + _KID_LEN + _NONCE_LEN + 16 or blob[:1] != _VERSION:
            raise DecryptError(f"{field} of account {slug!r} is not a valid ciphertext")
        kid = blob[1 : 1 + _KID_LEN]
        aead = self._by_id.get(kid)
        if aead is None:
            raise DecryptError(
                f"{field} of account {slug!r} was encrypted with key id {kid.hex()}, which is "
                "not among NBGW_ENCRYPTION_KEY (wrong key, or an old key was removed)"
            )
        nonce = blob[1 + _KID_LEN : 1 + _KID_LEN + _NONCE_LEN]
        try:
            plain = aead.decrypt(nonce, blob[1 + _KID_LEN + _NONCE_LEN :], _aad(slug, field))
        except InvalidTag:
            raise DecryptError(
                f"{field} of account {slug!r} failed authentication (altered, or copied from "
                "another row or column)"
            ) from None
        return Secret(plain.decode())
