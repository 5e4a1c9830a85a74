"""The documentation keeps its promises: README.md and docs/*.md run as written and name what exists.

The convention (docs/README.md, "Code blocks"):
- `<!-- runnable[: key=value ...] -->` on the line just before a ```python or ```bash fence: the block is run here, as
  written, in one temporary folder shared by every page. Python blocks are `exec`uted (the blocks of one page share
  one namespace, in order); each `moshi-eval ...` / `python -m moshi_eval ...` / `python -m moshi_patch.upstream ...`
  line of a bash block is run in-process and must exit 0 (`pip install` and `python -m pytest` steps are the test's
  own environment: skipped). Options: `needs=readme` (the README's blocks run first: `demo_out`, `demo_seed1`),
  `check=NAME` (the function `check_NAME` below compares what the block did with what the page says),
  `elsewhere=TEST` (another test file runs the block).
- `<!-- not runnable: why -->` before a block that needs real data or weights: never run, but each of its
  `moshi-eval` lines must parse with the command's own parser.
- Every ```python and ```bash block carries one of the two.
Beyond the blocks: dotted `moshi_eval.` / `moshi_patch.` names and repository paths written in backticks exist,
relative links and their anchors resolve, the key lists of docs/results.md are the keys of real output files, the
import graph of docs/design.md is the code's, and CHANGELOG.md is one line per entry linking its page.

Everything runs on the demo models (`moshi_eval.demo`) on one CPU thread, in well under a minute.
"""
import ast
import contextlib
from dataclasses import dataclass, field
import importlib
import io
import json
import math
import re
import shlex
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CHANGELOG = ROOT / "CHANGELOG.md"
EXTERNAL = {"dialogues.md"}          # docs/dialogues.md is written and tested by its own author
PAGES = [README] + sorted(p for p in DOCS.glob("*.md") if p.name not in EXTERNAL)

FENCE = re.compile(r"^```(\S*)\s*$")
MARKER = re.compile(r"^<!--\s*(runnable|not runnable)\s*(?::\s*(.*?))?\s*-->\s*$")


# --- reading the pages -------------------------------------------------------------------------------------------

@dataclass
class Block:
    page: Path
    line: int                       # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None              # "runnable", "not runnable" or None
    options: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        start = i
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            i += 1
        marker, options = None, {}
        match = MARKER.match(lines[start - 1]) if start > 0 else None
        if match:
            marker = match.group(1)
            if marker == "runnable" and match.group(2):
                options = dict(token.split("=", 1) for token in match.group(2).split())
        found.append(Block(page, start + 1, opening.group(1), "\n".join(lines[start + 1:i]) + "\n", marker, options))
        i += 1
    return found


def stray_markers(page: Path) -> list[int]:
    """Lines of markers that are not just before a fence."""
    lines = page.read_text().splitlines()
    return [n + 1 for n, line in enumerate(lines) if MARKER.match(line)
            and (n + 1 >= len(lines) or not FENCE.match(lines[n + 1]))]


def commands(code: str) -> list[str]:
    """The logical lines of a bash block (backslash continuations joined, comments and blank lines dropped)."""
    out, current = [], ""
    for line in code.splitlines():
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip() and not current.strip().startswith("#"):
            out.append(current.strip())
        current = ""
    return out


def moshi_eval_argv(segment: str) -> list[str] | None:
    """The arguments after `moshi-eval` (or `-m moshi_eval`) in a command, or None if it runs something else."""
    argv = shlex.split(segment, comments=True)
    if argv and argv[0] == "moshi-eval":
        return argv[1:]
    for i in range(len(argv) - 1):
        if argv[i] == "-m" and argv[i + 1] == "moshi_eval":
            return argv[i + 2:]
    return None


# --- running the pages ----------------------------------------------------------------------------------------------

@dataclass
class PageRun:
    page: Path
    namespace: dict = field(default_factory=dict)
    outputs: dict[int, str] = field(default_factory=dict)        # block line -> what it printed
    logged: list[tuple[dict, int | None]] = field(default_factory=list)   # wandb.log calls


