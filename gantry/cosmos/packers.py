"""cosmos-rl's data packers, and the check that a user's packer only forwards.

Gantry encodes prompts (chat template, images/videos) and SFT conversations itself, so the
built-in packers (`DecoderOnlyLLMDataPacker`, `Qwen2_5_VLM_DataPacker`, `HFVLMDataPacker`) map onto
that encoding: they are accepted and their methods are never called for training. A user's packer
is accepted when each method it overrides only forwards: its body is a docstring, `pass`, `return
<an argument>`, or `return super().<same method>(<its arguments>)` / `return self.<attr>.<same
method>(<its arguments>)`; `__init__` and `setup` may also assign a built-in packer to an attribute
(`self.underlying = Qwen2_5_VLM_DataPacker()`) and forward `setup`. Anything else transforms data
that Gantry's encoding would not follow, and is refused naming the class and the method.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from typing import Any


class PackerError(ValueError):
    pass


class BaseDataPacker:
    """cosmos-rl's packer base (CURRENT `BaseDataPacker`). Gantry does the encoding itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.config = None
        self.tokenizer = None

    def setup(self, config: Any, tokenizer: Any = None, *args: Any, **kwargs: Any) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def get_rollout_input(self, item: Any) -> Any:
        return item

    def rollout_collate_fn(self, items: list) -> list:
        return items


class DataPacker(BaseDataPacker):
    """cosmos-rl's `DataPacker` (with a tokenizer)."""


class DecoderOnlyLLMDataPacker(DataPacker):
    """Text models: Gantry's chat-template prompt and assistant-only SFT labels."""


class Qwen2_5_VLM_DataPacker(DataPacker):  # noqa: N801 (cosmos-rl's name)
    """Qwen2.5-VL: Gantry's multimodal prompt and SFT encoding (gantry/data/media.py)."""


class HFVLMDataPacker(DataPacker):
    """Hugging Face VLMs: Gantry's multimodal prompt and SFT encoding."""


BUILTIN = (
    BaseDataPacker,
    DataPacker,
    DecoderOnlyLLMDataPacker,
    Qwen2_5_VLM_DataPacker,
    HFVLMDataPacker,
)
_BUILTIN_NAMES = {cls.__name__ for cls in BUILTIN}


def check_packer(packer: Any, argument: str, script_source: str) -> None:
    """Raise PackerError unless `packer` is a built-in packer or one that only forwards."""
    if packer is None:
        return
    if not isinstance(packer, BaseDataPacker):
        raise PackerError(
            f"launch_worker({argument}=...) got {type(packer).__name__}, not a DataPacker: "
            "subclass cosmos_rl.dispatcher.data.packer.DataPacker, or leave it out"
        )
    for cls in type(packer).__mro__:
        if cls in BUILTIN or cls is object:
            continue
        node = _class_node(cls, script_source)
        for item in node.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                problem = _method_problem(item)
                if problem:
                    raise PackerError(
                        f"data packer {cls.__name__}.{item.name} {problem}: Gantry encodes "
                        "prompts and conversations itself; move the transformation into the "
                        "dataset's items, or use a built-in packer"
                    )


def _class_node(cls: type, script_source: str) -> ast.ClassDef:
    sources = [script_source]  # first: a class of the script run as __main__ is found there
    with contextlib.suppress(OSError, TypeError):
        sources.append(textwrap.dedent(inspect.getsource(cls)))
    for source in sources:
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
                return node
    raise PackerError(
        f"data packer {cls.__name__}: its source cannot be read to check that it only forwards; "
        "define it in the dataset script"
    )


def _method_problem(fn: ast.FunctionDef) -> str:
    """Why `fn` is more than forwarding ("" when it only forwards)."""
    params = {a.arg for a in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
    params |= {a.arg for a in (fn.args.vararg, fn.args.kwarg) if a is not None}
    body = fn.body
    if body and _is_docstring(body[0]):
        body = body[1:]
    for statement in body:
        if isinstance(statement, ast.Pass):
            continue
        if isinstance(statement, ast.Return) and statement.value is not None:
            value = statement.value
            if isinstance(value, ast.Name) and value.id in params:
                continue
            if _forwards(value, fn.name, params):
                continue
            return "returns something other than its input or the same method of another packer"
        if fn.name in ("__init__", "setup") and _setup_statement(statement, fn.name, params):
            continue
        return f"does more than forward (line {statement.lineno})"
    return ""


def _is_docstring(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
    )


def _forwards(value: ast.expr, name: str, params: set[str]) -> bool:
    """`super().name(args)` or `self.attr.name(args)`, the args being the method's own."""
    if not (isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute)):
        return False
    if value.func.attr != name:
        return False
    target = value.func.value
    is_super = (
        isinstance(target, ast.Call)
        and isinstance(target.func, ast.Name)
        and target.func.id == "super"
    )
    is_member = (
        isinstance(target, ast.Attribute)
        and isinstance(target.value, ast.Name)
        and target.value.id == "self"
    )
    args = [a.value if isinstance(a, ast.Starred) else a for a in value.args]
    args += [k.value for k in value.keywords]
    plain = all(isinstance(a, ast.Name) and a.id in params and a.id != "self" for a in args)
    return (is_super or is_member) and plain


def _setup_statement(statement: ast.stmt, name: str, params: set[str]) -> bool:
    if isinstance(statement, ast.Expr):
        return _forwards(statement.value, name, params)
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target, value = statement.targets[0], statement.value
        to_self = (
            isinstance(target, ast.Attribute)
            and isinstance(target.value, ast.Name)
            and target.value.id == "self"
        )
        builds_builtin = (
            isinstance(value, ast.Call)
            and not value.args
            and not value.keywords
            and isinstance(value.func, ast.Name | ast.Attribute)
            and (value.func.id if isinstance(value.func, ast.Name) else value.func.attr)
            in _BUILTIN_NAMES
        )
        return to_self and builds_builtin
    return False
