"""Hard to abuse: every input's cost bounded before it is paid, all or nothing across a stage's outputs, a full
disk one line, honest answers for pictures that cannot hold a digit, no control character sent to a terminal.

The page's HTTP surface is tested against a real server in tests/test_serve.py; fuzzing in tests/test_fuzz.py.
"""

import errno
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.conftest import ROOT, SAMPLE, tiny_params, write_params
from mnist_cnn.errors import UserError, printable, shown
from mnist_cnn.files import TMP_PREFIX, atomic_path, staging_dir
from mnist_cnn.params import (MAX_DEPTH, MAX_PARAMS_BYTES, BaseParams, EvaluateParams, FetchParams, ModelParams,
                              TrainParams, check_batch_memory, load_params, read_yaml)

ALL = {"base": BaseParams, "fetch": FetchParams, "model": ModelParams, "train": TrainParams,
       "evaluate": EvaluateParams}


def params_file(tmp_path, text):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def refused(path, **schemas):
    with pytest.raises(UserError) as err:
        load_params(path, **(schemas or ALL))
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


# --- params.yaml: the cost of reading it is bounded before it is paid ---


def test_a_billion_laughs_is_refused_at_its_first_alias_in_no_time(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [{','.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)]
    path = params_file(tmp_path, "train:\n  epochs: *i\n" + "\n".join(lines) + "\n")
    start = time.perf_counter()
    message = refused(path)
    assert time.perf_counter() - start < 1.0
    assert "line 2: a YAML alias (*i); write the value out" in message


def test_deep_nesting_is_refused_before_the_parser_pays_for_it(tmp_path):
    path = params_file(tmp_path, "train: " + "[" * 100_000 + "]" * 100_000 + "\n")  # 6 minutes to parse
    start = time.perf_counter()
    assert f"nested over {MAX_DEPTH} levels deep" in refused(path)
    assert time.perf_counter() - start < 5.0
    deepest = MAX_DEPTH - 1  # under the mapping of sections
    params_file(tmp_path, "train: " + "[" * deepest + "]" * deepest + "\n")
    assert read_yaml(tmp_path / "params.yaml")["train"] is not None  # at the limit: read (then the schema speaks)


def test_an_anchor_given_twice_is_read_without_a_warning(tmp_path, recwarn):
    params = yaml.safe_dump(tiny_params(), sort_keys=False)
    params = params.replace("epochs: 1", "epochs: &k 1\n  steps_per_execution: &k 1", 1)
    params = params.replace("  steps_per_execution: 16\n", "", 1)
    assert load_params(params_file(tmp_path, params), train=TrainParams)["train"].epochs == 1
    assert not [w for w in recwarn if "anchor" in str(w.message)]


def test_a_file_over_the_size_limit_is_refused_from_its_size(tmp_path):
    path = params_file(tmp_path, "# " + "x" * MAX_PARAMS_BYTES + "\n")
    assert f"over the limit of {MAX_PARAMS_BYTES:,}" in refused(path)


def test_a_message_quotes_a_value_of_any_size_in_one_short_line(tmp_path):
    params = tiny_params()
    params["train"]["epochs"] = list(range(20_000))
    message = refused(write_params(tmp_path / "params.yaml", params))
    assert message.startswith(f"{tmp_path / 'params.yaml'}: train.epochs = [0, 1, 2") and " ...:" in message


def test_control_characters_from_a_key_or_a_value_are_escaped_in_the_message(tmp_path):
    params = tiny_params()
    params["train"]["\x1b[2Jevil"] = 1
    message = refused(write_params(tmp_path / "params.yaml", params))
    assert "\x1b" not in message and "\\x1b[2Jevil" in message
    assert printable("a\x1b[31m\x00b\x07") == "a\\x1b[31m\\x00b\\x07"
    assert str(UserError("line one\nline\rtwo\x1b")) == "line one line two\\x1b"
    assert shown("x" * 1000).endswith(" ...") and len(shown("x" * 1000)) == 80


@pytest.mark.parametrize("dotted, value, words", [
    ("evaluate.batch_size", 10**29, "evaluate.batch_size = 100000000000000000000000000000: Input should be less"),
    ("fetch.timeout_s", -1.0, "fetch.timeout_s = -1.0: Input should be greater than 0"),
    ("fetch.timeout_s", 1e300, "fetch.timeout_s = 1e+300: Input should be less than or equal to 3600"),
    ("train.learning_rate", 1e39, "train.learning_rate = 1e+39: Input should be less than or equal to 34028234"),
    ("model.l2.conv", 1e300, "model.l2.conv = 1e+300: Input should be less than or equal to 10"),
    ("train.gpu.memory_limit_mb", 10**20, "train.gpu.memory_limit_mb = 100000000000000000000: Input should be"),
])
def test_every_number_is_bounded_where_it_is_read(tmp_path, dotted, value, words):
    params = tiny_params(**{dotted: value})
    assert words in refused(write_params(tmp_path / "params.yaml", params))


def with_model(tmp_path, conv=None, dense=None, **limits):
    params = tiny_params()
    if conv is not None:
        params["model"]["conv_blocks"] = conv
    if dense is not None:
        params["model"]["dense_layers"] = dense
    params["model"]["limits"].update(limits)
    return write_params(tmp_path / "params.yaml", params)


def conv(filters, pool=2):
    return {"filters": filters, "kernel_size": 3, "activation": "relu", "pool_size": pool}


@pytest.mark.parametrize("conv_blocks, dense_layers, words", [
    # the cases: 4096 filters into 65,536 dense units; two 4096-filter layers; 3,000 dense layers
    ({"c1": conv(4096)}, {"d1": {"units": 65536, "activation": "relu"}},
     "this model has 45,366,353,930 weights, over model.limits.weights = 10,000,000; use fewer filters"),
    ({"c1": conv(4096, pool=None), "c2": conv(4096, pool=None)}, {},
     "this model has 174,632,970 weights, over model.limits.weights = 10,000,000"),
    ({"c1": conv(512, pool=None), "c2": conv(1024)}, {},  # within the weights, not the arithmetic
     "this model costs 5,445 MFLOP per image, over model.limits.mflops_per_image = 2,000 (the seed's: 5.6)"),
    ({"c1": conv(4)}, {f"d{i}": {"units": 1, "activation": "relu"} for i in range(3000)},
     "model has 3,001 layers (conv_blocks and dense_layers), over model.limits.layers = 32"),
])
def test_a_model_over_its_limits_is_refused_before_anything_is_built(tmp_path, conv_blocks, dense_layers, words):
    path = with_model(tmp_path, conv_blocks, dense_layers)
    start = time.perf_counter()
    assert words in refused(path, model=ModelParams)
    assert time.perf_counter() - start < 5.0


def test_a_limit_raised_in_params_lets_the_model_through(tmp_path):
    path = with_model(tmp_path, {"c1": conv(4096, pool=None), "c2": conv(4096, pool=None)}, {},
                      mflops_per_image=200_000, weights=10**9)
    assert len(load_params(path, model=ModelParams)["model"].conv_blocks) == 2


def test_a_batch_over_its_memory_limit_is_refused_with_its_figure():
    with pytest.raises(UserError, match=r"a batch of 60,000 needs about 18,056 MB for this model's layer values, "
                                        r"over train.max_batch_mb = 4,096; lower train.batch_size"):
        check_batch_memory(37_616, 60_000, 4096, ("train.batch_size", "train.max_batch_mb"), training=True)
    check_batch_memory(37_616, 64, 4096, ("train.batch_size", "train.max_batch_mb"), training=True)


def test_the_project_params_are_within_every_limit():
    params = load_params(ROOT / "params.yaml", **ALL)
    assert params["model"].limits.weights >= 10 * 96_844


# --- all or nothing, a full disk one line ---


def test_temporaries_are_staged_outside_the_output_folders_and_swept(tmp_path):
    (tmp_path / ".dvc").mkdir()
    out = tmp_path / "dvclive" / "train_cpu"
    staging = staging_dir(out.parent)
    assert staging == tmp_path / ".dvc" / "tmp" / "staging"
    leftover = staging / f"{TMP_PREFIX}999999999-x.metrics.json"  # a SIGKILLed run's (no such pid)
    leftover.mkdir(parents=True)
    with atomic_path(out / "metrics.json") as tmp:
        assert staging in tmp.parents  # never inside dvclive/, where a run-cache restore would keep it
        tmp.write_text("{}")
    assert not leftover.exists() and (out / "metrics.json").read_text() == "{}"
    assert [p.name for p in out.parent.iterdir()] == ["train_cpu"]
    assert staging_dir(tmp_path / "elsewhere") == tmp_path / ".dvc" / "tmp" / "staging"
    outside = tmp_path.parent / f"{tmp_path.name}-no-project"
    outside.mkdir()
    assert staging_dir(outside) == outside.resolve()


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   OSError("Unable to synchronously create file (errno = 28, error message = "
                                           "'No space left on device')"),  # h5py's way
                                   OSError(errno.EFBIG, "File too large")])
