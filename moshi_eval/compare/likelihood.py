"""`moshi-eval compare` of two `moshi-eval likelihood` runs of the same task: paired accuracy differences.

The runs are paired on the pairs both scored (same right and wrong file). For each normalisation: each run's
accuracy over the shared averaging units (ZeroSpeech ids, stories, SALMon samples: the official aggregation),
the difference B - A of the per-unit scores with a paired bootstrap interval over units (resampling units
removes the difficulty both runs share), and the share of pairs on which the two runs disagree. SALMon runs
are compared per part. Runs of different benchmarks or splits are refused, and so are runs scored with another text
or user stream (only the model may differ). Files are identified by the sha256 of the audio each run scored
(`items.csv`): a pair is shared only if both runs scored the same two recordings, wherever they lie (two copies of
the benchmark are one benchmark; a note says the folders differ). A smoke run (`--limit`) is
named: its accuracies are over the shared pairs only.
"""
import csv
from dataclasses import dataclass
import json
from pathlib import Path
import typing as tp

import numpy as np

from ..errors import MoshiEvalError
from ..files.folder import ReportError, RunFolder, write_json, write_text
from ..stats.bootstrap import paired_bootstrap
from ..tasks.likelihood import ITEMS_CSV, NORMALIZATIONS, PAIRS_CSV, pair_score

MATCHING_KEYS = ("benchmark", "split")
SCORING_KEYS = ("text", "user_stream")


class LikelihoodCompareError(MoshiEvalError, ValueError):
    """Runs that cannot be compared; the message says why."""


@dataclass
class LikelihoodRun:
    name: str
    path: Path
    results: dict
    scores: dict[str, tuple[float, float]]            # file identity -> (log_likelihood, per token)
    pairs: dict[tuple[str, str], tuple[str, str]]      # (positive, negative) identities -> (unit, salmon part or "")

    @property
    def smoke_run(self) -> bool:
        return bool(self.results.get("smoke_run"))


def load_likelihood_run(path: Path, name: str) -> LikelihoodRun:
    """A finished likelihood run at rest (`RunFolder`: shared lock, its files as results.json recorded them), its
    files and pairs keyed by the sha256 of the audio scored (by name for runs that predate it)."""
    path = Path(path)
    try:
        with RunFolder(path) as folder:
            if folder.task != "likelihood":
                raise LikelihoodCompareError(f"{path}: a {folder.task} run, not a likelihood run.")
            results = folder.results
            with open(path / ITEMS_CSV, newline="") as f:
                rows = list(csv.DictReader(f))
            with open(path / PAIRS_CSV, newline="") as f:
                pair_rows = list(csv.DictReader(f))
    except ReportError as exc:
        raise LikelihoodCompareError(str(exc)) from None
    except (OSError, ValueError, KeyError) as exc:
        raise LikelihoodCompareError(f"{path}: not a finished likelihood run ({type(exc).__name__}: {exc}).") from exc
    try:
        key = {r["file"]: ("sha256:" + r["sha256"]) if r.get("sha256") else "name:" + r["file"] for r in rows}
        scores = {key[r["file"]]: (float(r["log_likelihood"]), float(r["log_likelihood_per_token"])) for r in rows}
        pairs = {(key[r["positive"]], key[r["negative"]]): (r["unit"], json.loads(r["attributes"]).get("part", ""))
                 for r in pair_rows}
    except (ValueError, KeyError) as exc:
        raise LikelihoodCompareError(f"{path}: not a finished likelihood run ({type(exc).__name__}: {exc}).") from exc
    return LikelihoodRun(name, path, results, scores, pairs)


