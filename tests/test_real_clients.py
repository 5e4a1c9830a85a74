"""The right numbers where real users run it: LoRA adapters fused into a bfloat16 model as the float32 merge
rounded once, scores independent of which parameters require grad (and CLI models loaded frozen), SALMon's
loader offline with local files, the demo seeded without touching torch's global generator, and a Mimi config
that does not fit the Mimi weights named in one line."""
import json

import numpy as np
import pytest
import torch
from moshi.models import loaders
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear
from safetensors.torch import load_file, save_file

from helpers.checkpoint_factory import load_tiny_checkpoint, write_lora_adapters, write_tiny_checkpoint
from helpers.lm_factory import make_lm, random_codes
from moshi_eval.checkpoint import CheckpointError, resolve_checkpoint
from moshi_eval.config import ModelSource

RANK, SCALING = 4, 2.0


def _source(ckpt: dict, **kw) -> ModelSource:
    files = dict(hf_repo=ckpt["hf_repo"], moshi_weight=str(ckpt["moshi_weights"]),
                 mimi_weight=str(ckpt["mimi_weights"]), tokenizer=str(ckpt["tokenizer"]),
                 config=str(ckpt["config_path"]), mimi_config=str(ckpt["mimi_config_path"]), device="cpu")
    return ModelSource(**{**files, **kw})


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """The tiny checkpoint, its weights also in bfloat16 (as kyutai/moshiko-pytorch-bf16), and LoRA adapters in
    moshi-finetune's layout (`lora.safetensors`, non-zero A and B, float32) with a `lora: true` config: a small
    update, about one bfloat16 ulp of the weights."""
    root = tmp_path_factory.mktemp("lora_bf16")
    base = write_tiny_checkpoint(root / "base")
    bf16_weights = root / "model_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(base["moshi_weights"])).items()}, str(bf16_weights))
    lora_config, lora_weights, _ = write_lora_adapters(base, root, RANK, SCALING, std=0.01)
    return {"base": base, "lora_config": lora_config, "lora_weights": lora_weights, "bf16_weights": bf16_weights}


def _lora_lm(lora: dict, dtype: str, fuse: bool, base_dtype: str = "float32") -> LMModel:
    weights = lora["bf16_weights"] if base_dtype == "bfloat16" else lora["base"]["moshi_weights"]
    source = _source(lora["base"], config=str(lora["lora_config"]), lora_weight=str(lora["lora_weights"]),
                     moshi_weight=str(weights), dtype=dtype, fuse_lora=fuse)
    return resolve_checkpoint(source).load().lm_model


def _logits(lm: LMModel) -> torch.Tensor:
    """Audio logits of `LMModel.forward` on random codes at the valid positions, in float32: `[N, card]`."""
    codes = random_codes(lm, 2, 10, seed=0)
    with torch.no_grad():
        out = lm(codes)
    return out.logits[out.mask].float()


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_lora_fused_in_bfloat16_is_the_float32_merge_rounded_once(lora, base_dtype):
    fused32 = _lora_lm(lora, "float32", True, base_dtype)
    fused16 = _lora_lm(lora, "bfloat16", True, base_dtype)
    assert not any(isinstance(m, LoRALinear) for m in fused16.modules())
    # Bitwise the float32 fused model cast to bfloat16: weights, dtypes and logits.
    expected = {k: v.to(torch.bfloat16) if v.dtype.is_floating_point else v for k, v in fused32.state_dict().items()}
    got = fused16.state_dict()
    assert set(got) == set(expected)
    for key, value in got.items():
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert torch.equal(_logits(fused16), _logits(fused32.to(torch.bfloat16)))

    # Fused and unfused agree up to bfloat16's own rounding of the trained (float32, unfused) model.
    trained = _logits(_lora_lm(lora, "float32", False, base_dtype))
    unfused16 = _logits(_lora_lm(lora, "bfloat16", False, base_dtype))
    rounding = (unfused16 - trained).abs().max()
    assert 0 < rounding < 0.2
    assert (_logits(fused16) - trained).abs().max() <= 2 * rounding
    assert (_logits(fused16) - unfused16).abs().max() <= 2 * rounding

    # moshi's own loader merges in bfloat16 (W, B @ A and the sum each rounded): not the rounded merge.
    info = loaders.CheckpointInfo.from_hf_repo(
        "unused", moshi_weights=lora["bf16_weights"] if base_dtype == "bfloat16" else lora["base"]["moshi_weights"],
        mimi_weights=lora["base"]["mimi_weights"], tokenizer=lora["base"]["tokenizer"],
        config_path=lora["lora_config"], lora_weights=lora["lora_weights"])
    old = info.get_moshi(device="cpu", dtype=torch.bfloat16, fuse_lora=True).state_dict()
    assert any(not torch.equal(old[key], expected[key]) for key in expected)


def _score(lm: LMModel, codes: list[torch.Tensor]) -> list[np.ndarray]:
    from moshi_patch import LMGen
    from moshi_eval.scoring.model_call import scoring_mode
    from moshi_eval.scoring.sequences import score_sequences
    with scoring_mode(lm):
        return [s.codebook_ce.copy() for s in score_sequences(LMGen(lm, use_sampling=False), codes,
                                                               user_stream="zero", text="zero", progress=False,
                                                               chunk=4)]


