"""The upstream pull requests (`python -m moshi_patch.upstream`): 1. audio hooks in `depformer_step`, 2.
`step_with_logits` on top. Each applies from a repository-root layout and to a copy of the installed moshi,
only adds code, is the code `moshi_patch` runs, is flake8-clean with upstream's settings, and passes its tests
on the patched copy (the hooks' own upstream-style test; the oracles of step_with_logits)."""
import ast
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moshi
import moshi_patch
from moshi_patch import hooks, upstream

pytestmark = pytest.mark.slow     # subprocesses: most of the suite's time

TESTS = Path(__file__).resolve().parent
MOSHI_PACKAGE = Path(moshi.__file__).resolve().parent
INSTALLED_LM = MOSHI_PACKAGE / "models" / "lm.py"
PATCH = shutil.which("patch")
needs_patch = pytest.mark.skipif(PATCH is None, reason="GNU `patch` is not installed")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("pr")
    first, second = upstream.render_hooks(), upstream.render()
    paths = upstream.write(first, out) + upstream.write(second, out)
    return first, second, out, paths


def _apply(patch_file: Path, cwd: Path) -> None:
    # --dry-run first: a patch that does not apply must not half-apply.
    for extra in (["--dry-run"], []):
        result = subprocess.run([PATCH, "-p1", "--batch", "--forward", *extra, "-i", str(patch_file)],
                                cwd=cwd, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fuzz" not in result.stdout.lower() and "offset" not in result.stdout.lower(), result.stdout


@pytest.fixture(scope="module")
def patched_copies(rendered, tmp_path_factory):
    """Copies of the installed moshi: with the first pull request, and with both (package-relative patches)."""
    if PATCH is None:
        pytest.skip("GNU `patch` is not installed: cannot check that the diffs apply")
    _, _, _, paths = rendered
    copies = {}
    for name, patches in (("hooks", [paths[1]]), ("both", [paths[1], paths[5]])):
        root = tmp_path_factory.mktemp(name)
        shutil.copytree(MOSHI_PACKAGE, root / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
        for patch_file in patches:
            _apply(patch_file, root)
        copies[name] = root
    return copies


def test_outputs_written(rendered) -> None:
    first, second, out, paths = rendered
    assert [p.relative_to(out).as_posix() for p in paths] == [
        "1-audio-hooks/moshi/models/lm.py", "1-audio-hooks/audio_hooks.package.patch",
        "1-audio-hooks/audio_hooks.patch", "1-audio-hooks/PR.md",
        "2-step-with-logits/moshi/models/lm.py", "2-step-with-logits/step_with_logits.package.patch",
        "2-step-with-logits/step_with_logits.patch", "2-step-with-logits/PR.md"]
    assert paths[0].read_text() == first.patched and paths[4].read_text() == second.patched
    assert second.original == first.patched            # the second pull request is on top of the first
    assert first.original == INSTALLED_LM.read_text()
    # The first pull request is small: <= 40 added lines to lm.py, nothing removed.
    assert first.removed == 0 and 0 < first.added <= 40, first.added
    assert second.removed == 0 and second.added > 100
    for result, patch_path in ((first, paths[2]), (second, paths[6])):
        diff = patch_path.read_text()
        assert diff.startswith("--- a/moshi/moshi/models/lm.py\n+++ b/moshi/moshi/models/lm.py\n")
        added = sum(1 for line in diff.split("\n--- /dev/null")[0].splitlines()
                    if line.startswith("+") and not line.startswith("+++"))
        assert added == result.added
        assert "moshi_patch" not in result.patched
    assert "+++ b/moshi/tests/test_lm_gen.py" in paths[2].read_text()
    assert "+++ b/tests/test_lm_gen.py" in paths[1].read_text()
    for pr_path, title in ((paths[3], "# LMGen: audio hooks in depformer_step"),
                           (paths[7], "# LMGen.step_with_logits")):
        pr = pr_path.read_text()
        for section in (title, "## Checklist", "- [ ] Read CONTRIBUTING.md", "- [ ] Run pre-commit hook.",
                        "I, {your GitHub handle}, confirm", "## PR Description", "## Checks run",
                        "flake8 with moshi/setup.cfg's settings", "Not run: the pre-commit hooks"):
            assert section in pr, (pr_path, section)
        # The submitter ticks the checklist and accepts the CLA, not the renderer.
        assert "- [x]" not in pr, pr_path


@needs_patch
def test_repository_root_patches_apply_to_a_checkout_layout(rendered, tmp_path) -> None:
    """From the root of a kyutai-labs/moshi checkout (package in moshi/moshi, tests in moshi/tests)."""
    first, second, _, paths = rendered
    checkout = tmp_path / "checkout"
    shutil.copytree(MOSHI_PACKAGE, checkout / "moshi" / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    (checkout / "moshi" / "tests").mkdir()
    _apply(paths[2], checkout)
    assert (checkout / "moshi" / "moshi" / "models" / "lm.py").read_text() == first.patched
    assert (checkout / "moshi" / "tests" / "test_lm_gen.py").read_text() == upstream.upstream_test_source()
    _apply(paths[6], checkout)
    assert (checkout / "moshi" / "moshi" / "models" / "lm.py").read_text() == second.patched


def test_patch_applies_and_gives_the_rendered_file(rendered, patched_copies) -> None:
    first, second, _, _ = rendered
    assert (patched_copies["hooks"] / "moshi" / "models" / "lm.py").read_text() == first.patched
    assert (patched_copies["both"] / "moshi" / "models" / "lm.py").read_text() == second.patched


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


def _lines_added(before: str, after: str) -> list[str]:
    old = before.split("\n")
    return [line for line in after.split("\n") if line not in old]


def test_first_pull_request_only_adds_the_hooks(rendered) -> None:
    first, _, _, _ = rendered
    before, after = _members(first.original), _members(first.patched)
    assert set(before) == set(after) and {s for s in before if before[s] != after[s]} == {"LMGen"}
    # depformer_step gains exactly the two hook calls; `step` and `_step` are unchanged.
    old, new = (next(s for s in m["LMGen"] if s.lstrip().startswith("def depformer_step("))
                for m in (before, after))
    assert [line.strip() for line in _lines_added(old, new)] == [
        line.strip() for line in (hooks.LOGITS_CALL + hooks.TOKEN_CALL).splitlines()]
    for name in ("def _step(", "def step("):
        assert next(s for s in before["LMGen"] if s.lstrip().startswith(name)) in after["LMGen"]
    # The hooks are constructor arguments, like `on_text_logits_hook`, appended after the last parameter.
    init = next(n for n in ast.walk(ast.parse(first.patched)) if isinstance(n, ast.FunctionDef) and n.name == "__init__"
                and "on_text_logits_hook" in [a.arg for a in n.args.args])
    assert [a.arg for a in init.args.args][-2:] == ["on_audio_logits_hook", "on_audio_token_hook"]
    assert [line.strip() for line in _lines_added(first.original, first.patched)] == [
        line.strip() for line in (hooks.PARAMETERS + hooks.ASSIGNMENTS + hooks.LOGITS_CALL + hooks.TOKEN_CALL)
        .splitlines()]


def test_second_pull_request_leaves_upstream_code_unchanged(rendered) -> None:
    """Every statement of the hooked lm.py is byte-identical in the patched file, in the same order: the
    second pull request only adds (a field of `_LMGenState`, two classes, methods of `LMGen`)."""
    _, second, _, _ = rendered
    before, after = _members(second.original), _members(second.patched)
    for scope, statements in before.items():
        assert _is_subsequence(statements, after[scope]), scope
    assert {scope for scope in before if before[scope] != after[scope]} == {"LMGen", "_LMGenState"}
    assert set(after) - set(before) == {"StepLogits", "_StepLogitsState"}
    added_methods = [s for s in after["LMGen"] if s not in before["LMGen"]]
    assert all(s.lstrip().startswith(("def ", "@torch.no_grad()")) for s in added_methods)


def test_rendered_code_is_the_code_moshi_patch_runs(rendered) -> None:
    """One source of truth: each method and class inserted is, to the byte, the one of `moshi_patch`; and
    moshi_patch's `LMGen` has no method of the first pull request (it never changes moshi's code)."""
    first, second, _, _ = rendered
    tree = ast.parse(second.patched)
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    patched_methods = {n.name: ast.get_source_segment(second.patched, n, padded=True)
                       for n in classes["LMGen"].body if isinstance(n, ast.FunctionDef)}
    cls = moshi_patch.lm.StepLogitsLMGen
    new = [name for name, fn in vars(cls).items()
           if inspect.isfunction(fn) and name != "_init_streaming_state"]
    assert "step_with_logits" in new and "_depformer_step_with_logits" in new
    for name in new:
        source = inspect.getsource(getattr(cls, name))
        source = source[source.index("    def "):].rstrip("\n")    # inspect includes the decorators
        assert patched_methods[name] == source, name
    for name in ("StepLogits", "_StepLogitsState"):
        node = classes[name]
        segment = "\n".join(second.patched.split("\n")[node.decorator_list[0].lineno - 1:node.end_lineno])
        assert segment == inspect.getsource(getattr(moshi_patch.lm, name)).rstrip("\n"), name
    for lm_gen_class in (cls, moshi_patch.LMGen):
        assert lm_gen_class.depformer_step is moshi.models.lm.LMGen.depformer_step
        assert not hasattr(lm_gen_class, "on_audio_token_hook")


def _run(copy: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(copy), MOSHI_PATCH_TEST_LMGEN="upstream", NO_TORCH_COMPILE="1")
    return subprocess.run([sys.executable, "-c", BOOTSTRAP, str(copy), *args, "-q", "-p", "no:cacheprovider"],
                          cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600)


# Runs in the subprocess: checks that the tests ran on the patched copy's LMGen and never on moshi_patch.
BOOTSTRAP = """
import sys, pytest
copy = sys.argv[1]
code = pytest.main(sys.argv[2:])
import moshi, moshi.models.lm as lm
assert moshi.__file__.startswith(copy), f"moshi imported from {moshi.__file__}, not from {copy}"
assert "moshi_patch" not in sys.modules, "the tests imported moshi_patch"
print("RAN ON", lm.__file__)
sys.exit(code)
"""


def test_hooks_test_passes_on_the_first_pull_request(patched_copies) -> None:
    """The upstream-style test of the hooks, on moshi with the first pull request alone: hooked logits equal
    `LMModel.forward` under teacher forcing through the hooks, and hooks that change nothing leave step()."""
    copy = patched_copies["hooks"]
    result = _run(copy, [str(copy / "tests" / "test_lm_gen.py")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout and f"RAN ON {copy}" in result.stdout


def test_oracles_pass_on_both_pull_requests(patched_copies) -> None:
    copy = patched_copies["both"]
    # The tests of moshi_patch's own step() (which keeps logits when mixed) are skipped there, by name.
    result = _run(copy, [str(TESTS / "test_step_with_logits.py"), "-rs"])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    summary = [line for line in result.stdout.splitlines() if " passed" in line][-1]
    assert "failed" not in summary and "error" not in summary, summary
    skipped = int(summary.split(" skipped")[0].split()[-1]) if " skipped" in summary else 0
    assert int(summary.split(" passed")[0].split()[-1]) >= 45 and skipped <= 6, summary


@pytest.mark.skipif(importlib.util.find_spec("flake8") is None, reason="flake8 is not installed")
def test_flake8_clean_with_upstream_settings(rendered) -> None:
    first, second, _, _ = rendered
    for result in (first, second):
        report = upstream.flake8_report(result)
        assert report.startswith("0 warning(s) before, 0 after on lm.py; 0 on the new files"), report


def test_pyright_is_checked_where_available(patched_copies, tmp_path) -> None:
    """No new pyright error in lm.py with either pull request (run in the package layout, so that moshi's
    relative imports resolve)."""
    pyright = shutil.which("pyright") or str(Path(sys.executable).with_name("pyright"))
    if not Path(pyright).exists():
        pytest.skip("pyright is not installed (pip install pyright; it fetches its Node package at first run)")
    original = tmp_path / "original"
    shutil.copytree(MOSHI_PACKAGE, original / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    counts = []
    for root in (original, patched_copies["hooks"], patched_copies["both"]):
        result = subprocess.run([pyright, "--pythonpath", sys.executable, "moshi/models/lm.py"], cwd=root,
                                capture_output=True, text=True, timeout=600)
        counts.append(result.stdout.count(" - error"))
    assert counts[1] == counts[0] and counts[2] == counts[0], counts


def _modified_upstream(tmp_path: Path, old: str, new: str) -> Path:
    source = INSTALLED_LM.read_text()
    assert source.count(old) >= 1, old
    path = tmp_path / "lm.py"
    path.write_text(source.replace(old, new))
    return path


@pytest.mark.parametrize("old,new,message", [
    ("    def _step(", "    def _step_v2(", r"no method `LMGen._step`"),
    ("import typing as tp\n", "", r"module-level names \['tp'\]"),
    ("    graphed_depth: CUDAGraphed | None\n", "", r"field `_LMGenState.graphed_depth`"),
    ("        self.on_audio_hook = on_audio_hook\n", "", r"no `self.on_audio_hook = on_audio_hook`"),
    ("class LMGen(", "class LMGenerator(", r"no module-level class `LMGen`"),
    ("                depformer_tokens.append(next_token)", "                depformer_tokens += [next_token]",
     r"depformer_tokens.append\(next_token\)"),
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
    _, _, out, _ = rendered
    for folder in ("1-audio-hooks", "2-step-with-logits"):
        with pytest.raises(upstream.UpstreamShapeError, match="already"):
            upstream.render(out / folder / "moshi" / "models" / "lm.py")


def test_blocks_using_names_upstream_lacks_are_refused(tmp_path) -> None:
    patch_source = Path(inspect.getsourcefile(moshi_patch.lm)).read_text()
    anchor = "text_token.copy_(torch.where(forced_text == lm_model.ungenerated_token_id, text_token, forced_text))"
    assert anchor in patch_source
    bad = tmp_path / "lm.py"
    bad.write_text(patch_source.replace(anchor, "_upstream.sample_token(" + anchor + ")"))
    with pytest.raises(ValueError, match="mention `_upstream`"):
        upstream.render(patch_source_path=bad)
    bad.write_text(patch_source.replace(anchor, "sample_tokens(" + anchor + ")"))
    with pytest.raises(ValueError, match=r"does not define or import: \['sample_tokens'\]"):
        upstream.render(patch_source_path=bad)
    bad.write_text(patch_source.replace("\n# upstream-end\n", "\n", 1))  # The module block is not closed.
    with pytest.raises(ValueError, match="inside the block `module`"):
        upstream.render(patch_source_path=bad)


STEP_TOKENS = """
import json, sys, torch
sys.path.insert(0, sys.argv[2])
from moshi.models.lm import LMGen
from helpers.lm_factory import make_lm, random_codes
lm = make_lm(n_q=6, dep_q=3, max_delay=2, context=8)
user = random_codes(lm, 2, 12, seed=11)[:, 1 + lm.dep_q:]
lm_gen = LMGen(lm, use_sampling=False)
if sys.argv[1] == "hooked":
    lm_gen = LMGen(lm, use_sampling=False, on_audio_logits_hook=lambda cb_index, logits: None,
                   on_audio_token_hook=lambda cb_index, token: None)
outs = []
with lm_gen.streaming(2):
    for step in range(user.shape[-1]):
        out = lm_gen.step(user[:, :, step:step + 1])
        if out is not None:
            outs.append(out)
print(json.dumps(torch.cat(outs, 2).tolist()))
"""


@pytest.mark.parametrize("hooked", ["plain", "hooked"])
def test_step_tokens_are_the_same_before_and_after_the_first_pull_request(patched_copies, hooked) -> None:
    env = dict(os.environ, NO_TORCH_COMPILE="1")
    results = []
    for pythonpath in (None, patched_copies["hooks"]):     # the installed moshi, then the patched copy
        run_env = dict(env, PYTHONPATH=str(pythonpath)) if pythonpath else env
        mode = hooked if pythonpath else "plain"
        result = subprocess.run([sys.executable, "-c", STEP_TOKENS, mode, str(TESTS)], env=run_env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        results.append(result.stdout.strip().splitlines()[-1])
    assert results[0] == results[1]
