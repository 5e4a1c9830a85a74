"""Renders the upstream pull request: moshi's own `moshi/models/lm.py` with `LMGen.step_with_logits`.

    python -m moshi_patch.upstream --out DIR [--source LM_PY] [--run-tests]

writes
- `DIR/moshi/models/lm.py`: the whole patched file;
- `DIR/step_with_logits.patch`: its unified diff, paths `a/moshi/models/lm.py` and `b/moshi/models/lm.py`
  (`patch -p1` in the folder that holds the `moshi` package);
- `DIR/PR.md`: title, motivation, API, design, tests and, with `--run-tests`, the result of running the
  oracle tests of `tests/test_step_with_logits.py` against the patched copy of the installed moshi.

One source of truth: the code inserted is the code between the `# upstream-begin: <place>` and
`# upstream-end` markers of `moshi_patch/lm.py`, i.e. the code `moshi_patch.LMGen` runs. The only line
written here is the declaration of the `step_logits` field of `_LMGenState` (the subclass cannot declare a
field on upstream's dataclass, it sets the attribute). The upstream file is read as it is installed (or
from `--source`) and located with `ast`: if it is not the shape this renderer knows (moshi 0.2.13), the
renderer stops and names the missing anchor.
"""
import argparse
import ast
import builtins
import dataclasses
import difflib
import importlib.metadata
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import symtable
import tempfile
import textwrap
from pathlib import Path

SUPPORTED_MOSHI = "0.2.13"
PATCH_PATH = "moshi/models/lm.py"  # Path of the patched file inside the folder that holds `moshi`.
PLACES = ("module", "init_streaming_state", "LMGen")
BEGIN, END = "# upstream-begin:", "# upstream-end"
# Declared on `_LMGenState` so that the attribute `step_with_logits` keeps there is a field of the state.
STATE_FIELD = ("# Buffers of `LMGen.step_with_logits`, see `_StepLogitsState`.",
               "step_logits: _StepLogitsState | None = None")
# Module-level names of moshi/models/lm.py the inserted code relies on (besides what it defines).
REQUIRED_MODULE_NAMES = ("dataclass", "torch", "CUDAGraphed", "sample_token")
# `_step` is reused unchanged: the inserted code relies on it calling these attributes (`self.on_text_hook(...)`,
# `state.graphed_depth(...)`).
REQUIRED_STEP_CALLS = ("on_text_logits_hook", "on_text_hook", "graphed_depth")
ENV_TEST_LMGEN = "MOSHI_PATCH_TEST_LMGEN"  # `upstream` makes the oracle tests use `moshi.models.lm.LMGen`.


class UpstreamShapeError(RuntimeError):
    """The upstream `moshi/models/lm.py` is not the shape the renderer knows (another moshi version)."""


@dataclasses.dataclass
class Rendered:
    """The upstream file before and after the patch, and the diff between them."""

    source_path: Path  # The upstream lm.py rendered from.
    moshi_version: str  # The installed moshi's version, or "from <path>" when rendered from --source.
    original: str
    patched: str
    diff: str  # Unified diff, `a/moshi/models/lm.py` -> `b/moshi/models/lm.py`.
    added: int  # Lines added by the diff.
    removed: int  # Lines removed by the diff (0: the patch only adds).


@dataclasses.dataclass
class TestRun:
    """Result of the oracle tests run against a patched copy of moshi."""

    command: str
    returncode: int
    summary: str  # pytest's last line, e.g. `38 passed, 1 skipped in 200.00s`.
    output: str


def installed_moshi_version() -> str:
    try:
        return importlib.metadata.version("moshi")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def installed_lm_path() -> Path:
    """Path of the installed `moshi/models/lm.py` (found without importing it)."""
    spec = importlib.util.find_spec("moshi")
    if spec is None or spec.origin is None:
        raise UpstreamShapeError("moshi is not installed: `pip install moshi==%s`." % SUPPORTED_MOSHI)
    path = Path(spec.origin).parent / "models" / "lm.py"
    if not path.is_file():
        raise UpstreamShapeError(f"{path} does not exist: the installed moshi {installed_moshi_version()} "
                                 f"has no moshi/models/lm.py (the renderer supports moshi {SUPPORTED_MOSHI}).")
    return path


