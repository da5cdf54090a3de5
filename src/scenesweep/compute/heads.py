"""Heads trained on cached features, as scikit-learn estimators.

``__init__`` only stores hyperparameters and ``fit`` sets attributes ending in ``_``
(``get_params`` / ``set_params`` come from ``BaseEstimator``); a trial builds its head from its
configuration (``compute.training``). ``HEAD_CLASSES`` maps each head name of ``core.config.HEADS`` to its class.

This module imports neither MLflow, Optuna nor click.
"""
from __future__ import annotations

import hashlib
import pickle
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.linalg import solve_triangular
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import normalize as l2_normalize
from sklearn.svm import LinearSVC
from torch import nn

from ..core.config import parse_hidden
from ..core.progress import progress_bar
from . import numerics  # noqa: F401  (denormals flushed before torch's threads start)
from .atomic_files import atomic_write
from .features import batch_timing_stats
from .hardware import resolve_device
from .mlp_layers import build_mlp, release_buffers
from .precision import autocast

EpochCallback = Callable[[int, dict], None]


def span_coordinates(X: np.ndarray) -> tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]:
    """The samples' coordinates in an orthonormal basis of their span, and the map of a weight
    vector in those coordinates back to the features.

    X (N, D) with D > N. The Gram matrix G = X X^T (N, N) = L L^T (Cholesky): Z = L has the same
    inner products as X (Z Z^T = G), so a linear SVM sees the same problem; the basis is
    Q = X^T L^-T (D, N) and w = Q w_z. Forming G is one matrix product: 1.3 s against 10 s for the
    QR of X^T this replaced (N=1000, D=25088, float64, one core; /tmp figures in the issue-28 note).
    A rank-deficient G (duplicate images) has no Cholesky factor: its eigenvectors with non-zero
    eigenvalues give the basis instead (Z = V sqrt(lambda), Q = X^T V / sqrt(lambda)).
    """
    X64 = X.astype(np.float64)
    gram = X64 @ X64.T  # (N, N)
    try:
        lower = np.linalg.cholesky(gram)
        return lower.astype(np.float32), lambda w: (solve_triangular(lower, w.T, lower=True, trans="T").T @ X64)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(gram)
        keep = values > values.max() * 1e-12
        values, vectors = values[keep], vectors[:, keep]  # (k,), (N, k)
        return (vectors * np.sqrt(values)).astype(np.float32), lambda w: ((w / np.sqrt(values)) @ vectors.T) @ X64


