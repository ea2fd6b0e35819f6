import hashlib
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from stages import fetch
from stages.common import UserError
from tests.conftest import SAMPLE, tiny_params, write_params


def params(**overrides):
    return fetch.FetchParams.model_validate(tiny_params(**overrides)["fetch"])


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
    assert sorted(f.name for f in out.iterdir()) == ["x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
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
