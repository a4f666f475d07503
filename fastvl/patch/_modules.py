"""Module-tree helpers shared by the patches."""

from __future__ import annotations

from typing import Iterator

from torch import nn


def child_slots(model: nn.Module) -> Iterator[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, attribute, qualified name, child) for every parent -> child edge in ``model``.

    Edges, not modules: a module registered in two places is seen at both.
    """
    for parent_name, parent in list(model.named_modules(remove_duplicate=False)):
        for attribute, child in list(parent._modules.items()):
            if child is not None:
                name = f"{parent_name}.{attribute}" if parent_name else attribute
                yield parent, attribute, name, child
