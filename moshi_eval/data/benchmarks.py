"""Spoken-LM likelihood benchmarks as their official releases lay them out: files to score and pairs to compare.

Layouts (checked against the releases' own code):
- sWUGGY / sBLIMP, ZeroSpeech 2021 (zerospeech/zerospeech2021, `lexical.py`, `syntactic.py`): the data set root
  holds `lexical/{dev,test}/*.wav` and `syntactic/{dev,test}/*.wav`, 16 kHz, with a `gold.csv` in dev. Lexical
  gold columns: `id, filename, voice, frequency, word, phones, length, correct`; syntactic: `id, filename,
  voice, type, subtype, transcription, correct`. A lexical pair is a correct and an incorrect row of the same
  `id` and `voice` (every correct x incorrect row of the group, as the official `pandas.merge` on id and voice:
  a note names the groups with more than one of either); a syntactic pair, of the same `type`, `subtype`, `id`
  and `voice` (ids restart in each subtype; the official groups by type, subtype and id). The gold file is read
  as pandas would: UTF-8 with or without a BOM; non-word rows may leave `word`, `frequency` and `length` empty
  (the official never reads a non-word's); integers strictly (ASCII digits, errors name file, line and field);
  `id` and `voice` compared as integers when every value of the column is one ("01" is "1"). Lenient beyond
  the official, each with a note: `X.WAV` is found for row `X` (the official glob is case-sensitive), and a
  gold naming `x.wav` (with the extension) is matched to the file `x.wav`.
- Spoken / topic StoryCloze (slp-rl/slamkit `modelling_metric.py`): a folder of `<n>_<uuid>_correct.wav` and
  `<n>_<uuid>_incorrect.wav`; a pair is the two files of one `<n>_<uuid>` prefix, oriented by the `_correct` /
  `_incorrect` suffix. slamkit itself never reads the suffix: it sorts the files by `<n>` alone and takes each
  two in turn as (positive, negative), so its orientation follows the directory listing order of the
  filesystem (on ext4 some stories come out reversed). Files may also sit one folder deeper (slamkit's
  `subfolder` option), but not at both depths: that is a DataError naming the folders.
- SALMon (slp-rl/salmon `salmon.py`): one folder per part; the files of a part are grouped by the integer that is
  the second `_`-separated field of their name (`sample_<index>_<i>.wav`), each group sorted by path: the
  first file is the positive, the second the negative.

A file is known by its key: its path relative to the task's folder without the extension (for ZeroSpeech just
the name, as in gold.csv and in a submission). Listed files are `.wav` in any case of the extension; each must
be a regular file (os.stat alone: a FIFO or device named like a wav is skipped with the reason, never opened);
the headers of the files kept are read to note those that are not mono 16 kHz (they are down-mixed and
resampled). Problems either raise `DataError` naming the file, or skip what they touch with the reason
(`strict=True`: raise instead); never an empty benchmark that scores 0. Where the official scorer would read
or pair the data differently, `BenchmarkData.notes` says so.
"""
from collections import defaultdict
import csv
from dataclasses import dataclass, field
import os
from pathlib import Path
import re
import typing as tp

from ..config import SALMON_PARTS, SPLITS, TASKS
from ..data.librilight import AUDIO_EXTENSIONS, AudioReadError, DataError, check_audio_file, read_header

ZEROSPEECH_PART = {"swuggy": "lexical", "sblimp": "syntactic"}
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
                                 False, self.split, self.parts, self.notes)
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


