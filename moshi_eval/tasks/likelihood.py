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
from contextlib import contextmanager
import csv
from dataclasses import asdict, dataclass, field
import datetime
import hashlib
import io
import json
import math
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

from .. import distributed
from ..checkpoint import check_codec_fits
from ..config import ConfigError, LikelihoodConfig
from ..data.benchmarks import ZEROSPEECH_PART, BenchmarkData, Pair, load_benchmark
from ..data.codes import MIMI_FRAME_RATE, SILENCE_FRAMES, CodeCache, codec_identity, encode_audio, silence_codes
from ..data.librilight import AudioReadError, DataError, read_audio
from ..files.folder import OutputFolder, folder_command
from ..files.hashing import FileHasher
from ..scoring.model_call import caller_ranks, check_model, on_every_rank, score_model
from ..scoring.sequences import score_sequences
from ..scoring.streaming import StreamingVerifier
from ..stats.bootstrap import DEFAULT_RESAMPLES, DEFAULT_SEED, LEVEL, paired_bootstrap
from .base import versions

TASK = "likelihood"
NORMALIZATIONS = ("sum", "mean")
PRIMARY = "sum"
PRIMARY_WHY = ("sum: the official ZeroSpeech 2021 scorer compares the submitted log-likelihoods as they are, and "
               "lm-evaluation-harness's acc compares summed log-likelihoods; mean (per token, slamkit's default) is "
               "reported beside it as accuracy_per_token")
