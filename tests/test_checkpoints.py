"""Real checkpoints without silent errors: LoRA adapters (moshi-finetune's shapes), merged weights under a
`lora: true` config, moshi-finetune checkpoint folders, parameters no file sets, content identity, and the
supported moshi versions."""
from pathlib import Path
import shutil

import pytest
import torch
from moshi.models import loaders
from moshi.modules.lora import LoRALinear
from safetensors.torch import load_file, save_file

from helpers.checkpoint_factory import write_lora_adapters, write_tiny_checkpoint
from helpers.lm_factory import random_codes
from moshi_eval.checkpoint import CheckpointError, resolve_checkpoint
from moshi_eval.cli.commands import build_parser, main
from moshi_eval.files.hashing import FileHasher
from moshi_patch.compat import check_moshi_version

RANK, SCALING = 4, 2.0


def _args(ckpt_args: list[str], *extra: str):
    return build_parser().parse_args(["librilight", "--audio-dir", "unused", "--out", "unused", "--device", "cpu",
                                      *ckpt_args, *extra])


def _replace(args: list[str], flag: str, value) -> list[str]:
    args = list(args)
    if value is None:
        i = args.index(flag)
        del args[i:i + 2]
    else:
        args[args.index(flag) + 1] = str(value)
    return args


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """The tiny base checkpoint, LoRA adapters in moshi-finetune's shapes (non-zero A and B, saved from
    moshi's own `replace_all_linear_with_lora`), and the merged model computed independently."""
    root = tmp_path_factory.mktemp("lora")
    base = write_tiny_checkpoint(root / "base")
    lora_config, lora_weights, model = write_lora_adapters(base, root, RANK, SCALING, std=0.05)

    # Independent merge: W + scaling * B @ A (LoRALinear.merge_weight) into a plain model.
    merged_state = {}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            merged_state[f"{name}.weight"] = module.merge_weight()
    merged = loaders.get_moshi_lm(str(base["moshi_weights"]), lm_kwargs=base["lm_config"], device="cpu",
                                  dtype=torch.float32)
    state = merged.state_dict()
    assert set(merged_state) <= set(state)
    state.update(merged_state)
    merged.load_state_dict(state)
    merged_weights = root / "consolidated.safetensors"
    save_file({k: v.contiguous() for k, v in merged.state_dict().items()}, str(merged_weights))
    base_model = loaders.get_moshi_lm(str(base["moshi_weights"]), lm_kwargs=base["lm_config"], device="cpu",
                                      dtype=torch.float32)
    return {"root": root, "base": base, "lora_config": lora_config, "lora_weights": lora_weights,
            "merged": merged.eval(), "merged_weights": merged_weights, "base_model": base_model.eval(),
            "num_lora_layers": sum(isinstance(m, LoRALinear) for m in model.modules())}


def _logits(lm, seed: int = 0) -> torch.Tensor:
    """Audio logits of `LMModel.forward` on random codes, at the valid positions: `[N, card]`."""
    codes = random_codes(lm, 2, 10, seed=seed)
    with torch.no_grad():
        out = lm(codes)
    return out.logits[out.mask]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_lora_adapters_give_the_merged_model(finetuned, fuse):
    ckpt_args = _replace(finetuned["base"]["cli_args"], "--config", finetuned["lora_config"])
    fuse_flag = "--fuse-lora" if fuse else "--no-fuse-lora"
    args = _args(ckpt_args, "--lora-weight", str(finetuned["lora_weights"]), fuse_flag)
    resolved = resolve_checkpoint(args)
    lm = resolved.load().lm_model
    layers = sum(isinstance(m, LoRALinear) for m in lm.modules())
    assert layers == (0 if fuse else finetuned["num_lora_layers"]) and finetuned["num_lora_layers"] > 50
    reference = _logits(finetuned["merged"])
    torch.testing.assert_close(_logits(lm), reference, atol=1e-5, rtol=0)
    # Not vacuous: the adapters move the logits away from the base model's.
    assert (reference - _logits(finetuned["base_model"])).abs().max() > 0.1
    lora = resolved.identity["lora"]
    assert lora["status"].startswith("loaded from the LoRA weights") and lora["fused"] is fuse
    assert lora["weights"]["sha256"] == FileHasher().identity(finetuned["lora_weights"])["sha256"]


def test_lora_config_with_merged_weights_loads_without_lora_layers(finetuned, capsys):
    ckpt_args = _replace(finetuned["base"]["cli_args"], "--config", finetuned["lora_config"])
    ckpt_args = _replace(ckpt_args, "--moshi-weight", finetuned["merged_weights"])
    resolved = resolve_checkpoint(_args(ckpt_args))
    assert "merged weights" in capsys.readouterr().err
    lm = resolved.load().lm_model
    assert not any(isinstance(m, LoRALinear) for m in lm.modules())
    torch.testing.assert_close(_logits(lm), _logits(finetuned["merged"]), atol=1e-6, rtol=0)
    assert resolved.identity["lora"]["status"].startswith("ignored")
    assert resolved.identity["lm_config"]["lora"] is False
    # moshi's own loader on the same files: random LoRA layers, logits far off (what this guards against).
    info = loaders.CheckpointInfo.from_hf_repo("unused", moshi_weights=finetuned["merged_weights"],
                                               mimi_weights=finetuned["base"]["mimi_weights"],
                                               tokenizer=finetuned["base"]["tokenizer"],
                                               config_path=finetuned["lora_config"])
    torch.manual_seed(0)
    wrong = info.get_moshi(device="cpu", dtype=torch.float32)
    assert (_logits(wrong) - _logits(finetuned["merged"])).abs().max() > 0.1


