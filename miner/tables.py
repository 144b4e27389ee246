"""Reading user tables (JSONL, CSV/TSV, Parquet) into polars frames of text columns.

Fast path: pyarrow's columnar readers, no Python object per row. Only when a file fails to parse do
we scan it line by line, to tell the user exactly which line is wrong and why.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import mmap
import os
import tempfile
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
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
    # The file's columns, once its first block is read: a refusal about a column lists them.
    columns: list[str] = field(default_factory=list, compare=False)

    def columns_found(self) -> str:
        return f"columns found: {', '.join(self.columns) or 'none'}"

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


# A large table is read a block at a time: this many bytes of JSONL/CSV, or this many Parquet rows. Ingest then
# holds one block's frames, not the corpus.
BLOCK_BYTES = 32 * 2**20
BLOCK_ROWS = 65_536


def read_text_table(path: Path, columns: list[str], optional: tuple[str, ...] = ()) -> tuple[pl.DataFrame, Source]:
    """Read `columns` (required) and `optional` columns of a table file as text, the whole file at once.

    Numbers are accepted and turned into text (ids are often numeric); nested values are refused.
    """
    source, blocks = text_blocks(path, columns, optional, whole=True)
    return next(iter(blocks)), source


def text_blocks(
    path: Path, columns: list[str], optional: tuple[str, ...] = (), *, whole: bool = False
) -> tuple[Source, Iterator[pl.DataFrame]]:
    """`read_text_table` a block at a time (one block when `whole`): frames of the file's rows in order.

    Required columns are checked against the first block; a later block that lacks one gets it as nulls, so its
    rows fail the caller's own checks with their lines. Errors name the file's line or row as a whole read does.
    """
    if not path.is_file():
        raise InputError(path, "file not found", "check the path")
    source = Source(path, file_format(path))
    if path.stat().st_size == 0:
        raise source.whole("file is empty", "give it a header or at least one row")
    return source, _text_frames(source, columns, optional, whole)


def _text_frames(source: Source, columns: list[str], optional: tuple[str, ...], whole: bool) -> Iterator[pl.DataFrame]:
    if source.format == "parquet":
        tables = _read_parquet(source, [*columns, *optional], whole)
    elif source.format == "jsonl":
        tables = _read_jsonl(source, [*columns, *optional], whole)
    else:
        tables = _read_delimited(source, whole)
    offset = 0
    for number, table in enumerate(tables):
        if number == 0 and not source.columns:
            source.columns[:] = table.column_names
        missing = [name for name in columns if name not in table.column_names]
        if missing and number == 0:
            raise source.whole(f"missing column '{missing[0]}' ({source.columns_found()})", "add or rename that column")
        yield _as_text(table, source, columns, optional, offset)
        offset += table.num_rows


def _as_text(
    table: pa.Table, source: Source, columns: list[str], optional: tuple[str, ...], offset: int
) -> pl.DataFrame:
    wanted = [name for name in [*columns, *optional] if name in table.column_names]
    frame = pl.from_arrow(table.select(wanted))
    assert isinstance(frame, pl.DataFrame)
    casts = []
    for name in wanted:
        if frame.schema[name].is_nested():
            index = frame.with_row_index("_i").filter(pl.col(name).is_not_null())["_i"][0]
            raise source.fail(
                offset + int(index), f"column '{name}' holds nested values, not text", "store it as a string"
            )
        casts.append(pl.col(name).cast(pl.String))
    absent = [pl.lit(None, pl.String).alias(name) for name in columns if name not in wanted]
    return frame.select(casts + absent).select([*columns, *(name for name in optional if name in wanted)])


# Anything pyarrow raises on a damaged file (ArrowInvalid, ArrowNotImplementedError, its OSErrors).
_UNREADABLE = (pa.ArrowException, OSError)


def _read_parquet(source: Source, names: list[str], whole: bool) -> Iterator[pa.Table]:
    try:
        file = pq.ParquetFile(source.path)
        source.columns[:] = file.schema_arrow.names  # only the wanted ones are read
        present = [name for name in names if name in file.schema_arrow.names]
        if whole or file.metadata.num_rows == 0:
            tables: Iterable[pa.Table] = [file.read(columns=present)]
        else:
            tables = _parquet_blocks(file, present)
        for table in tables:
            table.validate(full=True)
            yield table
    except _UNREADABLE as error:
        raise source.whole(f"not a readable Parquet file ({error})", "rewrite it with a Parquet writer") from None


def _parquet_blocks(file: pq.ParquetFile, columns: list[str]) -> Iterator[pa.Table]:
    """Blocks of about BLOCK_ROWS rows, read one row group at a time: one `iter_batches` over the whole file kept
    what it had decoded (pyarrow's allocations grew by 460 MB over the first 600,000 rows of a 1M-row file made of
    10,000-row groups); per row group they stayed under 20 MB."""
    pending: list[pa.RecordBatch] = []
    rows = 0
    for group in range(file.num_row_groups):
        for batch in file.iter_batches(batch_size=BLOCK_ROWS, row_groups=[group], columns=columns):
            pending.append(batch)
            rows += batch.num_rows
            if rows >= BLOCK_ROWS:
                yield pa.Table.from_batches(pending)
                pending, rows = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def _read_jsonl(source: Source, columns: list[str], whole: bool) -> Iterator[pa.Table]:
    for first_line, data in _line_blocks(source.path, None if whole else BLOCK_BYTES):
        yield _parse_jsonl(source, data, first_line, columns)


def _line_blocks(path: Path, size: int | None) -> Iterator[tuple[int, bytes]]:
    """(number of its first line, bytes) of blocks of whole lines of about `size` bytes (None: one block)."""
    with path.open("rb") as handle:
        if size is None:
            yield 1, handle.read()
            return
        line, rest = 1, b""
        while chunk := handle.read(size):
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # a line longer than a block: read on until it ends
                rest = data
                continue
            yield line, data[:cut]
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
        if rest:
            yield line, rest


def _parse_jsonl(source: Source, data: bytes, first_line: int, columns: list[str]) -> pa.Table:
    try:
        table = pajson.read_json(pa.BufferReader(data))
        table.validate(full=True)  # the JSON reader lets invalid UTF-8 through; this catches it
        # It also reads an object spread over several lines; JSONL is one object per line, and the lines
        # are what errors point at, so such a file goes to the line-by-line scan, which names the line.
        table.schema.names  # noqa: B018 -- and invalid UTF-8 in a key only shows when the names are decoded
        if table.num_rows == sum(1 for raw in data.split(b"\n") if raw.strip()):
            return table
        return _scan_jsonl(source, data, first_line, columns)
    except (pa.ArrowInvalid, UnicodeDecodeError):
        # pyarrow reports block-relative rows and refuses mixed types (ids that are sometimes numbers);
        # scanning the lines ourselves finds the exact line or reads what pyarrow would not.
        return _scan_jsonl(source, data, first_line, columns)


def _scan_jsonl(source: Source, data: bytes, first_line: int, columns: list[str]) -> pa.Table:
    values: dict[str, list[str | None]] = {name: [] for name in columns}
    for number, raw in enumerate(data.split(b"\n"), start=first_line):
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
            raise InputError(source.path, "each line must be a JSON object", "wrap the values in {...}", line=number)
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


def _read_delimited(source: Source, whole: bool) -> Iterator[pa.Table]:
    delimiter = "\t" if source.format == "tsv" else ","
    try:
        with source.path.open(encoding="utf-8", newline="") as handle:
            header = next(csv.reader(handle, delimiter=delimiter))
    except UnicodeDecodeError:
        raise InputError(source.path, "not valid UTF-8", "re-encode the file as UTF-8", line=1) from None
    parse = pacsv.ParseOptions(delimiter=delimiter)
    convert = pacsv.ConvertOptions(column_types={name: pa.string() for name in header})
    try:
        if whole:
            yield pacsv.read_csv(source.path, parse_options=parse, convert_options=convert)
            return
        read = pacsv.ReadOptions(block_size=BLOCK_BYTES)
        reader = pacsv.open_csv(source.path, read_options=read, parse_options=parse, convert_options=convert)
        blocks = 0
        for batch in reader:
            blocks += 1
            yield pa.Table.from_batches([batch])
        if blocks == 0:
            yield reader.schema.empty_table()
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
    # A batch at a time, dropping the pages a spooled corpus' batch brought in before the next.
    kept = []
    for batch in table.to_batches():
        kept.append(batch.filter(pc.is_in(batch[column], value_set=wanted)))
        drop_mapped_pages()
    return pa.Table.from_batches(kept, schema=table.schema)


def _chunks(values: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(values.chunks) if isinstance(values, pa.ChunkedArray) else [values]


# The mappings of spooled tables still alive. Reading rows through a mapping leaves its pages in this process (and
# the kernel maps in the pages around each one touched), so a scan of a spooled corpus drops them as it goes.
_MAPPINGS: weakref.WeakSet[mmap.mmap] = weakref.WeakSet()


def drop_mapped_pages() -> None:
    """Hand the pages of spooled tables read so far back to the kernel; they are read again from the page cache
    (or the disk) if needed. Their contents do not change: the files are read-only."""
    for mapping in list(_MAPPINGS):
        mapping.madvise(mmap.MADV_DONTNEED)


def scanned(column: pa.ChunkedArray) -> Iterator[pa.Array]:
    """The chunks of `column`, the pages of a spooled table dropped after each one is used."""
    for chunk in column.chunks:
        yield chunk
        drop_mapped_pages()


class TableSpool:
    """Tables of one schema appended to an Arrow IPC file, then read back memory-mapped: a table as large as the
    disk allows that costs the process only the pages it reads. Without a folder, the tables stay in memory.

    The file is unlinked once mapped (the mapping keeps it readable), so it is gone when the process is, however
    the process ends; a spool left by a killed run is a `.*.tmp` file the next run's work folder clears.
    """

    def __init__(self, schema: pa.Schema, folder: Path | None) -> None:
        self.schema = schema
        self._tables: list[pa.Table] = []
        self._path: Path | None = None
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._made_folder: Path | None = None  # removed again when empty: a refused run leaves nothing behind
        if folder is not None:
            if not folder.exists():
                self._made_folder = folder
            folder.mkdir(parents=True, exist_ok=True)
            handle, name = tempfile.mkstemp(prefix=".spool-", suffix=".arrow.tmp", dir=folder)
            os.close(handle)
            self._path = Path(name)
            self._writer = pa.ipc.new_file(str(self._path), schema)

    def write(self, table: pa.Table) -> None:
        if self._writer is None:
            self._tables.append(table)
        else:
            self._writer.write_table(table)

    def table(self) -> pa.Table:
        if self._writer is None or self._path is None:
            return pa.concat_tables(self._tables) if self._tables else self.schema.empty_table()
        self._writer.close()
        self._writer = None
        with self._path.open("rb") as handle:
            mapping = mmap.mmap(handle.fileno(), 0, prot=mmap.PROT_READ)
        _MAPPINGS.add(mapping)
        mapped = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(mapping))).read_all()
        self.discard()
        return mapped

    def discard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
        if self._made_folder is not None:
            with contextlib.suppress(OSError):
                self._made_folder.rmdir()

    def __enter__(self) -> TableSpool:
        return self

    def __exit__(self, *failure: object) -> None:
        self.discard()
