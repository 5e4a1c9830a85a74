"""A ZeroSpeech 2021 submission folder from finished `moshi-eval likelihood` runs, as `zerospeech2021-validate`
accepts it.

What the official validator (zerospeech/zerospeech2021, `zerospeech2021-validate DATASET SUBMISSION`) checks, and
so what `write_submission` writes (nothing else: the validator refuses any other entry, dotfiles included):

    SUBMISSION/meta.yaml           every key below and no other; strings non-empty, `gpu_budget` a number
    SUBMISSION/code/               only with `open_source: true`, and then not empty
    SUBMISSION/phonetic/           always present; empty here, so validate with --no-phonetic
    SUBMISSION/semantic/           always present; empty here, so validate with --no-semantic
    SUBMISSION/lexical/dev.txt     sWUGGY: `<wav stem> <score>`, one line per DATASET/lexical/dev/*.wav
    SUBMISSION/lexical/test.txt    ... per DATASET/lexical/test/*.wav
    SUBMISSION/syntactic/dev.txt   sBLIMP, the same for DATASET/syntactic/{dev,test}
    SUBMISSION/syntactic/test.txt

The validator checks the same splits for every track: dev and test, or dev alone with `--only-dev` (a test.txt is
then refused). A track not submitted keeps its folder, empty, and is validated with `--no-lexical` /
`--no-syntactic`. `meta.yaml`'s `parameters.phonetic` and `parameters.semantic` are required even when those
tracks are skipped; they describe no submitted file here. The score of a file is its log-likelihood under the model
(nats, the sum over frames and audio codebooks), the run's `submission/<track>/<split>.txt` copied as it is.

The runs must be complete (no `--limit` smoke run, every file scored), of one model (the same weights, by their
sha256) and one scoring (text and user streams). Fields the runs cannot know (author, affiliation, training set,
GPU budget) are written empty unless given, so that the validator refuses the folder until they are filled
(`Submission.to_fill` names them).
"""
from dataclasses import dataclass, field
import json
import math
import os
from pathlib import Path
import shutil
import sys
import tempfile
import typing as tp
import zipfile

from .data.benchmarks import ZEROSPEECH_PART
from .errors import MoshiEvalError
from .files.folder import ReportError, RunFolder
from .tasks.base import versions

TRACKS = tuple(ZEROSPEECH_PART.values())          # lexical (sWUGGY), syntactic (sBLIMP)
SKIPPED_TRACKS = ("phonetic", "semantic")          # the tracks moshi-eval does not score: empty folders
SPLITS = ("dev", "test")
META_YAML = "meta.yaml"
# `parameters` of meta.yaml: required by the validator whatever it checks; these describe no file submitted here.
UNUSED_PARAMETERS = {"phonetic": {"metric": "cosine", "frame_shift": 0.08},     # Mimi's 12.5 Hz frames
                     "semantic": {"metric": "cosine", "pooling": "mean"}}


class SubmissionError(MoshiEvalError, ValueError):
    """Runs that do not make a ZeroSpeech 2021 submission, or a folder that cannot take it; the message says why."""


@dataclass
class SubmissionMeta:
    """The fields of meta.yaml a run does not know. Empty strings and a None `gpu_budget` are written as they are
    (the validator then refuses the folder, naming the field): fill them in meta.yaml or give them here.
    `description`: None for one made from the runs."""
    author: str = ""
    affiliation: str = ""
    train_set: str = ""
    gpu_budget: float | None = None       # GPU hours the model's training took (a number, the validator's type)
    description: str | None = None
    visually_grounded: bool = False

    def __post_init__(self) -> None:
        if self.gpu_budget is not None and (isinstance(self.gpu_budget, bool)
                                            or not isinstance(self.gpu_budget, (int, float))
                                            or not 0 <= self.gpu_budget < float("inf")):
            raise SubmissionError(f"gpu_budget: expected a number of GPU hours >= 0, got {self.gpu_budget!r}.")


@dataclass
class SubmissionConfig:
    """`moshi-eval zr2021-submission`'s options: the likelihood `runs` (sWUGGY and sBLIMP, dev and test), the
    submission folder `out` (new or empty), `meta`, `code` (a folder copied to code/: the submission is then open
    source) and `zip` (also write `out` + `.zip`, meta.yaml at its top and the empty folders kept)."""
    runs: list[Path]
    out: Path
    meta: SubmissionMeta = field(default_factory=SubmissionMeta)
    code: Path | None = None
    zip: bool = False


