"""The README's promise for browsing: a study reads well in the MLflow UI and optuna-dashboard.

A tiny pooling study (2 trials, 3 epochs each) runs into the temporary store; ``scenesweep ui``
and ``scenesweep dashboard`` serve it on free ports of 127.0.0.1; headless Chromium, driven by
Playwright, checks what a user looks at: the experiment lists the study's parent run with its
trials nested and the Dataset column naming the data folder for every run, a trial's page shows
its metrics and the per-epoch val/acc chart, two trials compare side by side, the parent's
metrics page charts best/val/acc per trial (the study's live chart), and the dashboard shows
the study and a trial's MLflow run id and note. Both
servers are then stopped with Ctrl-C, as a user would.

Screenshots are saved in the test's temporary folder. With SCENESWEEP_DOCS_SCREENSHOTS=<folder>
set, the experiment page is also written there as mlflow-study.png (the README's picture:
``SCENESWEEP_DOCS_SCREENSHOTS=docs/images .venv/bin/python -m pytest tests/test_browser.py``).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from click.testing import CliRunner
from playwright.sync_api import TimeoutError as PlaywrightTimeout, expect, sync_playwright

from scenesweep.services import servers
from scenesweep.cli.main import main
from scenesweep.cli.ui import MODEL_TRAINING_VIEW
from scenesweep.tracking.mlflow_store import setup_tracking

from helpers import REPO, run_cli

CHROMIUM = Path("/usr/bin/chromium")
# Debian's Chromium as root, offline: no sandbox, no GPU, and none of the background
# connections that this machine's closed network refuses.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 900}
UI_TIMEOUT_MS = 60_000  # one page of a React app on 2 busy cores


@pytest.fixture
def browser_page(tmp_path):
    """A Playwright page in headless Debian Chromium with a fresh profile (never a downloaded browser)."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: make browser (apt-get install -y chromium)")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_FLAGS, viewport=VIEWPORT)
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context.pages[0] if context.pages else context.new_page()
        finally:
            context.close()


@contextlib.contextmanager
def serving(command: str, port: int, log_dir: Path) -> Iterator[subprocess.Popen]:
    """``scenesweep COMMAND --port PORT`` started in its own session, as a terminal runs it.

    On the way out, unless the test already stopped it, the ``scenesweep`` group gets SIGINT
    (Ctrl-C) and what is left of the server groups it started is killed, so that a failing
    test leaves no server behind.
    """
    stdout, stderr = log_dir / f"{command}.out", log_dir / f"{command}.err"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, "-m", "scenesweep", command, "--port", str(port)], cwd=REPO,
                                   env=dict(os.environ), stdout=out, stderr=err, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            server_groups = {os.getpgid(child.pid) for child in psutil.Process(process.pid).children()}
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            for group in server_groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)


