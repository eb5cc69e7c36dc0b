"""Tests for token encryption (nbgateway.crypto): AES-GCM, key ids, row/column binding."""

from __future__ import annotations

import base64

import pytest

from nbgateway.crypto import Cipher, generate_key, validate_key
from nbgateway.errors import ConfigError, DecryptError
from nbgateway.redact import Secret

PLAINTEXT = "refresh-token-CANARY-7d3f0a9b1c"


def cipher(*keys: str) -> Cipher:
    return Cipher([Secret(k) for k in keys])


@pytest.fixture
def key() -> str:
    return generate_key()


@pytest.fixture
def old_key() -> str:
    return generate_key()


class TestKeys:
    def test_generated_key_is_valid(self, key: str) -> None:
        """generate_key() output passes validate_key."""
        assert validate_key(Secret(key))

    def test_generated_keys_differ(self) -> None:
        """Two generated keys are different."""
        assert generate_key() != generate_key()

    def test_generated_key_is_32_bytes_urlsafe_base64(self, key: str) -> None:
        """A key decodes as url-safe base64 to 32 bytes."""
        assert len(base64.urlsafe_b64decode(key)) == 32

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "not a key",
            base64.urlsafe_b64encode(b"x" * 16).decode(),
            base64.urlsafe_b64encode(b"x" * 33).decode(),
            "ключ",
        ],
    )
    def test_invalid_keys_are_rejected(self, value: str) -> None:
        """validate_key is False for anything but a 32-byte url-safe base64 key."""
        assert not validate_key(Secret(value))

    def test_cipher_needs_a_key(self) -> None:
        """A Cipher without keys raises ConfigError naming NBGW_ENCRYPTION_KEY."""
        with pytest.raises(ConfigError, match="NBGW_ENCRYPTION_KEY"):
            Cipher([])

    def test_cipher_rejects_bad_key_without_echoing_it(self, key: str) -> None:
        """A malformed key raises ConfigError that says which key, not what it was."""
        planted = "SECRETCANARY-bad-key-value"
        with pytest.raises(ConfigError) as info:
            cipher(key, planted)
        assert "#2" in str(info.value)
        assert planted not in str(info.value)
        assert key not in str(info.value)

    def test_key_ids_are_listed_encrypting_key_first(self, key: str, old_key: str) -> None:
        """key_ids lists one id per key, the encrypting key first."""
        c = cipher(key, old_key)
        assert c.key_ids == [c.primary_key_id, cipher(old_key).primary_key_id]
        assert c.key_ids[0] != c.key_ids[1]

    def test_key_id_does_not_reveal_the_key(self, key: str) -> None:
        """The key id is neither the key nor a piece of it."""
        kid = cipher(key).primary_key_id
        raw_hex = base64.urlsafe_b64decode(key).hex()
        assert kid not in key
        assert kid not in raw_hex


