"""The model registry: a sweep registers its best model as @challenger; `promote` moves @champion.

One tiny study (2 trials, 3 classes, 32 px) runs once for the module against its own SQLite
store; the promotion tests register that study's logged model again under names of their own,
with version tags set to make the better / worse / tied / other-dataset cases.
"""
import json
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from scenesweep.cli.main import main
from scenesweep.core.errors import ConfigError
from scenesweep.models.promotion import promote
from scenesweep.models.registry import CHALLENGER, CHAMPION

from helpers import CLASSES, REPO, make_image, run_cli, run_mlflow_project

pytestmark = pytest.mark.slow


def write_flat_scenes(root: Path) -> Path:
    """The same images as conftest's flat_scenes, made once for the module."""
    for label, name in enumerate(CLASSES):
        for index in range(14):
            suffix = ".jpg" if index % 2 else ".png"
            make_image(root / name / f"{name}_{index:02d}{suffix}", label, index, "RGB" if index % 3 == 0 else "L",
                       size=(40 + 4 * (index % 3), 36 + 2 * (index % 4)))
    return root


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """`scenesweep sweep sweeps/svm_c.yaml` with 2 trials, against a store of this module."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'store' / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": uri, "SCENESWEEP_OFFLINE": "1", "TORCH_HOME": str(folder / "torch_home"),
           "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    scenes = write_flat_scenes(folder / "scenes")
    result = run_cli("sweep", str(REPO / "sweeps" / "svm_c.yaml"), "--n_trials", "2", "--data", str(scenes),
                     "--train_per_class", "10", "--cache_dir", str(folder / "cache"), "--no-progress", env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return SimpleNamespace(uri=uri, env=env, stdout=result.stdout, scenes=scenes, cache=folder / "cache")


@pytest.fixture
def client(swept, monkeypatch):
    """An MlflowClient on the module's store (the autouse fixture gave this test an empty one)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", swept.uri)
    mlflow.set_tracking_uri(swept.uri)
    return MlflowClient()


def register_versions(client, name, tag_sets):
    """Register the study's model again under ``name``, once per tag set (its own tags updated
    by the set); returns the version numbers."""
    studied = client.get_model_version("scene-classifier", "1")
    return [str(mlflow.register_model(studied.source, name, tags={**studied.tags, **tags}).version)
            for tags in tag_sets]


def champion_of(client, name):
    aliases = client.get_registered_model(name).aliases
    return str(aliases[CHAMPION]) if CHAMPION in aliases else None


def test_a_sweep_registers_its_best_trial_with_tags_and_alias_challenger(client, swept):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = [r for r in runs if r.data.tags.get("sweep") == "parent"][0]
    best = [r for r in runs if r.data.tags.get("best_trial") == "true"][0]
    assert best.data.tags[MLFLOW_PARENT_RUN_ID] == parent.info.run_id

    version = client.get_model_version("scene-classifier", "1")
    tags = version.tags
    assert tags["study"] == "sweep_svm"
    assert tags["trial_number"] == parent.data.tags["best_trial"] == best.data.tags["trial_number"]
    assert tags["parent_run_id"] == parent.info.run_id  # registered by the study's parent ...
    # ... from its best trial's run: one name, one meaning (the version's Source Run).
    assert version.run_id == tags["run_id"] == best.info.run_id
    assert best.data.tags["registered_version"] == "1"
    assert tags["dataset_fingerprint"] == best.data.params["dataset_fingerprint"]
    assert float(tags["val_acc"]) == pytest.approx(parent.data.metrics["best/val/acc"], abs=1e-6)
    assert float(tags["test_acc"]) == pytest.approx(parent.data.metrics["test/acc"], abs=1e-6)
    # A version row shows what a user filters or promotes by; the configuration is on the record
    # and in the description (the registered model page shows every version tag in its row).
    assert set(tags) == {"run_id", "parent_run_id", "study", "trial_number", "dataset_fingerprint", "val_acc",
                         "val_loss", "test_acc", "model_id"}
    assert f"layer={best.data.params['layer']}" in version.description and "svm head" in version.description
    registered = client.get_registered_model("scene-classifier")
    assert {k: str(v) for k, v in registered.aliases.items()} == {CHALLENGER: "1"}  # champion: promote's job
    assert "base64" in registered.description and f"trial #{tags['trial_number']}" in version.description
    assert "registered scene-classifier version 1 (alias @challenger)" in swept.stdout

    # MLflow 3's model record is the best trial's model with the trial's numbers, nothing else.
    model_id = version.source.rsplit("/", 1)[-1]
    assert tags["model_id"] == model_id and version.model_id in (None, model_id)  # no column for it in SQL stores
    record = client.get_logged_model(model_id)
    assert record.source_run_id == best.info.run_id and record.name == f"scene-classifier-sweep_svm-svm-{record.params['layer']}"
    # MLflow's own links both ways: the record lists its version (the logged model page says
    # "Registered", not "Not registered"), and it is an output of the best trial's run ("Logged models").
    assert json.loads(record.tags["mlflow.modelVersions"]) == [{"name": "scene-classifier", "version": "1"}]
    assert model_id in {o.model_id for o in client.get_run(best.info.run_id).outputs.model_outputs}
    trial_params = {k: v for k, v in best.data.params.items() if k in record.params}
    assert record.params["C"] == best.data.params["C"] and record.params == {**trial_params, "head": "svm"}
    linked = {m.key: m.value for m in record.metrics}
    assert set(linked) == {"val/acc", "val/loss", "test/acc", "test/loss", "test/f1_macro", "test/acc_balanced",
                           "model/size_mb"}
    assert linked["val/acc"] == pytest.approx(best.data.metrics["val/acc"])
    assert linked["test/acc"] == pytest.approx(parent.data.metrics["test/acc"])
    found = mlflow.search_logged_models(experiment_ids=[best.info.experiment_id], order_by=[
        {"field_name": "metrics.test/acc", "ascending": False}], output_format="list")
    assert [m.model_id for m in found] == [model_id]
    # Everything needed to serve offline travels with the model: backbone weights, head, code.
    assert {a.path for a in client.list_logged_model_artifacts(model_id, "artifacts")} == {
        "artifacts/backbone.pt", "artifacts/head.pkl", "artifacts/spec.json"}
    assert "code/scenesweep" in {a.path for a in client.list_logged_model_artifacts(model_id, "code")}