def compare_likelihood(a: LikelihoodRun, b: LikelihoodRun, resamples: int, seed: int) -> dict[str, tp.Any]:
    """Paired comparison of B against A (see the module docstring)."""
    ca, cb = a.results.get("config", {}), b.results.get("config", {})
    diffs = [f"{k}: {ca.get(k)!r} vs {cb.get(k)!r}" for k in MATCHING_KEYS if ca.get(k) != cb.get(k)]
    if diffs:
        raise LikelihoodCompareError(f"runs {a.name} and {b.name} are not of the same benchmark: {'; '.join(diffs)}.")
    scored = [f"{k}: {ca.get(k)!r} in {a.path}, {cb.get(k)!r} in {b.path}" for k in SCORING_KEYS
              if ca.get(k) != cb.get(k)]
    if scored:
        raise LikelihoodCompareError(f"runs {a.name} and {b.name} were scored differently ({'; '.join(scored)}): "
                                     "only the model may differ.")
    notes = []
    if ca.get("data") != cb.get("data"):
        # Files are paired by the sha256 of the audio scored: the same recordings in two folders are the same
        # files. Runs that predate it are keyed by file name, which another folder may reuse for other audio.
        by_name = [r.name for r in (a, b) if any(key.startswith("name:") for key in r.scores)]
        if by_name:
            raise LikelihoodCompareError(
                f"runs {a.name} and {b.name} scored different data folders ({ca.get('data')!r} vs "
                f"{cb.get('data')!r}) and {', '.join(by_name)} records no sha256 of its files (items.csv): the "
                "same file names may hold other audio. Rescore it with this version, or compare runs of one folder.")
        notes.append(f"data folders differ ({a.name}: {ca.get('data')}, {b.name}: {cb.get('data')}): pairs are "
                     "matched on the recordings both scored (sha256 of the audio)")
    shared = sorted(set(a.pairs) & set(b.pairs))
    if not shared:
        raise LikelihoodCompareError(f"runs {a.name} and {b.name} share no scored pair (same two recordings).")
    groups = sorted({a.pairs[p][1] for p in shared})
    smoke = [r.name for r in (a, b) if r.smoke_run]
    if smoke or len(shared) < max(len(a.pairs), len(b.pairs)):
        notes.append(f"accuracies over the {len(shared)} pairs both runs scored"
                     + (f"; smoke run (--limit): {', '.join(smoke)}" if smoke else "")
                     + ": not the benchmark's figure of either run")
    result: dict[str, tp.Any] = {"task": ca.get("benchmark"), "runs": [a.name, b.name], "shared_pairs": len(shared),
                                 "left_out": {a.name: len(set(a.pairs) - set(b.pairs)),
                                              b.name: len(set(b.pairs) - set(a.pairs))},
                                 "smoke_runs": smoke, "notes": notes,
                                 "conventions": {r.name: r.results.get("conventions", {}) for r in (a, b)},
                                 "comparisons": {}}
    for n_index, normalization in enumerate(NORMALIZATIONS):
        entry = {}
        for group in groups:
            pairs = [p for p in shared if a.pairs[p][1] == group]
            units: dict[str, list[tuple[float, float]]] = {}
            disagree = 0
            for pos, neg in pairs:
                sa = pair_score(a.scores[pos][n_index], a.scores[neg][n_index])
                sb = pair_score(b.scores[pos][n_index], b.scores[neg][n_index])
                disagree += sa != sb
                units.setdefault(a.pairs[(pos, neg)][0], []).append((sa, sb))
            ua = np.array([np.mean([x for x, _ in v]) for v in units.values()])
            ub = np.array([np.mean([y for _, y in v]) for v in units.values()])
            interval = paired_bootstrap(ub - ua, resamples, seed)
            entry[group or "overall"] = {
                "pairs": len(pairs), "units": len(units), f"accuracy_{a.name}": float(ua.mean()),
                f"accuracy_{b.name}": float(ub.mean()), "difference": float((ub - ua).mean()),
                "difference_interval": interval.to_dict(), "disagreement_share": disagree / len(pairs)}
        result["comparisons"]["accuracy" if normalization == "sum" else "accuracy_per_token"] = entry
    return result


def markdown(result: dict[str, tp.Any]) -> str:
    a, b = result["runs"]
    lines = [f"| {result['task']} | {a} | {b} | {b} - {a} [95% paired] | disagree |", "|---|---|---|---|---|"]
    for name, entry in result["comparisons"].items():
        for group, c in entry.items():
            i = c["difference_interval"]
            ci = f" [{i['low']:+.4f}, {i['high']:+.4f}]" if i.get("present") else ""
            label = name if group == "overall" else f"{name} {group}"
            lines.append(f"| {label} | {c[f'accuracy_{a}']:.4f} | {c[f'accuracy_{b}']:.4f} | "
                         f"{c['difference']:+.4f}{ci} | {c['disagreement_share']:.3f} |")
    return "\n".join(lines)


def run_compare(paths: list[Path], names: list[str], out: Path, resamples: int, seed: int) -> dict[str, tp.Any]:
    """Load two runs, compare, write `<out>/compare.json` and `compare.md`; returns the result."""
    if len(paths) != 2:
        raise LikelihoodCompareError(f"likelihood runs are compared two at a time, got {len(paths)}.")
    runs = [load_likelihood_run(p, n) for p, n in zip(paths, names)]
    result = compare_likelihood(runs[0], runs[1], resamples, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", result)
    write_text(out / "compare.md", markdown(result) + "\n")
    return result


__all__ = ["LikelihoodCompareError", "compare_likelihood", "load_likelihood_run",
           "markdown", "run_compare"]
