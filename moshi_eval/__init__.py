"""moshi_eval: the numbers speech-LM papers report, from the streaming state of a Moshi model.

Rooms by stage, data flowing one way: `data` (audio, LibriLight and benchmark layouts, Mimi codes) -> `scoring`
(`moshi_patch.LMGen.step_with_logits` through the teacher-forcing driver, losses, streaming verification) ->
`stats` (curves, bootstrap) -> `tasks` (LibriLight, likelihood: one evaluator each, over one runner) -> `files`
(the output folder, its lock and files) -> `compare`. Beside them: `config` (every typed configuration), `checkpoint`,
`distributed`, `loggers`, `demo`. The command line `moshi-eval` (`cli`) is on top; nothing imports it.

From Python (a model in memory, e.g. inside a training loop): `LibriLightEvaluator(mimi, LibriLightConfig(...))`
encodes the books once; `evaluator(lm_model)` returns an `EvalResult` whose `.metrics` is a flat dict for
W&B / TensorBoard (`moshi_eval.loggers`) and whose `.write(out_dir)` writes the CLI's files;
`LikelihoodEvaluator(mimi, LikelihoodConfig(...))` does the same for sWUGGY, sBLIMP, StoryCloze and SALMon, and
`Evaluators([...])` calls several as one, their metrics merged into one flat dict.
`check_streaming(lm_model)` checks that a model computes the same logits streaming as in `LMModel.forward`.
"""
from moshi_patch.compat import SUPPORTED_MOSHI_EVAL, check_moshi_version

check_moshi_version("moshi_eval", SUPPORTED_MOSHI_EVAL)

from .data.codes import CodeCache, encode_audio, encode_book, silence_codes  # noqa: E402
from .data.librilight import (AudioReadError, Book, Chapter, DataError, discover_books, read_audio,  # noqa: E402
                              select_books)
from .data.benchmarks import BenchmarkData, load_benchmark  # noqa: E402
from .tasks.likelihood import LikelihoodEvaluator, LikelihoodResult, evaluate_likelihood  # noqa: E402
from .scoring.loss import AudioCE, audio_cross_entropy  # noqa: E402
from .stats.metrics import summarize  # noqa: E402
from .scoring.sequences import FrameLoss, NonFiniteLossError, SequenceScores, score, score_sequences  # noqa: E402
from .config import ConfigError, LibriLightConfig, LikelihoodConfig, ModelSource, RunConfig, demo_config  # noqa: E402
from .scoring.streaming import CheckResult, check_streaming  # noqa: E402
from .tasks.base import EvalResults, Evaluators  # noqa: E402
from .tasks.librilight import EvalResult, LibriLightEvaluator, flat_metrics  # noqa: E402
from .scoring.model_call import RankFailedError  # noqa: E402
from .data.dialogues import DialogueBatches, load_dialogues  # noqa: E402
from .tasks.dialogue import DialogueConfig, DialogueEvaluator, DialogueResult, DialogueTask  # noqa: E402

__all__ = [
    "CheckResult", "ConfigError", "EvalResult", "EvalResults", "Evaluators", "LibriLightConfig", "LibriLightEvaluator",
    "ModelSource", "RankFailedError", "RunConfig", "check_streaming", "demo_config", "flat_metrics",
    "BenchmarkData", "LikelihoodConfig", "LikelihoodEvaluator", "LikelihoodResult", "evaluate_likelihood",
    "load_benchmark",
    "DialogueBatches", "DialogueConfig", "DialogueEvaluator", "DialogueResult", "DialogueTask", "load_dialogues",
    "AudioCE", "AudioReadError", "Book", "Chapter", "CodeCache", "DataError", "FrameLoss",
    "NonFiniteLossError", "SequenceScores", "audio_cross_entropy", "discover_books", "encode_audio",
    "encode_book", "read_audio", "score", "score_sequences", "select_books", "silence_codes", "summarize",
]
