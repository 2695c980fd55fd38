"""Declarative key maps between a module's parameter names and a checkpoint layout.

A layout conversion is a table of :class:`Rule` rows. Each row pairs a pattern over the module's
names with one over the file's names and says what happens to the tensor on the way (:class:`Op`)::

    RULES = (
        Rule("blocks.{i}.attn.qkv", ("blocks.{i}.to_q", "blocks.{i}.to_k", "blocks.{i}.to_v"), Split()),
        Rule("down_blocks.{b}.resnets.{j}", "input_blocks.{1 + b * per + j}.0"),
        Rule("final.adaLN", "norm_out.linear", SwapHalves()),
        Drop("pos_embed"),
        Rule("*", "*"),
    )
    original = KeyMap(RULES, {"per": 3}, name="original")
    file_tensors = original.save(module.state_dict().items())                 # module -> file
    module_tensors = original.load(checkpoint.items(), module.state_dict())  # file -> module

Patterns are dotted names. A module pattern matches a whole key or a leading part of it that ends at a
dot; the rest (``.weight``, or a whole sub-tree) is carried over to the file name unchanged. In a
module pattern ``{name}`` captures an index (digits) and ``*`` any text; in a file pattern ``{expr}``
is an integer expression over the captured indices and the map's parameters (``+ - * // %``,
``param[index]``) and each ``*`` takes the text its counterpart captured, in order. The first rule
whose module pattern matches wins, so put specific rows before general ones.

Rules are written once, module -> file; loading inverts them over the module's own keys, so the two
directions cannot drift apart. A key no rule claims is reported as a :class:`UserError` naming a few,
never silently dropped; :class:`Drop` rows name file keys that are read past on purpose. Loading
streams: a tensor is held only until the other parts it is fused with have arrived.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from diffcore.errors import UserError

if TYPE_CHECKING:
    import torch

Params = Mapping[str, Any]
_SHOWN = 5  # keys named in an error message


# -- tensor operations -------------------------------------------------------------------------------
class Op:
    """What happens to the tensors of one rule: :meth:`save` turns the module's tensors into the
    file's, :meth:`load` the file's into the module's (each a list, in pattern order)."""

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        """``n``: how many file tensors to make."""
        return tensors

    def load(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        """``n``: how many module tensors to make."""
        return tensors

    def rows(self, params: Params) -> tuple[int | None, ...] | None:
        """The rows each file tensor takes from the module tensor (split ops), else None."""
        return None


@attrs.frozen
class Same(Op):
    """The tensor is stored as it is (a rename)."""


@attrs.frozen
class Split(Op):
    """One module tensor is stored as several file tensors along ``dim``: equal parts, or ``sizes``
    (ints or expressions over the parameters; one None takes the remainder). A fused qkv into
    q, k, v: ``Split()``; Flux's single-block linear1: ``Split(("dim", "dim", "dim", None))``."""

    sizes: tuple[int | str | None, ...] | None = None
    dim: int = 0

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        return _split(tensors[0], self.sizes, self.dim, params, n)

    def load(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        import torch

        return [torch.cat(tensors, dim=self.dim)]

    def rows(self, params: Params) -> tuple[int | None, ...] | None:
        if self.sizes is None:
            return None
        return tuple(None if s is None else _value(s, params) for s in self.sizes)


@attrs.frozen
class Fuse(Op):
    """The inverse of :class:`Split`: several module tensors are stored as one file tensor (an
    OpenCLIP ``in_proj_weight`` for separate q, k, v projections)."""

    sizes: tuple[int | str | None, ...] | None = None
    dim: int = 0

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        import torch

        return [torch.cat(tensors, dim=self.dim)]

    def load(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        return _split(tensors[0], self.sizes, self.dim, params, n)


@attrs.frozen
class SwapHalves(Op):
    """The two halves along ``dim`` are stored in the other order (a final layer's shift and scale)."""

    dim: int = 0

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        import torch

        first, second = tensors[0].chunk(2, dim=self.dim)
        return [torch.cat((second, first), dim=self.dim)]

    load = save


@attrs.frozen
class Transpose(Op):
    """The file stores the transposed matrix (OpenCLIP's ``text_projection``)."""

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        return [tensors[0].t().contiguous()]

    load = save


@attrs.frozen
class Squeeze(Op):
    """The module holds a linear weight (out, in) where the file holds a 1x1 convolution (out, in, 1, 1)
    or (out, in, 1). Loading squeezes; saving unsqueezes unless ``save=False`` (a diffusers layout that
    writes linears but should also read older 1x1-conv exports). Other shapes (a bias) pass."""

    save_as_conv: bool = attrs.field(default=True, alias="save")

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        t = tensors[0]
        return [t.reshape(*t.shape, 1, 1) if self.save_as_conv and t.ndim == 2 else t]

    def load(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        t = tensors[0]
        return [t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t]


@attrs.frozen
class Unsqueeze(Op):
    """The inverse of :class:`Squeeze`: the module holds a 1x1 convolution where the file holds a
    linear weight."""

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        return Squeeze().load(tensors, params, n)

    def load(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        return Squeeze().save(tensors, params, n)


@attrs.frozen
class Tie(Op):
    """One module tensor is stored once per value of the file pattern's free index ``over``, from 0 to
    ``count`` (an int or expression over the parameters): diffusers' DiT keeps a copy of the shared
    embedders in every block. Loading keeps the first copy and requires the others to equal it;
    ``message`` (formatted with the differing index as ``{index}``) and ``hint`` say why not."""

    over: str
    count: int | str
    message: str = "copy {index} of a tensor the model shares differs from the first"
    hint: str | None = None

    def save(self, tensors: list[torch.Tensor], params: Params, n: int) -> list[torch.Tensor]:
        # distinct storage: safetensors refuses tensors that share memory
        return [tensors[0] if i == 0 else tensors[0].clone() for i in range(n)]


def _split(
    tensor: torch.Tensor, sizes: tuple[int | str | None, ...] | None, dim: int, params: Params, count: int
) -> list[torch.Tensor]:
    if sizes is None:
        return [part.clone() for part in tensor.chunk(count, dim=dim)]
    fixed = [None if s is None else _value(s, params) for s in sizes]
    rest = tensor.shape[dim] - sum(s for s in fixed if s is not None)
    # clones: a view would keep the whole fused tensor alive, and safetensors refuses shared storage
    return [part.clone() for part in tensor.split([rest if s is None else s for s in fixed], dim=dim)]


# -- patterns ----------------------------------------------------------------------------------------
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}|\*")
_OPERATORS = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__, ast.FloorDiv: int.__floordiv__,
              ast.Mod: int.__mod__}


def _evaluate(node: ast.AST, env: Params, text: str) -> Any:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, env, text)
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in env:
            raise KeyError(f"{text!r} names {node.id!r}, which is neither captured nor a parameter")
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        return _OPERATORS[type(node.op)](int(_evaluate(node.left, env, text)), int(_evaluate(node.right, env, text)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -int(_evaluate(node.operand, env, text))
    if isinstance(node, ast.Subscript):
        return _evaluate(node.value, env, text)[int(_evaluate(node.slice, env, text))]
    raise ValueError(f"unsupported expression {text!r} (integers, names, + - * // %, name[index])")


def _value(expr: int | str, env: Params) -> int:
    return expr if isinstance(expr, int) else int(_evaluate(ast.parse(expr, mode="eval"), env, expr))


@attrs.frozen
class _ModulePattern:
    text: str
    regex: re.Pattern[str]
    names: tuple[str, ...]  # captured indices, in order
    stars: int

    @classmethod
    def compile(cls, text: str) -> _ModulePattern:
        parts, names, stars, end = [], [], 0, 0
        for m in _PLACEHOLDER.finditer(text):
            parts.append(re.escape(text[end : m.start()]))
            if m.group(0) == "*":
                parts.append(f"(?P<_star{stars}>.+?)")
                stars += 1
            else:
                name = m.group(1)
                if not name.isidentifier():
                    raise ValueError(f"module pattern {text!r}: {{{name}}} must be a plain name (an index)")
                parts.append(f"(?P<{name}>\\d+)")
                names.append(name)
            end = m.end()
        parts.append(re.escape(text[end:]))
        return cls(text, re.compile("^" + "".join(parts) + r"(?P<_rest>\..+)?$"), tuple(names), stars)

    def fill(self, captures: Mapping[str, Any], stars: Sequence[str]) -> str:
        """This pattern with the captures put back (a sibling of a fused group)."""
        count = iter(stars)

        def put(m: re.Match[str]) -> str:
            return next(count) if m.group(0) == "*" else str(captures[m.group(1)])

        return _PLACEHOLDER.sub(put, self.text)


@attrs.frozen
class _FilePattern:
    text: str
    pieces: tuple[tuple[str, Any], ...]  # ("text", str) | ("star", None) | ("expr", (source, ast))

    @classmethod
    def compile(cls, text: str) -> _FilePattern:
        pieces: list[tuple[str, Any]] = []
        end = 0
        for m in _PLACEHOLDER.finditer(text):
            pieces.append(("text", text[end : m.start()]))
            if m.group(0) == "*":
                pieces.append(("star", None))
            else:
                pieces.append(("expr", (m.group(1), ast.parse(m.group(1).strip(), mode="eval"))))
            end = m.end()
        pieces.append(("text", text[end:]))
        return cls(text, tuple(pieces))

    def fill(self, env: Params, stars: Sequence[str]) -> str:
        out, count = [], iter(stars)
        for kind, value in self.pieces:
            if kind == "text":
                out.append(value)
            elif kind == "star":
                out.append(next(count))
            else:
                out.append(str(_evaluate(value[1], env, value[0])))
        return "".join(out)

    def regex(self) -> re.Pattern[str]:
        """For :class:`Drop`: ``*`` any text, ``{...}`` any index."""
        parts = []
        for kind, value in self.pieces:
            parts.append(re.escape(value) if kind == "text" else (".+?" if kind == "star" else r"\d+"))
        return re.compile("^" + "".join(parts) + r"(\..+)?$")


def _strings(value: str | Sequence[str]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen(init=False)
class Rule:
    """Module name pattern(s) <-> file name pattern(s) and the :class:`Op` between them.

    One pattern each side for a rename (with any 1:1 op), one module and several file patterns for
    :class:`Split` and :class:`Tie`, several module patterns and one file pattern for :class:`Fuse`.
    """

    module: tuple[str, ...]
    file: tuple[str, ...]
    op: Op

    def __init__(self, module: str | Sequence[str], file: str | Sequence[str], op: Op | None = None):
        op = op if op is not None else Same()
        module_t, file_t = _strings(module), _strings(file)
        many_modules, many_files = len(module_t) > 1, len(file_t) > 1
        if isinstance(op, Split) and (many_modules or not many_files):
            raise ValueError(f"Split maps one module pattern to several file patterns: {module_t} -> {file_t}")
        if isinstance(op, Fuse) and (many_files or not many_modules):
            raise ValueError(f"Fuse maps several module patterns to one file pattern: {module_t} -> {file_t}")
        if isinstance(op, Tie) and (many_modules or many_files):
            raise ValueError(f"Tie maps one module pattern to one file pattern with a free index: {module_t}")
        if not isinstance(op, (Split, Fuse, Tie)) and (many_modules or many_files):
            raise ValueError(f"a many-to-one rule needs Split or Fuse: {module_t} -> {file_t}")
        sizes = op.sizes if isinstance(op, (Split, Fuse)) else None
        if sizes is not None and len(sizes) != max(len(module_t), len(file_t)):
            raise ValueError(f"{len(sizes)} sizes for {max(len(module_t), len(file_t))} parts in {module_t}")
        self.__attrs_init__(module_t, file_t, op)


@attrs.frozen(init=False)
class Drop:
    """File keys matching ``file`` (``*`` any text, ``{i}`` any index, plus any ``.rest``) that loading
    reads past on purpose: training-loss weights, an EMA copy, a tensor the module recomputes."""

    file: str

    def __init__(self, file: str):
        self.__attrs_init__(file)


# -- the map -----------------------------------------------------------------------------------------
@attrs.frozen
class Group:
    """One application of a rule: the module keys and the file keys it ties together."""

    module: tuple[str, ...]
    file: tuple[str, ...]
    op: Op
    rule: int  # index of the rule in the table


@attrs.frozen
class _Compiled:
    module: tuple[_ModulePattern, ...]
    file: tuple[_FilePattern, ...]
    op: Op


class KeyMap:
    """A rule table bound to parameters (``{"per": 3, "dim": 3072}``) for one layout ``name``."""

    def __init__(self, rules: Iterable[Rule | Drop], params: Params | None = None, *, name: str = "file"):
        self.name = name
        self.params: dict[str, Any] = dict(params or {})
        self.rules: tuple[Rule | Drop, ...] = tuple(rules)
        self._compiled: list[_Compiled] = []
        self._drops: list[re.Pattern[str]] = []
        for rule in self.rules:
            if isinstance(rule, Drop):
                self._drops.append(_FilePattern.compile(rule.file).regex())
                continue
            self._compiled.append(
                _Compiled(
                    tuple(_ModulePattern.compile(p) for p in rule.module),
                    tuple(_FilePattern.compile(p) for p in rule.file),
                    rule.op,
                )
            )

    @classmethod
    def of(cls, rules: tuple[Rule | Drop, ...], params: Params | None = None, *, name: str = "file") -> KeyMap:
        """A shared map for a rule tuple and parameters, compiled once and reused (maps never change)."""
        return _shared(rules, tuple(sorted((params or {}).items())), name)

    def with_params(self, **params: Any) -> KeyMap:
        """The same rules with ``params`` added or replaced."""
        return KeyMap(self.rules, {**self.params, **params}, name=self.name)

    # -- names ---------------------------------------------------------------------------------------
    def group(self, module_key: str) -> Group | None:
        """The rule application that claims ``module_key`` (a parameter or a module path), or None."""
        for index, rule in enumerate(self._compiled):
            for pattern in rule.module:
                m = pattern.regex.match(module_key)
                if m is None:
                    continue
                rest = m.group("_rest") or ""
                captures = {n: int(m.group(n)) for n in pattern.names}
                stars = [m.group(f"_star{i}") for i in range(pattern.stars)]
                env = {**self.params, **captures}
                modules = tuple(p.fill(captures, stars) + rest for p in rule.module)
                if isinstance(rule.op, Tie):
                    copies = range(_value(rule.op.count, env))
                    files = tuple(rule.file[0].fill({**env, rule.op.over: i}, stars) + rest for i in copies)
                else:
                    files = tuple(p.fill(env, stars) + rest for p in rule.file)
                return Group(modules, files, rule.op, index)
        return None

    def file_names(self, module_key: str) -> tuple[str, ...] | None:
        """The file name(s) of ``module_key``: one for a rename, several for a split; None if no rule
        claims it."""
        group = self.group(module_key)
        return None if group is None else group.file

    def file_name(self, module_key: str) -> str | None:
        """The one file name of ``module_key``; None if no rule claims it or it is split."""
        names = self.file_names(module_key)
        return names[0] if names is not None and len(names) == 1 else None

    def rows(self, module_key: str) -> tuple[int | None, ...] | None:
        """For a split module, the rows each file part takes (None where the remainder), else None."""
        group = self.group(module_key)
        return None if group is None else group.op.rows(self.params)

    def dropped(self, file_key: str) -> bool:
        return any(p.match(file_key) for p in self._drops)

    def inverse(self, module_keys: Iterable[str]) -> dict[str, tuple[Group, int]]:
        """file key -> (its group, its position among the group's file keys), for ``module_keys``."""
        out: dict[str, tuple[Group, int]] = {}
        for key in module_keys:
            group = self.group(key)
            if group is None:
                continue
            for i, name in enumerate(group.file):
                out.setdefault(name, (group, i))
        return out

    # -- streaming -----------------------------------------------------------------------------------
    def save(
        self, tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], *, where: str = "model"
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Module tensors -> (file key, tensor) in this layout, one rule application at a time."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        unclaimed: list[str] = []
        pending: dict[tuple[str, ...], dict[Any, torch.Tensor]] = {}
        for key, value in items:
            group = self.group(key)
            if group is None:
                unclaimed.append(key)
                continue
            values = _gather(pending, group.file, group.module, key, value)
            if values is None:
                continue
            yield from zip(group.file, group.op.save(values, self.params, len(group.file)), strict=True)
        incomplete = [k for parts in pending.values() for k in parts]
        self._report(unclaimed, incomplete, where, "module")

    def load(
        self,
        tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
        module_keys: Iterable[str],
        *,
        where: str,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """File tensors (e.g. ``Checkpoint.items()``) -> (module key, tensor) for a module whose keys
        are ``module_keys``. A part of a fused tensor is held until its siblings arrive; a fused tensor
        with parts missing is never yielded, so the loader reports it as missing."""
        items = tensors.items() if isinstance(tensors, Mapping) else tensors
        inverse = self.inverse(module_keys)
        unclaimed: list[str] = []
        pending: dict[tuple[str, ...], dict[Any, torch.Tensor]] = {}
        tied: dict[tuple[str, ...], tuple[str, torch.Tensor]] = {}
        for key, value in items:
            if key not in inverse:
                if not self.dropped(key):
                    unclaimed.append(key)
                continue
            group, index = inverse[key]
            if isinstance(group.op, Tie):
                yield from self._load_tied(group, key, value, tied, where)
                continue
            values = _gather(pending, group.module, group.file, key, value)
            if values is None:
                continue
            yield from zip(group.module, group.op.load(values, self.params, len(group.module)), strict=True)
        self._report(unclaimed, [], where, "file")

    def _load_tied(
        self,
        group: Group,
        key: str,
        value: torch.Tensor,
        tied: dict[tuple[str, ...], tuple[str, torch.Tensor]],
        where: str,
    ) -> Iterator[tuple[str, torch.Tensor]]:
        import torch

        op = group.op
        assert isinstance(op, Tie)
        first = tied.get(group.file)
        if first is None:
            tied[group.file] = (key, value)
            yield group.module[0], value
        elif not torch.equal(first[1], value):
            index = group.file.index(key)
            raise UserError(op.message.format(index=index, key=key, first=first[0]), where=where, hint=op.hint)

    def _report(self, unclaimed: list[str], incomplete: list[str], where: str, side: str) -> None:
        if unclaimed:
            raise UserError(
                f"{len(unclaimed)} {side} key(s) that no rule of the {self.name} layout claims "
                f"(e.g. {', '.join(unclaimed[:_SHOWN])})",
                where=where,
                hint="is this checkpoint for this architecture and layout?"
                if side == "file"
                else "the layout's rule table does not cover this module",
            )
        if incomplete:
            raise UserError(
                f"{len(incomplete)} module key(s) whose fused siblings are missing "
                f"(e.g. {', '.join(incomplete[:_SHOWN])})",
                where=where,
            )


def _gather(
    pending: dict[tuple[str, ...], dict[Any, torch.Tensor]],
    target: tuple[str, ...],
    parts: tuple[str, ...],
    key: str,
    value: torch.Tensor,
) -> list[torch.Tensor] | None:
    """The tensors of ``parts`` in order once all arrived (None while some are missing); a single
    part passes straight through, so only fused groups are ever held."""
    if len(parts) == 1:
        return [value]
    arrived = pending.setdefault(target, {})
    arrived[key] = value
    if len(arrived) < len(parts):
        return None
    del pending[target]
    return [arrived[k] for k in parts]


@functools.lru_cache(maxsize=64)
def _shared(rules: tuple[Rule | Drop, ...], params: tuple[tuple[str, Any], ...], name: str) -> KeyMap:
    return KeyMap(rules, dict(params), name=name)