def test_a_parameter_no_file_sets_is_named(finetuned, tmp_path):
    state = load_file(str(finetuned["base"]["moshi_weights"]))
    del state["text_linear.weight"]
    partial = tmp_path / "partial.safetensors"
    save_file(state, str(partial))
    ckpt_args = _replace(finetuned["base"]["cli_args"], "--moshi-weight", partial)
    with pytest.raises(CheckpointError, match=r"set by no file \(text_linear.weight\).*random initialisation"):
        resolve_checkpoint(_args(ckpt_args)).load()
    # LoRA adapters missing one layer: its A and B would stay random.
    adapters = load_file(str(finetuned["lora_weights"]))
    dropped = sorted(k for k in adapters if k.startswith("text_linear."))
    for key in dropped:
        del adapters[key]
    partial_lora = tmp_path / "partial_lora.safetensors"
    save_file(adapters, str(partial_lora))
    ckpt_args = _replace(finetuned["base"]["cli_args"], "--config", finetuned["lora_config"])
    with pytest.raises(CheckpointError, match=r"set by no file \(text_linear.lora_A.weight"):
        resolve_checkpoint(_args(ckpt_args, "--lora-weight", str(partial_lora))).load()


def test_lora_weight_without_lora_config_is_refused(finetuned):
    args = _args(finetuned["base"]["cli_args"], "--lora-weight", str(finetuned["lora_weights"]))
    with pytest.raises(CheckpointError, match="no `lora: true`"):
        resolve_checkpoint(args)


def _finetune_folder(root: Path, finetuned, weights: list[str]) -> Path:
    """`root/checkpoint_000100/consolidated/` with config.json and the named weight files."""
    folder = root / "checkpoint_000100" / "consolidated"
    folder.mkdir(parents=True)
    shutil.copy(finetuned["lora_config"], folder / "config.json")
    for name in weights:
        source = finetuned["lora_weights"] if name == "lora.safetensors" else finetuned["merged_weights"]
        shutil.copy(source, folder / name)
    return folder


def test_checkpoint_dir_shapes(finetuned, tmp_path):
    reference = _logits(finetuned["merged"])
    no_config = _replace(finetuned["base"]["cli_args"], "--config", None)
    # Adapters: the base model's weights from --moshi-weight (or the repo), the adapters from the folder.
    adapters = _finetune_folder(tmp_path / "a", finetuned, ["lora.safetensors"])
    for given in (adapters, adapters.parent):            # the consolidated/ folder or the checkpoint's
        resolved = resolve_checkpoint(_args(no_config, "--checkpoint-dir", str(given)))
        torch.testing.assert_close(_logits(resolved.load().lm_model), reference, atol=1e-5, rtol=0)
        assert resolved.identity["lora"]["status"].startswith("loaded from the LoRA weights")
    # Merged weights: consolidated.safetensors is the LM.
    merged = _finetune_folder(tmp_path / "m", finetuned, ["consolidated.safetensors"])
    no_lm = _replace(no_config, "--moshi-weight", None)
    resolved = resolve_checkpoint(_args(no_lm, "--checkpoint-dir", str(merged)))
    torch.testing.assert_close(_logits(resolved.load().lm_model), reference, atol=1e-6, rtol=0)
    assert resolved.identity["moshi_weights"]["path"].endswith("consolidated.safetensors")
    with pytest.raises(CheckpointError, match="both give it"):
        resolve_checkpoint(_args(no_config, "--checkpoint-dir", str(merged)))


@pytest.mark.parametrize("weights,message", [
    ([], r"no weights: expected lora.safetensors .* or consolidated.safetensors"),
    (["lora.safetensors", "consolidated.safetensors"], "ambiguous"),
])
def test_checkpoint_dir_incomplete_or_ambiguous(finetuned, tmp_path, weights, message):
    folder = _finetune_folder(tmp_path, finetuned, weights)
    no_config = _replace(finetuned["base"]["cli_args"], "--config", None)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(_args(no_config, "--checkpoint-dir", str(folder)))
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve_checkpoint(_args(no_config, "--checkpoint-dir", str(folder)))


def test_cli_checkpoint_dir_error_exit_code(finetuned, tmp_path, capsys):
    args = ["check-streaming", "--checkpoint-dir", str(tmp_path / "missing"), "--frames", "4"]
    assert main(args) == 2
    assert "not a folder" in capsys.readouterr().err


def test_sha256_identity_changes_with_one_byte(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(1000))
    hasher = FileHasher(tmp_path / "hashes")
    first = hasher.identity(path)
    assert FileHasher(tmp_path / "hashes").identity(path) == first          # cached on disk, same answer
    data = bytearray(path.read_bytes())
    data[500] ^= 1
    path.write_bytes(bytes(data))
    second = FileHasher(tmp_path / "hashes").identity(path)
    assert second["size"] == first["size"] and second["sha256"] != first["sha256"]


def test_unsupported_moshi_version_fails_at_import(monkeypatch):
    supported = ((0, 2, 9), (0, 2, 13))
    for version in ("0.2.9", "0.2.13", "0.2.13.post1"):
        check_moshi_version("moshi_patch", supported, version)
    for version in ("0.2.8", "0.3.0", "unknown"):
        with pytest.raises(ImportError, match=rf"moshi_patch supports moshi 0.2.9 to 0.2.13, but moshi {version} is"):
            check_moshi_version("moshi_patch", supported, version)
    monkeypatch.setenv("MOSHI_PATCH_SKIP_VERSION_CHECK", "1")
    check_moshi_version("moshi_patch", supported, "0.2.8")
