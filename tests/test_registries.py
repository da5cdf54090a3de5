"""Names declared in one place and used in another agree: adding one in one place only fails here."""
import inspect

import optuna
import pytest
import torchvision

from scenesweep.compute import backbone, heads
from scenesweep.core import config
from scenesweep.search import sampling as search
from scenesweep.specs import studies

from helpers import REPO


@pytest.mark.parametrize("table, name", [(studies.SAMPLERS, n) for n in studies.SAMPLERS]
                         + [(studies.PRUNERS, n) for n in studies.PRUNERS])
def test_every_sampler_and_pruner_option_is_a_keyword_of_its_optuna_class(table, name):
    cls = search.optuna_class(table[name])
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    assert set(table[name].options) <= accepted, set(table[name].options) - accepted
    space = {"C": studies.Dimension("C", "float", 0.1, 1.0, values=(0.1, 1.0)),
             "layer": studies.Dimension("layer", "categorical", choices=("relu7", "fc7"))}
    required = {"percentile": 25.0, "patience": 2, "lower": 0.1}
    built = (search.make_sampler(name, 0, space) if table is studies.SAMPLERS
             else search.make_pruner(name, **{k: required[k] for k in (*table[name].required, *(("lower",) if name == "threshold" else ()))}))
    assert isinstance(built, cls)


def test_a_trial_seed_depends_on_the_study_seed_and_the_trial_number_only():
    seeds = {search.trial_seed(0, number) for number in range(100)}
    assert len(seeds) == 100 and search.trial_seed(0, 5) == search.trial_seed(0, 5)
    assert search.trial_seed(1, 5) != search.trial_seed(0, 5) and search.trial_seed(None, 5) is None


def test_parallel_workers_of_one_seeded_study_draw_different_points():
    """The same study file in two 'workers' (two sampler objects, one storage): no repeat."""
    storage = optuna.storages.InMemoryStorage()
    spec_sampler = {"name": "tpe", "seed": 0}
    workers = [search.TrialSeededSampler(lambda seed: search.make_sampler("tpe", seed), spec_sampler["seed"])
               for _ in range(2)]
    studies_ = [optuna.create_study(study_name="s", storage=storage, sampler=w, load_if_exists=True) for w in workers]
    drawn = []
    for index in range(8):
        trial = studies_[index % 2].ask()
        drawn.append(trial.suggest_float("C", 1e-5, 1e2, log=True))
        studies_[index % 2].tell(trial, drawn[-1])
    assert len(set(drawn)) == 8


def test_every_registered_head_pooling_layer_and_backbone_has_its_implementation():
    from scenesweep.core import backbone_families

    assert tuple(heads.HEAD_CLASSES) == config.HEADS
    assert set(backbone.FAMILY_CODE) == set(backbone_families.FAMILY_BY_NAME)
    assert tuple(backbone.FAMILY_CODE["vgg"].LAYER_FC_MODULES) == backbone_families.FAMILY_BY_NAME["vgg"].taps
    implemented = set(backbone.WINDOW_POOLINGS) | set(backbone.GlobalPool.KINDS) | {"token"}
    for family in backbone_families.FAMILIES:
        assert set(family.poolings) <= (set(backbone.WINDOW_POOLINGS) if family.pools_in_trunk and family.name == "vgg"
                                        else implemented), family.name
        for arch in family.archs:  # torchvision builds it and has its ImageNet weights
            assert torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    assert set(config.POOLINGS) == implemented and set(config.LAYERS) == {t for f in backbone_families.FAMILIES for t in f.taps}


def test_the_parameter_table_says_what_each_parameter_does():
    """One fact, one place: the table decides what a study may resume under, what selects data,
    what tuning trials may change and what names an experiment's study."""
    assert config.data_parameters() == ("data", "seed", "train_per_class", "val_fraction")
    assert config.tuning_parameters() == ("batch_size", "device")
    # batch_size changes what an mlp head learns, not the SVM's features; device and cache_dir nothing.
    assert "batch_size" in config.result_parameters("mlp") and "batch_size" not in config.result_parameters("svm")
    for head in ("svm", "mlp", None):
        assert not {"device", "cache_dir"} & set(config.result_parameters(head))


def test_a_pooling_study_refuses_to_resume_under_another_batch_size_but_an_svm_study_does_not(tmp_path):
    from scenesweep.runs.study_setting import study_setting

    pooling = studies.load_study(REPO / "sweeps" / "pooling.yaml")
    assert "batch_size" in study_setting(pooling) and study_setting(pooling)["tuning.batch_size"] == "64"
    svm = studies.load_study(REPO / "sweeps" / "svm_c.yaml")
    assert "batch_size" not in study_setting(svm) and "device" not in study_setting(svm)
