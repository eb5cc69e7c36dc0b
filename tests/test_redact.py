"""Tests for keeping secrets out of text (nbgateway.redact): Secret and Redactor."""

from __future__ import annotations

import logging

import pytest

from nbgateway import redact
from nbgateway.redact import REDACTED, Redactor, Secret

VALUE = "tok-CANARY-5a9e0c1f7b"


class TestSecret:
    def test_str_is_redacted(self) -> None:
        """str() of a Secret does not reveal the value."""
        assert VALUE not in str(Secret(VALUE))

    def test_repr_is_redacted(self) -> None:
        """repr() of a Secret does not reveal the value."""
        assert VALUE not in repr(Secret(VALUE))

    def test_format_is_redacted(self) -> None:
        """f-strings, str.format and %-formatting do not reveal the value."""
        s = Secret(VALUE)
        template = "{} {!r}"
        rendered = [
            f"{s}",
            f"{s!r}",
            f"{s!s}",
            template.format(s, s),
            "%s %r" % (s, s),  # noqa: UP031 - %-formatting is what logging uses
            format(s),
        ]
        for text in rendered:
            assert VALUE not in text

    def test_containers_do_not_reveal(self) -> None:
        """A Secret inside a list, dict or tuple does not print itself."""
        s = Secret(VALUE)
        assert VALUE not in str([s]) + str({"k": s}) + repr((s,))

    def test_logging_does_not_reveal(self, caplog: pytest.LogCaptureFixture) -> None:
        """A Secret passed as a log argument is logged redacted."""
        with caplog.at_level(logging.INFO):
            logging.getLogger("test").info("token %s / %r", Secret(VALUE), Secret(VALUE))
        assert VALUE not in caplog.text

    def test_reveal_returns_the_value(self) -> None:
        """reveal() is the one way to the value."""
        assert Secret(VALUE).reveal() == VALUE

    def test_equality_and_truthiness(self) -> None:
        """Secrets compare by value and are false only when empty."""
        assert Secret(VALUE) == Secret(VALUE)
        assert Secret(VALUE) != Secret(VALUE + "x")
        assert len({Secret(VALUE), Secret(VALUE)}) == 1
        assert Secret(VALUE)
        assert not Secret("")

    def test_not_equal_to_plain_string(self) -> None:
        """A Secret is not equal to its plain string (no accidental comparisons)."""
        assert Secret(VALUE) != VALUE


class TestRedactorValues:
    def test_added_value_is_scrubbed(self) -> None:
        """A value added to the Redactor is replaced in text."""
        redactor = Redactor()
        redactor.add(VALUE)
        assert redactor.scrub(f"token is {VALUE}") == f"token is {REDACTED}"

    def test_secret_values_are_accepted(self) -> None:
        """Secrets given to the constructor or add() are scrubbed by their value."""
        redactor = Redactor([Secret(VALUE)])
        redactor.add(Secret("another-secret-value"))
        scrubbed = redactor.scrub(f"{VALUE} and another-secret-value")
        assert VALUE not in scrubbed
        assert "another-secret-value" not in scrubbed

    def test_value_inside_longer_text(self) -> None:
        """A value embedded in a longer word or URL is scrubbed."""
        redactor = Redactor([VALUE])
        scrubbed = redactor.scrub(f"https://x.test/p/{VALUE}xyz?q=1")
        assert VALUE not in scrubbed
        assert scrubbed == f"https://x.test/p/{REDACTED}xyz?q=1"

    def test_every_occurrence_is_scrubbed(self) -> None:
        """Each repetition of a value is replaced."""
        scrubbed = Redactor([VALUE]).scrub(f"{VALUE}-{VALUE} {VALUE}")
        assert VALUE not in scrubbed
        assert scrubbed.count(REDACTED) == 3

    def test_longest_first(self) -> None:
        """A secret that contains another is removed whole, leaving no tail of it."""
        short = "abcdefgh12"
        long = short + "LONGTAIL99"
        redactor = Redactor([short, long])
        assert redactor.scrub(f"x {long} y") == f"x {REDACTED} y"

    def test_value_added_later_is_scrubbed(self) -> None:
        """Values added after a first scrub are scrubbed from then on."""
        redactor = Redactor(["first-secret-value"])
        assert redactor.scrub(VALUE) == VALUE
        redactor.add(VALUE)
        assert redactor.scrub(VALUE) == REDACTED

    def test_regex_metacharacters_are_literal(self) -> None:
        """A value with regex metacharacters is matched literally."""
        value = "a+b*c?(d)[e]|f.$"
        redactor = Redactor([value])
        assert redactor.scrub(f"<{value}>") == f"<{REDACTED}>"
        assert redactor.scrub("aaab") == "aaab"

    @pytest.mark.parametrize("value", ["abc", "1234", "short7!"])
    def test_short_values_are_not_scrubbed(self, value: str) -> None:
        """Values too short to be secrets are ignored (they would match ordinary words)."""
        redactor = Redactor([value])
        assert redactor.scrub(f"plain {value} text") == f"plain {value} text"

    def test_none_and_empty_are_ignored(self) -> None:
        """Adding None or an empty value changes nothing."""
        redactor = Redactor()
        redactor.add(None)
        redactor.add("")
        redactor.add(Secret(""))
        assert redactor.scrub("nothing to hide here") == "nothing to hide here"

    def test_text_without_secrets_is_unchanged(self) -> None:
        """Ordinary text passes through untouched."""
        text = 'GET /api/v2/people?page=2 200 {"data": []}'
        assert Redactor([VALUE]).scrub(text) == text


