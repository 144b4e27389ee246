"""Command line: parse arguments into the one config object and run the flow. No logic of its own."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, ParamSpec

import rich.markup
import typer
import typer.core

# typer parses with its own copy of click: its errors are of these classes, not click's.
from typer._click.exceptions import NoSuchOption

from miner.config import CLI_KEYS, MineConfig, load_config, parse_setting, setting_range
from miner.errors import GATE_FAILED, GATE_FAILED_EXIT, GateFailed, InputError, Interrupted, disk_full_as_input_error

P = ParamSpec("P")


def _version(show: bool) -> None:
    if show:
        from importlib.metadata import version

        typer.echo(f"hardneg-miner {version('hardneg-miner')}")
        raise typer.Exit()


app = typer.Typer(
    name="miner",
    help="Mine hard negatives for embedding and reranker training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def _options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="print the version and exit")
    ] = False,
) -> None:
    """Mine hard negatives for embedding and reranker training."""


# The signal that interrupted this process, once one has: what it ends with, whatever the code it hit raised.
_received: list[int] = []


def _interrupt(signum: int, frame: object) -> None:
    if _received:
        return  # the run is already unwinding; a second Ctrl-C must not cut its clean-up short
    _received.append(signum)
    raise Interrupted(signum)


def catch_interrupts() -> None:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread, so a run unwinds through its `finally` blocks."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupt)


def _user_errors(command: Callable[P, None]) -> Callable[P, None]:
    """A user mistake ends the command with one line on stderr and exit code 2, never a traceback; an interrupt
    with one line and 128 + the signal's number."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            disk_full_as_input_error(command)(*args, **kwargs)
        except InputError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except GateFailed as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(GATE_FAILED_EXIT) from None
        except BaseException as error:
            # Code that was running when the signal came may have turned it into an error of its own (torch
            # reports one as `RuntimeError: Invalid (backend, op) pair`; Prefect, catching SIGTERM itself, may
            # fail while unwinding with `Task run is not set`): the signal decides, not the error.
            signalled = _signal_behind(error)
            if not _received and signalled is None:
                raise
            signum = _received[0] if _received else signalled or signal.SIGINT
            typer.echo(
                f"error: interrupted by {signal.Signals(signum).name}; run the same command again to resume "
                "(finished stages are kept)",
                err=True,
            )
            raise typer.Exit(128 + signum) from None

    return run