FREQUENCY_BANDS = ((0, 1, "oov"), (1, 5, "1-5"), (5, 20, "6-20"), (20, 100, "21-100"), (100, math.inf, ">100"))
ITEMS_DIR = "items"
ITEMS_CSV = "items.csv"
PAIRS_CSV = "pairs.csv"
LikelihoodConfigError = ConfigError    # the one error class of a bad option (the name of earlier releases)


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
    """Per-file scores, official accuracies and what was left out; `.metrics` is flat for loggers.

    `resumed`: the batches a store held already (a resumed CLI run), not scored by the call."""
    config: LikelihoodConfig
    data: BenchmarkData
    scores: dict[str, ItemScore]
    accuracies: dict
    skipped: list[dict]               # files and pairs left out, with the reason
    runtime: dict
    metrics: dict[str, float] = field(default_factory=dict)
    identities: dict[str, str] = field(default_factory=dict)    # file key -> sha256 of the audio scored
    resumed: int = 0
    is_main: bool = True
    full_size: tuple[int, int] | None = None    # (files, pairs) of the data before `limit`: a smoke run's whole

    task = TASK

    @property
    def smoke_note(self) -> str | None:
        """What a smoke run (`limit`) says wherever its numbers appear: it is not the benchmark's figure."""
        c = self.config
        if c.limit is None:
            return None
        files, pairs = self.full_size or (len(self.data.files), len(self.data.pairs))
        what = f"first {len(self.data.pairs)} of {pairs} pairs" if self.data.has_gold else \
            f"first {len(self.data.files)} of {files} files"
        return f"smoke run (--limit {c.limit}): {what}, not the benchmark's figure"

    def submission_path(self, out_dir: Path) -> Path | None:
        part = ZEROSPEECH_PART.get(self.config.task)
        return None if part is None else Path(out_dir) / "submission" / part / f"{self.config.split}.txt"

    def to_dict(self) -> dict:
        c = self.config
        pairs_scored = sum(p.positive in self.scores and p.negative in self.scores for p in self.data.pairs)
        return {
            "benchmark": c.task,
            "smoke_run": c.limit is not None,
            "smoke_run_note": self.smoke_note,
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
            "files_selected": len(self.data.files),
            "files_in_data": (self.full_size or (len(self.data.files),))[0],
            "pairs_scored": pairs_scored,
            "pairs_selected": len(self.data.pairs),
            "pairs_in_data": (self.full_size or (0, len(self.data.pairs)))[1],
            "skipped": self.skipped,
            "notes": self.data.notes,
            "metrics": self.metrics,
            "accuracy": self.accuracies.get(PRIMARY, self.accuracies),
            "accuracy_per_token": self.accuracies.get("mean"),
            "runtime": self.runtime,
        }

    def write(self, out_dir: str | Path, extra: dict | None = None) -> list[Path] | None:
        """`results.json`, `items.csv`, `pairs.csv` (the pairs and their averaging unit, what `compare` pairs runs
        on) and, for swuggy / sblimp, the ZeroSpeech 2021 submission file, into `out_dir` (locked while writing;
        new, or holding a likelihood run of this same configuration: `folder.ConfigMismatchError` otherwise).
        `extra`: more keys for results.json (`model`: what identifies the model, default `{"in_memory": True}`).
        Returns the paths written. On a rank other than 0 of a torch.distributed job, writes nothing and returns
        None: every rank holds the same result, rank 0 writes it."""
        if not self.is_main:
            return None
        extra = dict(extra or {})
        identity = extra.pop("model", None) or {"in_memory": True}
        command = folder_command(out_dir, "LikelihoodResult.write")
        with OutputFolder(out_dir, TASK, command) as folder:
            folder.check_config({"model": identity, **self.config.identity()})
            path = self.write_files(folder, command, identity, extra)
        return [path] + [folder.path / name for name in self._files(folder.path)]

    def _files(self, out: Path) -> dict[str, bytes]:
        """The final files: items.csv, pairs.csv and the submission, as bytes by path relative to `out`."""
        files: dict[str, bytes] = {}
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["file", "frames", "log_likelihood", "log_likelihood_per_token", "text", "sha256"])
        for key in sorted(self.scores):
            s = self.scores[key]
            writer.writerow([key, s.frames, repr(s.log_likelihood), repr(s.log_likelihood_per_token),
                             self.config.text, self.identities.get(key, "")])
        files[ITEMS_CSV] = buf.getvalue().encode()
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["positive", "negative", "unit", "voice", "attributes"])
        for pair in self.data.pairs:
            if pair.positive in self.scores and pair.negative in self.scores:
                writer.writerow([pair.positive, pair.negative, _unit_name(self.config.task, pair), pair.voice or "",
                                 json.dumps(pair.attributes, sort_keys=True)])
        files[PAIRS_CSV] = buf.getvalue().encode()
        sub = self.submission_path(out)
        if sub is not None:
            lines = "".join(f"{key} {self.scores[key].log_likelihood!r}\n" for key in sorted(self.scores))
            files[str(sub.relative_to(out))] = lines.encode()
        return files

    def write_files(self, folder: OutputFolder, command: str, identity: dict, extra: dict | None = None) -> Path:
        """Into `folder` (entered, its configuration checked): items.csv, pairs.csv, the submission, then
        results.json naming their sha256."""
        body = dict(extra or {}, command=command,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    resumed=self.resumed > 0, model=identity, versions=versions(), **self.to_dict())
        sub = self.submission_path(folder.path)
        if sub is not None:
            missing = sorted(set(self.data.files) - set(self.scores))
            smoke = self.smoke_note
            note = (f"{smoke}: the official validation rejects a submission without every file" if smoke else
                    "files not scored: the official validation rejects a submission without every file"
                    if missing else None)
            body["submission"] = {"file": str(sub.relative_to(folder.path)), "complete": not missing and not smoke,
                                  "missing": missing[:20], "note": note}
        return folder.write_results(body, self._files(folder.path))

    def print_summary(self, out: Path) -> None:
        task = self.config.task
        lines = [f"moshi-eval likelihood {task}: {len(self.scores)} files scored, {len(self.skipped)} skipped"
                 + (f", {self.resumed} resumed from {out}" if self.resumed else "")]
        if self.smoke_note:
            lines.append(f"  {self.smoke_note}")
        for name, value in self.metrics.items():
            if not name.endswith(("/low", "/high")) and name.count("/") <= 1:
                low, high = self.metrics.get(f"{name}/low"), self.metrics.get(f"{name}/high")
                ci = f" [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
                lines.append(f"  {name} = {value:.4f}{ci}")
        if task == "salmon":
            lines += [f"  {k} = {v:.4f}" for k, v in self.metrics.items() if not k.endswith(("/low", "/high"))]
        if not self.data.has_gold:
            lines.append(f"  no gold: scores in {self.submission_path(out)}")
        print("\n".join(lines) + f"\nresults in {out / 'results.json'}", file=sys.stderr)


# --- scoring -------------------------------------------------------------------------------------------------

