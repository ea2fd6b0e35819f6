"""Property-based tests (Hypothesis): random params.yaml mutations and random files for predict.

Each mutated params.yaml is either accepted by every stage that reads the
sections it changed, or refused with one line naming the problem — never a
traceback. Accepted mutations of the training options also run, on tiny data.
predict, fed random bytes and random arrays, answers or gives one line per
file, and never raises.
"""

import io
import json
import random

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from tools import predict
from mnist_cnn.params import BaseParams, load_params
from mnist_cnn.errors import UserError
from tests.conftest import ROOT, run_train
from tests.conftest import SCHEMAS
from mnist_cnn.params import (ONE_HOT_LOSSES, SPARSE_LOSSES, EvaluateParams, FetchParams, ModelParams, PreprocessParams,
                              TrainParams, check_train)

pytestmark = pytest.mark.e2e  # Hypothesis draws many params files and inputs, each run through the stages

SECTIONS = {"base": BaseParams, "fetch": FetchParams, "preprocess": PreprocessParams,
            "model": ModelParams, "train": TrainParams, "evaluate": EvaluateParams}
# What each stage reads (dvc.yaml's params, as test_pipeline checks them), with each section's schema.
READERS = {stage: {name: SECTIONS[name] for name in sections} for stage, sections in SCHEMAS.items()}


