"""moshi-patch: Moshi's `LMGen` with the logits of every streaming step.

`LMGen.step_with_logits` returns, for each streaming step, the sampled (or teacher-forced) tokens together
with the text and depth-transformer audio logits they came from, taken from the very streaming state
(KV cache, Test-Time-Training weights) the model is in.
"""
from .compat import SUPPORTED_MOSHI, check_moshi_version

check_moshi_version("moshi_patch", SUPPORTED_MOSHI)

from .lm import ChunkStats, LMGen, StepLogits  # noqa: E402
from .driver import ForcedChunk, TeacherForcing, teacher_force  # noqa: E402

__version__ = "0.2.0.dev0"

__all__ = ["ChunkStats", "ForcedChunk", "LMGen", "StepLogits", "TeacherForcing", "__version__", "teacher_force"]
