"""`packager verify`: run an exported model (or bundle) on a test set through the device
runtime and record quality, generation errors and footprint, with ratios to the parent.

Each model runs in a fresh subprocess (`python -m packager.verify --worker JOB OUT`) that
imports only `runtime/` and the backend's library, so its memory figures are the runtime's
own: baseline RSS after the imports, then peak total RSS (VmHWM, which counts the
memory-mapped model pages) and peak anonymous RSS (RssAnon, sampled; the memory that cannot
be reclaimed), absolute and above the baseline. Scoring (sacrebleu, lingua) happens in the
parent process afterwards.

This module's top level imports only the standard library and `runtime/`: the worker runs
without torch, sacrebleu or lingua.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from packager.core.errors import PackagerError
from packager.core.provenance import versions

logger = logging.getLogger(__name__)

METRICS_SCHEMA = "packager.metrics/1"
# generation budget per segment: the runtime's (what edge-translate uses)
from runtime.translator import DEFAULT_MAX_NEW_TOKENS, NEW_TOKENS_PER_SOURCE_TOKEN, NEW_TOKENS_SLACK  # noqa: E402

SAMPLE_INTERVAL_SECONDS = 0.005
WORKER_FLAG = "--worker"


class VerifyError(PackagerError):
    """A test set, model or parent that cannot be verified."""


# -- test data -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    src: str
    ref: str
    src_lang: str
    tgt_lang: str
    package: str = ""
    license: str = ""


def parse_pair_list(spec: str | Sequence[str]):
    """Directions of `--pairs` (runtime.languages.parse_pair_list, the one grammar)."""
    from runtime.errors import LanguageError
    from runtime.languages import parse_pair_list as parse

    try:
        return parse(spec)
    except LanguageError as exc:
        raise VerifyError(f"--pairs: {exc}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Records of a harvest JSONL file; raises VerifyError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise VerifyError(f"{path}: test file not found; give a harvest JSONL (e.g. data/harvest/test.jsonl, made by `make data-eval`)")
    records = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise VerifyError(f"{path}:{line_no}: not valid JSON ({exc.msg}); expected one harvest record per line") from None
            missing = [key for key in ("src_lang", "tgt_lang", "src", "tgt") if not isinstance(record, dict) or not isinstance(record.get(key), str)]
            if missing:
                raise VerifyError(f"{path}:{line_no}: record lacks string field(s) {', '.join(missing)}; expected harvest records "
                                  "{src_lang, tgt_lang, src, tgt, package, license}")
            records.append(record)
    if not records:
        raise VerifyError(f"{path}: the test file is empty")
    return records


def select_segments(records: Sequence[dict], pairs, limit: int | None, source: str = "test file") -> dict[str, list[Segment]]:
    """Segments per direction slug. A record en->X also serves X->en reversed. With `limit`
    the segments are spread evenly over the (sorted) file, deterministically."""
    from runtime.errors import LanguageError
    from runtime.languages import Pair, parse_language

    available: dict[Pair, list[Segment]] = {}
    parsed: dict[str, Any] = {}

    def language(code: str):
        if code not in parsed:
            try:
                parsed[code] = parse_language(code)
            except LanguageError as exc:
                raise VerifyError(f"{source}: {exc}") from None
        return parsed[code]

    for record in records:
        src, tgt = language(record["src_lang"]), language(record["tgt_lang"])
        info = (record.get("package", ""), record.get("license", ""))
        available.setdefault(Pair(src, tgt), []).append(Segment(record["src"], record["tgt"], src.code, tgt.code, *info))
        available.setdefault(Pair(tgt, src), []).append(Segment(record["tgt"], record["src"], tgt.code, src.code, *info))
    selected = {}
    for pair in pairs:
        rows = available.get(pair)
        if not rows:
            have = ", ".join(sorted(str(p) for p in available))
            raise VerifyError(f"{source}: no test records for {pair} (the file has {have}); choose --pairs among these")
        if limit:
            step = max(1, len(rows) // limit)
            rows = rows[::step][:limit]
        selected[pair.slug] = rows
    return selected


# -- the worker (fresh process, runtime only) ----------------------------------------------------
def _proc_status() -> dict[str, int]:
    from runtime.memory import proc_status

    return proc_status()


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS so the peak covers only what follows (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class _PeakSampler(threading.Thread):
    """Samples RssAnon/VmRSS while the backend computes (native calls release the GIL)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.peak_rss = 0
        self._done = threading.Event()

    def sample(self) -> None:
        status = _proc_status()
        self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
        self.peak_rss = max(self.peak_rss, status.get("VmRSS", 0))

    def run(self) -> None:
        while not self._done.wait(SAMPLE_INTERVAL_SECONDS):
            self.sample()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.sample()


