"""The checks of `zerospeech2021-validate` (zerospeech/zerospeech2021, version 0.5: cli/validate.py, meta.py,
lexical.py, syntactic.py, exception.py) restated from its code, for the lexical and syntactic tracks, with the
phonetic and semantic tracks skipped (the only way empty folders pass there). Written here from reading that code,
not copied: each rule cites the function that makes it. Messages follow the validator's.
"""
from numbers import Number
from pathlib import Path
import tempfile
import zipfile

import yaml


class ValidationError(Exception):
    pass


def _mismatch(what: str, expected: set, observed: set) -> None:
    # exception.MismatchError: "<what>: missing [..], extra [..]"
    missing, extra = sorted(expected - observed), sorted(observed - expected)
    if missing or extra:
        parts = ([f"missing [{', '.join(missing)}]"] if missing else []) + \
                ([f"extra [{', '.join(extra)}]"] if extra else [])
        raise ValidationError(f"{what}: {', '.join(parts)}")


def _directory(path: Path, expected: set) -> None:
    # validate.py `_validate_directory`: the names in the folder are exactly the expected ones.
    _mismatch(f"mismatch in directory {path}", expected, {p.name for p in path.glob("*")})


_META = {"author": str, "affiliation": str, "description": str, "open_source": bool, "train_set": str,
         "visually_grounded": bool, "gpu_budget": Number, "parameters": dict}
_PHONETIC = {"metric": (str, ("cosine", "euclidean", "kl", "kl_symmetric")), "frame_shift": (Number, None)}
_SEMANTIC = {"metric": (str, None), "pooling": (str, ("min", "max", "mean", "sum", "last", "lastlast", "off"))}
_SCIPY_METRICS = {"braycurtis", "canberra", "chebyshev", "cityblock", "correlation", "cosine", "dice", "euclidean",
                  "hamming", "jaccard", "jensenshannon", "mahalanobis", "minkowski", "rogerstanimoto",
                  "russellrao", "seuclidean", "sokalmichener", "sokalsneath", "sqeuclidean", "yule"}


def _entries(prefix: str, values: dict, expected: dict) -> None:
    # meta.py `_validate_entries` / `_validate_entry`: the key set exactly, then the type, the allowed values,
    # and non-empty strings.
    if sorted(values) != sorted(expected):
        _mismatch("invalid entries" + (f" in {prefix}" if prefix else ""), set(expected), set(values))
    for key, spec in expected.items():
        kind, allowed = spec if isinstance(spec, tuple) else (spec, None)
        name = f"{prefix}/{key}" if prefix else key
        if not isinstance(values[key], kind):
            raise ValidationError(f"{name} must be a {kind}, it is {type(values[key])}")
        if allowed is not None and values[key] not in allowed:
            raise ValidationError(f"{name} must be in ({', '.join(allowed)}) but is {values[key]}")
        if kind is str and not values[key]:
            raise ValidationError(f"{key} must not be an empty string")


def validate_meta(submission: Path) -> bool:
    """meta.py `validate`; returns open_source."""
    path = submission / "meta.yaml"
    if not path.is_file():
        raise ValidationError("missing meta.yaml file")
    try:
        meta = yaml.safe_load(path.read_text().replace("\t", " "))
    except yaml.YAMLError as exc:
        raise ValidationError(f"failed to parse {path}: {exc}")
    if not meta or not isinstance(meta, dict):
        raise ValidationError("meta.yaml file is not valid")
    _entries("", meta, _META)
    _entries("parameters", meta["parameters"], {"phonetic": dict, "semantic": dict})
    _entries("parameters/phonetic", meta["parameters"]["phonetic"], _PHONETIC)
    _entries("parameters/semantic", meta["parameters"]["semantic"], _SEMANTIC)
    if meta["parameters"]["semantic"]["metric"] not in _SCIPY_METRICS:     # meta.py `_validate_scipy_metric`
        raise ValidationError(f"invalid metric for semantic: {meta['parameters']['semantic']['metric']}")
    return meta["open_source"]


def _scores(submitted: Path, dataset: Path, kind: str) -> None:
    # lexical.py / syntactic.py `validate`: the file, the dataset's folder, lines "<stem> <float>" (one space),
    # no duplicate, the names those of the dataset's wav files.
    if not submitted.is_file():
        raise ValidationError(f"{kind} submission file not found: {submitted}")
    if not dataset.is_dir():
        raise ValidationError(f"dataset not found: {dataset}")
    expected = {w.stem for w in dataset.glob("*.wav")}
    names = []
    for number, line in enumerate(submitted.read_text().split("\n"), 1):
        if number == len(submitted.read_text().split("\n")) and line == "":
            break                                   # the end of the last line (`readlines` gives no more)
        fields = line.strip().split(" ")
        if len(fields) != 2:
            raise ValidationError(f'bad format (line {number}): must be "<filename> <score>" but is "{line.strip()}"')
        try:
            float(fields[1])
        except ValueError:
            raise ValidationError(f'bad format (line {number}): {fields[1]} must be a float but is "{fields[1]}"')
        names.append(fields[0])
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValidationError(f"duplicates found: extra [{', '.join(sorted(duplicates))}]")
    _mismatch("mismatch in filenames", expected, set(names))


def validate(dataset: Path, submission: Path, *, only_dev: bool = False, no_lexical: bool = False,
             no_syntactic: bool = False) -> None:
    """cli/validate.py `validate` with --no-phonetic --no-semantic; raises ValidationError as the tool prints
    `ERROR: <message>`."""
    dataset, submission = Path(dataset), Path(submission)
    if not dataset.is_dir():
        raise ValidationError(f"dataset not found: {dataset}")
    if submission.is_file() and zipfile.is_zipfile(submission):
        with tempfile.TemporaryDirectory() as tmp:
            zipfile.ZipFile(submission).extractall(tmp)
            return validate(dataset, Path(tmp), only_dev=only_dev, no_lexical=no_lexical, no_syntactic=no_syntactic)
    open_source = validate_meta(submission)
    _directory(submission, {"meta.yaml", "phonetic", "lexical", "syntactic", "semantic"} |
               ({"code"} if open_source else set()))
    if open_source:
        code = submission / "code"
        if not code.is_dir():
            raise ValidationError("submission specified as open source but code folder is missing")
        if not any(code.iterdir()):
            raise ValidationError("submission specified as open source but code folder is empty")
    kinds = ["dev"] if only_dev else ["dev", "test"]
    for track, skipped in (("lexical", no_lexical), ("syntactic", no_syntactic)):
        if skipped:
            continue
        _directory(submission / track, {f"{kind}.txt" for kind in kinds})
        for kind in kinds:
            _scores(submission / track / f"{kind}.txt", dataset / track / kind, kind)