def _batches(data: BenchmarkData, batch_size: int) -> tuple[list[list[str]], dict[str, int]]:
    """Files batched by length, longest first (as lm-eval's collator), from the file headers: fixed by the
    selection alone, so a resumed or multi-process run scores each file in the very same batch."""
    keys = list(data.files)
    durations = sphn.durations([str(data.files[k]) for k in keys]) if keys else []
    frames = {k: math.ceil((d or 0.0) * MIMI_FRAME_RATE) for k, d in zip(keys, durations)}
    order = sorted(keys, key=lambda k: -frames[k])      # stable: ties keep the data's order
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)], frames


def _scores_sha256(scores: list[dict], skipped: list[dict]) -> str:
    return hashlib.sha256(json.dumps([scores, skipped], sort_keys=True).encode()).hexdigest()


class BatchStore:
    """The likelihood task's resume units in an `OutputFolder`: `items/batch_<i>.json`, written atomically as each
    batch is scored, with its origin (the folder's configuration digest and model identity), the identity of its
    files (path, size, mtime, sha256) and the checksum of its scores. A batch file is reused only if all of them
    match; otherwise the batch is scored again and the run says why."""

    def __init__(self, folder: OutputFolder, hasher: FileHasher, tag: str = "") -> None:
        self.folder = folder
        self.hasher = hasher
        self.tag = tag

    def path(self, index: int) -> Path:
        return self.folder.path / ITEMS_DIR / f"batch_{index:06d}.json"

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
            scores, skipped = stored["scores"], stored["skipped"]
            why = self.folder.why_not_reusable(stored.get("origin"), stored.get("scores_sha256"),
                                               _scores_sha256(scores, skipped))
            if why is None and stored.get("files") != identities:
                why = "its files changed since it was scored (replaced or edited audio)"
            result = [ItemScore(**s) for s in scores] if why is None else None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            why, result = f"unreadable ({type(exc).__name__}: {exc})", None
        if result is None:
            print(f"moshi-eval: {self.tag}{path}: {why}: scoring the batch again.", file=sys.stderr)
            return None
        return result, skipped

    def save(self, index: int, identities: list[dict], scores: list[ItemScore], skipped: list[dict],
             meta: dict) -> None:
        values = [asdict(s) for s in scores]
        payload = {"origin": self.folder.origin(), "files": identities, "scores": values, "skipped": skipped,
                   "scores_sha256": _scores_sha256(values, skipped), **meta}
        self.folder.write_unit(self.path(index).relative_to(self.folder.path), json.dumps(payload).encode())


