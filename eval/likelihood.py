"""Zero-shot likelihood benchmarks of a streaming Moshi model: sWUGGY, sBLIMP, spoken / topic StoryCloze, SALMon.

The score of an audio file is its log-likelihood under the model *in its streaming state*: the file's Mimi codes
`[8, T]` go in the model's own audio stream, teacher forced through `moshi_patch.LMGen.step_with_logits`
(`scoring.score_sequences`: chunks of frames, one fresh stream per file, the same user-stream and text options
as the LibriLight curve), and

    log_likelihood = sum over frames t and codebooks k of log p(code[k, t])  = -sum(codebook_ce)   (nats)
    log_likelihood_per_token = log_likelihood / (8 T)

A pair scores 1 if its right item is more likely, 0.5 on a tie, 0 otherwise. Both normalisations are
reported; the primary one is `sum`: the official ZeroSpeech 2021 scorer compares the submitted scores as they
are (a log-likelihood, higher = more probable) and lm-evaluation-harness's `acc` compares summed
log-likelihoods; `mean` (per token) is slamkit's default (length-unbiased: a right ending longer than the wrong
one is not penalised for its length).

Aggregation as the official scorers (zerospeech2021 `lexical.py` / `syntactic.py`, salmon `salmon.py`):
sWUGGY pairs of one id are averaged over voices, then ids are averaged (and by frequency band oov, 1-5, 6-20,
21-100, >100, with the official bins `[0, 1, 5, 20, 100, inf)`, and by length); sBLIMP by (type, subtype, id),
then by type and subtype; StoryCloze over stories; SALMon per part over samples. Every accuracy has a
bootstrap interval over those units. No data is never an accuracy: it is absent, with the reason.
"""
from contextlib import ExitStack, contextmanager
import csv
from dataclasses import asdict, dataclass, field
import datetime
import io
import json
import math
import os
from pathlib import Path
import sys
import time
import typing as tp

import numpy as np
import sphn
import torch
from tqdm import tqdm

from moshi.modules.transformer import StreamingMultiheadAttention
from moshi_patch import LMGen

from . import distributed, report
from .atomic import atomic_write
from .benchmark_data import SPLITS, TASKS, ZEROSPEECH_PART, BenchmarkData, Pair, load_benchmark
from .checkpoint import check_codec_fits
from .bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, LEVEL, paired_bootstrap
from .codes import CodeCache, codec_identity, encode_audio, silence_codes
from .data import AudioReadError, DataError, read_audio
from .hashing import FileHasher
from .lock import OutputLock
from .model_call import caller_ranks, check_model, on_every_rank, score_model
from .run import SILENCE_FRAMES      # the user stream's silence, as the LibriLight run encodes it
from .scoring import DEFAULT_CHUNK, TEXT_MODES, USER_STREAMS, score_sequences
from .errors import EXIT_USAGE, MoshiEvalError

NORMALIZATIONS = ("sum", "mean")
PRIMARY = "sum"
PRIMARY_WHY = ("sum: the official ZeroSpeech 2021 scorer compares the submitted log-likelihoods as they are, and "
               "lm-evaluation-harness's acc compares summed log-likelihoods; mean (per token, slamkit's default) is "
               "reported beside it as accuracy_per_token")
FREQUENCY_BANDS = ((0, 1, "oov"), (1, 5, "1-5"), (5, 20, "6-20"), (20, 100, "21-100"), (100, math.inf, ">100"))
ITEMS_DIR = "items"
ITEMS_CSV = "items.csv"
PAIRS_CSV = "pairs.csv"
CONFIG_JSON = "config.json"
RESULTS_JSON = "results.json"


class LikelihoodConfigError(MoshiEvalError, ValueError):
    """A bad value in a `LikelihoodConfig`; the message names the field."""

    exit_code = EXIT_USAGE      # a bad option: the command line's fault, as argparse's own errors


