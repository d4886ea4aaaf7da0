"""Where a silo's data lives: the ``--data`` spec, the files (and sheets) that
are its clients, and the checks a silo runs on them before TensorFlow loads.

``--data KEY=PATH[#OPTION=VALUE&...]``. PATH is a file (one client) or a
folder (one client per data file, in file-name order; a folder may mix
formats). Options:

- ``format=csv|tsv|xlsx|xls|ods|parquet|tfrecord``: the format of PATH (or of
  every file of a folder), instead of the file-name extension;
- ``sheet=NAME|INDEX|*``: which sheet of a workbook is the client (default:
  the first; an INDEX counts from 0 and is used only if no sheet has that
  name); ``*`` makes every sheet of every workbook its own client;
- ``missing=error|drop-row|fill:VALUE``: what a blank cell means (default
  ``error``, see `tff_amqp.silo.tables.MissingPolicy`).

Nothing here imports TensorFlow: `tff-amqp silo` checks every source with
`DataSource.problems` first, so a typo costs milliseconds, not the 13-24 s
TensorFlow takes to import.
"""

from __future__ import annotations

import functools
import pathlib
import re
from dataclasses import dataclass, field

from tff_amqp.silo.remote import CACHE, FetchError, RemoteSource, Token, is_url
from tff_amqp.silo.tables import FORMATS, MissingPolicy, TableError, format_of, open_client

# Same rule as `tff_amqp.silo_data(KEY)`, so every valid flag can be referenced.
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_OPTIONS = ("format", "sheet", "missing")
# Options of an https:// source only (tff_amqp.silo.remote).
_URL_OPTIONS = ("token", "ca", "timeout", "max-bytes", "refresh", "gid")
EVERY_SHEET = "*"


class DataError(ValueError):
    """Silo data could not be resolved; the message says where and what to do.

    Raised from a silo it names the silo and the data key. `DataSource.parse`
    runs before a silo exists, so its errors name the offending flag instead.
    """

    def __init__(self, problem: str, *, silo: str | None = None, key: str | None = None) -> None:
        self.problem = problem
        self.silo = silo
        self.key = key
        where = []
        if silo is not None:
            where.append(f"silo {silo!r}")
        if key is not None:
            where.append(f"data {key!r}")
        super().__init__(f"{', '.join(where)}: {problem}" if where else problem)

    def at_silo(self, silo: str) -> DataError:
        """The same error, attributed to `silo` (sources do not know their silo)."""
        return DataError(self.problem, silo=silo, key=self.key)


@dataclass(frozen=True)
class ClientPart:
    """One client's data: a file, and for a workbook the sheet (None: the
    first sheet). `label` names it in errors and logs."""

    path: pathlib.Path
    format: str
    sheet: str | None = None
    # Where the file came from, if not from `path` itself (a URL).
    origin: str | None = None

    @property
    def label(self) -> str:
        where = self.origin or str(self.path)
        return where if self.sheet is None else f"{where}#sheet={self.sheet}"


