"""`miner report`: a finished run's manifest and negatives as one static HTML page with PNG figures.

The page needs no server: open `OUT/report/index.html` from disk. matplotlib is imported inside the
functions that draw, so that `miner mine` does not pay for its import.
"""

from __future__ import annotations

import errno
import html
import json
import os
import random
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from miner import schema
from miner.errors import InputError
from miner.export import MANIFEST_FILE, NEGATIVES_FILE, REPORT_DIR
from miner.manifest import check_output_writable

if TYPE_CHECKING:
    from matplotlib.axes import Axes

INDEX_FILE = "index.html"
EXAMPLE_QUERIES = 10
EXAMPLE_SEED = 0
# Texts longer than this are cut in the examples table; the full text stays one click away.
SHORT_TEXT = 240

# Named so that a test can find the figures in a screenshot by their colours.
POSITIVE_COLOR = "#1b9e77"
NEGATIVE_COLOR = "#d95f02"
POOL_COLOR = "#7570b3"
RULE_COLOR = "#e7298a"

_SOURCES = ("bm25", "dense", "both")
_RERUN = "re-run the `miner mine` command that wrote it"
# The columns of negatives.parquet the report reads: a run of an older version without the rest still reports.
_COLUMNS = pa.schema(
    [
        schema.NEGATIVES.field(name)
        for name in [
            *("query_id", "positive_id", "negative_id", "query", "positive", "negative"),
            *("positive_score", "negative_score", "negative_rank", "source"),
        ]
    ]
)


@dataclass(frozen=True)
class Run:
    """What a finished `miner mine` folder holds that the report reads."""

    folder: Path
    manifest: dict[str, Any]
    negatives: pl.DataFrame

    def counts(self, stage: str) -> dict[str, int]:
        section = self.manifest.get("counts", {}).get(stage)
        return section if isinstance(section, dict) else {}


@dataclass(frozen=True)
class FigureSpec:
    file: str
    title: str
    caption: str
    draw: Callable[[Axes, Run], None]


def read_run(out: Path) -> Run:
    """The manifest and negatives of a finished run, or an InputError naming the file that is wrong."""
    if not out.is_dir():
        problem = "is a file, not an output folder" if out.exists() else "no such folder"
        raise InputError(out, problem, "give the --out folder of a finished `miner mine` run")
    manifest_path = out / MANIFEST_FILE
    if not manifest_path.is_file():
        raise InputError(
            manifest_path,
            "no manifest here, so the run did not finish or the folder was not written by `miner mine`",
            f"point at a finished run's folder, or {_RERUN} to finish it (it resumes where it stopped)",
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(manifest_path, "not valid UTF-8", _RERUN) from None
    except json.JSONDecodeError as error:
        raise InputError(manifest_path, f"not valid JSON ({error.msg})", _RERUN, line=error.lineno) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("counts"), dict):
        raise InputError(manifest_path, "not a `miner mine` manifest (no counts)", _RERUN)
    return Run(out.resolve(), manifest, _read_negatives(out / NEGATIVES_FILE, manifest))


def _read_negatives(path: Path, manifest: dict[str, Any]) -> pl.DataFrame:
    if not path.is_file():
        raise InputError(path, "missing, though the manifest says the run finished", _RERUN)
    try:
        table = pq.read_table(path)
        table.validate(full=True)
    except (pa.ArrowInvalid, OSError) as error:
        raise InputError(path, f"not a readable Parquet file ({error})", _RERUN) from None
    missing = [name for name in _COLUMNS.names if name not in table.column_names]
    if missing:
        raise InputError(path, f"lacks the columns {missing}", f"{_RERUN} with this version")
    recorded = manifest["counts"].get("export", {}).get(NEGATIVES_FILE)
    if recorded is not None and recorded != table.num_rows:
        # A file replaced after the run would be reported under the wrong run's settings.
        raise InputError(path, f"has {table.num_rows} rows, the manifest says {recorded}", _RERUN)
    return pl.from_arrow(schema.conform(table, _COLUMNS))