@dataclass
class LikelihoodConfig:
    """Everything a likelihood benchmark's numbers and report depend on, apart from the model."""
    task: str
    data: Path
    split: str = "dev"                       # swuggy / sblimp: dev (with gold.csv) or test (submission only)
    parts: tuple[str, ...] | None = None     # salmon: the parts (default: all 8)
    text: str = "predicted"
    user_stream: str = "silence"
    batch_size: int = 16
    chunk: int = DEFAULT_CHUNK
    limit: int | None = None                 # first N pairs: a smoke run
    strict: bool = False
    bootstrap: int = DEFAULT_RESAMPLES
    bootstrap_seed: int = DEFAULT_SEED
    progress: bool = True
    cache_dir: Path | None = None            # Mimi code cache (None: no cache)

    def check(self) -> None:
        def bad(name: str, expected: str) -> tp.NoReturn:
            raise LikelihoodConfigError(f"{name}: expected {expected}, got {getattr(self, name)!r}.")
        if self.task not in TASKS:
            bad("task", f"one of {TASKS}")
        if self.text not in TEXT_MODES:
            bad("text", f"one of {TEXT_MODES}")
        if self.user_stream not in USER_STREAMS:
            bad("user_stream", f"one of {USER_STREAMS}")
        if self.split not in SPLITS:
            bad("split", f"one of {SPLITS}")
        for name in ("batch_size", "chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                bad(name, "a positive integer")
        if self.limit is not None and (not isinstance(self.limit, int) or isinstance(self.limit, bool)
                                       or self.limit < 1):
            bad("limit", "None or a positive integer")
        if not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            bad("bootstrap", "an integer >= 0")
        if self.parts is not None and self.task != "salmon":
            bad("parts", "None unless task is 'salmon'")

    def identity(self) -> dict:
        """What the per-file numbers and the batches depend on: a resumed run must match it exactly."""
        return {"task": self.task, "data": os.fsdecode(Path(self.data).resolve()), "split": self.split,
                "parts": None if self.parts is None else list(self.parts), "text": self.text,
                "user_stream": self.user_stream, "batch_size": self.batch_size, "chunk": self.chunk,
                "limit": self.limit}


@dataclass
class ItemScore:
    """The log-likelihood of one audio file under the streaming model."""
    file: str                   # key: name without extension (ZeroSpeech) or path under the task folder
    frames: int                 # T: Mimi frames at 12.5 Hz
    tokens: int                 # 8 T: the audio codes scored
    log_likelihood: float       # sum of log p over frames and codebooks (nats, float64 sum of float32 terms)

    @property
    def log_likelihood_per_token(self) -> float:
        return self.log_likelihood / self.tokens

    def value(self, normalization: str) -> float:
        return self.log_likelihood if normalization == "sum" else self.log_likelihood_per_token


def pair_score(positive: float, negative: float) -> float:
    """1 if the right item is more likely, 0.5 on a tie, 0 otherwise (as every official scorer)."""
    return 1.0 if positive > negative else 0.5 if positive == negative else 0.0


def frequency_band(frequency: int) -> str | None:
    """The official band of a word frequency (pandas.cut on [0, 1, 5, 20, 100, inf), right=False)."""
    for low, high, name in FREQUENCY_BANDS:
        if low <= frequency < high:
            return name
    return None


@dataclass
class _Unit:
    """What the official scorer averages first: a ZeroSpeech id (over voices), a story, a SALMon sample."""
    name: str
    groups: dict[str, str]                       # band name -> band value (frequency, length, type, part...)
    scores: dict[str, list[float]] = field(default_factory=lambda: {n: [] for n in NORMALIZATIONS})


def _unit_name(task: str, p: Pair) -> str:
    if task == "sblimp":     # the official groupby(['type', 'subtype', 'id'])
        return f"{p.attributes['type']}/{p.attributes['subtype']}/{p.unit}"
    return p.unit


def _units(task: str, pairs: list[Pair], scores: dict[str, ItemScore]) -> list[_Unit]:
    units: dict[str, _Unit] = {}
    for p in pairs:
        name = _unit_name(task, p)
        unit = units.get(name)
        if unit is None:
            groups = dict(p.attributes)
            if task == "swuggy":
                band = frequency_band(int(p.attributes["frequency"]))
                groups = {"length": p.attributes["length"]}
                if band is not None:
                    groups["frequency"] = band
            unit = units[name] = _Unit(name, groups)
        for n in NORMALIZATIONS:
            unit.scores[n].append(pair_score(scores[p.positive].value(n), scores[p.negative].value(n)))
    return list(units.values())


def _accuracy(values: list[float], resamples: int, seed: int) -> dict:
    """Mean of per-unit scores with its bootstrap interval over units."""
    if not values:
        return {"present": False, "units": 0, "absent_reason": "no pair scored"}
    result: dict[str, tp.Any] = {"present": True, "accuracy": float(np.mean(values)), "units": len(values)}
    if resamples > 0:
        interval = paired_bootstrap(np.asarray(values, dtype=np.float64), resamples, seed)
        result["interval"] = interval.to_dict()
    else:
        result["interval"] = {"present": False, "absent_reason": "bootstrap 0"}
    return result


def aggregate(data: BenchmarkData, scores: dict[str, ItemScore], resamples: int = DEFAULT_RESAMPLES,
              seed: int = DEFAULT_SEED) -> tuple[dict, list[dict]]:
    """Official accuracies of the pairs whose two files were scored. Returns (accuracies, pairs left out).

    accuracies: `{normalization: {"overall": acc, "<band>": {value: acc}}}` where acc holds `accuracy`,
    `units` and a bootstrap `interval` over units (or `present: False` and the reason).
    """
    kept, left = [], []
    for p in data.pairs:
        missing = [k for k in (p.positive, p.negative) if k not in scores]
        if missing:
            left.append({"pair": f"{p.positive} / {p.negative}", "reason": f"not scored: {missing}"})
        else:
            kept.append(p)
    if not data.has_gold:
        return {"absent_reason": f"no gold.csv in {data.root}: scores are in the submission only"}, left
    units = _units(data.task, kept, scores)
    result: dict[str, tp.Any] = {}
    for n in NORMALIZATIONS:
        per_unit = [(u, float(np.mean(u.scores[n]))) for u in units]
        entry: dict[str, tp.Any] = {}
        if data.task != "salmon":
            entry["overall"] = _accuracy([s for _, s in per_unit], resamples, seed)
        bands = sorted({b for u in units for b in u.groups})
        for band in bands:
            values = sorted({u.groups[band] for u in units if band in u.groups}, key=_band_order(band))
            entry[band] = {v: _accuracy([s for u, s in per_unit if u.groups.get(band) == v], resamples, seed)
                           for v in values}
        if data.task == "swuggy":       # the leaderboard's lexical_invocab: OOV words left out
            entry["in_vocabulary"] = _accuracy([s for u, s in per_unit if u.groups.get("frequency") not in
                                                (None, "oov")], resamples, seed)
        result[n] = entry
    return result, left


def _band_order(band: str) -> tp.Callable[[str], tp.Any]:
    if band == "frequency":
        order = [name for _, _, name in FREQUENCY_BANDS]
        return order.index
    if band == "length":
        return int
    return str


def flat_metrics(task: str, accuracies: dict) -> dict[str, float]:
    """Stable names for loggers: `<task>/accuracy`, `/low`, `/high`, `<task>/accuracy/<band>/<value>`, and the
    same under `<task>/accuracy_per_token` for the per-token normalisation."""
    metrics: dict[str, float] = {}
    for n, base in (("sum", f"{task}/accuracy"), ("mean", f"{task}/accuracy_per_token")):
        entry = accuracies.get(n)
        if not entry:
            continue
        for key, acc in entry.items():
            items = [(f"{base}", acc)] if key == "overall" else \
                [(f"{base}/{key}", acc)] if key == "in_vocabulary" else \
                [(f"{base}/{v}" if task == "salmon" else f"{base}/{key}/{v}", a) for v, a in acc.items()]
            for name, a in items:
                if not a.get("present"):
                    continue
                metrics[name] = a["accuracy"]
                interval = a.get("interval", {})
                if interval.get("present"):
                    metrics[f"{name}/low"] = interval["low"]
                    metrics[f"{name}/high"] = interval["high"]
    return metrics


@dataclass
class LikelihoodResult:
    """Per-file scores, official accuracies and what was left out; `.metrics` is flat for loggers."""
    config: LikelihoodConfig
    data: BenchmarkData
    scores: dict[str, ItemScore]
    accuracies: dict
    skipped: list[dict]               # files and pairs left out, with the reason
    runtime: dict
    metrics: dict[str, float] = field(default_factory=dict)

    def submission_path(self, out_dir: Path) -> Path | None:
        part = ZEROSPEECH_PART.get(self.config.task)
        return None if part is None else Path(out_dir) / "submission" / part / f"{self.config.split}.txt"

    def to_dict(self) -> dict:
        c = self.config
        pairs_scored = sum(p.positive in self.scores and p.negative in self.scores for p in self.data.pairs)
        return {
            "task": c.task,
            "smoke_run": c.limit is not None,
            "smoke_run_note": (f"--limit {c.limit}: only the first {c.limit} pairs, not the benchmark's figure"
                               if c.limit is not None else None),
            "config": dict(c.identity(), strict=c.strict, bootstrap=c.bootstrap, bootstrap_seed=c.bootstrap_seed),
            "conventions": {
                "stream": "the file's Mimi codes in the model's own audio stream, teacher forced; one fresh "
                          "stream per file",
                "user_stream": c.user_stream, "text": c.text,
                "log_likelihood": "sum over frames and the audio codebooks of log p(code), nats",
                "primary_normalization": PRIMARY, "why": PRIMARY_WHY,
                "pair_score": "1 if the right item is more likely, 0.5 on a tie, 0 otherwise",
                "interval": f"{int(LEVEL * 100)}% bootstrap percentile interval over the averaging units "
                            "(ZeroSpeech ids, stories, SALMon samples)",
            },
            "files_scored": len(self.scores),
            "files_in_data": len(self.data.files),
            "pairs_scored": pairs_scored,
            "pairs_in_data": len(self.data.pairs),
            "skipped": self.skipped,
            "notes": self.data.notes,
            "accuracy": self.accuracies.get(PRIMARY, self.accuracies),
            "accuracy_per_token": self.accuracies.get("mean"),
            "metrics": self.metrics,
            "runtime": self.runtime,
        }

    def write(self, out_dir: str | Path, extra: dict | None = None) -> list[Path]:
        """`results.json`, `items.csv`, `pairs.csv` (the pairs and their averaging unit, what `compare` pairs
        runs on) and, for swuggy / sblimp, the ZeroSpeech 2021 submission file."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / RESULTS_JSON, out / ITEMS_CSV, out / PAIRS_CSV]
        body = self.to_dict()
        sub = self.submission_path(out)
        if sub is not None:
            missing = sorted(set(self.data.files) - set(self.scores))
            body["submission"] = {"file": str(sub.relative_to(out)), "complete": not missing,
                                  "missing": missing[:20],
                                  "note": None if not missing else "files not scored: the official validation "
                                                                   "rejects a submission without every file"}
        report.write_json_atomic(paths[0], dict(extra or {}, **body))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file", "frames", "log_likelihood", "log_likelihood_per_token", "text"])
        for key in sorted(self.scores):
            s = self.scores[key]
            writer.writerow([key, s.frames, repr(s.log_likelihood), repr(s.log_likelihood_per_token),
                             self.config.text])
        report.write_text_atomic(paths[1], buf.getvalue())
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["positive", "negative", "unit", "voice", "attributes"])
        for pair in self.data.pairs:
            if pair.positive in self.scores and pair.negative in self.scores:
                writer.writerow([pair.positive, pair.negative, _unit_name(self.config.task, pair), pair.voice or "",
                                 json.dumps(pair.attributes, sort_keys=True)])
        report.write_text_atomic(paths[2], buf.getvalue())
        if sub is not None:
            lines = "".join(f"{key} {self.scores[key].log_likelihood!r}\n" for key in sorted(self.scores))
            sub.parent.mkdir(parents=True, exist_ok=True)
            report.write_text_atomic(sub, lines)
            paths.append(sub)
        return paths


# --- scoring -------------------------------------------------------------------------------------------------

def _batches(data: BenchmarkData, batch_size: int) -> tuple[list[list[str]], dict[str, int]]:
    """Files batched by length, longest first (as lm-eval's collator), from the file headers: fixed by the
    selection alone, so a resumed or multi-process run scores each file in the very same batch."""
    keys = list(data.files)
    durations = sphn.durations([str(data.files[k]) for k in keys]) if keys else []
    frames = {k: math.ceil((d or 0.0) * 12.5) for k, d in zip(keys, durations)}
    order = sorted(keys, key=lambda k: -frames[k])      # stable: ties keep the data's order
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)], frames


class ItemStore:
    """Finished batches in `<out>/items/batch_<i>.json`, written atomically as each batch is scored.

    A batch file is reused only if it lists the same files with the same identity (path, size, mtime, sha256)."""

    def __init__(self, root: Path, hasher: FileHasher) -> None:
        self.root = Path(root)
        self.hasher = hasher

    def path(self, index: int) -> Path:
        return self.root / f"batch_{index:06d}.json"

    def identities(self, keys: list[str], data: BenchmarkData) -> list[dict]:
        out = []
        for k in keys:
            try:
                out.append({"file": k, **self.hasher.identity(data.files[k])})
            except OSError as exc:
                out.append({"file": k, "error": str(exc)})
        return out

    def load(self, index: int, identities: list[dict]) -> tuple[list[ItemScore], list[dict]] | None:
        path = self.path(index)
        if not path.is_file():
            return None
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if stored.get("files") != identities:
            return None
        return [ItemScore(**s) for s in stored["scores"]], stored["skipped"]

    def save(self, index: int, identities: list[dict], scores: list[ItemScore], skipped: list[dict],
             meta: dict) -> None:
        payload = {"files": identities, "scores": [asdict(s) for s in scores], "skipped": skipped, **meta}
        text = json.dumps(payload)
        atomic_write(self.path(index), lambda f: f.write(text.encode()))


@contextmanager
def kv_sized_to(lm_model: tp.Any, steps: int) -> tp.Iterator[None]:
    """Temporal self-attention limited to `steps` instead of `context` while scoring a batch of at most `steps`
    streaming steps (its longest file + the max delay): every query of such a batch is less than `steps` from its
    keys, so the mask `delta < context` keeps the same keys and the logits are those of the full context (up to
    float rounding of a shorter softmax), while the KV caches (allocated with `context` slots when the stream
    opens) are sized to the batch: on Moshi's 3000-frame context and files of a few seconds, attention over 3000
    mostly masked slots per frame is what costs the time. Restored on exit."""
    changed = []
    for module in lm_model.transformer.modules():
        if isinstance(module, StreamingMultiheadAttention) and not module.cross_attention and \
                module.context is not None and module.context > steps:
            changed.append((module, module.context))
            module.context = steps
    try:
        yield
    finally:
        for module, context in changed:
            module.context = context


@dataclass
class _Encoded:
    """One batch's files, read and encoded: the codes `[K, T]` of the files kept, and those left out."""
    codes: list[torch.Tensor]
    keys: list[str]
    skipped: list[dict]


class LikelihoodEvaluator:
    """A likelihood benchmark prepared once: the files of `config.task` under `config.data` listed, paired,
    batched by length and encoded by `mimi` (codes kept in memory; `config.cache_dir` the on-disk code cache),
    then scored by every call with a model, as often as wanted:

        evaluator = LikelihoodEvaluator(mimi, LikelihoodConfig("sblimp", data="zr2021"))
        result = evaluator(lm_model)          # LikelihoodResult
        wandb.log(result.metrics, step=step)  # sblimp/accuracy, sblimp/accuracy/low, /high, ...
        result.write("runs/step_1000/sblimp") # results.json, items.csv, pairs.csv, submission/ as the CLI

    `moshi-eval likelihood` and `evaluate_likelihood` score through it: for the same model and config the
    numbers are bitwise theirs. The model comes back as given (training flags restored, no autograd,
    `requires_grad`, device and dtype untouched; the temporal KV context of `kv_sized_to` restored, also on an
    exception).

    Under torch.distributed (the caller's process group, never initialised or destroyed here; or `ranks`),
    build it and call it on every rank: each rank encodes and scores its share of the batches, every rank
    returns the same result, equal to one process's, and an error on one rank is raised on every rank
    (RankFailedError on the others) instead of a hang.

    Args:
        mimi: the codec of the models to score.
        config: the task, its data and the scoring options.
        ranks: the ranks to share the batches over (default: the caller's process group, if any).
        encode: encode every batch now and keep the codes in memory (default); False: each batch when it is
            scored, kept only while it is (a single call: memory flat in the number of files, and the batches
            finished in its `store`, as in a resumed CLI run, never encoded).
    Raises:
        LikelihoodConfigError: a bad config field; DataError: the data is not the layout the task needs;
        AudioReadError with `config.strict`; RankFailedError: another rank failed.
    """

    def __init__(self, mimi: tp.Any, config: LikelihoodConfig, ranks: distributed.Ranks | None = None,
                 encode: bool = True) -> None:
        if not isinstance(config, LikelihoodConfig):
            raise TypeError(f"config: expected a moshi_eval.LikelihoodConfig, got {type(config).__name__}.")
        config.check()
        self.config = config
        self.mimi = mimi
        self.ranks = ranks if ranks is not None else caller_ranks()
        data = load_benchmark(config.task, config.data, config.split, config.parts, config.strict)
        if config.limit is not None:
            data = data.limit(config.limit)
        self.data = data
        # Fixed by the file headers alone: a resumed or multi-process run scores each file in the same batch.
        self.batches, estimates = _batches(data, config.batch_size)
        owners = distributed.assign([max(estimates[k] for k in b) * len(b) for b in self.batches],
                                    self.ranks.world)
        self._mine = [i for i, owner in enumerate(owners) if owner == self.ranks.rank]
        self.cache = CodeCache(config.cache_dir, codec_identity(mimi)) if config.cache_dir is not None else None
        self._encoded: dict[int, _Encoded] = {}
        self._keep = encode
        self._silence: torch.Tensor | None = None
        if config.user_stream == "silence":
            self._silence = silence_codes(mimi, SILENCE_FRAMES)
        if encode:
            on_every_rank(self.ranks, "encoding the files", lambda: [self._encode(index) for index in self._mine])

    def _encode(self, index: int) -> _Encoded:
        """Batch `index` read and encoded (from memory, else the code cache, else Mimi)."""
        done = self._encoded.get(index)
        if done is not None:
            return done
        codes, keys, skipped = [], [], []
        for k in self.batches[index]:
            path = self.data.files[k]
            try:
                c = self.cache.get(path) if self.cache is not None else None
                if c is None:
                    c = encode_audio(self.mimi, read_audio(path, self.mimi.sample_rate))
                    if self.cache is not None:
                        self.cache.put(path, c)
            except AudioReadError as exc:
                if self.config.strict:
                    raise
                skipped.append({"file": k, "reason": f"unreadable audio: {exc.reason}"})
                continue
            codes.append(c)
            keys.append(k)
        done = _Encoded(codes, keys, skipped)
        if self._keep:
            self._encoded[index] = done
        return done

    def __call__(self, lm_model: tp.Any, store: ItemStore | None = None) -> LikelihoodResult:
        """Score the files with `lm_model` (a moshi LMModel whose audio stream takes `mimi`'s codes) and
        aggregate. `store`: finished batches kept across runs (resume), or None.

        Raises:
            TypeError / ValueError: not an LMModel / streaming already; NonFiniteLossError: a NaN/inf loss;
            DataError: nothing could be scored; RankFailedError: another rank failed (named);
            CheckpointError: `mimi`'s codes do not fit the model.
        """
        check_model(lm_model)
        check_codec_fits(lm_model, self.mimi)    # as LibriLightEvaluator: a named error, not a slice of the codes
        start = time.perf_counter()
        gathered = self.ranks.gather(score_model(self.ranks, lm_model, lambda: self._score(lm_model, store)))
        scores: dict[str, ItemScore] = {}
        skipped_files: list[dict] = []
        runtime = {k: 0.0 for k in gathered[0][2]}
        for s, sk, c in gathered:
            scores.update(s)
            skipped_files.extend(sk)
            for k in runtime:
                runtime[k] = max(runtime[k], c[k]) if k.endswith("seconds") else runtime[k] + c[k]
        runtime["processes"] = self.ranks.world
        cache = self.cache
        runtime["cache"] = None if cache is None else {"dir": str(cache.root), "hits": cache.hits,
                                                       "misses": cache.misses}
        data = self.data
        if not scores:
            reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped_files[:5])
            raise DataError(f"no file of {data.root} could be scored ({reasons}).")
        config = self.config
        accuracies, left = aggregate(data, scores, config.bootstrap, config.bootstrap_seed)
        frames, seconds = runtime["frames"], runtime["score_seconds"]
        runtime.update(files_per_s=runtime["files_scored_this_run"] / seconds if seconds else None,
                       frames_per_s=frames / seconds if seconds else None, device=str(lm_model.device),
                       total_seconds=time.perf_counter() - start)
        out = LikelihoodResult(config, data, scores, accuracies, data.skipped + skipped_files + left, runtime)
        out.metrics = flat_metrics(config.task, accuracies) if data.has_gold else {}
        return out

    def _score(self, lm_model: tp.Any, store: ItemStore | None) -> tuple[dict[str, ItemScore], list[dict], dict]:
        """This rank's batches: (scores by file key, files skipped with the reason, runtime counts)."""
        config, data = self.config, self.data
        lm_gen = LMGen(lm_model, use_sampling=False)
        K = lm_model.dep_q
        silence = None if self._silence is None else self._silence[: lm_model.n_q - K]
        scores: dict[str, ItemScore] = {}
        skipped: list[dict] = []
        counts = {"files_scored_this_run": 0, "files_resumed": 0, "frames": 0, "encode_seconds": 0.0,
                  "score_seconds": 0.0}
        with tqdm(total=sum(len(self.batches[i]) for i in self._mine), unit="file",
                  desc=f"{self.ranks.tag}{config.task}", disable=not config.progress or not self.ranks.is_main,
                  dynamic_ncols=True) as bar:
            for index in self._mine:
                keys = self.batches[index]
                identities = store.identities(keys, data) if store is not None else []
                done = store.load(index, identities) if store is not None else None
                if done is not None:
                    for s in done[0]:
                        scores[s.file] = s
                    skipped.extend(done[1])
                    counts["files_resumed"] += len(keys)
                    bar.update(len(keys))
                    continue
                t0 = time.perf_counter()
                encoded = self._encode(index)     # from memory when prepared: this call's encoding time only
                counts["encode_seconds"] += time.perf_counter() - t0
                t1 = time.perf_counter()
                codes = [c[:K] for c in encoded.codes]
                batch_scores = []
                steps = max((int(c.shape[-1]) for c in codes), default=0) + lm_gen.max_delay
                if codes:
                    with kv_sized_to(lm_model, steps):
                        results = list(score_sequences(lm_gen, codes, sequence_ids=encoded.keys, text=config.text,
                                                       user_stream=config.user_stream, silence=silence,
                                                       progress=False, chunk=config.chunk))
                    for result in results:
                        ce = result.codebook_ce.astype(np.float64)
                        batch_scores.append(ItemScore(result.sequence_id, int(ce.shape[1]), int(ce.size),
                                                      float(-ce.sum())))
                        bar.update(1)
                bar.update(len(encoded.skipped))
                counts["score_seconds"] += time.perf_counter() - t1
                counts["files_scored_this_run"] += len(batch_scores)
                counts["frames"] += sum(s.frames for s in batch_scores)
                if store is not None:
                    store.save(index, identities, batch_scores, encoded.skipped,
                               {"batch": index, "device": str(lm_model.device)})
                for s in batch_scores:
                    scores[s.file] = s
                skipped.extend(encoded.skipped)
        return scores, skipped, counts


def evaluate_likelihood(lm_model: tp.Any, mimi: tp.Any, config: LikelihoodConfig,
                        store: ItemStore | None = None, ranks: distributed.Ranks | None = None) -> LikelihoodResult:
    """Score the files of `config.task` under `config.data` with the streaming `lm_model` and aggregate: one
    call of a `LikelihoodEvaluator` (batches encoded as they are scored; finished ones of `store` not at all).

    Args:
        lm_model: a moshi `LMModel` whose audio stream takes `mimi`'s codes.
        mimi: the Mimi codec (`num_codebooks >= lm_model.dep_q`).
        store: finished batches kept across runs (resume), or None.
        ranks: torchrun ranks (default: the caller's process group if any; never created or destroyed here).
    Raises:
        DataError: the data is not the layout the task needs, or nothing could be scored; names the file.
        LikelihoodConfigError: a bad config field. RankFailedError: another rank failed.
    """
    return LikelihoodEvaluator(mimi, config, ranks, encode=False)(lm_model, store)


# --- the run behind `moshi-eval likelihood`: lock, configuration identity, resume ----------------------------

def _check_config(out: Path, config: dict) -> bool:
    """Store `config` in `<out>/config.json` or check it equals the stored one (then True: a resume)."""
    path = out / CONFIG_JSON
    config = json.loads(json.dumps(config))
    has_items = (out / ITEMS_DIR).is_dir() and any((out / ITEMS_DIR).glob("batch_*.json"))
    if path.is_file() and has_items:
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise report.ReportError(f"cannot read {path}: {exc}. Use another --out, or delete it.") from exc
        if stored != config:
            keys = sorted(k for k in set(stored) | set(config) if stored.get(k) != config.get(k))
            diffs = "; ".join(f"{k}: stored {stored.get(k)!r}, now {config.get(k)!r}" for k in keys[:5])
            raise report.ConfigMismatchError(f"--out {out} holds results of another configuration ({diffs}). "
                                             "Use another --out, or delete it to start over.")
        return True
    if has_items:
        raise report.ConfigMismatchError(f"--out {out} holds scored batches but no {CONFIG_JSON}: use another --out.")
    report.write_json_atomic(path, config)
    return False


def run_likelihood(config: LikelihoodConfig, out: Path, load: tp.Callable[[], tp.Any], identity: dict,
                   command: str, hasher: FileHasher | None = None) -> LikelihoodResult:
    """`evaluate_likelihood` into `out`: one run at a time (lock), an `out` of another configuration refused,
    finished batches kept (a killed run resumes where it stopped), results written by rank 0.

    `load()` returns an object with `lm_model` and `mimi` (`checkpoint.LoadedCheckpoint`); it is called once
    `out` is locked and its configuration checked."""
    config.check()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LikelihoodConfigError(f"out: {out} exists and is not a directory.")
    out.mkdir(parents=True, exist_ok=True)
    owned = not torch.distributed.is_initialized()    # a caller's process group is kept, never destroyed
    ranks = distributed.from_environment()
    try:
        with ExitStack() as stack:
            outcome: tuple[bool, BaseException | None] = (False, None)
            if ranks.is_main:
                try:
                    stack.enter_context(OutputLock(out, command))
                    outcome = (_check_config(out, {"model": identity, **config.identity()}), None)
                except Exception as exc:
                    outcome = (False, exc)
            resumed, error = ranks.broadcast(outcome)
            if error is not None:
                raise error
            ckpt = load()
            store = ItemStore(out / ITEMS_DIR, hasher or FileHasher())
            result = evaluate_likelihood(ckpt.lm_model, ckpt.mimi, config, store, ranks)
            if ranks.is_main:
                from .run import versions
                extra = {"command": command,
                         "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "resumed": resumed, "model": identity, "versions": versions()}
                result.write(out, extra)
                _print_summary(result, out)
            ranks.barrier()
            return result
    finally:
        if owned:
            ranks.close()


def _print_summary(result: LikelihoodResult, out: Path) -> None:
    task = result.config.task
    lines = [f"moshi-eval likelihood {task}: {len(result.scores)} files scored, {len(result.skipped)} skipped"]
    for name, value in result.metrics.items():
        if not name.endswith(("/low", "/high")) and name.count("/") <= 1:
            low, high = result.metrics.get(f"{name}/low"), result.metrics.get(f"{name}/high")
            ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
            lines.append(f"  {name} = {value:.4f}{ci}")
    if task == "salmon":
        lines += [f"  {k} = {v:.4f}" for k, v in result.metrics.items() if not k.endswith(("/low", "/high"))]
    if not result.data.has_gold:
        lines.append(f"  no gold: scores in {result.submission_path(out)}")
    print("\n".join(lines) + f"\nresults in {out / RESULTS_JSON}", file=sys.stderr)


__all__ = ["ItemScore", "ItemStore", "LikelihoodConfig", "LikelihoodConfigError", "LikelihoodEvaluator",
           "LikelihoodResult", "NORMALIZATIONS", "aggregate", "evaluate_likelihood", "flat_metrics", "frequency_band",
           "pair_score", "run_likelihood"]