def test_scores_do_not_depend_on_requires_grad_and_flags_are_restored():
    from moshi_eval.scoring.model_call import scoring_mode
    lm = make_lm(depformer_multi_linear=True)
    gen = torch.Generator().manual_seed(1)
    codes = [torch.randint(0, lm.card, (lm.dep_q, n), generator=gen) for n in (20, 13)]
    lm.requires_grad_(False)
    frozen = _score(lm, codes)
    flags = [i % 2 == 0 for i, _ in enumerate(lm.parameters())]
    for flag, p in zip(flags, lm.parameters()):
        p.requires_grad_(flag)
    lm.train()
    half = _score(lm, codes)
    for a, b in zip(frozen, half):
        assert np.array_equal(a, b), np.abs(a - b).max()
    assert [p.requires_grad for p in lm.parameters()] == flags and lm.training
    with pytest.raises(RuntimeError, match="inside"):
        with scoring_mode(lm):
            assert all(p.requires_grad for p in lm.parameters()) and not lm.training
            raise RuntimeError("inside")
    assert [p.requires_grad for p in lm.parameters()] == flags and lm.training


def test_frozen_model_scores_with_one_matrix_product_per_depformer_linear():
    """The depformer's multi-linear layers get per-codebook slices `[N, 1, D]` of a `[N, dep_q, D]` input; torch
    folds them into one matrix product only for a weight that requires grad, and for a frozen one multiplies by the
    weight expanded N times (`aten::bmm`), much slower on a CPU. A frozen model (as the CLI loads it) must be
    scored on the folded path, and give what a trainable one gives."""
    from torch.profiler import ProfilerActivity, profile
    lm = make_lm(depformer_multi_linear=True, depformer_weights_per_step=True)
    gen = torch.Generator().manual_seed(2)
    codes = [torch.randint(0, lm.card, (lm.dep_q, 24), generator=gen)]
    trainable = _score(lm, codes)
    lm.requires_grad_(False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        frozen = _score(lm, codes)
    ops = {event.key: event.count for event in prof.key_averages()}
    assert ops.get("aten::mm", 0) > 0
    assert ops.get("aten::bmm", 0) == 0, f"{ops.get('aten::bmm')} batched products of an expanded weight"
    assert np.array_equal(trainable[0], frozen[0])
    assert not any(p.requires_grad for p in lm.parameters())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"))


def test_cli_models_are_loaded_frozen(tiny):
    lm = resolve_checkpoint(_source(tiny)).load().lm_model
    assert not any(p.requires_grad for p in lm.parameters())


def test_a_mimi_config_that_does_not_fit_the_weights_is_one_line(tiny):
    source = _source(tiny, mimi_config=None)          # a non-default Mimi without its --mimi-config
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(source).load()
    message = str(info.value)
    assert "\n" not in message and len(message) < 600, message
    assert str(tiny["mimi_weights"]) in message and "--mimi-config" in message
    assert message.count("size mismatch") == 1


def _offline(monkeypatch):
    import huggingface_hub
    import huggingface_hub.file_download

    def refuse(*args, **kwargs):
        raise AssertionError(f"network: hf_hub_download{args}")

    for module in (huggingface_hub, huggingface_hub.file_download, loaders):
        monkeypatch.setattr(module, "hf_hub_download", refuse)


@pytest.mark.parametrize("with_tokenizer", [True, False], ids=["tokenizer", "no-tokenizer"])
def test_salmon_all_local_config_never_touches_the_network(tiny, monkeypatch, with_tokenizer):
    from moshi_eval.salmon import MoshiInferenceModel
    _offline(monkeypatch)
    config = {"model_type": "moshi", "moshi_weight": str(tiny["moshi_weights"]),
              "mimi_weight": str(tiny["mimi_weights"]), "config": str(tiny["config_path"]),
              "mimi_config": str(tiny["mimi_config_path"]), "device": "cpu", "dtype": "float32", "text": "zero"}
    if with_tokenizer:
        config["tokenizer"] = str(tiny["tokenizer"])
    model = MoshiInferenceModel.from_config(config)
    assert not any(p.requires_grad for p in model.lm_model.parameters())
    lm, mimi, _ = load_tiny_checkpoint(tiny)
    wavs = [torch.from_numpy(np.random.default_rng(i).standard_normal((1, 16000 + 4000 * i)).astype(np.float32)
                             * 0.1) for i in range(2)]
    assert torch.equal(model.log_likelihood(wavs), MoshiInferenceModel(lm, mimi, text="zero").log_likelihood(wavs))
    with pytest.raises(CheckpointError, match="moshi_weight"):
        MoshiInferenceModel.from_config(dict(config, moshi_weight=str(tiny["root"] / "missing.safetensors")))


def _old_demo_mimi(seed: int):
    from moshi_eval.demo import DEMO_MIMI_CONFIG, _init_codebooks
    torch.manual_seed(seed)
    mimi = loaders.get_mimi(None, DEMO_MIMI_CONFIG, device="cpu", num_codebooks=8)
    _init_codebooks(mimi, seed)
    return mimi.eval()


def _old_demo_lm(seed: int, dtype: torch.dtype):
    from moshi_eval.demo import DEMO_LM_KWARGS
    torch.manual_seed(seed)
    return LMModel(device="cpu", dtype=dtype, **DEMO_LM_KWARGS).eval()


def test_demo_models_keep_their_weights_and_leave_the_global_generator_alone():
    from moshi_eval.demo import demo_lm, demo_mimi
    with torch.random.fork_rng(devices=[]):
        references = {"mimi": _old_demo_mimi(0).state_dict(), "lm": _old_demo_lm(0, torch.float32).state_dict(),
                      "lm_bf16": _old_demo_lm(1, torch.bfloat16).state_dict()}
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    built = {"mimi": demo_mimi(0).state_dict(), "lm": demo_lm(0).state_dict(),
             "lm_bf16": demo_lm(1, dtype=torch.bfloat16).state_dict()}
    assert torch.equal(torch.get_rng_state(), before)
    for name, state in built.items():
        assert state.keys() == references[name].keys()
        for key, value in state.items():
            assert torch.equal(value, references[name][key]), (name, key)


def test_evaluators_set_threads_for_the_call_and_record_them(tmp_path):
    """`threads` of every evaluator: torch's CPU threads for the call (the numbers of a CPU run depend on the
    count), restored after, recorded in the runtime; the numbers equal a call made with that many threads."""
    from moshi_eval import (DialogueEvaluator, LibriLightEvaluator, LikelihoodConfig, LikelihoodEvaluator,
                            demo_config)
    from moshi_eval.config import ConfigError
    from moshi_eval.demo import demo_audiobook, demo_lm, demo_mimi, demo_minimal_pairs
    mimi, lm = demo_mimi(seed=0), demo_lm(seed=0)
    batches = [torch.cat([torch.randint(0, lm.text_card, (2, 1, 20)), torch.randint(0, lm.card, (2, lm.n_q, 20))],
                         dim=1)]
    book = demo_audiobook(tmp_path)
    pairs = demo_minimal_pairs(tmp_path)

    def evaluators(threads):
        return [LibriLightEvaluator(mimi, demo_config(audio_dir=book, max_frames=30, num_books=1, threads=threads)),
                LikelihoodEvaluator(mimi, LikelihoodConfig("sstorycloze", pairs, text="pad", threads=threads)),
                DialogueEvaluator(batches, chunk=8, threads=threads)]

    seen: list[int] = []
    hook = lm.transformer.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pinned = [ev(lm) for ev in evaluators(1)]
        assert torch.get_num_threads() == 2 and seen and set(seen) == {1}
        hook.remove()
        torch.set_num_threads(1)
        plain = [ev(lm) for ev in evaluators(None)]
    finally:
        torch.set_num_threads(before)
    for a, b in zip(pinned, plain):
        assert a.metrics == b.metrics
    pinned[0].write(tmp_path / "librilight")
    assert json.loads((tmp_path / "librilight" / "results.json").read_text())["runtime"]["threads"] == 1
    assert pinned[1].runtime["threads"] == 1 and pinned[2].runtime["threads"] == 1
    for make in (lambda: demo_config(threads=0), lambda: LikelihoodConfig("sstorycloze", pairs, threads=0).validate(),
                 lambda: DialogueEvaluator(batches, threads=0)):
        with pytest.raises(ConfigError, match="threads"):
            make()


def test_a_model_made_under_inference_mode_is_scored_as_any_other(tmp_path):
    """Its parameters are inference tensors, whose `requires_grad` torch refuses to set on outside inference mode:
    scoring must not fail on them (nor change their flags), and gives the numbers of the same weights made
    normally up to float rounding (torch takes its frozen-weight kernels for inference tensors)."""
    from moshi_eval import LikelihoodConfig, evaluate_likelihood
    from moshi_eval.demo import demo_lm, demo_mimi, demo_minimal_pairs
    pairs = demo_minimal_pairs(tmp_path)
    mimi = demo_mimi(seed=0)
    with torch.inference_mode():
        inference_lm = demo_lm(seed=0)
    inference_lm.requires_grad_(False)
    assert all(p.is_inference() for p in inference_lm.parameters())
    config = LikelihoodConfig("sstorycloze", pairs, text="pad")
    got = evaluate_likelihood(inference_lm, mimi, config)
    assert not any(p.requires_grad for p in inference_lm.parameters())
    plain = evaluate_likelihood(demo_lm(seed=0), mimi, config)
    assert got.scores.keys() == plain.scores.keys()
    for key, score in got.scores.items():
        assert score.log_likelihood == pytest.approx(plain.scores[key].log_likelihood, rel=1e-6)
    with torch.inference_mode():
        trainable = demo_lm(seed=0)         # made under inference mode, requires_grad left on
    evaluate_likelihood(trainable, mimi, config)
    assert all(p.requires_grad for p in trainable.parameters())