@dataclass(frozen=True)
class DataSource:
    """One ``--data KEY=PATH[#options]`` flag."""

    key: str
    path: pathlib.Path
    format: str | None = None
    sheet: str | None = None
    missing: MissingPolicy = field(default_factory=MissingPolicy)
    remote: RemoteSource | None = None

    @property
    def where(self) -> str:
        """The path or URL, as the user gave it."""
        return self.remote.url if self.remote is not None else str(self.path)

    def __post_init__(self) -> None:
        if not _KEY.match(self.key):
            raise DataError(
                f"invalid data key {self.key!r}: use 1-128 letters, digits, '_', '.' or '-' "
                "(the same KEY the coordinator passes to tff_amqp.silo_data(KEY))"
            )
        if self.format is not None and self.format not in FORMATS:
            raise DataError(
                f"unknown format={self.format!r}; use one of {', '.join(FORMATS)}", key=self.key
            )

    @classmethod
    def parse(cls, flag: str) -> DataSource:
        """Parses ``KEY=PATH[#options]`` and checks every client it names now
        (exists, readable, header and sheet present), so a typo fails at
        startup. Raises DataError naming the flag and the first problem."""
        source = cls.parse_spec(flag)
        problems = source.problems()
        if problems:
            raise DataError(f"--data {flag!r}: {problems[0]}")
        return source

    @classmethod
    def parse_spec(cls, flag: str) -> DataSource:
        """The flag's syntax only (nothing is read)."""
        key, sep, spec = flag.partition("=")
        if not sep:
            raise DataError(
                f"--data {flag!r}: expected KEY=PATH, e.g. --data patients=/srv/patients/ "
                "(a data file, or a folder with one data file per client)"
            )
        raw_path, _, raw_options = spec.partition("#")
        if not raw_path.strip():
            raise DataError(f"--data {flag!r}: PATH is empty; give a data file or a folder")
        options: dict[str, str] = {}
        for item in filter(None, raw_options.split("&")):
            name, eq, value = item.partition("=")
            if not eq or name not in _OPTIONS + _URL_OPTIONS:
                raise DataError(
                    f"--data {flag!r}: unknown option {item!r} after '#'; options are "
                    "format=FORMAT, sheet=NAME|INDEX|*, missing=error|drop-row|fill:VALUE "
                    "(and for https:// sources token=env:NAME|file:PATH, ca=PATH, "
                    "timeout=SECONDS, max-bytes=N, refresh=SECONDS, gid=N), joined by '&'"
                )
            if name in _URL_OPTIONS and not is_url(raw_path):
                raise DataError(f"--data {flag!r}: option {name}= is only for https:// sources")
            if name in options:
                raise DataError(f"--data {flag!r}: option {name}= given twice")
            options[name] = value
        try:
            missing = MissingPolicy.parse(options.get("missing", "error"))
        except ValueError as e:
            raise DataError(f"--data {flag!r}: {e}") from None
        if options.get("sheet") == "":
            raise DataError(f"--data {flag!r}: sheet= is empty; give a name, an index or *")
        try:
            remote = _remote(raw_path, options) if is_url(raw_path) else None
        except ValueError as e:
            raise DataError(f"--data {flag!r}: {e}") from None
        if raw_path.startswith("http://"):
            raise DataError(f"--data {flag!r}: only https:// URLs are read (never plain http)")
        try:
            return cls(
                key,
                pathlib.Path() if remote else pathlib.Path(raw_path).expanduser(),
                format=options.get("format"),
                sheet=options.get("sheet"),
                missing=missing,
                remote=remote,
            )
        except DataError as e:
            raise DataError(f"--data {flag!r}: {e.problem}") from None

    # ----------------------------------------------------------------- clients

    def client_files(self) -> list[pathlib.Path]:
        """The data file of each client (a file appears once per sheet with
        ``sheet=*``), in the order clients are numbered."""
        return [part.path for part in self.client_parts()]

    def client_parts(self, *, fresh: bool = True) -> list[ClientPart]:
        """Each client's file and sheet, in the order clients are numbered. A
        folder without data files is a silo with no clients under this key (a
        ward with no patients yet): it takes part in invocations with 0
        clients, and its aggregates are the zero. `fresh=False`: a URL's
        cached copy as it is, never re-fetched (for status reports)."""
        parts: list[ClientPart] = []
        origin = self.remote.url if self.remote is not None else None
        for path, fmt in self._files(fresh):
            if fmt in ("xlsx", "xls", "ods") and self.sheet == EVERY_SHEET:
                try:
                    names = _sheet_names(path, fmt, origin)
                except TableError as e:
                    raise DataError(str(e), key=self.key) from None
                except OSError as e:
                    raise DataError(
                        f"{path}: cannot read: {e.strerror or e}", key=self.key
                    ) from None
                parts.extend(ClientPart(path, fmt, name, origin) for name in names)
            elif fmt in ("xlsx", "xls", "ods"):
                parts.append(ClientPart(path, fmt, self.sheet, origin))
            else:
                parts.append(ClientPart(path, fmt, None, origin))
        return parts

    def problems(self) -> list[str]:
        """Every problem with this source that reading its headers shows
        (missing file, unreadable, no header, no such sheet): one line each,
        empty if none. Reads headers only, never TensorFlow."""
        try:
            parts = self.client_parts()
        except DataError as e:
            return [e.problem]
        problems = []
        for part in parts:
            try:
                open_client(part).header()
            except TableError as e:
                problems.append(str(e))
        return problems

    def _files(self, fresh: bool = True) -> list[tuple[pathlib.Path, str]]:
        if self.remote is not None:
            suffix = self.remote.suffix(self.format)
            fmt = self.format or format_of(pathlib.Path(f"x{suffix}"))
            if fmt is None:
                raise DataError(
                    f"{self.remote.url}: the URL does not say its format; add #format=FORMAT "
                    f"({', '.join(FORMATS)})",
                    key=self.key,
                )
            try:
                return [(CACHE.local_file(self.remote, f".{fmt}", fresh=fresh), fmt)]
            except FetchError as e:
                raise DataError(str(e), key=self.key) from None
        if self.path.is_dir():
            found = []
            for path in sorted(self.path.iterdir(), key=lambda p: p.name):
                # Hidden files and Excel's "~$book.xlsx" lock files are not clients.
                if path.name.startswith((".", "~$")) or not path.is_file():
                    continue
                fmt = self.format or format_of(path)
                if fmt is not None:
                    found.append((path, fmt))
            return found
        if self.path.is_file():
            fmt = self.format or format_of(self.path)
            if fmt is None:
                raise DataError(
                    f"{str(self.path)!r} is not a data file this silo reads (by its "
                    f"extension: {_extensions()}); name the format with "
                    f"#format=FORMAT or give a folder of data files",
                    key=self.key,
                )
            return [(self.path, fmt)]
        if self.path.exists():
            raise DataError(
                f"{str(self.path)!r} is neither a file nor a folder; give a data file or a "
                "folder of data files",
                key=self.key,
            )
        raise DataError(
            f"{str(self.path)!r} does not exist; give a data file or a folder of data files",
            key=self.key,
        )


