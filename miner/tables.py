"""Reading user tables (JSONL, CSV/TSV, Parquet) into polars frames of text columns.

Fast path: pyarrow's columnar readers, no Python object per row. Only when a file fails to parse do
we scan it line by line, to tell the user exactly which line is wrong and why.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from miner.errors import InputError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    """Where rows came from, so that a row index can be reported as the line a user can open."""

    path: Path
    format: str

    def fail(self, index: int, problem: str, fix: str) -> InputError:
        if self.format == "parquet":
            return InputError(self.path, problem, fix, row=index + 1)
        if self.format in ("csv", "tsv"):
            return InputError(self.path, problem, fix, line=index + 2)  # after the header line
        return InputError(self.path, problem, fix, line=_jsonl_record_line(self.path, index))

    def whole(self, problem: str, fix: str) -> InputError:
        return InputError(self.path, problem, fix)


def _jsonl_record_line(path: Path, index: int) -> int:
    """1-based line of the index-th non-blank line: JSONL readers skip blank lines."""
    seen = -1
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                seen += 1
                if seen == index:
                    return number
    return index + 1


def file_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InputError(path, f"unsupported file type '{path.suffix}'", "use .jsonl, .csv, .tsv or .parquet")
    return fmt


def read_text_table(path: Path, columns: list[str], optional: tuple[str, ...] = ()) -> tuple[pl.DataFrame, Source]:
    """Read `columns` (required) and `optional` columns of a table file as text.

    Numbers are accepted and turned into text (ids are often numeric); nested values are refused.
    """
    if not path.is_file():
        raise InputError(path, "file not found", "check the path")
    source = Source(path, file_format(path))
    if path.stat().st_size == 0:
        raise source.whole("file is empty", "give it a header or at least one row")
    if source.format == "parquet":
        table = _read_parquet(source)
    elif source.format == "jsonl":
        table = _read_jsonl(source, columns + list(optional))
    else:
        table = _read_delimited(source)
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        found = ", ".join(table.column_names) or "none"
        raise source.whole(f"missing column '{missing[0]}' (columns found: {found})", "add or rename that column")
    wanted = columns + [name for name in optional if name in table.column_names]
    frame = pl.from_arrow(table.select(wanted))
    assert isinstance(frame, pl.DataFrame)
    casts = []
    for name in wanted:
        dtype = frame.schema[name]
        if dtype.is_nested():
            index = frame.with_row_index("_i").filter(pl.col(name).is_not_null())["_i"][0]
            raise source.fail(int(index), f"column '{name}' holds nested values, not text", "store it as a string")
        casts.append(pl.col(name).cast(pl.String))
    return frame.select(casts), source


def _read_parquet(source: Source) -> pa.Table:
    try:
        table = pq.read_table(source.path)
        table.validate(full=True)
        return table
    except (pa.ArrowInvalid, OSError) as error:
        raise source.whole(f"not a readable Parquet file ({error})", "rewrite it with a Parquet writer") from None


def _read_jsonl(source: Source, columns: list[str]) -> pa.Table:
    try:
        table = pajson.read_json(source.path)
        table.validate(full=True)  # the JSON reader lets invalid UTF-8 through; this catches it
        # It also reads an object spread over several lines; JSONL is one object per line, and the lines
        # are what errors point at, so such a file goes to the line-by-line scan, which names the line.
        table.schema.names  # noqa: B018 -- and invalid UTF-8 in a key only shows when the names are decoded
        if table.num_rows == _nonblank_lines(source.path):
            return table
        return _scan_jsonl(source, columns)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        # pyarrow reports block-relative rows and refuses mixed types (ids that are sometimes numbers);
        # scanning the file ourselves finds the exact line or reads what pyarrow would not.
        return _scan_jsonl(source, columns)


def _nonblank_lines(path: Path) -> int:
    with path.open("rb") as handle:
        return sum(1 for raw in handle if raw.strip())


def _scan_jsonl(source: Source, columns: list[str]) -> pa.Table:
    values: dict[str, list[str | None]] = {name: [] for name in columns}
    with source.path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8").strip())
            except UnicodeDecodeError as error:
                raise InputError(
                    source.path,
                    f"not valid UTF-8 ({error.reason} at byte {error.start})",
                    "re-encode the file as UTF-8",
                    line=number,
                ) from None
            except json.JSONDecodeError as error:
                raise InputError(
                    source.path,
                    f"not valid JSON ({error.msg} at character {error.pos + 1})",
                    "fix or remove that line",
                    line=number,
                ) from None
            if not isinstance(record, dict):
                raise InputError(
                    source.path, "each line must be a JSON object", "wrap the values in {...}", line=number
                )
            for name in columns:
                value = record.get(name)
                if isinstance(value, bool | list | dict):
                    raise InputError(
                        source.path,
                        f"field '{name}' must be text, got {type(value).__name__}",
                        "store it as a string",
                        line=number,
                    )
                values[name].append(None if value is None else str(value))
    present = {name: column for name, column in values.items() if any(v is not None for v in column)}
    return pa.table({name: pa.array(column, pa.string()) for name, column in present.items()})


def _read_delimited(source: Source) -> pa.Table:
    delimiter = "\t" if source.format == "tsv" else ","
    try:
        with source.path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter))
    except UnicodeDecodeError:
        raise InputError(source.path, "not valid UTF-8", "re-encode the file as UTF-8", line=1) from None
    try:
        return pacsv.read_csv(
            source.path,
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
            convert_options=pacsv.ConvertOptions(column_types={name: pa.string() for name in header}),
        )
    except pa.ArrowInvalid as error:
        raise _locate_delimited_error(source, delimiter, len(header), str(error)) from None


def _locate_delimited_error(source: Source, delimiter: str, width: int, message: str) -> InputError:
    try:
        with source.path.open(encoding="utf-8", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter, strict=True)
            for row in reader:
                if len(row) != width:
                    return InputError(
                        source.path,
                        f"expected {width} fields, found {len(row)}",
                        "fix the quoting or the number of separators",
                        line=reader.line_num,
                    )
    except csv.Error as error:
        return InputError(
            source.path, f"malformed {source.format.upper()} ({error})", "fix the quoting", line=reader.line_num
        )
    except UnicodeDecodeError as error:
        line = source.path.read_bytes()[: error.start].count(b"\n") + 1
        return InputError(source.path, "not valid UTF-8", "re-encode the file as UTF-8", line=line)
    return source.whole(f"malformed {source.format.upper()} ({message})", "fix the file")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _blake2b_batch(texts: pl.Series) -> pl.Series:
    return pl.Series(
        [hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest() for text in texts], dtype=pl.String
    )


def normalised(text: pl.Expr) -> pl.Expr:
    """Whitespace-collapsed, trimmed text: what 'identical text' means."""
    return text.str.replace_all(r"\s+", " ").str.strip_chars()


def text_hash(text: pl.Expr) -> pl.Expr:
    """Stable content hash of the normalised text (blake2b-128, hex); polars' own hash is not stable."""
    return normalised(text).map_batches(_blake2b_batch, return_dtype=pl.String, is_elementwise=True)


def rows_named(table: pa.Table, column: str, *ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The rows of `table` whose `column` is among `ids`: joins against a corpus then copy only the
    documents they need, not every text of a corpus that may not fit in memory twice."""
    # Ids may come as string, large_string or string_view (polars hands the last two back): compare as the
    # table's own type.
    kind = table.schema.field(column).type
    wanted = pc.unique(pa.chunked_array([chunk.cast(kind) for values in ids for chunk in _chunks(values)], kind))
    return table.filter(pc.is_in(table[column], value_set=wanted))


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(values.chunks) if isinstance(values, pa.ChunkedArray) else [values]
