"""Heads behave as scikit-learn estimators and learn the demo data."""
import os
import subprocess
import sys

import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from scenesweep.core.config import make_config
from scenesweep.compute.heads import HEAD_CLASSES, MLPHead, SVMHead, make_head
from scenesweep.compute.mlp_layers import KeptGradLinear, build_mlp, release_buffers
from scenesweep.compute.precision import autocast
from scenesweep.compute.training import fit_head, prepare


@pytest.mark.parametrize("name", sorted(HEAD_CLASSES))
def test_heads_follow_the_estimator_contract(name):
    head = make_head(name)
    params = head.get_params()
    tuned = clone(head).set_params(**{next(iter(params)): params[next(iter(params))]})
    assert tuned.get_params() == params
    assert not [k for k in vars(head) if k.endswith("_")]  # __init__ only stores hyperparameters


@pytest.mark.parametrize("name", sorted(HEAD_CLASSES))
def test_heads_fit_and_predict_on_separable_features(name):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (3, 16))
    y = np.repeat(np.arange(3), 30)
    X = centres[y] + 0.05 * rng.normal(0, 1, (90, 16))
    head = make_head(name, epochs=30, hidden="32", dropout=0.0, lr=1e-2)
    head.fit(X, y)
    assert np.mean(head.predict(X) == y) == 1.0
    assert head.predict_scores(X).shape == (90, 3)
    assert head.loss(X, y) >= 0


def test_mlp_reports_every_epoch_to_its_callback():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(40, 8)), np.arange(40) % 2
    seen = []
    MLPHead(hidden="8", epochs=4).fit(X, y, eval_set=(X, y), on_epoch=lambda e, m: seen.append((e, sorted(m))))
    assert [e for e, _ in seen] == [1, 2, 3, 4]
    assert seen[0][1] == ["train/acc", "train/loss", "val/acc", "val/loss"]


def test_svm_on_digits_reaches_the_demo_sanity_figure(shared_cache):
    """FACTS: digits, random VGG16, 32 px, L2-normalised relu7 features, C=1: about 90 % test."""
    result = fit_head(prepare(make_config("svm", {"cache_dir": str(shared_cache), "C": 1.0}), progress=False),
                      evaluate_test=True)
    assert result.metrics["val/acc"] > 0.8
    assert result.metrics["test/acc"] > 0.8
    assert result.confusion.sum() == len(result.prepared.split.test)


def test_selection_never_sees_the_test_split(shared_cache):
    prepared = prepare(make_config("svm", {"cache_dir": str(shared_cache)}), progress=False)
    result = fit_head(prepared)
    assert not [k for k in result.metrics if k.startswith("test/")]
    assert set(prepared.split.test).isdisjoint(set(prepared.split.train) | set(prepared.split.val))


@pytest.mark.parametrize("C", [0.05, 1.0, 20.0])
def test_the_svm_fits_in_the_samples_span_with_liblinears_own_answer(C):
    """More features than samples (pool5): fitted in the span of the samples, the SVM gives
    liblinear's own decision values, only quicker."""
    from sklearn.preprocessing import normalize
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 500)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    X[:, :3] += 3 * np.eye(3)[y]
    head = SVMHead(C=C).fit(X[:45], y[:45])
    reference = LinearSVC(C=C, dual=C < 1.0, max_iter=5000).fit(normalize(X[:45]), y[:45])
    np.testing.assert_allclose(head.decision_function(X[45:]), reference.decision_function(normalize(X[45:])),
                               atol=1e-3)
    assert head.coef_.shape == (3, 500)


def plain_mlp(in_features: int, hidden: tuple[int, ...], n_classes: int) -> torch.nn.Sequential:
    """The head as autograd's own layers would build it (every Linear an ``nn.Linear``)."""
    layers, width = [], in_features
    for out in hidden:
        layers += [torch.nn.Linear(width, out), torch.nn.ReLU(inplace=True), torch.nn.Dropout(0.5)]
        width = out
    return torch.nn.Sequential(*layers, torch.nn.Linear(width, n_classes))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [(64, 32), ()], ids=["hidden", "linear"])
def test_a_head_step_writes_its_first_weight_gradient_into_one_buffer_with_autograds_numbers(precision, hidden):
    """The head's first layer (fc6 of the study's head: a 100 MB weight gradient) keeps one buffer
    for its weight gradient across steps, instead of a fresh allocation per step whose 4 KiB pages
    each fault (compute/mlp_layers.py); losses and weights after 30 Adam steps are autograd's
    ``nn.Linear``'s bit for bit, in fp32 and under bf16 autocast. A trained head keeps no buffer."""
    X, y = torch.randn(240, 500), torch.randint(0, 15, (240,))  # (N, D) features, labels
    trained = []
    for build in (lambda: build_mlp(500, hidden, 0.5, 15), lambda: plain_mlp(500, hidden, 15)):
        torch.manual_seed(0)
        model = build().train()
        torch.manual_seed(1)  # the same dropout masks for both
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
        losses, buffers = [], set()
        for step in range(30):
            rows = slice(step * 8, step * 8 + 8)
            with autocast(torch.device("cpu"), precision):
                loss = torch.nn.functional.cross_entropy(model(X[rows]), y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            buffers.add(model[0].weight.grad.data_ptr())
        trained.append((losses, [p.detach().clone() for p in model.parameters()], buffers, model))
    (kept_losses, kept_weights, kept_buffers, kept), (losses, weights, buffers, _) = trained
    assert isinstance(kept[0], KeptGradLinear) and len(kept_buffers) == 1 and len(buffers) > 1
    assert kept_losses == losses and all(torch.equal(a, b) for a, b in zip(kept_weights, weights))
    release_buffers(kept)
    assert kept[0].kept_grad is None and all(p.grad is None for p in kept.parameters())
    assert len(pickle.dumps(kept)) < 1.1 * sum(p.numel() * 4 for p in kept.parameters()) + 10_000


def test_a_fitted_mlp_head_pickles_without_its_training_buffers():
    rng = np.random.default_rng(0)
    X, y = rng.normal(0, 1, (60, 300)).astype(np.float32), np.repeat(np.arange(3), 20)
    head = MLPHead(hidden="16", epochs=2, batch_size=8).fit(X, y)
    first = head.model_[0]
    assert isinstance(first, KeptGradLinear) and first.kept_grad is None and first.weight.grad is None
    assert (pickle.loads(pickle.dumps(head)).predict(X) == head.predict(X)).all()


def test_denormals_are_flushed_in_every_thread_of_a_scenesweep_process():
    """Denormal floats (below 1.2e-38) read as zero in a process that ran scenesweep's compute
    code: in torch's worker threads too (a head that learns little fills Adam's state with them,
    and x86 is many times slower on them), in a pool that an extraction started before the head
    trains (the flag is per thread: only threads created after it is set inherit it)."""
    code = (
        "import torch\n"
        "from scenesweep.compute import heads\n"
        "torch.randn(2048, 2048) @ torch.randn(2048, 2048)  # the thread pool runs\n"
        "tiny = torch.full((1 << 22,), 1e-39)  # large enough to be split between threads\n"
        "print(int((tiny * 1.0).count_nonzero()), int((tiny.view(64, -1) @ torch.ones(tiny.numel() // 64, 1)).count_nonzero()))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["0", "0"], result.stdout