def _signal_behind(error: BaseException) -> int | None:
    """The signal `error` stands for, or was raised while handling: an interrupt of ours, a KeyboardInterrupt,
    or Prefect's TerminationSignal, anywhere in its chain of causes and contexts. None if no signal is in it."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, Interrupted):
            return current.signum
        if isinstance(current, KeyboardInterrupt):
            return signal.SIGINT
        if type(current).__name__ == "TerminationSignal":  # prefect.exceptions, not imported for this
            return int(getattr(current, "signal", signal.SIGTERM))
        current = current.__cause__ or current.__context__
    return None


class _OneLineOptionErrors(typer.core.TyperCommand):
    """An unknown flag is a user mistake like any other: one line, with the flag it was probably meant to be."""

    def parse_args(self, ctx: typer.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as error:
            close = error.possibilities or []
            listed = f"`miner {ctx.info_name} --help` lists the options"
            fix = f"did you mean {close[0]}? ({listed})" if close else listed
            typer.echo(f"error: {error.option_name}: no such option; {fix}", err=True)
            raise typer.Exit(2) from None


_RUNNING = {"threads", "engine", "dask_address", "workers", "cache", "cache_dir"}
_SECTION = {"retrieval": "Retrieval", "models": "Models", "filter": "Filtering", "sample": "Sampling"}


def _opt(name: str, help: str, flag: str | None = None) -> typer.models.OptionInfo:
    key = CLI_KEYS[name]
    section = "Running" if key in _RUNNING else _SECTION.get(key.split(".")[0], "Input")
    # The range the config enforces, beside the default: "[5; >= 1]", so a refusal's pointer to --help helps.
    bounds = setting_range(key)
    if bounds:
        help = f"{help[:-1]}; {bounds}]" if help.endswith("]") else f"{help} [{bounds}]"
    # Rich reads "[all cores]" or "[none]" as markup and drops it: escaped, the default shows.
    help = rich.markup.escape(help)
    return typer.Option(flag or f"--{name.replace('_', '-')}", help=help, rich_help_panel=section, show_default=False)


@app.command(cls=_OneLineOptionErrors)
@_user_errors
def mine(
    data: Annotated[Path | None, typer.Argument(help="BEIR folder, or a pairs table (.jsonl/.csv/.parquet)")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="output folder")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config; options override it")] = None,
    split: Annotated[str | None, _opt("split", "qrels split (default: train, or the only one)")] = None,
    corpus: Annotated[
        Path | None, _opt("corpus", "corpus table, or a folder of corpus shards, for a pairs input")
    ] = None,
    queries: Annotated[Path | None, _opt("queries", "queries table when pairs name queries by id")] = None,
    min_relevance: Annotated[int | None, _opt("min_relevance", "qrels score that counts as positive [1]")] = None,
    skip_unknown: Annotated[
        bool | None,
        _opt("skip_unknown", "skip and count qrels rows with unknown ids", "--skip-unknown/--no-skip-unknown"),
    ] = None,
    threads: Annotated[int | None, _opt("threads", "threads for Lucene, faiss and torch [all cores]")] = None,
    engine: Annotated[
        str | None, _opt("engine", "local | prefect | auto: prefect when PREFECT_API_URL is set or Dask is used")
    ] = None,
    dask_address: Annotated[str | None, _opt("dask_address", "run sharded stages on this Dask scheduler")] = None,
    workers: Annotated[int | None, _opt("workers", "run sharded stages on a local Dask cluster of N workers")] = None,
    cache: Annotated[bool | None, _opt("cache", "reuse embeddings across runs [on]", "--cache/--no-cache")] = None,
    cache_dir: Annotated[Path | None, _opt("cache_dir", "cache folder [~/.cache/hardneg-miner]")] = None,
    bm25: Annotated[bool | None, _opt("bm25", "BM25 candidates [on]", "--bm25/--no-bm25")] = None,
    bm25_k: Annotated[int | None, _opt("bm25_k", "BM25 hits per query [100]")] = None,
    language: Annotated[
        str | None, _opt("language", "BM25 analyser: en, zh, ja, ko, de, fr, es, ar, ru, hi, ... or auto [en]")
    ] = None,
    dense: Annotated[bool | None, _opt("dense", "dense candidates [on]", "--dense/--no-dense")] = None,
    dense_k: Annotated[int | None, _opt("dense_k", "dense hits per query [200]")] = None,
    bm25_evidence_k: Annotated[
        int | None, _opt("bm25_evidence_k", "BM25 depth read as relevance evidence for dense candidates [1000; 0 off]")
    ] = None,
    dense_index: Annotated[
        str | None, _opt("dense_index", "flat | hnsw | ivf | auto: flat up to retrieval.ann_threshold docs [auto]")
    ] = None,
    model: Annotated[str | None, _opt("model", "embedding model: bundled name or folder [all-MiniLM-L6-v2]")] = None,
    cross_encoder: Annotated[str | None, _opt("cross_encoder", "teacher cross-encoder (folder or id)")] = None,
    allow_untrained_head: Annotated[
        bool | None,
        _opt(
            "allow_untrained_head",
            "score with a --cross-encoder whose classification head would be initialised at random (for tests)",
            "--allow-untrained-head",
        ),
    ] = None,
    trust_remote_code: Annotated[
        bool | None,
        _opt(
            "trust_remote_code",
            "load models whose folder holds code of its own (config.json auto_map); refused without it",
            "--trust-remote-code",
        ),
    ] = None,
    encode_batch_size: Annotated[
        int | None,
        _opt("encode_batch_size", "most texts an encoding batch holds; batches also stop at 2,048 padded tokens [64]"),
    ] = None,
    precision: Annotated[
        str | None, _opt("precision", "auto | float32 | bfloat16; auto is bfloat16 on CPUs with bf16 units [auto]")
    ] = None,
    method: Annotated[str | None, _opt("method", "none | topk-abs | topk-marginpos | topk-percpos [none]")] = None,
    max_score: Annotated[float | None, _opt("max_score", "topk-abs ceiling [0.95]")] = None,
    margin: Annotated[float | None, _opt("margin", "topk-marginpos margin [0.05]")] = None,
    pct: Annotated[float | None, _opt("pct", "topk-percpos fraction of the positive [0.95]")] = None,
    positive_reference: Annotated[str | None, _opt("positive_reference", "min | mean | max [min]")] = None,
    range_min: Annotated[int | None, _opt("range_min", "skip the teacher's top N [0]")] = None,
    range_max: Annotated[int | None, _opt("range_max", "consider up to teacher rank N [10000]")] = None,
    expansion_depth: Annotated[
        str | None,
        _opt("expansion_depth", "drop each query's top N by evidence of relevance: auto or a number [auto; 0 off]"),
    ] = None,
    expansion_weight: Annotated[
        float | None, _opt("expansion_weight", "weight of the positives' similarity in the evidence [1.0]")
    ] = None,
    lexical_weight: Annotated[float | None, _opt("lexical_weight", "weight of BM25 in the evidence [1.0]")] = None,
    hardness_target: Annotated[
        float | None, _opt("hardness_target", "auto depth keeps this x the 10-50 window's query cosine [0.92]")
    ] = None,
    max_false_negatives: Annotated[
        float | None,
        _opt("max_false_negatives", "budget: hardest setting whose held-out false-negative rate is within this"),
    ] = None,
    max_positive_similarity: Annotated[
        float | None, _opt("max_positive_similarity", "drop near-copies of a positive above this cosine")
    ] = None,
    denoise_threshold: Annotated[float | None, _opt("denoise_threshold", "drop teacher scores above this")] = None,
    agreement_depth: Annotated[
        int | None, _opt("agreement_depth", "drop what BM25 and dense both rank within N [0 off]")
    ] = None,
    fallback_steps: Annotated[
        int | None, _opt("fallback_steps", "short pairs may reach past range_max in N steps [0 off]")
    ] = None,
    num_negatives: Annotated[int | None, _opt("num_negatives", "negatives per (query, positive) [5]")] = None,
    sampling: Annotated[str | None, _opt("sampling", "top | random | simans [top]")] = None,
    simans_a: Annotated[float | None, _opt("simans_a", "SimANS kernel width [20]")] = None,
    simans_b: Annotated[float | None, _opt("simans_b", "SimANS offset [0]")] = None,
    seed: Annotated[int | None, _opt("seed", "seed for random sampling")] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="training files to write, repeatable or comma-separated: negatives, triplets, ntuples, "
            "labeled-pairs, flagembedding, tevatron, margin-mse, batched-triplets, batched-ntuples, batched (both; "
            "with --batch-size), or all (every unbatched one; default: negatives, triplets, ntuples; "
            "negatives.parquet is always written)",
            rich_help_panel="Output",
            show_default=False,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            help="rows per training batch of the batched formats (--format batched): conflict-free, topic-clustered",
            rich_help_panel="Output",
            show_default=False,
        ),
    ] = None,
    require: Annotated[
        list[str] | None,
        typer.Option(
            "--require",
            help="quality gate, repeatable: METRIC OP NUMBER such as coverage>=0.95 or false_negative_rate<=0.05; "
            f"a run that misses one is kept aside in OUT.rejected/RUN_ID, not written over OUT, and exits with "
            f"{GATE_FAILED_EXIT} (metrics: docs/settings.md)",
            rich_help_panel="Output",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars, warnings only")] = False,
    json_logs: Annotated[
        bool, typer.Option("--json", help="log JSON lines on stderr and print the result as JSON; no progress bars")
    ] = False,
) -> None:
    """Mine hard negatives from DATA into OUT: the training files chosen with --format, then manifest.json."""
    # Every option named in CLI_KEYS is a config setting; None means "not given".
    given = {name: value for name, value in locals().items() if name in CLI_KEYS}
    overrides = {CLI_KEYS[name]: value for name, value in given.items()}
    overrides.update({"data": data, "out": out, "show_progress": False if quiet or json_logs else None})
    settings = load_config(config, overrides)
    from miner.lock import check_unlocked
    from miner.manifest import check_output_writable
    from miner.pipeline import resolve_models

    # Before anything starts, so the common mistakes cost nothing.
    check_output_writable(settings.out)
    check_unlocked(settings.out)
    resolve_models(settings)
    # The run's own progress at INFO; libraries' chatter only from WARNING up.
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines() if json_logs else logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(_DropUserErrors())  # Prefect's records reach it too
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("miner").setLevel(logging.WARNING if quiet else logging.INFO)
    if settings.uses_prefect:
        manifest = _run_flow(settings, quiet or json_logs, handler if json_logs else None)
    else:
        from miner.run import mine as mine_here

        manifest = mine_here(settings)
    if json_logs:
        result = {
            "out": str(settings.out),
            "manifest": str(settings.out / "manifest.json"),
            **manifest["counts"]["sample"],
        }
        typer.echo(json.dumps(result))
        return
    if not quiet:
        typer.echo(
            f"wrote {settings.out}: {manifest['counts']['sample']['negatives']} negatives; "
            f"see `miner inspect {settings.out}`"
        )


@app.command(cls=_OneLineOptionErrors)
@_user_errors
def audit(
    data: Annotated[Path, typer.Argument(help="BEIR folder whose queries have several judged positives")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for audit.json and audit.parquet")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config every setting starts from")] = None,
    setting: Annotated[
        list[str] | None,
        typer.Option("--setting", "-s", help="'name: key=value, ...' over the config; repeat to sweep"),
    ] = None,
    split: Annotated[str | None, typer.Option("--split", help="qrels split")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars")] = False,
) -> None:
    """Hold out all but one positive per query, mine, and report how many mined negatives are hidden positives."""
    from miner.audit import audit as run_audit
    from miner.audit import format_table, write_report
    from miner.ingest import ingest
    from miner.manifest import check_output_writable

    base = {"data": data, "out": out, "split": split, "show_progress": False if quiet else None}
    named = [parse_setting(text) for text in setting] if setting else [("default", {})]
    # Every setting is validated before any model runs.
    settings = {name: load_config(config, {**base, **overrides}) for name, overrides in named}
    first = next(iter(settings.values()))
    check_output_writable(out)
    from miner.pipeline import resolve_models

    for each in settings.values():
        resolve_models(each)  # every setting's models found, and each cross-encoder checked, before any work
    data_tables = ingest(first.data, split=first.split, min_relevance=first.min_relevance)
    report = run_audit(data_tables, settings)
    write_report(report, out, settings)
    typer.echo(format_table(report))


schedule_app = typer.Typer(
    help="Run mining on a schedule: `miner schedule --config FILE --name NAME --cron '0 2 * * *'` registers it with "
    "the Prefect server; a worker runs it (`prefect worker start --pool hardneg-miner`).",
    no_args_is_help=True,
    invoke_without_command=True,
)
app.add_typer(schedule_app, name="schedule")
_API = typer.Option("--api", help="Prefect API URL [PREFECT_API_URL], e.g. http://127.0.0.1:4200/api")


@schedule_app.callback()
@_user_errors
def schedule(
    ctx: typer.Context,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="TOML config of the runs")] = None,
    name: Annotated[str | None, typer.Option("--name", help="schedule (deployment) name, e.g. nightly")] = None,
    cron: Annotated[str | None, typer.Option("--cron", help="cron expression, e.g. '0 2 * * *'")] = None,
    interval: Annotated[int | None, typer.Option("--interval", help="seconds between runs")] = None,
    timezone: Annotated[str | None, typer.Option("--timezone", help="IANA time zone of the schedule [UTC]")] = None,
    paused: Annotated[bool, typer.Option("--paused", help="register it paused")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="update a schedule of the same name")] = False,
    pool: Annotated[str | None, typer.Option("--pool", help="work pool whose worker runs it (hardneg-miner)")] = None,
    api: Annotated[str | None, _API] = None,
) -> None:
    """Register a scheduled mining run (--config, --name, and --cron or --interval); sub-commands manage them."""
    ctx.obj = api
    if ctx.invoked_subcommand is not None:
        if config or name or cron or interval is not None or timezone or paused or replace or pool:
            raise InputError(ctx.invoked_subcommand, "takes no schedule options", "put only --api before it")
        return
    from miner.schedule import DEFAULT_POOL, create, parse_schedule

    usage = "give --config FILE --name NAME and --cron CRON or --interval SECONDS"
    if config is None:
        raise InputError("--config", "missing", usage)
    if name is None:
        raise InputError("--name", "missing", usage)
    pool = pool or DEFAULT_POOL
    when = parse_schedule(cron, interval, timezone)
    full_name = create(config, name, when, paused=paused, replace=replace, pool=pool, api=api)
    state = " (paused)" if paused else ""
    typer.echo(f"registered {full_name}{state}; a worker runs it: `prefect worker start --pool {pool}`")


@schedule_app.command("list")
@_user_errors
def schedule_list(ctx: typer.Context, api: Annotated[str | None, _API] = None) -> None:
    """Show each schedule, whether it is paused, and its next run."""
    from miner.schedule import format_schedules, list_schedules

    typer.echo(format_schedules(list_schedules(api or ctx.obj)))


@schedule_app.command("pause")
@_user_errors
def schedule_pause(ctx: typer.Context, name: str, api: Annotated[str | None, _API] = None) -> None:
    """Stop scheduling runs of NAME until it is resumed."""
    from miner.schedule import set_paused

    set_paused(name, True, api or ctx.obj)
    typer.echo(f"paused {name}")


@schedule_app.command("resume")
@_user_errors
def schedule_resume(ctx: typer.Context, name: str, api: Annotated[str | None, _API] = None) -> None:
    """Schedule runs of NAME again."""
    from miner.schedule import set_paused

    set_paused(name, False, api or ctx.obj)
    typer.echo(f"resumed {name}")


@schedule_app.command("delete")
@_user_errors
def schedule_delete(ctx: typer.Context, name: str, api: Annotated[str | None, _API] = None) -> None:
    """Remove the schedule NAME (its past runs stay in Prefect)."""
    from miner.schedule import delete

    delete(name, api or ctx.obj)
    typer.echo(f"deleted {name}")


@app.command()
@_user_errors
def report(
    out: Annotated[Path, typer.Argument(help="output folder of a finished `miner mine` run")],
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="where to write the report [OUT/report]")] = None,
) -> None:
    """Write an HTML page with figures (scores, margins, sources, filter counts) and examples; print its path."""
    from miner.report import write_report

    typer.echo(write_report(out, out_dir))


cache_app = typer.Typer(
    help="Inspect or clear the caches (embeddings, teacher scores, BM25 indexes).", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")
_CACHE_DIR = typer.Option("--cache-dir", help="cache folder [MINER_CACHE_DIR or ~/.cache/hardneg-miner]")


def _cache_root(cache_dir: Path | None) -> Path:
    from miner.config import default_cache_dir

    return cache_dir or default_cache_dir()


@cache_app.command("info")
def cache_info(cache_dir: Annotated[Path | None, _CACHE_DIR] = None) -> None:
    """Print each cache entry: what it holds (kind, model, precision, texts), its size, when made and last used."""
    from miner.cache import entries

    root = _cache_root(cache_dir)
    found = entries(root)
    typer.echo(f"{root}")
    if not found:
        typer.echo("  (empty)")
        return
    header = ("kind", "model", "precision", "texts", "rows", "size", "created", "last used", "entry")
    table = [
        (
            entry.kind,
            entry.model,
            entry.precision,
            entry.text,
            f"{entry.rows:,} {entry.unit}",
            f"{entry.size / 1e6:.1f} MB",
            f"{entry.created:%Y-%m-%d %H:%M}",
            f"{entry.last_used:%Y-%m-%d %H:%M}",
            str(entry.path.relative_to(root)),
        )
        for entry in found
    ]
    widths = [max(len(row[column]) for row in [header, *table]) for column in range(len(header))]
    for row in [header, *table]:
        typer.echo("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    total = sum(entry.size for entry in found)
    typer.echo(f"  {len(found)} {'entry' if len(found) == 1 else 'entries'}, {total / 1e6:.1f} MB (times in UTC)")


@cache_app.command("clear")
@_user_errors
def cache_clear(
    cache_dir: Annotated[Path | None, _CACHE_DIR] = None,
    older_than: Annotated[
        str | None,
        typer.Option("--older-than", help="only entries not used for this long: 30d, 12h, 2w, 90m, 45s"),
    ] = None,
) -> None:
    """Remove every cached embedding, teacher score and index, or with --older-than those not used lately."""
    from miner.cache import clear, parse_age

    root = _cache_root(cache_dir)
    age = parse_age(older_than) if older_than is not None else None
    removed = clear(root, age)
    freed = sum(entry.size for entry in removed) / 1e6
    if age is None:
        typer.echo(f"cleared {root} ({freed:.1f} MB)")
        return
    count = f"{len(removed)} {'entry' if len(removed) == 1 else 'entries'}"
    typer.echo(f"removed {count} not used for {older_than.strip()} from {root} ({freed:.1f} MB)")


@app.command()
@_user_errors
def inspect(
    out: Annotated[Path, typer.Argument(help="output folder of `miner mine`")],
    as_json: Annotated[bool, typer.Option("--json", help="print the counts and scores as JSON")] = False,
) -> None:
    """Print a run's counts per stage and score statistics from its manifest."""
    path = out / "manifest.json"
    if not path.is_file():
        raise InputError(path, "no manifest here", "point at a folder written by `miner mine` that finished")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(path, f"not valid JSON ({error.msg})", "re-run `miner mine`", line=error.lineno) from None
    summary = {key: manifest.get(key) for key in ("teacher", "counts", "scores", "timings_s")}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    typer.echo(f"{out}  (teacher: {summary['teacher']}, created {manifest.get('created')})")
    for stage, counts in (summary["counts"] or {}).items():
        typer.echo(f"\n{stage}")
        for name, value in counts.items():
            # A format spec prints True as 1: a flag's value must read as one.
            shown = str(value).lower() if isinstance(value, bool) else value
            typer.echo(f"  {name:<40} {shown:>10}")
    typer.echo("\nteacher scores")
    typer.echo(f"  {'':<16}" + "".join(f"{c:>9}" for c in ("count", "mean", "min", "p5", "p50", "p95", "max")))
    for name, stats in (summary["scores"] or {}).items():
        cells = "".join(
            f"{stats.get(c, float('nan')):>9.3f}" if c != "count" else f"{stats.get(c, 0):>9}"
            for c in ("count", "mean", "min", "p5", "p50", "p95", "max")
        )
        typer.echo(f"  {name:<16}{cells}")
    typer.echo("\ntimings (s)  " + ", ".join(f"{k} {v}" for k, v in (summary["timings_s"] or {}).items()))


