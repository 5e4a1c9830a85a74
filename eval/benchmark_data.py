"""Spoken-LM likelihood benchmarks as their official releases lay them out: files to score and pairs to compare.

Layouts (checked against the releases' own code):
- sWUGGY / sBLIMP, ZeroSpeech 2021 (zerospeech/zerospeech2021, `lexical.py`, `syntactic.py`): the data set root
  holds `lexical/{dev,test}/*.wav` and `syntactic/{dev,test}/*.wav`, 16 kHz, with a `gold.csv` in dev. Lexical
  gold columns: `id, filename, voice, frequency, word, phones, length, correct`; syntactic: `id, filename,
  voice, type, subtype, transcription, correct`. A pair is a correct and an incorrect row of the same `id` and
  `voice` (lexical: every correct x incorrect row of the group, as the official `pandas.merge` on id and voice).
- Spoken / topic StoryCloze (slp-rl/slamkit `modelling_metric.py`): a folder of `<n>_<uuid>_correct.wav` and
  `<n>_<uuid>_incorrect.wav`; a pair is the two files of one `<n>_<uuid>` prefix. Files may also sit one folder
  deeper (slamkit's `subfolder` option).
- SALMon (slp-rl/salmon `salmon.py`): one folder per part; the files of a part are grouped by the integer that is
  the second `_`-separated field of their name (`sample_<index>_<i>.wav`), each group sorted by path: the
  first file is the positive, the second the negative.

A file is known by its key: its path relative to the task's folder without the extension (for ZeroSpeech just
the name, as in gold.csv and in a submission). Problems either raise `DataError` naming the file, or skip what
they touch with the reason (`strict=True`: raise instead); never an empty benchmark that scores 0.
"""
from collections import defaultdict
import csv
from dataclasses import dataclass, field
import os
from pathlib import Path
import re
import typing as tp

from .data import DataError

TASKS = ("swuggy", "sblimp", "sstorycloze", "tstorycloze", "salmon")
SPLITS = ("dev", "test")
ZEROSPEECH_PART = {"swuggy": "lexical", "sblimp": "syntactic"}
SALMON_PARTS = ("bg_alignment", "bg_all_consistency", "bg_domain_consistency", "gender_consistency",
                "rir_consistency", "sentiment_alignment", "sentiment_consistency", "speaker_consistency")
GOLD_COLUMNS = {
    "lexical": ("id", "filename", "voice", "frequency", "length", "correct"),
    "syntactic": ("id", "filename", "voice", "type", "subtype", "correct"),
}
_STORY = re.compile(r"^(?P<prefix>\d+_.+)_(?P<kind>correct|incorrect)$")


@dataclass
class Pair:
    """A right and a wrong recording: the model should find `positive` more likely than `negative`."""
    positive: str                  # file key
    negative: str                  # file key
    unit: str                      # what the official scorer averages over first (ZeroSpeech id, story, sample)
    voice: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)   # frequency, length, type, subtype, part


@dataclass
class BenchmarkData:
    """What `load_benchmark` found: the files to score (key -> path) and the pairs (empty without gold)."""
    task: str
    root: Path                     # the task's folder (e.g. <data>/lexical/dev)
    files: dict[str, Path]
    pairs: list[Pair]
    skipped: list[dict]            # {"file" or "pair", "reason"}: what is left out, and why
    has_gold: bool = True
    split: str | None = None
    parts: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)   # where the official scorer would pair differently

    def limit(self, num_pairs: int) -> "BenchmarkData":
        """The first `num_pairs` pairs and their files (without gold: the first `num_pairs` files)."""
        if not self.has_gold:
            keys = list(self.files)[:num_pairs]
            return BenchmarkData(self.task, self.root, {k: self.files[k] for k in keys}, [], self.skipped,
                                 False, self.split, self.parts)
        pairs = self.pairs[:num_pairs]
        used = {k for p in pairs for k in (p.positive, p.negative)}
        return BenchmarkData(self.task, self.root, {k: v for k, v in self.files.items() if k in used}, pairs,
                             self.skipped, True, self.split, self.parts, self.notes)


def _skip(skipped: list[dict], strict: bool, entry: dict) -> None:
    if strict:
        what = entry.get("file") or entry.get("pair")
        raise DataError(f"{what}: {entry['reason']} (--strict)")
    skipped.append(entry)


def _listing(folder: Path, limit: int = 8) -> str:
    try:
        names = sorted(os.listdir(folder))
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    if not names:
        return "an empty folder"
    more = f", ... ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _require_dir(path: Path, expected: str, data: Path) -> None:
    if not path.is_dir():
        found = _listing(data) if data.is_dir() else ("not a folder" if data.exists() else "no such folder")
        raise DataError(f"--data {data}: expected {expected}; {path} is missing. Found: {found}.")