def write_report(out: Path, report_dir: Path | None = None) -> Path:
    """Write the report of the run in `out` into `report_dir` (default OUT/report); return its index.html."""
    run = read_run(out)
    out = out.resolve()
    report_dir = (report_dir or out / REPORT_DIR).resolve()
    # The scratch folder must not sit inside OUT, a folder trainers read; beside it is the same filesystem.
    scratch_parent = out.parent if report_dir.parent == out else report_dir.parent
    for folder in (report_dir, scratch_parent):
        check_output_writable(folder)
    scratch_parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the folder may become the report itself, and should get the umask's mode, not 0700.
    scratch = scratch_parent / f".{report_dir.name}.{secrets.token_hex(6)}.report-tmp"
    scratch.mkdir()
    try:
        for figure in FIGURES:
            _draw(figure, run, scratch / figure.file)
        (scratch / INDEX_FILE).write_text(render_html(run), encoding="utf-8")
        _publish(scratch, report_dir, [figure.file for figure in FIGURES])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report_dir / INDEX_FILE


def _publish(scratch: Path, report_dir: Path, figures: list[str]) -> None:
    """Move the finished files into `report_dir`, index.html last: a folder with an index.html is complete."""
    if not report_dir.exists():
        try:
            os.replace(scratch, report_dir)
            return
        except OSError as error:
            # Another report created the folder meanwhile: replace its files one by one instead.
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    # An old page must not show new figures under old numbers while they are replaced one by one.
    (report_dir / INDEX_FILE).unlink(missing_ok=True)
    for name in [*figures, INDEX_FILE]:
        os.replace(scratch / name, report_dir / name)


# Figures ------------------------------------------------------------------------------------------------


