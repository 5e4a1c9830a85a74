"""moshi_eval: long-context audio cross-entropy of a streaming Moshi model (LibriLight audiobooks).

Data flows one way: audio (`data`) -> Mimi codes (`codes`) -> `moshi_patch.LMGen.step_with_logits`
(`scoring`) -> per-frame losses (`loss`) -> aggregates (`metrics`) -> files (`report`). The command line is
`moshi-eval` (`cli`); `check` holds `moshi-eval check-streaming`.

From Python (a model in memory, e.g. inside a training loop): `LibriLightEvaluator(mimi, LibriLightConfig(...))`
encodes the books once; `evaluator(lm_model)` returns an `EvalResult` whose `.metrics` is a flat dict for
W&B / TensorBoard (`moshi_eval.loggers`) and whose `.write(out_dir)` writes the CLI's files;
`LikelihoodEvaluator(mimi, LikelihoodConfig(...))` does the same for sWUGGY, sBLIMP, StoryCloze and SALMon, and
`Evaluators([...])` calls several as one, their metrics merged into one flat dict.
`check_streaming(lm_model)` checks that a model computes the same logits streaming as in `LMModel.forward`.
"""
from moshi_patch.compat import SUPPORTED_MOSHI_EVAL, check_moshi_version

check_moshi_version("moshi_eval", SUPPORTED_MOSHI_EVAL)

from .codes import CodeCache, encode_audio, encode_book, silence_codes  # noqa: E402
from .data import AudioReadError, Book, Chapter, DataError, discover_books, read_audio, select_books  # noqa: E402
from .benchmark_data import BenchmarkData, load_benchmark  # noqa: E402
from .likelihood import LikelihoodConfig, LikelihoodEvaluator, LikelihoodResult, evaluate_likelihood  # noqa: E402
from .loss import AudioCE, audio_cross_entropy  # noqa: E402
from .metrics import summarize  # noqa: E402
from .scoring import FrameLoss, NonFiniteLossError, SequenceScores, score, score_sequences  # noqa: E402
from .config import ConfigError, LibriLightConfig, ModelSource, RunConfig, demo_config  # noqa: E402
from .check import CheckResult, check_streaming  # noqa: E402
from .evaluator import EvalResult, EvalResults, Evaluators, LibriLightEvaluator, flat_metrics  # noqa: E402
from .model_call import RankFailedError  # noqa: E402

__all__ = [
    "CheckResult", "ConfigError", "EvalResult", "EvalResults", "Evaluators", "LibriLightConfig", "LibriLightEvaluator",
    "ModelSource", "RankFailedError", "RunConfig", "check_streaming", "demo_config", "flat_metrics",
    "BenchmarkData", "LikelihoodConfig", "LikelihoodEvaluator", "LikelihoodResult", "evaluate_likelihood",
    "load_benchmark",
    "AudioCE", "AudioReadError", "Book", "Chapter", "CodeCache", "DataError", "FrameLoss",
    "NonFiniteLossError", "SequenceScores", "audio_cross_entropy", "discover_books", "encode_audio",
    "encode_book", "read_audio", "score", "score_sequences", "select_books", "silence_codes", "summarize",
]
