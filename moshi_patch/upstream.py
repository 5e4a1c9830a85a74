"""Renders the two upstream pull requests, the second on top of the first.

    python -m moshi_patch.upstream --out DIR [--source LM_PY] [--run-tests]

1. `DIR/1-audio-hooks/`: the minimal change, audio hooks in `LMGen.depformer_step`, taken by the constructor
   like upstream's `on_text_logits_hook` (`moshi_patch.hooks`), with a test in upstream's style
   (`moshi/tests/test_lm_gen.py`);
2. `DIR/2-step-with-logits/`: `LMGen.step_with_logits`, rendered on top of the first (it does not need it:
   it lends `_step` its own depformer step and text hooks for its calls only).
Each folder holds the patched `moshi/models/lm.py`, the diff from the repository root (`<name>.patch`, paths
`moshi/moshi/models/lm.py`: `git apply` or `patch -p1` in a kyutai-labs/moshi checkout), the same diff
relative to the Python package's folder (`<name>.package.patch`: `patch -p1` in the folder that holds the
`moshi` package, e.g. site-packages) and `PR.md` (the pull-request template's checklist, motivation, API,
and with `--run-tests` the result of the tests run against a patched copy of the installed moshi).

The hooks are the text of `moshi_patch.hooks`, inserted into a copy of moshi's lm.py here only (moshi_patch
never changes the installed moshi). The code of the second pull request is the code between the
`# upstream-begin: <place>` and `# upstream-end` markers of `moshi_patch/lm.py`, i.e. the code
`moshi_patch.lm.StepLogitsLMGen` runs. The only line written here is the declaration of the `step_logits`
field of `_LMGenState`. The upstream file is read as installed (or from `--source`) and located with `ast`:
if it is not the shape this renderer knows (moshi 0.2.13), the renderer stops and names the missing anchor.
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

from . import hooks

SUPPORTED_MOSHI = "0.2.13"
PATCH_PATH = "moshi/models/lm.py"  # Path of the patched file inside the folder that holds `moshi`.
REPO_PREFIX = "moshi/"             # kyutai-labs/moshi keeps the Python package in `moshi/moshi/`.
UPSTREAM_TEST = "tests/test_lm_gen.py"   # The first pull request's test, in the folder that holds `moshi`.
HOOKS_NAME, STEP_LOGITS_NAME = "audio_hooks", "step_with_logits"
PR_FOLDERS = {HOOKS_NAME: "1-audio-hooks", STEP_LOGITS_NAME: "2-step-with-logits"}
PLACES = ("module", "LMGen")
BEGIN, END = "# upstream-begin:", "# upstream-end"
# Declared on `_LMGenState` so that the attribute `step_with_logits` keeps there is a field of the state.
STATE_FIELD = ("# What `LMGen.step_with_logits` keeps for the stream, made by its first call.",
               "step_logits: _StepLogitsState | None = None")
# Module-level names of moshi/models/lm.py the inserted code relies on (besides what it defines).
REQUIRED_MODULE_NAMES = ("dataclass", "torch", "tp", "CUDAGraphed", "sample_token")
# `_step` is reused unchanged: the inserted code relies on it calling these hooks (`self.on_text_hook(...)`)
# and the depformer of the state (`state.graphed_depth(...)`), which it lends for its calls.
REQUIRED_STEP_CALLS = ("on_text_logits_hook", "on_text_hook", "graphed_depth")
ENV_TEST_LMGEN = "MOSHI_PATCH_TEST_LMGEN"  # `upstream` makes the oracle tests use `moshi.models.lm.LMGen`.


class UpstreamShapeError(RuntimeError):
    """The upstream `moshi/models/lm.py` is not the shape the renderer knows (another moshi version)."""


@dataclasses.dataclass
class Rendered:
    """The upstream file before and after one pull request, and the diffs between them."""

    source_path: Path  # The upstream lm.py rendered from.
    moshi_version: str  # The installed moshi's version, or "from <path>" when rendered from --source.
    original: str
    patched: str
    diff: str  # Unified diff from the folder that holds `moshi`: `a/moshi/models/lm.py` (+ new files).
    added: int  # Lines added to lm.py.
    removed: int  # Lines removed from lm.py (0: the patch only adds).
    name: str = STEP_LOGITS_NAME
    new_files: dict[str, str] = dataclasses.field(default_factory=dict)   # path from the package folder -> text

    @property
    def repo_diff(self) -> str:
        """The diff with paths from the root of a kyutai-labs/moshi checkout (`moshi/moshi/models/lm.py`)."""
        return _diff(self.original, self.patched, self.new_files, REPO_PREFIX)[0]


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
    first_line = min([d.lineno for d in state_cls.decorator_list] + [state_cls.lineno])
    assert lm_gen.end_lineno is not None and last_field.end_lineno is not None
    return {
        # Module level, right before `_LMGenState`, which declares a field of type `_StepLogitsState`.
        "module": (first_line - 1, 0),
        "state_field": (last_field.end_lineno, last_field.col_offset),
        # At the end of the class body, after `depformer_step`.
        "LMGen": (lm_gen.end_lineno, lm_gen.body[0].col_offset),
    }


def _diff(original: str, patched: str, new_files: dict[str, str] | None = None,
          prefix: str = "") -> tuple[str, int, int]:
    """Unified diff of lm.py (paths `a/<prefix>moshi/models/lm.py`), then of each new file; the lines added
    to and removed from lm.py."""
    path = prefix + PATCH_PATH
    lines = list(difflib.unified_diff(original.splitlines(keepends=True), patched.splitlines(keepends=True),
                                      fromfile="a/" + path, tofile="b/" + path))
    added = sum(1 for line in lines if line.startswith("+") and not line.startswith("+++"))
    removed = sum(1 for line in lines if line.startswith("-") and not line.startswith("---"))
    for name, text in (new_files or {}).items():
        lines += difflib.unified_diff([], text.splitlines(keepends=True), fromfile="/dev/null",
                                      tofile="b/" + prefix + name)
    return "".join(lines), added, removed


def upstream_test_source() -> str:
    """The first pull request's test file, `moshi/tests/test_lm_gen.py` in upstream's layout."""
    return (Path(__file__).parent / "pr_tests" / "test_lm_gen.py").read_text()


def _read_upstream(source_path: Path | str | None) -> tuple[Path, str, str]:
    if source_path is None:
        path, moshi_version = installed_lm_path(), installed_moshi_version()
    else:  # Another checkout: its version is not known from here, only where it comes from.
        path = Path(source_path)
        moshi_version = f"from {path}"
    original = path.read_text()
    if not original.endswith("\n"):
        original += "\n"  # difflib writes no `\\ No newline at end of file` marker.
    return path, moshi_version, original


def render_hooks(source_path: Path | str | None = None) -> Rendered:
    """The first pull request: `moshi_patch.hooks` inserted into a copy of upstream's `moshi/models/lm.py`.

    Raises:
        UpstreamShapeError: the upstream file lacks an anchor (another moshi), or has the hooks already.
    """
    path, moshi_version, original = _read_upstream(source_path)
    tree = ast.parse(original, str(path))
    lm_gen = _class(tree, "LMGen", path)
    init = _method(lm_gen, "__init__", path)
    if any(arg.arg == "on_audio_token_hook" for arg in init.args.args):
        raise _shape_error("`LMGen.__init__` takes `on_audio_token_hook` already: this moshi has the audio hooks",
                           path)
    try:
        places = hooks.insertions(original)
    except hooks.HookAnchorError as error:
        raise _shape_error(f"anchor missing: {error}", path) from error
    patched = hooks.insert(original, places)
    compile(patched, PATCH_PATH, "exec")
    new_files = {UPSTREAM_TEST: upstream_test_source()}
    diff, added, removed = _diff(original, patched, new_files)
    return Rendered(path, moshi_version, original, patched, diff, added, removed, HOOKS_NAME, new_files)


def render(source_path: Path | str | None = None, patch_source_path: Path | str | None = None) -> Rendered:
    """The second pull request: the marked blocks of `moshi_patch/lm.py` inserted into upstream's
    `moshi/models/lm.py` with the first pull request (`render_hooks`) applied.

    Args:
        source_path: the upstream lm.py to patch; default: the installed `moshi/models/lm.py`.
        patch_source_path: the file holding the marked blocks; default: `moshi_patch/lm.py`.
    Raises:
        UpstreamShapeError: the upstream file lacks an anchor the inserted code relies on.
    """
    hooked = render_hooks(source_path)
    source_path, moshi_version, original = hooked.source_path, hooked.moshi_version, hooked.patched
    if patch_source_path is None:
        from . import lm as patch_lm  # The module whose LMGen runs this very code.
        patch_source_path = inspect.getsourcefile(patch_lm)
    blocks = extract_blocks(Path(patch_source_path).read_text())
    try:
        tree = ast.parse(original, str(source_path))
    except SyntaxError as error:
        raise _shape_error(f"does not parse ({error})", source_path) from error
    places = _locate(tree, source_path)

    inserts = {
        "module": blocks["module"] + ["", ""],
        "state_field": list(STATE_FIELD),
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


def patched_moshi_copy(patch_files: list[Path], dest: Path) -> Path:
    """Copies the installed `moshi` package into `dest` and applies `patch_files` in order with `patch -p1`
    (their package-relative form).

    Returns `dest`, to put first on PYTHONPATH so that `import moshi` is the patched copy.
    """
    patch_bin = shutil.which("patch")
    if patch_bin is None:
        raise FileNotFoundError("`patch` (GNU patch) is not installed: cannot apply the diff to a copy of moshi.")
    package = installed_lm_path().parent.parent
    shutil.copytree(package, dest / "moshi", ignore=shutil.ignore_patterns("__pycache__"))
    for patch_file in patch_files:
        result = subprocess.run([patch_bin, "-p1", "--batch", "--forward", "-i", str(patch_file.resolve())],
                                cwd=dest, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{patch_file} does not apply to moshi {installed_moshi_version()}:\n"
                               f"{result.stdout}{result.stderr}")
    return dest


# Run in the subprocess: the tests must have used the patched copy, and never moshi_patch. moshi is imported
# by the tests, after tests/conftest.py set up the environment.
_BOOTSTRAP = """
import sys, pytest
copy = sys.argv[1]
code = pytest.main(sys.argv[2:])
import moshi, moshi.models.lm as lm
if not moshi.__file__.startswith(copy):
    sys.exit(f"moshi imported from {moshi.__file__}, not from the patched copy {copy}")
