"""Silo data behind an HTTPS URL: a CSV or workbook fetched with httpx into a
local cache, then read like a file.

``--data KEY=https://host/path/ward.csv#token=env:WARD_TOKEN&refresh=300``

- A Google Sheets URL (``https://docs.google.com/spreadsheets/d/<id>/...``) is
  read through its export endpoint as XLSX (every sheet; choose one with
  ``sheet=``), or as CSV of one sheet with ``gid=`` (what the browser's URL
  fragment ``#gid=N`` says).
- ``token=env:NAME`` or ``token=file:PATH``: a bearer token, read from the
  environment or a file, never from the command line, never logged;
  ``token=service-account:KEYFILE``: a Google service account's key file,
  exchanged for an access token (google-auth) at each fetch.
- ``ca=PATH``: a CA certificate to trust (else the system's).
- ``timeout=SECONDS`` (default 30) bounds each attempt, ``max-bytes=N``
  (default 100 MiB) the body; connection failures, timeouts and 5xx answers
  are retried under `tff_amqp.retry.HTTP_FETCH`, other answers are final.
- ``refresh=SECONDS``: re-fetch at most every SECONDS when the data is read;
  without it the copy fetched at start-up is used for the silo's lifetime.

Errors name the URL (the token is only ever a header, never in the URL) and
what to do. Nothing here imports TensorFlow.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from tff_amqp.retry import HTTP_FETCH, RetryPolicy

_SHEETS = re.compile(r"^https://docs\.google\.com/spreadsheets/d/([A-Za-z0-9_-]+)")
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BYTES = 100 * 1024 * 1024


class FetchError(ValueError):
    """A URL could not be fetched; the message names it and says why."""


def is_url(text: str) -> bool:
    # Only HTTPS: a bearer token must never cross the network in clear.
    return text.startswith("https://")


def export_url(url: str, gid: str | None = None) -> tuple[str, str]:
    """The URL to fetch and the format it returns: a Google Sheets URL maps
    to its export endpoint (XLSX, or CSV of sheet `gid`), others to themselves."""
    match = _SHEETS.match(url)
    if match is None:
        return url, ""
    base = f"https://docs.google.com/spreadsheets/d/{match.group(1)}/export"
    if gid is not None:
        return f"{base}?format=csv&gid={gid}", "csv"
    return f"{base}?format=xlsx", "xlsx"


# What a service account asks Google for: read-only access to the sheets
# (and Drive, through which the export endpoint serves them).
SHEETS_SCOPES = (
    "https://www.googleapis.com/auth/spreadsheets.readonly",
    "https://www.googleapis.com/auth/drive.readonly",
)


@dataclass(frozen=True)
class Token:
    """Where a bearer token comes from: ``env:NAME``, ``file:PATH``, or
    ``service-account:PATH`` (a Google service-account key file, exchanged
    for an access token with google-auth)."""

    spec: str

    @classmethod
    def parse(cls, spec: str) -> Token:
        kind, _, where = spec.partition(":")
        if kind not in ("env", "file", "service-account") or not where:
            raise ValueError(
                f"token={spec!r}: give token=env:VARIABLE, token=file:PATH or "
                "token=service-account:KEYFILE (a token is never given on the command line)"
            )
        return cls(spec)

    def value(self, ca: pathlib.Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
        kind, _, where = self.spec.partition(":")
        if kind == "service-account":
            return _service_account_token(pathlib.Path(where).expanduser(), ca, timeout)
        if kind == "env":
            token = os.environ.get(where, "")
            if not token:
                raise FetchError(f"token=env:{where}: the environment variable is not set")
            return token.strip()
        try:
            token = pathlib.Path(where).expanduser().read_text().strip()
        except OSError as e:
            raise FetchError(f"token=file:{where}: cannot read: {e.strerror or e}") from None
        if not token:
            raise FetchError(f"token=file:{where}: the file is empty")
        return token

    def __repr__(self) -> str:  # The spec says where, never what.
        return f"Token({self.spec!r})"


def _service_account_token(key_file: pathlib.Path, ca: pathlib.Path | None, timeout: float) -> str:
    """An access token for a service account's key file (google-auth signs a
    JWT and asks the key's token_uri); FetchError says what went wrong."""
    import google.auth.exceptions
    import google.auth.transport.requests
    import requests
    from google.oauth2 import service_account

    where = f"token=service-account:{key_file}"
    try:
        info = json.loads(key_file.read_text())
        credentials = service_account.Credentials.from_service_account_info(
            info, scopes=list(SHEETS_SCOPES)
        )
    except (OSError, ValueError) as e:
        # (json and google-auth errors name what is wrong, never the key itself)
        raise FetchError(f"{where}: not a readable service-account key file: {e}") from None
    session = requests.Session()
    session.trust_env = False
    if ca is not None:
        session.verify = str(ca)
    try:
        credentials.refresh(google.auth.transport.requests.Request(session))
    except google.auth.exceptions.GoogleAuthError as e:
        # google-auth's messages carry the server's answer, never the key.
        raise FetchError(
            f"{where}: the token endpoint {info.get('token_uri')} refused: {e}"
        ) from None
    finally:
        session.close()
    if not credentials.token:
        raise FetchError(f"{where}: the token endpoint returned no access token")
    return str(credentials.token)