def _worker(job_path: str, out_path: str) -> int:
    """Load the model, translate every segment, write hypotheses and measurements."""
    from runtime.atomic import atomic_write_json
    from runtime.errors import EdgeError

    job = json.loads(Path(job_path).read_text(encoding="utf-8"))
    interpreter = _proc_status()
    try:
        from runtime.backends import backend_class, resolve_model
        from runtime.protect import protect
        from runtime.translator import TextTranslator

        model_file, config = resolve_model(job["model"])
        cls = backend_class(config.format)  # imports llama_cpp / onnxruntime: part of the baseline
        baseline = _proc_status()
        peak_reset = _reset_peak()
        sampler = _PeakSampler()
        sampler.sample()
        sampler.start()
        backend = cls.load(model_file, config, n_threads=job.get("threads"))
        after_load = _proc_status()
        segments = job["segments"]
        results = []
        cap = job.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if segments:  # warm-up: first-call allocations are not throughput
            first = min(segments, key=lambda item: len(item["src"]))
            for _ in backend.generate_ids(backend.prompt_ids(first["src"], first["src_lang"], first["tgt_lang"]), 4):
                pass
        backend.timings.reset()
        started = time.perf_counter()
        # what users get (segmentation, placeholder protection: runtime.translator), and the same
        # model without protection on the segments protection changes, for the comparison
        protected = TextTranslator(backend, max_new_tokens=cap, protect=True, batch_size=1)
        plain = TextTranslator(backend, max_new_tokens=cap, protect=False, batch_size=1)
        for index, segment in enumerate(segments):
            ours = protected.translate_detailed(segment["src"], segment["src_lang"], segment["tgt_lang"])
            changed = protect(segment["src"]).changed
            raw = plain.translate_detailed(segment["src"], segment["src_lang"], segment["tgt_lang"]) if changed else ours
            results.append({"hyp": ours["hyp"].strip(), "new_tokens": ours["new_tokens"], "hit_limit": ours["hit_limit"],
                            "too_long": ours["passed_through"] > 0, "pieces": ours["pieces"], "protected": changed,
                            "sentinel_retries": ours["sentinel_retries"], "sentinel_fallbacks": ours["sentinel_fallbacks"],
                            "hyp_unprotected": raw["hyp"].strip()})
            print(f"progress {index + 1}", flush=True)
        wall = time.perf_counter() - started
        sampler.stop()
        final = _proc_status()
        timings = backend.timings.as_dict()
        threads = backend.n_threads
        backend.close()
    except EdgeError as exc:
        atomic_write_json(out_path, {"error": str(exc)})
        return 2
    peak_rss = max(final.get("VmHWM", 0) if peak_reset else 0, sampler.peak_rss)
    memory = {
        "interpreter_rss_bytes": interpreter.get("VmRSS", 0),
        "baseline_rss_bytes": baseline.get("VmRSS", 0),
        "baseline_rss_anon_bytes": baseline.get("RssAnon", 0),
        "after_load_rss_bytes": after_load.get("VmRSS", 0),
        "after_load_rss_anon_bytes": after_load.get("RssAnon", 0),
        "peak_rss_bytes": peak_rss,
        "peak_rss_anon_bytes": sampler.peak_anon,
        "peak_rss_above_baseline_bytes": max(0, peak_rss - baseline.get("VmRSS", 0)),
        "peak_rss_anon_above_baseline_bytes": max(0, sampler.peak_anon - baseline.get("RssAnon", 0)),
        "peak_rss_source": "VmHWM after reset" if peak_reset else "sampled VmRSS",
        "peak_rss_anon_source": f"RssAnon sampled every {SAMPLE_INTERVAL_SECONDS * 1000:g} ms",
    }
    atomic_write_json(out_path, {
        "results": results,
        "timings": {**timings, "wall_seconds": wall},
        "memory": memory,
        "threads": threads,
        "format": config.format,
        "pid": os.getpid(),
    })
    return 0