class TestRedactorShapes:
    @pytest.mark.parametrize(
        "text",
        [
            "Authorization: Bearer abc.DEF-123_xyz~+/=",
            "authorization: bearer abc.DEF-123_xyz",
            "BEARER abc.DEF-123_xyz",
        ],
    )
    def test_bearer_token(self, text: str) -> None:
        """Anything after 'Bearer' is scrubbed, whatever the case."""
        scrubbed = Redactor().scrub(text)
        assert "abc.DEF-123_xyz" not in scrubbed
        assert REDACTED in scrubbed

    def test_form_body_fields(self) -> None:
        """refresh_token=..., client_secret=... and code_verifier=... values are scrubbed."""
        body = (
            "grant_type=refresh_token&refresh_token=rt-value-1&client_id=app"
            "&client_secret=cs-value-2&code_verifier=cv-value-3"
        )
        scrubbed = Redactor().scrub(body)
        for value in ("rt-value-1", "cs-value-2", "cv-value-3"):
            assert value not in scrubbed
        assert "grant_type=refresh_token" in scrubbed
        assert "client_id=app" in scrubbed

    def test_json_token_fields(self) -> None:
        """JSON "access_token": "..." and "refresh_token": "..." values are scrubbed."""
        body = (
            '{"access_token": "at-value-1", "refresh_token":"rt-value-2", '
            '"expires_in": 7200, "token_type": "bearer"}'
        )
        scrubbed = Redactor().scrub(body)
        assert "at-value-1" not in scrubbed
        assert "rt-value-2" not in scrubbed
        assert '"expires_in": 7200' in scrubbed

    def test_callback_query_code_and_state(self) -> None:
        """?code=...&state=... values in a callback URL are scrubbed."""
        url = "/connect/callback?code=code-value-1&state=state-value-2&x=1"
        scrubbed = Redactor().scrub(url)
        assert "code-value-1" not in scrubbed
        assert "state-value-2" not in scrubbed
        assert scrubbed.endswith("&x=1")
        assert scrubbed.startswith("/connect/callback?code=")

    def test_access_token_query_parameter(self) -> None:
        """An access_token query parameter is scrubbed."""
        scrubbed = Redactor().scrub("/api/v2/people?access_token=at-value-1&page=2")
        assert "at-value-1" not in scrubbed
        assert "page=2" in scrubbed

    def test_values_and_shapes_together(self) -> None:
        """Known values and token shapes are both scrubbed from one text."""
        redactor = Redactor([VALUE])
        text = f"failed for {VALUE}: Bearer xyz987654 refresh_token=rt-123456"
        scrubbed = redactor.scrub(text)
        for value in (VALUE, "xyz987654", "rt-123456"):
            assert value not in scrubbed


