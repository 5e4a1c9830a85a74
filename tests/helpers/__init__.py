"""Helpers of the tests, imported as a package (`from helpers.lm_factory import make_lm`): tiny models and
checkpoints made on the fly, LibriLight-layout folders, CLI runners. Importing it imports neither moshi_patch
nor moshi_eval: the oracle tests of `step_with_logits` also run on an upstream-patched moshi alone."""