def test_a_full_disk_while_writing_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, error):
    final = tmp_path / "out" / "x_train.npy"
    with pytest.raises(UserError) as err:
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"\0" * 2_500_000)
            raise error
    message = str(err.value)
    reason = "over the file-size limit" if "large" in str(error) else "no space left on its disk"
    assert message.startswith(f"cannot write {final}: {reason} after 2.5 MB of it (")
    assert message.endswith("nothing of this run was kept")
    assert list((tmp_path / "out").iterdir()) == []


def stage(tmp_path, name, *args, limit_bytes=None):
    env = {k: v for k, v in os.environ.items() if k != "MNIST_NPZ"} | {"KERAS_HOME": str(tmp_path / "keras")}

    def limited():
        if limit_bytes:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=tmp_path, env=env, text=True,
                          capture_output=True, preexec_fn=limited, timeout=300)


@pytest.fixture
def fetched(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "stages").symlink_to(ROOT / "stages")
    (tmp_path / "mnist_cnn").symlink_to(ROOT / "mnist_cnn")
    write_params(tmp_path / "params.yaml", tiny_params())
    done = stage(tmp_path, "fetch", "--out", "raw", "--metrics", "m.json", "--details", "d.json")
    assert done.returncode == 0, done.stderr
    return tmp_path