@dataclass
class Submission:
    """What `write_submission` wrote: the folder (and zip), the run of each `(track, split)`, the options of
    `zerospeech2021-validate` it passes with, and the meta.yaml fields left to fill."""
    path: Path
    runs: dict[tuple[str, str], Path]
    validate_options: list[str]
    to_fill: list[str]
    zip_path: Path | None = None

    def validate_command(self, dataset: str = "DATASET") -> str:
        return " ".join(["zerospeech2021-validate", *self.validate_options, dataset, str(self.path)])


@dataclass
class _Part:
    track: str
    split: str
    run: Path
    scores: bytes
    model: dict
    scoring: dict


# Where a model came from, not what it is: the same weights downloaded or copied elsewhere are the same model.
_PROVENANCE_KEYS = ("hf_repo", "checkpoint_dir", "model_id")


def _model_key(value: tp.Any) -> tp.Any:
    """What identifies the model in results.json's `model`: a weight file by its sha256 alone (not its path, size
    or mtime), the configs and dtype as they are, the provenance keys left out."""
    if isinstance(value, dict):
        if isinstance(value.get("sha256"), str):
            return {"sha256": value["sha256"]}
        return {k: _model_key(v) for k, v in value.items() if k not in _PROVENANCE_KEYS}
    if isinstance(value, list):
        return [_model_key(v) for v in value]
    return value


def _differences(a: tp.Any, b: tp.Any, prefix: str = "") -> list[str]:
    """The dotted keys at which two `_model_key`s differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".") or "model"]


def check_scores(text: str, where: str) -> int:
    """Checks a submission file as the validator reads it (each line `<name> <float>`, one space, no empty
    line, no name twice) and that every score is finite; returns the number of lines."""
    names: set[str] = set()
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for number, line in enumerate(lines, 1):
        fields = line.strip().split(" ")
        if len(fields) != 2 or not fields[0]:
            raise SubmissionError(f"{where}, line {number}: expected '<file name> <score>', got {line!r}.")
        try:
            score = float(fields[1])
        except ValueError:
            raise SubmissionError(f"{where}, line {number}: the score {fields[1]!r} is not a number.") from None
        if not math.isfinite(score):
            raise SubmissionError(f"{where}, line {number}: the score of {fields[0]} is {fields[1]}.")
        if fields[0] in names:
            raise SubmissionError(f"{where}, line {number}: {fields[0]} is listed twice.")
        names.add(fields[0])
    return len(names)


def _read_part(path: Path) -> _Part:
    try:
        with RunFolder(path) as run:
            results = run.results
            if run.task != "likelihood":
                raise SubmissionError(f"{path}: a {run.task} run; a ZeroSpeech submission is made of likelihood "
                                      "runs of swuggy (lexical) and sblimp (syntactic).")
            benchmark = results.get("benchmark")
            if benchmark not in ZEROSPEECH_PART:
                raise SubmissionError(f"{path}: a likelihood run of {benchmark}; only swuggy (lexical) and sblimp "
                                      "(syntactic) runs make a ZeroSpeech 2021 submission.")
            sub = results.get("submission") or {}
            if not sub.get("complete"):
                why = sub.get("note") or "it wrote no submission file"
                raise SubmissionError(f"{path}: not a complete submission ({why}). Score the whole split without "
                                      "--limit, in this --out, to complete it.")
            file = run.check_file(sub["file"], (results.get("files") or {}).get(sub["file"]))
            scores = file.read_bytes()
    except ReportError as exc:
        raise SubmissionError(str(exc)) from None
    except OSError as exc:
        raise SubmissionError(f"{path}: cannot read the run ({exc.strerror or exc}).") from exc
    config = results.get("config") or {}
    split = config.get("split")
    if split not in SPLITS:
        raise SubmissionError(f"{path}: split {split!r}, expected one of {list(SPLITS)}.")
    check_scores(scores.decode(), f"{path / sub['file']}")
    return _Part(ZEROSPEECH_PART[benchmark], split, path, scores, _model_key(results.get("model")),
                 {k: config.get(k) for k in ("text", "user_stream")})


def _plan(parts: list[_Part]) -> tuple[dict[tuple[str, str], _Part], list[str]]:
    """The part of each (track, split) and the validator's options; SubmissionError for runs that clash."""
    by_key: dict[tuple[str, str], _Part] = {}
    for part in parts:
        key = (part.track, part.split)
        if key in by_key:
            raise SubmissionError(f"two runs of {part.track} {part.split}: {by_key[key].run} and {part.run}.")
        by_key[key] = part
    first = parts[0]
    for part in parts[1:]:
        if part.model != first.model:
            keys = _differences(first.model, part.model)
            raise SubmissionError(f"runs of different models: {first.run} and {part.run} (results.json 'model' "
                                  f"differs in {', '.join(keys[:5])}): a submission holds one model's scores.")
        if part.scoring != first.scoring:
            raise SubmissionError(f"runs scored differently: {first.run} {first.scoring} and {part.run} "
                                  f"{part.scoring}: a submission holds one scoring's numbers.")
    splits = {track: {s for t, s in by_key if t == track} for track in TRACKS}
    present = {track: s for track, s in splits.items() if s}
    for track, have in present.items():
        if "dev" not in have:
            raise SubmissionError(f"{track}: a test run without its dev run; the validator always checks dev.")
    if len({frozenset(s) for s in present.values()}) > 1:
        said = "; ".join(f"{t}: {', '.join(sorted(s))}" for t, s in present.items())
        raise SubmissionError(f"the tracks have different splits ({said}): the validator checks the same splits in "
                              "every track (dev and test, or dev alone with --only-dev). Add the missing runs.")
    options = [f"--no-{track}" for track in SKIPPED_TRACKS] + [f"--no-{t}" for t in TRACKS if t not in present]
    if all(have == {"dev"} for have in present.values()):
        options.append("--only-dev")
    return by_key, options


