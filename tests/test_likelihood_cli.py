"""`moshi-eval likelihood`: end to end on a tiny checkpoint, resume after SIGTERM (bitwise), configuration identity,
lock, torchrun data-parallel with the numbers of one process, compare of two runs."""
import csv
import json
import os
import re
from pathlib import Path
import shutil
import subprocess
import sys

import pytest

from helpers.checkpoint_factory import load_tiny_checkpoint, write_tiny_checkpoint
from helpers.cli_helpers import sigterm_after_first
from moshi_eval.cli.commands import main
from moshi_eval.tasks.likelihood import LikelihoodConfig, evaluate_likelihood
from moshi_eval.files.lock import OutputLock
from test_likelihood import make_salmon, make_storycloze, make_zerospeech

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lik")
    ckpt = write_tiny_checkpoint(root / "ckpt")
    make_zerospeech(root / "zr", "lexical", ids=4, voices=2, seed=1)
    return {"root": root, "ckpt": ckpt, "data": root / "zr", "cache": root / "cache"}


def _argv(world, out: Path, *extra: str, task: str = "swuggy", data: Path | None = None) -> list[str]:
    return ["likelihood", "--task", task, "--data", str(data or world["data"]), "--out", str(out),
            "--cache-dir", str(world["cache"]), "--threads", "1", "--no-progress", "--text", "zero",
            "--batch-size", "3", "--bootstrap", "100", *world["ckpt"]["cli_args"], *extra]


def _items(out: Path) -> dict[str, dict]:
    return {r["file"]: r for r in csv.DictReader(open(out / "items.csv"))}


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_cli_end_to_end_equals_library(world, tmp_path):
    out = tmp_path / "run"
    assert main(_argv(world, out)) == 0
    body = _results(out)
    items = _items(out)
    assert len(items) == 16 and body["files_scored"] == 16 and body["pairs_scored"] == 8
    assert body["conventions"]["text"] == "zero" and body["model"]["moshi_weights"]["sha256"]
    assert body["metrics"]["swuggy/accuracy"] == body["accuracy"]["overall"]["accuracy"]
    submission = (out / "submission" / "lexical" / "dev.txt").read_text().splitlines()
    assert {line.split(" ")[0]: float(line.split(" ")[1]) for line in submission} == \
        {k: float(r["log_likelihood"]) for k, r in items.items()}
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    lib = evaluate_likelihood(lm, mimi, LikelihoodConfig("swuggy", world["data"], text="zero", batch_size=3,
                                                         bootstrap=100, progress=False))
    assert {k: float(r["log_likelihood"]) for k, r in items.items()} == \
        {k: s.log_likelihood for k, s in lib.scores.items()}
    assert body["metrics"] == pytest.approx(lib.metrics)


def test_other_configuration_refused_and_lock(world, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_argv(world, out, "--limit", "2")) == 0
    assert _results(out)["smoke_run"] is True
    assert main(_argv(world, out, "--limit", "2", "--chunk", "7")) == 1
    assert "holds results of another configuration (chunk: stored 128, now 7)" in capsys.readouterr().err
    with OutputLock(out, "another run"):
        assert main(_argv(world, out, "--limit", "2")) == 1
    assert "is in use by another moshi-eval run" in capsys.readouterr().err


def test_bad_layout_exit_code_and_message(world, tmp_path, capsys):
    assert main(_argv(world, tmp_path / "o", task="sblimp")) == 1
    err = capsys.readouterr().err
    assert "expected the ZeroSpeech 2021 layout for sblimp: <data>/syntactic/dev/*.wav" in err and "lexical" in err


@pytest.mark.slow
def test_resume_after_sigterm_is_bitwise_equal(world, tmp_path):
    full = tmp_path / "full"
    assert main(_argv(world, full, "--batch-size", "2")) == 0
    out = tmp_path / "killed"
    returncode, err = sigterm_after_first(_argv(world, out, "--batch-size", "2"), out, "items/batch_*.json")
    if returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert returncode == 130 and "Resume with the same command" in err
    done = len(list((out / "items").glob("batch_*.json")))
    assert 1 <= done < 8 and not (out / "results.json").exists()
    assert main(_argv(world, out, "--batch-size", "2")) == 0
    body = _results(out)
    assert body["resumed"] is True and body["runtime"]["files_resumed"] >= 2
    assert _items(out) == _items(full)
    assert body["metrics"] == _results(full)["metrics"]


@pytest.mark.slow
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
def test_torchrun_two_processes_equal_one(world, tmp_path):
    one = tmp_path / "one"
    assert main(_argv(world, one)) == 0
    two = tmp_path / "two"
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "moshi_eval",
                           *_argv(world, two)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _items(two) == _items(one)
    assert _results(two)["metrics"] == _results(one)["metrics"]
    assert _results(two)["runtime"]["processes"] == 2


