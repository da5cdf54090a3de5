"""Where the test suite's time goes, per test file: the tests' wall time, the CPU of the pytest
worker itself, the CPU of the processes the tests start, and how many Python interpreters they
start (each one pays the imports of torch, torchvision, MLflow and scikit-learn again).

It runs the suite as ``make test`` does (``python -m pytest -q -n auto --dist loadfile``) with two
probes, both in a temporary folder put on ``PYTHONPATH`` for that run only:

* a pytest plugin (``-p suite_cost_probe``) that records, around every test (setup, call and
  teardown): its wall time, the CPU of the worker process (``os.times``: user + system), and the
  CPU of the child processes it reaped meanwhile (``os.times``' children: every process the test
  started and waited for, killed ones and non-Python ones such as Chromium included; a daemon
  such as PostgreSQL's postmaster is not a child and is not counted), plus the CPU of the
  ``scenesweep`` processes it forked from the tests' pre-imported zygote (``tests/warm_processes.py``
  reports each one's, as they are not the worker's children);
* a ``sitecustomize.py`` that appends one line per Python interpreter started, with the test
  that was running (``PYTEST_CURRENT_TEST``, which the processes inherit) and its command.

It also measures, once, the CPU one new interpreter spends importing the sweep driver
(``import scenesweep.runs.sweep``): what every sweep worker, ``scenesweep run`` or served model a
test starts pays before it does anything (a services command or an MLflow server's worker
imports less, ``sh`` nothing), so the number of interpreters a file starts, times that, is an
upper bound of its import cost.

Usage:
    .venv/bin/python benchmarks/suite_cost.py [--out FILE.json] [-- PYTEST ARGS]

PYTEST ARGS replace the default test selection (e.g. ``-- tests/test_sweeps.py``). Run it on an
otherwise idle machine: the figures are the suite's own only then.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, load_average, table  # noqa: E402

PLUGIN = '''
import os, sys, time, json
import pytest

_LOG = os.environ["SUITE_COST_TESTS"]


def _forked():
    """Processes forked from the tests' zygote (tests/warm_processes.py) that ended, their CPU."""
    module = sys.modules.get("warm_processes")
    return (module.FORKED["processes"], module.FORKED["cpu_s"]) if module else (0, 0.0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, forked_before, began = os.times(), _forked(), time.perf_counter()
    yield
    after, forked_after = os.times(), _forked()
    record = {"test": item.nodeid, "wall_s": time.perf_counter() - began,
              "self_cpu_s": after.user + after.system - before.user - before.system,
              "children_cpu_s": (after.children_user + after.children_system
                                 - before.children_user - before.children_system
                                 + forked_after[1] - forked_before[1]),
              "forked": forked_after[0] - forked_before[0]}
    with open(_LOG, "a") as log:
        log.write(json.dumps(record) + "\\n")
'''

SITECUSTOMIZE = '''
import os
_log = os.environ.get("SUITE_COST_PROCESSES")
if _log:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            _command = f.read().replace(b"\\0", b" ").decode(errors="replace")[:300]
    except OSError:
        _command = "?"
    _test = os.environ.get("PYTEST_CURRENT_TEST", "")
    with open(_log, "a") as f:
        f.write(_test.replace("\\t", " ") + "\\t" + _command.replace("\\n", " ") + "\\n")
'''


def import_cpu_s(repeats: int = 2) -> float:
    """CPU seconds (user + system) of a new interpreter importing the sweep driver; the least of
    ``repeats``."""
    spent = []
    for _ in range(repeats):
        before = os.times()
        subprocess.run([sys.executable, "-c", "import scenesweep.runs.sweep"], check=True)
        after = os.times()
        spent.append(after.children_user + after.children_system - before.children_user - before.children_system)
    return min(spent)


def file_of(test: str) -> str:
    return test.split("::")[0].split(" ")[0]


def per_file(tests: list[dict], processes: list[tuple[str, str]]) -> dict[str, dict]:
    files: dict[str, dict] = defaultdict(lambda: defaultdict(float))
    for record in tests:
        row = files[file_of(record["test"])]
        row["tests"] += 1
        for key in ("wall_s", "self_cpu_s", "children_cpu_s"):
            row[key] += record[key]
        row["forked"] += record.get("forked", 0)
    for test, command in processes:
        if test:  # an interpreter a test started (not a pytest worker)
            files[file_of(test)]["interpreters"] += 1
    return files


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args = ["-q", "-n", "auto", "--dist", "loadfile"]
    if "--" in argv:
        cut = argv.index("--")
        argv, selection = argv[:cut], argv[cut + 1:]
        pytest_args += selection
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write every test's and process's record here (JSON)")
    args = parser.parse_args(argv)

    print(f"load average at start: {load_average()}")
    import_s = import_cpu_s()
    print(f"a new interpreter importing the sweep driver: {import_s:.1f} CPU s")
    with tempfile.TemporaryDirectory(prefix="suite-cost-") as probe:
        probe_dir = Path(probe)
        (probe_dir / "suite_cost_probe.py").write_text(PLUGIN)
        (probe_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        tests_log, processes_log = probe_dir / "tests.jsonl", probe_dir / "processes.tsv"
        env = dict(os.environ, SUITE_COST_TESTS=str(tests_log), SUITE_COST_PROCESSES=str(processes_log),
                   PYTHONPATH=os.pathsep.join(filter(None, [probe, os.environ.get("PYTHONPATH")])))
        command = [sys.executable, "-m", "pytest", "-p", "suite_cost_probe", *pytest_args]
        print("running: " + " ".join(command))
        began, before = time.perf_counter(), os.times()
        done = subprocess.run(command, cwd=REPO, env=env)
        wall, after = time.perf_counter() - began, os.times()
        cpu = after.children_user + after.children_system - before.children_user - before.children_system
        tests = [json.loads(line) for line in tests_log.read_text().splitlines()] if tests_log.exists() else []
        processes = [tuple(line.split("\t", 1)) for line in processes_log.read_text().splitlines()] \
            if processes_log.exists() else []
    files = per_file(tests, processes)
    rows = []
    for name, row in sorted(files.items(), key=lambda item: -item[1]["wall_s"]):
        cpu_s = row["self_cpu_s"] + row["children_cpu_s"]
        rows.append([name.removeprefix("tests/"), str(int(row["tests"])), f"{row['wall_s']:.0f}",
                     f"{row['self_cpu_s']:.0f}", f"{row['children_cpu_s']:.0f}",
                     f"{cpu_s / row['wall_s']:.2f}" if row["wall_s"] else "-", str(int(row["interpreters"])),
                     str(int(row["forked"]))])
    print(f"\nThe suite: {wall:.0f} s wall, {cpu:.0f} CPU s in all ({cpu / wall:.2f} cores busy on average, "
          f"{os.cpu_count()} cores), exit {done.returncode}")
    print(table(["file", "tests", "wall s (tests summed)", "worker CPU s", "started processes' CPU s",
                 "CPU / wall", "interpreters started", "forked from the zygote"], rows))
    total = {key: sum(row[key] for row in files.values())
             for key in ("wall_s", "self_cpu_s", "children_cpu_s", "interpreters", "forked")}
    print(f"   summed: {total['wall_s']:.0f} s of tests, {total['self_cpu_s']:.0f} CPU s in the workers, "
          f"{total['children_cpu_s']:.0f} CPU s in {int(total['interpreters'])} started interpreters, "
          f"{int(total['forked'])} processes forked from the tests' zygotes and other processes "
          f"(at most {import_s:.1f} CPU s of imports for each interpreter)")
    print("   CPU / wall below 1: the file waits (servers starting, heartbeats, polls); CPU counts a test's "
          "processes once they are reaped, so a daemon (PostgreSQL) is not in it.")
    print(f"load average at end: {load_average()}")
    if args.out:
        args.out.write_text(json.dumps({"wall_s": wall, "cpu_s": cpu, "import_cpu_s": import_s, "tests": tests,
                                        "processes": processes}, indent=1) + "\n")
        print(f"written: {args.out}")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