def _audio_paths(folder: Path) -> list[Path]:
    """The `.wav` entries of `folder`, the extension in any case (`X.WAV` too), sorted by path. Nothing is opened:
    an entry that is no regular file is listed too, and `_keyed` leaves it out with the reason."""
    try:
        entries = list(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list the folder ({exc.strerror}).") from exc
    return sorted((p for p in entries if p.suffix.lower() == ".wav" and not p.is_dir()), key=str)


def _keyed(paths: tp.Iterable[Path], key_of: tp.Callable[[Path], str], skipped: list[dict], strict: bool,
           notes: list[str]) -> dict[str, Path]:
    """`{key: path}` of the listed files that are regular files (checked with os.stat alone: a FIFO or device
    named like a wav is never opened, since reading one could block or never end). Of `x.wav` and `x.WAV` the
    first is kept. Files found through an upper-case extension are named in a note."""
    files: dict[str, Path] = {}
    upper: list[str] = []
    for path in sorted(paths, key=lambda p: (p.suffix != ".wav", str(p))):
        key = key_of(path)
        if key in files:
            _skip(skipped, strict, {"file": path.name, "reason": f"the same name as {files[key].name} with the "
                                                                 "extension in another case: ignored"})
            continue
        try:
            check_audio_file(path)
        except AudioReadError as exc:
            _skip(skipped, strict, {"file": key, "reason": f"not read: {exc.reason}"})
            continue
        files[key] = path
        if path.suffix != ".wav":
            upper.append(path.name)
    if upper:
        notes.append(f"{len(upper)} file(s) found through an extension in upper or mixed case ({_some(upper)}): "
                     "used here; the official search (glob '*.wav') is case-sensitive and ignores them")
    return dict(sorted(files.items(), key=lambda kv: str(kv[1])))


def _some(names: tp.Sequence[str], limit: int = 5) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _format_note(files: dict[str, Path]) -> list[str]:
    """A note counting the files that are not mono 16 kHz (from their headers; an unreadable header is left to
    `read_audio`, which skips the file with its reason)."""
    odd = []
    for key, path in files.items():
        try:
            rate, channels, _ = read_header(path)
        except AudioReadError:
            continue
        if (rate, channels) != (16000, 1):
            odd.append(f"{key} ({channels} channel{'s' if channels != 1 else ''}, {rate} Hz)")
    if not odd:
        return []
    return [f"{len(odd)} of {len(files)} file(s) are not mono 16 kHz, the format of the releases ({_some(odd)}): "
            "they are down-mixed (mean of the channels) and resampled to the codec's rate here; the official "
            "pipelines read them otherwise (SALMon and slamkit keep channel 0 at the file's own rate)"]


_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)


def _integer(text: str | None) -> int | None:
    """`text` as an integer: ASCII digits with an optional sign and surrounding spaces, else None (no '²', '٣',
    '3.0', '1_0', which `str.isdigit` or `int` would let through)."""
    return int(text) if text is not None and _INTEGER.fullmatch(text) else None