def run_worker(model: str | os.PathLike, segments: Sequence[Segment], *, threads: int | None = None,
               max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, on_progress: Callable[[int], None] | None = None) -> dict:
    """Translate `segments` with `model` in a fresh interpreter; returns the worker's record."""
    with tempfile.TemporaryDirectory(prefix="packager-verify-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job = {"model": str(Path(model).resolve()), "threads": threads, "max_new_tokens": max_new_tokens,
               "segments": [{"src": s.src, "src_lang": s.src_lang, "tgt_lang": s.tgt_lang} for s in segments]}
        job_path.write_text(json.dumps(job, ensure_ascii=False), encoding="utf-8")
        command = [sys.executable, "-m", "packager.verify", WORKER_FLAG, str(job_path), str(out_path)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        stderr_lines: list[str] = []
        drain = threading.Thread(target=lambda: stderr_lines.extend(process.stderr), daemon=True)
        drain.start()
        for line in process.stdout:
            if line.startswith("progress ") and on_progress is not None:
                on_progress(int(line.split()[1]))
        code = process.wait()
        drain.join()
        record = json.loads(out_path.read_text(encoding="utf-8")) if out_path.is_file() else None
    if record and "error" in record:
        raise VerifyError(record["error"])
    if code != 0 or record is None:
        tail = "".join(stderr_lines[-5:]).strip().replace("\n", " | ")
        raise VerifyError(f"{model}: the runtime worker failed (exit code {code}): {tail[-400:] or 'no output'}")
    return record


# -- scoring and the metrics record --------------------------------------------------------------
def _model_description(model: str | os.PathLike) -> dict:
    from runtime.backends import resolve_model
    from runtime.errors import EdgeError
    from packager.core.fingerprint import file_sha256

    try:
        model_file, config = resolve_model(model)
    except EdgeError as exc:
        raise VerifyError(str(exc)) from None
    files = config.model_paths(model_file.parent)
    if config.tokenizer:
        files.append(model_file.parent / config.tokenizer)
    described = {}
    for path in files:
        if not path.is_file():
            raise VerifyError(f"{path}: listed by the model's config but missing")
        described[path.name] = {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
    plan = config.plan or {}
    return {
        "path": str(model),
        "model_file": model_file.name,
        "format": config.format,
        "quantization": config.quantization.get("type"),
        "family": config.family,
        "top_k": config.top_k,
        "n_experts": {str(k): v for k, v in sorted(config.n_experts.items())},
        "n_experts_total": sum(config.n_experts.values()),
        "parent_n_experts": config.parent_n_experts,
        "parent_fingerprint": config.parent_fingerprint,
        "languages": list(config.languages),
        "plan": plan,
        "files": described,
        "file_bytes": sum(item["bytes"] for item in described.values()),
        "model_file_bytes": sum(described[p.name]["bytes"] for p in config.model_paths(model_file.parent)),
    }


def _open_input(model: str | os.PathLike, pairs) -> Path:
    """A bundle (directory or .tar) is checked like edge-translate does (manifest digest,
    sha256 of every file, directions) and measured from its verified directory."""
    from runtime.bundle import is_bundle, load_bundle
    from runtime.errors import EdgeError

    if not is_bundle(model):
        return Path(model)
    try:
        bundle = load_bundle(model)
        if bundle.manifest.directions:
            for pair in pairs:
                bundle.check_direction(pair.src, pair.tgt)
    except EdgeError as exc:
        raise VerifyError(str(exc)) from None
    return bundle.root


def _check_coverage(description: dict, pairs, model: str | os.PathLike) -> None:
    languages = description["languages"]
    if not languages:
        return
    # plans list the pack's languages besides English (statistics are English-centred)
    covered = set(languages) | {"en"}
    for pair in pairs:
        missing = [lang.code for lang in (pair.src, pair.tgt) if lang.code not in covered]
        if missing:
            raise VerifyError(f"{model}: the model was built for {', '.join(languages)}, not {', '.join(missing)} "
                              f"(asked for {pair}); choose --pairs among its languages")


def score_directions(segments: dict[str, list[Segment]], hyps: dict[str, list[dict]], n_bootstrap: int) -> tuple[dict, list[dict]]:
    """Per-direction quality and generation errors; also the per-segment rows."""
    from packager.quality import ErrorDetector, score_direction, sentence_chrf, usual_length_ratio

    languages = sorted({s.src_lang for rows in segments.values() for s in rows} | {s.tgt_lang for rows in segments.values() for s in rows})
    ratios = {}
    for rows in segments.values():
        ratios[(rows[0].src_lang, rows[0].tgt_lang)] = usual_length_ratio([s.src for s in rows], [s.ref for s in rows])
    detector = ErrorDetector(languages, ratios)
    directions, segment_rows = {}, []
    for slug, all_rows in segments.items():
        # sources longer than the model's context were not translated: left out of every score
        kept = [(s, o) for s, o in zip(all_rows, hyps[slug]) if not o.get("too_long")]
        if not kept:
            raise VerifyError(f"every {slug} test segment is longer than the model's context; use a model with a longer context")
        rows, outputs = [s for s, _ in kept], [o for _, o in kept]
        scores, errors = score_direction([s.src for s in rows], [s.ref for s in rows], [o["hyp"] for o in outputs],
                                         rows[0].src_lang, rows[0].tgt_lang, detector, n_bootstrap)
        protection = protection_scores(rows, outputs, errors, detector)
        directions[slug] = {
            **scores,
            "skipped_too_long": len(all_rows) - len(rows),
            "hit_token_limit": sum(1 for o in outputs if o["hit_limit"]),
            "usual_length_ratio": round(ratios[(rows[0].src_lang, rows[0].tgt_lang)], 3),
            "new_tokens": sum(o["new_tokens"] for o in outputs),
            "protection": protection,
        }
        for segment, output, kinds in zip(rows, outputs, errors):
            segment_rows.append({"direction": slug, "src": segment.src, "ref": segment.ref, "hyp": output["hyp"],
                                 "chrf++": sentence_chrf(output["hyp"], segment.ref), "errors": kinds,
                                 "hit_limit": output["hit_limit"],
                                 **({"hyp_unprotected": output["hyp_unprotected"]} if output.get("protected") else {})})
    return directions, segment_rows


def protection_scores(rows: Sequence[Segment], outputs: Sequence[dict], errors: Sequence[Sequence[str]], detector) -> dict:
    """chrF++ and the lost-placeholder rate with placeholder protection (the hypotheses users get)
    and without it (the same model on the raw source), over the direction's segments and over the
    segments that have placeholders or markup."""
    from packager.quality import corpus_scores, placeholders

    refs = [s.ref for s in rows]
    unprotected = [o.get("hyp_unprotected", o["hyp"]) for o in outputs]
    lost_with = ["lost_placeholder" in kinds for kinds in errors]
    lost_without = [bool(set(detector.detect(s.src, h, s.src_lang, s.tgt_lang)) & {"lost_placeholder"})
                    if o.get("protected") else lost for s, h, o, lost in zip(rows, unprotected, outputs, lost_with)]
    having = [bool(placeholders(s.src)) for s in rows]
    n_having = sum(having)

    def rate(flags: Sequence[bool], among: Sequence[bool] | None = None) -> float | None:
        chosen = [f for f, a in zip(flags, among or [True] * len(flags)) if a]
        return round(sum(chosen) / len(chosen), 4) if chosen else None

    tgt_lang = rows[0].tgt_lang
    return {
        "segments_with_placeholders": n_having,
        "segments_protected": sum(1 for o in outputs if o.get("protected")),
        "sentinel_retries": sum(o.get("sentinel_retries", 0) for o in outputs),
        "sentinel_fallbacks": sum(o.get("sentinel_fallbacks", 0) for o in outputs),
        "with": {"chrf++": corpus_scores([o["hyp"] for o in outputs], refs, tgt_lang)["chrf++"],
                 "lost_placeholder": sum(lost_with), "lost_placeholder_rate": rate(lost_with),
                 "lost_placeholder_rate_among_with_placeholders": rate(lost_with, having)},
        "without": {"chrf++": corpus_scores(unprotected, refs, tgt_lang)["chrf++"],
                    "lost_placeholder": sum(lost_without), "lost_placeholder_rate": rate(lost_without),
                    "lost_placeholder_rate_among_with_placeholders": rate(lost_without, having)},
    }


def summarize(directions: dict) -> dict:
    """The shared summary (packager.quality.summarize_directions) plus the reference error rate
    and the protection effect."""
    from packager.quality import mean_score, summarize_directions

    n = sum(d["n"] for d in directions.values())
    return {
        **summarize_directions(directions),
        "reference_error_rate": round(sum(d["reference_error_rate"] * d["n"] for d in directions.values()) / n, 4) if n else None,
        "protection": {
            side: {"chrf++": mean_score(d["protection"][side]["chrf++"] for d in directions.values() if "protection" in d),
                   "lost_placeholder_rate": round(sum(d["protection"][side]["lost_placeholder"] for d in directions.values()
                                                      if "protection" in d) / n, 4) if n else None}
            for side in ("with", "without")
        },
    }


def footprint(description: dict, worker: dict) -> dict:
    timings = worker["timings"]
    return {
        "file_bytes": description["file_bytes"],
        "model_file_bytes": description["model_file_bytes"],
        **worker["memory"],
        "load_seconds": round(timings["load_seconds"], 4),
        "prefill_tokens": timings["prefill_tokens"],
        "prefill_tokens_per_second": round(timings["prefill_tokens_per_second"], 2),
        "decode_tokens": timings["decode_tokens"],
        "decode_tokens_per_second": round(timings["decode_tokens_per_second"], 2),
        "translate_wall_seconds": round(timings["wall_seconds"], 3),
        "threads": worker["threads"],
    }


RATIO_KEYS = ("file_bytes", "peak_rss_bytes", "peak_rss_anon_bytes", "peak_rss_above_baseline_bytes",
              "peak_rss_anon_above_baseline_bytes", "load_seconds", "prefill_tokens_per_second", "decode_tokens_per_second")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 4)


def ratios_to_parent(metrics: dict, parent: dict) -> dict:
    """Each figure divided by the parent's; quality also as a difference in points."""
    ratios: dict[str, Any] = {key: _ratio(metrics["footprint"].get(key), parent["footprint"].get(key)) for key in RATIO_KEYS}
    ratios["chrf++"] = _ratio(metrics["summary"]["chrf++"], parent["summary"]["chrf++"])
    ratios["bleu"] = _ratio(metrics["summary"]["bleu"], parent["summary"]["bleu"])
    ratios["chrf++_delta"] = _delta(metrics["summary"]["chrf++"], parent["summary"]["chrf++"])
    ratios["error_rate_delta"] = _delta(metrics["summary"]["error_rate"], parent["summary"]["error_rate"], 4)
    ratios["directions"] = {
        slug: {"chrf++": _ratio(d["chrf++"], parent["directions"][slug]["chrf++"]),
               "chrf++_delta": _delta(d["chrf++"], parent["directions"][slug]["chrf++"]),
               "bleu": _ratio(d["bleu"], parent["directions"][slug]["bleu"])}
        for slug, d in metrics["directions"].items() if slug in parent["directions"]
    }
    ratios["same_format_and_quantization"] = (
        metrics["model"]["format"] == parent["model"]["format"]
        and metrics["model"]["quantization"] == parent["model"]["quantization"]
    )
    return ratios


def _delta(a, b, digits: int = 2):
    return None if a is None or b is None else round(a - b, digits)


def measure_model(model: str | os.PathLike, segments: dict[str, list[Segment]], *, threads: int | None,
                  max_new_tokens: int, n_bootstrap: int, progress=None, label: str = "model") -> tuple[dict, list[dict]]:
    """Metrics of one model on `segments` (no parent, no provenance)."""
    description = _model_description(model)
    flat = [s for rows in segments.values() for s in rows]
    task = progress.add_task(f"verify {label}", total=len(flat)) if progress is not None else None
    worker = run_worker(model, flat, threads=threads, max_new_tokens=max_new_tokens,
                        on_progress=(lambda done: progress.update(task, completed=done)) if progress is not None else None)
    hyps, start = {}, 0
    for slug, rows in segments.items():
        hyps[slug] = worker["results"][start:start + len(rows)]
        start += len(rows)
    directions, segment_rows = score_directions(segments, hyps, n_bootstrap)
    metrics = {"model": description, "directions": directions, "summary": summarize(directions),
               "footprint": footprint(description, worker)}
    return metrics, segment_rows


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False)