if "moshi_patch" in sys.modules:
    sys.exit("the tests imported moshi_patch: they did not test the patched moshi alone")
module = sys.modules.get("test_step_with_logits")
if module is not None and module.LMGen is not lm.LMGen:
    sys.exit("the oracle tests did not use moshi.models.lm.LMGen")
print(f"tests ran against {lm.__file__}")
sys.exit(code)
"""


def run_tests(patch_files: list[Path], tests: list[str], select: str | None = None) -> TestRun:
    """Runs `tests` (paths from the moshi-patch checkout, or from the patched copy's folder for the upstream
    test) against the installed moshi with `patch_files` applied."""
    repo = repo_tests_dir().parent
    with tempfile.TemporaryDirectory(prefix="moshi-upstream-") as tmp:
        copy = patched_moshi_copy(patch_files, Path(tmp))
        paths = [str(copy / t) if (copy / t).exists() else str(repo / t) for t in tests]
        args = [*paths, "-q", "-rs", "-p", "no:cacheprovider"] + (["-k", select] if select else [])
        env = dict(os.environ, PYTHONPATH=str(copy), NO_TORCH_COMPILE="1", **{ENV_TEST_LMGEN: "upstream"})
        result = subprocess.run([sys.executable, "-c", _BOOTSTRAP, str(copy), *args], cwd=repo,
                                env=env, capture_output=True, text=True)
    output = result.stdout + result.stderr
    pytest_lines = [line for line in result.stdout.splitlines() if " in " in line and
                    any(word in line for word in ("passed", "failed", "error", "skipped"))]
    summary = pytest_lines[-1].strip("= ") if pytest_lines else "no pytest summary (see output)"
    skipped = [line.split(": ", 1)[-1] for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    if skipped:
        summary += " (skipped: " + "; ".join(skipped) + ")"
    select_arg = f" -k '{select}'" if select else ""
    command = (f"{ENV_TEST_LMGEN}=upstream PYTHONPATH=<copy of moshi {installed_moshi_version()} + "
               f"{', '.join(p.name for p in patch_files)}> python -m pytest -q {' '.join(tests)}{select_arg}")
    return TestRun(command, result.returncode, summary, output)


def run_oracle_tests(patch_files: list[Path], select: str | None = None) -> TestRun:
    """The oracle tests of `step_with_logits` against the installed moshi with both pull requests applied."""
    return run_tests(patch_files, ["tests/test_step_with_logits.py"], select)


def run_upstream_test(hooks_patch: Path) -> TestRun:
    """The first pull request's own test, against the installed moshi with it applied."""
    return run_tests([hooks_patch], [UPSTREAM_TEST])


