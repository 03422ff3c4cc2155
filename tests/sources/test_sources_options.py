"""Locations and storage_options: parsing, checks, defaults from the AWS environment, pickling,
and no secret in any repr, str or error."""

from __future__ import annotations

import pickle

import pytest

from multitables._sources.options import (
    S3Settings,
    StorageOptions,
    parse_location,
    redact_url,
    resolve_s3,
    storage_options,
)

SECRET = "wJalrXUtnFEMI-very-secret"
TOKEN = "FwoGZXIvYXdzEJr-session-token"


def test_locations():
    assert parse_location("data/a.h5").scheme == "file"
    assert parse_location("file:///data/a.h5").path == "/data/a.h5"
    s3 = parse_location("s3://bkt/dir/a b.h5")
    assert (s3.scheme, s3.bucket, s3.key) == ("s3", "bkt", "dir/a b.h5")
    http = parse_location("https://user:p%40ss@host:8443/a.h5?sig=abc")
    assert http.basic_auth == "user:p@ss"
    assert http.url == "https://host:8443/a.h5?sig=abc"  # what is requested keeps the query
    assert http.display == "https://host:8443/a.h5?<redacted>"
    assert "p@ss" not in repr(http) and "sig=abc" not in repr(http)


@pytest.mark.parametrize(("location", "match"), [
    ("s3://", "names no bucket"),
    ("ftp://host/a.h5", "unsupported location scheme 'ftp'"),
    ("http:///a.h5", "names no host"),
])
def test_bad_locations(location, match):
    with pytest.raises(ValueError, match=match):
        parse_location(location)


def test_redact_url_keeps_no_credentials():
    shown = redact_url(f"https://AKIA:{SECRET}@h/k?X-Amz-Signature={SECRET}&X-Amz-Credential=x")
    assert SECRET not in shown and "AKIA" not in shown
    assert shown == "https://h/k?<redacted>"


def test_unknown_key_is_named():
    with pytest.raises(TypeError, match="unexpected key 'aws_secret_access_key'"):
        storage_options({"aws_secret_access_key": SECRET})


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"timeout": 0}, ValueError, r"'timeout'\] must be > 0"),
    ({"timeout": "5"}, TypeError, r"'timeout'\] must be a number"),
    ({"retries": -1}, ValueError, r"'retries'\] must be >= 0"),
    ({"retries": 1.5}, TypeError, r"'retries'\] must be an int"),
    ({"anon": "yes"}, TypeError, r"'anon'\] must be a bool"),
    ({"headers": {"X": 1}}, TypeError, "dict of str to str"),
    ({"secret": 5}, TypeError, r"'secret'\] must be a str"),
    ({"endpoint_url": "localhost:9000"}, ValueError, "must start with http"),
])
def test_bad_values(options, error, match):
    with pytest.raises(error, match=match):
        storage_options(options)


def test_options_pickle_and_hide_secrets():
    opts = storage_options({"key": "AKIAEXAMPLE", "secret": SECRET, "token": TOKEN,
                            "headers": {"Authorization": f"Bearer {TOKEN}"}, "timeout": 3})
    assert pickle.loads(pickle.dumps(opts)) == opts
    for text in (repr(opts), str(opts)):
        assert SECRET not in text and TOKEN not in text and "AKIAEXAMPLE" not in text
    assert "secret=<set>" in repr(opts) and "headers=<Authorization>" in repr(opts)


def test_explicit_options_win(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ENVSECRET")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    s = resolve_s3(storage_options({"key": "K", "secret": SECRET, "region": "ap-south-1",
                                    "endpoint_url": "http://127.0.0.1:9/"}))
    assert (s.access_key, s.secret_key, s.session_token) == ("K", SECRET, None)
    assert (s.region, s.endpoint_url, s.path_style) == ("ap-south-1", "http://127.0.0.1:9", True)
    assert SECRET not in repr(s) and SECRET not in str(s) and "credentials=<set>" in repr(s)
    assert pickle.loads(pickle.dumps(s)) == s


def test_environment_defaults(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-central-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    s = resolve_s3(StorageOptions())
    assert (s.access_key, s.secret_key, s.session_token) == ("ENVKEY", SECRET, TOKEN)
    assert (s.region, s.endpoint_url) == ("eu-central-1", "http://127.0.0.1:2")
    monkeypatch.setenv("AWS_REGION", "us-west-2")  # boto3 prefers it to AWS_DEFAULT_REGION
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    s = resolve_s3(StorageOptions())
    assert (s.region, s.endpoint_url) == ("us-west-2", "http://127.0.0.1:1")


def test_config_files(monkeypatch, tmp_path):
    (tmp_path / "aws-credentials").write_text(
        f"[default]\naws_access_key_id = FILEKEY\naws_secret_access_key = {SECRET}\n"
        "[other]\naws_access_key_id = OTHERKEY\naws_secret_access_key = x\n")
    (tmp_path / "aws-config").write_text(
        "[default]\nregion = sa-east-1\nendpoint_url = http://127.0.0.1:3\n"
        "[profile other]\nregion = af-south-1\n")
    s = resolve_s3(StorageOptions())
    assert (s.access_key, s.secret_key) == ("FILEKEY", SECRET)
    assert (s.region, s.endpoint_url, s.path_style) == ("sa-east-1", "http://127.0.0.1:3", True)
    monkeypatch.setenv("AWS_PROFILE", "other")
    s = resolve_s3(StorageOptions())
    assert (s.access_key, s.region) == ("OTHERKEY", "af-south-1")
    assert (s.endpoint_url, s.path_style) == ("https://s3.af-south-1.amazonaws.com", False)


def test_anonymous_and_half_keys(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    assert not resolve_s3(storage_options({"anon": True})).signed
    with pytest.raises(ValueError, match="only one of 'key' and 'secret'") as e:
        resolve_s3(storage_options({"key": "K"}))
    assert SECRET not in str(e.value)
    assert isinstance(resolve_s3(StorageOptions()), S3Settings)


def test_an_s3_url_without_the_remote_extra_says_which_extra(monkeypatch):
    """Without botocore an s3:// URL failed deep in an import; it names the extra to install."""
    import importlib.util

    import multitables._sources as sources

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "botocore" else real(name, *a))
    with pytest.raises(ImportError, match=r"reading s3://bkt/a\.h5 needs botocore: "
                                          r"pip install 'multitables\[remote\]'"):
        sources.open_source("s3://bkt/a.h5")