@dataclass(frozen=True)
class RemoteSource:
    """One URL and how to fetch it."""

    url: str
    token: Token | None = None
    ca: pathlib.Path | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES
    refresh: float | None = None
    gid: str | None = None
    retry: RetryPolicy = HTTP_FETCH

    def fetch_url(self) -> tuple[str, str]:
        return export_url(self.url, self.gid)

    def suffix(self, fmt: str | None) -> str:
        """The cached file's extension (what selects its reader)."""
        if fmt:
            return f".{fmt}"
        url, exported = self.fetch_url()
        if exported:
            return f".{exported}"
        return pathlib.PurePosixPath(urlsplit(url).path).suffix.lower()


class _Cache:
    """Fetched copies, one per URL, with when each was fetched."""

    def __init__(self) -> None:
        self._root = pathlib.Path(tempfile.mkdtemp(prefix="tff-amqp-data-"))
        self._fetched: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def local_file(self, source: RemoteSource, suffix: str, *, fresh: bool = True) -> pathlib.Path:
        """The cached copy, fetched first if there is none, or if `fresh` and
        it is older than the source's refresh interval. (`fresh=False` is for
        status reports on the event loop: they never wait for a fetch.)"""
        url, _ = source.fetch_url()
        name = hashlib.sha256(url.encode()).hexdigest()[:24] + suffix
        path = self._root / name
        if not fresh and (url, suffix) in self._fetched:
            return path  # Never waits on the lock a fetch in progress holds.
        with self._lock:
            fetched = self._fetched.get((url, suffix))
            stale = fetched is None or (
                fresh
                and source.refresh is not None
                and time.monotonic() - fetched >= source.refresh
            )
            if stale:
                fetch(source, path)
                self._fetched[(url, suffix)] = time.monotonic()
        return path


CACHE = _Cache()


def fetch(source: RemoteSource, destination: pathlib.Path) -> None:
    """Download `source` to `destination` (atomically), bounded in time and
    size, retrying what may pass; FetchError says why not."""
    import httpx

    url, _ = source.fetch_url()
    headers = {}
    if source.token is not None:
        headers["Authorization"] = f"Bearer {source.token.value(source.ca, source.timeout)}"
    verify: ssl.SSLContext | bool = True
    if source.ca is not None:
        try:
            verify = ssl.create_default_context(cafile=str(source.ca))
        except (OSError, ssl.SSLError) as e:
            raise FetchError(f"{url}: cannot use ca={source.ca}: {e}") from None

    def attempt() -> None:
        with (
            httpx.Client(
                verify=verify, timeout=source.timeout, follow_redirects=True, trust_env=False
            ) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            if response.status_code >= 500:
                raise _Retryable(f"HTTP {response.status_code} {response.reason_phrase}")
            if response.status_code != 200:
                raise FetchError(f"{url}: {_explain(response.status_code, response.reason_phrase)}")
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > source.max_bytes:
                raise FetchError(_too_big(url, int(declared), source.max_bytes))
            partial = destination.with_suffix(destination.suffix + ".part")
            received = 0
            with partial.open("wb") as out:
                for chunk in response.iter_bytes():
                    received += len(chunk)
                    if received > source.max_bytes:
                        raise FetchError(_too_big(url, received, source.max_bytes))
                    out.write(chunk)
            if declared is not None and declared.isdigit() and received != int(declared):
                raise _Retryable(f"truncated body: {received} of {declared} bytes")
            partial.replace(destination)

    def retryable(error: BaseException) -> bool:
        return isinstance(error, _Retryable | httpx.TransportError)

    try:
        for attempt_number in source.retry.retrying_blocking(retryable):
            with attempt_number:
                attempt()
    except (_Retryable, httpx.TransportError) as e:
        raise FetchError(
            f"{url}: {_describe(e)} (gave up after {source.retry.total_timeout:g} s of retries)"
        ) from None


class _Retryable(Exception):
    """A failure another attempt may not have."""


def _too_big(url: str, size: int, limit: int) -> str:
    return (
        f"{url}: the body is larger than max-bytes={limit} (at least {size} bytes); raise "
        "#max-bytes=N if that is expected"
    )


def _explain(status: int, reason: str) -> str:
    hint = {
        401: "the server refused the credentials: check the token (token=env:... or file:...)",
        403: "the credentials may not read this: check the token's access",
        404: "no such document: check the URL",
    }.get(status, "the server refused the request")
    return f"HTTP {status} {reason}: {hint}"


def _describe(error: BaseException) -> str:
    import httpx

    if isinstance(error, httpx.TimeoutException):
        return "timed out (raise #timeout=SECONDS if the server is slow)"
    if isinstance(error, httpx.ConnectError):
        return f"cannot connect: {error}"
    if isinstance(error, httpx.RemoteProtocolError):
        return f"the server broke off the transfer (truncated body): {error}"
    return str(error)
