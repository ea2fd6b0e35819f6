import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from stages import fetch
from mnist_cnn.errors import UserError
from tests.conftest import SAMPLE, tiny_params, write_params
from mnist_cnn.params import FetchParams


def params(**overrides):
    return FetchParams.model_validate(tiny_params(**overrides)["fetch"])


def test_sample_hashes_match_the_committed_sample(sample_raw):
    fetch.check_arrays(sample_raw, fetch.SAMPLE_SHA256, "sample")  # raises on mismatch


def test_one_changed_pixel_is_a_mismatch_naming_the_array_and_source(sample_raw):
    sample_raw["x_test"] = sample_raw["x_test"].copy()
    sample_raw["x_test"][0, 0, 0] ^= 1
    with pytest.raises(UserError, match=r"here\.npz: array x_test .*sha256 mismatch"):
        fetch.check_arrays(sample_raw, fetch.SAMPLE_SHA256, "MNIST_NPZ here.npz")


def test_the_sample_is_not_taken_for_full_mnist(sample_raw):
    with pytest.raises(UserError, match="x_train"):
        fetch.check_arrays(sample_raw, fetch.MNIST_SHA256, "MNIST_NPZ")


def test_npz_missing_an_array_is_refused(tmp_path, sample_raw):
    path = tmp_path / "m.npz"
    np.savez(path, x_train=sample_raw["x_train"])
    with pytest.raises(UserError, match="has no array 'y_train'"):
        fetch.load_npz(path, "MNIST_NPZ")


def test_not_an_npz_is_refused(tmp_path):
    path = tmp_path / "m.npz"
    path.write_text("<html>not found</html>")
    with pytest.raises(UserError, match="cannot read .* as .npz"):
        fetch.load_npz(path, "MNIST_NPZ")


def test_mnist_npz_pointing_nowhere_is_an_error(isolated_env):
    env = {"MNIST_NPZ": str(isolated_env / "missing.npz")}
    with pytest.raises(UserError, match="MNIST_NPZ=.*missing.npz: no such file"):
        fetch.get_arrays(params(), env)


def test_mnist_npz_with_other_data_is_an_error_not_a_fallback(isolated_env):
    with pytest.raises(UserError, match="MNIST_NPZ .*mnist_sample.npz: array x_train"):
        fetch.get_arrays(params(), {"MNIST_NPZ": str(SAMPLE)})


def test_keras_cache_is_used_when_present(isolated_env):
    cache = fetch.keras_cache_file({"KERAS_HOME": str(isolated_env)})
    cache.parent.mkdir(parents=True)
    cache.write_bytes(SAMPLE.read_bytes())  # present, but not full MNIST: must be refused
    with pytest.raises(UserError, match="keras_cache"):
        fetch.get_arrays(params(), {"KERAS_HOME": str(isolated_env)})


def test_offline_falls_back_to_the_sample_loudly(isolated_env, capsys):
    arrays, source = fetch.get_arrays(params(), {"KERAS_HOME": str(isolated_env)})
    assert source == "sample"
    assert arrays["x_train"].shape == (6000, 28, 28) and arrays["y_test"].shape == (1000,)
    assert "NOT THE FULL MNIST" in capsys.readouterr().err
    assert fetch.data_details(arrays, source)["full_mnist"] is False


def test_offline_with_fallback_forbidden_names_the_three_ways(isolated_env):
    with pytest.raises(UserError) as err:
        fetch.get_arrays(params(**{"fetch.allow_sample": False}), {"KERAS_HOME": str(isolated_env)})
    assert "MNIST_NPZ" in str(err.value) and "datasets/mnist.npz" in str(err.value)
    assert "download" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture
def http_file(tmp_path):
    """Serve tmp_path/www over HTTP on localhost; yields (folder, base URL)."""
    www = tmp_path / "www"
    www.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(www), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_checks_the_file_hash_and_keeps_a_good_file(http_file, tmp_path):
    www, url = http_file
    payload = b"x" * 200_000
    (www / "mnist.npz").write_bytes(payload)
    dest = tmp_path / "cache" / "mnist.npz"
    fetch.download(f"{url}/mnist.npz", dest, hashlib.sha256(payload).hexdigest(), 5)
    assert dest.read_bytes() == payload


def test_corrupt_download_is_an_error_and_nothing_is_kept(http_file, tmp_path):
    www, url = http_file
    (www / "mnist.npz").write_bytes(b"truncated")
    dest = tmp_path / "cache" / "mnist.npz"
    with pytest.raises(UserError, match="download of .* is corrupt"):
        fetch.download(f"{url}/mnist.npz", dest, "0" * 64, 5)
    assert list(dest.parent.iterdir()) == []