class SVMHead(ClassifierMixin, BaseEstimator):
    """A linear SVM (liblinear's LinearSVC) on optionally L2-normalised features.

    On raw VGG features C barely matters (the problem is separable: a hard margin); after
    L2 normalisation C does, which is what the study's C sweep needs.
    """

    def __init__(self, C: float = 1.0, normalize: bool = True, max_iter: int = 5000, seed: int = 0):
        self.C = C
        self.normalize = normalize
        self.max_iter = max_iter
        self.seed = seed

    def _prepare(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        return l2_normalize(X) if self.normalize else X

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set=None, on_epoch: EpochCallback | None = None):
        began = time.perf_counter()
        # liblinear's dual solver needs thousands of passes at large C (90 s at C=90 on 800 x 4096
        # features here) where the primal Newton solver needs ~16 iterations (1 s), same accuracy;
        # at small C the dual one is the quicker.
        self.svc_ = LinearSVC(C=self.C, max_iter=self.max_iter, random_state=self.seed, dual=self.C < 1.0)
        X = self._prepare(X)  # (N, D)
        # With more features than samples (pool5: 25088 against ~1200), an L2-penalised linear
        # model's weights lie in the span of the samples (representer theorem): fitting on the
        # samples' coordinates in an orthonormal basis of that span, Z (N, k), is the same problem
        # (same margins, same penalty), and w maps back. 20 s -> 1 s per fit.
        to_features = None
        if X.shape[1] > X.shape[0]:
            X, to_features = span_coordinates(X)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            self.svc_.fit(X, y)
        self.converged_ = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        coef = self.svc_.coef_ if to_features is None else to_features(self.svc_.coef_)  # (n_classes or 1, D)
        self.coef_ = np.ascontiguousarray(coef, dtype=np.float32)
        self.intercept_ = np.asarray(self.svc_.intercept_, dtype=np.float32)
        self.classes_ = self.svc_.classes_
        self.fit_seconds_ = time.perf_counter() - began
        self.history_ = []
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, n_classes) decision values (as LinearSVC's: X w + b per class)."""
        if not hasattr(self, "coef_"):  # a head pickled before coef_ existed (a registered model)
            scores = self.svc_.decision_function(self._prepare(X))
            return scores if scores.ndim == 2 else np.stack([-scores, scores], axis=1)
        scores = self._prepare(X) @ self.coef_.T + self.intercept_  # (N, n_classes) or (N, 1)
        return scores if scores.shape[1] > 1 else np.concatenate([-scores, scores], axis=1)

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        return self.decision_function(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean multi-class hinge loss (what LinearSVC minimises, one-vs-rest, without the penalty)."""
        scores = self.decision_function(X)
        signs = np.where(self.classes_[None, :] == np.asarray(y)[:, None], 1.0, -1.0)
        return float(np.mean(np.sum(np.maximum(0.0, 1.0 - signs * scores) ** 2, axis=1)))


class MLPHead(ClassifierMixin, BaseEstimator):
    """The study's new classifier head trained with Adam and cross-entropy on cached features.

    ``fit`` can take an ``eval_set`` (the validation split) and an ``on_epoch`` callback that
    receives ``(epoch, metrics)`` after every epoch: that is how per-epoch curves reach
    tracking and how a pruner stops a trial (the callback raises), without this class knowing
    either.
    """

    def __init__(self, hidden: str = "1024,1024", dropout: float = 0.5, epochs: int = 10, lr: float = 1e-3,
                 weight_decay: float = 0.0, batch_size: int = 32, device: str = "auto", seed: int = 0,
                 progress: bool = False, precision: str = "fp32"):
        self.hidden = hidden
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.device = device
        self.seed = seed
        self.progress = progress
        self.precision = precision

    def fit(self, X: np.ndarray, y: np.ndarray, eval_set: tuple[np.ndarray, np.ndarray] | None = None,
            on_epoch: EpochCallback | None = None):
        device = resolve_device(self.device)
        torch.manual_seed(self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        self.classes_, y_index = np.unique(y, return_inverse=True)
        # On CUDA the features sit on the device as one tensor: a batch is an index, not a copy.
        X_t = torch.as_tensor(np.asarray(X, dtype=np.float32)).to(device)  # (N, D)
        y_t = torch.as_tensor(y_index, dtype=torch.long).to(device)
        self.model_ = build_mlp(X_t.shape[1], parse_hidden(self.hidden), self.dropout, len(self.classes_)).to(device)
        optimizer = torch.optim.Adam(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay,
                                     fused=device.type in ("cpu", "cuda"))
        loss_fn = nn.CrossEntropyLoss()
        self.history_: list[dict] = []
        batch_seconds: list[float] = []
        batch_counts: list[int] = []
        # Denormals are flushed process-wide (compute/numerics.py): a head that learns little
        # would otherwise slow down epoch after epoch.
        try:
            self._train(X_t, y_t, optimizer, loss_fn, generator, device, eval_set, on_epoch, batch_seconds,
                        batch_counts)
        finally:
            release_buffers(self.model_)  # the last step's gradients and the kept buffers: 100 MB or more
        self.train_timing_ = batch_timing_stats(batch_seconds, batch_counts)
        return self

    def _train(self, X_t: torch.Tensor, y_t: torch.Tensor, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
               generator: torch.Generator, device: torch.device, eval_set, on_epoch: EpochCallback | None,
               batch_seconds: list[float], batch_counts: list[int]) -> None:
        """Every epoch: the steps over a shuffled order, then the epoch's metrics and callback."""
        # Off a terminal no closing line: the run's or trial's own line tells how training went.
        for epoch in progress_bar(range(1, self.epochs + 1), desc="train head", unit="epoch",
                                  disable=not self.progress, stage=False):
            self.model_.train()
            order = torch.randperm(len(X_t), generator=generator).to(device)
            # Summed on the device, read once per epoch: no synchronisation per step.
            total_loss = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.long, device=device)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                began = time.perf_counter()
                xb, yb = X_t[idx], y_t[idx]  # (B, D), (B,)
                with autocast(device, self.precision):  # "bf16" where it was measured faster
                    logits = self.model_(xb)  # (B, n_classes)
                    loss = loss_fn(logits, yb)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                batch_seconds.append(time.perf_counter() - began)
                batch_counts.append(len(idx))
                total_loss += loss.detach() * len(idx)
                correct += (logits.detach().argmax(1) == yb).sum()
            metrics = {"train/loss": float(total_loss) / len(order), "train/acc": int(correct) / len(order)}
            if eval_set is not None:
                metrics.update({f"val/{k}": v for k, v in self.evaluate(*eval_set).items()})
            self.history_.append({"epoch": epoch, **metrics})
            if on_epoch is not None:
                on_epoch(epoch, metrics)

    def _logits(self, X: np.ndarray) -> torch.Tensor:
        device = next(self.model_.parameters()).device
        self.model_.eval()
        parts = []
        with torch.inference_mode():
            for start in range(0, len(X), 1024):
                block = torch.as_tensor(np.asarray(X[start:start + 1024], dtype=np.float32), device=device)
                parts.append(self.model_(block).float().cpu())
        return torch.cat(parts) if parts else torch.zeros(0, len(self.classes_))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, D) features -> (N, n_classes) softmax probabilities."""
        return torch.softmax(self._logits(X), dim=1).numpy()

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        return self.predict_proba(X)

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[np.argmax(self._logits(X).numpy(), axis=1)]

    def loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy on (X, y); labels outside the fitted classes are not expected."""
        index = np.searchsorted(self.classes_, np.asarray(y))
        return float(nn.functional.cross_entropy(self._logits(X), torch.as_tensor(index, dtype=torch.long)))

    def evaluate(self, X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        logits = self._logits(X)
        index = torch.as_tensor(np.searchsorted(self.classes_, np.asarray(y)), dtype=torch.long)
        return {"loss": float(nn.functional.cross_entropy(logits, index)),
                "acc": float((logits.argmax(1) == index).float().mean())}

    def __getstate__(self):
        # Pickle the network on the CPU so a model saved on a GPU loads anywhere.
        state = dict(self.__dict__)
        if "model_" in state:
            state["model_"] = state["model_"].to("cpu")
        return state


HEAD_CLASSES = {"svm": SVMHead, "mlp": MLPHead}  # every name of core.config.HEADS


def save_head(head: BaseEstimator, path: Path) -> str:
    """A fitted head pickled to ``path`` (a temporary file renamed into place); returns its sha256.

    An mlp head pickles its network on the CPU (``MLPHead.__getstate__``), so it loads anywhere.
    """
    payload = pickle.dumps(head, protocol=pickle.HIGHEST_PROTOCOL)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(payload))
    return hashlib.sha256(payload).hexdigest()


def load_head(path: Path, sha256: str) -> tuple[BaseEstimator | None, str]:
    """The head ``save_head`` wrote, or None with the reason (missing, or not what was written)."""
    try:
        payload = Path(path).read_bytes()
    except OSError as error:
        return None, f"its file {path} is not here ({error.strerror or error.__class__.__name__})"
    if hashlib.sha256(payload).hexdigest() != sha256:
        return None, f"its file {path} is not the one written (sha256 differs)"
    try:
        return pickle.loads(payload), ""
    except Exception as error:  # an unpicklable file from another version of the package
        return None, f"its file {path} does not load ({error.__class__.__name__})"


def make_head(name: str, **params) -> BaseEstimator:
    """A head from its registered name, keeping only the parameters it takes."""
    cls = HEAD_CLASSES[name]
    accepted = cls().get_params()
    return cls(**{k: v for k, v in params.items() if k in accepted})
