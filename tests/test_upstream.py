"""The upstream pull request (`python -m moshi_patch.upstream`): the patch applies to the installed moshi, only
adds code, is the code `moshi_patch.LMGen` runs, and the patched `moshi.models.lm.LMGen` passes the oracles."""
import ast
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moshi
import moshi_patch
from moshi_patch import upstream

TESTS = Path(__file__).resolve().parent
MOSHI_PACKAGE = Path(moshi.__file__).resolve().parent
INSTALLED_LM = MOSHI_PACKAGE / "models" / "lm.py"
# The whole of tests/test_step_with_logits.py (about 10 s on one thread): teacher-forced and replay
# equivalence with `LMModel.forward`, parity with `step()`, exec mask, reset, CFG, error messages.
ORACLES = TESTS / "test_step_with_logits.py"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> tuple[upstream.Rendered, Path]:
    out = tmp_path_factory.mktemp("pr")
    result = upstream.render()
    upstream.write(result, out)
    return result, out


@pytest.fixture(scope="module")
def patched_copy(rendered, tmp_path_factory) -> Path:
    """A copy of the installed moshi package with step_with_logits.patch applied by `patch -p1`."""
    patch_bin = shutil.which("patch")
    if patch_bin is None:
        pytest.skip("GNU `patch` is not installed: cannot check that the diff applies")
    _, out = rendered
    root = tmp_path_factory.mktemp("patched")
    shutil.copytree(MOSHI_PACKAGE, root / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    # --dry-run first: a patch that does not apply must not half-apply.
    for extra in (["--dry-run"], []):
        result = subprocess.run([patch_bin, "-p1", "--batch", "--forward", *extra,
                                 "-i", str(out / "step_with_logits.patch")],
                                cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fuzz" not in result.stdout.lower() and "offset" not in result.stdout.lower(), result.stdout
    return root


def test_outputs_written(rendered) -> None:
    result, out = rendered
    assert (out / "moshi" / "models" / "lm.py").read_text() == result.patched
    diff = (out / "step_with_logits.patch").read_text()
    assert diff.startswith("--- a/moshi/models/lm.py\n+++ b/moshi/models/lm.py\n")
    added = sum(1 for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in diff.splitlines() if line.startswith("-") and not line.startswith("---"))
    assert (result.added, result.removed) == (added, 0) and added > 100
    pr = (out / "PR.md").read_text()
    for section in ("# LMGen.step_with_logits", "## Motivation", "## API", "## Design", "## Tests",
                    "## Result of running them", "def step_with_logits(", "class StepLogits:",
                    f"{added} lines added, 0 removed"):
        assert section in pr, section
    assert "moshi_patch" not in result.patched


def test_patch_applies_and_gives_the_rendered_file(rendered, patched_copy) -> None:
    result, _ = rendered
    assert (patched_copy / "moshi" / "models" / "lm.py").read_text() == result.patched
    assert result.original == INSTALLED_LM.read_text()


def _segments(source: str, nodes: list[ast.stmt]) -> list[str]:
    return [ast.get_source_segment(source, node, padded=True) for node in nodes]


def _members(source: str) -> dict[str, list[str]]:
    """Source of each top-level statement, and of each statement in each class body, keyed by scope."""
    tree = ast.parse(source)
    members = {"<module>": _segments(source, [n for n in tree.body if not isinstance(n, ast.ClassDef)])}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            members[node.name] = _segments(source, node.body)
    return members


def _is_subsequence(small: list[str], big: list[str]) -> bool:
    it = iter(big)
    return all(any(item == other for other in it) for item in small)


def test_upstream_code_unchanged(rendered) -> None:
    """Every pre-existing statement of moshi/models/lm.py is byte-identical in the patched file, in the same
    order; `_init_streaming_state` only gains the line creating the step_with_logits state."""
    result, _ = rendered
    before, after = _members(result.original), _members(result.patched)
    init = "def _init_streaming_state("
    for scope, statements in before.items():
        kept = [s for s in statements if not s.lstrip().startswith(init)]
        assert _is_subsequence(kept, after[scope]), scope
    step = next(s for s in before["LMGen"] if s.lstrip().startswith("def _step("))
    assert step in after["LMGen"]
    assert sum(s.lstrip().startswith("def step(") for s in before["LMGen"]) == 1
    # Classes changed: only LMGen and _LMGenState (plus the two new ones).
    changed = {scope for scope in before if before[scope] != after[scope]}
    assert changed == {"LMGen", "_LMGenState"}
    assert set(after) - set(before) == {"StepLogits", "_StepLogitsState"}
    old_init = next(s for s in before["LMGen"] if s.lstrip().startswith(init)).split("\n")
    new_init = next(s for s in after["LMGen"] if s.lstrip().startswith(init)).split("\n")
    added = [line for line in new_init if line not in old_init]
    block = upstream.extract_blocks(Path(inspect.getsourcefile(moshi_patch.lm)).read_text())["init_streaming_state"]
    assert len(added) == 1 and [line.strip() for line in added] == [line.strip() for line in block if line.strip()]
    assert "state.step_logits = self._init_step_logits_state(" in added[0]
    assert [line for line in new_init if line not in added] == old_init


def test_rendered_code_is_the_code_moshi_patch_runs(rendered) -> None:
    """One source of truth: each method and class inserted is, to the byte, the one of `moshi_patch`."""
    result, _ = rendered
    tree = ast.parse(result.patched)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    patched_methods = {n.name: ast.get_source_segment(result.patched, n, padded=True)
                       for n in classes["LMGen"].body if isinstance(n, ast.FunctionDef)}
    new = [name for name, fn in vars(moshi_patch.lm.StepLogitsLMGen).items()
           if inspect.isfunction(fn) and name != "_init_streaming_state"]
    assert "step_with_logits" in new and "_depformer_forced_with_logits" in new
    for name in new:
        source = inspect.getsource(getattr(moshi_patch.lm.StepLogitsLMGen, name))
        # inspect includes the decorators, the AST node starts at `def`.
        source = source[source.index("    def "):].rstrip("\n")
        assert patched_methods[name] == source, name
    for name in ("StepLogits", "_StepLogitsState"):
        node = classes[name]
        segment = "\n".join(result.patched.split("\n")[node.decorator_list[0].lineno - 1:node.end_lineno])
        assert segment == inspect.getsource(getattr(moshi_patch.lm, name)).rstrip("\n"), name


# Runs in the subprocess: checks that the oracles ran on the patched copy's LMGen and never on moshi_patch.
# moshi is first imported by the tests, after conftest.py set the environment up.
BOOTSTRAP = """
import sys, pytest
copy = sys.argv[1]
code = pytest.main(sys.argv[2:])
import moshi, moshi.models.lm as lm
assert moshi.__file__.startswith(copy), f"moshi imported from {moshi.__file__}, not from {copy}"
assert hasattr(lm.LMGen, "step_with_logits"), "the patched copy has no LMGen.step_with_logits"
assert "moshi_patch" not in sys.modules, "the oracle tests imported moshi_patch"
assert sys.modules["test_step_with_logits"].LMGen is lm.LMGen, "the oracle tests used another LMGen"
print("ORACLES RAN ON", lm.__file__)
sys.exit(code)
"""


def test_oracles_pass_on_patched_upstream(patched_copy) -> None:
    env = dict(os.environ, PYTHONPATH=str(patched_copy), MOSHI_PATCH_TEST_LMGEN="upstream")
    result = subprocess.run(
        [sys.executable, "-c", BOOTSTRAP, str(patched_copy), str(ORACLES), "-q", "-p", "no:cacheprovider"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"ORACLES RAN ON {patched_copy / 'moshi' / 'models' / 'lm.py'}" in output, output
    summary = [line for line in result.stdout.splitlines() if " passed" in line][-1]
    # Nothing failed or errored; only the CUDA-graph test may be skipped (without a GPU).
    assert "failed" not in summary and "error" not in summary, summary
    skipped = int(summary.split(" skipped")[0].split()[-1]) if " skipped" in summary else 0
    assert int(summary.split(" passed")[0].split()[-1]) >= 30 and skipped <= 1, summary


def _modified_upstream(tmp_path: Path, old: str, new: str) -> Path:
    source = INSTALLED_LM.read_text()
    assert source.count(old) >= 1, old
    path = tmp_path / "lm.py"
    path.write_text(source.replace(old, new))
    return path


@pytest.mark.parametrize("old,new,message", [
    ("    def _step(", "    def _step_v2(", r"no method `LMGen._step`"),
    ("from ..utils.sampling import sample_token\n", "", r"module-level names \['sample_token'\]"),
    ("        return state\n\n", "        return None\n\n", r"does not end with `return state`"),
    ("class LMGen(", "class LMGenerator(", r"no module-level class `LMGen`"),
    ("audio_tokens = state.graphed_depth(", "audio_tokens = self.depformer_step(",
     r"`LMGen._step` does not call \['graphed_depth'\]"),
])
def test_unexpected_upstream_shape_fails_clearly(tmp_path, capsys, old, new, message) -> None:
    source = _modified_upstream(tmp_path, old, new)
    with pytest.raises(upstream.UpstreamShapeError, match=message) as error:
        upstream.render(source)
    assert "supports moshi 0.2.13" in str(error.value) and str(source) in str(error.value)
    # The command line stops with the message, and writes nothing.
    out = tmp_path / "out"
    assert upstream.main(["--out", str(out), "--source", str(source)]) == 2
    assert "supports moshi 0.2.13" in capsys.readouterr().err
    assert not out.exists()


def test_already_patched_upstream_is_refused(rendered) -> None:
    _, out = rendered
    with pytest.raises(upstream.UpstreamShapeError, match="already"):
        upstream.render(out / "moshi" / "models" / "lm.py")


def test_blocks_using_names_upstream_lacks_are_refused(tmp_path) -> None:
    patch_source = Path(inspect.getsourcefile(moshi_patch.lm)).read_text()
    bad = tmp_path / "lm.py"
    bad.write_text(patch_source.replace("sampled = sample_token(", "sampled = _upstream.sample_token("))
    with pytest.raises(ValueError, match="mention `_upstream`"):
        upstream.render(patch_source_path=bad)
    bad.write_text(patch_source.replace("sampled = sample_token(", "sampled = sample_tokens("))
    with pytest.raises(ValueError, match=r"does not define or import: \['sample_tokens'\]"):
        upstream.render(patch_source_path=bad)
    bad.write_text(patch_source.replace("\n# upstream-end\n", "\n", 1))  # The module block is not closed.
    with pytest.raises(ValueError, match="inside the block `module`"):
        upstream.render(patch_source_path=bad)