def flake8_report(rendered: Rendered) -> str:
    """flake8 with upstream's settings (moshi/setup.cfg: max line 120, E203 and E704 ignored) on the file
    before and after, or why it could not run."""
    if importlib.util.find_spec("flake8") is None:
        return "not run: flake8 is not installed (pip install flake8)"
    counts = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("before.py", rendered.original), ("after.py", rendered.patched),
                           *(("new_" + Path(n).name, t) for n, t in rendered.new_files.items())):
            (Path(tmp) / name).write_text(text)
            result = subprocess.run([sys.executable, "-m", "flake8", "--max-line-length", "120",
                                     "--extend-ignore", "E203,E704", name], cwd=tmp, capture_output=True, text=True)
            counts.append((name, len(result.stdout.splitlines()), result.stdout.strip()))
    before, after = counts[0][1], counts[1][1]
    new = sum(c[1] for c in counts[2:])
    details = "\n".join(c[2] for c in counts[1:] if c[2])
    return (f"{before} warning(s) before, {after} after on lm.py; {new} on the new files"
            + (f":\n{details}" if details and after + new > before else ""))


def _class_source(patched: str, name: str) -> str:
    tree = ast.parse(patched)
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    start = min([d.lineno for d in node.decorator_list] + [node.lineno])
    return "\n".join(patched.split("\n")[start - 1:node.end_lineno])