def test_main_writes_arrays_and_data_source(isolated_env):
    out, metrics, details = isolated_env / "raw", isolated_env / "data.json", isolated_env / "details.json"
    p = write_params(isolated_env / "params.yaml", tiny_params())
    fetch.main(["--out", str(out), "--metrics", str(metrics), "--details", str(details), "--params", str(p)])
    assert sorted(f.name for f in out.iterdir()) == ["manifest.json", "x_test.npy", "x_train.npy", "y_test.npy",
                                                     "y_train.npy"]
    recorded = json.loads((out / "manifest.json").read_text())
    assert recorded["stage"] == "fetch"
    assert recorded["files"]["y_train.npy"]["bytes"] == (out / "y_train.npy").stat().st_size
    assert np.load(out / "y_train.npy").dtype == np.uint8
    assert json.loads(metrics.read_text()) == {"full_mnist": False}  # the headline `dvc metrics show` shows
    assert json.loads(details.read_text()) == {"source": "sample", "full_mnist": False,
                                               "train_images": 6000, "test_images": 1000}


def test_main_fails_without_writing_anything(isolated_env):
    out, metrics = isolated_env / "raw", isolated_env / "data.json"
    p = write_params(isolated_env / "params.yaml", tiny_params(**{"fetch.allow_sample": False}))
    with pytest.raises(UserError):
        fetch.main(["--out", str(out), "--metrics", str(metrics), "--details", str(isolated_env / "d.json"),
                    "--params", str(p)])
    assert not out.exists() and not metrics.exists() and not (isolated_env / "d.json").exists()
    assert [f.name for f in isolated_env.iterdir() if f.name.startswith(".")] == []


def test_the_slow_tests_look_for_the_full_data_where_fetch_does(tmp_path):
    """`pytest -m slow` finds mnist.npz as fetch would: MNIST_NPZ first, then the Keras cache."""
    from tests.conftest import full_mnist_npz
    cache = fetch.keras_cache_file({"KERAS_HOME": str(tmp_path)})
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"stand-in")
    assert full_mnist_npz({"KERAS_HOME": str(tmp_path)}) == cache
    assert full_mnist_npz({"MNIST_NPZ": "/data/mnist.npz", "KERAS_HOME": str(tmp_path)}) == Path("/data/mnist.npz")
    assert full_mnist_npz({"KERAS_HOME": str(tmp_path / "elsewhere")}) is None


# --- hostile or damaged files: refused from the headers, in bounded memory and time --------------

def npz_with_header(path, name, shape, payload=b""):
    """An .npz whose member `name` declares `shape` (uint8) in its header but holds only `payload`."""
    import io
    import zipfile
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}.npy", header.getvalue() + payload)
    return path


def test_an_array_declaring_a_huge_shape_is_refused_from_its_header(tmp_path):
    path = npz_with_header(tmp_path / "huge.npz", "x_train", (10**9, 28, 28), b"\0" * 1000)
    with pytest.raises(UserError, match=r"array 'x_train''s size does not match its header .*damaged"):
        fetch.load_npz(path, "MNIST_NPZ")


def test_a_compressed_bomb_of_the_wrong_shape_is_refused_before_it_is_read(tmp_path, sample_raw):
    path = tmp_path / "bomb.npz"
    # 94 MB of zeros in about 100 KB: what it declares is refused before a byte of it is inflated
    np.savez_compressed(path, x_train=np.zeros((120_000, 28, 28), np.uint8), y_train=sample_raw["y_train"],
                        x_test=sample_raw["x_test"], y_test=sample_raw["y_test"])
    assert path.stat().st_size < 1_000_000
    with pytest.raises(UserError) as err:
        fetch.get_arrays(params(), {"MNIST_NPZ": str(path)})
    assert str(err.value) == (f"MNIST_NPZ: {path}: array x_train is (120000, 28, 28) uint8; "
                              f"MNIST's is (60000, 28, 28) uint8")


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.array(["a", "b"])}, r"array x_train is \(2,\) <U1"),
    ({"x_train": np.zeros((5, 28, 28), np.float32)}, r"array x_train is \(5, 28, 28\) float32"),
    ({"extra": np.zeros(3, np.uint8)}, r"an array 'extra' besides MNIST's four"),
])
def test_arrays_that_are_not_mnists_are_refused_by_their_headers(tmp_path, sample_raw, arrays, message):
    path = tmp_path / "m.npz"
    np.savez(path, **(sample_raw | arrays))
    with pytest.raises(UserError, match=message):
        fetch.load_npz(path, "MNIST_NPZ")


def test_a_truncated_npz_is_one_line(tmp_path):
    path = tmp_path / "cut.npz"
    path.write_bytes(SAMPLE.read_bytes()[:100_000])
    with pytest.raises(UserError, match=r"cannot read .*cut\.npz as \.npz \(BadZipFile.*damaged") as err:
        fetch.load_npz(path, "MNIST_NPZ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind, message", [("folder", "is a folder"), ("fifo", "is not a regular file")])
def test_mnist_npz_that_is_not_a_file_says_what_it_is(isolated_env, kind, message):
    import os
    path = isolated_env / "mnist.npz"
    path.mkdir() if kind == "folder" else os.mkfifo(path)
    with pytest.raises(UserError, match=f"MNIST_NPZ=.*mnist.npz: {message}"):
        fetch.get_arrays(params(), {"MNIST_NPZ": str(path)})