def test_first_promotion_then_only_a_better_version_moves_the_champion(client):
    first, second = register_versions(client, "better", [{"val_acc": "0.800000"}, {"val_acc": "0.700000"}])
    done = promote("better", metric="val_acc")
    assert done.promoted and done.version == first and done.previous is None
    assert "no @champion before" in done.message and champion_of(client, "better") == first

    again = promote("better", metric="val_acc")
    assert not again.promoted and "already the @champion" in again.message

    (third,) = register_versions(client, "better", [{"val_acc": "0.900000"}])
    done = promote("better", metric="val_acc")
    assert done.promoted and done.version == third and done.previous == first
    assert f"beats version {first} (val_acc=0.8000)" in done.message
    assert champion_of(client, "better") == third


def test_a_worse_or_tied_version_is_kept_out_unless_forced(client):
    champion, worse = register_versions(client, "worse", [{"val_acc": "0.900000"}, {"val_acc": "0.850000"}])
    client.set_registered_model_alias("worse", CHAMPION, champion)

    kept = promote("worse", metric="val_acc", version=worse)
    assert not kept.promoted and champion_of(client, "worse") == champion
    assert f"kept version {champion}" in kept.message and "does not beat" in kept.message and "--force" in kept.message

    (tied,) = register_versions(client, "worse", [{"val_acc": "0.900000"}])
    kept = promote("worse", metric="val_acc")  # the newest of the tied best is the candidate
    assert not kept.promoted and kept.version == tied and "ties" in kept.message

    forced = promote("worse", metric="val_acc", version=worse, force=True)
    assert forced.promoted and champion_of(client, "worse") == worse
    assert "forced" in forced.message and forced.previous == champion


def test_a_version_of_another_dataset_does_not_displace_the_champion(client):
    champion, other = register_versions(client, "datasets", [{"val_acc": "0.600000"},
                                                             {"val_acc": "0.990000", "dataset_fingerprint": "f" * 64}])
    client.set_registered_model_alias("datasets", CHAMPION, champion)
    kept = promote("datasets", metric="val_acc")
    assert not kept.promoted and kept.version == other and "another dataset" in kept.message
    assert promote("datasets", metric="val_acc", force=True).promoted and champion_of(client, "datasets") == other


def test_val_loss_ranks_lowest_first(client):
    low, high = register_versions(client, "loss", [{"val_loss": "0.100000"}, {"val_loss": "0.500000"}])
    assert promote("loss", metric="val_loss").version == low