class TestSlots:
    def test_rotated_values_in_a_slot_are_scrubbed_up_to_the_history(self) -> None:
        """A slot remembers its last few values; older rotations are forgotten (bounded memory)."""
        from nbgateway.redact import SLOT_HISTORY

        redactor = Redactor()
        values = [f"nbfake-at-rotation-{i:04d}-abcdefgh" for i in range(SLOT_HISTORY + 2)]
        for value in values:
            redactor.add(Secret(value), slot="acme/access_token")
        for value in values[-SLOT_HISTORY:]:
            assert value not in redactor.scrub(f"token {value} here")
        assert values[0] in redactor.scrub(f"token {values[0]} here")

    def test_a_value_in_two_slots_stays_until_both_forget_it(self) -> None:
        """A value remembered by two slots (an imported pair seen by two accounts, say) is
        scrubbed while either slot still holds it, and forgotten once neither does."""
        from nbgateway.redact import SLOT_HISTORY

        redactor = Redactor()
        shared = "nbfake-shared-0123456789abcdef"
        redactor.add(Secret(shared), slot="acme/access_token")
        redactor.add(Secret(shared), slot="other/access_token")
        for i in range(SLOT_HISTORY):
            redactor.add(Secret(f"nbfake-acme-rotation-{i:04d}-abcdefgh"), slot="acme/access_token")
        assert shared not in redactor.scrub(f"token {shared} here")  # other still holds it
        for i in range(SLOT_HISTORY):
            redactor.add(Secret(f"nbfake-other-rotation-{i:04d}-abcd"), slot="other/access_token")
        assert shared in redactor.scrub(f"token {shared} here")
        for i in range(SLOT_HISTORY):  # the later values of both slots are all still known
            for name in (
                f"nbfake-acme-rotation-{i:04d}-abcdefgh",
                f"nbfake-other-rotation-{i:04d}-abcd",
            ):
                assert name not in redactor.scrub(f"token {name} here")

    def test_slot_values_are_found_inside_punctuation(self) -> None:
        """A slot value is scrubbed in JSON, headers, URLs and at a sentence's end."""
        redactor = Redactor()
        value = "nbfake-rt-AbCdEf0123456789_xyz"
        redactor.add(Secret(value), slot="acme/refresh_token")
        for text in (
            f'{{"x": "{value}"}}',
            f"Authorization: Bearer {value}",
            f"/cb?x={value}&y=1",
            f"it was {value}.",
        ):
            assert value not in redactor.scrub(text)

    @pytest.mark.parametrize(
        "template",
        ["/api/v2/{v}/x", "/n/acme/api/{v}", "{v}/tail", "/a/{v}./b", "see /x/{v}/y and {v}"],
    )
    def test_slot_values_between_slashes_are_scrubbed(self, template: str) -> None:
        """A token that is one segment of a path (a word only without its slashes) is
        scrubbed; the rest of the path stays."""
        redactor = Redactor()
        value = "nbfake-at-0123456789abcdef"
        redactor.add(Secret(value), slot="acme/access_token")
        scrubbed = redactor.scrub(template.format(v=value))
        assert value not in scrubbed
        assert scrubbed == template.format(v=REDACTED)


class TestShapePrefilter:
    @pytest.mark.parametrize(
        "hint", [hint for hints in redact._SHAPE_HINTS for hint in hints], ids=str
    )
    def test_every_shape_hint_passes_the_quick_test(self, hint: str) -> None:
        """The quick "may hold a shape" test lets through every hint a shape pattern needs,
        so skipping the patterns when it says no never skips a secret."""
        assert redact._may_hold_a_shape(f"x {hint} y")
        if hint == "bearer":
            texts = ["Authorization: Bearer value-0001"]
        elif hint == "nbgw_":
            texts = ["key nbgw_value-0001-abcdefghij"]
        elif hint.endswith("="):
            texts = [f"/cb?{hint}value-0001"]
        else:
            texts = [f"{hint}=value-0001", f'{{"{hint.upper()}": "value-0001"}}']
        for text in texts:
            assert "value-0001" not in Redactor().scrub(text), text

    def test_text_without_hints_is_left_alone(self) -> None:
        """Ordinary text passes the quick test as false and comes back unchanged."""
        text = "GET /api/v2/signups/me 200 peer=127.0.0.1"
        assert not redact._may_hold_a_shape(text.lower())
        assert Redactor().scrub(text) == text
