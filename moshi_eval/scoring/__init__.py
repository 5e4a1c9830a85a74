"""Scoring: codes through `moshi_patch.LMGen.step_with_logits` and the teacher-forcing driver (`sequences`), the
losses (`loss`), the streaming verification (`streaming`), and what every evaluator does around a call with a model
(`model_call`)."""