def load_metrics(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VerifyError(f"{path}: metrics file not found; run `packager verify` first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise VerifyError(f"{path}: not a readable metrics JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("schema") != METRICS_SCHEMA:
        raise VerifyError(f"{path}: not a `packager verify` metrics file (schema {data.get('schema') if isinstance(data, dict) else None!r}, "
                          f"expected {METRICS_SCHEMA!r})")
    return data


def verify(model: str | os.PathLike, test_file: str | os.PathLike, pairs, out: str | os.PathLike, *,
           limit: int | None = None, parent: str | os.PathLike | None = None,
           parent_metrics: str | os.PathLike | dict | None = None, threads: int | None = None,
           max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, n_bootstrap: int = 1000, progress: bool = True,
           labels: dict | None = None, command: str | None = None) -> dict:
    """Measure `model` (and `parent`, or reuse `parent_metrics` measured on the same
    selection), write METRICS.json (and METRICS.segments.jsonl), return the metrics."""
    from packager.core.fingerprint import file_sha256
    from runtime.atomic import atomic_write_json, atomic_write_text

    out = Path(out)
    if not out.parent.is_dir():
        raise VerifyError(f"{out}: its directory does not exist; create it first")
    pair_list = parse_pair_list(pairs) if not isinstance(pairs, list) or isinstance(pairs[0], str) else pairs
    if limit is not None and limit < 1:
        raise VerifyError(f"--limit must be >= 1, got {limit}")
    model = _open_input(model, pair_list)
    if parent is not None:
        parent = _open_input(parent, pair_list)
    description = _model_description(model)
    _check_coverage(description, pair_list, model)
    if parent is not None:
        _check_coverage(_model_description(parent), pair_list, parent)
    records = read_jsonl(test_file)
    segments = select_segments(records, pair_list, limit, source=str(test_file))
    test = {
        "file": str(test_file),
        "sha256": file_sha256(test_file),
        "limit": limit,
        "pairs": list(segments),
        "n": {slug: len(rows) for slug, rows in segments.items()},
        "selection": "records of each direction in file order, every len//limit-th, first `limit`",
        "licenses": _licenses(segments),
        "generation": {"decoding": "greedy", "max_new_tokens": max_new_tokens,
                       "budget": f"min(max_new_tokens, {NEW_TOKENS_PER_SOURCE_TOKEN} x source tokens + {NEW_TOKENS_SLACK})"},
    }
    parent_record = None
    if parent_metrics is not None:
        parent_record = parent_metrics if isinstance(parent_metrics, dict) else load_metrics(parent_metrics)
        _check_same_selection(parent_record, test, parent_metrics)

    bar = _progress(progress)
    with bar if bar is not None else contextlib.nullcontext():
        metrics, segment_rows = measure_model(model, segments, threads=threads, max_new_tokens=max_new_tokens,
                                              n_bootstrap=n_bootstrap, progress=bar, label=Path(model).name)
        if parent is not None:
            parent_record, _ = measure_model(parent, segments, threads=threads, max_new_tokens=max_new_tokens,
                                             n_bootstrap=n_bootstrap, progress=bar, label=f"parent {Path(parent).name}")
            parent_record["test"] = test
    record = {
        "schema": METRICS_SCHEMA,
        "labels": dict(labels or {}),
        **metrics,
        "test": test,
    }
    if parent_record is not None:
        record["parent"] = {key: parent_record[key] for key in ("model", "directions", "summary", "footprint")}
        record["ratios"] = ratios_to_parent(metrics, parent_record)
        if not record["ratios"]["same_format_and_quantization"]:
            logger.warning("parent is %s %s, model is %s %s: ratios mix formats or quantizations",
                           parent_record["model"]["format"], parent_record["model"]["quantization"],
                           metrics["model"]["format"], metrics["model"]["quantization"])
    record["provenance"] = {
        "command": command or " ".join(sys.argv),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": versions("llama-cpp-python", "onnxruntime", "sacrebleu", "lingua-language-detector"),
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "system": platform.system()},
        "inputs": {"test_sha256": test["sha256"],
                   "model_files_sha256": {name: item["sha256"] for name, item in description["files"].items()}},
    }
    segments_path = segments_file(out)
    atomic_write_text(segments_path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in segment_rows))
    atomic_write_json(out, record)
    return record


