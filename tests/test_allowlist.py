"""``--allow-uri`` prefixes: which object-store and web URIs the flow may fetch. A prefix
matches whole path segments, scheme and authority exactly; paths must match as written
and percent-decoded; dot segments and credentials in URIs are refused."""

from __future__ import annotations

import pytest

from flows.allowlist import UriAllowlist, redact
from flows.cli import build_parser
from flows.fetch import FetchError
from flows.settings import Settings


def refusal(allowlist: UriAllowlist, uri: str) -> str:
    with pytest.raises(FetchError) as e:
        allowlist.check(uri)
    assert e.value.reason == "uri_not_allowed"
    assert not allowlist.allows(uri)
    return e.value.message


def test_a_bucket_prefix_matches_the_bucket_never_a_longer_name():
    for prefix in ("s3://docs", "s3://docs/"):
        allow = UriAllowlist([prefix])
        assert allow.allows("s3://docs/report.pdf")
        assert allow.allows("s3://docs/a/b/c.txt")
        assert allow.allows("s3://docs")
        assert "under no allowed URI prefix" in refusal(allow, "s3://docs-private/report.pdf")
        refusal(allow, "s3://doc/report.pdf")
        refusal(allow, "s3://Docs/report.pdf")  # legacy buckets are case-sensitive
        refusal(allow, "gs://docs/report.pdf")  # the scheme is part of the match


def test_a_path_prefix_matches_whole_segments():
    allow = UriAllowlist(["gs://bucket/reports/2024", "az://container/team/"])
    assert allow.allows("gs://bucket/reports/2024")
    assert allow.allows("gs://bucket/reports/2024/q1.pdf")
    refusal(allow, "gs://bucket/reports/2024-old/q1.pdf")
    refusal(allow, "gs://bucket/reports/202")
    refusal(allow, "gs://bucket/reports")
    assert allow.allows("az://container/team/notes.md")
    refusal(allow, "az://container/teamwork/notes.md")


def test_object_keys_keep_spaces_plus_question_marks_and_hashes():
    allow = UriAllowlist(["s3://b/my docs/"])
    assert allow.allows("s3://b/my docs/a+b c?.pdf")
    assert allow.allows("s3://b/my docs/naïve #1.pdf")
    refusal(allow, "s3://b/my docs#x")  # one segment, "my docs#x": not the prefix's


def test_abfs_names_container_and_account():
    allow = UriAllowlist(["abfss://docs@account.dfs.core.windows.net/"])
    assert allow.allows("abfss://docs@account.dfs.core.windows.net/x/y.pdf")
    refusal(allow, "abfss://docs-private@account.dfs.core.windows.net/x.pdf")
    refusal(allow, "abfs://docs@account.dfs.core.windows.net/x.pdf")


def test_web_hosts_compare_without_case_trailing_dot_or_default_port():
    allow = UriAllowlist(["https://Wiki.Example.com/export/"])
    assert allow.allows("https://wiki.example.com/export/page.html")
    assert allow.allows("https://WIKI.example.com.:443/export/page.html?version=3")
    refusal(allow, "https://wiki.example.com:8443/export/page.html")
    refusal(allow, "https://wiki.example.com/exporter/page.html")
    refusal(allow, "https://wiki.example.com/exporter?/export/")
    refusal(allow, "https://wiki.example.com.evil.test/export/page.html")
    # Plain http only where a prefix says http.
    refusal(allow, "http://wiki.example.com/export/page.html")
    assert UriAllowlist(["http://127.0.0.1:8080/"]).allows("http://127.0.0.1:8080/doc")
    assert UriAllowlist(["http://[::1]:8080/"]).allows("http://[0:0::1]:8080/doc")


def test_percent_escapes_must_match_as_written_and_decoded():
    allow = UriAllowlist(["s3://b/public/"])
    # A reader that does not decode would take "%70ublic" for another key.
    refusal(allow, "s3://b/%70ublic/x.pdf")
    refusal(allow, "s3://b/public%2Fx.pdf")
    assert UriAllowlist(["s3://b/my%20docs/"]).allows("s3://b/my%20docs/x.pdf")


@pytest.mark.parametrize(
    "uri",
    [
        "s3://docs/public/../secret.pdf",
        "s3://docs/public/%2e%2E/secret.pdf",
        "s3://docs/public/..%2Fsecret.pdf",
        "https://wiki.example.com/export/..%5Cadmin",
        "https://wiki.example.com/export/..\\admin",
        "https://wiki.example.com/export/./page",
    ],
)
def test_dot_segments_are_refused_before_matching(uri):
    allow = UriAllowlist(["s3://docs/", "https://wiki.example.com/"])
    assert "'.' and '..'" in refusal(allow, uri)


