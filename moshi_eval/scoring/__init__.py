"""Scoring: codes through `moshi_patch.LMGen.step_with_logits` and the teacher-forcing driver (`sequences`), the
losses (`loss`), the streaming verification (`streaming`), and what every evaluator does around a call with a model
(`model_call`)."""

# The version of the scoring path's numerics: bumped when a change moves the numbers (even at rounding level) of the
# same model on the same data, so that an output folder never mixes units scored before and after it (it is part
# of every folder's configuration). 2: `requires_grad` on while scoring (other matmul kernels than 1, off).
SCORING_VERSION = 2