class TestEncryptDecrypt:
    def test_round_trip(self, key: str) -> None:
        """What is encrypted for a slug and field decrypts to the same text."""
        c = cipher(key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert c.decrypt(blob, slug="acme", field="refresh_token").reveal() == PLAINTEXT

    def test_round_trip_unicode_and_empty(self, key: str) -> None:
        """Non-ASCII and empty plaintexts survive the round trip."""
        c = cipher(key)
        for text in ("", "tökén ✓"):
            blob = c.encrypt(text, slug="acme", field="access_token")
            assert c.decrypt(blob, slug="acme", field="access_token").reveal() == text

    def test_decrypt_returns_a_secret(self, key: str) -> None:
        """Decrypted values come back as Secret, which does not print itself."""
        c = cipher(key)
        plain = c.decrypt(c.encrypt(PLAINTEXT, slug="a", field="f"), slug="a", field="f")
        assert isinstance(plain, Secret)
        assert PLAINTEXT not in f"{plain} {plain!r}"

    def test_ciphertext_does_not_contain_plaintext(self, key: str) -> None:
        """The sealed bytes do not contain the plaintext."""
        blob = cipher(key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert PLAINTEXT.encode() not in blob

    def test_nonces_differ(self, key: str) -> None:
        """Encrypting the same text twice gives different ciphertexts."""
        c = cipher(key)
        first = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        second = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert first != second

    def test_other_slug_fails(self, key: str) -> None:
        """A ciphertext decrypted as another account's raises DecryptError."""
        c = cipher(key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        with pytest.raises(DecryptError, match="other"):
            c.decrypt(blob, slug="other", field="refresh_token")

    def test_other_field_fails(self, key: str) -> None:
        """A ciphertext decrypted as another column raises DecryptError."""
        c = cipher(key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        with pytest.raises(DecryptError, match="access_token"):
            c.decrypt(blob, slug="acme", field="access_token")

    @pytest.mark.parametrize("position", [0, 1, 5, 17, 20, -1])
    def test_tampered_byte_fails(self, key: str, position: int) -> None:
        """Changing any single byte (header, key id, nonce, body, tag) raises DecryptError."""
        c = cipher(key)
        blob = bytearray(c.encrypt(PLAINTEXT, slug="acme", field="refresh_token"))
        blob[position] ^= 0x01
        with pytest.raises(DecryptError):
            c.decrypt(bytes(blob), slug="acme", field="refresh_token")

    @pytest.mark.parametrize("blob", [b"", b"\x01", b"garbage-not-a-ciphertext", b"\x01" * 32])
    def test_garbage_fails(self, key: str, blob: bytes) -> None:
        """Bytes that are not a ciphertext raise DecryptError naming the account."""
        with pytest.raises(DecryptError, match="acme"):
            cipher(key).decrypt(blob, slug="acme", field="access_token")

    def test_truncated_ciphertext_fails(self, key: str) -> None:
        """A ciphertext with its tag cut off raises DecryptError."""
        c = cipher(key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        with pytest.raises(DecryptError):
            c.decrypt(blob[:-4], slug="acme", field="refresh_token")

    def test_error_text_has_no_plaintext_or_key(self, key: str) -> None:
        """DecryptError messages contain neither the plaintext nor the key."""
        c = cipher(key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        messages = []
        for slug, field in (("other", "refresh_token"), ("acme", "access_token")):
            with pytest.raises(DecryptError) as info:
                c.decrypt(blob, slug=slug, field=field)
            messages.append(str(info.value))
        for message in messages:
            assert PLAINTEXT not in message
            assert key not in message


class TestMultipleKeys:
    def test_old_key_data_decrypts_with_new_first(self, key: str, old_key: str) -> None:
        """Data sealed by the old key decrypts when keys are 'new,old'."""
        blob = cipher(old_key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        plain = cipher(key, old_key).decrypt(blob, slug="acme", field="refresh_token")
        assert plain.reveal() == PLAINTEXT

    def test_first_key_encrypts(self, key: str, old_key: str) -> None:
        """With 'new,old', new ciphertexts open with the new key alone."""
        blob = cipher(key, old_key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert cipher(key).decrypt(blob, slug="acme", field="refresh_token").reveal() == PLAINTEXT
        assert cipher(key).key_id_of(blob) == cipher(key).primary_key_id

    def test_needs_rotation(self, key: str, old_key: str) -> None:
        """needs_rotation is True for old-key ciphertexts and False for first-key ones."""
        both = cipher(key, old_key)
        old_blob = cipher(old_key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        new_blob = both.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert both.needs_rotation(old_blob)
        assert not both.needs_rotation(new_blob)

    def test_key_id_of_reports_the_sealing_key(self, key: str, old_key: str) -> None:
        """key_id_of names the key that sealed a blob, configured or not."""
        old_blob = cipher(old_key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert cipher(key).key_id_of(old_blob) == cipher(old_key).primary_key_id

    def test_key_id_of_garbage_fails(self, key: str) -> None:
        """key_id_of raises DecryptError for bytes that are not a ciphertext."""
        with pytest.raises(DecryptError):
            cipher(key).key_id_of(b"nope")

    def test_unknown_key_id_names_the_id_not_the_key(self, key: str, old_key: str) -> None:
        """Decrypting with the wrong key raises DecryptError naming the key id only."""
        blob = cipher(old_key).encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        with pytest.raises(DecryptError) as info:
            cipher(key).decrypt(blob, slug="acme", field="refresh_token")
        message = str(info.value)
        assert cipher(old_key).primary_key_id in message
        assert old_key not in message
        assert key not in message
        assert PLAINTEXT not in message

    def test_same_key_twice_is_harmless(self, key: str) -> None:
        """Listing a key twice still encrypts and decrypts."""
        c = cipher(key, key)
        blob = c.encrypt(PLAINTEXT, slug="acme", field="refresh_token")
        assert c.decrypt(blob, slug="acme", field="refresh_token").reveal() == PLAINTEXT