ItemStore = BatchStore     # the name of earlier releases


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
    identities: dict[str, str]      # file key -> sha256 of the audio read


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
                 encode: bool = True, hasher: FileHasher | None = None) -> None:
        if not isinstance(config, LikelihoodConfig):
            raise TypeError(f"config: expected a moshi_eval.LikelihoodConfig, got {type(config).__name__}.")
        config.validate()
        self.config = config
        self.mimi = mimi
        self.ranks = ranks if ranks is not None else caller_ranks()
        self._hasher = hasher or FileHasher(None if config.cache_dir is None else Path(config.cache_dir) / "hashes")
        self._verify = StreamingVerifier()
        data = load_benchmark(config.task, config.data, config.split, config.parts, config.strict)
        self.full_size = (len(data.files), len(data.pairs))
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
        codes, keys, skipped, identities = [], [], [], {}
        for k in self.batches[index]:
            path = self.data.files[k]
            try:
                identities[k] = self._hasher.identity(path)["sha256"]     # the audio as it is read
            except OSError:
                pass
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
        done = _Encoded(codes, keys, skipped, identities)
        if self._keep:
            self._encoded[index] = done
        return done

    @property
    def metric_prefix(self) -> str:
        return self.config.task

    def __call__(self, lm_model: tp.Any, store: BatchStore | None = None) -> LikelihoodResult:
        """Score the files with `lm_model` (a moshi LMModel whose audio stream takes `mimi`'s codes) and
        aggregate. `store`: finished batches kept across runs (resume), or None.

        Raises:
            TypeError / ValueError: not an LMModel / streaming already; NonFiniteLossError: a NaN/inf loss;
            DataError: nothing could be scored; RankFailedError: another rank failed (named);
            CheckpointError: `mimi`'s codes do not fit the model; StreamingCheckError: a streaming layer this
            project does not know streams in chunks otherwise than frame by frame.
        """
        check_model(lm_model)
        check_codec_fits(lm_model, self.mimi)    # as LibriLightEvaluator: a named error, not a slice of the codes
        start = time.perf_counter()
        gathered = self.ranks.gather(score_model(self.ranks, lm_model, lambda: self._score(lm_model, store),
                                                 self.config.threads))
        scores: dict[str, ItemScore] = {}
        skipped_files: list[dict] = []
        identities: dict[str, str] = {}
        runtime = {k: 0.0 for k in gathered[0][2]}
        for s, sk, c, ids in gathered:
            scores.update(s)
            skipped_files.extend(sk)
            identities.update(ids)
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
                       threads=config.threads or torch.get_num_threads(), total_seconds=time.perf_counter() - start)
        out = LikelihoodResult(config, data, scores, accuracies, data.skipped + skipped_files + left, runtime,
                               identities=identities, resumed=int(runtime["files_resumed"]),
                               is_main=self.ranks.is_main, full_size=self.full_size)
        out.metrics = flat_metrics(config.task, accuracies) if data.has_gold else {}
        return out

    def _score(self, lm_model: tp.Any, store: BatchStore | None
               ) -> tuple[dict[str, ItemScore], list[dict], dict, dict[str, str]]:
        """This rank's batches: (scores by file key, files skipped with the reason, runtime counts, sha256 of each
        file scored)."""
        config, data = self.config, self.data
        if config.verify_streaming:
            verified = self._verify(lm_model, config.chunk, config.text)
            if verified and self.ranks.is_main and store is not None:
                print(f"moshi-eval: {verified}", file=sys.stderr)
        file_sha256: dict[str, str] = {}
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
                    file_sha256.update({i["file"]: i["sha256"] for i in identities if "sha256" in i})
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
                    if s.file in encoded.identities:
                        file_sha256[s.file] = encoded.identities[s.file]
                skipped.extend(encoded.skipped)
        if store is not None and counts["files_resumed"]:
            print(f"moshi-eval: {self.ranks.tag}resuming in {store.folder.path}: {int(counts['files_resumed'])} of "
                  f"{sum(len(self.batches[i]) for i in self._mine)} files already scored.", file=sys.stderr)
        return scores, skipped, counts, file_sha256


def evaluate_likelihood(lm_model: tp.Any, mimi: tp.Any, config: LikelihoodConfig,
                        store: BatchStore | None = None, ranks: distributed.Ranks | None = None) -> LikelihoodResult:
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


class LikelihoodTask:
    """A likelihood benchmark as the runner runs it (`moshi-eval likelihood`): its identity, its evaluator (batches
    encoded as they are scored; those finished in `--out` never) and its unit of resume (a batch of files)."""

    name = TASK
    unit = "batch"
    units_dir = ITEMS_DIR

    def __init__(self, config: LikelihoodConfig, prepare_data: tp.Callable[[], tp.Any] | None = None) -> None:
        config.validate()
        self.config = config
        self.prepare_data = prepare_data    # the demo writes its audio once the folder is locked and checked

    def identity(self, device: tp.Any) -> dict:
        return self.config.identity()

    def evaluator(self, mimi: tp.Any, ranks: distributed.Ranks, cache_dir: Path | None, hasher: FileHasher,
                  progress: bool) -> LikelihoodEvaluator:
        from dataclasses import replace
        if self.prepare_data is not None:
            self.prepare_data()
        config = replace(self.config, cache_dir=cache_dir, progress=progress)
        self._hasher = hasher
        return LikelihoodEvaluator(mimi, config, ranks, encode=False, hasher=hasher)

    def store(self, folder: OutputFolder, ranks: distributed.Ranks) -> BatchStore:
        return BatchStore(folder, getattr(self, "_hasher", None) or FileHasher(), ranks.tag)


__all__ = ["BatchStore", "ItemScore", "ItemStore", "LikelihoodConfig", "LikelihoodConfigError", "LikelihoodEvaluator",
           "LikelihoodResult", "LikelihoodTask", "NORMALIZATIONS", "aggregate", "evaluate_likelihood", "flat_metrics",
           "frequency_band", "pair_score"]
