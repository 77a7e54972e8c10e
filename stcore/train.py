"""One training loop for every model of the course.

A model plugs in by implementing ``loss(batch) -> dict[str, Tensor]``: the named terms (reconstruction, KL,
contrastive, ...) already multiplied by their weights. :func:`fit` sums them, steps the optimiser, logs every term
per epoch, shows a progress bar and stops early when the total stops improving::

    history = stcore.train.fit(model, data, epochs=cfg.epochs(full=600), lr=1e-3)
    stcore.plotting.loss_curves(history)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from collections.abc import Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

__all__ = ["History", "fit", "kl_warmup", "set_seed", "to_device"]


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch so a CPU run repeats exactly."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def kl_warmup(epoch: int, n_epochs: int | None) -> float:
    """KL weight at ``epoch`` (0-based) of a linear warm-up from 0 to 1 over ``n_epochs`` (``None``/0: always 1)."""
    if not n_epochs:
        return 1.0
    return min(1.0, epoch / n_epochs)


def to_device(batch, device):
    """Move a tensor, a PyG ``Data`` or a (nested) tuple/list/dict of them to ``device``."""
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


@dataclass
class History:
    """Per-epoch mean of every named loss term (``terms``) and of their sum (``total``)."""

    terms: dict[str, list[float]] = field(default_factory=dict)
    total: list[float] = field(default_factory=list)
    best_epoch: int = -1
    stopped_early: bool = False

    def __len__(self) -> int:
        return len(self.total)

    def as_frame(self):
        import pandas as pd

        return pd.DataFrame({**self.terms, "total": self.total})


def _batches(data) -> Iterable:
    if data is None:
        return [None]
    if callable(data):  # a factory of fresh mini-batches each epoch
        return data()
    if isinstance(data, (list, torch.utils.data.DataLoader)):
        return data
    return [data]  # full batch


def fit(
    model: torch.nn.Module,
    data=None,
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    optimizer: torch.optim.Optimizer | None = None,
    seed: int | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    restore_best: bool = False,
    grad_clip: float | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
    callback: Callable[[int, dict], bool | None] | None = None,
) -> History:
    """Train ``model`` by minimising the sum of the terms returned by ``model.loss(batch)``.

    Parameters
    ----------
    model
        An ``nn.Module`` with ``loss(batch) -> dict[str, Tensor]`` (scalar terms, weights already applied).
    data
        One batch (full-batch training, the usual case for a slide), a list or ``DataLoader`` of mini-batches,
        or a callable returning a fresh iterable of mini-batches each epoch. ``None`` calls ``model.loss(None)``.
    epochs
        Maximum number of passes over ``data``.
    lr, weight_decay
        Adam settings, used when no ``optimizer`` is given.
    seed
        Seed set before training (``None``: leave the random state alone).
    patience, min_delta
        Stop when the epoch's total loss has not improved by ``min_delta`` for ``patience`` epochs.
    restore_best
        Load the weights of the best epoch at the end.
    grad_clip
        Clip the gradient norm to this value.
    callback
        Called as ``callback(epoch, terms)`` after each epoch (e.g. to update a target network or an EMA, or to
        check a method's own convergence rule); returning ``True`` stops training.

    Returns
    -------
    History
    """
    if not hasattr(model, "loss"):
        raise TypeError(f"{type(model).__name__} has no loss(batch) method returning a dict of named terms.")
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be at least 1.")
    if seed is not None:
        set_seed(seed)
    if device is not None:
        model.to(device)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = History()
    best, best_state, wait = float("inf"), None, 0
    bar = tqdm(range(epochs), desc=desc or type(model).__name__, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        for batch in _batches(data):
            if device is not None:
                batch = to_device(batch, device)
            terms = model.loss(batch)
            if not isinstance(terms, dict) or not terms:
                raise TypeError("model.loss(batch) must return a non-empty dict of named scalar loss terms.")
            total = sum(terms.values())
            if not torch.isfinite(total):
                raise FloatingPointError(
                    f"The loss became {total.item()} at epoch {epoch} ({ {k: float(v) for k, v in terms.items()} }). "
                    "Lower the learning rate or check the input for extreme values.")
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_batches += 1
        means = {k: v / n_batches for k, v in sums.items()}
        for k, v in means.items():
            history.terms.setdefault(k, []).append(v)
        epoch_total = sum(means.values())
        history.total.append(epoch_total)
        bar.set_postfix(loss=f"{epoch_total:.4g}")
        if callback is not None and callback(epoch, means):
            history.stopped_early = True
            break
        if epoch_total < best - min_delta:
            best, wait, history.best_epoch = epoch_total, 0, epoch
            if restore_best:
                best_state = copy.deepcopy(model.state_dict())
        else:
            wait += 1
            if patience is not None and wait >= patience:
                history.stopped_early = True
                break
    bar.close()
    if restore_best and best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return history