def _draw(figure: FigureSpec, run: Run, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # The object API with its own Agg canvas: no pyplot, so no global figure state and no GUI backend.
    canvas_figure = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(canvas_figure)
    axes = canvas_figure.add_subplot()
    figure.draw(axes, run)
    axes.set_title(figure.title)
    canvas_figure.savefig(path, format="png")


def _no_data(axes: Axes, what: str) -> None:
    axes.text(0.5, 0.5, f"no {what}", ha="center", va="center", transform=axes.transAxes, color="0.4")
    axes.set_xticks([])
    axes.set_yticks([])


def _pair_scores(run: Run) -> pl.Series:
    return run.negatives.unique(["query_id", "positive_id"], maintain_order=True)["positive_score"]


def _draw_scores(axes: Axes, run: Run) -> None:
    import numpy as np

    positives = _pair_scores(run).drop_nans().to_numpy()
    negatives = run.negatives["negative_score"].drop_nans().to_numpy()
    if positives.size + negatives.size == 0:
        _no_data(axes, "scores")
        return
    # Shared bins, so the two shapes compare bar for bar.
    bins = np.histogram_bin_edges(np.concatenate([positives, negatives]), bins=30)
    axes.hist(negatives, bins=bins, alpha=0.6, color=NEGATIVE_COLOR, label=f"negatives ({negatives.size})")
    axes.hist(positives, bins=bins, alpha=0.6, color=POSITIVE_COLOR, label=f"positives ({positives.size})")
    # A '$' pair in a model path would be read as mathtext by matplotlib.
    teacher = str(run.manifest.get("teacher", "teacher")).replace("$", r"\$")
    axes.set_xlabel(f"teacher score ({teacher})")
    axes.set_ylabel("count")
    axes.legend()


def _draw_margin(axes: Axes, run: Run) -> None:
    margin = (run.negatives["positive_score"] - run.negatives["negative_score"]).drop_nans().to_numpy()
    if margin.size == 0:
        _no_data(axes, "negatives")
        return
    axes.hist(margin, bins=30, color=POOL_COLOR)
    # Left of zero the teacher prefers the negative to the positive: the likeliest false negatives.
    axes.axvline(0.0, color="black", linewidth=1, linestyle="--")
    axes.set_xlabel("positive score - negative score")
    axes.set_ylabel("negatives")


def negatives_per_pair(run: Run) -> dict[int, int]:
    """How many (query, positive) pairs got each number of negatives, pairs with none included."""
    sizes = run.negatives.group_by(["query_id", "positive_id"]).len()["len"].value_counts()
    histogram = {int(size): int(pairs) for size, pairs in sizes.iter_rows()}
    # Pairs without a negative have no row in negatives.parquet; only the manifest counts them.
    without = int(run.counts("sample").get("pairs_without_negatives", 0))
    if without:
        histogram[0] = without
    return dict(sorted(histogram.items()))


def _draw_per_pair(axes: Axes, run: Run) -> None:
    histogram = negatives_per_pair(run)
    if not histogram:
        _no_data(axes, "pairs")
        return
    quota = run.manifest.get("config", {}).get("sample", {}).get("num_negatives")
    # Every count from 0 to the quota gets a slot, so a shortfall shows as bars left of the quota.
    sizes = list(range(max([*histogram, quota if isinstance(quota, int) else 0]) + 1))
    bars = axes.bar(sizes, [histogram.get(size, 0) for size in sizes], width=0.6, color=POSITIVE_COLOR)
    axes.bar_label(bars)
    axes.set_xticks(sizes)
    axes.set_xlabel("negatives per (query, positive)" + (f"  (quota {quota})" if quota else ""))
    axes.set_ylabel("pairs")


def source_mix(run: Run) -> dict[str, dict[str, int]]:
    """Which retrievers found the candidate pool and the exported negatives: bm25 only, dense only, both."""
    candidates = run.counts("candidates")
    exported = dict(run.negatives["source"].value_counts().iter_rows())
    return {
        "candidate pool": {source: int(candidates.get(f"source_{source}", 0)) for source in _SOURCES},
        "exported negatives": {source: int(exported.get(source, 0)) for source in _SOURCES},
    }


def _draw_sources(axes: Axes, run: Run) -> None:
    import numpy as np

    mix = source_mix(run)
    positions = np.arange(len(_SOURCES))
    width = 0.4
    for offset, (name, counts), color in zip(
        (-width / 2, width / 2), mix.items(), (POOL_COLOR, NEGATIVE_COLOR), strict=True
    ):
        total = sum(counts.values())
        # Shares, because the pool is many times the size of the export.
        shares = [100 * counts[source] / total if total else 0 for source in _SOURCES]
        bars = axes.bar(positions + offset, shares, width, color=color, label=f"{name} ({total})")
        axes.bar_label(bars, labels=[str(counts[source]) for source in _SOURCES], fontsize=8)
    axes.set_xticks(positions, [f"{source} only" if source != "both" else source for source in _SOURCES])
    axes.set_ylabel("% of rows (labels: counts)")
    axes.set_ylim(0, 110)
    axes.legend()


def filter_removals(run: Run) -> dict[str, int]:
    """Candidates each filter rule removed, in the manifest's order; `kept` is not a removal."""
    return {rule: int(count) for rule, count in run.counts("filter").items() if rule != "kept"}


def _draw_filter(axes: Axes, run: Run) -> None:
    removals = filter_removals(run)
    if not removals:
        _no_data(axes, "filter counts in the manifest")
        return
    rules = list(removals)[::-1]  # first rule on top, the order the filter applies them
    bars = axes.barh(rules, [removals[rule] for rule in rules], color=RULE_COLOR)
    axes.bar_label(bars, padding=2, fontsize=8)
    axes.set_xlabel(f"candidates removed (kept: {run.counts('filter').get('kept', '?')})")
    axes.margins(x=0.15)


FIGURES = (
    FigureSpec(
        "scores.png",
        "Teacher scores",
        "Teacher scores of the positives (one per query and positive) and of the exported negatives.",
        _draw_scores,
    ),
    FigureSpec(
        "margin.png",
        "Positive - negative margin",
        "Per exported negative: its positive's teacher score minus its own. Left of the dashed line the teacher "
        "scores the negative above its positive: the hardest negatives, not a count of false negatives (the "
        "estimated false-negative rate is in the section above).",
        _draw_margin,
    ),
    FigureSpec(
        "negatives_per_pair.png",
        "Negatives per (query, positive)",
        "How many pairs got each number of negatives; pairs below the quota had too few candidates left.",
        _draw_per_pair,
    ),
    FigureSpec(
        "sources.png",
        "Retriever mix",
        "Which retriever found each row: BM25 only, dense only, or both; candidate pool (manifest) against "
        "exported negatives (negatives.parquet).",
        _draw_sources,
    ),
    FigureSpec(
        "filter.png",
        "What each filter rule removed",
        "Candidates removed by each rule, top to bottom in the order the rules apply; a candidate is counted "
        "under the first rule that removed it. `positive` counts the labelled positives found among candidates.",
        _draw_filter,
    ),
)


# Page ---------------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1400px; }
h1 { margin-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; vertical-align: top; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
.summary { display: flex; flex-wrap: wrap; gap: 1.5rem; }
.figures { display: flex; flex-wrap: wrap; gap: 1rem; }
figure { margin: 0; width: 560px; }
figure img { width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { font-size: 0.85rem; color: #444; }
.changed { font-weight: bold; }
.examples td { width: 33%; font-size: 0.9rem; }
.examples ol { margin: 0; padding-left: 1.2rem; }
.meta { color: #666; font-size: 0.8rem; }
.broken { color: #b00; font-weight: bold; }
"""

# Marks each image as loaded or not once the page has loaded, and says so on the page when a figure file is
# missing (e.g. index.html copied without its PNGs). It reads nothing but the page itself.
_IMAGE_CHECK = """
window.addEventListener("load", function () {
  for (const image of document.querySelectorAll("img")) {
    const loaded = image.complete && image.naturalWidth > 0;
    image.dataset.loaded = loaded ? "yes" : "no";
    if (!loaded) {
      const note = document.createElement("p");
      note.className = "broken";
      note.textContent = "figure file missing: " + image.getAttribute("src") + "; run `miner report` again";
      image.after(note);
    }
  }
});
"""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _code(escaped: str) -> str:
    """`name` in an escaped caption as code: captions are written in the same markup as the rest of the docs."""
    return re.sub(r"`([^`<>]+)`", r"<code>\1</code>", escaped)


def _text(value: str | None) -> str:
    """A passage for the examples table: escaped, and cut with the full text behind a click when long."""
    if value is None:
        return '<span class="meta">(no text)</span>'
    if len(value) <= SHORT_TEXT:
        return _e(value)
    return f"<details><summary>{_e(value[:SHORT_TEXT].rstrip())}…</summary>{_e(value)}</details>"


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def _rows(pairs: Iterable[tuple[str, object]], changed: frozenset[str] = frozenset()) -> str:
    cells = []
    for name, value in pairs:
        css = ' class="changed"' if name in changed else ""
        number = isinstance(value, int | float) and not isinstance(value, bool)
        value_cell = f'<td class="number">{_e(value)}</td>' if number else f"<td>{_e(value)}</td>"
        cells.append(f"<tr{css}><th>{_e(name)}</th>{value_cell}</tr>")
    return "<table>" + "".join(cells) + "</table>"


def _flat_settings(config: dict[str, Any]) -> dict[str, object]:
    """The sectioned settings (retrieval, models, filter, sample) as dotted keys, as the config file names them."""
    return {
        f"{section}.{key}": value
        for section, values in config.items()
        if isinstance(values, dict)
        for key, value in values.items()
    }


def _default_settings() -> dict[str, object]:
    from miner.config import MineConfig

    defaults = {
        section: field.default.model_dump(mode="json")
        for section, field in MineConfig.model_fields.items()
        if hasattr(field.default, "model_dump")
    }
    return _flat_settings(defaults)


def _summary_html(run: Run) -> str:
    manifest = run.manifest
    config = manifest.get("config", {}) if isinstance(manifest.get("config"), dict) else {}
    models = manifest.get("models", {}) if isinstance(manifest.get("models"), dict) else {}
    run_rows = [
        ("input", config.get("data", "?")),
        ("output", run.folder),
        ("run id", manifest.get("run_id", "?")),
        ("created", manifest.get("created", "?")),
        ("teacher", manifest.get("teacher", "?")),
        *[(f"{role} model", ref.get("location", ref)) for role, ref in models.items() if isinstance(ref, dict)],
        ("resumed stages", ", ".join(manifest.get("resumed_stages", [])) or "none"),
    ]
    ingest, sample, filtered = run.counts("ingest"), run.counts("sample"), run.counts("filter")
    count_rows = [
        ("queries with positives", ingest.get("queries_with_positives", "?")),
        ("documents", ingest.get("documents", "?")),
        ("positives", ingest.get("positives", "?")),
        ("candidate pool", run.counts("candidates").get("pool", "?")),
        ("kept by the filter", filtered.get("kept", "?")),
        ("pairs (query, positive)", sample.get("pairs", "?")),
        ("pairs with the full quota", sample.get("pairs_full", "?")),
        ("pairs short", sample.get("pairs_short", "?")),
        ("pairs without negatives", sample.get("pairs_without_negatives", "?")),
        ("negatives exported", run.negatives.height),
    ]
    timings = manifest.get("timings_s", {}) if isinstance(manifest.get("timings_s"), dict) else {}
    timing_rows = [
        *timings.items(),
        ("sum", round(sum(v for v in timings.values() if isinstance(v, int | float)), 3)),
    ]
    settings = _flat_settings(config)
    defaults = _default_settings()
    changed = frozenset(key for key, value in settings.items() if key in defaults and defaults[key] != value)
    changed_text = ", ".join(f"{key} = {settings[key]}" for key in sorted(changed)) or "none"
    return (
        '<div class="summary">'
        f"<section><h2>Run</h2>{_rows(run_rows)}</section>"
        f"<section><h2>Counts</h2>{_rows(count_rows)}</section>"
        f"<section><h2>Timings (s)</h2>{_rows(timing_rows)}</section>"
        f"<section><h2>Settings</h2><p>Changed from the defaults: {_e(changed_text)}</p>"
        f"<details><summary>all settings (changed ones in bold)</summary>{_rows(settings.items(), changed)}"
        "</details></section>"
        "</div>"
    )


def false_negative_summary(run: Run) -> list[str]:
    """Sentences on what the false-negative filter did and the estimated false-negative rate, from the manifest."""
    filtered, manifest = run.counts("filter"), run.manifest
    pool = run.counts("candidates").get("pool", "?")
    choice = manifest.get("filter_choice") if isinstance(manifest.get("filter_choice"), dict) else {}
    lines = []
    removed = {rule: n for rule, n in filtered.items() if rule not in ("kept", "positive") and n}
    if removed:
        listed = ", ".join(f"{rule} {n}" for rule, n in sorted(removed.items(), key=lambda item: -item[1]))
        lines.append(f"The filter removed {sum(removed.values())} of {pool} candidates ({listed}).")
    expansion = choice.get("expansion")
    if isinstance(expansion, dict):
        lines.append(
            f"The evidence cut (positive_expansion) took each query's top {expansion.get('expansion_depth')} "
            "candidates by evidence of relevance (cosine with the query and with its positives, BM25): the "
            f"deepest cut whose negatives keep {expansion.get('hardness_target')} x the query cosine of teacher "
            f"ranks 11-50 ({expansion.get('negatives_cosine')} against {expansion.get('reference_cosine')})."
        )
    budget = choice.get("budget")
    if isinstance(budget, dict):
        if budget.get("applied"):
            chosen = budget.get("chosen", {})
            lines.append(
                f"False-negative budget {budget.get('budget')}: hardness target {chosen.get('hardness_target')} "
                f"chosen, measured at {chosen.get('rate', 0):.1%}"
                + ("." if budget.get("met") else ", over the budget: no setting tried met it.")
            )
        else:
            lines.append(f"False-negative budget {budget.get('budget')} not applied: {budget.get('why')}.")
    estimate = manifest.get("false_negatives_estimate")
    if isinstance(estimate, dict) and estimate.get("rate") is not None:
        low, high = estimate.get("ci95", [None, None])
        lines.append(
            f"Estimated false-negative rate of the exported negatives: {estimate['rate']:.1%} (95% interval "
            f"{low:.1%} to {high:.1%}; {estimate.get('false_negatives')} of {estimate.get('negatives')} negatives "
            f"on {estimate.get('queries')} queries), by {estimate.get('method')}."
        )
    elif isinstance(estimate, dict):
        lines.append(f"No false-negative rate could be estimated: {estimate.get('method')}.")
    scored_above = run.negatives.filter(pl.col("negative_score") >= pl.col("positive_score")).height
    if run.negatives.height:
        lines.append(
            f"The teacher scores {scored_above} of {run.negatives.height} negatives "
            f"({scored_above / run.negatives.height:.0%}) at or above their positive: hard negatives; the rate "
            "above, not this share, is the measure of false negatives."
        )
    return lines


def _false_negatives_html(run: Run) -> str:
    return "<h2>False negatives</h2>" + "".join(f"<p>{_e(line)}</p>" for line in false_negative_summary(run))


def _scores_html(run: Run) -> str:
    scores = run.manifest.get("scores")
    if not isinstance(scores, dict) or not scores:
        return ""
    columns = ("count", "mean", "std", "min", "p5", "p50", "p95", "max")
    head = "".join(f"<th>{_e(column)}</th>" for column in columns)
    body = "".join(
        f"<tr><th>{_e(name)}</th>"
        + "".join(f'<td class="number">{_e(stats.get(column, ""))}</td>' for column in columns)
        + "</tr>"
        for name, stats in scores.items()
        if isinstance(stats, dict)
    )
    return f"<h2>Teacher score statistics</h2><table><tr><th></th>{head}</tr>{body}</table>"


def example_queries(run: Run, count: int = EXAMPLE_QUERIES, seed: int = EXAMPLE_SEED) -> list[str]:
    """A seeded sample of query ids, in the order the queries appear in negatives.parquet."""
    query_ids = run.negatives["query_id"].unique(maintain_order=True).to_list()
    chosen = set(random.Random(seed).sample(query_ids, min(count, len(query_ids))))
    return [query_id for query_id in query_ids if query_id in chosen]


def _examples_html(run: Run) -> str:
    query_ids = example_queries(run)
    if not query_ids:
        return "<h2>Examples</h2><p>No negatives were exported.</p>"
    rows = []
    for query_id in query_ids:
        of_query = run.negatives.filter(pl.col("query_id") == query_id)
        positive_ids = of_query["positive_id"].unique(maintain_order=True)
        # The first positive stands for the query; the others got their own negatives, counted below.
        first = of_query.filter(pl.col("positive_id") == positive_ids[0])
        head = first.row(0, named=True)
        negatives = "".join(
            f"<li>{_text(row['negative'])}<div class='meta'>{_e(row['negative_id'])} · score "
            f"{_score(row['negative_score'])} · teacher rank {_e(row['negative_rank'])} · {_e(row['source'])}"
            "</div></li>"
            for row in first.iter_rows(named=True)
        )
        others = f" · {positive_ids.len() - 1} more positives" if positive_ids.len() > 1 else ""
        rows.append(
            "<tr>"
            f"<td>{_text(head['query'])}<div class='meta'>{_e(query_id)}{_e(others)}</div></td>"
            f"<td>{_text(head['positive'])}<div class='meta'>{_e(head['positive_id'])} · score "
            f"{_score(head['positive_score'])}</div></td>"
            f"<td><ol>{negatives}</ol></td>"
            "</tr>"
        )
    total = run.negatives["query_id"].n_unique()
    return (
        f"<h2>Examples</h2><p>{len(query_ids)} of {total} queries (seeded sample, seed {EXAMPLE_SEED}), each with "
        "its first positive and that pair's negatives, in the order the sampler chose them.</p>"
        '<table class="examples"><tr><th>query</th><th>positive</th><th>negatives</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def render_html(run: Run) -> str:
    figures = "".join(
        f'<figure><img src="{_e(figure.file)}" alt="{_e(figure.title)}" width="640" height="420">'
        f"<figcaption>{_code(_e(figure.caption))}</figcaption></figure>"
        for figure in FIGURES
    )
    title = f"hard-negative mining report: {run.folder.name}"
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title><style>{_STYLE}</style></head>'
        f"<body><h1>{_e(title)}</h1>"
        f"<p class='meta'>{_e(run.folder)} · drawn from its manifest.json of run "
        f"<code>{_e(run.manifest.get('run_id', '?'))}</code>, created {_e(run.manifest.get('created', '?'))} · "
        "written by <code>miner report</code></p>"
        f"{_summary_html(run)}"
        f"{_false_negatives_html(run)}"
        f'<h2>Figures</h2><div class="figures">{figures}</div>'
        f"{_scores_html(run)}"
        f"{_examples_html(run)}"
        f"<script>{_IMAGE_CHECK}</script>"
        "</body></html>\n"
    )