def extract_blocks(source: str) -> dict[str, list[str]]:
    """The marked blocks of `moshi_patch/lm.py`, by place, dedented to column 0 (marker lines excluded)."""
    blocks: dict[str, list[str]] = {}
    place: str | None = None
    lines: list[str] = []
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith(BEGIN):
            if place is not None:
                raise ValueError(f"line {number}: `{BEGIN}` inside the block `{place}` (missing `{END}`).")
            place = stripped[len(BEGIN):].strip()
            if place not in PLACES:
                raise ValueError(f"line {number}: unknown place `{place}`, expected one of {PLACES}.")
            if place in blocks:
                raise ValueError(f"line {number}: second block for place `{place}`.")
            lines = []
        elif stripped == END:
            if place is None:
                raise ValueError(f"line {number}: `{END}` without `{BEGIN} <place>`.")
            blocks[place] = textwrap.dedent("\n".join(lines)).split("\n")
            place = None
        elif place is not None:
            lines.append(line)
    if place is not None:
        raise ValueError(f"block `{place}` is not closed by `{END}`.")
    missing = [p for p in PLACES if p not in blocks]
    if missing:
        raise ValueError(f"no `{BEGIN} <place>` block for {missing}.")
    return blocks


def _indent(lines: list[str], column: int) -> list[str]:
    return [" " * column + line if line.strip() else "" for line in lines]


def _shape_error(what: str, source_path: Path) -> UpstreamShapeError:
    return UpstreamShapeError(
        f"{source_path}: {what}. The renderer supports moshi {SUPPORTED_MOSHI} (installed: moshi "
        f"{installed_moshi_version()}); update moshi_patch/upstream.py for this version of LMGen.")


def _class(tree: ast.Module, name: str, source_path: Path) -> ast.ClassDef:
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise _shape_error(f"anchor missing: no module-level class `{name}`", source_path)


def _method(cls: ast.ClassDef, name: str, source_path: Path) -> ast.FunctionDef:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise _shape_error(f"anchor missing: no method `{cls.name}.{name}`", source_path)


def _module_names(tree: ast.Module) -> set[str]:
    """Names bound at module level: imports, definitions, assignments."""
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def undefined_globals(source: str, filename: str = PATCH_PATH) -> set[str]:
    """Global names that some scope of `source` reads but that neither the module nor builtins define."""
    top = symtable.symtable(source, filename, "exec")
    defined = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    defined |= set(dir(builtins))
    undefined = {s.get_name() for s in top.get_symbols() if s.is_referenced()} - defined

    def visit(table: symtable.SymbolTable) -> None:
        for child in table.get_children():
            for s in child.get_symbols():
                if s.is_global() and s.is_referenced() and s.get_name() not in defined:
                    undefined.add(s.get_name())
            visit(child)

    visit(top)
    return {name for name in undefined if not (name.startswith("__") and name.endswith("__"))}


