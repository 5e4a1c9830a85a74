"""moshi_eval: long-context audio cross-entropy of a streaming Moshi model (LibriLight audiobooks).

Data flows one way: audio (`data`) -> Mimi codes (`codes`) -> `moshi_patch.LMGen.step_with_logits`
(`scoring`) -> per-frame losses (`loss`) -> aggregates (`metrics`) -> files (`report`). The command line is
`moshi-eval` (`cli`); `check` holds `moshi-eval check-streaming`.
"""
from moshi_patch.compat import SUPPORTED_MOSHI_EVAL, check_moshi_version

check_moshi_version("moshi_eval", SUPPORTED_MOSHI_EVAL)

from .codes import CodeCache, encode_audio, encode_book, silence_codes  # noqa: E402
from .data import AudioReadError, Book, Chapter, DataError, discover_books, read_audio, select_books  # noqa: E402
from .benchmark_data import BenchmarkData, load_benchmark  # noqa: E402
from .likelihood import LikelihoodConfig, LikelihoodResult, evaluate_likelihood  # noqa: E402
from .loss import AudioCE, audio_cross_entropy  # noqa: E402
from .metrics import summarize  # noqa: E402
from .scoring import FrameLoss, NonFiniteLossError, SequenceScores, score, score_sequences  # noqa: E402

__all__ = [
    "AudioCE", "AudioReadError", "BenchmarkData", "Book", "LikelihoodConfig", "LikelihoodResult",
    "evaluate_likelihood", "load_benchmark", "Chapter", "CodeCache", "DataError", "FrameLoss",
    "NonFiniteLossError", "SequenceScores", "audio_cross_entropy", "discover_books", "encode_audio",
    "encode_book", "read_audio", "score", "score_sequences", "select_books", "silence_codes", "summarize",
]