def test_a_file_size_limit_mid_stage_is_one_line_and_no_output(fetched):
    result = stage(fetched, "preprocess", "--raw", "raw", "--out", "processed", limit_bytes=1_000_000)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot write processed: over the file-size limit after 1.0 MB of it (the "
                           "limit is 1.0 MB a file (ulimit -f)); it needs more than that"), result.stderr
    assert not (fetched / "processed").exists()
    assert not any((fetched / ".dvc" / "tmp" / "staging").iterdir())


def test_a_stage_that_fails_after_writing_one_output_leaves_none_of_this_run(fetched):
    (fetched / "notafolder").write_text("")  # --details' folder is a file: details.json cannot be written
    shutil.rmtree(fetched / "raw")
    result = stage(fetched, "fetch", "--out", "raw", "--metrics", "m2.json", "--details", "notafolder/d.json")
    assert result.returncode == 1
    assert not (fetched / "raw").exists() and not (fetched / "m2.json").exists()  # raw/ was written, then removed


# --- pictures that cannot hold a digit, unreadable files ---


def png(size, value=255):
    buf = io.BytesIO()
    Image.new("L", size, value).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size, words", [((1, 2), "1x2 pixels is too small to hold a digit"),
                                         ((10000, 10), "10000x10 pixels is too thin to hold a digit")])
def test_a_picture_too_small_or_too_thin_is_said_to_hold_no_digit(trained, tmp_path, capsys, size, words):
    from tools import predict
    path = tmp_path / "odd.png"
    path.write_bytes(png(size))
    with pytest.raises(SystemExit) as ended:
        predict.main([str(path), "--model", str(trained[0])])
    assert ended.value.code == 1
    assert capsys.readouterr().err.strip() == f"error: {path}: {words}" + (
        " (at least 8 pixels a side)" if "small" in words else " (at most 8 to 1); crop the picture around the digit")