def _yaml(value: tp.Any) -> str:
    """A scalar as YAML 1.1 (the validator's PyYAML) reads it back: JSON scalars, a quoted string stays a string
    (an unquoted `off` or `no` would not), and a float always has a dot (PyYAML reads `1e+16` as a string)."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + (e + exponent if e else "")
    return "null" if value is None else json.dumps(value)


def meta_yaml(meta: SubmissionMeta, open_source: bool, description: str) -> str:
    """meta.yaml with the validator's keys, each value in JSON form (valid YAML)."""
    lines = ["# ZeroSpeech 2021 submission metadata (zerospeech2021-validate checks every key).",
             "# Fill in the empty fields before validating: who submits, on what the model was trained, and the",
             "# GPU hours its training took.",
             f"author: {_yaml(meta.author)}", f"affiliation: {_yaml(meta.affiliation)}",
             f"description: {_yaml(description)}", f"open_source: {_yaml(open_source)}",
             f"train_set: {_yaml(meta.train_set)}", f"visually_grounded: {_yaml(meta.visually_grounded)}",
             f"gpu_budget: {_yaml(meta.gpu_budget)}",
             "# Required by the validator for every submission; no phonetic or semantic file is submitted here.",
             "parameters:"]
    for track, values in UNUSED_PARAMETERS.items():
        lines.append(f"  {track}:")
        lines += [f"    {key}: {_yaml(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def _description(parts: list[_Part]) -> str:
    scoring = parts[0].scoring
    model = parts[0].model or {}
    weights = model.get("moshi_weights") if isinstance(model, dict) else None
    what = (f"weights sha256 {weights['sha256'][:16]}" if isinstance(weights, dict) and weights.get("sha256")
            else f"model {json.dumps(model, sort_keys=True)[:120]}")
    return (f"Moshi streaming LM ({what}), scored with moshi-eval (moshi-patch {versions()['moshi_patch']}): the "
            "score of a file is its log-likelihood in nats, summed over frames and audio codebooks, its Mimi codes "
            f"teacher forced in the model's audio stream (LMGen.step_with_logits), text stream {scoring['text']}, "
            f"user stream {scoring['user_stream']}.")


def write_submission(config: SubmissionConfig) -> Submission:
    """Assembles the submission folder `config.out` (and its zip) from the runs (see the module docstring). Both are
    built beside `out` under temporary names and renamed into place at the end: a failure leaves neither.

    Raises:
        SubmissionError: no run, runs that are incomplete, of another task, of different models or scorings,
            clashing splits; an `out` that exists and is not an empty folder (or is the current folder); a `code`
            folder missing or empty, or holding a link that leads nowhere.
    """
    if not config.runs:
        raise SubmissionError("runs: expected at least one likelihood run folder (swuggy or sblimp), got none.")
    out = Path(os.path.abspath(config.out))
    if out == Path.cwd() or out.parent == out:
        raise SubmissionError(f"out: {config.out} is the current folder (or a root): give a new folder's name.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SubmissionError(f"out: {out} exists and is not an empty folder; the validator refuses any entry it "
                              "does not expect: give a new folder.")
    zip_path = out.with_name(out.name + ".zip") if config.zip else None
    if zip_path is not None and zip_path.exists():
        raise SubmissionError(f"zip: {zip_path} exists already; remove it or give another out.")
    code = None if config.code is None else Path(os.path.abspath(config.code))
    if code is not None and (not code.is_dir() or not any(code.iterdir())):
        raise SubmissionError(f"code: expected a folder holding the code, got {config.code} (missing or empty: the "
                              "validator refuses an open source submission with an empty code/).")
    parts = [_read_part(Path(run)) for run in config.runs]
    by_key, options = _plan(parts)
    meta = config.meta
    description = meta.description if meta.description is not None else _description(parts)
    to_fill = [name for name in ("author", "affiliation", "train_set") if not getattr(meta, name).strip()]
    to_fill += ["description"] if not description.strip() else []
    to_fill += ["gpu_budget"] if meta.gpu_budget is None else []

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    staged_zip = staging.with_name(staging.name + ".zip")
    try:
        (staging / META_YAML).write_text(meta_yaml(meta, code is not None, description))
        for track in SKIPPED_TRACKS + TRACKS:
            (staging / track).mkdir()
        for (track, split), part in by_key.items():
            (staging / track / f"{split}.txt").write_bytes(part.scores)
        if code is not None:
            _copy_code(code, staging / "code", skip={staging, out, staged_zip})
        staging.chmod(0o777 & ~_umask())
        if zip_path is not None:
            write_zip(staging, staged_zip)
        if out.exists():
            out.rmdir()                                   # empty, checked above
        os.replace(staging, out)
        if zip_path is not None:
            os.replace(staged_zip, zip_path)
    except OSError as exc:
        raise SubmissionError(f"out: cannot write the submission into {out}: {exc.strerror or exc}.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)        # gone once renamed; left only by a failure
        staged_zip.unlink(missing_ok=True)
    return Submission(out, {key: part.run for key, part in sorted(by_key.items())}, options, to_fill, zip_path)


def _copy_code(code: Path, dest: Path, skip: set[Path]) -> None:
    """`code` copied to `dest`, links followed (the submission must hold the files, not links out of it), leaving
    out `skip` (the submission being built, when it lies inside `code`: `--code .`)."""
    def ignored(folder: str, names: list[str]) -> list[str]:
        return [name for name in names if Path(folder, name) in skip]
    try:
        shutil.copytree(code, dest, symlinks=False, ignore=ignored)
    except shutil.Error as exc:
        source, _, why = exc.args[0][0] if exc.args and exc.args[0] else (code, None, str(exc))
        raise SubmissionError(f"code: cannot copy {source}: {why} (a link that leads nowhere?).") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_zip(folder: Path, path: Path) -> None:
    """`folder` zipped into `path` as the validator unpacks it: its entries at the top of the archive (no wrapping
    folder), every folder an entry of its own (empty ones included)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for entry in sorted(folder.rglob("*")):
            name = entry.relative_to(folder).as_posix()
            if entry.is_dir():
                archive.writestr(name + "/", b"")
            else:
                archive.write(entry, name)


def print_submission(submission: Submission, file: tp.TextIO | None = None) -> None:
    file = file or sys.stdout
    parts = ", ".join(f"{track} {split}" for track, split in submission.runs)
    print(f"moshi-eval zr2021-submission: {submission.path} ({parts})", file=file)
    if submission.zip_path is not None:
        print(f"  zip: {submission.zip_path}", file=file)
    if submission.to_fill:
        print(f"  to fill in {submission.path / META_YAML} before validating: {', '.join(submission.to_fill)} "
              "(the validator refuses empty fields)", file=file)
    print(f"  validate: {submission.validate_command()}", file=file)


__all__ = ["META_YAML", "Submission", "SubmissionConfig", "SubmissionError", "SubmissionMeta", "TRACKS",
           "check_scores", "meta_yaml", "print_submission", "write_submission", "write_zip"]