def wait_until_answers(process: subprocess.Popen, command: str, url: str, log_dir: Path,
                       timeout_s: float = 180) -> None:
    """Until ``url`` answers 200; fails if ``scenesweep COMMAND`` exits first or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while not servers.answers(url):
        assert process.poll() is None, f"scenesweep {command} exited: {(log_dir / f'{command}.err').read_text()}"
        assert time.monotonic() < deadline, f"{url} never answered: {(log_dir / f'{command}.out').read_text()}"
        time.sleep(0.5)


def press_ctrl_c(process: subprocess.Popen, command: str, log_dir: Path) -> tuple[str, str]:
    """Ctrl-C in the terminal: SIGINT to the foreground process group. Returns (stdout, stderr)."""
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=60)
    return (log_dir / f"{command}.out").read_text(), (log_dir / f"{command}.err").read_text()


def experiment_id(name: str) -> str:
    from mlflow.tracking import MlflowClient

    return MlflowClient().get_experiment_by_name(name).experiment_id


def save_screenshot(page, path: Path, **options) -> None:
    page.screenshot(path=str(path), **options)
    assert path.stat().st_size > 10_000, f"{path} looks blank"


def save_docs_screenshot(page, name: str) -> None:
    """The README's picture, in a palette of 128 colours (a small PNG to commit)."""
    folder = os.environ.get("SCENESWEEP_DOCS_SCREENSHOTS")
    if not folder:
        return
    from PIL import Image

    path = (REPO / folder / name).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), clip={"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 420})
    Image.open(path).convert("RGB").quantize(colors=128).save(path, optimize=True)


# The finished parent's name carries the study's result.
PARENT_NAME = re.compile(r"^sweep_pooling study · best val\/acc 0\.\d{4}$")  # "/" escaped for playwright


def open_model_training_view(page, base_url: str, experiment: str) -> None:
    """The experiment page at the address ``scenesweep ui`` prints: in the "Model training" view
    (MLflow 3.17 opens in its GenAI view otherwise)."""
    page.goto(f"{base_url}/#/experiments/{experiment_id(experiment)}?{MODEL_TRAINING_VIEW}")
    page.get_by_text(PARENT_NAME).first.wait_for()


def close_assistant_panel(page) -> None:
    """The MLflow Assistant panel opens by itself on a first visit (and stays closed once closed)."""
    close = page.get_by_role("button", name="Close")
    with contextlib.suppress(PlaywrightTimeout):
        close.first.wait_for(timeout=5_000)
        close.first.click()


def trial_link(page, number: int):
    return page.get_by_role("link", name=re.compile(rf"^sweep_pooling #{number} pooling=\w+ lr="))


def expand_parent_run(page) -> None:
    """Show the trials under the study's parent run (the UI remembers an expanded parent)."""
    page.get_by_text("3 matching runs").wait_for()  # the parent and its two trials are loaded
    with contextlib.suppress(PlaywrightTimeout):
        trial_link(page, 0).wait_for(timeout=3_000)
    if not trial_link(page, 0).is_visible():
        parent_row = page.locator(".ag-row", has_text="sweep_pooling study · best val/acc")
        parent_row.get_by_role("button").first.click()  # the +/- beside the run name
    trial_link(page, 0).wait_for()
    trial_link(page, 1).wait_for()


def show_columns(page, names: tuple[str, ...]) -> None:
    """Tick columns in the "Columns" menu, through its search box (the list is virtual)."""
    page.get_by_role("button", name="Columns").click()
    search = page.get_by_placeholder("Search columns")
    for name in names:
        search.fill(name)
        page.locator(".du-bois-light-tree-title").filter(has_text=re.compile(f"^{re.escape(name)}$")).first.click()
    page.keyboard.press("Escape")


def widen_run_name_column(page) -> None:
    """Fit the Run Name column to the trial names (double-click on its edge, as in a spreadsheet)."""
    header = page.locator(".ag-header-cell").filter(has=page.get_by_text("Run Name", exact=True))
    header.locator(".ag-header-cell-resize").dblclick()


def check_experiment_page(page, base_url: str, shots: Path) -> None:
    open_model_training_view(page, base_url, "pooling")
    close_assistant_panel(page)
    expand_parent_run(page)
    # Hide what is empty for sweeps; show the objective, test accuracy and the searched params.
    show_columns(page, ("Source", "Models", "val/acc", "best/val/acc", "test/acc",
                        "pooling", "lr", "dropout", "hidden"))
    page.locator(".ag-header-cell").filter(has=page.get_by_text("val/acc", exact=True)).wait_for()
    widen_run_name_column(page)
    trial_row = page.locator(".ag-center-cols-container .ag-row").nth(1)
    assert re.search(r"0\.\d+", trial_row.inner_text()), trial_row.inner_text()  # metrics show as numbers
    check_dataset_column(page)
    save_screenshot(page, shots / "1-experiment.png")
    save_docs_screenshot(page, "mlflow-study.png")


def check_dataset_column(page) -> None:
    """The Dataset column names the data folder ('scenes', with the split's digest) for the
    parent and every trial, instead of '-': mlflow.log_input of the train/validation/test splits."""
    page.locator(".ag-header-cell").filter(has=page.get_by_text("Dataset", exact=True)).first.wait_for()
    cells = page.locator(".ag-center-cols-container .ag-row [col-id*='dataset' i]")
    if cells.count() == 0:  # the column id differs between UI versions: read the rows' text instead
        cells = page.locator(".ag-center-cols-container .ag-row")
    expect(cells.first).to_contain_text("scenes")
    texts = [cells.nth(i).inner_text() for i in range(min(cells.count(), 3))]
    assert all("scenes" in text for text in texts), texts  # the parent and both trials


def check_trial_page(page, shots: Path) -> None:
    trial_link(page, 0).click()
    page.get_by_role("heading", name=re.compile(r"sweep_pooling #0 pooling=")).wait_for()
    for text in ("val/acc", "train/loss", "time/extract_batch_p95_s", "pooling", "Parent run"):
        page.get_by_text(text, exact=True).first.wait_for()
    page.get_by_text(PARENT_NAME).first.wait_for()
    save_screenshot(page, shots / "2-trial-overview.png", full_page=True)
    page.get_by_text("Model metrics", exact=True).click()
    page.get_by_placeholder("Search metric charts").fill("val/acc")
    # One chart, section "val", title "acc", legend "<run name> (val/acc)", x axis in epochs (steps).
    page.get_by_text(re.compile(r"sweep_pooling #0 .*\(val/acc\)$")).first.wait_for()
    page.get_by_text("Step", exact=True).first.wait_for()
    expect(page.locator(".js-plotly-plot .point")).to_have_count(3)  # epochs 1, 2, 3
    save_screenshot(page, shots / "3-trial-val-acc-chart.png")


def check_compare_view(page, base_url: str, shots: Path) -> None:
    open_model_training_view(page, base_url, "pooling")
    expand_parent_run(page)
    for number in (0, 1):
        row = page.locator(".ag-row", has=trial_link(page, number))
        row.get_by_role("checkbox").first.check()
    page.get_by_role("button", name="Compare").click()
    page.get_by_text("Comparing 2 Runs from 1 Experiment").wait_for()
    page.get_by_text("Parallel Coordinates Plot").first.wait_for()
    for number in (0, 1):
        page.get_by_text(re.compile(rf"^sweep_pooling #{number} pooling=")).first.wait_for()
    save_screenshot(page, shots / "4-compare.png", full_page=True)


def check_parent_run_description(page, base_url: str, shots: Path) -> None:
    open_model_training_view(page, base_url, "pooling")
    page.get_by_role("link", name=PARENT_NAME).click()
    page.get_by_role("heading", name=PARENT_NAME).wait_for()
    page.get_by_text(re.compile(r"Best trial #\d: val/acc = ")).first.wait_for()  # mlflow.note.content
    save_screenshot(page, shots / "5-parent-run.png", full_page=True)


def check_parent_live_chart(page, shots: Path) -> None:
    """On the parent's metrics page, best/val/acc is a chart over steps = trial numbers (0, 1):
    the study's optimisation history, logged as each trial ended, its last point the result."""
    page.get_by_text("Model metrics", exact=True).click()
    page.get_by_placeholder("Search metric charts").fill("best/val/acc")
    page.get_by_text(re.compile(r"sweep_pooling study · best val/acc 0\.\d{4} \(best/val/acc\)$")).first.wait_for()
    page.get_by_text("Step", exact=True).first.wait_for()
    expect(page.locator(".js-plotly-plot .point")).to_have_count(2)  # trials 0 and 1
    save_screenshot(page, shots / "8-parent-best-val-acc-chart.png")


def check_dashboard(page, base_url: str, shots: Path) -> None:
    page.goto(f"{base_url}/dashboard")
    page.get_by_text("sweep_pooling", exact=False).first.click()
    page.get_by_text(re.compile(r"Best Trial \(number=\d\)")).wait_for()
    save_screenshot(page, shots / "6-dashboard-study.png")
    page.goto(page.url.rstrip("/") + "/trials")
    page.get_by_text("mlflow_run_id").first.wait_for()  # each trial links to its MLflow run
    # ... and its note says where: a link to the run in the MLflow UI.
    page.get_by_role("link", name=re.compile(r"^[0-9a-f]{32}$")).first.wait_for()
    page.get_by_text(re.compile(r"Trial #\d of `?sweep_pooling")).first.wait_for()
    save_screenshot(page, shots / "7-dashboard-trials.png", full_page=True)


def test_a_study_reads_well_in_the_mlflow_ui_and_optuna_dashboard(flat_scenes, browser_page, tmp_path):
    setup_tracking()  # the store exists, so the UI can start while the study runs
    ui_port, dashboard_port = servers.free_port(), servers.free_port()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with serving("ui", ui_port, tmp_path) as ui:
        study = run_cli("sweep", str(REPO / "sweeps" / "pooling.yaml"), "--n_trials", "2", "--epochs", "3",
                        "--data", str(flat_scenes), "--train_per_class", "10", "--cache_dir", str(tmp_path / "cache"),
                        "--no-register", "--no-progress")
        assert study.returncode == 0, study.stderr[-4000:]
        with serving("dashboard", dashboard_port, tmp_path) as dashboard:
            wait_until_answers(dashboard, "dashboard", f"http://127.0.0.1:{dashboard_port}/api/meta", tmp_path)
            check_dashboard(browser_page, f"http://127.0.0.1:{dashboard_port}", shots)
            out, err = press_ctrl_c(dashboard, "dashboard", tmp_path)
            assert dashboard.returncode == 0 and "Traceback" not in err, err
            assert "stopped optuna-dashboard" in out
        ui_url = f"http://127.0.0.1:{ui_port}"
        wait_until_answers(ui, "ui", f"{ui_url}/health", tmp_path)
        check_experiment_page(browser_page, ui_url, shots)
        check_trial_page(browser_page, shots)
        check_compare_view(browser_page, ui_url, shots)
        check_parent_run_description(browser_page, ui_url, shots)
        check_parent_live_chart(browser_page, shots)
        out, err = press_ctrl_c(ui, "ui", tmp_path)
        assert ui.returncode == 0 and "Traceback" not in err, err
        assert f"MLflow UI ready: {ui_url}" in out and "stopped the MLflow UI" in out
    assert servers.port_is_free(ui_port) and servers.port_is_free(dashboard_port)  # no server left behind


def invoke(*args: str, env: dict[str, str] | None = None):
    """The CLI in-process (click's runner: the same code path, without a new interpreter)."""
    result = CliRunner().invoke(main, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback would have escaped: show it
    return result


def test_ui_and_dashboard_refuse_a_missing_store_in_one_line(tmp_path):
    missing = tmp_path / "nowhere" / "mlflow.db"
    result = invoke("ui", env={"MLFLOW_TRACKING_URI": f"sqlite:///{missing}"})
    assert result.exit_code == 2
    assert result.stderr == (f"error: no MLflow tracking store at {missing}: run something first "
                             "(make demo, or scenesweep sweep sweeps/svm_c.yaml), or set MLFLOW_TRACKING_URI\n")
    assert not missing.exists()  # asking to browse does not create an empty store
    result = invoke("dashboard", "--storage", f"sqlite:///{tmp_path / 'optuna.db'}")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: no Optuna storage at {tmp_path / 'optuna.db'}: run a study first")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("command, title", [("ui", "MLflow UI"), ("dashboard", "optuna-dashboard")])
def test_ui_and_dashboard_refuse_a_port_in_use(command, title, store):
    for database in ("mlflow.db", "optuna.db"):  # both stores exist (empty SQLite files): only the port is wrong
        (store / database).touch()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        result = invoke(command, "--port", str(port))
    assert result.exit_code == 2
    assert result.stderr == (f"error: port {port} on 127.0.0.1 is already in use (another {title}?): "
                             "stop it or pick another with --port\n")
