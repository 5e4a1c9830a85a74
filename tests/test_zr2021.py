"""`moshi-eval zr2021-submission`: the folder made from likelihood runs passes the checks of zerospeech2021-validate
(restated in helpers/zr2021_validator.py from its code), holds the runs' own scores, and runs that cannot make a
submission are refused with a message naming them, nothing written."""
import csv
import json
from pathlib import Path
import shutil
import zipfile

import pytest
import yaml

from helpers.checkpoint_factory import write_tiny_checkpoint
from helpers.zr2021_validator import ValidationError, validate
from moshi_eval.cli.commands import main
from moshi_eval.zr2021 import (SubmissionConfig, SubmissionError, SubmissionMeta, check_scores, meta_yaml,
                               write_submission)
from test_likelihood import make_zerospeech

BENCHMARK = {"lexical": "swuggy", "syntactic": "sblimp"}
META_FLAGS = ["--author", "A. Researcher", "--affiliation", "Lab", "--train-set", "LibriLight 60k h",
              "--gpu-budget", "120"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset root in the official layout (lexical and syntactic, dev and test) and one likelihood run per
    (track, split) of a tiny checkpoint."""
    root = tmp_path_factory.mktemp("zr2021")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    data = root / "dataset"
    for track in BENCHMARK:
        for seed, split in enumerate(("dev", "test")):
            make_zerospeech(data, track, split, ids=2, voices=1, seed=seed)
    runs = {}
    for track, task in BENCHMARK.items():
        for split in ("dev", "test"):
            out = root / "runs" / f"{task}_{split}"
            assert main(_argv(ckpt, data, out, task, split)) == 0
            runs[track, split] = out
    return {"root": root, "ckpt": ckpt, "data": data, "runs": runs}


def _argv(ckpt: dict, data: Path, out: Path, task: str, split: str, *extra: str) -> list[str]:
    return ["likelihood", "--task", task, "--data", str(data), "--split", split, "--out", str(out),
            "--cache-dir", str(data.parent / "cache"), "--threads", "1", "--no-progress", "--text", "zero",
            "--batch-size", "4", "--bootstrap", "10", *ckpt["cli_args"], *extra]


def _submit(runs, out: Path, *extra: str) -> int:
    return main(["zr2021-submission", *map(str, runs), "--out", str(out), *extra])


def test_full_submission_passes_the_validator_with_the_runs_scores(world, tmp_path, capsys):
    out = tmp_path / "submission"
    assert _submit(world["runs"].values(), out, *META_FLAGS, "--zip") == 0
    printed = capsys.readouterr().out
    assert "zerospeech2021-validate --no-phonetic --no-semantic DATASET" in printed and "to fill" not in printed
    validate(world["data"], out)
    validate(world["data"], out.with_name("submission.zip"))
    assert sorted(p.name for p in out.iterdir()) == ["lexical", "meta.yaml", "phonetic", "semantic", "syntactic"]
    assert not any((out / "phonetic").iterdir()) and not any((out / "semantic").iterdir())
    for (track, split), run in world["runs"].items():
        items = {r["file"]: float(r["log_likelihood"]) for r in csv.DictReader(open(run / "items.csv"))}
        lines = (out / track / f"{split}.txt").read_text().splitlines()
        assert {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines} == items
        assert set(items) == {w.stem for w in (world["data"] / track / split).glob("*.wav")}
    meta = yaml.safe_load((out / "meta.yaml").read_text())
    assert meta["author"] == "A. Researcher" and meta["gpu_budget"] == 120 and meta["open_source"] is False
    results = json.loads((world["runs"]["lexical", "dev"] / "results.json").read_text())
    assert results["model"]["moshi_weights"]["sha256"][:16] in meta["description"]
    with zipfile.ZipFile(out.with_name("submission.zip")) as archive:
        assert {"meta.yaml", "phonetic/", "semantic/", "lexical/dev.txt"} <= set(archive.namelist())


def test_fields_left_empty_are_named_and_the_validator_refuses_them(world, tmp_path, capsys):
    out = tmp_path / "submission"
    assert _submit(world["runs"].values(), out) == 0
    printed = capsys.readouterr().out
    assert "to fill in" in printed and "author, affiliation, train_set, gpu_budget" in printed
    with pytest.raises(ValidationError, match="author must not be an empty string"):
        validate(world["data"], out)


def test_dev_only_and_one_track_submissions_carry_their_validator_options(world, tmp_path, capsys):
    runs = world["runs"]
    dev = tmp_path / "dev"
    assert _submit([runs["lexical", "dev"], runs["syntactic", "dev"]], dev, *META_FLAGS) == 0
    assert "--no-phonetic --no-semantic --only-dev DATASET" in capsys.readouterr().out
    validate(world["data"], dev, only_dev=True)
    with pytest.raises(ValidationError, match="missing \\[test.txt\\]"):
        validate(world["data"], dev)
    lexical = tmp_path / "lexical"
    assert _submit([runs["lexical", "dev"], runs["lexical", "test"]], lexical, *META_FLAGS) == 0
    assert "--no-phonetic --no-semantic --no-syntactic DATASET" in capsys.readouterr().out
    validate(world["data"], lexical, no_syntactic=True)
    assert not any((lexical / "syntactic").iterdir())


def test_open_source_submission_copies_the_code(world, tmp_path):
    code = tmp_path / "code_src"
    (code / "pkg").mkdir(parents=True)
    (code / "pkg" / "train.py").write_text("print('hi')\n")
    out = tmp_path / "submission"
    assert _submit(world["runs"].values(), out, *META_FLAGS, "--code", str(code)) == 0
    validate(world["data"], out)
    assert yaml.safe_load((out / "meta.yaml").read_text())["open_source"] is True
    assert (out / "code" / "pkg" / "train.py").read_text() == "print('hi')\n"
    (code / "pkg" / "train.py").unlink()
    (code / "pkg").rmdir()
    assert _submit(world["runs"].values(), tmp_path / "other", "--code", str(code)) == 1
    assert not (tmp_path / "other").exists()


def _copy_run(run: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(run, dest)
    if edit is not None:
        body = json.loads((dest / "results.json").read_text())
        edit(body)
        (dest / "results.json").write_text(json.dumps(body))
    return dest


@pytest.mark.parametrize("case", ["smoke", "twice", "other_model", "other_text", "split_clash", "test_only",
                                  "not_zerospeech", "out_not_empty", "edited_scores", "dangling_link"])
def test_runs_that_make_no_submission_are_refused_naming_why(world, tmp_path, capsys, case):
    runs = world["runs"]
    full = list(runs.values())
    out = tmp_path / "submission"
    if case == "smoke":
        smoke = tmp_path / "smoke"
        assert main(_argv(world["ckpt"], world["data"], smoke, "swuggy", "dev", "--limit", "1")) == 0
        given, expected = [smoke] + full[1:], "smoke run"
    elif case == "twice":
        given, expected = full + [_copy_run(runs["lexical", "dev"], tmp_path / "again")], "two runs of lexical dev"
    elif case == "other_model":
        other = _copy_run(runs["syntactic", "test"], tmp_path / "other",
                          lambda b: b["model"]["moshi_weights"].update(sha256="0" * 64))
        given, expected = full[:3] + [other], "different models"
        expected = "differs in moshi_weights.sha256"
    elif case == "other_text":
        other = _copy_run(runs["syntactic", "test"], tmp_path / "other", lambda b: b["config"].update(text="pad"))
        given, expected = full[:3] + [other], "scored differently"
    elif case == "split_clash":
        given, expected = [runs["lexical", "dev"], runs["lexical", "test"], runs["syntactic", "dev"]], \
            "different splits"
    elif case == "test_only":
        given, expected = [runs["lexical", "test"]], "without its dev run"
    elif case == "not_zerospeech":
        other = _copy_run(runs["lexical", "dev"], tmp_path / "other", lambda b: b.update(benchmark="sstorycloze"))
        given, expected = [other], "only swuggy (lexical) and sblimp"
    elif case == "out_not_empty":
        out.mkdir()
        (out / ".DS_Store").write_text("")
        given, expected = full, "not an empty folder"
    elif case == "edited_scores":
        other = _copy_run(runs["lexical", "dev"], tmp_path / "other")
        sub = other / "submission" / "lexical" / "dev.txt"
        sub.write_text(sub.read_text().replace(" ", "  ", 1))
        given, expected = [other], "results.json does not match"
    else:
        code = tmp_path / "code_src"
        code.mkdir()
        (code / "train.py").write_text("x = 1\n")
        (code / "gone").symlink_to(tmp_path / "nowhere")
        given, expected = full, "code: cannot copy"
        extra = ["--code", str(code), "--zip"]
    before = sorted(p.name for p in out.iterdir()) if out.exists() else None
    assert _submit(given, out, *META_FLAGS, *(extra if case == "dangling_link" else [])) == 1
    err = capsys.readouterr().err
    assert expected in err, err
    assert (sorted(p.name for p in out.iterdir()) if out.exists() else None) == before
    assert not list(tmp_path.glob(".submission.*")) and not out.with_name("submission.zip").exists()


def test_scores_file_checked_as_the_validator_reads_it():
    assert check_scores("a -1.5\nb 2\n", "f") == 2
    for text, said in (("a\t1\n", "line 1"), ("a 1\n\nb 2\n", "line 2"), ("a 1\na 2\n", "listed twice"),
                       ("a x\n", "not a number"), ("a nan\n", "the score of a is nan")):
        with pytest.raises(SubmissionError, match=said):
            check_scores(text, "f")


def test_meta_yaml_keeps_every_string_a_string():
    text = meta_yaml(SubmissionMeta(author="off", affiliation="yes: no", train_set="1e3", gpu_budget=1e3,
                                    description="# not a comment"), False, "unused")
    meta = yaml.safe_load(text)
    assert (meta["author"], meta["affiliation"], meta["train_set"]) == ("off", "yes: no", "1e3")
    assert meta["gpu_budget"] == 1000.0 and meta["description"] == "unused"
    assert meta["parameters"]["semantic"]["pooling"] == "mean"


def test_library_call_returns_what_it_wrote(world, tmp_path):
    sub = write_submission(SubmissionConfig(runs=list(world["runs"].values()), out=tmp_path / "s",
                                            meta=SubmissionMeta(author="a", affiliation="b", train_set="c",
                                                                gpu_budget=1)))
    assert sub.to_fill == [] and sub.validate_options == ["--no-phonetic", "--no-semantic"]
    assert sub.runs == dict(sorted(world["runs"].items()))
    with pytest.raises(SubmissionError, match="gpu_budget"):
        SubmissionMeta(gpu_budget=-1)


def test_code_of_the_current_folder_links_followed_and_copied_weights(world, tmp_path, monkeypatch, capsys):
    """`--code .` from a repository holding the submission's folder; a link in the code is copied as its file;
    runs of the same weights at another path (another mtime, another hf_repo) are one model."""
    repo = tmp_path / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "src" / "model.py").write_text("print('model')\n")
    (repo / "link.py").symlink_to(repo / "src" / "model.py")
    runs = world["runs"]
    moved = _copy_run(runs["syntactic", "test"], tmp_path / "moved", lambda b: (
        b["model"]["moshi_weights"].update(path="/elsewhere/model.safetensors", mtime_ns=1),
        b["model"].update(hf_repo="someone/else")))
    monkeypatch.chdir(repo)
    given = [runs["lexical", "dev"], runs["lexical", "test"], runs["syntactic", "dev"], moved]
    assert _submit(given, Path("zr2021-sub"), *META_FLAGS, "--code", ".", "--zip") == 0, capsys.readouterr().err
    out = repo / "zr2021-sub"
    validate(world["data"], out)
    validate(world["data"], repo / "zr2021-sub.zip")
    assert sorted(p.name for p in (out / "code").iterdir()) == ["link.py", "src"]   # not itself, nor its zip
    assert not (out / "code" / "link.py").is_symlink()
    assert (out / "code" / "link.py").read_text() == "print('model')\n"
    assert _submit(given, Path("."), *META_FLAGS) == 1
    assert "the current folder" in capsys.readouterr().err


def test_gpu_budget_of_any_size_is_a_yaml_number():
    for value in (1e16, 1e-5, 120.0, 0.0, 3.25):
        meta = yaml.safe_load(meta_yaml(SubmissionMeta(gpu_budget=value), False, "d"))
        assert meta["gpu_budget"] == value and isinstance(meta["gpu_budget"], float), value
