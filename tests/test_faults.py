"""Faults injected into `moshi-eval librilight` runs on the tiny checkpoint: no result is ever wrong, mixed or
lost, and each fault is a clear message (the faults of the reliability issue, one test or more each)."""
import hashlib
import json
import os
from pathlib import Path
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers.cli_helpers import librilight_args, results, sequences, sigterm_after_first_book
from helpers.checkpoint_factory import tiny_mimi_config, write_librilight_folder
from moshi_eval.files import report
from moshi_eval.cli.commands import main
from moshi_eval.files.lock import LOCK_NAME

_args, _results, _npz = librilight_args, results, sequences


def _copy_ckpt_args(world, dest: Path) -> tuple[list[str], Path]:
    """The checkpoint's CLI arguments with the LM weights copied to `dest` (to replace them there)."""
    dest.mkdir(parents=True, exist_ok=True)
    weights = dest / "model.safetensors"
    shutil.copy(world["ckpt"]["moshi_weights"], weights)
    args = list(world["ckpt"]["cli_args"])
    args[args.index("--moshi-weight") + 1] = str(weights)
    return args, weights


def test_weights_replaced_at_the_same_path_are_another_model(world, capsys):
    """Fault 1: same path, same size, other values: the rerun is refused, nothing is mixed or overwritten."""
    ckpt_args, weights = _copy_ckpt_args(world, world["root"] / "replaced")
    out = world["root"] / "out_replaced"
    assert main(_args(world, out, "--num-books", "1", ckpt_args=ckpt_args)) == 0
    before = {p.name: p.read_bytes() for p in (out / "sequences").iterdir()}
    state = load_file(str(weights))
    name = next(k for k in state if k.endswith("weight"))
    state[name] = state[name] + 0.5
    size = weights.stat().st_size
    save_file(state, str(weights))
    assert weights.stat().st_size == size
    capsys.readouterr()
    assert main(_args(world, out, ckpt_args=ckpt_args)) == 1
    err = capsys.readouterr().err
    assert "another configuration" in err and "model.moshi_weights.sha256" in err
    assert "audio_dir" not in err              # only the keys that differ are named
    assert {p.name: p.read_bytes() for p in (out / "sequences").iterdir()} == before


