"""`moshi_eval.errors`: one base class for the eval's errors, and the exit codes `moshi-eval` maps them to."""
import pytest

from moshi_eval.cli import commands as cli
from moshi_eval import errors
from moshi_eval.checkpoint import CheckpointError
from moshi_eval.compare.librilight import CompareError
from moshi_eval.data.librilight import AudioReadError, DataError
from moshi_eval.files.lock import OutputBusyError
from moshi_eval.files.folder import ConfigMismatchError, ReportError
from moshi_eval.scoring.sequences import NonFiniteLossError


@pytest.mark.parametrize("cls,builtin", [
    (DataError, ValueError), (AudioReadError, ValueError), (CheckpointError, ValueError),
    (ReportError, ValueError), (ConfigMismatchError, ValueError), (CompareError, ValueError),
    (errors.UsageError, ValueError), (NonFiniteLossError, RuntimeError), (OutputBusyError, RuntimeError),
])
def test_every_eval_error_is_a_moshi_eval_error(cls, builtin) -> None:
    # Also still the builtin class it was: callers catching ValueError / RuntimeError keep working.
    assert issubclass(cls, errors.MoshiEvalError) and issubclass(cls, builtin)


def test_main_maps_errors_to_exit_codes(monkeypatch, capsys) -> None:
    """A `MoshiEvalError` is a message and its exit code (usage 2, others 1), an interrupt 130, and anything
    else (a bug) keeps its traceback."""
    raised: list[BaseException] = []

    def command(args):
        raise raised[-1]

    parser = cli.build_parser()
    real_parse = parser.parse

    def parse(argv):
        args = real_parse(argv)
        args.func = command
        return args

    monkeypatch.setattr(parser, "parse", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    argv = ["compare", "a", "b", "--out", "c"]
    for exc, code in [(errors.UsageError("--names: two names"), errors.EXIT_USAGE),
                      (DataError("no book under /x"), errors.EXIT_ERROR),
                      (NonFiniteLossError("non-finite logits", "book", 3), errors.EXIT_ERROR),
                      (KeyboardInterrupt(), errors.EXIT_INTERRUPTED)]:
        raised.append(exc)
        assert cli.main(argv) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert str(exc) in err
    raised.append(ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(argv)
    assert (errors.EXIT_OK, errors.EXIT_ERROR, errors.EXIT_USAGE, errors.EXIT_INTERRUPTED) == (0, 1, 2, 130)


def test_compare_with_one_run_is_a_usage_error(tmp_path, capsys) -> None:
    assert cli.main(["compare", str(tmp_path), "--out", str(tmp_path / "out")]) == errors.EXIT_USAGE
    assert "compare needs at least 2 run folders" in capsys.readouterr().err
