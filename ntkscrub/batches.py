"""Data sets as ordered, re-iterable streams of mini-batches.

Every operator in ntkscrub indexes the rows of a Jacobian J_S (shape ``(c·|S|, p)``) as
``row = n·c + k`` for sample ``n`` of S and logit ``k``. That only makes sense if a data set is
visited in the same order on every pass, so this module turns the three accepted forms of a data
set — a ``torch.utils.data.Dataset``, a ``DataLoader`` (not shuffling) or an ``(X, Y)`` pair of
tensors — into a :class:`Batches` stream with a fixed order, and checks it on the way
(empty sets, mismatched lengths, non-finite inputs, labels out of range).

Memory: an ``(X, Y)`` pair is sliced, a ``Dataset`` is read through a sequential ``DataLoader``;
nothing of size ``|S|·p`` is ever formed here.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Union

import torch
from torch import Tensor, nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
    Subset,
)

DataLike = Union[Dataset, DataLoader, tuple, list, "Batches"]

__all__ = [
    "Batches",
    "as_batches",
    "DataLike",
    "subset",
    "subset_indices",
    "check_sequential_loader",
    "check_input_shapes",
    "check_model_accepts",
]


def _check_not_meta(x: Tensor, name: str, what: str = "inputs") -> None:
    if x.device.type == "meta":
        raise ValueError(
            f"{name}: {what} are on the 'meta' device (shapes without data); materialise them "
            f"(e.g. load real data / call .to_empty() and load weights) before passing them"
        )


def _check_input_dtype(x: Tensor, name: str) -> None:
    """uint8 images reach a float model as raw pixels and fail deep inside torch: say so here."""
    if x.dtype == torch.uint8:
        raise TypeError(
            f"{name}: inputs are uint8 (raw image bytes, shape {tuple(x.shape)}); convert them to "
            f"the model's floating dtype and scale first, e.g. x.float() / 255 (what "
            f"torchvision's ToTensor does) followed by the normalisation used in training"
        )


def check_sequential_loader(loader: DataLoader, name: str) -> None:
    """Refuse a ``DataLoader`` whose order is not provably ``0, 1, …, N−1`` or that drops samples.

    Jacobian rows are indexed by sample order; a loader visiting samples in another (or a
    changing) order silently scrambles the rows, which made dense shifts 29–37× wrong and CG
    report "not positive definite" (issue 12). Only ``SequentialSampler`` (inside the default
    ``BatchSampler``) is proven sequential: every other sampler — ``RandomSampler``,
    ``SubsetRandomSampler``, ``WeightedRandomSampler``, a custom one, a ``batch_sampler=`` other
    than ``BatchSampler(SequentialSampler)`` — is refused, naming it.
    """
    fix = (
        "pass DataLoader(dataset, batch_size=..., shuffle=False) with the default sampler, the "
        "Dataset itself, or an (X, Y) pair; to use a subset, wrap it in torch.utils.data.Subset"
    )
    if isinstance(loader.dataset, IterableDataset):
        raise ValueError(
            f"{name}: the DataLoader reads an IterableDataset ({type(loader.dataset).__name__}), "
            f"whose order and length cannot be checked; {fix}"
        )
    bs = loader.batch_sampler
    if bs is None:
        raise ValueError(
            f"{name}: the DataLoader has batch_size=None (automatic batching off: it yields single "
            f"samples); give it a batch_size"
        )
    if type(bs) is not BatchSampler:
        raise ValueError(
            f"{name}: the DataLoader uses batch_sampler={type(bs).__name__}, whose order cannot "
            f"be proven sequential (Jacobian rows need the fixed order 0..N-1); {fix}"
        )
    sampler = bs.sampler
    if type(sampler) is not SequentialSampler:
        verb = "shuffles (it draws" if isinstance(sampler, RandomSampler) else "draws"
        raise ValueError(
            f"{name}: the DataLoader {verb} samples with {type(sampler).__name__}"
            f"{')' if verb.startswith('shuffles') else ''}, not in the "
            f"fixed order 0..N-1 that Jacobian rows need (a random or custom order gives silently "
            f"wrong results); {fix}"
        )
    if bs.drop_last:
        raise ValueError(
            f"{name}: the DataLoader has drop_last=True, which leaves out the last "
            f"{len(sampler) % bs.batch_size} sample(s) of the {name} set; use drop_last=False"
        )
    if len(sampler) != len(loader.dataset):  # type: ignore[arg-type]
        raise ValueError(
            f"{name}: the DataLoader's SequentialSampler covers {len(sampler)} samples but its "
            f"dataset has {len(loader.dataset)}; {fix}"  # type: ignore[arg-type]
        )


def _shape_hint(shape: tuple, ref: tuple) -> str:
    if len(shape) == 3 and len(ref) == 3 and shape == (ref[1], ref[2], ref[0]):
        return (
            " — it looks channels-last (N, H, W, C); permute to (N, C, H, W) with "
            "x.permute(0, 3, 1, 2)"
        )
    return ""


def check_input_shapes(**sets: Batches) -> tuple[int, ...]:
    """All sets must deliver inputs of the same per-sample shape; returns it.

    E.g. ``check_input_shapes(retain=r, forget=f)``: a ValueError naming both sets and shapes
    (instead of torch's "mat1 and mat2 shapes cannot be multiplied" deep inside a product).
    """
    ref_name, ref = None, None
    for name, b in sets.items():
        shape = tuple(b.first()[0].shape[1:])
        if ref is None:
            ref_name, ref = name, shape
        elif shape != ref:
            raise ValueError(
                f"{name}: inputs have per-sample shape {shape} but {ref_name} has {ref}; every "
                f"set must match the model's input{_shape_hint(shape, ref)}"
            )
    return ref or ()


def check_model_accepts(model: nn.Module, **sets: Batches) -> None:
    """Run ``model`` on two samples of each set's first batch; an error names the set.

    Catches a wrong feature dimension, channels-last (N, H, W, C) images or a dtype mismatch at the
    door, with the set's name, instead of a raw torch error in the middle of a JVP.
    """
    for name, b in sets.items():
        x = b.first()[0][:2]
        try:
            with torch.no_grad():
                model(x)
        except (RuntimeError, ValueError, TypeError, IndexError) as err:
            shape = tuple(x.shape[1:])
            hint = ""
            if len(shape) == 3 and shape[-1] in (1, 3, 4) and shape[0] not in (1, 3, 4):
                hint = (
                    " The inputs look channels-last (N, H, W, C): permute them to (N, C, H, W) "
                    "with x.permute(0, 3, 1, 2)."
                )
            raise ValueError(
                f"{name}: the model cannot be applied to its inputs (per-sample shape {shape}, "
                f"dtype {x.dtype}): {type(err).__name__}: {err}.{hint}"
            ) from err


def _check_finite(x: Tensor, name: str) -> None:
    if x.is_floating_point() or x.is_complex():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: inputs contain NaN or infinite values")


def _check_labels(y: Tensor, name: str, num_classes: int | None) -> None:
    _check_not_meta(y, name, "labels")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"{name}: labels must be an integer tensor, got dtype {y.dtype}")
    if y.dim() != 1:
        raise ValueError(f"{name}: labels must have shape (N,), got {tuple(y.shape)}")
    if num_classes is not None and y.numel() > 0:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"{name}: labels must lie in [0, {num_classes}) for a model with "
                f"{num_classes} logits, found range [{lo}, {hi}]"
            )


class Batches:
    """An ordered, re-iterable stream of ``(x, y)`` mini-batches over a data set S.

    Args:
        data: a ``Dataset`` whose items are ``(x, y)`` or ``x``; a ``DataLoader`` that does not
            shuffle; an ``(X, Y)`` pair of tensors with ``X.shape[0] == Y.shape[0]``; or an ``X``
            tensor alone (no labels). A ``Batches`` is returned re-batched.
        batch_size: samples per batch (a ``DataLoader`` keeps its own).
        name: the argument name used in error messages.
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
        device, dtype: where and in which floating dtype the inputs ``x`` are delivered.
        check: check finiteness and labels of every batch as it streams (cheap; on by default).

    Iterating yields ``(x, y)`` with ``x`` of shape ``(b, *input_shape)`` and ``y`` of shape
    ``(b,)`` (``None`` when the data carry no labels). ``len(batches)`` is ``|S|``.
    """

    def __init__(  # noqa: C901, PLR0915 - listed in pyproject.toml
        self,
        data: Any,
        *,
        batch_size: int = 256,
        name: str = "data",
        num_classes: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        check: bool = True,
    ) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.name = name
        self.batch_size = batch_size
        self.num_classes = num_classes
        self.device = torch.device(device) if device is not None else None
        self.dtype = dtype
        self.check = check
        self._X: Tensor | None = None
        self._Y: Tensor | None = None
        self._loader: DataLoader | None = None

        if isinstance(data, Batches):
            self._X, self._Y, self._loader = data._X, data._Y, data._loader
            if self._loader is not None and data.batch_size != batch_size:
                self._loader = _sequential_loader(self._loader.dataset, batch_size)
            self.n = data.n
            self.source = data.source
        elif isinstance(data, Tensor):
            self._X = data
            self.n = data.shape[0] if data.dim() > 0 else 0
            self.source = data
        elif isinstance(data, (tuple, list)):
            if len(data) != 2 or not all(isinstance(t, Tensor) for t in data):
                samples = len(data) > 0 and isinstance(data[0], (tuple, list))
                hint = (
                    " — a list of (x, y) samples: stack it into an (X, Y) pair or wrap it in a "
                    "Dataset (e.g. TensorDataset)"
                    if samples
                    else ""
                )
                raise TypeError(
                    f"{name}: expected an (X, Y) pair of tensors, a Dataset or a DataLoader, "
                    f"got a {type(data).__name__} of length {len(data)}{hint}"
                )
            X, Y = data
            if X.dim() == 0 or Y.dim() == 0 or X.shape[0] != Y.shape[0]:
                raise ValueError(
                    f"{name}: X and Y must have the same number of samples, got "
                    f"X {tuple(X.shape)} and Y {tuple(Y.shape)}"
                )
            _check_labels(Y, name, num_classes)
            self._X, self._Y = X, Y
            self.n = X.shape[0]
            self.source = data
        elif isinstance(data, DataLoader):
            check_sequential_loader(data, name)
            self._loader = data
            self.n = len(data.dataset)  # type: ignore[arg-type]
            self.batch_size = data.batch_size or 1
            self.source = data.dataset
        elif isinstance(data, Dataset):
            try:
                self.n = len(data)  # type: ignore[arg-type]
            except TypeError as err:
                raise TypeError(f"{name}: the Dataset must define __len__") from err
            self._loader = _sequential_loader(data, batch_size)
            self.source = data
        else:
            raise TypeError(
                f"{name}: expected a Dataset, a DataLoader or an (X, Y) pair of tensors, "
                f"got {type(data).__name__}"
            )
        if self.n == 0:
            raise ValueError(f"{name}: the data set is empty")
        if self._X is not None:
            _check_not_meta(self._X, name)
            if self._Y is not None:
                _check_not_meta(self._Y, name, "labels")
            _check_input_dtype(self._X, name)
            if check:
                _check_finite(self._X, name)

    # ------------------------------------------------------------------ iteration
    def __len__(self) -> int:
        return self.n

    @property
    def num_batches(self) -> int:
        return -(-self.n // self.batch_size)

    @property
    def has_labels(self) -> bool:
        if self._X is not None:
            return self._Y is not None
        x, y = next(iter(self._raw()))
        return y is not None

    def _raw(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        if self._X is not None:
            for start in range(0, self.n, self.batch_size):
                stop = min(start + self.batch_size, self.n)
                y = self._Y[start:stop] if self._Y is not None else None
                yield self._X[start:stop], y
            return
        assert self._loader is not None
        for item in self._loader:
            if isinstance(item, Tensor):
                yield item, None
            elif isinstance(item, (tuple, list)) and len(item) >= 1:
                y = item[1] if len(item) > 1 else None
                if y is not None and not isinstance(y, Tensor):
                    y = torch.as_tensor(y)
                yield item[0], y
            else:
                raise TypeError(
                    f"{self.name}: Dataset items must be x or (x, y), got {type(item).__name__}"
                )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        for x, y in self._raw():
            if self._X is None:
                _check_not_meta(x, self.name)
                _check_input_dtype(x, self.name)
            if not (x.is_contiguous() or x.dim() < 4):
                # channels-last memory format: same values, but views inside the products need
                # the default layout
                x = x.contiguous()
            if self.check:
                if self._X is None:
                    _check_finite(x, self.name)
                if y is not None and self._Y is None:
                    _check_labels(y, self.name, self.num_classes)
            if self.device is not None or self.dtype is not None:
                x = x.to(device=self.device, dtype=self.dtype if x.is_floating_point() else None)
                if y is not None and self.device is not None:
                    y = y.to(self.device)
            yield x, y

    def with_options(self, **kwargs: Any) -> Batches:
        """The same data with other options (``batch_size``, ``device``, ``dtype``, ...)."""
        opts = dict(
            batch_size=self.batch_size,
            name=self.name,
            num_classes=self.num_classes,
            device=self.device,
            dtype=self.dtype,
            check=self.check,
        )
        opts.update(kwargs)
        return Batches(self, **opts)

    def first(self) -> tuple[Tensor, Tensor | None]:
        """The first batch (used to infer input shapes and the number of logits)."""
        return next(iter(self))

    def tensors(self) -> tuple[Tensor, Tensor | None]:
        """All of S as ``(X, Y)``: ``X`` of shape ``(|S|, *input_shape)``, ``Y`` ``(|S|,)``."""
        if self._X is not None and self.device is None and self.dtype is None:
            return self._X, self._Y
        xs, ys = [], []
        for x, y in self:
            xs.append(x)
            if y is not None:
                ys.append(y)
        return torch.cat(xs), (torch.cat(ys) if ys else None)

    def labels(self) -> Tensor:
        """The labels of S, shape ``(|S|,)``; a ``ValueError`` if the data carry none."""
        if self._Y is not None:
            _check_labels(self._Y, self.name, self.num_classes)
            return self._Y.to(self.device) if self.device is not None else self._Y
        ys = [y for _, y in self]
        if any(y is None for y in ys):
            raise ValueError(f"{self.name}: labels are required but the data carry none")
        return torch.cat(ys)

    def __repr__(self) -> str:
        return f"Batches(name={self.name!r}, n={self.n}, batch_size={self.batch_size})"


def _sequential_loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


def as_batches(data: Any, **kwargs: Any) -> Batches:
    """Coerce a Dataset, DataLoader, ``(X, Y)`` pair or :class:`Batches` into :class:`Batches`.

    Keyword arguments are those of :class:`Batches`; a :class:`Batches` given with no keyword
    arguments is returned unchanged.
    """
    if isinstance(data, Batches) and not kwargs:
        return data
    if isinstance(data, Batches):
        return data.with_options(**kwargs)
    return Batches(data, **kwargs)


def subset_indices(data: Any) -> tuple[int, list[int]] | None:
    """``(id(base dataset), indices)`` when ``data`` is an index-based subset, else ``None``.

    Used to report samples that appear both in the retain and the forget set.
    """
    ds = data.source if isinstance(data, Batches) else data
    if isinstance(ds, DataLoader):
        ds = ds.dataset
    if isinstance(ds, Subset):
        base, idx = ds.dataset, [int(i) for i in ds.indices]
        while isinstance(base, Subset):
            idx = [int(base.indices[i]) for i in idx]
            base = base.dataset
        return id(base), idx
    return None


def subset(data: Any, positions: Any) -> Any:
    """The samples of ``data`` at ``positions`` (a sequence or 1-D tensor of ints, in that order),
    in a form :func:`as_batches` accepts: an ``(X, Y)`` pair / ``X`` sliced, a Dataset as a
    ``Subset``, a DataLoader as a sequential loader over the ``Subset``; a :class:`Batches` by
    its source. Nothing outside ``positions`` is read."""
    if isinstance(positions, Tensor):
        positions = positions.reshape(-1).tolist()
    positions = [int(i) for i in positions]
    if isinstance(data, Batches):
        # A Batches keeps its dataset (loader/Dataset) or its (X, Y) pair as the source.
        return subset(data.source, positions)
    if isinstance(data, (tuple, list)):
        idx = torch.as_tensor(positions, dtype=torch.long, device=data[0].device)
        return tuple(t[idx.to(t.device)] for t in data)
    if isinstance(data, Tensor):
        return data[torch.as_tensor(positions, dtype=torch.long, device=data.device)]
    if isinstance(data, DataLoader):
        sub = Subset(data.dataset, positions)
        return DataLoader(
            sub, batch_size=data.batch_size, shuffle=False, collate_fn=data.collate_fn
        )
    if isinstance(data, Dataset):
        return Subset(data, positions)
    raise TypeError(f"data: cannot take a subset of a {type(data).__name__}")