@pytest.mark.slow
@pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun is not installed")
def test_torchrun_strict_error_on_one_rank_is_raised_on_both(world, tmp_path):
    """--strict with one unreadable file, batches of one file, 2 processes: the rank that owns it fails naming
    the file, the other with the RankFailedError that names it (not a gloo 'connection closed' traceback or a
    hang); both print a moshi-eval error and nothing is written."""
    data = make_storycloze(tmp_path / "sc", stories=3)
    (data / "1_uuid1ab_incorrect.wav").write_bytes(b"RIFF not really a wav")
    out = tmp_path / "run"
    env = dict(os.environ, NO_TORCH_COMPILE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([TORCHRUN, "--standalone", "--nproc-per-node", "2", "-m", "moshi_eval",
                           *_argv(world, out, "--strict", "--batch-size", "1", task="sstorycloze", data=data)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode != 0
    # The two ranks write to one stderr: their lines can interleave, so count messages, not lines.
    errors = re.split(r"(?=moshi-eval: error:)", proc.stderr)[1:]
    assert len(errors) == 2, proc.stderr[-3000:]
    assert all("1_uuid1ab_incorrect.wav" in error for error in errors)
    assert sum("failed while scoring" in error for error in errors) == 1
    assert not (out / "results.json").exists()


def test_salmon_cli_parts(world, tmp_path):
    data = make_salmon(tmp_path / "salmon", parts=("gender_consistency",), samples=3)
    out = tmp_path / "s"
    assert main(_argv(world, out, "--parts", "gender_consistency", task="salmon", data=data)) == 0
    body = _results(out)
    assert set(body["accuracy"]) == {"part"} and "gender_consistency" in body["accuracy"]["part"]
    assert "salmon/accuracy/gender_consistency" in body["metrics"]
    assert not (out / "submission").exists()


def test_salmon_interface_returns_the_cli_log_likelihoods(world, tmp_path):
    """SALMon's harness loop (files of a part grouped by sample index, sorted, first = positive; batches of 2
    samples) with `MoshiInferenceModel`: the CLI's per-file log-likelihoods and its part accuracy."""
    import sphn
    import torch
    from moshi_eval.salmon import MoshiInferenceModel
    data = make_salmon(tmp_path / "salmon", parts=("sentiment_consistency",), samples=3)
    out = tmp_path / "s"
    assert main(_argv(world, out, "--parts", "sentiment_consistency", task="salmon", data=data)) == 0
    items = _items(out)
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    model = MoshiInferenceModel(lm, mimi, sample_rate=16000, text="zero").to("cpu")
    paths = sorted((data / "sentiment_consistency").glob("*.wav"))
    groups: dict[int, list[str]] = {}
    for p in paths:
        groups.setdefault(int(p.stem.split("_")[1]), []).append(str(p))
    samples = [sorted(g) for _, g in sorted(groups.items())]
    results = []
    for start in range(0, len(samples), 2):
        batch = samples[start:start + 2]
        pos = [torch.from_numpy(sphn.read(s[0])[0]) for s in batch]
        neg = [torch.from_numpy(sphn.read(s[1])[0]) for s in batch]
        lp, ln = model.log_likelihood(pos), model.log_likelihood(neg)
        for s, a, b in zip(batch, lp.tolist(), ln.tolist()):
            for path, value in ((s[0], a), (s[1], b)):
                expected = float(items[f"sentiment_consistency/{Path(path).stem}"]["log_likelihood"])
                assert value == pytest.approx(expected, rel=1e-5, abs=2e-3)
        results += [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(lp.tolist(), ln.tolist())]
    assert _results(out)["metrics"]["salmon/accuracy/sentiment_consistency"] == pytest.approx(sum(results) / 3)
    with pytest.raises(ValueError, match=r"wavs\[0\]: expected a non-empty"):
        model.log_likelihood([torch.zeros(1, 0)])


def test_compare_two_likelihood_runs(world, tmp_path, capsys):
    """Paired accuracy difference over ids, by hand from the two runs' items.csv and pairs.csv."""
    import numpy as np
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(world, a)) == 0
    other = write_tiny_checkpoint(tmp_path / "other_model", seed=1)      # only the model may differ
    argv = _argv(world, b)
    argv = argv[:argv.index(world["ckpt"]["cli_args"][0])] + other["cli_args"]
    assert main(argv) == 0
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp"), "--bootstrap", "200"]) == 0
    assert "| accuracy |" in capsys.readouterr().out
    got = json.loads((tmp_path / "cmp" / "compare.json").read_text())["comparisons"]["accuracy"]["overall"]
    items = {r: {k: float(v["log_likelihood"]) for k, v in _items(r).items()} for r in (a, b)}
    pairs = list(csv.DictReader(open(a / "pairs.csv")))
    per_unit: dict[str, list[tuple[float, float]]] = {}
    disagree = 0
    for p in pairs:
        sa, sb = ((1.0 if items[r][p["positive"]] > items[r][p["negative"]] else 0.0) for r in (a, b))
        per_unit.setdefault(p["unit"], []).append((sa, sb))
        disagree += sa != sb
    diff = np.mean([np.mean([y for _, y in v]) - np.mean([x for x, _ in v]) for v in per_unit.values()])
    assert got["units"] == 4 and got["pairs"] == 8
    assert got["difference"] == pytest.approx(diff) and got["disagreement_share"] == pytest.approx(disagree / 8)
    assert got["accuracy_a"] == pytest.approx(_results(a)["metrics"]["swuggy/accuracy"])
    c = tmp_path / "c"
    make_salmon(tmp_path / "sal", parts=("rir_consistency",))
    assert main(_argv(world, c, "--parts", "rir_consistency", task="salmon", data=tmp_path / "sal")) == 0
    assert main(["compare", str(a), str(c), "--out", str(tmp_path / "cmp2")]) == 1
    assert "not of the same benchmark: benchmark: 'swuggy' vs 'salmon'" in capsys.readouterr().err


def test_demo_prints_a_likelihood_result(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--max-chapters", "1", "--max-frames", "40", "--bootstrap", "50",
                 "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert "moshi-eval demo likelihood: 3 generated minimal pairs" in capsys.readouterr().out
    body = _results(out / "likelihood")
    assert body["task"] == "likelihood" and body["benchmark"] == "sstorycloze" and body["pairs_scored"] == 3
    assert body["model"]["demo"] is True and body["model"]["lm_kwargs"]
    # Run by the runner as every task: the demo's command recorded, batches kept to resume.
    assert body["command"].startswith("moshi-eval demo") and list((out / "likelihood" / "items").glob("batch_*"))
    assert 0.0 <= body["metrics"]["sstorycloze/accuracy"] <= 1.0


def test_likelihood_demo_needs_no_checkpoint_and_resumes(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["likelihood", "--demo", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--bootstrap", "20"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "moshi-eval likelihood sstorycloze: 6 files scored, 0 skipped" in err and "book" not in err
    body = _results(out)
    assert body["benchmark"] == "sstorycloze" and body["model"]["demo"] is True and body["pairs_scored"] == 3
    items = _items(out)
    assert main(argv) == 0
    assert "resumed" in capsys.readouterr().err and _items(out) == items
    assert main(argv[:2] + ["--data", str(tmp_path), "--moshi-weight", "x"] + argv[2:]) == 2
    assert "drop --data, --moshi-weight" in capsys.readouterr().err
    assert main(["likelihood", "--out", str(tmp_path / "x")]) == 2
    assert "--task and --data required (or --demo" in capsys.readouterr().err
    assert main(argv[:2] + ["--split", "test", "--no-fuse-lora"] + argv[2:]) == 2     # accepted, then unused
    assert "drop --no-fuse-lora, --split test" in capsys.readouterr().err
    assert main(["likelihood", "--task", "swuggy", "--data", "x", "--out", str(tmp_path / "y"), "--seed", "3"]) == 2
    assert "--seed seeds the demo model" in capsys.readouterr().err


def test_choice_hints_read_both_argparse_message_forms(capsys):
    """Python up to 3.12.7 quotes the choices in `invalid choice` messages, later releases do not."""
    from moshi_eval.cli.commands import Parser
    for message in ("argument --task: invalid choice: 'swugy' (choose from 'swuggy', 'sblimp')",
                    "argument --task: invalid choice: 'swugy' (choose from swuggy, sblimp)"):
        with pytest.raises(SystemExit):
            Parser(prog="moshi-eval").error(message)
        assert "did you mean 'swuggy'?" in capsys.readouterr().err


@pytest.mark.parametrize("argv, said", [
    (["likelihod", "--demo"], "invalid choice: 'likelihod'"),
    (["likelihood", "--task", "swugy"], "did you mean 'swuggy'?"),
    (["likelihood", "--demo", "--out", "x", "--chunks", "3"],
     "unrecognized arguments: --chunks (did you mean --chunk?)"),
    (["compare", "a", "b", "--out", "c", "--bootstap", "3"], "--bootstap (did you mean --bootstrap?)"),
])
def test_mistyped_names_get_the_closest_one(argv, said, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert said in err, err
    if argv[0] != "likelihod":
        assert f"moshi-eval {argv[0]}: error" in err and f"usage: moshi-eval {argv[0]}" in err
    else:
        assert "did you mean 'likelihood'?" in err


def test_compare_runs_of_two_copies_of_the_data(world, tmp_path, capsys):
    """The same recordings in another folder are the same benchmark: paired by their sha256, as one folder."""
    copy = tmp_path / "copy"
    shutil.copytree(world["data"], copy)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, data in ((a, world["data"]), (b, copy), (c, world["data"])):
        assert main(_argv(world, out, data=data)) == 0
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "ab"), "--bootstrap", "50"]) == 0
    assert "data folders differ" in capsys.readouterr().err
    assert main(["compare", str(a), str(c), "--out", str(tmp_path / "ac"), "--bootstrap", "50"]) == 0
    ab, ac = (json.loads((tmp_path / n / "compare.json").read_text()) for n in ("ab", "ac"))
    assert ab["shared_pairs"] == ac["shared_pairs"] == 8
    for name in ("accuracy", "accuracy_per_token"):
        x, y = ab["comparisons"][name]["overall"], ac["comparisons"][name]["overall"]
        assert (x["difference"], x["disagreement_share"], x["accuracy_a"]) == \
            (y["difference"], y["disagreement_share"], y["accuracy_a"])
