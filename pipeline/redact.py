"""Credentials out of everything we record. Pure: no I/O, no Ray.

Secrets reach a job inside URIs: a presigned or SAS URL carries its signature or token in the
query (``?X-Amz-Signature=...``, ``&sig=...``), and ``https://user:password@host/`` carries a
password. Reading needs them; nothing we write or print does. Every place that records a URI
or an error message (scene ids, the ``scene_uri`` column, ledger records, the run report,
progress lines, :class:`~pipeline.errors.SceneError`) passes it through here first.

Keys from the environment (``AWS_SECRET_ACCESS_KEY``, tokens) are never formatted into a
message by this package; the security test plants them and greps every artefact to keep it so.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

REDACTED = "REDACTED"

# Query keys whose values are credentials: S3/GCS presigned URLs (X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, X-Goog-Signature), Azure SAS (sig), and the usual
# token/key/secret/password parameters of HTTP APIs.
_SECRET_KEY = re.compile(
    r"sig|signature|token|secret|passw|credential|key|auth|session|policy", re.IGNORECASE
)

# A URL inside free text (an error message): scheme://, up to whitespace, a quote or a
# backslash (JSON escapes).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>\\`]+")


def redact_uri(uri: str) -> str:
    """``uri`` with its password and the values of credential-like query keys replaced.

    Other query keys (``versionId``, ``format``) are kept, so two different objects keep
    two different URIs; the same object presigned twice gets one URI (and one scene id).
    """
    if "://" not in uri:
        return uri
    try:
        parts = urlsplit(uri)
    except ValueError:
        return uri
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{REDACTED}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = "&".join(
            f"{quote(key, safe='-_.~')}="
            f"{REDACTED if _SECRET_KEY.search(key) else quote(value, safe='-_.~/:')}"
            for key, value in pairs
        )
    fragment = REDACTED if parts.fragment and _SECRET_KEY.search(parts.fragment) else parts.fragment
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return uri  # nothing secret: keep the user's spelling
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: str) -> str:
    """Every URL in ``text`` (an error message, a JSON document) through :func:`redact_uri`."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: redact_uri(match.group(0)), text)