def test_promotion_ranks_model_records_across_studies_and_experiments(client, swept):
    """`promote --metric test/acc` reads the versions' model records (mlflow.search_logged_models
    over every experiment): the champion is the best model of a study (experiment svm) and of
    single runs (experiments svm and finetune); `--where` narrows the candidates."""
    studied = client.get_model_version("scene-classifier", "1")
    mlflow.register_model(studied.source, "several", tags=studied.tags)  # the study's model, record and all
    for entry, options in (("finetune", ("--epochs", "2", "--hidden", "32")), ("svm", ("--C", "0.0001"))):
        result = run_cli(entry, "--data", str(swept.scenes), "--train_per_class", "10", "--cache_dir", str(swept.cache),
                         "--no-progress", "--register", "several", *options, env=swept.env)
        assert result.returncode == 0, result.stderr[-3000:]
    versions = client.search_model_versions("name='several'")
    records = {v.version: client.get_logged_model(v.tags["model_id"]) for v in versions}
    assert len({r.experiment_id for r in records.values()}) == 2 and len(records) == 3
    test_acc = {str(n): next(m.value for m in r.metrics if m.key == "test/acc") for n, r in records.items()}
    best = max(test_acc, key=lambda n: (test_acc[n], int(n)))
    done = promote("several", metric="test/acc")
    assert done.promoted and done.version == best and f"test/acc={test_acc[best]:.4f}" in done.message
    # Only the mlp heads' records (the finetune run): its version, and it must beat the champion.
    mlp = next(n for n, r in records.items() if r.params["head"] == "mlp")
    narrowed = promote("several", metric="test/acc", where="params.head = 'mlp'", force=True)
    assert narrowed.version == str(mlp) and (narrowed.promoted or str(mlp) == best)
    # @challenger went only to a version at least as good on the objective (val/acc) as its holder.
    val_acc = {str(v.version): float(v.tags["val_acc"]) for v in versions}
    holder = None
    for number in ("2", "3"):  # registered by the runs (version 1 by hand, without the alias)
        holder = number if holder is None or val_acc[number] >= val_acc[holder] else holder
    assert str(client.get_registered_model("several").aliases[CHALLENGER]) == holder


def test_unknown_model_metric_or_version_is_a_clear_error(client):
    with pytest.raises(ConfigError, match="model 'nope' is not registered; registered models: .*scene-classifier"):
        promote("nope")
    with pytest.raises(ConfigError, match="metric='accuracy': expected one of val/acc, val/loss, test/acc"):
        promote("scene-classifier", metric="accuracy")
    with pytest.raises(ConfigError, match="version='9': model 'scene-classifier' has no such version; versions: 1"):
        promote("scene-classifier", version="9")
    register_versions(client, "untested", [{"test_acc": ""}])
    client.delete_model_version_tag("untested", "1", "test_acc")
    with pytest.raises(ConfigError, match="no version of 'untested' carries a test_acc tag"):
        promote("untested", metric="test_acc")


def invoke(*args: str):
    """The CLI in this process (the entry-point test below starts a real one)."""
    return CliRunner().invoke(main, list(args))


@pytest.mark.parametrize("args, fragment", [
    (("--name", "nope"), "model 'nope' is not registered"),
    (("--metric", "accuracy"), "metric='accuracy': expected one of val/acc, val/loss, test/acc"),
    (("--metric", "val_acc", "--where", "params.layer = 'relu7'"), "where=\"params.layer = 'relu7'\": filters model records"),
    (("--metric", "test/acc", "--where", "metrics.nope >"), "where='metrics.nope >': not a model-record filter"),
    (("--version", "12"), "version='12': model 'scene-classifier' has no such version"),
])
def test_promote_command_bad_input_is_one_error_line(client, args, fragment):
    result = invoke("promote", *args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fragment in errors[0], result.output


def test_promote_entry_point_and_force_flag(client):
    """`mlflow run . -e promote` passes `--force false`; `--force` alone means true."""
    champion, worse = register_versions(client, "entry", [{"val_acc": "0.900000"}, {"val_acc": "0.800000"}])
    result = run_mlflow_project("promote", {"name": "entry", "metric": "val_acc"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"promoted version {champion} of entry to @champion" in result.stdout
    kept = invoke("promote", "--name", "entry", "--metric", "val_acc", "--version", worse, "--force", "false")
    assert kept.exit_code == 0 and f"kept version {champion}" in kept.stdout, kept.output
    forced = invoke("promote", "--name", "entry", "--metric", "val_acc", "--force", "--version", worse)
    assert forced.exit_code == 0 and f"promoted version {worse}" in forced.stdout, forced.output
    assert "forced, although it does not beat" in forced.stdout
    assert champion_of(client, "entry") == worse