_RUNS: dict[Path, PageRun] = {}
_CURRENT: list[PageRun] = []


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The folder every runnable block runs in, with its own code cache and a recording stand-in for wandb."""
    folder = tmp_path_factory.mktemp("docs")
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: None
    wandb.log = lambda payload, step=None: _CURRENT[-1].logged.append((dict(payload), step))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        mp.setitem(sys.modules, "wandb", wandb)
        mp.chdir(folder)
        yield folder
    _RUNS.clear()


def run_bash(block: Block) -> None:
    from moshi_eval.cli.commands import main as moshi_eval
    from moshi_patch import upstream
    for line in commands(block.code):
        for segment in line.split("&&"):
            argv = shlex.split(segment, comments=True)
            if not argv or argv[:2] == ["pip", "install"] or argv[:3] == ["python", "-m", "pytest"]:
                continue
            args = moshi_eval_argv(segment)
            if args is not None:
                code = moshi_eval(args)
            elif argv[:3] == ["python", "-m", "moshi_patch.upstream"]:
                code = upstream.main(argv[3:])
            else:
                raise AssertionError(f"{block.where}: no way to run {segment.strip()!r} in-process")
            assert code == 0, f"{block.where}: {segment.strip()!r} exited {code}"


def run_page(page: Path) -> PageRun:
    """Every runnable block of `page`, in order (once per module: later calls return the first run)."""
    if page in _RUNS:
        return _RUNS[page]
    run = _RUNS[page] = PageRun(page, {"__name__": f"docs_{page.stem}"})
    runnable = [b for b in blocks(page) if b.marker == "runnable" and "elsewhere" not in b.options]
    if any(b.options.get("needs") == "readme" for b in runnable):
        run_page(README)
    _CURRENT.append(run)
    try:
        for block in runnable:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                if block.lang == "python":
                    exec(compile(block.code, block.where, "exec"), run.namespace)
                elif block.lang == "bash":
                    run_bash(block)
                else:
                    raise AssertionError(f"{block.where}: runnable blocks are python or bash, got {block.lang!r}")
            run.outputs[block.line] = out.getvalue()
            if "check" in block.options:
                check = globals().get(f"check_{block.options['check']}")
                assert check is not None, f"{block.where}: no check_{block.options['check']} in {__file__}"
                check(run, block)
    finally:
        _CURRENT.pop()
    return run


RUNNABLE_PAGES = [p for p in PAGES if any(b.marker == "runnable" and "elsewhere" not in b.options
                                          for b in blocks(p))]


@pytest.mark.parametrize("page", RUNNABLE_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_runnable_blocks_run(work, page):
    run_page(page)


# --- the checks named by the blocks ---------------------------------------------------------------------------------

def _finite_metrics(metrics: dict) -> None:
    assert metrics and all(isinstance(v, float) and math.isfinite(v) for v in metrics.values()), metrics


def check_readme_training_loop(run: PageRun, block: Block) -> None:
    (metrics, step), = run.logged
    assert step == 0 and "librilight/audio_ce@250" in metrics and "sstorycloze/accuracy" in metrics
    _finite_metrics(metrics)


def check_swl_basic(run: PageRun, block: Block) -> None:
    ns = run.namespace
    out, lm_model = ns["out"], ns["lm_model"]
    assert tuple(out.tokens.shape) == (2, 1 + lm_model.dep_q, 1)
    assert tuple(out.text_logits.shape[:3]) == (2, 1, 1)
    assert tuple(out.audio_logits.shape) == (2, lm_model.dep_q, 1, lm_model.card)


def check_swl_chunks(run: PageRun, block: Block) -> None:
    """The chunked loop gives the audio logits of `LMModel.forward` on the same codes."""
    import torch
    from moshi.utils.compile import no_compile
    ns = run.namespace
    with torch.no_grad(), no_compile():
        reference = ns["lm_model"](ns["codes"])
    streamed = ns["audio_logits"]
    assert streamed.shape == reference.logits.shape
    mask = reference.mask[..., None].expand_as(streamed)
    torch.testing.assert_close(streamed[mask], reference.logits[mask], atol=1e-4, rtol=0)


def check_swl_ttt(run: PageRun, block: Block) -> None:
    from moshi_patch import StepLogits
    from moshi_patch.ttt import ttt_layers
    assert isinstance(run.namespace["out"], StepLogits) and len(ttt_layers(run.namespace["lm_model"])) == 2


def _demo_likelihood_scores() -> dict[str, float]:
    import csv
    with open("demo_out/likelihood/items.csv", newline="") as f:
        return {row["file"]: float(row["log_likelihood"]) for row in csv.DictReader(f)}


def check_likelihood_library(run: PageRun, block: Block) -> None:
    """Bitwise the scores `moshi-eval demo` wrote for the same pairs (same model, codec and settings)."""
    result = run.namespace["result"]
    assert {k: s.log_likelihood for k, s in result.scores.items()} == _demo_likelihood_scores()
    assert json.loads(Path("pairs_out/results.json").read_text())["task"] == "likelihood"


def check_salmon_model(run: PageRun, block: Block) -> None:
    import torch
    values = run.namespace["model"].log_likelihood(run.namespace["wavs"])
    assert values.shape == (2,) and values.dtype == torch.float64 and bool(torch.isfinite(values).all())


def check_training_loop(run: PageRun, block: Block) -> None:
    """At step 0 the numbers of `moshi-eval demo`, bit for bit, both tasks; what `write` wrote is what was logged."""
    from moshi_eval import flat_metrics
    assert [step for _, step in run.logged] == [0, 2]
    demo = flat_metrics(json.loads(Path("demo_out/results.json").read_text())["summary"])
    demo_likelihood = json.loads(Path("demo_out/likelihood/results.json").read_text())["metrics"]
    assert "sstorycloze/accuracy" in demo_likelihood and set(demo).isdisjoint(demo_likelihood)
    first, last = run.logged[0][0], run.logged[1][0]
    assert first == {**demo, **demo_likelihood}
    assert last["librilight/audio_ce"] != demo["librilight/audio_ce"]          # trained in between
    written = json.loads(Path("demo_api_out/librilight/results.json").read_text())
    assert written["metrics"] == {k: v for k, v in last.items() if k.startswith("librilight/")}
    assert flat_metrics(written["summary"]) == written["metrics"]
    written = json.loads(Path("demo_api_out/sstorycloze/results.json").read_text())
    assert written["metrics"] == {k: v for k, v in last.items() if k.startswith("sstorycloze/")}


def check_read_run(run: PageRun, block: Block) -> None:
    task, value = run.outputs[block.line].splitlines()[0].split()
    assert task == "librilight" and math.isfinite(float(value))


def check_tensorboard(run: PageRun, block: Block) -> None:
    assert any(p.name.startswith("events.out.tfevents") for p in Path("tensorboard").iterdir())


def _table_numbers(text: str) -> list[float]:
    rows = [line for line in text.splitlines() if line.startswith("| frame") or line.startswith("| slope")]
    return [float(x) for row in rows for x in re.findall(r"-?\d+\.\d+", row.split("|", 2)[2])]


def check_compare_table(run: PageRun, block: Block) -> None:
    """The table the page shows is the one the command wrote (to rounding of the last digit)."""
    page = block.page.read_text()
    shown = _table_numbers(page[page.index(block.code):])[:4 * 9]
    written = _table_numbers(Path("cmp/compare.md").read_text())
    assert len(shown) == len(written) == 4 * 9, (shown, written)
    assert all(abs(a - b) <= 2e-3 for a, b in zip(shown, written)), (shown, written)


def check_likelihood_compare(run: PageRun, block: Block) -> None:
    for seed in (0, 1):
        assert json.loads(Path(f"pairs_seed{seed}/results.json").read_text())["task"] == "likelihood"


def check_likelihood_compare_cli(run: PageRun, block: Block) -> None:
    result = json.loads(Path("cmp_pairs/compare.json").read_text())
    assert result["runs"] == ["seed0", "seed1"] and result["shared_pairs"] == 3
    assert set(result["comparisons"]) == {"accuracy", "accuracy_per_token"}


def check_upstream(run: PageRun, block: Block) -> None:
    """The files the page lists are written, and the first pull request adds the lines the page says."""
    from moshi_patch import upstream
    for folder, name in (("1-audio-hooks", "audio_hooks"), ("2-step-with-logits", "step_with_logits")):
        for file in (f"{name}.patch", f"{name}.package.patch", "PR.md", "moshi/models/lm.py"):
            assert (Path("out/pr") / folder / file).is_file(), (folder, file)
    added = int(re.search(r"\(\+(\d+) lines to `moshi/models/lm.py`", block.page.read_text()).group(1))
    assert upstream.render_hooks().added == added


# --- every block marked, every command parsed -----------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_says_whether_it_runs(page):
    unmarked = [b.where for b in blocks(page) if b.lang in ("python", "bash", "sh", "shell", "") and b.marker is None]
    assert not unmarked, f"code blocks without <!-- runnable --> or <!-- not runnable: why -->: {unmarked}"
    assert not [b.where for b in blocks(page) if b.lang in ("", "sh", "shell")], "fence languages: python, bash, text"
    assert not stray_markers(page), f"{page}: markers not followed by a code block, lines {stray_markers(page)}"
    for b in blocks(page):
        assert set(b.options) <= {"needs", "check", "elsewhere"}, (b.where, b.options)
        if "elsewhere" in b.options:
            test = ROOT / b.options["elsewhere"]
            assert test.is_file() and page.name in test.read_text(), (b.where, "no such test of this page")


def test_every_command_of_the_pages_parses():
    """Runnable or not, each `moshi-eval` line is a valid command line (flags exist, values are accepted)."""
    from moshi_eval.cli.commands import build_parser
    checked = 0
    for page in PAGES:
        for b in blocks(page):
            if b.lang != "bash":
                continue
            for line in commands(b.code):
                for segment in line.split("&&"):
                    argv = moshi_eval_argv(segment)
                    if argv is None:
                        continue
                    try:
                        build_parser().parse_args(argv)
                    except SystemExit:
                        raise AssertionError(f"{b.where}: not a valid command line: {segment.strip()}") from None
                    checked += 1
    assert checked >= 20


# --- names, paths and links -----------------------------------------------------------------------------------------

DOTTED = re.compile(r"\b((?:moshi_eval|moshi_patch)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)")
REPO_PATH = re.compile(r"(?:^|(?<=[\s(]))((?:tests|bench|docs|moshi_eval|moshi_patch|\.ci)/[\w./-]*)")


def _code_spans(page: Path) -> list[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", text)


def _resolve(name: str) -> bool:
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


@pytest.mark.parametrize("page", PAGES + [CHANGELOG], ids=lambda p: str(p.relative_to(ROOT)))
def test_names_and_paths_exist(page):
    names = {m for span in _code_spans(page) for m in DOTTED.findall(span)}
    for b in blocks(page):
        if b.lang == "text":
            names |= set(DOTTED.findall(b.code))
    missing = sorted(n for n in names if not _resolve(n))
    assert not missing, f"{page.name} names what does not exist: {missing}"
    paths = {path.rstrip("/.") for span in _code_spans(page) if "<" not in span and "*" not in span
             for path in REPO_PATH.findall(span)}
    paths |= {path.rstrip("/.") for b in blocks(page) if b.lang == "bash" for path in REPO_PATH.findall(b.code)}
    absent = sorted(p for p in paths if not (ROOT / p).exists())
    assert not absent, f"{page.name} names paths that do not exist: {absent}"


def github_anchor(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    return {github_anchor(h) for h in re.findall(r"^#+\s+(.*)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES + [CHANGELOG], ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: broken link {target}"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: no heading #{anchor} in {file.name}"


def test_the_table_of_contents_lists_every_page():
    toc = (DOCS / "README.md").read_text()
    linked = set(re.findall(r"\]\(([\w.-]+\.md)\)", toc))
    pages = {p.name for p in DOCS.glob("*.md")} - {"README.md"}
    assert pages <= linked, f"docs/README.md does not link {sorted(pages - linked)}"


# --- docs/results.md against real output files ----------------------------------------------------------------------

def documented_keys(name: str) -> set[str]:
    """The keys a `<!-- keys: name -->` list of docs/results.md documents: the code spans before each item's colon."""
    lines = (DOCS / "results.md").read_text().splitlines()
    start = lines.index(f"<!-- keys: {name} -->") + 1
    keys: set[str] = set()
    for line in lines[start:]:
        if line.startswith("- "):
            keys |= set(re.findall(r"`([^`]+)`", line.split(":", 1)[0]))
        elif not line.startswith("  "):
            break
    assert keys, name
    return keys


