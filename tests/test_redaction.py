"""Secrets never reach a log line: DSNs and URLs are shown with their passwords masked,
wherever in the URL the password sits."""

from __future__ import annotations

import json

import pytest

from flows.settings import Settings, redact_url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://app:hunter2@db:5432/vectors", "postgresql://app:***@db:5432/vectors"),
        # An '@' inside the password: the host starts after the last '@' of the authority.
        ("postgresql://app:p@ss@w0rd@db:5432/vectors", "postgresql://app:***@db:5432/vectors"),
        ("postgresql://app:a/b@c@db/vectors", "postgresql://app:***@db/vectors"),
        # The password as a query parameter (libpq takes any connection keyword there).
        (
            "postgresql://db/vectors?user=app&password=hunter2&sslmode=require",
            "postgresql://db/vectors?user=app&password=***&sslmode=require",
        ),
        ("postgresql://app@db/vectors?sslpassword=hunter2", "postgresql://app@db/vectors?sslpassword=***"),
        ("postgresql://db/vectors?Password=hunter2#x", "postgresql://db/vectors?Password=***#x"),
        # Nothing secret: unchanged.
        (
            "postgresql://app@db/vectors?application_name=a@b",
            "postgresql://app@db/vectors?application_name=a@b",
        ),
        ("lancedb:/data/vectors", "lancedb:/data/vectors"),
        ("postgresql://db/vectors", "postgresql://db/vectors"),
    ],
)
def test_passwords_in_urls_are_masked(url, shown):
    assert redact_url(url) == shown
    assert "hunter2" not in redact_url(url) and "w0rd" not in redact_url(url)


def test_settings_shown_mask_every_secret_url():
    s = Settings.from_env(
        {
            "EMBEDSTREAM_STORE": "postgresql://app:p@ss@w0rd@db/vectors?password=hunter2",
            "EMBEDSTREAM_SCHEMA_REGISTRY_URL": "https://key:s3cr@t@registry:8081/?token=hunter2",
        }
    )
    for shown in (s.redacted(), s.sink_view()):
        text = json.dumps(shown)
        assert "w0rd" not in text and "hunter2" not in text and "t@registry" not in text, text
    assert s.redacted()["schema_registry_url"] == "https://***@registry:8081/?token=***"
