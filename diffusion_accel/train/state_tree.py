"""A state tree (what a ``state_dict()`` returns) stored as a safetensors file for its tensors and a JSON file for
the rest, so that reading it back never unpickles anything.

A ``torch.save`` file is a pickle: ``torch.load`` of a checkpoint someone shared can run their code, and
``weights_only=True`` only narrows what it may run. Safetensors holds only tensors and JSON only data, and the state
trees of a training run are small enough to split between them: tensors and numpy arrays go to
``<name>.safetensors`` under their path in the tree (``state/0/exp_avg``; a flat ``state_dict`` of a module keeps its
parameter names, so that file is an ordinary weights file), everything else to ``<name>.json``.

In the JSON, plain scalars and lists stay as they are and every other node is an object with one tag key, so a
dict can never be mistaken for a tag: ``{"dict": {...}}`` (string keys), ``{"items": [[key, value], ...]}`` (other
keys, e.g. an optimizer's parameter indices), ``{"tuple": [...]}`` (``random.getstate()``, Adam's ``betas``),
``{"tensor": path}`` and ``{"ndarray": path}``. Anything else (a lambda, an arbitrary object) is refused when the
checkpoint is written, naming where it sits, instead of being smuggled in as a pickle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file


def _key(path: tuple[str, ...]) -> str:
    return "/".join(path)


def _encode(node: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, (torch.Tensor, np.ndarray)):
        key = _key(path)
        if key in tensors:
            raise ValueError(f"two tensors of the state would both be stored as {key!r}")
        if isinstance(node, np.ndarray):
            tensors[key] = torch.from_numpy(np.ascontiguousarray(node))
            return {"ndarray": key}
        # a CPU copy of its own: safetensors refuses tensors that share storage (tied weights)
        tensors[key] = node.detach().to("cpu", copy=True).contiguous()
        return {"tensor": key}
    if isinstance(node, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(node)]
    if isinstance(node, tuple):
        return {"tuple": [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(node)]}
    if isinstance(node, dict):
        if all(isinstance(k, str) for k in node):
            return {"dict": {k: _encode(v, (*path, k), tensors) for k, v in node.items()}}
        return {"items": [[_encode(k, (*path, "key"), tensors), _encode(v, (*path, str(k)), tensors)]
                          for k, v in node.items()]}
    raise TypeError(f"cannot store {type(node).__name__} at {_key(path) or '<root>'!r} in a checkpoint: only "
                    "tensors, numpy arrays, numbers, strings, None, lists, tuples and dicts are stored (no pickle); "
                    "make the object's state_dict() return those.")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    (tag, value), = node.items()
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in value.items()}
    if tag == "items":
        return {_decode(k, tensors): _decode(v, tensors) for k, v in value}
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in value)
    if tag == "tensor":
        return tensors[value]
    if tag == "ndarray":
        return tensors[value].numpy()
    raise ValueError(f"unknown node {tag!r} in a checkpoint's JSON")


def save(folder: Path, name: str, state: Any) -> None:
    """Write ``state`` as ``folder/<name>.json`` plus ``folder/<name>.safetensors`` when it holds tensors."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors)
    if tensors:
        save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def load(folder: Path, name: str) -> Any:
    """The state :func:`save` wrote as ``name`` (tensors on the CPU)."""
    tree = json.loads((folder / f"{name}.json").read_text())
    weights = folder / f"{name}.safetensors"
    return _decode(tree, load_file(str(weights)) if weights.is_file() else {})