def segments_file(metrics_path: str | os.PathLike) -> Path:
    path = Path(metrics_path)
    stem = path.name[:-5] if path.name.endswith(".json") else path.name
    return path.with_name(stem + ".segments.jsonl")


def _licenses(segments: dict[str, list[Segment]]) -> list[dict]:
    counts: dict[tuple[str, str], int] = {}
    for rows in segments.values():
        for s in rows:
            counts[(s.package, s.license)] = counts.get((s.package, s.license), 0) + 1
    return [{"package": p, "license": lic, "segments": n, "use": "evaluation"} for (p, lic), n in sorted(counts.items())]


def _check_same_selection(parent: dict, test: dict, source) -> None:
    where = source if not isinstance(source, dict) else "parent metrics"
    ptest = parent.get("test", {})
    if ptest.get("sha256") != test["sha256"]:
        raise VerifyError(f"{where}: the parent was measured on another test file; re-run verify with --parent")
    missing = [slug for slug in test["pairs"] if ptest.get("n", {}).get(slug) != test["n"][slug]]
    if missing or ptest.get("limit") != test["limit"]:
        raise VerifyError(f"{where}: the parent was measured on another selection (pairs {ptest.get('pairs')}, limit "
                          f"{ptest.get('limit')}); re-run verify with --parent")


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == WORKER_FLAG:
    sys.exit(_worker(sys.argv[2], sys.argv[3]))
