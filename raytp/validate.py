"""Checks of a batch before it leaves the driver.

A batch that does not fit the model fails on the driver with a ``ValueError`` that
names the entry, what was found and what was expected, before anything is sent to a
rank. (On GPUs an id outside the vocabulary or a label outside the classes is a
device-side assert, which ends the rank's CUDA context; a shape error is a traceback
from deep inside a layer.) Pure numpy: the driver calls it, and so may anyone else.

- :func:`as_arrays`: what every batch must be — a non-empty dict of numeric arrays
  with one batch dimension, finite where they are floats.
- A model's own checks: ``validate_batch(arrays, tp)`` of its config
  (:meth:`raytp.models.GPTConfig.validate_batch`, :meth:`raytp.models.BertConfig.validate_batch`),
  or :class:`ClassifierInputs` for a plain module trained with the default ``x``/``y`` loss.
  :func:`batch_checker` picks the one for a built model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

NUMERIC_KINDS = "biuf"  # bool, signed and unsigned integers, floats


def as_arrays(batch: Any) -> dict[str, np.ndarray]:
    """``batch`` as numpy arrays (CPU tensors converted), checked: a non-empty dict of
    numeric arrays, each with the same non-zero batch size along dim 0, floats finite."""
    if not isinstance(batch, Mapping) or not batch:
        raise ValueError(f"a batch is a non-empty dict of arrays, got {batch!r:.80}")
    arrays = {key: _array(key, value) for key, value in batch.items()}
    sizes = {k: a.shape[0] for k, a in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch entries have different batch sizes: {sizes}")
    if 0 in sizes.values():
        raise ValueError(f"the batch is empty: batch size 0 ({_shapes(arrays)})")
    for key, array in arrays.items():
        check_finite(key, array)
    return arrays


def _array(key, value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind not in NUMERIC_KINDS:
        raise ValueError(f"batch[{key!r}] has dtype {array.dtype}; batch entries must be numeric arrays")
    if array.ndim == 0:
        raise ValueError(f"batch[{key!r}] is a scalar; every entry needs a batch dimension")
    return array


def _shapes(arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{k} {tuple(a.shape)}" for k, a in arrays.items())


def check_finite(key: str, array: np.ndarray) -> None:
    """Raise naming the first NaN or infinity of a float array and its position."""
    if array.dtype.kind != "f":
        return
    finite = np.isfinite(array)
    if not finite.all():
        at = first_position(~finite)
        raise ValueError(f"batch[{key!r}] contains {array[at]} at {list(at)}; inputs must be finite")


def first_position(mask: np.ndarray) -> tuple[int, ...]:
    """The index of the first True of ``mask`` (which has one)."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def check_dp(arrays: Mapping[str, np.ndarray], dp: int) -> int:
    """The per-DP-group batch size; raises unless ``dp`` divides the batch size."""
    n = next(iter(arrays.values())).shape[0]
    if n % dp:
        raise ValueError(f"batch size {n} is not divisible by dp={dp}: each DP group takes an equal slice")
    return n // dp


def entry(batch: Mapping[str, np.ndarray], key: str, reads: str) -> np.ndarray:
    """``batch[key]``, or a ValueError naming the keys there are and what the model reads."""
    if key not in batch:
        raise ValueError(f"the batch has no {key!r} (its keys: {sorted(batch)}); {reads}")
    return batch[key]


def check_integers(key: str, array: np.ndarray, what: str) -> None:
    if array.dtype.kind not in "iu":
        raise ValueError(f"{key} has dtype {array.dtype}; {what} must be integers")


def check_shape(key: str, array: np.ndarray, shape: tuple[int, ...], like: str) -> None:
    if array.shape != shape:
        raise ValueError(f"{key} has shape {array.shape}; it must have the shape of {like}, {shape}")


def check_range(key: str, array: np.ndarray, high: int, meaning: str, ignore: int | None = None) -> None:
    """Raise naming the first value outside [0, high) (``ignore`` allowed) and its position."""
    bad = (array < 0) | (array >= high)
    if ignore is not None:
        bad &= array != ignore
    if bad.any():
        at = first_position(bad)
        raise ValueError(f"{key} contains {array[at]} at {list(at)}; {meaning}")


