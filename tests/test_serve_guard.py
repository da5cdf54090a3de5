"""`scenesweep serve`: MLflow's scoring app behind the guard, as a client we do not trust sees it.

One svm model (3 classes, pool5, 32 px) is tracked, registered and promoted for the module; one
real server (`python -m scenesweep serve`, 2 workers, on a free port of 127.0.0.1) serves its
@champion to every test here, and the last test stops it with SIGTERM.
"""
import base64
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from experiment_runs import small_scenes
from helpers import assert_one_error, wait_until_serving
from scenesweep.cli.main import main
from scenesweep.serving.guard import ECHO_RUN, inner_error, json_too_deep, mask_echoes
from scenesweep.services import servers
from warm_processes import WarmPopen

pytestmark = pytest.mark.slow
MODEL = "scene-classifier"
CHAMPION_URI = f"models:/{MODEL}@champion"
MARKER = "QZXV-echo-marker-77413"  # in every odd request; in no answer
assert len(MARKER) >= ECHO_RUN
MB = 2**20


def png(size=(8, 8)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (180, 40, 20)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGE = base64.b64encode(png()).decode()
VALID = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[IMAGE]]}}).encode()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def champion_store(tmp_path_factory):
    """A tracked svm run registered as scene-classifier version 1 and promoted to @champion."""
    from scenesweep.models.promotion import promote
    from scenesweep.runs.single import track_single_run

    folder = tmp_path_factory.mktemp("serve_guard")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'store' / 'mlflow.db'}", "SCENESWEEP_OFFLINE": "1",
           "TORCH_HOME": str(folder / "torch_home"), "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
        track_single_run("svm", {"data": str(small_scenes(folder / "scenes")), "cache_dir": str(folder / "cache"),
                                 "train_per_class": 10, "layer": "pool5", "image_size": 32, "C": 1.0},
                         progress=False, register=MODEL)
        assert promote(MODEL).promoted
        model = mlflow.pyfunc.load_model(CHAMPION_URI)  # in process, to compare with the server
    return SimpleNamespace(env=env, folder=folder, model=model)


