"""Keep secrets that ride in URLs out of errors, logs, records and reports.

Presigned S3/GCS/Azure links carry their credentials in the query string (``X-Amz-Signature``,
``X-Goog-Credential``, ``sig``), and a URL may embed ``user:password@``. Everything shown to a
person or stored in a record goes through :func:`redact_url` / :func:`redact_text`; the full URL is
only ever used to make the request.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "redact_text", "redact_url"]

REDACTED = "REDACTED"
# a URL in free text: a scheme, then anything up to whitespace or a quote/bracket that ends it
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>()\[\]{}]+")


def redact_url(url: str) -> str:
    """``url`` without its query string, fragment and user info (each replaced by ``REDACTED``)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not parseable as a URL: hide everything after the first '?'
        return url.split("?", 1)[0] + (f"?{REDACTED}" if "?" in url else "")
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
    return urlunsplit((parts.scheme, netloc, parts.path, REDACTED if parts.query else "",
                       REDACTED if parts.fragment else ""))


def redact_text(text: str) -> str:
    """``text`` with every URL in it redacted (:func:`redact_url`)."""
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)
