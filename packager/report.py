"""`packager report`: many verify metrics -> a size-vs-quality report per language pack.

Inputs are run directories; every `metrics.json` / `*.metrics.json` below them written by
`packager verify` is one model. A model without a plan (or labelled role=parent) is a
parent; it joins every pack whose directions it was measured on, and its pack quality is
the mean over those directions, like the pruned models'.

Outputs (REPORT_DIR):
- index.html  self-contained (plots as inline base64 PNG): quality vs file size per pack with
  the parent marked, quality vs drop ratio per ranker/allocation, peak RSS vs file size,
  generation-error rate vs drop ratio, one table per pack;
- report.json rows with per-direction detail, provenance;
- report.csv  one row per (model, pack);
- report.md   the headline table per pack (what the README quotes).
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from packager import __version__
from packager.core.errors import PackagerError
from packager.core.provenance import created_utc

logger = logging.getLogger(__name__)

METRICS_NAMES = ("metrics.json",)
METRICS_SUFFIX = ".metrics.json"
CSV_COLUMNS = (
    "pack", "role", "name", "format", "quantization", "ranker", "allocation", "drop_ratio", "experts_kept", "experts_total",
    "file_bytes", "file_ratio", "peak_rss_bytes", "peak_rss_ratio", "peak_rss_anon_bytes", "peak_rss_above_baseline_bytes",
    "load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second", "threads", "chrf++", "chrf++_delta", "bleu",
    "error_rate", "reference_error_rate", "hit_token_limit", "n", "metrics_file",
)


class ReportError(PackagerError):
    """Run directories without usable metrics, or an unwritable report directory."""


@dataclass
class ModelRun:
    """One verified model, read from its metrics file."""

    path: Path
    metrics: dict

    @property
    def model(self) -> dict:
        return self.metrics["model"]

    @property
    def labels(self) -> dict:
        return self.metrics.get("labels") or {}

    @property
    def plan_meta(self) -> dict:
        plan = self.model.get("plan") or {}
        return plan.get("meta", plan) if isinstance(plan, dict) else {}

    @property
    def is_parent(self) -> bool:
        return self.labels.get("role") == "parent" or (not self.plan_meta and self.labels.get("role") != "pruned")

    def setting(self, key: str, default=None):
        return self.labels.get(key, self.plan_meta.get(key, default))

    @property
    def drop_ratio(self) -> float:
        return 0.0 if self.is_parent else float(self.setting("drop_ratio", 0.0))

    @property
    def variant(self) -> str:
        """Format and quantization, e.g. 'gguf Q8_0'."""
        return f"{self.model['format']} {self.model.get('quantization') or ''}".strip()

    @property
    def name(self) -> str:
        return self.labels.get("name") or self.path.parent.name

    @property
    def directions(self) -> list[str]:
        return list(self.metrics.get("directions", {}))


@dataclass
class Pack:
    name: str
    directions: list[str]
    runs: list[ModelRun] = field(default_factory=list)


def find_metrics(run_dirs: Sequence[str | os.PathLike]) -> list[ModelRun]:
    from packager.verify import METRICS_SCHEMA

    runs, seen = [], set()
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise ReportError(f"{run_dir}: not a directory; give run directories that hold `packager verify` metrics")
        for path in sorted(run_dir.rglob("*.json")):
            if not (path.name in METRICS_NAMES or path.name.endswith(METRICS_SUFFIX)) or path.resolve() in seen:
                continue
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ReportError(f"{path}: unreadable metrics file ({exc}); re-run `packager verify` for it") from None
            if not isinstance(data, dict) or data.get("schema") != METRICS_SCHEMA:
                continue
            seen.add(path.resolve())
            runs.append(ModelRun(path, data))
    if not runs:
        raise ReportError(f"no `packager verify` metrics (metrics.json or *.metrics.json) under {', '.join(map(str, run_dirs))}")
    return runs


def pack_key(run: ModelRun) -> str:
    return run.labels.get("pack") or ",".join(run.directions)


def group_packs(runs: Sequence[ModelRun]) -> list[Pack]:
    packs: dict[str, Pack] = {}
    for run in runs:
        if run.is_parent:
            continue
        key = pack_key(run)
        packs.setdefault(key, Pack(key, run.directions)).runs.append(run)
    parents = [run for run in runs if run.is_parent]
    if not packs:  # only parents: one pack per parent direction set
        for run in parents:
            packs.setdefault(pack_key(run), Pack(pack_key(run), run.directions))
    for pack in packs.values():
        for parent in parents:
            if parent.labels.get("pack") in packs and parent.labels["pack"] != pack.name:
                continue  # a parent labelled with a pack's name (measured on its sample) joins that pack only
            if set(pack.directions) <= set(parent.directions):
                pack.runs.append(parent)
    return list(packs.values())


def _mean(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _parent_for(run: ModelRun, pack: Pack) -> ModelRun | None:
    """The parent measured in the same format and quantization (the fair comparison)."""
    for other in pack.runs:
        if other.is_parent and other.variant == run.variant:
            return other
    return None


def pack_row(run: ModelRun, pack: Pack) -> dict[str, Any]:
    """Pack-level figures of one model (quality averaged over the pack's directions)."""
    directions = {slug: run.metrics["directions"][slug] for slug in pack.directions}
    n = sum(d["n"] for d in directions.values())
    error_rate = sum((d["error_rate"] or 0) * d["n"] for d in directions.values()) / n if n else None
    reference_rate = sum((d["reference_error_rate"] or 0) * d["n"] for d in directions.values()) / n if n else None
    f = run.metrics["footprint"]
    counts = run.model.get("n_experts") or {}
    parent_n = run.model.get("parent_n_experts")
    row = {
        "pack": pack.name,
        "role": "parent" if run.is_parent else "pruned",
        "name": run.name,
        "format": run.model["format"],
        "quantization": run.model.get("quantization"),
        "ranker": None if run.is_parent else run.setting("ranker"),
        "allocation": None if run.is_parent else run.setting("allocation"),
        "drop_ratio": run.drop_ratio,
        "experts_kept": sum(counts.values()) if counts else None,
        "experts_total": (parent_n * len(counts)) if parent_n and counts else run.plan_meta.get("total_experts"),
        "per_layer": [counts[k] for k in sorted(counts, key=int)] if counts else [],
        "file_bytes": f["file_bytes"],
        "peak_rss_bytes": f["peak_rss_bytes"],
        "peak_rss_anon_bytes": f.get("peak_rss_anon_bytes"),
        "peak_rss_above_baseline_bytes": f.get("peak_rss_above_baseline_bytes"),
        "load_seconds": f.get("load_seconds"),
        "prefill_tokens_per_second": f.get("prefill_tokens_per_second"),
        "decode_tokens_per_second": f.get("decode_tokens_per_second"),
        "threads": f.get("threads"),
        "chrf++": _round(_mean(d["chrf++"] for d in directions.values())),
        "chrf++_ci95": _mean_ci([d.get("chrf++_ci95") for d in directions.values()]),
        "bleu": _round(_mean(d["bleu"] for d in directions.values())),
        "error_rate": _round(error_rate, 4),
        "reference_error_rate": _round(reference_rate, 4),
        "errors": {kind: sum(d["errors"].get(kind, 0) for d in directions.values())
                   for kind in next(iter(directions.values()))["errors"]} if directions else {},
        "hit_token_limit": sum(d.get("hit_token_limit", 0) for d in directions.values()),
        "n": n,
        "directions": {slug: {k: d.get(k) for k in ("chrf++", "bleu", "error_rate", "n", "chrf++_ci95")}
                       for slug, d in directions.items()},
        "metrics_file": str(run.path),
    }
    parent = None if run.is_parent else _parent_for(run, pack)
    if parent is not None:
        prow = pack_row(parent, pack)
        row["file_ratio"] = _round(row["file_bytes"] / prow["file_bytes"], 3)
        # mask-mode rows of `make experiments` have no runtime process, hence no RSS
        row["peak_rss_ratio"] = (_round(row["peak_rss_bytes"] / prow["peak_rss_bytes"], 3)
                                 if row["peak_rss_bytes"] and prow["peak_rss_bytes"] else None)
        row["chrf++_delta"] = _round(row["chrf++"] - prow["chrf++"]) if row["chrf++"] is not None and prow["chrf++"] is not None else None
    else:
        row["file_ratio"] = row["peak_rss_ratio"] = 1.0 if run.is_parent else None
        row["chrf++_delta"] = 0.0 if run.is_parent else None
    return row


def _mean_ci(half_widths: Sequence[float | None]) -> float | None:
    """95% half-width of a mean of independent direction scores: sqrt(sum h^2) / k."""
    if not half_widths or any(h is None for h in half_widths):
        return None
    return round(sum(h * h for h in half_widths) ** 0.5 / len(half_widths), 2)


def _round(value, digits: int = 2):
    return None if value is None else round(value, digits)


def _sort_key(row: dict) -> tuple:
    return (row["role"] != "parent", row["format"], str(row["quantization"]), row["drop_ratio"], str(row["allocation"]), str(row["ranker"]))


# -- plots -------------------------------------------------------------------------------------
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]
MIN_CHRF_SPAN = 6.0  # y-axis points at least, in chrF++ plots
NEAR_PARENT_CHRF = 2.0  # "close to the parent" for the summary cards
MARKERS = {"uniform": "o", "dynamic": "s", "inverted-dynamic": "v", None: "o"}


