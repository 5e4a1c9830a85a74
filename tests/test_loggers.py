"""W&B and TensorBoard logging (`moshi_eval.loggers`, `--wandb`, `--tensorboard`): the values logged are the
run's metrics; a missing package stops the command before anything runs, naming the pip command. The real
packages are exercised when installed (W&B offline, TensorBoard's event reader); otherwise a recording stand-in
takes their place."""
import json
import sys
import time
import types

import numpy as np
import pytest

from helpers.cli_helpers import make_world
from helpers.checkpoint_factory import load_tiny_checkpoint
from moshi_eval import LibriLightConfig, LibriLightEvaluator, flat_metrics, loggers
from moshi_eval.cli.commands import main

DEMO = ["--no-progress", "--max-frames", "150", "--bootstrap", "50"]


class _Recorder:
    """Stands for a wandb run or a SummaryWriter: records what is logged."""
    def __init__(self, **init):
        self.init, self.logged, self.scalars, self.images = init, [], {}, []
        self.summary: dict = {}
        self.finished = self.closed = False

    def log(self, payload, step=None):
        self.logged.append((payload, step))

    def finish(self):
        self.finished = True

    def add_scalar(self, name, value, step):
        self.scalars[name] = (value, step)

    def add_image(self, name, image, step, dataformats):
        self.images.append((name, image, step, dataformats))

    def flush(self):
        pass

    def close(self):
        self.closed = True


def _fake_wandb(monkeypatch) -> list[_Recorder]:
    runs: list[_Recorder] = []
    module = types.ModuleType("wandb")

    def init(**kwargs):
        runs.append(_Recorder(**kwargs))
        return runs[-1]
    module.init = init
    module.Table = lambda columns, data: {"columns": columns, "data": data}
    module.Image = lambda array: {"image": array}
    module.log = lambda payload, step=None: runs.append(_Recorder()) or runs[-1].log(payload, step)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setenv("WANDB_MODE", "offline")     # no credentials here: the run would be refused online
    return runs


@pytest.mark.parametrize("flag,value,package", [("--wandb", "proj", "wandb"), ("--tensorboard", "tb", "tensorboard")])
def test_missing_package_names_the_pip_command(tmp_path, capsys, monkeypatch, flag, value, package):
    monkeypatch.setitem(sys.modules, package, None)     # `import package` raises ImportError
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), flag, value, *DEMO]) == 1
    err = capsys.readouterr().err
    assert f"{flag} needs the {package} package" in err and f"pip install 'moshi-patch[{package}]'" in err
    assert not out.exists()                              # stopped before anything ran


def test_cli_logs_the_run_metrics_and_curve(tmp_path, monkeypatch):
    runs = _fake_wandb(monkeypatch)
    writers: list[_Recorder] = []
    monkeypatch.setitem(sys.modules, "tensorboard", types.ModuleType("tensorboard"))
    monkeypatch.setattr(loggers, "summary_writer", lambda d: writers.append(_Recorder(log_dir=d)) or writers[-1])
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--wandb", "proj/run1", "--tensorboard", str(tmp_path / "tb"),
                 "--log-step", "7", *DEMO]) == 0
    results = json.loads((out / "results.json").read_text())
    expected = flat_metrics(results["summary"])
    assert "librilight/audio_ce@125" in expected and not any("@250" in k for k in expected)   # 150 frames

    (run,) = runs
    assert run.init["project"] == "proj" and run.init["name"] == "run1" and run.finished
    (payload, step), = run.logged
    assert step == 7
    assert {k: v for k, v in payload.items() if k in expected} == expected
    assert run.summary == expected
    table = payload["librilight/curve"]
    buckets = results["summary"]["audio_ce"]["buckets"]
    assert [row[2] for row in table["data"]] == [b["mean"] for b in buckets]
    assert payload["librilight/curve_plot"]["image"].ndim == 3

    (writer,) = writers
    assert writer.closed and writer.init["log_dir"] == tmp_path / "tb"
    assert writer.scalars == {k: (v, 7) for k, v in expected.items()}
    (name, image, step, fmt), = writer.images
    assert name == "librilight/curve" and image.shape[2] == 3 and image.dtype == np.uint8 and fmt == "HWC"


def test_api_helpers_log_the_result(tmp_path, monkeypatch):
    runs = _fake_wandb(monkeypatch)
    world = make_world(tmp_path)
    lm, mimi, _ = load_tiny_checkpoint(world["ckpt"])
    result = LibriLightEvaluator(mimi, LibriLightConfig(audio_dir=world["audio"], report_at=(10,), report_window=5,
                                                        bucket=20, bootstrap=0), use_cache=False)(lm)
    loggers.log_wandb(result, step=3)
    (payload, step), = runs[-1].logged
    assert step == 3 and {k: payload[k] for k in result.metrics} == result.metrics
    writer = _Recorder()
    loggers.log_tensorboard(writer, result, step=4, curve=False)
    assert writer.scalars == {k: (v, 4) for k, v in result.metrics.items()} and not writer.images


def test_wandb_target_and_step():
    assert loggers.parse_wandb_target("p") == ("p", None)
    assert loggers.parse_wandb_target("p/r") == ("p", "r")
    for bad in ("", "/r", "p/", "p/r/x"):
        with pytest.raises(loggers.LoggerError, match="PROJECT or PROJECT/RUN"):
            loggers.parse_wandb_target(bad)
    assert loggers.checkpoint_step("runs/x/checkpoints/checkpoint_001200/consolidated") == 1200
    assert loggers.checkpoint_step("runs/x/checkpoints/checkpoint_000300") == 300
    assert loggers.checkpoint_step(None) == loggers.checkpoint_step("elsewhere") == 0


def test_tensorboard_event_file_holds_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--tensorboard", str(tmp_path / "tb"), *DEMO]) == 0
    expected = flat_metrics(json.loads((out / "results.json").read_text())["summary"])
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name, value in expected.items():
        assert events.Scalars(name)[0].value == pytest.approx(value, rel=1e-6)


def test_wandb_offline_run_summary_holds_the_metrics(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--wandb", "moshi-eval-test/demo", *DEMO]) == 0
    expected = flat_metrics(json.loads((out / "results.json").read_text())["summary"])
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    # wandb's core process writes the log asynchronously: wait for the run's exit record.
    deadline = time.monotonic() + 60
    while (summary := _wandb_offline_summary(run_file)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert summary is not None, f"{run_file}: no exit record within 60 s"
    for name, value in expected.items():
        assert summary[name] == pytest.approx(value, rel=1e-12)


def _wandb_offline_summary(path) -> dict | None:
    """The summary of an offline W&B run, read from its transaction log (`run-*.wandb`): recent wandb releases
    write `wandb-summary.json` only when they sync. The log is a LevelDB-style record log (a 7-byte file header,
    32 KiB blocks, records of 7-byte headers: crc32, length, kind 1 full / 2 first / 3 middle / 4 last) of
    `wandb_internal_pb2.Record` messages. None until the run's exit record is written."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B transaction log"
    block, pos, pending, summary, exited = 32768, 7, b"", {}, False
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):     # the rest of a block is padding
            pos += left
            continue
        if pos + 7 + length > len(data):                 # a record still being written
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            exited = exited or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "summary":
                for item in record.summary.update:
                    summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary if exited else None