class _JsonLines(logging.Formatter):
    """One JSON object per log record, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and record.exc_info[1] is not None:
            entry["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        return json.dumps(entry)


def _run_flow(settings: MineConfig, quiet: bool, json_handler: logging.Handler | None = None) -> dict:
    if quiet:
        os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"  # read by Prefect when it is first imported
    if settings.dask_address is not None:
        from miner.distributed import check_scheduler_reachable

        check_scheduler_reachable(settings.dask_address)
    from flows.mine import run_mine_flow  # first: its import creates the loggers adjusted next

    _prefect_logging(quiet)
    if json_handler is not None:
        # Prefect's loggers do not propagate; the run's own lines still go out, as JSON.
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).handlers = [json_handler]
    with _prefect_level(quiet):
        return run_mine_flow(settings)


class _DropUserErrors(logging.Filter):
    """Prefect logs a failed task's exception with its traceback; a user error or an interrupt must stay one
    line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _received or _about_an_interrupt(record):
            return False  # the flow and its tasks crash on the way out of an interrupted run: said once, by us
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, GateFailed) or GATE_FAILED in record.getMessage():
            return False  # the CLI says it once, in its last line
        return not isinstance(error, InputError) and "InputError" not in record.getMessage()


def _about_an_interrupt(record: logging.LogRecord) -> bool:
    """Whether a record reports a signal: Prefect catches SIGTERM itself first, and logs the crash it makes of it
    (and errors raised while it unwinds) before handing the signal back."""
    error = record.exc_info[1] if record.exc_info else None
    while error is not None:
        if not isinstance(error, Exception):  # KeyboardInterrupt, Prefect's TerminationSignal, Interrupted
            return True
        error = error.__context__
    return "termination signal" in record.getMessage()


