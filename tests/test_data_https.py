"""Silo data behind HTTPS, against a local HTTPS server this test starts with
its own test CA: a CSV and an XLSX served behind a bearer-token check are read
like files; a wrong token, a 404, a timeout, an oversize body and a truncated
body are each a clear error naming the URL and never the token; the Google
Sheets URL maps to its export endpoint (Google itself cannot be reached here).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import http.server
import json
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorflow_federated.python.core.impl.types import computation_types

from tests.support.data import write_table, write_workbook
from tests.support.tls import Pki
from tff_amqp.retry import RetryPolicy
from tff_amqp.silo.data import SiloDataStore
from tff_amqp.silo.remote import FetchError, RemoteSource, Token, export_url, fetch
from tff_amqp.silo.sources import DataError, DataSource, check_flags

TOKEN = "s3cret-t0ken-value"
ROW = computation_types.to_type(collections.OrderedDict(age=np.int32, glucose=np.float32))


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}
    hits: dict[str, int] = collections.defaultdict(int)
    switched_off = False

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_POST(self) -> None:
        # A stand-in for Google's token endpoint: a signed JWT assertion in,
        # an access token out (the server does not verify the signature).
        length = int(self.headers.get("Content-Length", "0"))
        form = urllib.parse.parse_qs(self.rfile.read(length).decode())
        self.hits[self.path] += 1
        assertion = form.get("assertion", [""])[0]
        if self.path != "/token" or assertion.count(".") != 2:
            self.send_error(400, "Bad Request")
            return
        claims = json.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))
        if "spreadsheets.readonly" not in claims.get("scope", ""):
            self.send_error(403, "Forbidden")
            return
        body = json.dumps({"access_token": TOKEN, "expires_in": 3600, "token_type": "Bearer"})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def do_GET(self) -> None:
        self.hits[self.path] += 1
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_error(401, "Unauthorized")
            return
        if self.path == "/switch.csv" and _Handler.switched_off:
            self.send_error(404, "Not Found")
            return
        if self.path == "/slow.csv":
            time.sleep(3)
        if self.path == "/flaky.csv" and self.hits[self.path] == 1:
            self.send_error(503, "Service Unavailable")
            return
        body = self.files.get(self.path.split("?")[0])
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        declared = len(body) * 4 if self.path == "/truncated.csv" else len(body)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/truncated.csv":
            self.close_connection = True


class _QuietServer(http.server.ThreadingHTTPServer):
    """A client that gave up (the timeout, oversize and truncation tests)
    breaks the connection mid-answer: expected here, not worth a traceback."""

    def handle_error(self, request: object, client_address: object) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError | ssl.SSLError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("https")
    pki = Pki.create(root / "pki")
    csv_file = write_table(root / "ward.csv", "csv", ["age", "glucose"], [[30, 4.5], [31, 5.25]])
    book = write_workbook(
        root / "ward.xlsx",
        "xlsx",
        {"Jan": (["age", "glucose"], [[1, 1.5]]), "March": (["age", "glucose"], [[3, 3.5]])},
    )
    _Handler.files = {
        "/ward.csv": csv_file.read_bytes(),
        "/ward.xlsx": book.read_bytes(),
        "/slow.csv": csv_file.read_bytes(),
        "/flaky.csv": csv_file.read_bytes(),
        "/switch.csv": csv_file.read_bytes(),
        "/truncated.csv": csv_file.read_bytes(),
        "/big.csv": b"age,glucose\n" + b"1,2.0\n" * 50_000,
    }
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{httpd.server_address[1]}", pki.ca_cert
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("WARD_TOKEN", TOKEN)
    return "WARD_TOKEN"


def rows_of(source: DataSource) -> list[list[tuple]]:
    store = SiloDataStore("north", [source])
    return [
        [tuple(v.numpy() for v in element.values()) for element in dataset]
        for dataset in store.client_datasets(source.key, ROW)
    ]


def test_csv_and_xlsx_over_https_with_a_bearer_token(
    server: tuple[str, Path], token_env: str, tmp_path: Path
) -> None:
    base, ca = server
    source = DataSource.parse(f"w={base}/ward.csv#token=env:{token_env}&ca={ca}")
    assert rows_of(source) == [[(30, 4.5), (31, 5.25)]]
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    book = DataSource.parse(f"w={base}/ward.xlsx#token=file:{token_file}&ca={ca}&sheet=March")
    assert rows_of(book) == [[(3, 3.5)]]
    every = DataSource.parse(f"w={base}/ward.xlsx#token=file:{token_file}&ca={ca}&sheet=*")
    assert rows_of(every) == [[(1, 1.5)], [(3, 3.5)]]


def test_refresh_refetches_at_most_every_n_seconds(
    server: tuple[str, Path], token_env: str
) -> None:
    base, ca = server
    cached = DataSource.parse(f"w={base}/ward.csv?v=1#token=env:{token_env}&ca={ca}")
    hits = _Handler.hits["/ward.csv?v=1"]
    rows_of(cached), rows_of(cached)
    assert _Handler.hits["/ward.csv?v=1"] == hits  # fetched once, at parse
    fresh = DataSource.parse(f"w={base}/ward.csv?v=2#token=env:{token_env}&ca={ca}&refresh=0.2")
    hits = _Handler.hits["/ward.csv?v=2"]
    time.sleep(0.3)
    rows_of(fresh)
    assert _Handler.hits["/ward.csv?v=2"] == hits + 1


QUICK = RetryPolicy(initial_delay=0.05, max_delay=0.2, total_timeout=1.5)


@pytest.mark.parametrize(
    ("path", "options", "words"),
    [
        ("/ward.csv", {"token": Token("env:WRONG_TOKEN")}, "HTTP 401 Unauthorized"),
        ("/nothing.csv", {}, "HTTP 404 Not Found: no such document"),
        ("/slow.csv", {"timeout": 0.5}, "timed out"),
        ("/big.csv", {"max_bytes": 100_000}, "larger than max-bytes=100000"),
        ("/truncated.csv", {}, "truncated"),
    ],
)
def test_fetch_failures_are_clear_and_never_show_the_token(
    server: tuple[str, Path],
    token_env: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    path: str,
    options: dict,
    words: str,
) -> None:
    base, ca = server
    monkeypatch.setenv("WRONG_TOKEN", "not-" + TOKEN)
    source = RemoteSource(f"{base}{path}", token=Token(f"env:{token_env}"), ca=ca, retry=QUICK)
    source = dataclasses.replace(source, **options)
    started = time.monotonic()
    with pytest.raises(FetchError) as error:
        fetch(source, tmp_path / "out.csv")
    assert time.monotonic() - started < 10  # every wait bounded
    message = str(error.value)
    assert f"{base}{path}" in message and words in message, message
    assert TOKEN not in message and "not-" + TOKEN not in message
    assert not (tmp_path / "out.csv").exists()


def test_a_5xx_answer_is_retried_under_the_policy(
    server: tuple[str, Path], token_env: str, tmp_path: Path
) -> None:
    base, ca = server
    fetch(RemoteSource(f"{base}/flaky.csv", token=Token(f"env:{token_env}"), ca=ca, retry=QUICK),
          tmp_path / "f.csv")  # fmt: skip
    assert _Handler.hits["/flaky.csv"] == 2
    assert (tmp_path / "f.csv").read_bytes() == _Handler.files["/flaky.csv"]


def test_token_comes_only_from_env_or_file_and_http_is_refused(server: tuple[str, Path]) -> None:
    base, _ = server
    with pytest.raises(DataError, match="token=env:VARIABLE, token=file:PATH or"):
        DataSource.parse_spec(f"w={base}/ward.csv#token={TOKEN}")
    with pytest.raises(DataError, match="only https://"):
        DataSource.parse_spec("w=http://example.org/ward.csv")
    with pytest.raises(DataError, match="only for https:// sources"):
        DataSource.parse_spec("w=/srv/ward.csv#token=env:X")
    assert TOKEN not in repr(Token("env:WARD_TOKEN"))


def test_google_sheets_urls_map_to_the_export_endpoint() -> None:
    url = "https://docs.google.com/spreadsheets/d/1AbC-d_9/edit"
    assert export_url(url) == (
        "https://docs.google.com/spreadsheets/d/1AbC-d_9/export?format=xlsx",
        "xlsx",
    )
    assert export_url(url, "42") == (
        "https://docs.google.com/spreadsheets/d/1AbC-d_9/export?format=csv&gid=42",
        "csv",
    )
    # The browser's "#gid=N" fragment is read as the gid= option.
    source = DataSource.parse_spec(f"w={url}#gid=7&token=env:SHEETS_TOKEN")
    assert source.remote.fetch_url() == (
        "https://docs.google.com/spreadsheets/d/1AbC-d_9/export?format=csv&gid=7",
        "csv",
    )
    assert export_url("https://example.org/a.csv") == ("https://example.org/a.csv", "")


def test_silo_refuses_a_wrong_token_at_start_in_one_line(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = server
    token_file = tmp_path / "token"
    token_file.write_text("wrong-" + TOKEN)
    problems = check_flags([f"w={base}/ward.csv?fresh#token=file:{token_file}&ca={ca}"])
    assert len(problems) == 1
    assert f"{base}/ward.csv?fresh: HTTP 401 Unauthorized" in problems[0]
    assert TOKEN not in problems[0]
    # The same from the command line, before TensorFlow and the broker.
    result = subprocess.run(
        [sys.executable, "-m", "tff_amqp", "silo", "--name", "a",
         "--broker", "amqp://guest:guest@127.0.0.1:1/",
         "--data", f"w={base}/ward.csv#token=file:{token_file}&ca={ca}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "HTTP 401 Unauthorized" in result.stderr and TOKEN not in result.stderr


def _service_account_key(tmp_path: Path, token_uri: str) -> Path:
    key = tmp_path / "sa.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048",
         "-out", str(key)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    info = {
        "type": "service_account",
        "project_id": "test",
        "private_key_id": "k1",
        "private_key": key.read_text(),
        "client_email": "reader@test.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(info))
    return path


def test_a_service_account_key_is_exchanged_for_a_token_with_google_auth(
    server: tuple[str, Path], tmp_path: Path
) -> None:
    base, ca = server
    key = _service_account_key(tmp_path, f"{base}/token")
    hits = _Handler.hits["/token"]
    source = DataSource.parse(f"w={base}/ward.csv?sa#token=service-account:{key}&ca={ca}")
    assert rows_of(source) == [[(30, 4.5), (31, 5.25)]]
    assert _Handler.hits["/token"] == hits + 1
    # A token endpoint that refuses: a clear error naming the key file and the endpoint.
    bad = _service_account_key(tmp_path, f"{base}/nope")
    problems = check_flags([f"w={base}/ward.csv?sa2#token=service-account:{bad}&ca={ca}"])
    assert len(problems) == 1 and f"the token endpoint {base}/nope refused" in problems[0]
    assert "PRIVATE KEY" not in problems[0]


@pytest.mark.slow
def test_a_silo_reports_a_failing_url_naming_it_and_keeps_serving(
    server: tuple[str, Path], tmp_path: Path, local: Any, native_context: Any
) -> None:
    import tensorflow as tf

    import tff_amqp
    from tests.support.computations import mean_glucose
    from tests.support.federation import run_in, started_context

    base, ca = server
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    url = f"{base}/switch.csv"
    _Handler.switched_off = False
    local.start_silo(
        "north",
        data={
            "remote": f"{url}#token=file:{token_file}&ca={ca}&refresh=0.1",
            "local": write_table(tmp_path / "w.csv", "csv", ["age", "glucose"], [[1, 2.5]]),
        },
    )
    local.wait_ready(timeout=240)
    with started_context(local.broker_url, local.federation, 1) as context:
        result = float(run_in(context, mean_glucose, tff_amqp.silo_data("remote")))
        rows = collections.OrderedDict(
            age=np.array([30, 31], np.int32), glucose=np.array([4.5, 5.25], np.float32)
        )
        native = run_in(native_context, mean_glucose, [tf.data.Dataset.from_tensor_slices(rows)])
        np.testing.assert_allclose(result, float(native), rtol=1e-9)
        _Handler.switched_off = True
        # Past the source's refresh=0.1: a read within it is served from the
        # silo's copy (as documented), so the next invocation must fetch again.
        time.sleep(0.3)
        try:
            with pytest.raises(tff_amqp.SiloError) as error:
                run_in(context, mean_glucose, tff_amqp.silo_data("remote"))
        finally:
            _Handler.switched_off = False
        message = str(error.value)
        assert error.value.silo == "north"
        assert f"{url}: HTTP 404 Not Found" in message and TOKEN not in message
        # The silo keeps serving.
        assert float(run_in(context, mean_glucose, tff_amqp.silo_data("local"))) == 2.5
    log = local.silos["north"].log_path.read_text()
    assert url in log and TOKEN not in log  # the error is logged at the silo, not the token
