"""What a download takes from a server's word (issue 16, points 7, 8, 9), against a real 127.0.0.1 server."""

from __future__ import annotations

import json
import logging
import os
import time
from email.utils import formatdate
from pathlib import Path

import pytest

from atlasflow.acquire.http import FetchError, HttpPolicy, TransientFetchError, download, retry_after_s
from atlasflow.core.config import DownloadConfig
from atlasflow.core.redact import redact_text, redact_url

SIZE = 300_000
FAST = {"attempts": 4, "backoff_s": 0.01, "timeout_s": 10}
TOKEN = "X-Amz-Signature=SECRETSIG123&X-Amz-Credential=AKIASECRET"


# ---- 7. Retry-After --------------------------------------------------------------------------------------------


NOW = 1_700_000_000.0


@pytest.mark.parametrize(("value", "expected"), [
    ("5", 5.0), ("0", 1.0), ("0.2", 1.0), (" 7 ", 7.0), ("1e12", 300.0), ("99999999999999999999", 300.0),
    ("-1", None), ("nan", None), ("NaN", None), ("inf", None), ("-inf", None), ("", None), ("soon", None),
    ("5 seconds", None), ("\x00", None), (None, None),
    (formatdate(NOW + 42, usegmt=True), 42.0),  # an HTTP date: the wait until then
    (formatdate(NOW - 3600, usegmt=True), 1.0),  # already past: retry now (after the 1 s floor)
    (formatdate(NOW + 10**7, usegmt=True), 300.0),
    ("Fri, 99 Foo 2024 25:61:61 GMT", None),
])
def test_retry_after_is_clamped_and_bad_values_mean_backoff(value, expected):
    assert retry_after_s(value, max_s=300.0, now=NOW) == expected


@pytest.mark.parametrize("value", ["-1", "nan", "garbage", "1e12"])
def test_a_hostile_retry_after_neither_raises_nor_stalls(served, value):
    """-1 and nan raised ValueError from time.sleep past the quarantine path; 1e12 slept for ever."""
    server, data, dest = served
    server.faults["/files/data.h5ad"] = {"fail": 503, "fail_times": 1, "retry_after": value}
    t0 = time.monotonic()
    f = download(f"{server.url}/files/data.h5ad", dest, policy=HttpPolicy(max_retry_after_s=1.0), **FAST)
    assert Path(f.path).read_bytes() == data and server.hits("/files/data.h5ad") == 2
    assert time.monotonic() - t0 < 30


def test_config_sets_the_retry_after_bound():
    policy = HttpPolicy.from_config(DownloadConfig(max_retry_after_s=12.0))
    assert policy.max_retry_after_s == 12.0 and retry_after_s("1e12", max_s=policy.max_retry_after_s) == 12.0


# ---- 8. no resume without a validator -----------------------------------------------------------------------


def _leave_part(dest, data):
    """What a task killed mid-transfer from a server without ETag/Last-Modified leaves behind."""
    dest.mkdir(parents=True)
    (dest / "data.h5ad.part").write_bytes(data[:100_000])


def test_a_file_changed_behind_a_server_without_validators_is_not_spliced(served):
    server, data, dest = served
    _leave_part(dest, data)
    newer = os.urandom(SIZE)  # same size, new bytes: only a validator or a checksum could tell
    (dest.parent / "www" / "files" / "data.h5ad").write_bytes(newer)
    server.faults["/files/data.h5ad"] = {"no_validator": True}
    f = download(f"{server.url}/files/data.h5ad", dest, **FAST)
    assert Path(f.path).read_bytes() == newer and f.resumed_from == 0


def test_without_validators_a_known_checksum_still_allows_resuming(served):
    import hashlib

    server, data, dest = served
    digest = hashlib.sha256(data).hexdigest()
    _leave_part(dest, data)
    server.faults["/files/data.h5ad"] = {"no_validator": True}
    f = download(f"{server.url}/files/data.h5ad", dest, sha256=digest, **FAST)
    assert Path(f.path).read_bytes() == data and f.resumed_from == 100_000


# ---- 9. tokens never shown; redirects to other hosts a policy -------------------------------------------------


def test_redact_url_and_text():
    url = f"https://user:pw@bucket.s3.amazonaws.com/a/b.h5ad?{TOKEN}#frag"
    assert redact_url(url) == "https://REDACTED@bucket.s3.amazonaws.com/a/b.h5ad?REDACTED#REDACTED"
    assert redact_url("https://h.org/x.h5ad") == "https://h.org/x.h5ad"
    text = f"failed: {url}; and (https://h.org/y?sig=abc) done"
    assert "SECRET" not in redact_text(text) and "sig=abc" not in redact_text(text)
    assert "https://h.org/y?REDACTED" in redact_text(text)