def _locate(tree: ast.Module, source_path: Path) -> dict[str, tuple[int, int]]:
    """Where each block goes in upstream's lm.py: place -> (insert before 0-based line index, indent)."""
    missing = [n for n in REQUIRED_MODULE_NAMES if n not in _module_names(tree)]
    if missing:
        raise _shape_error(f"anchor missing: module-level names {missing} (imports used by step_with_logits)",
                           source_path)
    state_cls = _class(tree, "_LMGenState", source_path)
    if not any(isinstance(d, ast.Name) and d.id == "dataclass" for d in state_cls.decorator_list):
        raise _shape_error("anchor missing: `_LMGenState` is not decorated by `@dataclass`", source_path)
    fields = [n for n in state_cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    field_names = [f.target.id for f in fields]
    for name in ("graphed_depth", "offsets"):
        if name not in field_names:
            raise _shape_error(f"anchor missing: field `_LMGenState.{name}`", source_path)
    if "step_logits" in field_names:
        raise _shape_error("`_LMGenState` already has a field `step_logits`: this moshi seems to contain "
                           "step_with_logits already", source_path)
    last_field = fields[-1]

    lm_gen = _class(tree, "LMGen", source_path)
    for name in ("step_with_logits", "_init_step_logits_state"):
        if any(isinstance(n, ast.FunctionDef) and n.name == name for n in lm_gen.body):
            raise _shape_error(f"`LMGen.{name}` already exists: this moshi seems to contain step_with_logits "
                               "already", source_path)
    step = _method(lm_gen, "_step", source_path)
    _method(lm_gen, "step", source_path)
    _method(lm_gen, "depformer_step", source_path)
    called = {n.func.attr for n in ast.walk(step) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    missing = [a for a in REQUIRED_STEP_CALLS if a not in called]
    if missing:
        raise _shape_error(f"anchor missing: `LMGen._step` does not call {missing} (the hooks and the "
                           "depformer slot step_with_logits relies on)", source_path)

    init = _method(lm_gen, "_init_streaming_state", source_path)
    last = init.body[-1]
    if not (isinstance(last, ast.Return) and isinstance(last.value, ast.Name) and last.value.id == "state"):
        raise _shape_error("anchor missing: `LMGen._init_streaming_state` does not end with `return state`",
                           source_path)
    built = [n for n in init.body if isinstance(n, ast.Assign) and len(n.targets) == 1
             and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "state"
             and isinstance(n.value, ast.Call) and isinstance(n.value.func, ast.Name)
             and n.value.func.id == "_LMGenState"]
    if len(built) != 1:
        raise _shape_error("anchor missing: `LMGen._init_streaming_state` has no single "
                           "`state = _LMGenState(...)`", source_path)
    first_line = min([d.lineno for d in state_cls.decorator_list] + [state_cls.lineno])
    assert built[0].end_lineno is not None and lm_gen.end_lineno is not None
    assert last_field.end_lineno is not None
    return {
        # Module level, right before `_LMGenState`, which declares a field of type `_StepLogitsState`.
        "module": (first_line - 1, 0),
        "state_field": (last_field.end_lineno, last_field.col_offset),
        # Right after the state is built: the rings are per batch item, and the `batch_size` of this
        # method is doubled just below when CFG is on.
        "init_streaming_state": (built[0].end_lineno, built[0].col_offset),
        # At the end of the class body, after `depformer_step`.
        "LMGen": (lm_gen.end_lineno, lm_gen.body[0].col_offset),
    }


def _diff(original: str, patched: str) -> tuple[str, int, int]:
    lines = list(difflib.unified_diff(original.splitlines(keepends=True), patched.splitlines(keepends=True),
                                      fromfile="a/" + PATCH_PATH, tofile="b/" + PATCH_PATH))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    return "".join(lines), added, removed


def render(source_path: Path | str | None = None, patch_source_path: Path | str | None = None) -> Rendered:
    """Inserts the marked blocks of `moshi_patch/lm.py` into upstream's `moshi/models/lm.py`.

    Args:
        source_path: the upstream lm.py to patch; default: the installed `moshi/models/lm.py`.
        patch_source_path: the file holding the marked blocks; default: `moshi_patch/lm.py`.
    Raises:
        UpstreamShapeError: the upstream file lacks an anchor the inserted code relies on.
    """
    if source_path is None:
        source_path, moshi_version = installed_lm_path(), installed_moshi_version()
    else:  # Another checkout: its version is not known from here, only where it comes from.
        source_path = Path(source_path)
        moshi_version = f"from {source_path}"
    if patch_source_path is None:
        from . import lm as patch_lm  # The module whose LMGen runs this very code.
        patch_source_path = inspect.getsourcefile(patch_lm)
    blocks = extract_blocks(Path(patch_source_path).read_text())
    original = source_path.read_text()
    if not original.endswith("\n"):
        original += "\n"  # difflib writes no `\ No newline at end of file` marker.
    try:
        tree = ast.parse(original, str(source_path))
    except SyntaxError as error:
        raise _shape_error(f"does not parse ({error})", source_path) from error
    places = _locate(tree, source_path)

    inserts = {
        "module": blocks["module"] + ["", ""],
        "state_field": list(STATE_FIELD),
        "init_streaming_state": blocks["init_streaming_state"],
        "LMGen": [""] + blocks["LMGen"],
    }
    lines = original.split("\n")
    # From the bottom up, so that the line numbers of the places above stay valid.
    for place in sorted(places, key=lambda p: places[p][0], reverse=True):
        index, column = places[place]
        lines[index:index] = _indent(inserts[place], column)
    patched = "\n".join(lines)

    inserted = "\n".join("\n".join(block) for block in inserts.values())
    for foreign in ("moshi_patch", "_upstream"):
        if foreign in inserted:
            raise ValueError(f"the marked blocks of {patch_source_path} mention `{foreign}`: the upstream file "
                             "cannot import moshi_patch.")
    compile(patched, PATCH_PATH, "exec")
    undefined = undefined_globals(patched)
    if undefined:
        raise ValueError(f"the rendered {PATCH_PATH} reads names it does not define or import: "
                         f"{sorted(undefined)} (from the marked blocks of {patch_source_path}).")
    diff, added, removed = _diff(original, patched)
    return Rendered(source_path, moshi_version, original, patched, diff, added, removed)


def repo_tests_dir() -> Path:
    """`tests/` of the moshi-patch checkout this module runs from (the oracle tests are not installed)."""
    tests = Path(__file__).resolve().parent.parent / "tests"
    if not (tests / "test_step_with_logits.py").is_file():
        raise FileNotFoundError(f"{tests / 'test_step_with_logits.py'} not found: --run-tests needs a "
                                "moshi-patch checkout (pip install -e .), not an installed wheel.")
    return tests


def patched_moshi_copy(patch_file: Path, dest: Path) -> Path:
    """Copies the installed `moshi` package into `dest` and applies `patch_file` with `patch -p1`.

    Returns `dest`, to put first on PYTHONPATH so that `import moshi` is the patched copy.
    """
    patch_bin = shutil.which("patch")
    if patch_bin is None:
        raise FileNotFoundError("`patch` (GNU patch) is not installed: cannot apply the diff to a copy of moshi.")
    package = installed_lm_path().parent.parent
    shutil.copytree(package, dest / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run([patch_bin, "-p1", "--batch", "--forward", "-i", str(patch_file.resolve())],
                            cwd=dest, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{patch_file} does not apply to moshi {installed_moshi_version()}:\n"
                           f"{result.stdout}{result.stderr}")
    return dest


# Run in the subprocess: the oracle tests must have used the patched copy, and never moshi_patch. moshi is
# imported by the tests, after tests/conftest.py set up the environment.
_BOOTSTRAP = """
import sys, pytest
copy = sys.argv[1]
code = pytest.main(sys.argv[2:])
import moshi, moshi.models.lm as lm
if not moshi.__file__.startswith(copy):
    sys.exit(f"moshi imported from {moshi.__file__}, not from the patched copy {copy}")
if "moshi_patch" in sys.modules:
    sys.exit("the oracle tests imported moshi_patch: they did not test the patched moshi alone")
module = sys.modules.get("test_step_with_logits")
if module is not None and module.LMGen is not lm.LMGen:
    sys.exit("the oracle tests did not use moshi.models.lm.LMGen")
print(f"oracle tests ran against {lm.__file__}")
sys.exit(code)
"""


def run_oracle_tests(patch_file: Path, select: str | None = None) -> TestRun:
    """Runs `tests/test_step_with_logits.py` against the installed moshi with `patch_file` applied."""
    tests = repo_tests_dir()
    with tempfile.TemporaryDirectory(prefix="moshi-upstream-") as tmp:
        copy = patched_moshi_copy(patch_file, Path(tmp))
        args = [str(tests / "test_step_with_logits.py"), "-q", "-rs", "-p", "no:cacheprovider"]
        if select:
            args += ["-k", select]
        env = dict(os.environ, PYTHONPATH=str(copy), **{ENV_TEST_LMGEN: "upstream"})
        result = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(copy), *args], cwd=tests.parent,
                                env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    pytest_lines = [line for line in result.stdout.splitlines() if " in " in line and
                    any(word in line for word in ("passed", "failed", "error", "skipped"))]
    summary = pytest_lines[-1].strip("= ") if pytest_lines else "no pytest summary (see output)"
    skipped = [line.split(": ", 1)[-1] for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    if skipped:
        summary += " (skipped: " + "; ".join(skipped) + ")"
    select_arg = f" -k '{select}'" if select else ""
    command = (f"{ENV_TEST_LMGEN}=upstream PYTHONPATH=<patched copy of moshi {installed_moshi_version()}> "
               f"python -m pytest -q tests/test_step_with_logits.py{select_arg}")
    return TestRun(command, result.returncode, summary, output)


def _step_with_logits_header(patched: str) -> str:
    """The `def step_with_logits(...)` lines of the patched file, up to the docstring."""
    lm_gen = next(n for n in ast.parse(patched).body if isinstance(n, ast.ClassDef) and n.name == "LMGen")
    fn = next(n for n in lm_gen.body if isinstance(n, ast.FunctionDef) and n.name == "step_with_logits")
    lines = patched.split("\n")[fn.lineno - 1:fn.body[0].lineno - 1]
    return textwrap.dedent("\n".join(lines))


def _class_source(patched: str, name: str) -> str:
    tree = ast.parse(patched)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return "\n".join(patched.split("\n")[start - 1:node.end_lineno])


def pr_markdown(rendered: Rendered, test_run: TestRun | None) -> str:
    """The pull request description: title, motivation, API, design, tests and their result."""
    if test_run is None:
        result = ("Not run by this rendering. To run them from a moshi-patch checkout:\n\n"
                  "```\npython -m moshi_patch.upstream --out DIR --run-tests\n```\n\n"
                  "which copies the installed moshi, applies `step_with_logits.patch` with `patch -p1`, and runs "
                  f"`tests/test_step_with_logits.py` with `{ENV_TEST_LMGEN}=upstream` (the tests then use "
                  "`moshi.models.lm.LMGen` of the patched copy, and never import moshi_patch).")
    else:
        status = "PASSED" if test_run.returncode == 0 else f"FAILED (exit code {test_run.returncode})"
        result = (f"{status}: `{test_run.summary}` (CPU, torch "
                  f"{_torch_version()}, Python {sys.version.split()[0]}).\n\nCommand: `{test_run.command}`")
    return f"""# LMGen.step_with_logits: the logits of each streaming step

## Motivation

`LMGen.step()` streams one 12.5 Hz frame at a time and returns the sampled tokens only. Measuring the loss
*of the streaming model* (per frame and per codebook, over hour-long audio, e.g. to see whether models with
stateful layers such as Test-Time-Training keep improving as the context grows) needs the logits those tokens
came from. The usual workaround, a separate `LMModel.forward` pass, does not see the streaming state (KV
cache, recurrent state), has to re-implement the per-codebook delays, and cannot feed the model's own text
predictions. `step_with_logits` returns the logits from the streaming state itself, with the tokens
teacher forced where the caller wants.

## API

```python
{_class_source(rendered.patched, "StepLogits")}
```

```python
{_step_with_logits_header(rendered.patched)}
```

- `input_tokens`: the user stream `[B, n_q - dep_q, 1]`, as for `step()`.
- `forced_tokens`: optional `[B, 1 + dep_q, 1]`, frame `s` of the model's own streams (text, then its
  audio codebooks), *undelayed* as the codes of `LMModel.forward`. `-2` (`ungenerated_token_id`) leaves the
  token to the model (argmax with `use_sampling=False`, else sampled exactly as `step()` samples); any other
  value is teacher forced (`-1` is the zero token). Each stream is scheduled by its delay internally.
- Frame convention: at step `s`, stream `k` produces its frame `s - delays[k]`; the method returns `None`
  exactly when `step()` does (the first `max_delay` steps), then the tokens and logits of frame
  `s - max_delay`. To reproduce `LMModel.forward(codes)`, pass `codes[:, dep_q + 1:, s - 1]` as the user
  stream and `codes[:, :1 + dep_q, s]` as forced tokens at step `s`, then `max_delay` more steps to flush.
- The logits are taken after CFG mixing, keep the model's dtype, and are NaN for a batch item masked by
  `set_exec_mask`.

## Design

- The patch only adds ({rendered.added} lines added, {rendered.removed} removed): `step()`, `_step()` and
  every existing line are unchanged; `_init_streaming_state` gains the line creating the buffers of
  `step_with_logits`, `_LMGenState` a field holding them. `step_with_logits` runs `_step` as is: its
  `on_text_logits_hook` / `on_text_hook` record the text logits and force the text token, and a depformer
  function swapped into the `graphed_depth` slot for the step forces the audio tokens and keeps their logits.
- The delays are handled by two small rings of `max_delay + 1` frames (forced tokens, logits), kept in the
  streaming state (`_StepLogitsState`, field `_LMGenState.step_logits`): `reset_streaming` and
  `set_exec_mask` keep working per batch item.
- When every audio token of a step is forced, the depformer inputs are all known: one parallel
  `forward_depformer_training` call replaces `dep_q` sequential ones, with the same logits
  (`LMGen.parallel_forced_depformer = False` turns it off).
- CUDA graphs: both depformer functions are wrapped in `CUDAGraphed` like `depformer_step`, read their forced
  tokens from and write their logits to static buffers, and the logits returned are copies, valid after the
  next step. No branch on tensor values inside a graphed function.
- Inputs are checked: a wrong shape, dtype or out-of-range forced token raises an error naming the argument,
  what was expected and what came.

## Tests

Oracles, on small random models (CPU, float32), from `tests/test_step_with_logits.py` of moshi-patch:
1. teacher-forced equivalence: streaming random codes with every model stream forced gives the logits of
   `LMModel.forward` on the same codes within 1e-4 (KV context shorter and longer than the sequence, max
   delay 1 and 2, batch 2, depformer with `multi_linear` and a `weights_per_step_schedule`, a model without
   depformer, the parallel and the sequential depformer path);
2. replay equivalence: tokens generated with nothing forced (greedy and sampled), fed to
   `LMModel.forward`, reproduce the returned logits; same with partial forcing;
3. parity with `step()`: with nothing forced, the tokens are those of `step()` (greedy, and sampled under
   the same seed), also when both methods are mixed in one stream;
4. `set_exec_mask`, `reset_streaming`, CFG mixing (checked by hand), and the error messages.

## Result of running them

Against moshi {rendered.moshi_version} with this patch applied: {result}
"""


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write(rendered: Rendered, out: Path, test_run: TestRun | None = None) -> list[Path]:
    """Writes the patched lm.py, the patch and PR.md under `out`; returns their paths."""
    lm_path = out / PATCH_PATH
    lm_path.parent.mkdir(parents=True, exist_ok=True)
    lm_path.write_text(rendered.patched)
    patch_path = out / "step_with_logits.patch"
    patch_path.write_text(rendered.diff)
    pr_path = out / "PR.md"
    pr_path.write_text(pr_markdown(rendered, test_run))
    return [lm_path, patch_path, pr_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_patch.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write moshi/models/lm.py, "
                        "step_with_logits.patch and PR.md into")
    parser.add_argument("--source", type=Path, default=None,
                        help="upstream moshi/models/lm.py to patch (default: the installed one)")
    parser.add_argument("--run-tests", action="store_true", help="apply the patch to a copy of the installed "
                        "moshi, run the oracle tests against it and put the result in PR.md")
    parser.add_argument("-k", dest="select", default=None, help="with --run-tests: pytest -k expression")
    args = parser.parse_args(argv)
    if args.run_tests and args.source is not None:
        parser.error("--run-tests applies the patch to the installed moshi: do not combine it with --source")
    try:
        rendered = render(args.source)
    except UpstreamShapeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write(rendered, args.out)
    print(f"rendered from {rendered.source_path} (moshi {rendered.moshi_version}): "
          f"+{rendered.added} -{rendered.removed} lines")
    test_run = None
    if args.run_tests:
        test_run = run_oracle_tests(paths[1], args.select)
        print(test_run.output if test_run.returncode else test_run.summary)
        write(rendered, args.out, test_run)
    for path in paths:
        print(f"wrote {path}")
    return 0 if test_run is None or test_run.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