@pytest.fixture(scope="module")
def likelihood_run(work):
    """A likelihood run through the runner, as `moshi-eval likelihood` makes it (items/ included), on the demo."""
    from moshi_eval import LikelihoodConfig
    from moshi_eval.checkpoint import LoadedCheckpoint
    from moshi_eval.demo import demo_lm, demo_mimi, demo_minimal_pairs
    from moshi_eval.tasks.likelihood import LikelihoodTask
    from moshi_eval.tasks.runner import TaskRun, run_task
    out = work / "likelihood_runner"
    config = LikelihoodConfig("sstorycloze", demo_minimal_pairs(work / "runner_data"), text="pad", batch_size=2,
                              bootstrap=100)
    identity = {"demo": True}
    load = lambda: LoadedCheckpoint(demo_lm(), demo_mimi(), None, identity)   # noqa: E731
    assert run_task(TaskRun(LikelihoodTask(config), out, load, identity, cache_dir=None, progress=False)) == 0
    return out


def test_results_page_lists_the_keys_of_real_files(work, likelihood_run):
    import csv
    import numpy as np
    run_page(README)                    # demo_out, demo_compare
    run_page(DOCS / "compare.md")       # pairs_seed0, cmp_pairs

    def read(path):
        return json.loads(Path(path).read_text())

    librilight = read("demo_out/results.json")
    assert documented_keys("librilight config.json") == set(read("demo_out/config.json"))
    assert documented_keys("librilight results.json") == set(librilight)
    assert documented_keys("librilight runtime") == set(librilight["runtime"])
    with np.load(Path("demo_out") / librilight["books"][0]["file"]) as arrays:
        assert documented_keys("sequence arrays") == set(arrays.files)
        assert documented_keys("sequence meta_json") == set(json.loads(str(arrays["meta_json"])))
    assert documented_keys("librilight compare.json") == set(read("demo_compare/compare.json"))

    assert documented_keys("likelihood config.json") == set(read(likelihood_run / "config.json"))
    results = read(likelihood_run / "results.json")
    assert documented_keys("likelihood results.json") - set(results) == {"submission"}   # swuggy and sblimp only
    assert set(results) <= documented_keys("likelihood results.json")
    batch = read(sorted((likelihood_run / "items").glob("batch_*.json"))[0])
    assert documented_keys("likelihood batch") == set(batch)
    for name in ("items.csv", "pairs.csv"):
        with open(likelihood_run / name, newline="") as f:
            assert documented_keys(name) == set(next(csv.reader(f))), name
    assert documented_keys("likelihood compare.json") == set(read("cmp_pairs/compare.json"))


