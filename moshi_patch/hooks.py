"""Audio hooks in `LMGen.depformer_step`: the minimal change proposed to upstream moshi, and its source.

Upstream's `LMGen` lets a caller see the text logits (`on_text_logits_hook`) and change the text token
(`on_text_hook`) of each step, but nothing of the depth transformer between its codebooks. This change adds
two hooks, called by `depformer_step` for each audio codebook `cb_index` in order:
- `on_audio_logits_hook(cb_index, logits)`: the logits `[B, 1, 1, card]` its token is sampled from (after CFG);
- `on_audio_token_hook(cb_index, token)`: the token `[B]`, which the hook may change in place: the next
  codebook is conditioned on it, and it is the token the step returns.
Unset (the default) they cost one attribute test per codebook; under CUDA graphs they are captured with
`depformer_step`, so they must only read and write tensors that outlive the step.

One source of truth: the text below is what the pull request inserts into moshi's `moshi/models/lm.py`
(`python -m moshi_patch.upstream`), and what `hooked_depformer_step` inserts into the installed moshi's own
`LMGen.depformer_step` source for `moshi_patch.LMGen` when that moshi lacks the hooks. No line of moshi is
copied here: the method is rebuilt from the installed source at import.
"""
import ast
import inspect
import textwrap
import types
import typing as tp

# Class attributes of `LMGen`: the hooks, unset.
ATTRIBUTES = '''\
# Audio hooks, called by `depformer_step` for each codebook `cb_index` in order: `on_audio_logits_hook(cb_index,
# logits)` with the logits `[B, 1, 1, card]` its token is sampled from (after CFG), then
# `on_audio_token_hook(cb_index, token)` with the token `[B]`, which the hook may change in place: the next
# codebook is conditioned on it. Under CUDA graphs they are captured with `depformer_step`.
on_audio_logits_hook: tp.Optional[tp.Callable[[int, torch.Tensor], None]] = None
on_audio_token_hook: tp.Optional[tp.Callable[[int, torch.Tensor], None]] = None
'''
# Inside `depformer_step`'s loop over the codebooks: before the token is sampled, and once it is chosen.
LOGITS_CALL = '''\
if self.on_audio_logits_hook is not None:
    self.on_audio_logits_hook(cb_index, logits)
'''
TOKEN_CALL = '''\
if self.on_audio_token_hook is not None:
    self.on_audio_token_hook(cb_index, next_token)
'''


class HookAnchorError(RuntimeError):
    """`depformer_step` is not the shape the hooks are inserted into (another version of moshi)."""


def _depformer_loop(tree: ast.AST) -> ast.For:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "depformer_step":
            for inner in ast.walk(node):
                if isinstance(inner, ast.For) and isinstance(inner.target, ast.Name) and inner.target.id == "cb_index":
                    return inner
            raise HookAnchorError("`LMGen.depformer_step` has no `for cb_index in ...` loop")
    raise HookAnchorError("no `LMGen.depformer_step`")


def insertions(source: str) -> list[tuple[int, int, str]]:
    """Where the hook calls go in `source` (moshi's lm.py, or the source of `depformer_step` alone):
    `(0-based line to insert before, indent, text)`, before the statement that samples the codebook's token
    (`next_token = sample_token(...)`) and before `depformer_tokens.append(next_token)`."""
    loop = _depformer_loop(ast.parse(source))
    sample = append = None
    for statement in loop.body:
        if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Call)
                and isinstance(statement.value.func, ast.Name) and statement.value.func.id == "sample_token"):
            sample = statement
        elif (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)
              and isinstance(statement.value.func, ast.Attribute) and statement.value.func.attr == "append"):
            append = statement
    if sample is None or append is None:
        raise HookAnchorError("`depformer_step` does not sample with `next_token = sample_token(...)` and "
                              "`depformer_tokens.append(next_token)` in its codebook loop")
    return [(sample.lineno - 1, sample.col_offset, LOGITS_CALL), (append.lineno - 1, append.col_offset, TOKEN_CALL)]


def insert(source: str, places: list[tuple[int, int, str]]) -> str:
    """`source` with each text of `places` inserted, indented, before its line."""
    lines = source.split("\n")
    for index, column, text in sorted(places, reverse=True):
        body = text[:-1] if text.endswith("\n") else text   # a text ending in a blank line keeps it
        lines[index:index] = [" " * column + line if line else "" for line in body.split("\n")]
    return "\n".join(lines)


def has_hooks(lm_gen_class: type) -> bool:
    """Whether this `LMGen` (a moshi with the change applied) calls the audio hooks already."""
    return hasattr(lm_gen_class, "on_audio_token_hook") and "on_audio_token_hook" in inspect.getsource(
        lm_gen_class.depformer_step)


def hooked_depformer_step(lm_module: types.ModuleType) -> tp.Callable:
    """`LMGen.depformer_step` of the installed moshi with the hook calls inserted, compiled in the namespace
    of `moshi/models/lm.py` (it is upstream's method, plus the calls of the pull request)."""
    source = textwrap.dedent(inspect.getsource(lm_module.LMGen.depformer_step))
    code = compile(insert(source, insertions(source)), f"{lm_module.__file__} (+ moshi_patch audio hooks)", "exec")
    namespace: dict[str, tp.Any] = {}
    exec(code, vars(lm_module), namespace)
    return namespace["depformer_step"]