def _prefect_level(quiet: bool) -> contextlib.AbstractContextManager[object]:
    """Prefect re-reads its logging level when its temporary server starts; keep it at WARNING in that case."""
    if not quiet:
        return contextlib.nullcontext()
    from prefect.settings import PREFECT_LOGGING_LEVEL, temporary_settings

    return temporary_settings(updates={PREFECT_LOGGING_LEVEL: "WARNING"})


def _prefect_logging(quiet: bool) -> None:
    import prefect  # noqa: F401  (configures Prefect's loggers, which we then adjust)

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropUserErrors) for f in logger.filters):
            logger.addFilter(_DropUserErrors())
    if quiet:
        # Prefect sets levels on its child loggers, so the parent's level alone does not quieten them.
        for name in [n for n in logging.root.manager.loggerDict if n == "prefect" or n.startswith("prefect.")]:
            logging.getLogger(name).setLevel(logging.WARNING)


def main() -> None:
    # Offline by default: no telemetry calls from Prefect or the hub client.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server's first start creates its database; on a busy two-core machine that took longer
    # than Prefect's default 20 s, and the run failed before it began.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    catch_interrupts()
    try:
        app()
    finally:
        # The command is over: a signal could only land in the interpreter's exit (atexit callbacks of Prefect,
        # Dask, torch), as a traceback. The outcome is decided by then, so it is ignored.
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)
        # Every output is written and closed by now. Left tracked, the modules torch, transformers and their
        # kin loaded are walked by the collector as the interpreter exits: about a second of a run's wall time.
        # Frozen, they are left to the process's end; atexit callbacks and thread joins still run.
        gc.freeze()


if __name__ == "__main__":
    main()