def load_zerospeech(data: Path, task: str, split: str = "dev", strict: bool = False) -> BenchmarkData:
    """sWUGGY (`lexical`) or sBLIMP (`syntactic`) of the ZeroSpeech 2021 data set root `data`, split dev or test."""
    if split not in SPLITS:
        raise DataError(f"split: expected one of {SPLITS}, got {split!r}.")
    part = ZEROSPEECH_PART[task]
    data = Path(data)
    root = data / part / split
    _require_dir(root, f"the ZeroSpeech 2021 layout for {task}: <data>/{part}/{split}/*.wav (+ gold.csv in dev)",
                 data)
    skipped: list[dict] = []
    notes: list[str] = []
    files = _keyed(_audio_paths(root), lambda p: p.stem, skipped, strict, notes)
    if not files:
        raise DataError(f"--data {data}: no .wav file in {root} (found: {_listing(root)}).")
    gold = root / "gold.csv"
    if not gold.is_file():
        if split == "dev":
            raise DataError(f"{gold}: missing. The dev split of ZeroSpeech 2021 has a gold.csv beside the wav "
                            "files: without it no accuracy can be computed.")
        return BenchmarkData(task, root, files, [], skipped, has_gold=False, split=split,
                             notes=notes + _format_note(files))
    rows = _read_gold(gold, part)
    with_extension = [row["filename"] for _, row in rows if Path(row["filename"]).suffix.lower() in AUDIO_EXTENSIONS]
    if with_extension:
        for _, row in rows:
            if Path(row["filename"]).suffix.lower() in AUDIO_EXTENSIONS:
                row["filename"] = row["filename"][: -len(Path(row["filename"]).suffix)]
        notes.append(f"{gold}: {len(with_extension)} filename(s) given with their extension "
                     f"({_some([repr(n) for n in with_extension])}): matched to the audio file of the name without "
                     "it, and so named in the submission; the official scorer uses gold.csv's names verbatim and "
                     "would find no such names in a submission")
    seen: dict[str, int] = {}
    for line, row in rows:
        name = row["filename"]
        if name in seen:
            raise DataError(f"{gold}:{line}: file {name!r} is listed twice (first on line {seen[name]}).")
        seen[name] = line
    left_out = {s["file"] for s in skipped if "file" in s}     # not regular files: skipped with their reason
    for name in sorted(set(files) - set(seen)):
        _skip(skipped, strict, {"file": name, "reason": f"audio file without a row in {gold.name}: scored for the "
                                                        "submission, in no pair"})
    # The official lexical.py merges words and non-words on (voice, id); syntactic.py groups by (type, subtype,
    # id), ids restarting in each subtype: a sBLIMP pair is keyed by all four.
    groups: dict[tuple[str, ...], list[dict]] = defaultdict(list)
    for line, row in rows:
        if row["filename"] not in files:
            if row["filename"] not in left_out:
                reason = f"{gold.name} line {line}: no audio file {row['filename']}.wav in {root}"
                _skip(skipped, strict, {"file": row["filename"], "reason": reason})
            continue
        key = (row["id"], row["voice"]) if part == "lexical" else (row["type"], row["subtype"], row["id"], row["voice"])
        groups[key].append(row)
    pairs: list[Pair] = []
    several: list[str] = []
    for key, group in groups.items():
        name = (f"id {key[0]}, voice {key[1]}" if part == "lexical"
                else f"type {key[0]}, subtype {key[1]}, id {key[2]}, voice {key[3]}")
        unit, voice = key[-2], key[-1]
        right = [r for r in group if r["correct"] == "1"]
        wrong = [r for r in group if r["correct"] == "0"]
        if not right or not wrong:
            missing = "correct" if not right else "incorrect"
            _skip(skipped, strict, {"pair": name,
                                    "reason": f"unpaired: no {missing} item (files {[r['filename'] for r in group]})"})
            continue
        if part == "syntactic" and (len(right) > 1 or len(wrong) > 1):
            _skip(skipped, strict, {"pair": name,
                                    "reason": f"{len(right)} correct and {len(wrong)} incorrect items: a sBLIMP pair "
                                              "has one of each"})
            continue
        if len(right) > 1 or len(wrong) > 1:
            several.append(f"{name}: {len(right)} word{'s' if len(right) > 1 else ''} x {len(wrong)} "
                           f"non-word{'s' if len(wrong) > 1 else ''}")
        for r in right:
            for w in wrong:
                if part == "lexical":      # the word's: the official never reads a non-word's frequency or length
                    attributes = {"frequency": r["frequency"], "length": r["length"]}
                else:
                    attributes = {"type": r["type"], "subtype": r["subtype"]}
                pairs.append(Pair(r["filename"], w["filename"], unit, voice, attributes))
    if several:
        notes.append(f"{gold}: {len(several)} id/voice group(s) with more than one word or non-word make every "
                     f"word x non-word combination a pair, as the official pandas.merge on (voice, id); the id's "
                     f"score is the mean over them: {_some(several, 10)}")
    if part == "syntactic":
        # The official syntactic.py pairs the k-th correct row of gold.csv with its k-th incorrect row (it
        # concatenates the two lists side by side); on a gold.csv ordered alike that is the same pair as here.
        right_names = [r["filename"] for _, r in rows if r["correct"] == "1"]
        wrong_names = [r["filename"] for _, r in rows if r["correct"] == "0"]
        if set(zip(right_names, wrong_names)) != {(p.positive, p.negative) for p in pairs}:
            notes.append(f"{gold}: the official scorer pairs the k-th correct row with the k-th incorrect row, "
                         "which here is not always the pair of the same type, subtype, id and voice used here: its "
                         "figure would differ")
    return BenchmarkData(task, root, files, pairs, skipped, has_gold=True, split=split,
                         notes=notes + _format_note(files))


