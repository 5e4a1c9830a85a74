"""moshi-patch: Moshi's `LMGen` with the logits of every streaming step.

`LMGen.step_with_logits` returns, for each streaming step, the sampled (or teacher-forced) tokens together
with the text and depth-transformer audio logits they came from, taken from the very streaming state
(KV cache, Test-Time-Training weights) the model is in.
"""
from .lm import LMGen, StepLogits

__version__ = "0.1.0"

__all__ = ["LMGen", "StepLogits", "__version__"]