def test_credentials_in_a_uri_are_refused_and_never_repeated():
    allow = UriAllowlist(["https://wiki.example.com/"])
    message = refusal(allow, "https://reader:s3cr3t@wiki.example.com/page")
    assert "s3cr3t" not in message and "credentials" in message
    assert redact("https://reader:s3cr3t@wiki.example.com/page") == "https://wiki.example.com/page"
    refusal(allow, "https://wiki.example.com@evil.test/page")


def test_file_uris_are_for_allow_root():
    allow = UriAllowlist(["s3://docs/"])
    assert "--allow-root" in refusal(allow, "file:///etc/passwd")
    with pytest.raises(ValueError, match="--allow-root"):
        UriAllowlist(["file:///srv/docs"])


def test_an_empty_allowlist_allows_nothing_and_says_how_to_allow():
    allow = UriAllowlist([])
    assert not allow
    assert "EMBEDSTREAM_ALLOWED_URIS" in refusal(allow, "s3://docs/x")


@pytest.mark.parametrize(
    ("prefix", "said"),
    [
        ("docs-bucket", "not a URI"),
        ("ftp://files.example.com/", "not a scheme the flow fetches"),
        ("s3://", "names no bucket"),
        ("s3://docs:9000/", "no ':'"),
        ("https://user:pw@wiki.example.com/", "credentials"),
        ("https://wiki.example.com/export?page=1", "no query"),
        ("https://wiki.example.com/export/../admin", "'..'"),
        ("https:///export/", "names no host"),
    ],
)
def test_a_bad_prefix_is_refused_naming_it(prefix, said):
    with pytest.raises(ValueError, match=said) as e:
        UriAllowlist(["s3://fine/", prefix])
    assert repr(prefix) in str(e.value)


def test_names_host_is_literal_and_web_only():
    allow = UriAllowlist(["http://127.0.0.1:8080/", "https://[fd00::7]/x/", "https://wiki.example.com/"])
    assert allow.names_host("127.0.0.1")
    assert allow.names_host("fd00:0::7")
    assert allow.names_host("http://[fd00::7]:9999/elsewhere")
    assert allow.names_host("WIKI.example.com")
    assert not allow.names_host("127.0.0.2")
    assert not allow.names_host("localhost")
    assert not UriAllowlist(["s3://docs/"]).names_host("docs")


def test_the_setting_is_comma_separated_and_validated():
    env = {"EMBEDSTREAM_ALLOWED_URIS": "s3://docs-bucket/, https://wiki.example.com:8443/export/,"}
    settings = Settings.from_env(env)
    assert settings.allowed_uris == ("s3://docs-bucket/", "https://wiki.example.com:8443/export/")
    assert UriAllowlist(settings.allowed_uris).allows("https://wiki.example.com:8443/export/a")
    with pytest.raises(ValueError, match="'ftp://x/'"):
        Settings.from_env({"EMBEDSTREAM_ALLOWED_URIS": "s3://docs/,ftp://x/"})


def test_the_run_flag_repeats():
    args = build_parser().parse_args(["run", "--allow-uri", "s3://a/", "--allow-uri", "https://h/x/"])
    assert args.allow_uri == ["s3://a/", "https://h/x/"]
    settings = Settings.from_env({}, allowed_uris=tuple(args.allow_uri))
    assert UriAllowlist(settings.allowed_uris).allows("s3://a/k")


def test_host_names_compare_in_their_dns_spelling():
    allow = UriAllowlist(["https://bücher.example/"])
    assert allow.allows("https://xn--bcher-kva.example/katalog.pdf")
    assert allow.allows("https://BÜCHER.example/katalog.pdf")
    assert allow.names_host("xn--bcher-kva.example")
    for uri in ("https://bücher.example%00.evil.test/", "https://bü cher.example/"):
        assert "is not a host name" in refusal(allow, uri)


def test_a_malformed_web_uri_is_refused_not_an_internal_error():
    """urlsplit raises a bare ValueError on a broken IPv6 host: it must become the
    event's uri_not_allowed dead letter, not an internal error with a stack trace."""
    allow = UriAllowlist(["https://wiki.example.com/"])
    with pytest.raises(FetchError) as e:
        allow.check("https://[::1/x")
    assert e.value.reason == "uri_not_allowed"