def test_postscript_is_never_opened_so_ghostscript_never_runs(trained, tmp_path, capsys, monkeypatch):
    import subprocess as sp
    from tools import predict

    def no_programs(*args, **kwargs):
        raise AssertionError(f"a program was run: {args}")
    monkeypatch.setattr(sp, "Popen", no_programs)
    monkeypatch.setattr(sp, "check_call", no_programs)
    path = tmp_path / "digit.eps"
    path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\n"
                     b"showpage\n")
    with pytest.raises(SystemExit):
        predict.main([str(path), "--model", str(trained[0])])
    assert capsys.readouterr().err.strip() == (f"error: {path}: not a picture this tool reads "
                                               f"(UnidentifiedImageError); give a PNG, JPEG, WEBP, GIF, BMP or TIFF "
                                               f"picture of a digit")


def test_an_unreadable_file_is_said_to_be_unreadable(trained, tmp_path, capsys, monkeypatch):
    from tools import predict
    path = tmp_path / "locked.png"
    path.write_bytes(png((28, 28), 0))

    def denied(file, *args, **kwargs):  # what open() does without the read permission (root has it anyway)
        raise PermissionError(errno.EACCES, "Permission denied", str(file))
    monkeypatch.setattr(predict, "open", denied, raising=False)
    with pytest.raises(SystemExit):
        predict.main([str(path), "--model", str(trained[0])])
    assert capsys.readouterr().err.strip() == f"error: {path}: permission denied; make it readable (chmod u+r)"


# --- predict: memory flat in the number of images ---


def test_predict_reads_prepares_and_classifies_a_bounded_batch_at_a_time(trained, tmp_path, capsys, monkeypatch):
    from tools import predict
    from mnist_cnn.inference import TrainedClassifier

    with np.load(SAMPLE) as npz:
        digits = npz["x_test"][:7]
    path = tmp_path / "many.npz"
    np.savez_compressed(path, x=np.tile(digits, (150, 1, 1))[:1_000])  # 1,000 images
    monkeypatch.setattr(predict, "BATCH", 400)
    chunks, batches = [], []
    real_chunks, real_predict = predict.npz_chunks, TrainedClassifier.predict

    def counted_chunks(*args, **kwargs):
        for chunk in real_chunks(*args, **kwargs):
            chunks.append(len(chunk))
            yield chunk

    def counted_predict(self, pixels):
        batches.append(len(pixels))
        return real_predict(self, pixels)
    monkeypatch.setattr(predict, "npz_chunks", counted_chunks)
    monkeypatch.setattr(TrainedClassifier, "predict", counted_predict)
    predict.main([str(path), "--model", str(trained[0]), "--json"])
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 1_000 and max(chunks) == 400 and batches == [400, 400, 200]
    assert [a["digit"] for a in answers[:7]] == [a["digit"] for a in answers[7:14]]  # the same digits again



@pytest.mark.parametrize("n, batch, replicas, refused", [
    (1000, 128, 64, "the last training batch holds 104 of 1,000 images (train.batch_size = 128), 2 a replica, which "
                    "leaves 12 replicas none"),   # the replicas: 64 (a traceback after 81 s)
    (1000, 160, 16, "the last training batch holds 40 of 1,000 images (train.batch_size = 160), 3 a replica, which "
                    "leaves 2 replicas none"),    # 40 images for 16 replicas, yet 2 get none: seen to fail
    (1000, 128, 8, None), (1000, 144, 16, None),  # seen to train (tf.distribute on 2 cores)
    (1000, 125, 64, None), (1000, 128, 1, None)])
def test_replicas_a_short_last_batch_would_leave_empty_are_refused_before_training(n, batch, replicas, refused):
    from types import SimpleNamespace
    from mnist_cnn.training import check_replicas

    train = SimpleNamespace(replicas=replicas, batch_size=batch, validation_split=0.0)
    if refused is None:
        check_replicas(n, train)
        return
    with pytest.raises(UserError, match=re.escape(refused)):
        check_replicas(n, train)


# --- the page's own bounds, where a real test would need the machine's limits (tests/test_serve.py has the rest) ---