def test_tokens_stay_out_of_errors_logs_and_records(served, caplog, tmp_path):
    server, data, dest = served
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FetchError) as info:
        download(f"{server.url}/files/missing.h5ad?{TOKEN}", dest, **FAST)
    assert "SECRET" not in str(info.value) and "/files/missing.h5ad?REDACTED" in str(info.value)
    server.faults["/files/data.h5ad"] = {"fail": 503, "fail_times": 1}
    f = download(f"{server.url}/files/data.h5ad?{TOKEN}", dest, **FAST)
    assert f.url.endswith(TOKEN)  # the request itself still carries it
    records = [p.read_text() for p in dest.iterdir() if p.suffix == ".json"]
    assert records and not any("SECRET" in r for r in records)
    assert "SECRET" not in caplog.text and "REDACTED" in caplog.text
    # a re-run still recognises the finished file by its (hashed) URL
    assert download(f"{server.url}/files/data.h5ad?{TOKEN}", dest, **FAST).url == f.url
    assert server.hits("/files/data.h5ad") == 2

    from atlasflow.core.config import load_config
    from atlasflow.core.records import record_quarantine

    config = load_config(overrides={"storage.base_dir": str(tmp_path / "base")})
    record = record_quarantine(config, "batch_0000", "ds", "download", str(info.value) + f" {server.url}/x?{TOKEN}")
    assert "SECRET" not in json.dumps(record)


def test_a_redirect_to_another_host_is_refused_by_default(served):
    server, data, dest = served
    other = f"http://localhost:{server.port}/files/data.h5ad"  # another host name for the same server
    server.faults["/files/moved.h5ad"] = {"redirect": f"{other}?{TOKEN}"}
    with pytest.raises(FetchError, match="download.redirect_hosts does not allow") as info:
        download(f"{server.url}/files/moved.h5ad", dest, **FAST)
    assert "SECRET" not in str(info.value)
    assert server.hits("/files/data.h5ad") == 0  # no request went to the other host
    assert not list(dest.glob("*.part"))


def test_an_allowed_cross_host_redirect_is_followed_and_reported(served):
    server, data, dest = served
    server.faults["/files/moved.h5ad"] = {"redirect": f"http://localhost:{server.port}/files/data.h5ad?{TOKEN}"}
    policy = HttpPolicy.from_config(DownloadConfig(redirect_hosts="localhost"))
    f = download(f"{server.url}/files/moved.h5ad", dest, policy=policy, **FAST)
    assert Path(f.path).read_bytes() == data
    assert f.redirected_to == f"http://localhost:{server.port}/files/data.h5ad?REDACTED"
    assert f.to_dict()["redirected_to"] == f.redirected_to


def test_a_same_host_redirect_is_followed_silently(served):
    server, data, dest = served
    server.faults["/files/moved.h5ad"] = {"redirect": f"{server.url}/files/data.h5ad"}
    f = download(f"{server.url}/files/moved.h5ad", dest, **FAST)
    assert Path(f.path).read_bytes() == data and f.redirected_to is None


def test_the_configured_mirrors_and_known_archives_are_allowed():
    policy = HttpPolicy.from_config(DownloadConfig(geo_base_url="https://mirror.example.org/geo"))
    assert policy.allows_redirect("https://x.org/a", "https://ftp.ncbi.nlm.nih.gov/geo/a")
    assert policy.allows_redirect("https://x.org/a", "https://ftp.sra.ebi.ac.uk/vol1/a")
    assert policy.allows_redirect("https://x.org/a", "https://mirror.example.org/other")
    assert not policy.allows_redirect("https://x.org/a", "https://evil.example.com/a")
    assert not policy.allows_redirect("https://x.org/a", "https://ncbi.nlm.nih.gov.evil.com/a")
    assert HttpPolicy(redirect_hosts=("*",)).allows_redirect("https://x.org/a", "https://evil.example.com/a")


# ---- 10. a non-ASCII URL is requested in its ASCII form, or refused: never a UnicodeEncodeError ----------------


def test_a_non_ascii_path_is_percent_encoded(served):
    server, data, dest = served
    (dest.parent / "www" / "files" / "é ü.h5ad").write_bytes(data)
    f = download(f"{server.url}/files/é ü.h5ad", dest, **FAST)
    assert Path(f.path).read_bytes() == data


def test_an_internationalised_host_is_sent_as_punycode_and_fails_as_a_fetch_error():
    from atlasflow.acquire.http import ascii_url

    assert ascii_url("https://exаmple.org/a b?q=é") == "https://xn--exmple-4nf.org/a%20b?q=%C3%A9"
    assert ascii_url("https://h.org/x") == "https://h.org/x"
    with pytest.raises(FetchError, match="is not a valid internationalised name"):
        ascii_url("https://" + "ä" * 70 + ".org/x")  # a label over 63 characters


def test_an_unresolvable_internationalised_host_is_a_transient_fetch_error(tmp_path):
    with pytest.raises(TransientFetchError):
        download("http://exаmple.invalid/x.h5ad", tmp_path, attempts=1, backoff_s=0.01, timeout_s=5)
