"""Messages instead of tracebacks : each user error below names the argument or the cause."""
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from moshi_eval.cli.commands import main

from helpers.checkpoint_factory import write_tiny_checkpoint
from helpers.lm_factory import make_lm


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def _check(args, capsys) -> tuple[int, str]:
    code = main(["check-streaming", *args, "--frames", "4", "--chunk", "1"])
    return code, capsys.readouterr().err


def test_device_cpu_1_names_the_device_not_the_weight_file(ckpt, capsys):
    code, err = _check([*ckpt["cli_args"], "--device", "cpu:1"], capsys)
    assert code == 2
    assert "--device cpu:1: torch has a single CPU device" in err and "safetensors" not in err


def test_config_that_is_not_json_names_the_flag(ckpt, tmp_path, capsys):
    args = list(ckpt["cli_args"])
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    args[args.index("--config") + 1] = str(bad)
    code, err = _check([*args, "--device", "cpu"], capsys)
    assert code == 2 and f"--config {bad}: not a JSON file" in err


def test_lora_weight_from_the_hub_offline_names_the_flag(ckpt, capsys, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)     # no network here anyway: fail at once
    code, err = _check([*ckpt["cli_args"], "--device", "cpu", "--lora-weight", "hf://someone/adapter/lora.safetensors"],
                       capsys)
    assert code == 2 and "--lora-weight hf://someone/adapter/lora.safetensors" in err
    assert "Traceback" not in err


def test_world_size_without_torchrun_is_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    assert main(["demo", "--out", str(tmp_path / "d"), "--max-frames", "20", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "WORLD_SIZE=2 asks for 2 processes, but MASTER_ADDR, MASTER_PORT are not set" in err
    assert "torchrun" in err and "unset WORLD_SIZE and RANK" in err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_waiting_for_its_peers_says_so(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), NO_TORCH_COMPILE="1")
    proc = subprocess.Popen([sys.executable, "-m", "moshi_eval", "demo", "--out", str(tmp_path / "d"),
                             "--max-frames", "20", "--no-progress"], stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 60     # the rank waits for a peer that never comes: it must say so at once
        while time.time() < deadline and not any("joining the process group" in line for line in lines):
            time.sleep(0.1)
        line = next((line for line in lines if "joining the process group" in line), "")
        assert "[rank 1/2] joining the process group at 127.0.0.1" in line, lines
        assert "waiting for the other 1 rank(s) to start" in line
    finally:
        proc.kill()
        proc.wait()


def test_a_model_already_streaming_is_a_message(tmp_path, capsys, monkeypatch):
    from moshi_eval import demo
    import moshi_eval.cli.check_streaming as check_command
    from moshi_eval.scoring.streaming import StreamingCheckError, verify_streaming
    lm = make_lm()
    lm.streaming_forever(1)
    with pytest.raises(StreamingCheckError, match="already streaming .*streams cannot be nested"):
        verify_streaming(lm, 8, "predicted")
    real = demo.demo_lm

    def streaming_demo(seed, *args, **kwargs):
        model = real(seed, *args, **kwargs)
        model.streaming_forever(1)
        return model

    monkeypatch.setattr(demo, "demo_lm", streaming_demo)
    assert main(["demo", "--out", str(tmp_path / "d"), "--max-frames", "20", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert "the model is already streaming" in err and "Traceback" not in err
    monkeypatch.setattr(check_command, "demo_lm", lambda seed, device, dtype: streaming_demo(seed))
    assert main(["check-streaming", "--demo", "--frames", "4", "--device", "cpu"]) == 2
    assert "already streaming" in capsys.readouterr().err
