"""Loading a Moshi checkpoint (LM, Mimi, text tokenizer) through moshi's own `loaders.CheckpointInfo`.

Either a Hugging Face repo (`--hf-repo kyutai/moshiko-pytorch-bf16`, each file overridable by a local
path or `hf://repo/file`), or local files only: `--config` (the repo's `config.json`), `--moshi-weight`
and `--mimi-weight` (and optionally `--mimi-config`, `--tokenizer`).

The LM and Mimi come back frozen (`requires_grad` False on every parameter; the evaluators turn it on while
they score, as for any model: `scoring.model_call.scoring_mode`), LoRA adapters merged in float32 and rounded once
to the dtype.
Training such a model on CPU: moshi compiles a few functions with `torch.compile` on their first call (about
90 s for the first step of a small model); `NO_TORCH_COMPILE=1` in the environment before moshi is imported
skips it.
"""
import contextlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
import sys
import typing as tp

import torch
from moshi.models import loaders
from moshi.models.compression import MimiModel
from moshi.models.lm import LMModel
from moshi.modules.lora import LoRALinear, replace_lora_with_linear
from safetensors.torch import load_file

from .config import ModelSource
from .errors import MoshiEvalError
from .files.hashing import FileHasher


class CheckpointError(MoshiEvalError, ValueError):
    """A checkpoint that cannot be loaded, or a codec that does not fit the model; the message says why."""


@dataclass
class LoadedCheckpoint:
    lm_model: LMModel                      # eval mode, frozen (requires_grad False)
    mimi: MimiModel                        # eval mode, frozen
    text_tokenizer: tp.Any | None          # sentencepiece.SentencePieceProcessor, None if no tokenizer file
    identity: dict = field(default_factory=dict)   # repo, files (path, size), config: what the numbers depend on