def check_token_ids(key: str, ids: np.ndarray, vocab_size: int, max_seq_len: int) -> None:
    """(batch, seq_len) integer ids in [0, vocab_size), seq_len in [1, max_seq_len]."""
    check_integers(key, ids, "token ids")
    if ids.ndim != 2:
        raise ValueError(f"{key} has shape {ids.shape}; it must be (batch, seq_len)")
    if not 1 <= ids.shape[1] <= max_seq_len:
        raise ValueError(f"{key} has sequence length {ids.shape[1]}; the model takes 1 to "
                         f"max_seq_len={max_seq_len} positions")
    check_range(key, ids, vocab_size, f"the vocabulary has {vocab_size} ids (0 to {vocab_size - 1})")


@dataclass(frozen=True)
class ClassifierInputs:
    """What the default loss of a plain module reads: ``x`` and ``y``. When the model is
    known to be a stack of linear layers (``features`` and ``classes`` set, see
    :func:`classifier_inputs`): ``x`` (batch, ..., features), floats, and for a 2-D ``x``,
    ``y`` (batch,) class indices in [0, classes) or (batch, classes) probabilities."""

    features: int | None = None
    classes: int | None = None
    first_layer: str = ""
    last_layer: str = ""

    def validate_batch(self, batch: Mapping[str, np.ndarray], tp: int) -> None:
        reads = "the default loss reads 'x' and 'y' (pass loss_fn=... to build() for other keys)"
        x, y = entry(batch, "x", reads), entry(batch, "y", reads)
        if self.features is None:
            return
        if x.dtype.kind != "f":
            raise ValueError(f"x has dtype {x.dtype}; the model's first layer {self.first_layer!r} takes "
                             "floating-point inputs")
        if x.shape[-1] != self.features:
            raise ValueError(f"x has {x.shape[-1]} features (shape {x.shape}); the model's first layer "
                             f"{self.first_layer!r} takes {self.features}")
        if x.ndim == 2:
            self._check_targets(y)

    def _check_targets(self, y: np.ndarray) -> None:
        if y.dtype.kind == "f":
            if y.shape[1:] != (self.classes,):
                raise ValueError(f"y has shape {y.shape} and dtype {y.dtype}; float targets are class "
                                 f"probabilities (batch, {self.classes})")
            return
        check_integers("y", y, "class indices")
        if y.ndim != 1:
            raise ValueError(f"y has shape {y.shape}; class indices are (batch,)")
        check_range("y", y, self.classes, f"the model's last layer {self.last_layer!r} has "
                    f"{self.classes} classes (0 to {self.classes - 1})")


def classifier_inputs(module) -> ClassifierInputs:
    """The input features and classes of a stack of linear layers: the first and last
    modules with ``in_features`` and ``out_features``, trusted only when the first is the
    first module with parameters and each one's ``in_features`` is the previous one's
    ``out_features`` (so the order they are registered in is, most likely, the order
    they run in). Otherwise nothing is known: an empty :class:`ClassifierInputs`."""
    with_params = [m for m in module.modules() if next(m.parameters(recurse=False), None) is not None]
    linears = [(name, m) for name, m in module.named_modules()
               if isinstance(getattr(m, "in_features", None), int)
               and isinstance(getattr(m, "out_features", None), int)]
    if not linears or with_params[0] is not linears[0][1]:
        return ClassifierInputs()
    if any(a.out_features != b.in_features for (_, a), (_, b) in zip(linears[:-1], linears[1:], strict=True)):
        return ClassifierInputs()
    (first_name, first), (last_name, last) = linears[0], linears[-1]
    return ClassifierInputs(first.in_features, last.out_features, first_name, last_name)


def batch_checker(module, loss_fn) -> Any:
    """What checks this model's batches on the driver: its config when that has
    ``validate_batch`` (whatever the loss function), :class:`ClassifierInputs` for a
    plain module under the default ``x``/``y`` loss, else None (generic checks only)."""
    config = getattr(module, "config", None)
    if hasattr(config, "validate_batch"):
        return config
    if loss_fn is None and not hasattr(module, "loss"):
        return classifier_inputs(module)
    return None