def test_a_flood_of_the_servers_own_errors_is_one_line_a_second_for_each_kind(monkeypatch, capsys):
    from tools import serve

    clock = iter([0.0, 0.1, 0.5, 0.9, 1.2, 1.3, 2.5])
    monkeypatch.setattr(serve.time, "monotonic", lambda: next(clock))
    say = serve.Limited()
    for _ in range(6):  # accept() at the file-descriptor limit, as asyncio reports it
        say("OSError", OSError(24, "Too many open files"))
    say("LineTooLong", "Got more than 8190 bytes\nwhen reading")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" ", 2)[2] for line in lines] == ["server: OSError: [Errno 24] Too many open files"] * 2 + [
        "server: LineTooLong: Got more than 8190 bytes when reading"]


@pytest.mark.parametrize("soft, hard, raised_to, cap", [
    (1024, 1048576, 1088, 1024),   # a usual shell's limit: raised to what the cap needs
    (256, 256, None, 192),         # a hard limit of 256: the cap is lowered under it instead
    (resource.RLIM_INFINITY, resource.RLIM_INFINITY, None, 1024)])
def test_the_connection_cap_fits_the_file_descriptor_limit(monkeypatch, soft, hard, raised_to, cap):
    from tools import serve

    raised = []
    monkeypatch.setattr(serve.resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(serve.resource, "setrlimit", lambda which, limits: raised.append(limits[0]))
    assert serve.connection_cap() == cap
    assert raised == ([raised_to] if raised_to else [])


SWALLOWED = """
import os, signal, sys
from mnist_cnn.stage import run

def main():
    try:
        os.kill(os.getpid(), signal.SIG{name})
        sum(range(10**6))  # the handler runs here, inside the library's try
    except BaseException:  # as TensorFlow's graph tracing does with whatever it catches
        raise TypeError("Failed to convert elements of (None, 784) to Tensor")

run(main)
"""


PRINTED = """
import os, signal, sys, traceback
from mnist_cnn.stage import run

def main():
    print("before the signal: this line passes", file=sys.stderr, flush=True)
    try:
        os.kill(os.getpid(), signal.SIG{name})
        sum(range(10**6))  # the handler has run by here, raising inside the library's try
    except BaseException:  # as TensorFlow's C++ does when Python it called fails: it prints, then fails its own way
        traceback.print_exc()
        sys.stderr.flush()
        os.write(2, b"a half-written line from C")
        raise SystemError("<built-in function __import__> returned a result with an exception set")

run(main)
"""


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_what_a_library_prints_as_a_signal_cuts_it_off_is_dropped(name):
    """Seen on Python 3.13: SIGTERM inside an __import__ that TensorFlow's nest called from C++ printed a
    SystemError's traceback above the stage's line."""
    result = subprocess.run([sys.executable, "-c", PRINTED.replace("{name}", name)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    signum = getattr(signal, f"SIG{name}")
    assert result.returncode == 128 + signum, result.stderr
    assert result.stderr.splitlines() == [
        "before the signal: this line passes",
        f"error: interrupted by SIG{name}; nothing half-written was left (run it again to finish)"], result.stderr


ABORTED = """
import os, signal
from mnist_cnn.stage import run

def main():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        sum(range(10**6))
    except BaseException:  # the interrupted code dies its own way before run() can handle the signal
        os.write(2, b"F0000 00:00:1.5    42 check.cc:9] Check failed: the last words\\n")
        os.abort()

run(main)
"""


def test_a_stage_that_dies_after_a_signal_keeps_its_last_words():
    """What is printed after a signal is held back, not lost: dropped once run() handles the interruption,
    passed on when the process dies before it can."""
    result = subprocess.run([sys.executable, "-c", ABORTED], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGABRT
    assert "Check failed: the last words" in result.stderr, result.stderr


@pytest.mark.parametrize("name", ["INT", "TERM"])
def test_a_signal_a_library_turns_into_its_own_error_is_still_the_signal(name):
    """Seen on Python 3.12: SIGINT while Keras traced its graph came out as a TypeError and a traceback."""
    result = subprocess.run([sys.executable, "-c", SWALLOWED.replace("{name}", name)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    signum = getattr(signal, f"SIG{name}")
    assert result.returncode == 128 + signum and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == (f"error: interrupted by SIG{name}; nothing half-written was left (run it "
                                     f"again to finish)")
