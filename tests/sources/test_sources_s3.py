"""S3Source against ``rclone serve s3`` (SigV4 auth): the right bytes with the right keys, typed
errors naming the object with wrong keys or a missing bucket or key, listings, the ETag pin."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import shutil
import time

import pytest
from conftest import BLOB_NAME, BUCKET, H5_NAME

from multitables._sources import open_source
from multitables._sources.base import Source
from multitables._sources.s3 import S3Source, list_prefix
from multitables.errors import ObjectChangedError


def test_reads_equal_the_bytes(rclone, blob):
    with open_source(f"s3://{BUCKET}/{BLOB_NAME}", rclone.options()) as src:
        assert isinstance(src, S3Source) and src.size == len(blob) and src.etag
        assert src.read(0, 1) == blob[:1]
        assert src.read(123_456, 500_000) == blob[123_456:623_456]
        clone = pickle.loads(pickle.dumps(src))  # settings travel resolved: no request
        assert clone.read(len(blob) - 10, 10) == blob[-10:]
        assert src.stats.requests == 3 and clone.stats.requests == 1
        clone.close()


def test_credentials_from_the_environment(rclone, monkeypatch, blob):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rclone.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rclone.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", rclone.endpoint)
    with open_source(f"s3://{BUCKET}/{BLOB_NAME}") as src:
        assert src.read(5, 5) == blob[5:10]


@pytest.mark.parametrize(("change", "match"), [
    ({"secret": "not-the-secret"}, "HTTP 403, SignatureDoesNotMatch"),
    ({"key": "NOSUCHKEY"}, "HTTP 403, InvalidAccessKeyId"),
])
def test_wrong_keys(rclone, change, match):
    options = rclone.options(**change, retries=3)
    with pytest.raises(PermissionError, match=match) as e:
        open_source(f"s3://{BUCKET}/{BLOB_NAME}", options)
    assert e.value.filename == f"s3://{BUCKET}/{BLOB_NAME}"
    for text in (str(e.value), repr(e.value)):
        assert rclone.secret_key not in text and "not-the-secret" not in text
        assert "Signature=" not in text and rclone.access_key not in text


def test_no_credentials_says_how(rclone):
    with pytest.raises(PermissionError, match="no AWS credentials were found"):
        open_source(f"s3://{BUCKET}/{BLOB_NAME}", {"endpoint_url": rclone.endpoint})


@pytest.mark.parametrize(("location", "match"), [
    ("s3://nobucket/a.h5", "NoSuchBucket"),
    (f"s3://{BUCKET}/no/such/key.h5", "NoSuchKey"),
])
def test_missing_bucket_or_key(rclone, location, match):
    with pytest.raises(FileNotFoundError, match=match) as e:
        open_source(location, rclone.options(retries=3))
    assert e.value.filename == location


def test_list_prefix(rclone, blob):
    listed = dict((k, (size, etag)) for k, size, etag in
                  list_prefix(BUCKET, "", rclone.options()))
    assert listed[BLOB_NAME][0] == len(blob) and H5_NAME in listed
    assert [k for k, _, _ in list_prefix(BUCKET, "blob", rclone.options())] == [BLOB_NAME]
    assert list_prefix(BUCKET, "nothing-here/", rclone.options()) == []
    with pytest.raises(FileNotFoundError, match="NoSuchBucket"):
        list_prefix("nobucket", "", rclone.options())


def test_list_prefix_pages(rclone):
    d = rclone.root / BUCKET / "many"
    d.mkdir()
    try:
        for i in range(1005):  # more than one page of 1000
            (d / f"{i:04d}").write_bytes(b"x")
        keys = [k for k, _, _ in list_prefix(BUCKET, "many/", rclone.options())]
        assert keys == [f"many/{i:04d}" for i in range(1005)]
        with pytest.raises(ValueError, match="more than 1000 objects"):
            list_prefix(BUCKET, "many/", rclone.options(), max_keys=1000)
    finally:
        shutil.rmtree(d)


def test_replaced_object_raises(rclone, blob):
    path = rclone.root / BUCKET / "replaced.bin"
    path.write_bytes(blob[:100_000])
    try:
        with open_source(f"s3://{BUCKET}/replaced.bin", rclone.options()) as src:
            assert src.read(0, 10) == blob[:10]
            path.write_bytes(blob[100_000:200_000])
            with pytest.raises(ObjectChangedError, match=r"s3://bkt/replaced\.bin was replaced"):
                src.read(0, 10)
    finally:
        path.unlink()


def test_a_spawned_process_reads_the_pinned_object(rclone, blob):
    with open_source(f"s3://{BUCKET}/{BLOB_NAME}", rclone.options()) as src:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            # A bounded wait: a pool whose workers fail to start waits for ever.
            got = pool.apply_async(Source.read, (src, 1000, 100)).get(timeout=30)
            assert got == blob[1000:1100]
            pool.close()
            pool.join()


def test_addressing():
    from multitables._sources.base import SourceStats
    from multitables._sources.options import StorageOptions, resolve_s3
    from multitables._sources.s3 import S3Client
    aws = S3Client(resolve_s3(StorageOptions(region="eu-west-1", anon=True)), StorageOptions(),
                   SourceStats())
    assert aws.url("bkt", "a b/c+d.h5") == "https://bkt.s3.eu-west-1.amazonaws.com/a%20b/c%2Bd.h5"
    assert aws.url("my.bkt", "k") == "https://s3.eu-west-1.amazonaws.com/my.bkt/k"
    assert aws.url("bkt", "", {"prefix": "a/b c", "list-type": "2"}) == \
        "https://bkt.s3.eu-west-1.amazonaws.com/?list-type=2&prefix=a%2Fb%20c"
    custom = S3Client(resolve_s3(StorageOptions(endpoint_url="http://127.0.0.1:9/s3/",
                                                anon=True)), StorageOptions(), SourceStats())
    assert custom.url("bkt", "k.h5") == "http://127.0.0.1:9/s3/bkt/k.h5"
    assert custom.sign("GET", "http://127.0.0.1:9/s3/bkt/k.h5", {"Range": "bytes=0-0"}) == \
        {"Range": "bytes=0-0"}  # anonymous: unsigned


def _expiring(rclone, key: str, secret: str, in_s: float):
    from multitables._sources.options import S3Settings
    return S3Settings(rclone.endpoint, "us-east-1", True, key, secret, "a-session-token",
                      time.time() + in_s)


def test_credentials_about_to_expire_are_resolved_again_before_signing(rclone, blob,
                                                                      monkeypatch):
    # Settings whose (temporary) keys expire within the margin: the signer resolves the
    # environment's credentials again first. Here the old keys are wrong, so only a refresh
    # can read; a source pickled to another process refreshes there too.
    from multitables._sources import s3

    resolved = []

    def resolve(options):
        resolved.append(options)
        return _expiring(rclone, rclone.access_key, rclone.secret_key, 3600)

    monkeypatch.setattr(s3, "resolve_s3", resolve)
    options = {"endpoint_url": rclone.endpoint}
    src = S3Source(f"s3://{BUCKET}/{BLOB_NAME}", options,
                   settings=_expiring(rclone, "OLDKEY", "old-secret", 60))
    with src:
        assert src.read(10, 100) == blob[10:110] and len(resolved) == 1
        assert src.read(1000, 10) == blob[1000:1010] and len(resolved) == 1  # fresh now


def test_refused_credentials_of_the_environment_are_resolved_again_once(rclone, blob,
                                                                         monkeypatch):
    """Keys from the environment with no known expiry (a token that expired early, keys rotated
    in a credentials file): the first request refused resolves them again and is sent again
    with the new ones. Refused again, or keys the caller gave, it raises at once."""
    from multitables._sources import s3

    resolved = []

    def resolve(options):
        resolved.append(options)
        return _expiring(rclone, rclone.access_key, rclone.secret_key, 3600)

    monkeypatch.setattr(s3, "resolve_s3", resolve)
    url = f"s3://{BUCKET}/{BLOB_NAME}"
    stale = _expiring(rclone, "ROTATEDKEY", "rotated-secret", 3600)
    with S3Source(url, {"endpoint_url": rclone.endpoint}, settings=stale) as src:
        assert src.read(10, 100) == blob[10:110] and len(resolved) == 1
        assert src.read(1000, 10) == blob[1000:1010] and len(resolved) == 1

    def resolve_stale(options):
        resolved.append(options)
        return stale

    monkeypatch.setattr(s3, "resolve_s3", resolve_stale)
    with pytest.raises(PermissionError, match="Access denied"):
        S3Source(url, {"endpoint_url": rclone.endpoint}, settings=stale).read(0, 10)
    assert len(resolved) == 2  # resolved once: the same keys, refused again
    given = {"endpoint_url": rclone.endpoint, "key": "ROTATEDKEY", "secret": "rotated-secret"}
    with pytest.raises(PermissionError, match="Access denied"):
        S3Source(url, given, settings=stale).read(0, 10)
    assert len(resolved) == 2  # the caller's keys: not resolved again


def test_credentials_that_do_not_expire_are_never_resolved_again(rclone, blob, monkeypatch):
    from multitables._sources import s3

    def resolve(options):
        raise AssertionError("resolved again")

    with open_source(f"s3://{BUCKET}/{BLOB_NAME}", rclone.options()) as src:
        monkeypatch.setattr(s3, "resolve_s3", resolve)  # after the open's own
        assert src.settings.expires is None
        assert src.read(0, 10) == blob[:10]


CREDENTIAL_PROCESS = """\
import datetime, json, os, sys
with open(sys.argv[1], "a") as log:
    log.write(f"{os.getppid()}\\n")
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
print(json.dumps({"Version": 1, "AccessKeyId": sys.argv[2], "SecretAccessKey": sys.argv[3],
                  "Expiration": expires.isoformat()}))
"""


def test_workers_resolve_expiring_credentials_of_the_environment_again(rclone, tmp_path,
                                                                        monkeypatch):
    # A profile's credential_process gives keys that expire in 5 minutes (inside the margin):
    # the workers resolve them again themselves (the process runs with a worker as parent).
    import sys

    import numpy as np

    import multitables

    script, calls = tmp_path / "creds.py", tmp_path / "calls.txt"
    script.write_text(CREDENTIAL_PROCESS)
    (tmp_path / "aws-config").write_text(
        f"[default]\ncredential_process = {sys.executable} {script} {calls} "
        f"{rclone.access_key} {rclone.secret_key}\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    url = f"s3://{BUCKET}/{H5_NAME}"
    with multitables.Streamer(url, storage_options={"endpoint_url": rclone.endpoint}) as s:
        rows = np.array(list(s.get_generator("contig", n_procs=2, ordered=True)))
    assert len(rows)
    parents = {int(line) for line in calls.read_text().split()}
    assert parents - {os.getpid()}, parents  # some worker ran the process
