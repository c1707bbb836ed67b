"""The torch MLP: the same network as the numpy MLP, trained with ``torch.optim.SGD``, or with
DP-SGD through Opacus (``dp_sgd``: per-example clipping and noise, and Opacus's RDP accountant;
the batches are the task's shuffled ones, so the accountant's sampling rate ``batch / n`` is
the usual approximation of Poisson sampling).

Importing this module needs the ``torch`` extra. Weights are exchanged as float32 numpy arrays
named like the state dict (``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ...); they are
initialised by ``numpy_models.init_params``, so a numpy and a torch node with the same seed start
from the same model, and the batch order comes from the same numpy generator.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

try:
    import torch
except ImportError as e:
    raise ImportError(
        "the torch models need PyTorch: install the 'torch' extra (pip install 'hfl-mqtt[torch]')"
    ) from e

from hfl_mqtt.tasks.base import (
    DpSgdConfig,
    EvalResult,
    TrainConfig,
    TrainResult,
    check_weights,
    train_result,
)
from hfl_mqtt.tasks.numpy_models import EVAL_CHUNK, batch_indices, check_data, init_params

__all__ = ["MLP", "TorchTask"]


class MLP(torch.nn.Module):
    """Fully connected layers ``fc1, fc2, ...`` with ReLU between them (none after the last)."""

    def __init__(self, layer_sizes: Sequence[int]) -> None:
        super().__init__()
        self.layers = len(layer_sizes) - 1
        for i in range(self.layers):
            self.add_module(f"fc{i + 1}", torch.nn.Linear(layer_sizes[i], layer_sizes[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.layers + 1):
            x = getattr(self, f"fc{i}")(x)
            if i < self.layers:
                x = torch.relu(x)
        return x


def _single_thread() -> None:
    # Torch uses every core for intra-op parallelism by default. Many simulated workers train
    # at once in one process on a small machine, so one thread each avoids oversubscription.
    # The setting is per process; it also makes results independent of the core count.
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


class TorchTask:
    """A ``Task``: a torch MLP (``hidden=()`` gives softmax regression) on local data, on CPU."""

    def __init__(
        self,
        x_train: npt.ArrayLike,
        y_train: npt.ArrayLike,
        x_eval: npt.ArrayLike,
        y_eval: npt.ArrayLike,
        *,
        num_features: int,
        num_classes: int,
        hidden: Sequence[int] = (64,),
        init_seed: int = 0,
        shuffle_seed: int = 0,
        dp_sgd: DpSgdConfig | None = None,
    ) -> None:
        x, y = check_data(x_train, y_train, num_features, num_classes, "training")
        xe, ye = check_data(x_eval, y_eval, num_features, num_classes, "evaluation")
        # torch.tensor copies: the caller's (possibly read-only, shared) arrays are not aliased.
        self._x, self._y = torch.tensor(x), torch.tensor(y)
        self._x_eval, self._y_eval = torch.tensor(xe), torch.tensor(ye)
        self._model = MLP([num_features, *hidden, num_classes])
        self.set_weights(init_params([num_features, *hidden, num_classes], init_seed))
        self._rng = np.random.default_rng(shuffle_seed)
        self._dp = _DpSgd(self._model, dp_sgd, shuffle_seed) if dp_sgd is not None else None

    @property
    def num_examples(self) -> int:
        return int(self._y.numel())

    def get_weights(self) -> dict[str, np.ndarray]:
        return {
            name: t.detach().cpu().numpy().astype(np.float32, copy=True)
            for name, t in self._model.state_dict().items()
        }

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        state = self._model.state_dict()
        check_weights({name: tuple(t.shape) for name, t in state.items()}, weights)
        with torch.no_grad():
            for name, t in state.items():
                t.copy_(torch.from_numpy(np.array(weights[name], dtype=np.float32)))

    def train(self, config: TrainConfig) -> TrainResult:
        _single_thread()
        model: torch.nn.Module = self._model
        params = list(model.parameters())
        reference = [p.detach().clone() for p in params] if config.proximal_mu else None
        optimizer: torch.optim.Optimizer = torch.optim.SGD(params, lr=config.learning_rate)
        if self._dp is not None:
            model, optimizer = self._dp.wrap(optimizer, config.batch_size)
        model.train()
        steps, loss_sum, correct, seen = 0, 0.0, 0, 0
        for idx in batch_indices(self.num_examples, config, self._rng):
            index = torch.from_numpy(idx)
            x, y = self._x[index], self._y[index]
            optimizer.zero_grad(set_to_none=True)
            logits = model(x)
            data_loss = torch.nn.functional.cross_entropy(logits, y)
            loss = data_loss
            if reference is not None:
                prox = sum(
                    (torch.sum((p - r) ** 2) for p, r in zip(params, reference, strict=True)),
                    torch.zeros(()),
                )
                loss = data_loss + 0.5 * config.proximal_mu * prox
            torch.autograd.backward(loss)
            optimizer.step()
            steps += 1
            loss_sum += float(data_loss.item())
            correct += int((logits.argmax(dim=1) == y).sum().item())
            seen += int(y.numel())
        result = train_result(self.num_examples, steps, loss_sum, correct, seen)
        if self._dp is not None:
            self._dp.spent(steps, config.batch_size / self.num_examples)
            result.metrics["dp_epsilon"] = self._dp.epsilon()
        return result

    def evaluate(self) -> EvalResult:
        _single_thread()
        model = self._model
        model.eval()
        loss_sum, correct = 0.0, 0
        n = int(self._y_eval.numel())
        with torch.no_grad():
            for start in range(0, n, EVAL_CHUNK):
                x = self._x_eval[start : start + EVAL_CHUNK]
                y = self._y_eval[start : start + EVAL_CHUNK]
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
                loss_sum += float(loss.item())
                correct += int((logits.argmax(dim=1) == y).sum().item())
        return EvalResult(n, loss_sum / n, correct / n)


class _DpSgd:
    """Opacus around one model: per-example gradients (kept hooked between runs), an optimizer
    that clips and noises them, and the accountant of every step so far."""

    def __init__(self, model: torch.nn.Module, config: DpSgdConfig, seed: int) -> None:
        try:
            from opacus import GradSampleModule
            from opacus.accountants import RDPAccountant
        except ImportError as e:
            raise ImportError(
                "dp_sgd needs Opacus: install the 'dpsgd' extra (pip install 'hfl-mqtt[dpsgd]')"
            ) from e
        # Opacus's hooks fire on the first layer, whose input needs no gradient: harmless.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        self.config = config
        self.model = GradSampleModule(model)
        self.accountant = RDPAccountant()
        self._generator = torch.Generator().manual_seed(seed)

    def wrap(
        self, optimizer: torch.optim.Optimizer, batch_size: int
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        from opacus.optimizers import DPOptimizer

        private = DPOptimizer(
            optimizer,
            noise_multiplier=self.config.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=batch_size,
            generator=self._generator,
        )
        return self.model, private

    def spent(self, steps: int, sample_rate: float) -> None:
        for _ in range(steps):
            self.accountant.step(
                noise_multiplier=self.config.noise_multiplier, sample_rate=min(1.0, sample_rate)
            )

    def epsilon(self) -> float:
        if self.config.noise_multiplier == 0:
            return float("inf")
        return float(self.accountant.get_epsilon(self.config.delta))