@dataclass
class ResolvedCheckpoint:
    """A checkpoint located (downloaded if needed) but not loaded yet: its identity is known cheaply."""
    info: loaders.CheckpointInfo     # its `lm_config` is the config the model is built from
    device: torch.device
    dtype: torch.dtype
    identity: dict
    fuse_lora: bool = True

    def load(self) -> LoadedCheckpoint:
        """The LM, Mimi and tokenizer, each failure naming the file (or config key) it came from."""
        _check_codec_config(self.info.lm_config, self.info.mimi_config)
        lm_model = load_lm(self.info, self.device, self.dtype, self.fuse_lora)
        try:
            with _weights_only_torch_load():      # moshi's loader reads a non-safetensors Mimi with torch.load
                mimi = self.info.get_mimi(device=self.device)
        except Exception as exc:   # safetensors, torch, moshi's asserts: name the file
            raise _mimi_error(Path(self.info.mimi_weights), self.info.mimi_config, exc) from exc
        lm_model.eval()
        mimi.eval().requires_grad_(False)      # as the LM: kernels for frozen weights (the codes depend on them)
        tokenizer = None
        if Path(self.info.tokenizer).is_file():
            try:
                tokenizer = self.info.get_text_tokenizer()
            except Exception as exc:   # safetensors, torch, moshi's asserts: name the file
                raise CheckpointError(f"cannot load the text tokenizer {self.info.tokenizer}: "
                                      f"{type(exc).__name__}: {exc}") from exc
        return LoadedCheckpoint(lm_model, mimi, tokenizer, self.identity)


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise CheckpointError(f"--device: not a torch device: {device!r} ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CheckpointError(f"--device {device}: CUDA is not available on this machine.")
    if dev.type == "cpu" and dev.index not in (None, 0):
        raise CheckpointError(f"--device {device}: torch has a single CPU device, `cpu`; its threads are set by "
                              "--threads (where the command has it).")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CheckpointError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    if dev.type == "meta":
        raise CheckpointError(f"--device {device}: the meta device holds no data, nothing can be scored on it: "
                              "use cpu or cuda.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    value = getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise CheckpointError(f"--dtype: expected float32, bfloat16 or float16, got {dtype!r}.")
    return value


def _file_identity(path: Path, hasher: FileHasher) -> dict:
    """Path, size, mtime and sha256 of a weight file: a file replaced at the same path is another model."""
    try:
        return hasher.identity(path)
    except OSError as exc:
        raise CheckpointError(f"cannot read the weight file {path}: {exc.strerror or exc}") from exc


# Keys of moshi's LM config.json that the model is built from: (key, what it must be).
_LM_CONFIG_KEYS = {"dim": "a positive integer", "num_heads": "a positive integer", "num_layers": "a positive integer",
                   "card": "a positive integer", "text_card": "a positive integer", "n_q": "a positive integer",
                   "dep_q": "an integer >= 0", "context": "a positive integer (frames of attention)",
                   "delays": "a list of n_q + 1 integers >= 0"}


def _check_lm_config(config: dict | None, source: str) -> None:
    """Raise CheckpointError naming the first key of `config` that is missing or of the wrong type."""
    if config is None:
        return
    for key, expected in _LM_CONFIG_KEYS.items():
        value = config.get(key)
        if key == "delays":
            n_q = config.get("n_q")
            ok = (isinstance(value, list) and all(isinstance(d, int) and d >= 0 for d in value)
                  and (not isinstance(n_q, int) or len(value) == n_q + 1))
        elif key == "dep_q":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
        if not ok:
            what = "is missing" if key not in config else f"is {value!r}"
            raise CheckpointError(f"{source}: key {key!r} {what}, expected {expected}.")


def _check_codec_config(lm_config: dict | None, mimi_config: dict | None) -> None:
    """A codec config with fewer codebooks than the model's streams need: say so before moshi's loader
    asserts on it."""
    if lm_config is None or mimi_config is None:
        return
    total = mimi_config.get("quantizer", {}).get("n_q")
    needed = max(lm_config["dep_q"], lm_config["n_q"] - lm_config["dep_q"])
    if isinstance(total, int) and total < needed:
        raise CheckpointError(
            f"the codec does not fit the model: the Mimi config has {total} codebooks (quantizer n_q), the model's "
            f"audio streams take {needed} (dep_q = {lm_config['dep_q']}, n_q = {lm_config['n_q']}).")


LORA_KEYS = (".lora_A.", ".lora_B.")


def _weight_keys(path: Path) -> list[str]:
    """Names of the tensors of a weight file (safetensors: read from its header, nothing loaded)."""
    if not loaders._is_safetensors(path):
        return list(_read_state(path, "cpu"))
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:
        raise CheckpointError(f"cannot read the weight file {path}: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _weights_only_torch_load() -> tp.Iterator[None]:
    """`torch.load` with `weights_only=True` for the duration, for the loaders of moshi that call it without:
    on torch < 2.6 (which setup.py allows) a pickled weight file would otherwise run code when loaded."""
    real = torch.load

    def load(*args: tp.Any, **kwargs: tp.Any) -> tp.Any:
        kwargs["weights_only"] = True
        return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _read_state(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A weight file's tensors, as moshi's loader reads them (safetensors, or a torch `fsdp_best_state`)."""
    try:
        if loaders._is_safetensors(path):
            return load_file(str(path), device=str(device))
        # weights_only: torch < 2.6 (allowed by setup.py) unpickles anything by default, and a pickle runs code.
        return torch.load(path, "cpu", weights_only=True)["fsdp_best_state"]["model"]
    except Exception as exc:   # safetensors, pickle, zip, OS errors: name the file
        raise CheckpointError(f"cannot load the weight file {path}: {type(exc).__name__}: {exc}") from exc


def _plan_lora(info: loaders.CheckpointInfo, fuse: bool) -> dict:
    """What to do with LoRA, decided before anything is loaded; may turn LoRA off in `info.lm_config`.

    moshi-finetune writes `lora: true` in config.json whenever LoRA training was on, also next to merged
    weights, and moshi's loader then wraps every linear in a LoRA layer whose A and B stay random. Here:
    adapters given (--lora-weight, a checkpoint folder) are loaded; LoRA keys in the LM weights are loaded;
    neither: the weights are merged ones, and the model is built without LoRA layers (said on stderr).
    """
    config = info.lm_config or {}
    wants = bool(config.get("lora", False))
    if info.lora_weights is not None and not wants:
        raise CheckpointError(f"--lora-weight {info.lora_weights} is given but the LM config has no `lora: true` "
                              "(nor its `lora_rank` and `lora_scaling`): use the config.json saved with the "
                              "adapters (moshi-finetune's consolidated/config.json).")
    if not wants:
        return {"status": "none"}
    plan = {"rank": config.get("lora_rank", 128), "scaling": config.get("lora_scaling", 2.0), "fused": fuse}
    if info.lora_weights is not None:
        return dict(plan, status="loaded from the LoRA weights file")
    if any(marker in key for key in _weight_keys(Path(info.moshi_weights)) for marker in LORA_KEYS):
        return dict(plan, status="loaded from the LM weights (they hold LoRA keys)")
    info.lm_config = dict(config, lora=False)
    print(f"moshi-eval: the LM config says `lora: true` but no LoRA weights were given and the LM weights "
          f"{info.moshi_weights} hold no LoRA keys: they are merged weights, loaded without LoRA layers (a LoRA "
          "layer would keep random A and B).", file=sys.stderr)
    return {"status": "ignored: merged weights without LoRA keys, loaded without LoRA layers"}


def _mimi_error(path: Path, mimi_config: dict | None, exc: Exception) -> CheckpointError:
    """The error of a failed Mimi load, on one line. Weights that do not fit the Mimi config (another codec than
    the default Mimi, given without its config): the first mismatching tensor and `--mimi-config`, instead of
    torch's list of every tensor (29 KB for a codec of another width)."""
    text = str(exc)
    if isinstance(exc, RuntimeError) and text.startswith("Error(s) in loading state_dict"):
        lines = [line.strip() for line in text.splitlines()[1:] if line.strip()]
        mismatches = [line for line in lines if line.startswith("size mismatch")]
        if mismatches:
            first = mismatches[0].rstrip(".")
            what = f"{first} (1 of {len(mismatches)} tensors of another shape)" if len(mismatches) > 1 else first
        else:      # names only: missing or unexpected keys, the first few
            head, _, rest = (lines[0] if lines else text).partition(": ")
            names = re.findall(r'"([^"]+)"', rest)
            what = f"{head}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''} ({len(names)} in all)"
        config = "the default Mimi config" if mimi_config is None else "the given Mimi config"
        hint = "" if mismatches else "Is it a Mimi weights file? "
        return CheckpointError(
            f"cannot load the Mimi weights {path}: they do not fit {config}: {what}. {hint}A codec other than "
            "the default Mimi needs its config: give --mimi-config (the JSON saved with the codec).")
    one_line = " ".join(text.split())
    return CheckpointError(f"cannot load the Mimi weights {path}: {type(exc).__name__}: {one_line}")


def _load_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of tensor `key` in a model of `dtype`, as moshi's loader sets it: conditioners stay float32."""
    return torch.float32 if key.startswith("condition_provider.") or key.startswith("fuser.") else dtype


def _lora_tensor_keys(model: torch.nn.Module) -> set[str]:
    """The state keys of the LoRA layers of `model`: each one's `frozen_W`, `lora_A` and `lora_B` weights, and
    the plain `weight` key that `LoRALinear`'s load hook renames to `frozen_W.weight`."""
    keys = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{name}." if name else ""
            keys |= {f"{prefix}weight", f"{prefix}frozen_W.weight", f"{prefix}lora_A.weight",
                     f"{prefix}lora_B.weight"}
    return keys


@torch.no_grad()
def _fuse_lora_float32(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Merge every LoRA layer of `model` with moshi's `replace_lora_with_linear` in float32, one parent module
    at a time (children before parents), and round each merged weight once to its dtype (`_load_dtype`).

    Merged in bfloat16, W, B @ A and their sum are each rounded: the fused model is then not the trained
    (float32) one rounded to bfloat16. One parent at a time: the float32 copies held at once are that
    module's LoRA layers only."""
    parents = [(name, module) for name, module in model.named_modules()
               if any(isinstance(child, LoRALinear) for child in module.children())]
    for name, parent in reversed(parents):      # named_modules is pre-order: reversed, descendants first
        children = [child_name for child_name, child in parent.named_children() if isinstance(child, LoRALinear)]
        for child_name in children:
            getattr(parent, child_name).float()
        replace_lora_with_linear(parent)         # only `children` are left to merge under `parent`
        for child_name in children:
            full = f"{name}.{child_name}" if name else child_name
            getattr(parent, child_name).to(_load_dtype(f"{full}.weight", dtype))


def load_lm(info: loaders.CheckpointInfo, device: torch.device, dtype: torch.dtype, fuse_lora: bool) -> LMModel:
    """The LM of `info` (moshi's own model, LoRA layers included when the config asks for them), with every
    parameter set by a file: one that no file sets (it would keep its random initialisation) is an error
    naming it. Eval mode, every parameter frozen (`requires_grad` False).

    LoRA adapters are merged into the weights when `fuse_lora`: in float32 (the LoRA layers' tensors are kept
    in the files' dtype until then), each merged weight rounded once to `dtype`, so that a bfloat16 model
    fused is bitwise the float32 fused model cast to bfloat16, and differs from the unfused one by bfloat16's
    rounding only. Unfused, the LoRA layers are in `dtype`, as moshi's loader has them."""
    fuse = fuse_lora and bool((info.lm_config or {}).get("lora"))
    model = loaders.get_moshi_lm(None, lm_kwargs=info.lm_config, device="meta", dtype=dtype)
    keep = _lora_tensor_keys(model) if fuse else set()   # merged in float32 below, from the files' values
    files = [Path(info.moshi_weights)] + ([Path(info.lora_weights)] if info.lora_weights is not None else [])
    for path in files:
        state = _read_state(path, device)
        for key, value in state.items():
            if value.dtype.is_floating_point and key not in keep:   # as moshi's loader
                state[key] = value.to(_load_dtype(key, dtype))
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise CheckpointError(f"{path} holds {len(result.unexpected_keys)} tensors the model does not have "
                                  f"({', '.join(result.unexpected_keys[:5])}): another architecture or config?")
    unset = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if unset:
        raise CheckpointError(
            f"{len(unset)} parameters of the model are set by no file ({', '.join(unset[:5])}"
            f"{', ...' if len(unset) > 5 else ''}): they would keep a random initialisation. Files read: "
            f"{', '.join(map(str, files))}.")
    model = model.to(device)
    if fuse:
        _fuse_lora_float32(model, dtype)
    model.requires_grad_(False)
    return model.eval()


def _checkpoint_dir_files(folder: Path) -> dict[str, Path]:
    """config.json and the weights of a moshi-finetune checkpoint folder (or its consolidated/ folder)."""
    if not folder.is_dir():
        raise CheckpointError(f"--checkpoint-dir {folder}: not a folder.")
    if (folder / "consolidated").is_dir():
        folder = folder / "consolidated"
    names = ("config.json", "lora.safetensors", "consolidated.safetensors")
    config, lora, merged = (folder / name for name in names)
    if not config.is_file():
        raise CheckpointError(f"--checkpoint-dir {folder}: no config.json (moshi-finetune saves it beside the "
                              "weights, in checkpoint_NNNNNN/consolidated/).")
    if lora.is_file() and merged.is_file():
        raise CheckpointError(f"--checkpoint-dir {folder}: holds both lora.safetensors and consolidated.safetensors: "
                              "ambiguous. Give --lora-weight (adapters on the base model) or --moshi-weight "
                              "(merged weights) with --config instead.")
    if not lora.is_file() and not merged.is_file():
        raise CheckpointError(f"--checkpoint-dir {folder}: no weights: expected lora.safetensors (LoRA adapters) or "
                              "consolidated.safetensors (full weights) beside config.json.")
    return {"config": config, "lora": lora} if lora.is_file() else {"config": config, "moshi": merged}


def resolve_checkpoint(args: ModelSource, hasher: FileHasher | None = None) -> ResolvedCheckpoint:
    """Locate the checkpoint files (downloading from the hub if a repo is given) without loading them.

    The identity holds each weight file's path, size, mtime and sha256 (`hasher` caches the digests).

    Raises:
        CheckpointError: neither a repo nor local files given, a local file missing, a download failure,
            a config key missing or of the wrong type.
    """
    hasher = hasher or FileHasher()
    device = resolve_device(getattr(args, "device", None))
    dtype = resolve_dtype(getattr(args, "dtype", None), device)
    hf_repo = getattr(args, "hf_repo", None)
    local = {"--moshi-weight": args.moshi_weight, "--mimi-weight": args.mimi_weight,
             "--tokenizer": args.tokenizer, "--config": args.config, "--mimi-config": args.mimi_config,
             "--lora-weight": getattr(args, "lora_weight", None)}
    checkpoint_dir = getattr(args, "checkpoint_dir", None)
    if checkpoint_dir is not None:
        found = _checkpoint_dir_files(Path(checkpoint_dir))
        for flag, key in (("--config", "config"), ("--moshi-weight", "moshi"), ("--lora-weight", "lora")):
            if key in found:
                if local[flag] is not None:
                    raise CheckpointError(f"{flag} {local[flag]} and --checkpoint-dir {checkpoint_dir} (which "
                                          f"holds {found[key].name}) both give it: keep one.")
                local[flag] = str(found[key])
    if hf_repo is None:
        missing = [flag for flag in ("--config", "--moshi-weight", "--mimi-weight") if local[flag] is None]
        if missing:
            raise CheckpointError(
                f"no checkpoint: give --hf-repo (e.g. {loaders.DEFAULT_REPO}), or local files with "
                f"--config, --moshi-weight and --mimi-weight (missing: {', '.join(missing)}).")
    for flag, value in local.items():
        if value is not None and not str(value).startswith("hf://") and not Path(value).is_file():
            raise CheckpointError(f"{flag}: no such file: {value}")
    for flag in ("--config", "--mimi-config"):
        value = local[flag]
        if value is not None and not str(value).startswith("hf://"):
            try:
                json.loads(Path(value).read_text())
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise CheckpointError(f"{flag} {value}: not a JSON file ({exc}).") from exc
    try:
        info = loaders.CheckpointInfo.from_hf_repo(
            hf_repo, moshi_weights=local["--moshi-weight"], mimi_weights=local["--mimi-weight"],
            tokenizer=local["--tokenizer"], config_path=local["--config"], mimi_config_path=local["--mimi-config"],
            lora_weights=local["--lora-weight"])
    except Exception as exc:   # hub errors (offline, missing repo/file, auth)
        # Name what needed the hub: the hf:// arguments first (the repo only supplies the files not given).
        remote = [f"{flag} {value}" for flag, value in local.items() if str(value).startswith("hf://")]
        remote += [f"--hf-repo {hf_repo}"] if hf_repo is not None else []
        raise CheckpointError(f"cannot locate the checkpoint ({', '.join(remote)}: from the Hugging Face hub, or "
                              f"its local cache when offline): {type(exc).__name__}: {exc}") from exc
    _check_lm_config(info.lm_config, f"LM config {local['--config'] or hf_repo}")
    fuse = getattr(args, "fuse_lora", True)
    lora = _plan_lora(info, fuse)
    if info.lora_weights is not None:
        lora["weights"] = _file_identity(Path(info.lora_weights), hasher)
    identity = {
        "hf_repo": hf_repo,
        "checkpoint_dir": None if checkpoint_dir is None else str(Path(checkpoint_dir).resolve()),
        "moshi_weights": _file_identity(Path(info.moshi_weights), hasher),
        "mimi_weights": _file_identity(Path(info.mimi_weights), hasher),
        "lora": lora,
        "lm_config": info.lm_config,      # as the model is built (LoRA off for merged weights)
        "mimi_config": info.mimi_config,
        "model_type": info.model_type,
        "model_id": info.model_id,
        "dtype": str(dtype).replace("torch.", ""),
    }
    return ResolvedCheckpoint(info, device, dtype, identity, fuse_lora=fuse)


def load_checkpoint(args: ModelSource) -> LoadedCheckpoint:
    """The LM (eval mode, frozen), Mimi (eval mode, frozen) and text tokenizer named by the checkpoint arguments."""
    return resolve_checkpoint(args).load()


def check_codec_fits(lm_model: LMModel, mimi: MimiModel) -> None:
    """Raise CheckpointError unless Mimi's codes can fill the model's audio streams.

    The model's own stream takes `dep_q` codebooks of `card` entries, the user stream `n_q - dep_q`.
    """
    needed = max(lm_model.dep_q, lm_model.n_q - lm_model.dep_q)
    problems = []
    if lm_model.dep_q == 0:
        problems.append("the model has no audio output stream (dep_q = 0)")
    if mimi.num_codebooks != lm_model.dep_q:
        problems.append(f"the codec gives {mimi.num_codebooks} codebooks, the model's audio stream takes "
                        f"dep_q = {lm_model.dep_q}")
    if mimi.num_codebooks < needed:
        problems.append(f"the user stream needs {lm_model.n_q - lm_model.dep_q} codebooks")
    if mimi.cardinality != lm_model.card:
        problems.append(f"the codec's codebooks have {mimi.cardinality} entries, the model's card is "
                        f"{lm_model.card}")
    if problems:
        raise CheckpointError("the codec does not fit the model: " + "; ".join(problems) + ".")
