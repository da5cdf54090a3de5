"""Heads behave as scikit-learn estimators and learn the demo data."""
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone

from scenesweep.core.config import make_config
from scenesweep.compute.heads import HEAD_CLASSES, MLPHead, SVMHead, make_head
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


def huge_pages_only_where_asked() -> bool:
    """The kernel's mode is ``[madvise]``: a mapping gets huge pages only when its process asks
    (under ``[always]`` every one does, under ``[never]`` none: nothing of ours to see)."""
    try:
        return "[madvise]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return False


@pytest.mark.skipif(not huge_pages_only_where_asked(),
                    reason="the kernel's transparent huge pages are not in madvise mode")
def test_a_scenesweep_process_maps_large_buffers_on_huge_pages():
    """A 100 MB buffer (fc6's weight gradient, allocated afresh at every head step) is mapped for
    2 MiB pages in a process that runs scenesweep's compute code (the kernel's ``THPeligible``
    for its mapping), where 4 KiB pages cost the 25,000 page faults that dominated a head step's
    time (compute/numerics.py). How many huge pages the kernel then hands out depends on its free
    memory's fragmentation at that moment, not on us: under the full suite's load a fault count
    was 11,319 once, against about 300 on an idle machine, so the test reads the mapping."""
    code = (
        "import torch\n"
        "from scenesweep.compute import heads\n"
        "gradient = torch.ones(25088 * 1024)  # (fc6 out x in) floats: 100 MB\n"
        "address, inside = gradient.data_ptr(), False\n"
        "for line in open('/proc/self/smaps').read().splitlines():\n"
        "    first = line.split(' ', 1)[0]\n"
        "    if '-' in first and not first.endswith(':'):  # a mapping's header: START-END perms ...\n"
        "        start, end = (int(x, 16) for x in first.split('-'))\n"
        "        inside = start <= address < end\n"
        "    elif inside and line.startswith('THPeligible:'):\n"
        "        print(line.split()[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["1"], result.stdout


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