# --- docs/design.md against the code --------------------------------------------------------------------------------

def room_imports() -> set[tuple[str, str]]:
    """(room, room it imports) over moshi_eval, `errors` left out (every room imports it)."""
    package = ROOT / "moshi_eval"
    edges = set()
    for file in package.rglob("*.py"):
        if "assets" in file.parts or file.parent == package and file.stem in ("__init__", "__main__"):
            continue
        relative = file.relative_to(package)
        room = relative.parts[0] if len(relative.parts) > 1 else file.stem
        here = list(relative.parts[:-1])
        for node in ast.walk(ast.parse(file.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = ["moshi_patch"] if (node.module or "").startswith("moshi_patch") else []
            elif isinstance(node, ast.ImportFrom):
                base = here[:len(here) - (node.level - 1)]
                module = base + (node.module.split(".") if node.module else [])
                targets = [module[0]] if module else [alias.name for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = ["moshi_patch" for alias in node.names if alias.name.startswith("moshi_patch")]
            edges |= {(room, t) for t in targets if t not in (room, "errors")}
    return edges


def test_design_page_draws_the_imports_of_the_code():
    text = (DOCS / "design.md").read_text()
    graph = re.search(r"```mermaid\n(.*?)```", text, re.S).group(1)
    drawn = set(re.findall(r"^\s*(\w+)\s*-->\s*(\w+)\s*$", graph, re.M))
    actual = room_imports()
    assert drawn == actual, (f"missing from the diagram: {sorted(actual - drawn)}; "
                             f"not in the code: {sorted(drawn - actual)}")
    assert not any(target == "cli" for _, target in actual)      # the CLI on top: nothing imports it


# --- CHANGELOG.md -----------------------------------------------------------------------------------------------------

def test_changelog_is_one_line_per_entry_linking_its_page():
    lines = CHANGELOG.read_text().splitlines()
    releases = [line for line in lines if line.startswith("## ")]
    assert releases[0] == "## [Unreleased]", releases[:1]
    assert all(re.fullmatch(r"## \[(Unreleased|\d+\.\d+\.\d+)\]( - \d{4}-\d{2}-\d{2})?", r) for r in releases), releases
    sections = {line for line in lines if line.startswith("### ")}
    assert sections <= {f"### {s}" for s in ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")}
    entries = [line for line in lines if line.startswith("- ")]
    assert len(entries) >= 20
    for line in lines:
        assert len(line) <= 120, f"CHANGELOG.md: longer than 120 characters: {line}"
        assert not line.startswith(" "), f"CHANGELOG.md: an entry on several lines: {line}"
    for entry in entries:
        links = re.findall(r"\]\((docs/[\w.-]+\.md|README\.md)(?:#[\w-]+)?\)", entry)
        assert links, f"CHANGELOG.md: entry without a link to its page: {entry}"
