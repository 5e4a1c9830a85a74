"""docs/small_model.md's example runs as written: a small model with a TTT layer streams as LMModel.forward
computes, and the evaluator scores it."""
from pathlib import Path
import pytest
import re


DOC = Path(__file__).resolve().parents[1] / "docs" / "small_model.md"


@pytest.mark.slow
def test_small_model_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    code = re.search(r"```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    namespace: dict = {"__name__": "small_model_doc"}
    exec(compile(code, str(DOC), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert any(line.startswith("CONSISTENT") for line in printed)
    model = namespace["model"]
    assert any(type(m).__name__ == "TTTLinear" for m in model.modules()) and model.context == 50
    assert 0 < float(printed[-1]) < 20                  # a cross-entropy in nats over 2048 entries: ~ln(2048)
