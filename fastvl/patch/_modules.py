"""Module-tree helpers shared by the patches."""

from __future__ import annotations

from typing import Callable, Iterator, Union

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


def patched_names(model: nn.Module, marker: str) -> list[str]:
    """Names of the modules in ``model`` that a patch using ``marker`` put there."""
    return [name for name, module in model.named_modules() if marker in module.__dict__]


def swap_children(
    model: nn.Module,
    marker: str,
    replacement_for: Callable[[nn.Module], Union[Callable[[], nn.Module], str, None]],
) -> tuple[list[str], list[tuple[str, nn.Module, str]], tuple[nn.Module, ...]]:
    """Replace children of ``model`` in place, remembering each original under ``marker``.

    ``replacement_for(child)`` returns a factory of the replacement (swap it), a string (the
    reason it is not swapped) or None (not a candidate). A module registered in several slots
    gets one replacement. The original is kept as a plain attribute (not a submodule, so it is
    not in ``state_dict``). Returns (replaced names, skipped (name, child, reason), the
    replacement modules).
    """
    replacements: dict[int, nn.Module] = {}
    swaps, replaced, skipped = [], [], []
    for parent, attribute, name, child in child_slots(model):
        decision = replacement_for(child)
        if decision is None:
            continue
        if isinstance(decision, str):
            skipped.append((name, child, decision))
            continue
        if id(child) not in replacements:
            replacement = decision()
            object.__setattr__(replacement, marker, child)
            replacements[id(child)] = replacement
        swaps.append((parent, attribute, replacements[id(child)]))
        replaced.append(name)
    for parent, attribute, replacement in swaps:
        setattr(parent, attribute, replacement)
    return replaced, skipped, tuple(replacements.values())


def marked_slots(model: nn.Module, marker: str, selected: Callable[[nn.Module], bool]):
    """[(parent, attribute, name, replacement, original)] for the children of ``model`` that
    :func:`swap_children` replaced under ``marker`` and ``selected`` accepts."""
    return [
        (parent, attribute, name, child, child.__dict__[marker])
        for parent, attribute, name, child in child_slots(model)
        if marker in child.__dict__ and selected(child)
    ]


def swap_back(slots, marker: str) -> None:
    """Put the originals of :func:`marked_slots` back and forget them on the replacements."""
    for parent, attribute, _, _, original in slots:
        setattr(parent, attribute, original)
    for _, _, _, replacement, _ in slots:  # after the loop: a shared module has several slots
        replacement.__dict__.pop(marker, None)