def _read_gold(path: Path, part: str) -> list[tuple[int, dict]]:
    """(line number, row) of a gold.csv (UTF-8, with or without a BOM), checked and normalised.

    Required everywhere: the columns of `GOLD_COLUMNS`, non-empty `id`, `filename`, `voice` (and for sBLIMP
    `type`, `subtype`), `correct` 0 or 1. sWUGGY: `frequency` and `length` are integers on word rows; a non-word
    row may leave them (and `word`) empty, as the release does (the official reads frequency as nullable Int64
    and never uses a non-word's), but a frequency it gives must still be an integer. Integers: ASCII digits, an
    optional sign and surrounding spaces, stored as `str(int)`. `id` and `voice`: if every value of the column
    is such an integer they are compared as integers ("01" is "1"), as pandas reads an all-numeric column;
    otherwise as they are written."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in GOLD_COLUMNS[part] if c not in header]
            if missing:
                raise DataError(f"{path}: malformed {part} gold.csv: missing column(s) {missing}; expected "
                                f"{list(GOLD_COLUMNS[part])}, found {header}.")
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read the gold file: {exc}") from exc
    if not rows:
        raise DataError(f"{path}: the gold file has a header and no row.")
    field_of = {c: header.index(c) + 1 for c in GOLD_COLUMNS[part]}
    integers = ("frequency", "length") if part == "lexical" else ()
    for line, row in rows:
        for column in GOLD_COLUMNS[part]:
            if column not in integers and row.get(column) in (None, ""):
                raise DataError(f"{path}:{line}: empty value in column {column!r} (field {field_of[column]}).")
        correct = _integer(row["correct"])
        if correct not in (0, 1):
            raise DataError(f"{path}:{line}: column 'correct' must be 0 or 1, got {row['correct']!r} "
                            f"(field {field_of['correct']}).")
        row["correct"] = str(correct)
        for column in integers:
            value = row.get(column)
            if correct == 0 and (value in (None, "") or column == "length"):
                continue           # a non-word's length is never read; its frequency is, if given, an integer
            number = _integer(value)
            if number is None:
                why = " (a word row needs it)" if correct == 1 and value in (None, "") else ""
                raise DataError(f"{path}:{line}: column {column!r} (field {field_of[column]}): expected an integer "
                                f"(ASCII digits, an optional sign and surrounding spaces){why}, got {value or ''!r}.")
            row[column] = str(number)
    for column in ("id", "voice"):
        numbers = [_integer(row[column]) for _, row in rows]
        if all(n is not None for n in numbers):
            for (_, row), n in zip(rows, numbers):
                row[column] = str(n)
    return rows


def load_storycloze(data: Path, task: str, strict: bool = False) -> BenchmarkData:
    """Spoken or topic StoryCloze: `<n>_<uuid>_correct.wav` / `_incorrect.wav` in `data`, or all one folder deeper
    (files at both depths: DataError naming the folders)."""
    data = Path(data)
    _require_dir(data, "a folder of <n>_<uuid>_correct.wav and <n>_<uuid>_incorrect.wav files", data)
    paths = _audio_paths(data)
    deeper = {sub: _audio_paths(sub) for sub in sorted(p for p in data.iterdir() if p.is_dir())}
    deeper = {sub: found for sub, found in deeper.items() if found}
    if paths and deeper:
        where = ", ".join(f"{sub.name}/ ({len(found)})" for sub, found in deeper.items())
        raise DataError(f"--data {data}: StoryCloze .wav files both directly in {data} ({len(paths)}) and one "
                        f"folder deeper, in {where}: expected one layout (slamkit's StoryCloze reads the top level "
                        "alone). Move or remove one of them, or point --data at one folder.")
    if not paths:
        paths = [p for found in deeper.values() for p in found]
    if not paths:
        raise DataError(f"--data {data}: expected the StoryCloze layout, <n>_<uuid>_correct.wav and "
                        f"<n>_<uuid>_incorrect.wav files (here or one folder deeper); found: {_listing(data)}.")
    stories: dict[str, dict[str, str]] = defaultdict(dict)
    skipped: list[dict] = []
    notes: list[str] = []
    files = _keyed(paths, lambda p: p.relative_to(data).with_suffix("").as_posix(), skipped, strict, notes)
    for key, path in files.items():
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
    return BenchmarkData(task, data, files, pairs, skipped, notes=notes + _format_note(files))


def _story_order(prefix: str) -> tuple:
    folder, _, name = prefix.rpartition("/")
    return folder, int(name.split("_", 1)[0]), name


def load_salmon(data: Path, parts: tp.Sequence[str] | None = None, strict: bool = False) -> BenchmarkData:
    """SALMon release root: one folder per part (`parts`; None: the 8 parts of SALMon's `salmon.py`). A part
    named twice, an empty part name or an empty list is a DataError."""
    data = Path(data)
    if parts is None:
        names = SALMON_PARTS
    else:
        names = tuple(str(p).strip("/") for p in parts)
        if not names:
            raise DataError(f"parts: no part given; expected some of {', '.join(SALMON_PARTS)} (None: all of them).")
        if "" in names:
            raise DataError(f"parts: empty part name in {list(parts)}; expected some of {', '.join(SALMON_PARTS)}.")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise DataError(f"parts: {twice} listed twice in {list(parts)}: each part is scored once.")
    _require_dir(data, f"the SALMon release root (one folder per part: {', '.join(SALMON_PARTS)})", data)
    files: dict[str, Path] = {}
    pairs: list[Pair] = []
    skipped: list[dict] = []
    notes: list[str] = []
    for part in names:
        folder = data / part
        _require_dir(folder, f"the SALMon layout: a folder per part, <data>/{part}/sample_<index>_<i>.wav", data)
        groups: dict[int, list[Path]] = defaultdict(list)
        listed = _keyed(_audio_paths(folder), lambda p: f"{part}/{p.stem}", skipped, strict, notes)
        for key, path in listed.items():
            fields = path.stem.split("_")
            if len(fields) < 2 or not re.fullmatch(r"[0-9]+", fields[1]):     # ASCII digits: no '²'
                _skip(skipped, strict, {"file": key, "reason": "no integer sample index as the second '_' field "
                                                               "of the name (sample_<index>_<i>.wav)"})
                continue
            index = int(fields[1])
            groups[index].append(path)
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
    return BenchmarkData("salmon", data, files, pairs, skipped, parts=names, notes=notes + _format_note(files))


def load_benchmark(task: str, data: str | Path, split: str = "dev", parts: tp.Sequence[str] | None = None,
                   strict: bool = False) -> BenchmarkData:
    """The files and pairs of `task` (one of `TASKS`) under `data`, as its official release lays them out."""
    if task not in TASKS:
        raise DataError(f"task: expected one of {TASKS}, got {task!r}.")
    if parts is not None and task != "salmon":
        raise DataError(f"parts: only for task 'salmon', got task {task!r}.")
    if task in ZEROSPEECH_PART:
        return load_zerospeech(Path(data), task, split, strict)
    if task == "salmon":
        return load_salmon(Path(data), parts, strict)
    return load_storycloze(Path(data), task, strict)


__all__ = ["BenchmarkData", "GOLD_COLUMNS", "Pair", "SALMON_PARTS", "SPLITS", "TASKS", "load_benchmark",
           "load_salmon", "load_storycloze", "load_zerospeech"]