def _step_with_logits_header(patched: str) -> str:
    """The `def step_with_logits(...)` lines of the patched file, up to the docstring."""
    lm_gen = next(n for n in ast.parse(patched).body if isinstance(n, ast.ClassDef) and n.name == "LMGen")
    fn = next(n for n in lm_gen.body if isinstance(n, ast.FunctionDef) and n.name == "step_with_logits")
    lines = patched.split("\n")[fn.lineno - 1:fn.body[0].lineno - 1]
    return textwrap.dedent("\n".join(lines))


# The pull-request template of kyutai-labs/moshi (.github/PULL_REQUEST_TEMPLATE.md) and the CLA statement of
# its CONTRIBUTING.md, which the submitter completes with their GitHub handle.
CHECKLIST = "\n".join([
    "## Checklist",
    "",
    "(Left for the submitter to tick: this text was rendered by `python -m moshi_patch.upstream`, which runs only "
    "the checks listed under \"Checks run\" below.)",
    "",
    "- [ ] Read CONTRIBUTING.md, and accept the CLA by including the provided snippet. "
    "We will not accept PR without this.",
    "- [ ] Run pre-commit hook.",
    "- [ ] If you changed Rust code, run `cargo check`, `cargo clippy`, `cargo test`. (no Rust code changed)",
    "",
    "> I, {your GitHub handle}, confirm that I have read and understood the terms of the CLA of Kyutai-labs, "
    "as outlined in the repository's CONTRIBUTING.md, and I agree to be bound by these terms.",
    "",
    "(The submitter replaces `{your GitHub handle}` with theirs, if they accept the CLA.)",
    ""])