def _wavs(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.wav"))}


def load_zerospeech(data: Path, task: str, split: str = "dev", strict: bool = False) -> BenchmarkData:
    """sWUGGY (`lexical`) or sBLIMP (`syntactic`) of the ZeroSpeech 2021 data set root `data`, split dev or test."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}.")
    part = ZEROSPEECH_PART[task]
    data = Path(data)
    root = data / part / split
    _require_dir(root, f"the ZeroSpeech 2021 layout for {task}: <data>/{part}/{split}/*.wav (+ gold.csv in dev)",
                 data)
    files = _wavs(root)
    if not files:
        raise DataError(f"--data {data}: no .wav file in {root} (found: {_listing(root)}).")
    gold = root / "gold.csv"
    if not gold.is_file():
        if split == "dev":
            raise DataError(f"{gold}: missing. The dev split of ZeroSpeech 2021 has a gold.csv beside the wav "
                            "files: without it no accuracy can be computed.")
        return BenchmarkData(task, root, files, [], [], has_gold=False, split=split)
    rows = _read_gold(gold, part)
    skipped: list[dict] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        name = row["filename"]
        if name in seen:
            raise DataError(f"{gold}:{line}: file {name!r} is listed twice (first on line {seen[name]}).")
        seen[name] = line
    for name in sorted(set(files) - set(seen)):
        _skip(skipped, strict, {"file": name, "reason": f"audio file without a row in {gold.name}: scored for the "
                                                        "submission, in no pair"})
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for line, row in rows:
        if row["filename"] not in files:
            reason = f"{gold.name} line {line}: no audio file {row['filename']}.wav in {root}"
            _skip(skipped, strict, {"file": row["filename"], "reason": reason})
            continue
        groups[(row["id"], row["voice"])].append(row)
    pairs: list[Pair] = []
    for (unit, voice), group in groups.items():
        right = [r for r in group if r["correct"] == "1"]
        wrong = [r for r in group if r["correct"] == "0"]
        if not right or not wrong:
            missing = "correct" if not right else "incorrect"
            _skip(skipped, strict, {"pair": f"id {unit}, voice {voice}",
                                    "reason": f"unpaired: no {missing} item (files {[r['filename'] for r in group]})"})
            continue
        if part == "syntactic" and (len(right) > 1 or len(wrong) > 1):
            _skip(skipped, strict, {"pair": f"id {unit}, voice {voice}",
                                    "reason": f"{len(right)} correct and {len(wrong)} incorrect items: a sBLIMP pair "
                                              "has one of each"})
            continue
        for r in right:
            for w in wrong:
                if part == "lexical":
                    attributes = {"frequency": r["frequency"], "length": r["length"]}
                else:
                    attributes = {"type": r["type"], "subtype": r["subtype"]}
                pairs.append(Pair(r["filename"], w["filename"], unit, voice, attributes))
    notes = []
    if part == "syntactic":
        # The official syntactic.py pairs the k-th correct row of gold.csv with its k-th incorrect row (it
        # concatenates the two lists side by side); on a gold.csv ordered alike that is the same id and voice.
        right = [r["filename"] for _, r in rows if r["correct"] == "1"]
        wrong = [r["filename"] for _, r in rows if r["correct"] == "0"]
        if set(zip(right, wrong)) != {(p.positive, p.negative) for p in pairs}:
            notes.append(f"{gold}: the official scorer pairs the k-th correct row with the k-th incorrect row, "
                         "which here is not always the pair of the same id and voice used here: its figure "
                         "would differ")
    return BenchmarkData(task, root, files, pairs, skipped, has_gold=True, split=split, notes=notes)


def _read_gold(path: Path, part: str) -> list[tuple[int, dict]]:
    """(line number, row) of a gold.csv, checked: required columns present, `correct` 0 or 1, ints where needed."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in GOLD_COLUMNS[part] if c not in header]
            if missing:
                raise DataError(f"{path}: malformed {part} gold.csv: missing column(s) {missing}; expected "
                                f"{list(GOLD_COLUMNS[part])}, found {header}.")
            rows = [(i + 2, row) for i, row in enumerate(reader)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the gold file: {exc}") from exc
    if not rows:
        raise DataError(f"{path}: the gold file has a header and no row.")
    for line, row in rows:
        for column in GOLD_COLUMNS[part]:
            if row.get(column) in (None, ""):
                raise DataError(f"{path}:{line}: empty value in column {column!r}.")
        if row["correct"] not in ("0", "1"):
            raise DataError(f"{path}:{line}: column 'correct' must be 0 or 1, got {row['correct']!r}.")
        if part == "lexical":
            for column in ("frequency", "length"):
                if not row[column].lstrip("-").isdigit():
                    raise DataError(f"{path}:{line}: column {column!r} must be an integer, got {row[column]!r}.")
    return rows


def load_storycloze(data: Path, task: str, strict: bool = False) -> BenchmarkData:
    """Spoken or topic StoryCloze: `<n>_<uuid>_correct.wav` / `_incorrect.wav` in `data` (or one folder deeper)."""
    data = Path(data)
    _require_dir(data, "a folder of <n>_<uuid>_correct.wav and <n>_<uuid>_incorrect.wav files", data)
    paths = sorted(data.glob("*.wav")) or sorted(data.glob("*/*.wav"))
    if not paths:
        raise DataError(f"--data {data}: expected the StoryCloze layout, <n>_<uuid>_correct.wav and "
                        f"<n>_<uuid>_incorrect.wav files (here or one folder deeper); found: {_listing(data)}.")
    files: dict[str, Path] = {}
    stories: dict[str, dict[str, str]] = defaultdict(dict)
    skipped: list[dict] = []
    for path in paths:
        key = path.relative_to(data).with_suffix("").as_posix()
        files[key] = path
        match = _STORY.match(path.stem)
        if match is None:
            _skip(skipped, strict, {"file": key, "reason": "name is not <n>_<uuid>_correct or <n>_<uuid>_incorrect"})
            continue
        prefix = (path.parent.relative_to(data) / match["prefix"]).as_posix()
        stories[prefix][match["kind"]] = key
    pairs = []
    for prefix in sorted(stories, key=_story_order):
        story = stories[prefix]
        if len(story) != 2:
            (kind, key), = story.items()
            _skip(skipped, strict, {"pair": prefix, "reason": f"unpaired: {key} has no "
                                                              f"{'in' if kind == 'correct' else ''}correct file"})
            continue
        pairs.append(Pair(story["correct"], story["incorrect"], prefix))
    used = {k for p in pairs for k in (p.positive, p.negative)}
    files = {k: v for k, v in files.items() if k in used}
    if not pairs:
        raise DataError(f"--data {data}: no complete StoryCloze pair ({len(skipped)} file(s) or stories left out: "
                        f"{skipped[:3]}).")
    return BenchmarkData(task, data, files, pairs, skipped)


def _story_order(prefix: str) -> tuple:
    folder, _, name = prefix.rpartition("/")
    return folder, int(name.split("_", 1)[0]), name


def load_salmon(data: Path, parts: tp.Sequence[str] | None = None, strict: bool = False) -> BenchmarkData:
    """SALMon release root: one folder per part (default: the 8 parts of SALMon's `salmon.py`)."""
    data = Path(data)
    names = tuple(p.strip("/") for p in parts) if parts else SALMON_PARTS
    _require_dir(data, f"the SALMon release root (one folder per part: {', '.join(SALMON_PARTS)})", data)
    files: dict[str, Path] = {}
    pairs: list[Pair] = []
    skipped: list[dict] = []
    for part in names:
        folder = data / part
        _require_dir(folder, f"the SALMon layout: a folder per part, <data>/{part}/sample_<index>_<i>.wav", data)
        groups: dict[int, list[Path]] = defaultdict(list)
        for path in folder.glob("*.wav"):
            fields = path.stem.split("_")
            key = f"{part}/{path.stem}"
            if len(fields) < 2 or not fields[1].isdigit():
                _skip(skipped, strict, {"file": key, "reason": "no integer sample index as the second '_' field "
                                                               "of the name (sample_<index>_<i>.wav)"})
                continue
            groups[int(fields[1])].append(path)
        for index in sorted(groups):
            group = sorted(groups[index], key=str)     # as salmon.py: sorted paths, positive first
            keys = [f"{part}/{p.stem}" for p in group]
            if len(group) != 2:
                _skip(skipped, strict, {"pair": f"{part} sample {index}",
                                        "reason": f"{len(group)} file(s) {keys}: a SALMon sample has 2"})
                continue
            for key, path in zip(keys, group):
                files[key] = path
            pairs.append(Pair(keys[0], keys[1], f"{part}/{index}", attributes={"part": part}))
        if not any(p.attributes["part"] == part for p in pairs):
            raise DataError(f"--data {data}: no SALMon pair in part {part} (found: {_listing(folder)}).")
    return BenchmarkData("salmon", data, files, pairs, skipped, parts=names)


def load_benchmark(task: str, data: str | Path, split: str = "dev", parts: tp.Sequence[str] | None = None,
                   strict: bool = False) -> BenchmarkData:
    """The files and pairs of `task` (one of `TASKS`) under `data`, as its official release lays them out."""
    if task not in TASKS:
        raise DataError(f"task: expected one of {TASKS}, got {task!r}.")
    if parts and task != "salmon":
        raise DataError(f"parts: only for task 'salmon', got task {task!r}.")
    if task in ZEROSPEECH_PART:
        return load_zerospeech(Path(data), task, split, strict)
    if task == "salmon":
        return load_salmon(Path(data), parts, strict)
    return load_storycloze(Path(data), task, strict)


__all__ = ["BenchmarkData", "GOLD_COLUMNS", "Pair", "SALMON_PARTS", "SPLITS", "TASKS", "load_benchmark",
           "load_salmon", "load_storycloze", "load_zerospeech"]
