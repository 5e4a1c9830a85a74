"""The layout of the eval package: the command line on top, no import cycle (between modules or rooms), no private
name borrowed across modules, moshi_patch independent of the eval (read from the source by `helpers.import_graph`)."""
from helpers.import_graph import cycles, imports, module_edges, room


def test_no_import_cycle_between_modules():
    assert cycles(module_edges("moshi_eval")) == []
    assert cycles(module_edges("moshi_patch")) == []


def test_no_import_cycle_between_rooms():
    """Data flows one way between the rooms too (data, scoring, stats, tasks, files, compare, cli, and the modules
    beside them): a room never imports, through any module, a room that imports it."""
    rooms: dict[str, set[str]] = {}
    for a, targets in module_edges("moshi_eval").items():
        for b in targets:
            if room(a) != room(b):
                rooms.setdefault(room(a), set()).add(room(b))
    assert cycles(rooms) == []


def test_nothing_below_the_command_line_imports_it():
    edges = module_edges("moshi_eval")
    importers = sorted(m for m, targets in edges.items() if not m.startswith("moshi_eval.cli")
                       and any(t == "moshi_eval.cli" or t.startswith("moshi_eval.cli.") for t in targets))
    assert importers == ["moshi_eval.__main__"]      # `python -m moshi_eval` is the command line itself


def test_no_module_imports_a_private_name_of_another():
    graph = imports("moshi_eval")
    borrowed = sorted((m, t, n) for m, found in graph.items() for t, n in found
                      if n.startswith("_") and t.startswith("moshi_eval") and t != m)
    assert borrowed == []


def test_moshi_patch_never_imports_the_eval():
    graph = imports("moshi_patch")
    assert [m for m, found in graph.items() if any(t.split(".")[0] == "moshi_eval" for t, _ in found)] == []


def test_the_old_run_module_and_stand_ins_are_gone():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    assert not (root / "eval").exists()
    source = "".join(p.read_text() for p in (root / "moshi_eval").rglob("*.py"))
    for gone in ("_CodecOnly", "EvalJob", "run_eval", "check_or_write_config"):
        assert gone not in source, gone