def _result(test_run: TestRun | None, what: str) -> str:
    if test_run is None:
        return (f"{what}: not run by this rendering (`python -m moshi_patch.upstream --out DIR --run-tests` "
                "applies the patches to a copy of the installed moshi and runs them).")
    status = "PASSED" if test_run.returncode == 0 else f"FAILED (exit code {test_run.returncode})"
    return (f"{what}: {status}, `{test_run.summary}` (CPU, torch {_torch_version()}, Python "
            f"{sys.version.split()[0]}). Command: `{test_run.command}`")


def _checks_run(lint: str, test_run: TestRun | None, tests: str) -> str:
    return "\n".join([
        "## Checks run",
        "",
        f"- flake8 with moshi/setup.cfg's settings (max line 120, E203 and E704 ignored): {lint}.",
        f"- {_result(test_run, tests)}",
        "- Not run: the pre-commit hooks of the repository, pyright, GPU (CUDA graph) tests.",
        ""])


def hooks_pr_markdown(rendered: Rendered, test_run: TestRun | None, lint: str) -> str:
    return f"""# LMGen: audio hooks in depformer_step (on_audio_logits_hook, on_audio_token_hook)

{CHECKLIST}
## PR Description

`LMGen` takes `on_text_logits_hook` (the text logits of each step) and `on_text_hook` (the text token) as
constructor arguments, but gives nothing between the depth transformer's codebooks. This adds the same two
things for the audio codebooks, as two more constructor arguments, called by `depformer_step` for each codebook
`cb_index` in order:

```python
{hooks.PARAMETERS.rstrip()}
```

- `on_audio_logits_hook(cb_index, logits)`: the logits `[B, 1, 1, card]` the codebook's token is sampled from
  (after CFG); like `on_text_logits_hook`, it may edit them in place.
- `on_audio_token_hook(cb_index, token)`: the token `[B]`, which the hook may change in place: the next
  codebook is conditioned on it, and it is the token the step returns.

Use: the loss of the *streaming* model, e.g. of a model with stateful layers (Test-Time-Training) whose state
only exists while streaming: with `on_text_hook` and `on_audio_token_hook` a caller teacher-forces every
stream, and `on_audio_logits_hook` gives the logits each token is scored from, from the streaming state
itself (KV cache, recurrent state), with no second forward pass. The test added here checks that, on a small
seeded model, the logits seen through the hooks under teacher forcing equal `LMModel.forward`'s (1e-4), and
that hooks that change nothing leave the tokens of `step()` unchanged.

- Size: +{rendered.added} -{rendered.removed} lines in `moshi/models/lm.py`, new parameters last (positional
  callers are not affected); unset, the hooks cost one attribute test per codebook. Under CUDA graphs they are
  captured with `depformer_step`, like the rest of it.

{_checks_run(lint, test_run, "Tests (`moshi/tests/test_lm_gen.py`)")}"""


