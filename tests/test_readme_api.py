"""The README's "From a training loop" example runs as written, and at step 0 logs the numbers of
`moshi-eval demo` (wandb replaced by a recording stand-in when it is not installed, or to record the calls)."""
import json
from pathlib import Path
import re
import sys
import types


from moshi_eval import flat_metrics
from moshi_eval.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def training_loop_example() -> str:
    text = README.read_text()
    start = text.index("### From a training loop")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def test_training_loop_example_logs_the_demo_numbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))    # the default code cache, here
    logged: list[tuple[dict, int]] = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: None
    wandb.log = lambda payload, step=None: logged.append((dict(payload), step))
    monkeypatch.setitem(sys.modules, "wandb", wandb)

    exec(compile(training_loop_example(), str(README), "exec"), {"__name__": "readme_example"})

    assert [step for _, step in logged] == [0, 2]
    assert main(["demo", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0
    demo = flat_metrics(json.loads((tmp_path / "cli" / "results.json").read_text())["metrics"])
    demo_likelihood = json.loads((tmp_path / "cli" / "likelihood" / "results.json").read_text())["metrics"]
    assert "sstorycloze/accuracy" in demo_likelihood and set(demo).isdisjoint(demo_likelihood)
    assert logged[0][0] == {**demo, **demo_likelihood}                # bit for bit, both tasks
    assert logged[1][0]["librilight/audio_ce"] != demo["librilight/audio_ce"]     # trained in between
    written = json.loads((tmp_path / "demo_api_out" / "librilight" / "results.json").read_text())
    assert flat_metrics(written["metrics"]) == {k: v for k, v in logged[1][0].items() if k.startswith("librilight/")}
    written = json.loads((tmp_path / "demo_api_out" / "sstorycloze" / "results.json").read_text())
    assert written["metrics"] == {k: v for k, v in logged[1][0].items() if k.startswith("sstorycloze/")}


def test_chunked_call_example_gives_forward_logits():
    """The README's chunked `step_with_logits` loop (chunks of 32 frames) on 70 frames, past a 24-frame
    context: its audio logits are those of `LMModel.forward` on the same codes."""
    import torch
    from moshi.utils.compile import no_compile
    from helpers.lm_factory import make_lm
    from moshi_eval.check import random_codes
    from moshi_patch import LMGen

    text = README.read_text()
    start = text.index("### Chunks of frames")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)
    torch.manual_seed(0)
    lm_model = make_lm(context=24).eval()
    codes = random_codes(lm_model, 2, 70, seed=1)
    namespace = {"torch": torch, "lm_model": lm_model, "codes": codes, "lm_gen": LMGen(lm_model, use_sampling=False),
                 "B": 2, "T": 70, "dep_q": lm_model.dep_q}
    with torch.no_grad(), no_compile():
        exec(compile(block, str(README), "exec"), namespace)
        reference = lm_model(codes)
    streamed = namespace["audio_logits"]
    assert streamed.shape == reference.logits.shape
    mask = reference.mask[..., None].expand_as(streamed)
    torch.testing.assert_close(streamed[mask], reference.logits[mask], atol=1e-4, rtol=0)
