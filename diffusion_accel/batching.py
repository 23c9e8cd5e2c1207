"""Slicing a denoiser call to a subset of batch rows and rebuilding its output.

Used by methods that drop rows (adaptive guidance drops the unconditional rows of switched samples). Every tensor
argument whose first dimension equals the full batch is sliced; positional embeddings (``img_ids``, rotary
tables, ...) are left alone even when their length happens to equal the batch.
"""

from __future__ import annotations

from typing import Any

import torch

#: Keyword arguments that are never batched, whatever their shape.
UNBATCHED_KWARGS = frozenset({
    "img_ids", "txt_ids", "image_rotary_emb", "rotary_emb", "freqs_cis", "position_ids", "video_coords",
    "rope_interpolation_scale", "num_frames", "height", "width", "attention_kwargs", "joint_attention_kwargs",
})


class SampleList(list):
    """A denoiser argument that is a list with one tensor per batch row (Z-Image's captions, of different lengths,
    which cannot be stacked): slicing rows picks list items. The session marks the arguments an adapter declares in
    ``per_sample_lists``; the denoiser gets a plain list back."""


def slice_batch(value: Any, index: torch.Tensor, full: int) -> Any:
    """Recursively take rows ``index`` of every tensor in ``value`` whose dim 0 is ``full`` (and the items ``index``
    of every :class:`SampleList`)."""
    if isinstance(value, SampleList):
        return SampleList(value[i] for i in index.tolist())
    if isinstance(value, torch.Tensor):
        if value.ndim >= 1 and value.shape[0] == full:
            return value.index_select(0, index.to(value.device))
        return value
    if isinstance(value, dict):
        return {k: (v if k in UNBATCHED_KWARGS else slice_batch(v, index, full)) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(slice_batch(v, index, full) for v in value)
    if isinstance(value, list):
        return [slice_batch(v, index, full) for v in value]
    return value


def output_sample(output: Any) -> Any:
    """The prediction of a denoiser output (tuple with ``return_dict=False``, ModelOutput or tensor): a tensor, or
    the per-sample list of a denoiser that returns one before :class:`DenoiserIO` stacks it."""
    if isinstance(output, tuple):
        return output[0]
    if hasattr(output, "sample"):
        return output.sample
    return output


def with_sample(output: Any, sample: torch.Tensor) -> Any:
    """``output`` with its prediction tensor replaced, in the same container type."""
    if isinstance(output, tuple):
        return (sample, *output[1:])
    if hasattr(output, "sample"):
        return type(output)(**{**output, "sample": sample})
    return sample


def denoiser_sample_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The latent ``x_t`` a denoiser call receives (``hidden_states`` or ``sample``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    return kwargs.get("hidden_states", kwargs.get("sample"))


class DenoiserIO:
    """What methods see of a denoiser call, whatever the denoiser's own conventions (declared by its adapter).

    Methods read the latent as one batched tensor, slice rows with :func:`slice_batch` and read the output as the
    adapter's ``prediction``. A denoiser that takes per-sample lists or returns a negated prediction (Z-Image) is
    presented that way: :meth:`to_methods` converts what the pipeline passes and returns into that view (the session
    applies it outside the methods' hooks), :meth:`to_denoiser` converts back (applied inside them, just above the
    forward). Stacking, unbinding and a sign of ±1 are exact, so with no method between them the pipeline gets the
    denoiser's own bits.
    """

    def __init__(self, forward_parameters: list[str], per_sample_lists: tuple[str, ...], output_sign: float) -> None:
        missing = [name for name in per_sample_lists if name not in forward_parameters]
        if missing:
            raise ValueError(f"The adapter's per_sample_lists {missing} are not parameters of the denoiser's forward "
                             f"({', '.join(forward_parameters)}); fix the adapter's per_sample_lists.")
        self.lists = {name: forward_parameters.index(name) for name in per_sample_lists}
        self.latent = per_sample_lists[0] if per_sample_lists else None
        self.sign = float(output_sign)

    @property
    def identity(self) -> bool:
        """Nothing to convert: the denoiser already speaks batched tensors and returns the prediction."""
        return not self.lists and self.sign == 1.0

    def _map_arguments(self, args: tuple, kwargs: dict, convert: Any) -> tuple[tuple, dict]:
        args, kwargs = list(args), dict(kwargs)
        for name, position in self.lists.items():
            if name in kwargs:
                kwargs[name] = convert(name, kwargs[name])
            elif position < len(args):
                args[position] = convert(name, args[position])
        return tuple(args), kwargs

    def _map_output(self, output: Any, convert: Any) -> Any:
        sample = output_sample(output)
        return output if sample is None else with_sample(output, convert(sample))

    # ------------------------------------------------------------------ pipeline -> methods
    def to_methods(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.identity:
            return args, kwargs

        def convert(name: str, value: Any) -> Any:
            if not isinstance(value, (list, tuple)):
                return value  # already batched (a caller that stacked it itself)
            return torch.stack(list(value)) if name == self.latent else SampleList(value)

        return self._map_arguments(args, kwargs, convert)

    def output_to_methods(self, output: Any) -> Any:
        def convert(sample: Any) -> Any:
            if isinstance(sample, (list, tuple)):
                sample = torch.stack(list(sample))
            return sample if self.sign == 1.0 else -sample

        return self._map_output(output, convert)

    # ------------------------------------------------------------------ methods -> denoiser (and back to the pipeline)
    def to_denoiser(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        def convert(name: str, value: Any) -> Any:
            if isinstance(value, torch.Tensor) and name == self.latent:
                return list(value.unbind(0))
            return list(value) if isinstance(value, SampleList) else value

        return self._map_arguments(args, kwargs, convert)

    def output_to_pipeline(self, output: Any) -> Any:
        if self.identity:
            return output

        def convert(sample: Any) -> Any:
            sample = sample if self.sign == 1.0 else -sample
            return list(sample.unbind(0)) if self.latent is not None else sample

        return self._map_output(output, convert)
