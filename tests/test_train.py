import numpy as np
import pytest
import torch

from stcore import train


class Quadratic(torch.nn.Module):
    """loss = (w - 3)^2 + 0.5 * w^2, minimised at w = 2."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))

    def loss(self, batch):
        return {"fit": (self.w - 3) ** 2, "penalty": 0.5 * self.w ** 2}


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)

    def loss(self, batch):
        x, y = batch
        return {"mse": ((self.lin(x).squeeze(-1) - y) ** 2).mean()}


def test_named_terms_are_logged_and_summed():
    model = Quadratic()
    hist = train.fit(model, epochs=300, lr=0.05, progress=False)
    assert float(model.w) == pytest.approx(2.0, abs=1e-3)
    assert set(hist.terms) == {"fit", "penalty"} and len(hist) == 300
    assert hist.total[-1] == pytest.approx(hist.terms["fit"][-1] + hist.terms["penalty"][-1])
    assert hist.total[-1] == pytest.approx(3.0, abs=1e-3)  # (2-3)^2 + 0.5*4
    assert list(hist.as_frame().columns) == ["fit", "penalty", "total"]


def test_seed_makes_runs_repeat():
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5])
    batches = list(zip(x.split(16), y.split(16)))
    runs = []
    for _ in range(2):
        train.set_seed(7)
        model = Regression()
        hist = train.fit(model, batches, epochs=20, lr=0.05, progress=False)
        runs.append((model.lin.weight.detach().clone(), hist.total))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert runs[0][1][-1] < 0.05 * runs[0][1][0]


def test_early_stopping_and_restore_best():
    model = Quadratic()
    hist = train.fit(model, epochs=10_000, lr=0.05, patience=5, min_delta=1e-6, restore_best=True, progress=False)
    assert hist.stopped_early and len(hist) < 10_000
    assert hist.best_epoch == int(np.argmin(hist.total))


def test_callable_data_and_callback():
    seen = []
    x = torch.randn(8, 3)
    model = Regression()
    train.fit(model, lambda: [(x, x.sum(1))], epochs=3, progress=False, callback=lambda e, t: seen.append((e, set(t))))
    assert seen == [(0, {"mse"}), (1, {"mse"}), (2, {"mse"})]


def test_errors():
    with pytest.raises(TypeError, match="loss"):
        train.fit(torch.nn.Linear(2, 2), epochs=1)

    class Exploding(Quadratic):
        def loss(self, batch):
            return {"bad": self.w * float("nan")}

    with pytest.raises(FloatingPointError, match="learning rate"):
        train.fit(Exploding(), epochs=2, progress=False)
    with pytest.raises(ValueError, match="at least 1"):
        train.fit(Quadratic(), epochs=0)


def test_callback_can_stop_training():
    hist = train.fit(Quadratic(), epochs=100, progress=False, callback=lambda epoch, terms: epoch == 4)
    assert len(hist) == 5 and hist.stopped_early