def leaves(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaves(value, (*prefix, key))
    yield prefix


PATHS = [p for p in leaves(yaml.safe_load((ROOT / "params.yaml").read_text())) if p]

values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.lists(st.sampled_from(["cpu", "gpu", "tpu", 1, None]), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


@st.composite
def mutated_params(draw):
    """The committed params.yaml with one to three random mutations, as the text a user would save."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        *parents, last = path
        node = params
        for key in parents:
            if not isinstance(node, dict) or key not in node:
                break
            node = node[key]
        else:
            if not isinstance(node, dict):
                continue
            action = draw(st.sampled_from(["set", "set", "set", "delete", "add"]))
            if action == "set":
                node[last] = draw(values)
            elif action == "delete":
                node.pop(last, None)
            else:
                node[draw(st.text(min_size=1, max_size=8))] = draw(values)
    text = yaml.safe_dump(params, sort_keys=False, allow_unicode=True).encode()
    damage = draw(st.sampled_from(["none", "none", "none", "bytes", "duplicate", "cut"]))
    if damage == "bytes":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    elif damage == "duplicate":
        lines = text.splitlines(keepends=True)
        at = draw(st.integers(0, len(lines) - 1))
        text = b"".join(lines[:at + 1] + [lines[at]] + lines[at + 1:])
    elif damage == "cut":
        text = text[:draw(st.integers(0, len(text)))]
    return text


def load_as(stage, path):
    """What `python -m stages.<stage>` does with params.yaml before any work: load, check the sections."""
    loaded = load_params(path, **READERS[stage])
    if "train" in loaded and "base" in loaded:
        check_train(loaded["train"], loaded["base"].backend)
    return loaded


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=mutated_params())
def test_every_stage_accepts_or_refuses_a_mutated_params_yaml_in_one_line(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_bytes(text)
    for stage in READERS:
        try:
            load_as(stage, path)
        except UserError as err:
            message = str(err)
            assert "\n" not in message and message.startswith((str(path), "params.yaml")), message


# Options whose accepted values all run in seconds on tiny data: these mutations also train.
TRAINABLE = {
    "train.optimizer": st.sampled_from(["rmsprop", "sgd", "adam", "adagrad"]),
    "train.learning_rate": st.floats(min_value=1e-6, max_value=1e6) | st.sampled_from([0.0, -1.0]),
    "train.lr_schedule": st.sampled_from(["constant", "exponential", "step", "cosine", "linear"]),
    "train.lr_decay_rate": st.floats(min_value=-0.5, max_value=1.5),
    "train.lr_decay_epochs": st.floats(min_value=0.0, max_value=1e5),
    "train.momentum": st.floats(min_value=0.0, max_value=1.0),
    "train.nesterov": st.booleans(),
    "train.loss": st.sampled_from(list(SPARSE_LOSSES + ONE_HOT_LOSSES)),
    "train.validation_split": st.floats(min_value=0.0, max_value=1.0),
    "train.batch_size": st.integers(min_value=-1, max_value=2000),
    "train.shuffle": st.booleans(),
}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.sets(st.sampled_from(sorted(TRAINABLE)), min_size=1, max_size=4).flatmap(
    lambda keys: st.fixed_dictionaries({k: TRAINABLE[k] for k in keys})))
def test_accepted_training_options_train_and_refused_ones_are_one_line(prepared, tmp_path_factory, changes):
    tmp = tmp_path_factory.mktemp("fuzz_train")
    try:
        _, details = run_train(prepared, tmp, **changes)
    except UserError as err:
        assert "\n" not in str(err)
        assert not (tmp / "cpu").exists() and not (tmp / "d.json").exists()  # refused: nothing written
    else:
        assert np.isfinite(details["final_loss"]) and (tmp / "cpu" / "classifier.keras").is_file()


# --- predict -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(prepared):
    return run_train(prepared, prepared / "fuzz_model")[0]


def png_bytes(seed):
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 30), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@st.composite
def hostile_file(draw):
    """(name, bytes): a damaged PNG, random bytes, or an .npz of a random array."""
    kind = draw(st.sampled_from(["png", "bytes", "npz"]))
    if kind == "png":
        data = bytearray(png_bytes(draw(st.integers(0, 2**16))))
        if draw(st.booleans()):  # half of them damaged: bytes changed, the end cut off
            for _ in range(draw(st.integers(0, 4))):
                data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
            data = data[:draw(st.integers(1, len(data)))]
        return "image.png", bytes(data)
    if kind == "bytes":
        return draw(st.sampled_from(["x.png", "x.jpg", "x.npz"])), draw(st.binary(max_size=300))
    dtype = draw(st.sampled_from(["uint8", "int64", "float32", "float64", "bool", "complex64", "U3"]))
    shape = draw(st.sampled_from([(28, 28), (0, 28, 28), (2, 28, 28), (3, 28), (1, 1, 28, 28), ()]))
    rng = random.Random(draw(st.integers(0, 2**16)))
    special, rate = [0, 255, -1, 256, float("nan"), float("inf"), 1e300], draw(st.sampled_from([0.0, 0.0, 0.002]))
    flat = [rng.choice(special) if rng.random() < rate else rng.uniform(0, 255) for _ in range(int(np.prod(shape)))]
    try:
        with np.errstate(invalid="ignore", over="ignore"):  # NaN and 1e300 cast to integers: any value will do
            arr = np.array(flat, dtype=np.float64).reshape(shape).astype(dtype)
    except (ValueError, OverflowError):
        arr = np.zeros(shape, dtype)
    buffer = io.BytesIO()
    np.savez(buffer, x=arr)
    return "arrays.npz", buffer.getvalue()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(hostile_file(), min_size=1, max_size=3))
def test_predict_answers_or_gives_one_line_per_file_and_never_raises(model, tmp_path_factory, capsys, files):
    folder = tmp_path_factory.mktemp("fuzz_predict")
    paths = []
    for i, (name, data) in enumerate(files):
        paths.append(folder / f"{i}_{name}")
        paths[-1].write_bytes(data)
    code = 0
    try:
        predict.main([*map(str, paths), "--model", str(model), "--json"])
    except SystemExit as exit_:
        code = exit_.code
    results = json.loads(capsys.readouterr().out)
    assert code in (0, 1)
    assert {r["file"].split(":")[0] for r in results} == set(map(str, paths))  # every file got its line(s)
    for r in results:
        assert ("error" in r) != ("digit" in r)
        if "error" in r:
            assert "\n" not in r["error"]
        else:
            assert 0 <= r["digit"] <= 9 and abs(sum(r["probabilities"]) - 1) < 1e-4
    assert (code == 1) == any("error" in r for r in results)
    event("answered" if any("digit" in r for r in results) else "refused")



# --- params.yaml's structure: aliases, depth, size ---

def yaml_structure():
    """YAML text built from anchors, aliases, flow and block nesting, long scalars and odd bytes."""
    atom = st.one_of(st.integers().map(str), st.floats(allow_nan=True).map(repr), st.text(max_size=20).map(json.dumps),
                     st.sampled_from(["*a", "*b", "&a 1", "&b [1, 2]", "~", "!!binary AAAA", "{", "]", "\x1b[2J",
                                      "x" * 3_000]))
    return st.recursive(atom, lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["a", "b", "train", "epochs", "\x00", "&k key"]), inner),
                 max_size=4).map(lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"),
        st.integers(1, 40).map(lambda n: "[" * n + "]" * n)), max_leaves=30)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=yaml_structure(), where=st.sampled_from(["train", "model", "extra"]))
def test_params_of_any_structure_are_read_or_refused_in_one_line_in_bounded_time(tmp_path, body, where):
    import time

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = yaml.safe_dump(params, sort_keys=False) + f"{where}_extra: {body}\n"
    path = tmp_path / "params.yaml"
    path.write_text(text)
    start = time.perf_counter()
    try:
        load_params(path, **SECTIONS)
    except UserError as err:
        message = str(err)
        assert "\n" not in message and len(message) < 600 and "\x1b" not in message and "\x00" not in message
        event("refused: " + message.split(":", 2)[-1].split(";")[0].strip()[:40])
    assert time.perf_counter() - start < 5.0


# --- the drawing page's HTTP surface ---

@pytest.fixture(scope="module")
def page_server(model, tmp_path_factory):
    """The page on a free port, with tight timeouts so that slow clients show within the test's time."""
    from tests.test_serve import start_server, stop_server

    tmp = tmp_path_factory.mktemp("page")
    proc, url, folder = start_server((model,), tmp, BODY_TIMEOUT_S=2, HEADER_TIMEOUT_S=2)
    yield url, folder
    stop_server(proc)  # still up, and its stderr one line per failure: what the fuzzing did not break


def http_request():
    method = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH", "TRACE", "CONNECT",
                              "BREW", "G\x00T", ""])
    path = st.sampled_from(["/", "/predict", "/predict?x=1", "/../../etc/passwd", "/%2e%2e/", "//predict", "*",
                            "/" + "a" * 10_000, "/\x1b[2J"])
    header = st.tuples(st.sampled_from(["Origin", "Host", "Sec-Fetch-Site", "Content-Type", "Content-Length",
                                        "Transfer-Encoding", "Expect", "X-" + "a" * 100, "Bad Header"]),
                       st.sampled_from(["null", "http://evil.example", "chunked", "100-continue", "-1", "0",
                                        "99999999999999999999", "image/png", "cross-site", "\x1b", "a" * 9000]))
    body = st.one_of(st.binary(max_size=2000), st.sampled_from([b"", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x89PNG\r\n"]))
    return st.tuples(method, path, st.lists(header, max_size=5), body, st.sampled_from(["complete", "stall", "cut"]))


@pytest.mark.long  # once, on 3.11 (CI)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=http_request())
def test_the_page_answers_any_request_in_bounded_time_and_stays_up(page_server, request):
    import socket
    import time
    import urllib.request

    url, folder = page_server
    method, path, headers, body, ending = request
    host, port = url.split("//")[1].rstrip("/").split(":")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", *[f"{k}: {v}" for k, v in headers]]
    if not any(k == "Content-Length" for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body
    start = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(raw[:len(raw) // 2] if ending == "cut" else raw)
        if ending == "stall":
            sock.sendall(b"")  # and nothing more: the server's timeouts end it
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                if ending == "complete" and b"\r\n\r\n" in reply:
                    break
        except (ConnectionResetError, TimeoutError):
            pass
    assert time.perf_counter() - start < 8.0  # the 2 s timeouts, and an answer's own time
    if reply:
        status = reply.split(b" ", 2)[1]
        assert status.isdigit() and (not status.startswith(b"5") or status == b"503"), reply[:300]  # never a 500
        event(f"status {status.decode()}")
    with urllib.request.urlopen(url, timeout=10) as page:  # and the page is still served to everyone else
        assert page.status == 200
    assert list(folder.iterdir()) == []  # nothing written, whatever came in