def _sheet_names(path: pathlib.Path, fmt: str, origin: str | None) -> list[str]:
    """A workbook's sheet names, read again only when the file changed:
    opening a large workbook takes a while, and status reports (every
    heartbeat) count its sheets on the event loop."""
    stat = path.stat()
    return list(_sheet_names_of(path, fmt, origin, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=256)
def _sheet_names_of(
    path: pathlib.Path, fmt: str, origin: str | None, mtime_ns: int, size: int
) -> tuple[str, ...]:
    return tuple(open_client(ClientPart(path, fmt, None, origin)).sheet_names())


def _remote(url: str, options: dict[str, str]) -> RemoteSource:
    """An https:// source's fetch settings from its options (ValueError)."""

    def number(name: str, default: float | None) -> float | None:
        if name not in options:
            return default
        try:
            value = float(options[name])
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"{name}={options[name]!r}: give a positive number of seconds")
        return value

    max_bytes = options.get("max-bytes", "")
    if max_bytes and not max_bytes.isdigit():
        raise ValueError(f"max-bytes={max_bytes!r}: give a whole number of bytes")
    ca = options.get("ca")
    return RemoteSource(
        url,
        token=Token.parse(options["token"]) if "token" in options else None,
        ca=pathlib.Path(ca).expanduser() if ca else None,
        timeout=number("timeout", RemoteSource.timeout) or RemoteSource.timeout,
        max_bytes=int(max_bytes) if max_bytes else RemoteSource.max_bytes,
        refresh=number("refresh", None),
        gid=options.get("gid"),
    )


def _extensions() -> str:
    from tff_amqp.silo.tables import EXTENSIONS

    return ", ".join(sorted(EXTENSIONS))


def check_flags(flags: list[str]) -> list[str]:
    """One line per problem with the given --data flags (empty: all good).
    Reads only headers; imports no TensorFlow."""
    problems = []
    keys: dict[str, str] = {}
    for flag in flags:
        try:
            source = DataSource.parse_spec(flag)
        except DataError as e:
            problems.append(str(e))
            continue
        if source.key in keys:
            problems.append(
                f"--data {flag!r}: key {source.key!r} already given by --data {keys[source.key]!r}"
            )
            continue
        keys[source.key] = flag
        problems.extend(f"--data {flag!r}: {problem}" for problem in source.problems())
    return problems
