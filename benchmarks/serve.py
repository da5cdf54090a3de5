"""Benchmark the servable image classifier over REST against the same model in process.

For each image size (32 px, the demo size, and 224 px, the study's), one run:

1. trains an svm head on VGG16 relu7 features (random weights) of a subset of scikit-learn's
   digits, in a temporary SQLite store, and registers its servable model
   (``scenesweep svm --register NAME``, in a child process);
2. starts ``--processes`` (2) real ``mlflow models serve -m models:/NAME/1 --env-manager local``
   servers on 127.0.0.1 (time until /ping answers is reported), and as many worker processes
   that load the same model with ``mlflow.pyfunc.load_model`` and time their ``predict`` calls
   (the in-process path). Two of each, because on this shared 2-core machine one process of a
   path has run 2 to 7x slower than another of the same path, for its whole life;
3. measures, in rounds of short blocks so that a busy period of the machine is shared by all:
   * one image per call: median and p95 latency, served (POST /invocations with
     ``dataframe_split``, one HTTP connection per request, as curl makes) and in process;
   * 16 images per call: images per second, served and in process;
   * in each in-process worker, after each predict, the network alone on the same images decoded
     and preprocessed beforehand (``ImageClassifier.network_features``: what extraction computes);
   and prints each process's figures, the ratio served / in process of the best process of each
   path, and in process / network alone (what decoding, preprocessing, the head and the table add).

Every process timed did nothing but load the model (in this script's own process, which
trains, predict ran 1.5 to 2x slower).

Usage:
    .venv/bin/python benchmarks/serve.py [--sizes 32 224] [--single N] [--batches N] [--processes N] [--keep]

The model's precision is what the features were extracted in (bf16 on CPUs with native bf16,
fp32 elsewhere; see ``serving.serving_precision``). Accuracies are those of an untrained
network and a small training set: they are printed only to show the model is a real one.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/_common.py
from _common import digits_subset, machine_line  # noqa: E402  (puts src/ on the path when needed)

WARMUP = 3  # untimed calls of each kind first: oneDNN picks its kernels per input shape
# Timed calls per block of one kind, after one untimed call. Blocks, not single calls taking turns:
# a call made right after the other process computed ran up to 2.7x slower (caches and
# scheduler state are the other process's), which measured the turn-taking, not the path.
BLOCK = {1: 4, 16: 2}
BATCH = 16
IMAGES_PER_CLASS = 30  # digits subset: features of every image are extracted, so keep it small
TRAIN_PER_CLASS = 20


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class Timings:
    """Seconds per call of one path (served or in process) and one call size."""

    seconds: list[float]
    images_per_call: int

    @property
    def median_ms(self) -> float:
        return 1000 * statistics.median(self.seconds)

    @property
    def p95_ms(self) -> float:
        return 1000 * percentile(self.seconds, 95)

    @property
    def images_per_s(self) -> float:
        """Throughput of the median call (a mean would follow the few calls another process slowed)."""
        return self.images_per_call / statistics.median(self.seconds)


def train_and_register(data: Path, cache: Path, image_size: int, name: str) -> tuple[dict, list[Path]]:
    """``scenesweep svm`` on relu7 at ``image_size``, registered as ``name`` version 1.

    Returns:
        Accuracies and precision of the run, and the test images of its split.
    """
    from mlflow.tracking import MlflowClient

    from scenesweep.core.config import make_config
    from scenesweep.compute.training import load_data

    values = {"data": str(data), "image_size": image_size, "layer": "relu7", "train_per_class": TRAIN_PER_CLASS,
              "cache_dir": str(cache), "C": 1.0}
    options = [item for key, value in values.items() for item in (f"--{key}", str(value))]
    done = subprocess.run([sys.executable, "-m", "scenesweep", "svm", *options, "--register", name, "--no-progress"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"training failed: {done.stderr[-3000:]}")
    client = MlflowClient()
    version = client.get_model_version(name, "1")
    info = {"val_acc": float(version.tags["val_acc"]), "test_acc": float(version.tags["test_acc"]),
            "precision": client.get_run(version.run_id).data.params["resolved.precision"]}
    dataset, split = load_data(make_config("svm", values))
    return info, [dataset.absolute(int(i)) for i in split.test]


class Server:
    """``mlflow models serve`` started, awaited and stopped (its whole process group) by the
    project's own ``scenesweep.services.servers``."""

    def __init__(self, model_uri: str, log_path: Path):
        from scenesweep.services import servers

        self.servers = servers
        self.server = servers.model_server(model_uri, servers.free_port())
        self.port = self.server.port
        began = time.perf_counter()
        self.process = servers.start(self.server, log_path)
        servers.wait_until_ready(self.server, self.process, timeout_s=180, log=log_path)
        self.startup_s = time.perf_counter() - began

    def request(self, method: str, path: str, body: str | None = None) -> tuple[int, bytes]:
        """One request on a new connection, as curl makes it (uvicorn closes a kept-alive
        connection after 5 s idle, shorter than some in-process calls between two requests)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            reply = connection.getresponse()
            return reply.status, reply.read()
        finally:
            connection.close()

    def predict(self, images_b64: list[str]) -> list[dict]:
        body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b] for b in images_b64]}})
        status, raw = self.request("POST", "/invocations", body)
        answer = json.loads(raw)
        if status != 200:
            raise RuntimeError(f"served predict failed ({status}): {answer}")
        return answer["predictions"]

    def stop(self) -> None:
        self.servers.stop(self.process)


class InProcess:
    """A worker process that loads the model with pyfunc and times ``predict`` on request.

    Protocol, one JSON line each way: ``{"images": [base64, ...]}`` -> ``{"seconds": s, "labels": [...]}``.
    """

    def __init__(self, model_uri: str):
        # Its own session, as the server's: with the kernel's autogroup scheduling, CPU time is
        # shared between sessions, so both paths must compete for the cores on equal terms.
        self.process = subprocess.Popen([sys.executable, __file__, "--worker", model_uri], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, start_new_session=True)
        self.load_s = json.loads(self.process.stdout.readline())["load_s"]

    def predict(self, images_b64: list[str]) -> dict:
        self.process.stdin.write(json.dumps({"images": images_b64}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the in-process worker ended")
        return json.loads(line)

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def worker(model_uri: str) -> None:
    """The in-process path: load the model, then time each predict asked for on stdin."""
    import mlflow
    import pandas as pd
    import torch

    began = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    print(json.dumps({"load_s": time.perf_counter() - began}), flush=True)
    classifier = model.unwrap_python_model()  # scenesweep's ImageClassifier
    for line in sys.stdin:
        images = json.loads(line)["images"]
        began = time.perf_counter()
        predictions = model.predict(pd.DataFrame({"image": images}))
        seconds = time.perf_counter() - began
        # The network alone on the same images, decoded and preprocessed beforehand: what the
        # extractor computes per batch, the least a predict can take.
        pixels = torch.stack(classifier._pixels([base64.b64decode(b) for b in images]))  # (B, 3, S, S)
        began = time.perf_counter()
        classifier.network_features(pixels)
        network_s = time.perf_counter() - began
        print(json.dumps({"seconds": seconds, "network_s": network_s, "labels": list(predictions["label"])}),
              flush=True)


def model_megabytes(name: str) -> float:
    """Size of version 1's logged model folder (the store's artifacts are on local disk)."""
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    model_id = client.get_model_version(name, "1").source.rsplit("/", 1)[-1]
    folder = Path(urlparse(client.get_logged_model(model_id).artifact_location).path)
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6


def measure(size: int, data: Path, work: Path, single_calls: int, batch_calls: int, processes: int) -> dict:
    name = f"bench-{size}px"
    info, test_paths = train_and_register(data, work / "cache", size, name)
    model_uri = f"models:/{name}/1"
    encoded = [base64.b64encode(p.read_bytes()).decode("ascii") for p in test_paths]
    workers = [InProcess(model_uri) for _ in range(processes)]
    servers = []
    try:
        servers = [Server(model_uri, work / f"serve-{size}-{k}.log") for k in range(processes)]
        # Same answers both ways, before timing anything; then warm every process up.
        served_labels = [p["label"] for p in servers[0].predict(encoded[:BATCH])]
        assert served_labels == workers[0].predict(encoded[:BATCH])["labels"], served_labels
        for _ in range(WARMUP):
            for n in (1, BATCH):
                for process in (*servers, *workers):
                    process.predict(encoded[:n])

        def timed_post(server: Server):
            def call(images: list[str]) -> float:
                began = time.perf_counter()
                server.predict(images)
                return time.perf_counter() - began
            return call

        def timed_predict(worker_: InProcess):
            def call(images: list[str]) -> tuple[float, float]:
                answer = worker_.predict(images)
                return answer["seconds"], answer["network_s"]
            return call

        calls = {**{("served", k): timed_post(server) for k, server in enumerate(servers, 1)},
                 **{("in process", k): timed_predict(worker_) for k, worker_ in enumerate(workers, 1)}}
        seconds: dict[tuple, list[float]] = {(*key, n): [] for key in calls for n in (1, BATCH)}
        # Rounds of blocks: each round runs a block of calls of every kind, so a busy period of the
        # machine is shared by all; the first call of each block is left out (see BLOCK).
        rounds = max(math.ceil(single_calls / BLOCK[1]), math.ceil(batch_calls / BLOCK[BATCH]))
        for round_index in range(rounds):
            for n, wanted in ((1, single_calls), (BATCH, batch_calls)):
                for key, call in calls.items():
                    kept = seconds[(*key, n)]
                    if len(kept) >= wanted:
                        continue
                    for call_index in range(BLOCK[n] + 1):
                        start = ((round_index * BLOCK[n] + call_index) * n) % max(1, len(encoded) - n)
                        elapsed = call(encoded[start:start + n])
                        if isinstance(elapsed, tuple):  # in process: the predict, and the network alone
                            elapsed, network_s = elapsed
                            if call_index > 0 and len(kept) < wanted:
                                seconds.setdefault(("network alone", key[1], n), []).append(network_s)
                        if call_index > 0 and len(kept) < wanted:
                            kept.append(elapsed)
    finally:
        for process in (*servers, *workers):
            process.stop()
    return {"size": size, "info": info, "load_average": os.getloadavg(),
            "startup_s": [server.startup_s for server in servers], "load_s": [w.load_s for w in workers],
            "model_mb": model_megabytes(name),
            "timings": {key: Timings(value, key[2]) for key, value in seconds.items()}}


def best(timings: dict, path: str, n: int) -> Timings:
    """The process of ``path`` with the lowest median: the one least disturbed by the machine."""
    return min((t for (p, _, size), t in timings.items() if p == path and size == n), key=lambda t: t.median_ms)


def report(results: list[dict], args) -> None:
    print(f"# Serving benchmark: {machine_line('cpu')}, Python {platform.python_version()}; load average before "
          f"{args.load_average_before:.1f} (other processes share these cores)")
    print(f"Model: VGG16 random weights, relu7 (4096), svm head, digits subset ({IMAGES_PER_CLASS}/class, "
          f"8x8 PNG upscaled); {WARMUP} warm-up calls of each kind, then rounds of blocks of "
          f"{BLOCK[1]} (1 image) and {BLOCK[BATCH]} (16 images) timed calls per process, each after an untimed one.")
    print(f"Served: mlflow models serve --env-manager local, 1 uvicorn worker, POST dataframe_split, one "
          f"connection per request. In process: mlflow.pyfunc.load_model(...).predict(DataFrame) in a worker "
          f"process. {args.processes} processes of each, side by side: the same path has differed by up to "
          f"7x between two processes on this shared machine.\n")
    for result in results:
        info = result["info"]
        startup = ", ".join(f"{s:.1f}" for s in result["startup_s"])
        loads = ", ".join(f"{s:.1f}" for s in result["load_s"])
        print(f"## {result['size']} px  (features in {info['precision']}; val_acc {info['val_acc']:.3f}, "
              f"test_acc {info['test_acc']:.3f}; model {result['model_mb']:.0f} MB; servers up in {startup} s; "
              f"pyfunc load {loads} s; load average after {result['load_average'][0]:.1f})")
        t = result["timings"]
        print("| path | process | 1 image: median ms | 1 image: p95 ms | calls | 16 images: img/s | "
              "16 images: median ms | calls |")
        print("|---|---|---|---|---|---|---|---|")
        for path, k, n in sorted(t):
            if n != 1:
                continue
            one, batch = t[(path, k, 1)], t[(path, k, BATCH)]
            print(f"| {path} | {k} | {one.median_ms:.1f} | {one.p95_ms:.1f} | {len(one.seconds)} | "
                  f"{batch.images_per_s:.1f} | {batch.median_ms:.1f} | {len(batch.seconds)} |")
        one_served, one_local = best(t, "served", 1), best(t, "in process", 1)
        batch_served, batch_local = best(t, "served", BATCH), best(t, "in process", BATCH)
        one_network = best(t, "network alone", 1)
        print(f"served / in process (best process of each): {one_served.median_ms / one_local.median_ms:.2f}x "
              f"latency for 1 image ({one_served.median_ms - one_local.median_ms:+.1f} ms), "
              f"{batch_served.median_ms / batch_local.median_ms:.2f}x time for 16 images "
              f"({batch_served.images_per_s:.1f} vs {batch_local.images_per_s:.1f} img/s)")
        print(f"in process / network alone (1 image, the network on pixels decoded beforehand, same process): "
              f"{one_local.median_ms / one_network.median_ms:.2f}x ({one_local.median_ms:.1f} vs "
              f"{one_network.median_ms:.1f} ms)\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224], help="image sizes in pixels")
    parser.add_argument("--single", type=int, default=40, help="timed calls with one image, per process")
    parser.add_argument("--batches", type=int, default=8, help="timed calls with 16 images, per process")
    parser.add_argument("--processes", type=int, default=2, help="servers and in-process workers of each path")
    parser.add_argument("--keep", action="store_true", help="keep the temporary store and print where")
    parser.add_argument("--worker", metavar="MODEL_URI", help=argparse.SUPPRESS)  # the in-process path
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    args.load_average_before = os.getloadavg()[0]

    work = Path(tempfile.mkdtemp(prefix="scenesweep-serve-bench-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'store' / 'mlflow.db'}"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("SCENESWEEP_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        from scenesweep.tracking.mlflow_store import setup_tracking

        setup_tracking()
        data = digits_subset(work, IMAGES_PER_CLASS)
        results = [measure(size, data, work, args.single, args.batches, args.processes) for size in args.sizes]
        report(results, args)
    finally:
        if args.keep:
            print(f"store and logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
