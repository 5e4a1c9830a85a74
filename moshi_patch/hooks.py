"""The first upstream pull request: audio hooks in `LMGen.depformer_step`, as text to insert into moshi.

Upstream's `LMGen` takes `on_text_logits_hook` (the text logits of each step) and `on_text_hook` (the text
token) as constructor arguments, but nothing of the depth transformer between its codebooks. This change adds
two more, called by `depformer_step` for each audio codebook `cb_index` in order:
- `on_audio_logits_hook(cb_index, logits)`: the logits `[B, 1, 1, card]` its token is sampled from (after CFG;
  the hook may edit them in place, as `on_text_logits_hook` may);
- `on_audio_token_hook(cb_index, token)`: the token `[B]`, which the hook may change in place: the next
  codebook is conditioned on it, and it is the token the step returns.
Unset (the default) they cost one attribute test per codebook; under CUDA graphs they are captured with
`depformer_step`, so they must only read and write tensors that outlive the step.

Only `python -m moshi_patch.upstream` uses this module, to write the pull request (into a copy of moshi's
`moshi/models/lm.py`); `moshi_patch` itself neither imports it nor changes moshi.
"""
import ast

# Appended to the parameters of `LMGen.__init__` (after the last one: callers passing arguments by position
# are not affected).
PARAMETERS = '''\
on_audio_logits_hook: tp.Optional[tp.Callable[[int, torch.Tensor], None]] = None,
on_audio_token_hook: tp.Optional[tp.Callable[[int, torch.Tensor], None]] = None,
'''
# In `LMGen.__init__`, after `self.on_audio_hook = on_audio_hook`.
ASSIGNMENTS = '''\
# Called by `depformer_step` for each codebook `cb_index` in order:
# `on_audio_logits_hook(cb_index, logits)` with the logits `[B, 1, 1, card]` its token is sampled
# from (after CFG), then `on_audio_token_hook(cb_index, token)` with the token `[B]`, which the hook
# may change in place: the next codebook is conditioned on it. Under CUDA graphs they are captured
# with `depformer_step`.
self.on_audio_logits_hook = on_audio_logits_hook
self.on_audio_token_hook = on_audio_token_hook
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
    """`LMGen` is not the shape the hooks are inserted into (another version of moshi)."""


def _lm_gen(tree: ast.AST) -> ast.ClassDef:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "LMGen":
            return node
    raise HookAnchorError("no class `LMGen`")


def _method(lm_gen: ast.ClassDef, name: str) -> ast.FunctionDef:
    for node in lm_gen.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return node
    raise HookAnchorError(f"no `LMGen.{name}`")


def _depformer_loop(lm_gen: ast.ClassDef) -> ast.For:
    for inner in ast.walk(_method(lm_gen, "depformer_step")):
        if isinstance(inner, ast.For) and isinstance(inner.target, ast.Name) and inner.target.id == "cb_index":
            return inner
    raise HookAnchorError("`LMGen.depformer_step` has no `for cb_index in ...` loop")


def _constructor_places(source: str, lm_gen: ast.ClassDef) -> list[tuple[int, int, str]]:
    init = _method(lm_gen, "__init__")
    last = init.args.args[-1]
    end = init.args.defaults[-1] if init.args.defaults else last
    assert end.end_lineno is not None
    if not source.split("\n")[end.end_lineno - 1].rstrip().endswith(","):
        raise HookAnchorError(f"the last parameter of `LMGen.__init__` (`{last.arg}`) is not followed by a comma")
    assignment = next((statement for statement in init.body if isinstance(statement, ast.Assign)
                       and ast.unparse(statement) == "self.on_audio_hook = on_audio_hook"), None)
    if assignment is None:
        raise HookAnchorError("`LMGen.__init__` has no `self.on_audio_hook = on_audio_hook`")
    assert assignment.end_lineno is not None
    return [(end.end_lineno, last.col_offset, PARAMETERS),
            (assignment.end_lineno, assignment.col_offset, ASSIGNMENTS)]


def insertions(source: str) -> list[tuple[int, int, str]]:
    """Where the texts above go in `source` (moshi's lm.py): `(0-based line to insert before, indent, text)`:
    the parameters after the last of `LMGen.__init__`, their assignments after `self.on_audio_hook = ...`,
    and the hook calls before the statement that samples the codebook's token (`next_token =
    sample_token(...)`) and before `depformer_tokens.append(next_token)`."""
    lm_gen = _lm_gen(ast.parse(source))
    loop = _depformer_loop(lm_gen)
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
    return _constructor_places(source, lm_gen) + [
        (sample.lineno - 1, sample.col_offset, LOGITS_CALL), (append.lineno - 1, append.col_offset, TOKEN_CALL)]


def insert(source: str, places: list[tuple[int, int, str]]) -> str:
    """`source` with each text of `places` inserted, indented, before its line."""
    lines = source.split("\n")
    for index, column, text in sorted(places, reverse=True):
        body = text[:-1] if text.endswith("\n") else text   # a text ending in a blank line keeps it
        lines[index:index] = [" " * column + line if line else "" for line in body.split("\n")]
    return "\n".join(lines)