@pytest.fixture(scope="module")
def server(champion_store):
    """`scenesweep serve @champion --workers 2` on a free port, in its own process group."""
    port = servers.free_port()
    log = champion_store.folder / "serve.log"
    env = {**os.environ, **champion_store.env}
    with open(log, "wb") as output:
        process = WarmPopen([sys.executable, "-m", "scenesweep", "serve", CHAMPION_URI, "--port", str(port),
                                    "--workers", "2"], stdout=output, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/ping", process, log)
        yield SimpleNamespace(port=port, process=process, log=log)
    finally:
        servers.stop(process)  # the group (workers too), when the last test has not stopped it


def request(port, method, path, body=None, headers=None, chunked=False, timeout=120):
    """(status, headers, body) of one request on a new connection."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        if chunked:
            chunks = (body[i:i + MB] for i in range(0, len(body), MB))
            connection.request(method, path, body=chunks, headers={**headers, "Transfer-Encoding": "chunked"},
                               encode_chunked=True)
        else:
            connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, str(reply.headers), reply.read()
    finally:
        connection.close()


def split(*rows, columns=("image",)) -> bytes:
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": [list(r) for r in rows]}}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


M = MARKER.encode()
# name: (method, path, headers, body, expected status, start of the message or None); the marker
# is in each request (body, header or path) where the request has room for it.
ODD = {
    "no Content-Type": ("POST", "/invocations", {}, VALID, 415, "missing Content-Type"),
    "text/plain": ("POST", "/invocations", {"Content-Type": "text/plain"}, VALID, 415, "unsupported"),
    "form (curl -d)": ("POST", "/invocations", {"Content-Type": "application/x-www-form-urlencoded"}, VALID, 415,
                       None),
    "charset latin-1": ("POST", "/invocations", {"Content-Type": "application/json; charset=latin-1"}, VALID, 415,
                        None),
    "marker parameter": ("POST", "/invocations", {"Content-Type": f"application/json; boundary={MARKER}"}, VALID,
                         415, None),
    "parquet": ("POST", "/invocations", {"Content-Type": "application/vnd.apache.parquet"}, M * 4, 415, None),
    "empty body": ("POST", "/invocations", JSON, b"", 400, "Invalid input"),
    "invalid JSON": ("POST", "/invocations", JSON, b'{"dataframe_split": ' + M, 400, "Invalid input"),
    "nested 100000 deep": ("POST", "/invocations", JSON, deep(100_000), 400, "JSON nested deeper than 64"),
    "nested 65 deep": ("POST", "/invocations", JSON, deep(65), 400, "JSON nested deeper than 64"),
    "100000 unclosed": ("POST", "/invocations", JSON, b"[" * 100_000, 400, "JSON nested deeper than 64"),
    "20 MB": ("POST", "/invocations", JSON, (M + b"x" * 1000) * (20 * MB // 1000), 413, "request body larger"),
    "20 MB chunked": ("POST", "/invocations", JSON, (M + b"y" * 1000) * (20 * MB // 1000), 413, None),
    "15 MB not JSON": ("POST", "/invocations", JSON, b'{"dataframe_split": ' + (M + b"z") * (15 * MB // 23), 400,
                       "Invalid input"),
    "15 MB not base64": ("POST", "/invocations", JSON, split([MARKER + "!" * (15 * MB)]), 400,
                         "row 0: column 'image' is not valid base64"),
    "invalid UTF-8": ("POST", "/invocations", JSON, b'{"dataframe_split": "\xff\xfe' + M + b'"}', 400,
                      "Invalid input. Ensure that input is a valid JSON"),
    "unknown key": ("POST", "/invocations", JSON, json.dumps({MARKER: [[IMAGE]]}).encode(), 400, "The input must"),
    "two keys": ("POST", "/invocations", JSON, json.dumps({"instances": [MARKER], "inputs": [MARKER]}).encode(), 400,
                 "The input must"),
    "a list": ("POST", "/invocations", JSON, json.dumps([MARKER]).encode(), 400, "Invalid input"),
    "a string": ("POST", "/invocations", JSON, json.dumps(MARKER).encode(), 400, "Invalid input"),
    "wrong column": ("POST", "/invocations", JSON, split([IMAGE], columns=(MARKER,)), 400, "Failed to enforce schema"),
    "not base64": ("POST", "/invocations", JSON, split([MARKER + "%%"]), 400, "row 0: column 'image' is not valid"),
    "not an image": ("POST", "/invocations", JSON, split([b64(M * 20)]), 400, "row 0: not an image"),
    "truncated PNG": ("POST", "/invocations", JSON, split([b64(png()[:40])]), 400, "row 0: not an image"),
    "huge number": ("POST", "/invocations", JSON, b'{"dataframe_split": {"columns": ["image"], "data": [['
                    + b"9" * 5000 + b"]]}}", 400, "the request body could not be read"),
    "NaN": ("POST", "/invocations", JSON, b'{"dataframe_split": {"columns": ["image"], "data": [[NaN]]}}', 400,
            "row 0: column 'image' must hold base64 text"),
    "1e999": ("POST", "/invocations", JSON, b'{"dataframe_split": {"columns": ["image"], "data": [[1e999]]}}', 400,
              "row 0: column 'image' must hold base64 text"),
    "rows wider than columns": ("POST", "/invocations", JSON, split([IMAGE, MARKER]), 400, "Invalid input"),
    "instances 3-D": ("POST", "/invocations", JSON, json.dumps({"instances": [[[MARKER]]]}).encode(), 400, None),
    "inputs ragged": ("POST", "/invocations", JSON, json.dumps({"inputs": {"image": [IMAGE, [MARKER]]}}).encode(), 400,
                      None),
    "records a string": ("POST", "/invocations", JSON, json.dumps({"dataframe_records": MARKER}).encode(), 400, None),
    "split without data": ("POST", "/invocations", JSON, json.dumps({"dataframe_split": {"columns": [MARKER]}}).encode(),
                           400, None),
    "no rows": ("POST", "/invocations", JSON, split(), 400, "empty input"),
    "513 images": ("POST", "/invocations", JSON, split(*[[IMAGE]] * 513), 400, "513 images in one request"),
    "CSV garbage": ("POST", "/invocations", {"Content-Type": "text/csv"}, b'image,"' + M + b'\n"a,b,c\n1', 400, None),
    "CSV wrong column": ("POST", "/invocations", {"Content-Type": "text/csv"}, M + b"\n" + IMAGE.encode(), 400, None),
    "GET /invocations": ("GET", "/invocations", {}, None, 405, None),
    "POST /ping": ("POST", "/ping", JSON, VALID, 405, None),
    "unknown route": ("GET", f"/{MARKER}", {}, None, 404, None),
    # Brackets inside strings are not nesting: MLflow ignores the params this model does not declare.
    "brackets in a string": ("POST", "/invocations", JSON, json.dumps({"dataframe_split": {"columns": ["image"],
                             "data": [[IMAGE]]}, "params": {"note": "[{" * 500}}).encode(), 200, None),
    "charset=UTF-8": ("POST", "/invocations", {"Content-Type": "application/json;charset=UTF-8"}, VALID, 200, None),
    "CSV": ("POST", "/invocations", {"Content-Type": "text/csv; charset=utf-8"}, b"image\n" + IMAGE.encode(), 200,
            None),
}


@pytest.mark.parametrize("name", ODD)
def test_each_odd_request_gets_its_status_and_no_echo(server, name):
    method, path, headers, body, expected, message = ODD[name]
    status, reply_headers, reply = request(server.port, method, path, body, headers, chunked="chunked" in name)
    assert status == expected, (name, status, reply[:500])
    assert MARKER.encode() not in reply and MARKER not in reply_headers, (name, reply[:500])
    answer = json.loads(reply)
    if expected >= 400:
        assert set(answer) == {"error_code", "message"}, answer
        assert len(reply) < 600 and "Traceback" not in answer["message"], answer
        if message:
            assert answer["message"].startswith(message), answer
    else:
        assert [set(p) >= {"label", "class_index"} for p in answer["predictions"]] == [True]


def test_the_answer_is_mlflow_models_serve_s_payload_of_the_in_process_predict(server, champion_store):
    """The same JSON as `mlflow models serve` answers: MLflow's own predictions_to_json of the
    pyfunc's predict in this process."""
    from mlflow.pyfunc.scoring_server import predictions_to_json

    expected = io.StringIO()
    predictions_to_json(champion_store.model.predict(pd.DataFrame({"image": [IMAGE]})), expected)
    status, _, reply = request(server.port, "POST", "/invocations", VALID, JSON)
    assert status == 200, reply
    answer, wanted = json.loads(reply), json.loads(expected.getvalue())
    assert list(answer) == ["predictions"] and len(answer["predictions"]) == 1
    assert answer["predictions"][0].keys() == wanted["predictions"][0].keys()
    for key, value in wanted["predictions"][0].items():
        assert answer["predictions"][0][key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value)
    for path, body in (("/ping", b"\n"), ("/health", b"\n"), ("/version", mlflow.__version__.encode())):
        assert request(server.port, "GET", path)[::2] == (200, body)


def valid_requests(port: int, count: int, failures: list) -> None:
    """``count`` valid requests on one keep-alive connection; any non-200 goes to ``failures``."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for _ in range(count):
            connection.request("POST", "/invocations", body=VALID, headers=JSON)
            reply = connection.getresponse()
            body = reply.read()
            if reply.status != 200 or b'"predictions"' not in body:
                failures.append((reply.status, body[:200]))
    except OSError as error:
        failures.append(repr(error))
    finally:
        connection.close()


def test_1000_sequential_then_4x200_concurrent_requests_all_succeed(server):
    failures = []
    start = time.perf_counter()
    valid_requests(server.port, 1000, failures)
    sequential_s = time.perf_counter() - start
    assert failures == []
    threads = [threading.Thread(target=valid_requests, args=(server.port, 200, failures)) for _ in range(4)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    concurrent_s = time.perf_counter() - start
    assert failures == []
    print(f"\n1000 sequential: {sequential_s:.2f} s ({1000 / sequential_s:.0f} req/s); "
          f"4 x 200 concurrent: {concurrent_s:.2f} s ({800 / concurrent_s:.0f} req/s)")


def test_sigterm_stops_the_server_and_its_workers(server):
    """Last in the module: SIGTERM to the command stops uvicorn's supervisor and both workers."""
    members = servers.group_members(server.process.pid)
    assert len(members) >= 3, (members, server.log.read_text()[-3000:])  # the command and its 2 workers
    server.process.send_signal(signal.SIGTERM)
    status = server.process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while servers.group_members(server.process.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log.read_text()
    assert (status, servers.group_members(server.process.pid)) == (0, []), log[-3000:]
    assert log.rstrip().endswith("stopped the model server") and "Traceback" not in log, log[-3000:]


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_bad_command_lines_are_one_error_line():
    assert_one_error(invoke("serve", "models:/nobody@champion", "--port", str(servers.free_port())),
                     "MODEL_URI models:/nobody@champion: cannot load it (Registered Model with name=nobody not "
                     "found); promote a version first: scenesweep promote")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert_one_error(invoke("serve", "--port", str(port)),
                         f"port {port} on 127.0.0.1 is already in use (another model server?): "
                         "stop it or pick another with --port")
    result = invoke("serve", "--host", "no-such-host.invalid")
    assert result.exit_code == 2 and "error: --host no-such-host.invalid: not a known address" in result.stderr


def test_json_depth_is_counted_outside_strings():
    assert not json_too_deep(deep(64), 64) and json_too_deep(deep(65), 64)
    assert not json_too_deep(b'{"a": [' * 32 + b"1" + b"]}" * 32, 64)
    assert json_too_deep(b'{"a": [' * 33 + b"1" + b"]}" * 33, 64)
    assert not json_too_deep(b'["' + b"[" * 1000 + b'"]', 64)  # inside a string
    assert not json_too_deep(b'["\\"' + b"[" * 1000 + b'"]', 64)  # after an escaped quote
    assert json_too_deep(b"[" * 65, 64) and not json_too_deep(b'{"a": [1, 2}', 64)  # unclosed; merely bad


def test_a_message_keeps_no_run_of_the_request():
    body = b'{"x": "' + M + b'"}'
    masked = mask_echoes(f"bad value '{MARKER}' in column 'image'", body, ("image",))
    assert MARKER not in masked and masked.startswith("bad value") and masked.endswith("column 'image'")
    assert mask_echoes("nothing from the request here", body) == "nothing from the request here"


def test_inner_errors_are_rewritten_whatever_their_form():
    """MLflow's 504 (plain text under a JSON media type), FastAPI's 404, and MLflow's JSON cut
    off where the guard stops reading it (its 400s can hold the whole request)."""
    timeout = inner_error(504, b"Request processing time exceeded limit", b"{}", ())
    assert (timeout.status, timeout.error_code, timeout.message) == (504, "DEADLINE_EXCEEDED",
                                                                     "Request processing time exceeded limit")
    assert inner_error(404, b'{"detail":"Not Found"}', b"", ()).error_code == "ENDPOINT_NOT_FOUND"
    body = b"[" + M * 10_000
    cut = json.dumps({"error_code": "BAD_REQUEST", "message": f"Invalid input. {MARKER}\nInput: \n{body}"})[:4000]
    refusal = inner_error(400, cut.encode(), body, ())
    assert (refusal.status, refusal.error_code) == (400, "BAD_REQUEST") and refusal.message == "Invalid input. …"