def _figure_png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _grid(n: int, width: float = 5.2, height: float = 3.6):
    import matplotlib.pyplot as plt

    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat[:n])


def _series(rows: Sequence[dict], key) -> dict[Any, list[dict]]:
    series: dict[Any, list[dict]] = {}
    for row in rows:
        series.setdefault(key(row), []).append(row)
    return series


def _colors(keys: Iterable) -> dict:
    return {key: COLORS[i % len(COLORS)] for i, key in enumerate(sorted(set(keys), key=str))}


def _yerr(rows: Sequence[dict]):
    """chrF++ 95% bootstrap half-widths when every point has one (verify --bootstrap)."""
    values = [r.get("chrf++_ci95") for r in rows]
    return None if any(v is None for v in values) else values


def _min_span(ax, span: float) -> None:
    """Keep at least `span` points on the y axis so noise-sized differences do not look large."""
    low, high = ax.get_ylim()
    if high - low < span:
        middle = (high + low) / 2
        ax.set_ylim(middle - span / 2, middle + span / 2)


def plot_quality_vs_size(packs_rows: dict[str, list[dict]]) -> str:
    fig, axes = _grid(len(packs_rows))
    for ax, (pack, rows) in zip(axes, packs_rows.items()):
        colors = _colors(f"{r['format']} {r['quantization']}" for r in rows)
        for (variant, allocation, ranker), items in _series([r for r in rows if r["role"] == "pruned"],
                                                            lambda r: (f"{r['format']} {r['quantization']}", r["allocation"], r["ranker"])).items():
            items = sorted(items, key=lambda r: r["file_bytes"])
            ax.errorbar([r["file_bytes"] / 1e6 for r in items], [r["chrf++"] for r in items], yerr=_yerr(items),
                        marker=MARKERS.get(allocation, "o"), color=colors[variant], label=f"{variant}, {allocation}, {ranker}",
                        linewidth=1.2, markersize=6, capsize=3, elinewidth=0.8)
            for r in items:
                ax.annotate(f"{r['drop_ratio']:.0%}", (r["file_bytes"] / 1e6, r["chrf++"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color="#555")
        for r in rows:
            if r["role"] == "parent":
                variant = f"{r['format']} {r['quantization']}"
                if r.get("chrf++_ci95") is not None:
                    ax.errorbar([r["file_bytes"] / 1e6], [r["chrf++"]], yerr=[r["chrf++_ci95"]], color=colors[variant],
                                capsize=3, elinewidth=0.8, linestyle="none")
                ax.scatter([r["file_bytes"] / 1e6], [r["chrf++"]], marker="*", s=220, color=colors[variant], edgecolor="black",
                           zorder=5, label=f"parent {variant}")
        _min_span(ax, MIN_CHRF_SPAN)
        ax.set_title(f"{pack}: chrF++ vs file size")
        ax.set_xlabel("model file size (MB)")
        ax.set_ylabel("chrF++ (mean over directions)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    return _figure_png(fig)


def plot_quality_vs_drop(packs_rows: dict[str, list[dict]]) -> str:
    fig, axes = _grid(len(packs_rows))
    for ax, (pack, rows) in zip(axes, packs_rows.items()):
        _lines_vs_drop(ax, rows, "chrf++")
        _min_span(ax, MIN_CHRF_SPAN)
        ax.set_title(f"{pack}: chrF++ vs experts dropped")
        ax.set_ylabel("chrF++")
    return _figure_png(fig)


def plot_errors_vs_drop(packs_rows: dict[str, list[dict]]) -> str:
    fig, axes = _grid(len(packs_rows))
    for ax, (pack, rows) in zip(axes, packs_rows.items()):
        _lines_vs_drop(ax, rows, "error_rate", scale=100)
        reference = _mean(r["reference_error_rate"] for r in rows)
        if reference is not None:
            ax.axhline(reference * 100, color="#999", linestyle=":", linewidth=1, label="detectors on references")
        ax.set_title(f"{pack}: generation errors vs experts dropped")
        ax.set_ylabel("segments with an error (%)")
        ax.legend(fontsize=7)
    return _figure_png(fig)


def _lines_vs_drop(ax, rows: Sequence[dict], key: str, scale: float = 1.0) -> None:
    """One line per (variant, ranker, allocation), starting at the same-variant parent."""
    parents = {f"{r['format']} {r['quantization']}": r for r in rows if r["role"] == "parent"}
    series = _series([r for r in rows if r["role"] == "pruned"],
                     lambda r: (f"{r['format']} {r['quantization']}", r["ranker"], r["allocation"]))
    colors = _colors(series)
    for label, items in series.items():
        items = sorted(items, key=lambda r: r["drop_ratio"])
        parent = parents.get(label[0])
        points = ([parent] if parent else []) + items
        ax.errorbar([r["drop_ratio"] * 100 for r in points], [(r[key] or 0) * scale for r in points],
                    yerr=_yerr(points) if key == "chrf++" else None, marker=MARKERS.get(label[2], "o"), color=colors[label],
                    label=" / ".join(map(str, label)), linewidth=1.2, capsize=3, elinewidth=0.8)
    for variant, parent in parents.items():
        color = next((colors[label] for label in series if label[0] == variant), "gold")
        ax.scatter([0], [(parent[key] or 0) * scale], marker="*", s=200, color=color, edgecolor="black", zorder=5)
    ax.set_xlabel("experts dropped (%)  [parent = star at 0%]")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_rss_vs_size(rows: Sequence[dict]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    seen = {}
    for row in rows:
        if row["peak_rss_bytes"] is not None:  # rows without a runtime measurement (mask mode)
            seen.setdefault((row["name"], row["format"], row["quantization"]), row)
    colors = _colors(f"{r['format']} {r['quantization']}" for r in seen.values())
    for variant, items in _series(list(seen.values()), lambda r: f"{r['format']} {r['quantization']}").items():
        x = [r["file_bytes"] / 1e6 for r in items]
        ax.scatter(x, [r["peak_rss_bytes"] / 1e6 for r in items], color=colors[variant], marker="o", label=f"{variant}: peak RSS")
        ax.scatter(x, [(r["peak_rss_anon_bytes"] or 0) / 1e6 for r in items], facecolors="none", edgecolors=colors[variant],
                   marker="o", label=f"{variant}: peak anonymous RSS")
        for r in items:
            if r["role"] == "parent":
                ax.scatter([r["file_bytes"] / 1e6], [r["peak_rss_bytes"] / 1e6], marker="*", s=220, color=colors[variant],
                           edgecolor="black", zorder=5)
    ax.set_xlabel("model file size (MB)")
    ax.set_ylabel("peak memory of the runtime process (MB)")
    ax.set_title("Peak RSS vs file size (star = parent; includes the Python runtime)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run without footprints has nothing to label
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: never over a point
    return _figure_png(fig)


# -- tables ------------------------------------------------------------------------------------
def _mb(value) -> str:
    return "" if value is None else f"{value / 1e6:,.1f}"


def _fmt(value, pattern: str = "{:.1f}") -> str:
    if value is None:
        return ""
    text = pattern.format(value)
    if re.fullmatch(r"-0(\.0+)?%?", text):  # no "-0.0"
        text = text.replace("-", "+" if "{:+" in pattern else "", 1)
    return text


TABLE_HEAD = ("model", "format", "quant", "ranker / allocation", "dropped", "experts", "file MB", "peak RSS MB",
              "anon MB", "load s", "prefill tok/s", "decode tok/s", "chrF++", "Δ parent", "BLEU", "gen. errors", "hit limit")
_RATIO = re.compile(r" \((×[0-9.]+)\)$")


def table_cells(row: dict) -> list[str]:
    setting = "parent" if row["role"] == "parent" else f"{row['ranker']} / {row['allocation']}"
    experts = f"{row['experts_kept']}/{row['experts_total']}" if row["experts_kept"] is not None else ""
    file_ratio = f" (×{row['file_ratio']:.2f})" if row.get("file_ratio") not in (None, 1.0) else ""
    rss_ratio = f" (×{row['peak_rss_ratio']:.2f})" if row.get("peak_rss_ratio") not in (None, 1.0) else ""
    delta = "" if row["role"] == "parent" else _fmt(row.get("chrf++_delta"), "{:+.1f}")
    return [row["name"], row["format"], str(row["quantization"] or ""), setting, f"{row['drop_ratio']:.0%}", experts,
            _mb(row["file_bytes"]) + file_ratio, _mb(row["peak_rss_bytes"]) + rss_ratio, _mb(row["peak_rss_anon_bytes"]),
            _fmt(row["load_seconds"], "{:.2f}"), _fmt(row["prefill_tokens_per_second"], "{:,.0f}"),
            _fmt(row["decode_tokens_per_second"], "{:,.0f}"), _fmt(row["chrf++"]), delta, _fmt(row["bleu"]),
            _fmt(row["error_rate"] * 100 if row["error_rate"] is not None else None, "{:.1f}%"), str(row["hit_token_limit"])]


def _top_errors(row: dict, n: int = 2) -> str:
    """The most frequent error kinds of a row, small under its rate (HTML)."""
    kinds = sorted(((count, kind) for kind, count in (row.get("errors") or {}).items() if count), reverse=True)[:n]
    if not kinds:
        return ""
    return "<br><small>" + html.escape(", ".join(f"{kind.replace('_', ' ')} {count}" for count, kind in kinds)) + "</small>"


def markdown_table(rows: Sequence[dict]) -> str:
    head = ("model", "format", "ranker / allocation", "dropped", "file MB", "peak RSS MB", "decode tok/s", "chrF++", "Δ parent", "gen. errors")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = table_cells(row)
        picked = [cells[0], f"{cells[1]} {cells[2]}".strip(), cells[3], cells[4], cells[6], cells[7], cells[11], cells[12], cells[13], cells[15]]
        lines.append("| " + " | ".join(picked) + " |")
    return "\n".join(lines)


CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'Helvetica Neue',Arial,sans-serif;margin:32px auto;max-width:1240px;color:#222;line-height:1.45;padding:0 16px}
h1{font-size:26px;margin-bottom:4px}h2{font-size:20px;margin-top:36px;border-bottom:2px solid #e3e3e3;padding-bottom:4px}
h3{font-size:16px;margin-top:24px}.meta{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:12px;margin:8px 0 16px;width:100%}
th,td{padding:4px 5px;border-bottom:1px solid #e6e6e6;text-align:right;white-space:nowrap;vertical-align:top}
th{white-space:normal}td small{color:#777}
th{background:#f4f6f8;font-weight:600;position:sticky;top:0}td:first-child,th:first-child,td:nth-child(2),td:nth-child(3),td:nth-child(4){text-align:left}
tr.parent td{background:#fff8e1;font-weight:600}tr:hover td{background:#f1f7ff}
img{max-width:100%;border:1px solid #eee;border-radius:4px;margin:6px 0}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}.card{background:#f7f9fb;border:1px solid #e4e8ec;border-radius:6px;padding:10px 14px;min-width:170px}
.card b{display:block;font-size:20px}.card span{color:#666;font-size:12px}
.notes{font-size:13px;color:#444}.notes li{margin:3px 0}code{background:#f2f2f2;padding:1px 4px;border-radius:3px}
"""


def _cards(pack: str, rows: Sequence[dict]) -> str:
    parents = [r for r in rows if r["role"] == "parent"]
    pruned = [r for r in rows if r["role"] == "pruned"]
    cards = []
    for parent in parents[:1]:
        cards.append(f"<div class='card'><span>parent ({html.escape(parent['format'])} {html.escape(str(parent['quantization']))})</span>"
                     f"<b>{_fmt(parent['chrf++'])} chrF++</b><span>{_mb(parent['file_bytes'])} MB file</span></div>")
    if pruned and parents:
        near = [r for r in pruned if r.get("chrf++_delta") is not None and r["chrf++_delta"] >= -NEAR_PARENT_CHRF]
        picks = [("smallest overall", min(pruned, key=lambda r: r["file_bytes"]))]
        if near:
            picks.insert(0, (f"smallest within {NEAR_PARENT_CHRF:g} chrF++ of its parent", min(near, key=lambda r: r["file_bytes"])))
        for title, r in picks:
            delta = _fmt(r.get("chrf++_delta"), "{:+.1f}")
            ratio = f" (×{r['file_ratio']:.2f})" if r.get("file_ratio") is not None else ""
            cards.append(f"<div class='card'><span>{html.escape(title)}: {html.escape(r['name'])}</span><b>{_mb(r['file_bytes'])} MB{ratio}</b>"
                         f"<span>chrF++ {_fmt(r['chrf++'])} ({delta}), gen. errors {_fmt((r['error_rate'] or 0) * 100, '{:.1f}%')}</span></div>")
    return "<div class='cards'>" + "".join(cards) + "</div>"


def render_html(packs_rows: dict[str, list[dict]], plots: dict[str, str], info: dict) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Size vs quality report</title><style>{CSS}</style></head><body>",
             "<h1>Edge translation bundles: size vs quality</h1>",
             f"<p class='meta'>{info['n_models']} verified models in {len(packs_rows)} language pack(s) · test set "
             f"<code>{html.escape(', '.join(f'{name} ({digest[:19]})' for name, digest in sorted(info['test_splits'].items())) or ', '.join(info['test_files']))}</code> · generated{html.escape(' ' + info['created'] if 'created' in info else '')} by packager {__version__}</p>"]
    for pack, rows in packs_rows.items():
        parts.append(f"<h2>Pack {html.escape(pack)}</h2>")
        directions = ", ".join(sorted({d for r in rows for d in r["directions"]}))
        n = max((r["n"] for r in rows), default=0)
        parts.append(f"<p class='meta'>directions {html.escape(directions)} · {n} test segments per model</p>")
        parts.append(_cards(pack, rows))
        parts.append("<table><thead><tr>" + "".join(f"<th>{h}</th>" for h in TABLE_HEAD) + "</tr></thead><tbody>")
        for row in rows:
            css = " class='parent'" if row["role"] == "parent" else ""
            cells = [_RATIO.sub(r"<br><small>\1</small>", html.escape(c)) for c in table_cells(row)]
            cells[TABLE_HEAD.index("gen. errors")] += _top_errors(row)
            parts.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append("</tbody></table>")
    sections = [("quality_vs_size", "Quality vs file size (per pack; star = parent; labels = experts dropped)"),
                ("quality_vs_drop", "Quality vs drop ratio, per ranker and allocation"),
                ("errors_vs_drop", "Generation-error rate vs drop ratio"),
                ("rss_vs_size", "Peak RSS vs file size")]
    for key, title in sections:
        parts.append(f"<h2>{title}</h2><img alt='{key}' src='data:image/png;base64,{plots[key]}'>")
    parts.append(NOTES)
    parts.append("</body></html>")
    return "\n".join(parts)


NOTES = """<h2>How to read this</h2><ul class='notes'>
<li><b>chrF++</b> and <b>BLEU</b>: sacrebleu (signatures in report.json), greedy decoding in the device runtime, mean over the pack's directions. Δ parent compares with the parent in the same format and quantization.</li>
<li><b>Generation errors</b>, counted apart from quality: empty output, repetition loops, length-ratio outliers, wrong script or language (lingua), lost placeholders or markup. The dotted line shows the same detectors run on the human references (their false-positive rate). <b>hit limit</b> = outputs that never emitted end-of-sequence within the token budget.</li>
<li><b>Peak RSS</b>: peak resident memory of a fresh runtime process (Python + runtime + model, memory-mapped file pages included); <b>anon</b>: peak anonymous memory (not reclaimable). Ratios (×) compare with the parent.</li>
<li><b>dropped</b>: share of routed experts removed by the plan; experts = kept / parent total over all MoE layers.</li>
</ul>"""


# -- entry -------------------------------------------------------------------------------------
def read_metrics_files(paths: Sequence[str | os.PathLike]) -> list[ModelRun]:
    from packager.verify import load_metrics

    return [ModelRun(Path(p), load_metrics(p)) for p in paths]


def build_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, *, command: str | None = None,
                 metrics_files: Sequence[str | os.PathLike] | None = None) -> Path:
    """Write index.html, report.json, report.csv and report.md into `out_dir`; returns index.html.
    With `metrics_files`, exactly those are reported (a build's own), else every metrics file
    found under `run_dirs`."""
    import matplotlib

    matplotlib.use("Agg")
    from packager.core.fingerprint import file_sha256
    from runtime.atomic import OUTPUT_ERRNOS, atomic_write_json, atomic_write_text, output_error

    out_dir = Path(out_dir)
    runs = read_metrics_files(metrics_files) if metrics_files is not None else find_metrics(run_dirs)
    packs = group_packs(runs)
    packs_rows = {pack.name: sorted((pack_row(run, pack) for run in pack.runs), key=_sort_key) for pack in packs}
    all_rows = [row for rows in packs_rows.values() for row in rows]
    plots = {
        "quality_vs_size": plot_quality_vs_size(packs_rows),
        "quality_vs_drop": plot_quality_vs_drop(packs_rows),
        "errors_vs_drop": plot_errors_vs_drop(packs_rows),
        "rss_vs_size": plot_rss_vs_size(all_rows),
    }
    info = {
        "n_models": len(runs),
        "test_files": sorted({run.metrics.get("test", {}).get("file", "") for run in runs}),
        # content hash of each test split, so two reports can be told to score the same data
        "test_splits": {run.metrics.get("test", {}).get("file", ""): "sha256:" + run.metrics.get("test", {}).get("sha256", "")
                        for run in runs if run.metrics.get("test", {}).get("sha256")},
        **created_utc(fmt="%Y-%m-%d %H:%M UTC"),  # SOURCE_DATE_EPOCH or nothing: same inputs, same bytes
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in OUTPUT_ERRNOS:  # a full disk, read-only or unwritable folder: one line naming it
            raise output_error(out_dir, exc) from None
        raise ReportError(f"{out_dir}: cannot create the report directory ({exc})") from None
    markdown = "\n\n".join(f"### {pack}\n\n{markdown_table(rows)}" for pack, rows in packs_rows.items()) + "\n"
    atomic_write_text(out_dir / "report.md", markdown)
    with io.StringIO() as buffer:
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in all_rows:
            writer.writerow(row)
        atomic_write_text(out_dir / "report.csv", buffer.getvalue())
    atomic_write_json(out_dir / "report.json", {
        "schema": "packager.report/1",
        "packs": {pack: {"directions": next(p.directions for p in packs if p.name == pack), "rows": rows}
                  for pack, rows in packs_rows.items()},
        "provenance": {
            "command": command,
            **({"created": info["created"]} if "created" in info else {}),
            "packager_version": __version__,
            "inputs": {str(run.path): file_sha256(run.path) for run in runs},
            "test_splits": info["test_splits"],
            "signatures": sorted({d.get("chrf_signature") for run in runs for d in run.metrics["directions"].values()
                                  if d.get("chrf_signature")} | {d.get("bleu_signature") for run in runs
                                                                 for d in run.metrics["directions"].values() if d.get("bleu_signature")}),
        },
    })
    index = atomic_write_text(out_dir / "index.html", render_html(packs_rows, plots, info))
    for path in (out_dir / "report.md", out_dir / "report.csv", out_dir / "report.json", index):
        os.chmod(path, 0o644)
    return index
