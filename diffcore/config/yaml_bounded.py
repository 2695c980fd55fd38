"""YAML read safely and with bounded size: ``safe_load`` plus a cap on what aliases expand to.

``safe_load`` never runs code, but anchors and aliases let a few lines describe a structure of
billions of values (the "billion laughs"): every later walk over it (merging, validation, an error
message) would run for minutes and take gigabytes. The node graph is measured before anything is
built from it, counting each aliased node as often as it is referenced, in time linear in the
distinct nodes, and a document past the cap is refused at once.
"""

from __future__ import annotations

from typing import Any

import yaml

#: values (scalars, items, keys) a document may expand to; real jobs have a few hundred
MAX_VALUES = 100_000


class YAMLTooLarge(ValueError):
    """The document expands past :data:`MAX_VALUES` values through anchors and aliases."""

    def __init__(self) -> None:
        super().__init__(
            f"the YAML expands to more than {MAX_VALUES} values through anchors and aliases (&name / *name);"
            " a job needs far fewer: write the values out"
        )


def _expanded_size(root: yaml.Node) -> int:
    sizes: dict[int, int] = {}
    # iterative post-order walk: a deep alias chain must not hit Python's recursion limit
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in sizes:
            continue
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        if done:
            total = 1 + sum(sizes[id(c)] for c in children)
            sizes[id(node)] = min(total, MAX_VALUES + 1)
            continue
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(root)]


def load_yaml(text: str) -> Any:
    """Parse one YAML document like ``yaml.safe_load``; raise :class:`YAMLTooLarge` past the cap.

    ``yaml.YAMLError`` propagates for malformed input, as from ``safe_load``.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node) > MAX_VALUES:
            raise YAMLTooLarge()
        return loader.construct_document(node)
    finally:
        loader.dispose()