def _hold_lock(out: Path) -> subprocess.Popen:
    """A process that takes the lock of `out` the way a run does, then waits."""
    code = textwrap.dedent(f"""
        import sys, time
        from moshi_eval.files.lock import OutputLock
        with OutputLock(__import__("pathlib").Path({str(out)!r}), "moshi-eval librilight --out {out}"):
            print("locked", flush=True)
            time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_run_on_the_same_out_is_refused_and_a_dead_runs_lock_is_taken_over(world, capsys):
    """Fault 2: while a run holds --out, another fails at once naming it; once it died, runs go on."""
    out = world["root"] / "out_locked"
    out.mkdir()
    holder = _hold_lock(out)
    try:
        assert main(_args(world, out, "--max-frames", "20")) == 1
        err = capsys.readouterr().err
        assert f"pid {holder.pid}" in err and "in use by another moshi-eval run" in err
        assert not (out / "config.json").exists() and not (out / "sequences").exists()
    finally:
        holder.kill()                      # SIGKILL: the lock file stays, its lock dies with the process
        holder.wait()
    assert (out / LOCK_NAME).exists()
    assert main(_args(world, out, "--max-frames", "20")) == 0
    assert _results(out)["num_books"] == 3


def test_a_chapter_added_after_scoring_is_scored_again(world, capsys):
    """Fault 3: the book is rescored with its three chapters, and the run says so."""
    audio = world["root"] / "libri_added"
    shutil.copytree(world["audio"], audio)
    out = world["root"] / "out_added"
    assert main(_args(world, out, audio=audio)) == 0
    frames = {b["sequence_id"]: b["frames"] for b in _results(out)["books"]}
    shutil.copy(audio / "spk1" / "book1" / "ch1.flac", audio / "spk1" / "book1" / "ch3.flac")
    capsys.readouterr()
    assert main(_args(world, out, audio=audio)) == 0
    err = capsys.readouterr().err
    assert "spk1__book1: its chapters changed" in err
    res = _results(out)
    book = next(b for b in res["books"] if b["sequence_id"] == "spk1__book1")
    assert len(book["chapters"]) == 3 and book["frames"] > frames["spk1__book1"]
    assert _npz(out)["spk1__book1"]["audio_ce"].shape[0] == book["frames"]
    assert res["runtime"]["books_resumed"] == 2 and res["runtime"]["books_scored_this_run"] == 1


def test_dangling_links_skip_their_book_with_the_reason(world):
    """Fault 4: a book with a dangling chapter link, and one made only of such links, are listed as skipped."""
    audio = world["root"] / "libri_links"
    shutil.copytree(world["audio"], audio)
    os.symlink(audio / "nowhere.flac", audio / "spk0" / "book0" / "ch3.flac")
    only = audio / "spk9" / "book9"
    only.mkdir(parents=True)
    os.symlink(audio / "gone.flac", only / "ch1.flac")
    out = world["root"] / "out_links"
    assert main(_args(world, out, audio=audio)) == 0
    res = _results(out)
    assert res["num_books"] == 2
    skipped = {s["sequence_id"]: s["reason"] for s in res["skipped"]}
    assert set(skipped) == {"spk0__book0", "spk9__book9"}
    assert all("dangling symbolic link" in reason for reason in skipped.values())
    assert main(_args(world, world["root"] / "out_links_strict", "--strict", audio=audio)) == 1


def test_long_and_non_utf8_book_names(world):
    """Faults 6 and 9: folder names of 200 characters, and a name that is not UTF-8, are scored."""
    audio = world["root"] / "libri_names"
    long_speaker, long_book = "s" * 200, "b" * 200
    (audio / long_speaker).mkdir(parents=True)
    shutil.copytree(world["audio"] / "spk0" / "book0", audio / long_speaker / long_book)
    raw = os.fsencode(audio) + b"/spk\xff"
    os.makedirs(raw + b"/book\xfe")
    for name in ("ch1.flac", "ch2.flac"):
        shutil.copy(world["audio"] / "spk1" / "book1" / name, os.fsdecode(raw + b"/book\xfe/" + name.encode()))
    out = world["root"] / "out_names"
    assert main(_args(world, out, "--batch-size", "2", audio=audio)) == 0
    res = _results(out)
    ids = {b["sequence_id"] for b in res["books"]}
    assert f"{long_speaker}__{long_book}" in ids and len(ids) == 2
    files = sorted(p.name for p in (out / "sequences").glob("*.npz"))
    assert all(len(name) < 140 for name in files)
    for b in res["books"]:
        arrays, meta = report.read_sequence(out / b["file"], with_meta=True)
        assert meta["sequence_id"] == b["sequence_id"] and arrays["audio_ce"].shape[0] == b["frames"]
    # Rerun: both books are found again under their file names.
    assert main(_args(world, out, "--batch-size", "2", audio=audio)) == 0
    assert _results(out)["runtime"]["books_resumed"] == 2


def test_flipped_bit_in_a_cache_entry_is_re_encoded(world, capsys, caplog):
    """Fault 7: a cache entry whose codes changed on disk is a miss (warning), never a wrong code."""
    cache_dir = world["root"] / "cache_flip"
    out_a, out_b = world["root"] / "out_flip_a", world["root"] / "out_flip_b"
    args = ["--num-books", "1", "--max-chapters", "1", "--cache-dir", str(cache_dir)]
    assert main(_args(world, out_a, *args)) == 0
    (entry,) = [p for p in cache_dir.rglob("*.pt")]
    payload = torch.load(entry, weights_only=True)
    payload["codes"][3, 5] ^= 1
    torch.save(payload, entry)
    assert main(_args(world, out_b, *args)) == 0
    assert "does not match: re-encoding" in caplog.text
    assert _results(out_b)["runtime"]["code_cache"]["misses"] == 1
    a, b = _npz(out_a), _npz(out_b)
    np.testing.assert_array_equal(a["spk0__book0"]["codebook_ce"], b["spk0__book0"]["codebook_ce"])


def test_codec_with_too_few_codebooks_is_a_clear_error(world, capsys):
    """Fault 8: a Mimi config of 4 codebooks for a model whose streams take 8: named before moshi asserts."""
    config = tiny_mimi_config()
    config["quantizer"]["n_q"] = 4
    path = world["root"] / "mimi4.json"
    path.write_text(json.dumps(config))
    ckpt_args = list(world["ckpt"]["cli_args"])
    ckpt_args[ckpt_args.index("--mimi-config") + 1] = str(path)
    assert main(_args(world, world["root"] / "out_mimi4", ckpt_args=ckpt_args)) == 1
    err = capsys.readouterr().err
    assert "codec does not fit the model" in err and "4 codebooks" in err and "AssertionError" not in err


@pytest.mark.slow
def test_sigterm_mid_batch_then_resume_is_bitwise_an_uninterrupted_run(world):
    """Fault 10: SIGTERM once the shorter book of the first batch of two is written, then resume: every
    array and every metric equal those of an uninterrupted run, bit for bit."""
    # Books of 25, 150, 160 and 170 frames: the first batch (25 and 150) is still streaming its second book
    # well after the first is written.
    audio = write_librilight_folder(world["root"] / "libri_batches", books=4, chapters=1,
                                    seconds=[2.0, 12.0, 12.8, 13.6], seed=7)
    opts = ["--batch-size", "2", "--chunk", "1", "--text", "predicted"]
    full, resumed = world["root"] / "out_batch_full", world["root"] / "out_batch_resumed"
    assert main(_args(world, full, *opts, audio=audio)) == 0
    returncode, err = sigterm_after_first_book(_args(world, resumed, *opts, audio=audio), resumed)
    assert returncode == 130, err
    assert len(list((resumed / "sequences").glob("*.npz"))) == 1
    assert main(_args(world, resumed, *opts, audio=audio)) == 0
    a, b = _npz(full), _npz(resumed)
    assert a.keys() == b.keys() and len(a) == 4
    for sid in a:
        for name in report.SEQUENCE_ARRAYS:
            np.testing.assert_array_equal(a[sid][name], b[sid][name])
    assert _results(full)["metrics"] == _results(resumed)["metrics"]
    assert _results(resumed)["runtime"]["books_resumed"] == 1


def test_write_failure_names_the_file_and_keeps_finished_books(world, monkeypatch, capsys):
    """A full or read-only --out: the message names the file being written; books written before stay."""
    out = world["root"] / "out_full_disk"
    from moshi_eval.files import folder
    real = folder.atomic_write
    writes = []

    def fail_second_book(path, write):
        if path.suffix == ".npz":
            writes.append(path)
            if len(writes) == 2:
                raise OSError(28, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(folder, "atomic_write", fail_second_book)
    assert main(_args(world, out)) == 1
    err = capsys.readouterr().err
    assert f"cannot write {writes[1]}: No space left on device" in err
    assert [p.name for p in (out / "sequences").glob("*.npz")] == [writes[0].name]
    report.read_sequence(writes[0])


def test_unusable_cache_dir_is_a_warning(world, caplog):
    """A --cache-dir that is a file: the run warns and goes on without the cache."""
    not_a_dir = world["root"] / "cache_is_a_file"
    not_a_dir.write_text("x")
    out = world["root"] / "out_bad_cache"
    assert main(_args(world, out, "--num-books", "1", "--cache-dir", str(not_a_dir))) == 0
    assert "unusable" in caplog.text
    assert _results(out)["num_books"] == 1


def test_corrupt_result_file_is_refused(world, capsys):
    out = world["root"] / "out_nan"
    assert main(_args(world, out, "--num-books", "1")) == 0
    (path,) = list((out / "sequences").glob("*.npz"))
    arrays, meta = report.read_sequence(path, with_meta=True)
    arrays = {k: np.full_like(v, np.nan) if v.dtype.kind == "f" else v for k, v in arrays.items()}
    report.write_sequence(out, meta["sequence_id"], arrays, meta)
    assert main(_args(world, out, "--num-books", "1")) == 1
    assert "holds no finite loss: it is corrupt" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("card", None, "key 'card' is missing"),
    ("dim", "wide", "key 'dim' is 'wide'"),
    ("context", -3, "key 'context' is -3"),
    ("delays", [0, 1], "key 'delays' is \\[0, 1\\]"),
    ("num_heads", 2.5, "key 'num_heads' is 2.5"),
])
def test_config_key_missing_or_mistyped_is_named(world, capsys, key, value, message):
    config = json.loads(world["ckpt"]["config_path"].read_text())
    if value is None:
        del config[key]
    else:
        config[key] = value
    path = world["root"] / f"config_{key}.json"
    path.write_text(json.dumps(config))
    ckpt_args = list(world["ckpt"]["cli_args"])
    ckpt_args[ckpt_args.index("--config") + 1] = str(path)
    assert main(_args(world, world["root"] / f"out_cfg_{key}", ckpt_args=ckpt_args)) == 1
    import re
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--moshi-weight", "--tokenizer"])
def test_garbage_weight_or_tokenizer_file_is_named(world, capsys, flag):
    bad = world["root"] / f"garbage{flag}"
    bad.write_bytes(b"\x00garbage" * 100)
    ckpt_args = list(world["ckpt"]["cli_args"])
    ckpt_args[ckpt_args.index(flag) + 1] = str(bad)
    assert main(_args(world, world["root"] / f"out_garbage{flag}", ckpt_args=ckpt_args)) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err


def test_meta_device_is_refused(world, capsys):
    assert main(_args(world, world["root"] / "out_meta", "--device", "meta")) == 1
    assert "meta device holds no data" in capsys.readouterr().err


def test_demo_on_a_foreign_out_is_refused_before_writing(world, tmp_path, capsys):
    out = tmp_path / "foreign"
    assert main(_args(world, out, "--num-books", "1")) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--no-progress", "--cache-dir", str(world["cache"])]) == 1
    err = capsys.readouterr().err
    assert "another configuration" in err and "model.demo" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before     # no demo_audio written


def test_check_streaming_on_nan_weights_says_nan(capsys, monkeypatch):
    import moshi_eval.cli.check_streaming as check_command
    from helpers.lm_factory import make_lm

    def nan_model(seed, device, dtype):
        lm = make_lm(context=8, dim=32)
        with torch.no_grad():
            lm.transformer.layers[1].self_attn.out_projs[0].weight[0, 0] = float("nan")
        return lm

    monkeypatch.setattr(check_command, "demo_lm", nan_model)
    assert main(["check-streaming", "--demo", "--frames", "8", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "NaN" in err and "transformer.layers.1.self_attn.out_projs.0.weight" in err


def test_weights_rewritten_with_their_mtime_set_back_get_a_new_digest(tmp_path):
    """The digest cache was keyed on (path, size, mtime): a same-size file rewritten in place
    with its mtime restored (`touch -d`, `cp -p`) kept the old sha256. The inode change time tells."""
    from moshi_eval.files.hashing import FileHasher, file_sha256
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 4096)
    hasher = FileHasher(tmp_path / "hashes")
    before = hasher.identity(weights)
    st = weights.stat()
    with open(weights, "r+b") as f:          # same inode, same size, other content
        f.write(b"b" * 4096)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_mtime_ns == before["mtime_ns"] and weights.stat().st_size == before["size"]
    for fresh in (hasher, FileHasher(tmp_path / "hashes")):     # the memo and the on-disk cache
        after = fresh.identity(weights)
        assert after["sha256"] == file_sha256(weights) != before["sha256"]


def test_book_file_from_another_configuration_is_scored_again(world, capsys):
    """A book file of another run (here a --max-frames 20 run's) copied into sequences/ is scored again, and the
    run says so; a book file whose values were edited (1e30) is refused, naming it."""
    short, full, mixed = (world["root"] / f"out_foreign_{n}" for n in ("short", "full", "mixed"))
    opts = ["--num-books", "2"]
    assert main(_args(world, short, *opts, "--max-frames", "20")) == 0
    assert main(_args(world, full, *opts)) == 0
    assert main(_args(world, mixed, *opts)) == 0      # the full config; its book spk1 is then replaced
    foreign = report.sequence_path(short, "spk1__book1")
    shutil.copy(foreign, report.sequence_path(mixed, "spk1__book1"))
    capsys.readouterr()
    assert main(_args(world, mixed, *opts)) == 0
    err = capsys.readouterr().err
    assert "spk1__book1: its file was scored under another configuration" in err and "scoring it again" in err
    a, b = _npz(full), _npz(mixed)
    for sid in a:
        for name in report.SEQUENCE_ARRAYS:
            np.testing.assert_array_equal(a[sid][name], b[sid][name])
    # Values edited in place, the file's meta kept: refused with the file named.
    path = report.sequence_path(mixed, "spk0__book0")
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["audio_ce"] = np.full_like(arrays["audio_ce"], 1e30)
    np.savez(path, **arrays)
    capsys.readouterr()
    assert main(_args(world, mixed, *opts)) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "checksum" in err


def test_resume_with_another_batch_size_or_device_is_refused(world, capsys):
    """A resume with another --batch-size (numbers differ at rounding level), or of
    a run made on another device (codes and losses can differ), is refused, naming the setting."""
    out = world["root"] / "out_batch_size"
    assert main(_args(world, out, "--num-books", "1", "--batch-size", "2")) == 0
    capsys.readouterr()
    assert main(_args(world, out, "--batch-size", "3")) == 1
    assert "batch_size: stored 2, now 3" in capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    config["device"] = config["encoding"]["device"] = "cuda (NVIDIA H200)"
    config["encoding"]["threads"] = None
    (out / "config.json").write_text(json.dumps(config))
    assert main(_args(world, out, "--batch-size", "2")) == 1
    err = capsys.readouterr().err
    assert "device: stored 'cuda (NVIDIA H200)', now 'cpu'" in err and "encoding.device" in err


def test_stale_temporaries_are_removed_and_results_name_the_files_beside_them(world):
    """A run killed during its final writes left `.results.json.*.tmp` files no run
    removed, and a results.json that could be newer than curve.csv/png with nothing telling."""
    out = world["root"] / "out_stale_tmp"
    assert main(_args(world, out, "--num-books", "1")) == 0
    stale = [out / ".results.json.k1l2.tmp", out / ".curve.png.x9.tmp", out / "sequences" / ".spk0__book0.npz.a.tmp"]
    for path in stale:
        path.write_bytes(b"half written")
    keep = out / "notes.tmp"                       # not an atomic write's temporary: left alone
    keep.write_text("mine")
    assert main(_args(world, out, "--num-books", "2")) == 0
    assert not any(p.exists() for p in stale) and keep.exists()
    res = _results(out)
    assert res["files"] == {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                            for name in ("curve.csv", "curve.png")}
    for book in res["books"]:
        assert book["file_sha256"] == hashlib.sha256((out / book["file"]).read_bytes()).hexdigest()
    # What results.json says about frames is what was scored.
    audio = res["summary"]["audio_ce"]
    frames = [b["frames"] for b in res["books"]]
    assert audio["longest_book_frames"] == max(frames) and "num_frames" not in audio
    assert audio["frames_scored"] == sum(int(np.isfinite(s["audio_ce"]).sum()) for s in _npz(out).values())


def test_sigterm_handler_is_installed_before_any_file_is_touched(world, monkeypatch, capsys):
    """The SIGTERM handler was installed by run_eval, after the weights were hashed and the
    torchrun rendezvous joined: a SIGTERM there killed the process without a word."""
    import signal
    from moshi_eval.cli import commands as cli
    seen = []

    def resolve(*args, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise KeyboardInterrupt("signal SIGTERM")

    monkeypatch.setattr(cli, "resolve_checkpoint", resolve)
    before = signal.getsignal(signal.SIGTERM)
    assert main(_args(world, world["root"] / "out_sig")) == 130
    assert seen and seen[0] not in (signal.SIG_DFL, signal.SIG_IGN, None) and seen[0] is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert "interrupted" in capsys.readouterr().err


class _Payload:
    """A pickle that runs code when loaded: it creates the file named by `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_weights_never_run_code_even_where_torch_load_would(tmp_path, monkeypatch):
    """Setup.py allows torch 2.2-2.5, whose `torch.load` unpickles anything by default.
    Emulate that default: loading a weight file that runs code is an error naming the file, and runs nothing."""
    from moshi_eval import checkpoint
    marker = tmp_path / "code_ran"
    evil = tmp_path / "model.pt"
    torch.save({"fsdp_best_state": {"model": {"w": _Payload(marker)}}}, evil)
    real = torch.load

    def old_default(*args, **kwargs):          # torch < 2.6: weights_only=False unless given
        kwargs.setdefault("weights_only", False)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", old_default)
    with pytest.raises(checkpoint.CheckpointError, match=str(evil)):
        checkpoint._read_state(evil, "cpu")
    with checkpoint._weights_only_torch_load():      # how moshi's Mimi loader is called
        with pytest.raises(Exception):
            torch.load(evil, "cpu")
    assert torch.load is old_default and not marker.exists()


def test_two_books_with_the_same_id_name_both_folders(world, tmp_path, capsys):
    """`s/x__y` and `s__x/y` are both book `s__x__y`: the run stopped without naming them."""
    audio = tmp_path / "libri_same_id"
    for speaker, book in (("s", "x__y"), ("s__x", "y")):
        (audio / speaker / book).mkdir(parents=True)
        shutil.copy(next(world["audio"].rglob("*.flac")), audio / speaker / book / "c1.flac")
    assert main(_args(world, tmp_path / "out_same_id", audio=audio)) == 1
    err = capsys.readouterr().err
    assert "s__x__y" in err and str(audio / "s" / "x__y") in err and str(audio / "s__x" / "y") in err
