"""Tensors cached per batch row, keyed by ``(CFG branch, sample)``.

Batched CFG puts the unconditional and conditional halves in one batch; separate-pass pipelines run them in two
forwards; adaptive guidance drops the unconditional rows of samples that switched. Keying cached tensors by row
keeps every branch and sample apart and lets a cache survive the batch shrinking: a later, smaller batch gathers
exactly its own rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RowKey = tuple[str, int]
Value = tuple[torch.Tensor | None, ...]


class RowStore:
    """Maps row keys to rows of stored batch tensors (a tuple of optional tensors per entry)."""

    def __init__(self) -> None:
        self._entries: dict[int, Value] = {}
        self._rows: dict[RowKey, tuple[int, int]] = {}
        self._next_id = 0

    def clear(self) -> None:
        self._entries.clear()
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)

    def has(self, rows: Sequence[RowKey]) -> bool:
        return bool(rows) and all(key in self._rows for key in rows)

    def put(self, rows: Sequence[RowKey], value: Value) -> None:
        """Store ``value`` (each tensor batched along dim 0 like ``rows``), replacing those rows' old entries."""
        entry = self._next_id
        self._next_id += 1
        self._entries[entry] = value
        for index, key in enumerate(rows):
            self._rows[key] = (entry, index)
        live = {e for e, _ in self._rows.values()}
        for stale in [e for e in self._entries if e not in live]:
            del self._entries[stale]

    def get(self, rows: Sequence[RowKey]) -> Value:
        """The stored rows for ``rows``, in that order (no copy when they are one whole stored entry)."""
        located = [self._rows[key] for key in rows]
        entries = {e for e, _ in located}
        if len(entries) == 1:
            entry = located[0][0]
            value = self._entries[entry]
            indices = [i for _, i in located]
            first = next((t for t in value if t is not None), None)
            if first is not None and indices == list(range(first.shape[0])):
                return value
        parts: list[torch.Tensor | None] = []
        width = len(self._entries[located[0][0]])
        for slot in range(width):
            pieces = []
            for entry, index in located:
                tensor = self._entries[entry][slot]
                if tensor is None:
                    pieces = None
                    break
                pieces.append(tensor[index : index + 1])
            parts.append(None if pieces is None else torch.cat(pieces, dim=0))
        return tuple(parts)
