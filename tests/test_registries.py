"""Names declared in one place and used in another agree: adding one in one place only fails here."""
import inspect

import optuna
import pytest

from scenesweep.compute import backbone, heads
from scenesweep.core import config
from scenesweep.search import sampling as search
from scenesweep.specs import studies


@pytest.mark.parametrize("name", studies.SAMPLERS)
def test_every_sampler_option_is_a_keyword_of_optunas_sampler(name):
    built = search.SAMPLERS[name](0)
    accepted = set(inspect.signature(type(built).__init__).parameters) - {"self"}
    assert set(studies.SAMPLER_OPTIONS[name]) <= accepted, set(studies.SAMPLER_OPTIONS[name]) - accepted


@pytest.mark.parametrize("name", studies.PRUNERS)
def test_every_pruner_option_is_a_keyword_of_optunas_pruner(name):
    built = search.PRUNERS[name]()
    accepted = set(inspect.signature(type(built).__init__).parameters) - {"self"}
    assert set(studies.PRUNER_OPTIONS[name]) <= accepted, set(studies.PRUNER_OPTIONS[name]) - accepted


def test_the_study_files_names_and_the_search_registries_agree():
    assert tuple(search.SAMPLERS) == studies.SAMPLERS
    assert tuple(search.PRUNERS) == studies.PRUNERS


def test_a_trial_seed_depends_on_the_study_seed_and_the_trial_number_only():
    seeds = {search.trial_seed(0, number) for number in range(100)}
    assert len(seeds) == 100 and search.trial_seed(0, 5) == search.trial_seed(0, 5)
    assert search.trial_seed(1, 5) != search.trial_seed(0, 5) and search.trial_seed(None, 5) is None


def test_parallel_workers_of_one_seeded_study_draw_different_points():
    """The same study file in two 'workers' (two sampler objects, one storage): no repeat."""
    storage = optuna.storages.InMemoryStorage()
    spec_sampler = {"name": "tpe", "seed": 0}
    workers = [search.TrialSeededSampler(lambda seed: search.SAMPLERS["tpe"](seed), spec_sampler["seed"])
               for _ in range(2)]
    studies_ = [optuna.create_study(study_name="s", storage=storage, sampler=w, load_if_exists=True) for w in workers]
    drawn = []
    for index in range(8):
        trial = studies_[index % 2].ask()
        drawn.append(trial.suggest_float("C", 1e-5, 1e2, log=True))
        studies_[index % 2].tell(trial, drawn[-1])
    assert len(set(drawn)) == 8


def test_every_registered_head_pooling_and_layer_has_its_implementation():
    assert tuple(heads.HEADS) == config.HEADS
    assert tuple(backbone.POOLING_LAYERS) == config.POOLINGS
    assert tuple(backbone.LAYER_FC_MODULES) == config.LAYERS