def pr_markdown(rendered: Rendered, test_run: TestRun | None, lint: str = "not run") -> str:
    """The second pull request's description: checklist, motivation, API, design, checks run and their result."""
    return f"""# LMGen.step_with_logits: the logits of each streaming step

{CHECKLIST}
## PR Description

`LMGen.step()` streams one 12.5 Hz frame at a time and returns the sampled tokens only. Measuring the loss
*of the streaming model* (per frame and per codebook, over hour-long audio, e.g. to see whether models with
stateful layers such as Test-Time-Training keep improving as the context grows) needs the logits those tokens
came from, from the streaming state (KV cache, recurrent state), with the model's streams teacher forced by
frame while the method handles the per-codebook delays. (Rendered on top of the audio hooks pull request; it
does not use them.)

```python
{_class_source(rendered.patched, "StepLogits")}
```

```python
{_step_with_logits_header(rendered.patched)}
```

- `forced_tokens`: optional `[B, 1 + dep_q, 1]`, frame `s` of the model's own streams, undelayed as the codes
  of `LMModel.forward`; `-2` leaves a token to the model (argmax, or sampled as `step()` samples). Returns
  `None` exactly when `step()` does, then the tokens and logits of frame `s - max_delay`. The logits are those
  the tokens were chosen from: after CFG and after the caller's `on_text_logits_hook`.
- Design: `step()` and every existing method are unchanged, and a stream that never calls `step_with_logits`
  runs exactly today's code. Its first call makes the stream's `_StepLogitsState` (one field added to
  `_LMGenState`): two rings of `max_delay + 1` frames (forced tokens, logits), per batch item, so that
  `reset_streaming` and `set_exec_mask` keep working, and its own CUDA-graphed depformer step
  (`_depformer_step_with_logits`: upstream's sampling, plus forcing and the logits). Each call lends `_step`
  that depformer and text hooks that force and record, each calling the caller's hook, and puts the caller's
  back (a hook the caller set meanwhile stays).
- A frame some of whose logits were computed by `step()` (which keeps none) is refused with a RuntimeError
  that says to call `step_with_logits` from the start of the stream or to `reset_streaming()`.
- Size: +{rendered.added} -{rendered.removed} lines in `moshi/models/lm.py`.
- Tests: teacher-forced equivalence with `LMModel.forward` (1e-4; KV context shorter and longer than the
  sequence, max delay 1 and 2, batch 2, multi-linear depformer, weights-per-step schedule, no depformer),
  replays of generated tokens (greedy, sampled, partial forcing), token identity with `step()` (greedy,
  sampled under one seed, CFG, exec mask, reset), the caller's hooks, exec mask, reset, CFG logits, errors:
  `tests/test_step_with_logits.py` of moshi-patch.

{_checks_run(lint, test_run, "Oracle tests (`tests/test_step_with_logits.py`)")}"""


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def write(rendered: Rendered, out: Path, test_run: TestRun | None = None, lint: str | None = None) -> list[Path]:
    """Writes one pull request under `out/<folder>`: the patched lm.py, its new files, the patch from the
    repository root and from the package folder, and PR.md. Returns the paths (the package patch second)."""
    folder = out / PR_FOLDERS[rendered.name]
    lm_path = folder / PATCH_PATH
    lm_path.parent.mkdir(parents=True, exist_ok=True)
    lm_path.write_text(rendered.patched)
    for name, text in rendered.new_files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    repo_patch, package_patch = folder / f"{rendered.name}.patch", folder / f"{rendered.name}.package.patch"
    repo_patch.write_text(rendered.repo_diff)
    package_patch.write_text(rendered.diff)
    lint = lint if lint is not None else flake8_report(rendered)
    markdown = hooks_pr_markdown if rendered.name == HOOKS_NAME else pr_markdown
    pr_path = folder / "PR.md"
    pr_path.write_text(markdown(rendered, test_run, lint))
    return [lm_path, package_patch, repo_patch, pr_path]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moshi_patch.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write the two pull requests into")
    parser.add_argument("--source", type=Path, default=None,
                        help="upstream moshi/models/lm.py to patch (default: the installed one)")
    parser.add_argument("--run-tests", action="store_true", help="apply the patches to a copy of the installed "
                        "moshi, run the tests against it and put the results in PR.md")
    parser.add_argument("-k", dest="select", default=None, help="with --run-tests: pytest -k expression")
    args = parser.parse_args(argv)
    if args.run_tests and args.source is not None:
        parser.error("--run-tests applies the patches to the installed moshi: do not combine it with --source")
    try:
        first, second = render_hooks(args.source), render(args.source)
    except UpstreamShapeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write(first, args.out) + write(second, args.out)
    code = 0
    if args.run_tests:
        hooks_run = run_upstream_test(paths[1])
        oracle_run = run_oracle_tests([paths[1], paths[5]], args.select)
        for run in (hooks_run, oracle_run):
            print(run.output if run.returncode else run.summary)
            code |= run.returncode != 0
        write(first, args.out, hooks_run)
        write(second, args.out, oracle_run)
    for rendered in (first, second):
        print(f"{PR_FOLDERS[rendered.name]}: +{rendered.added} -{rendered.removed} lines in {PATCH_PATH}; flake8: "
              f"{flake8_report(rendered).splitlines()[0]}")
    for path in paths:
        print(f"wrote {path}")
    return code


if __name__ == "__main__":
    sys.exit(main())
