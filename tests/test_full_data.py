"""On the full MNIST (slow; the data where fetch finds it: MNIST_NPZ or the Keras cache): `pytest -m slow`."""

import numpy as np
import pytest

from stages import fetch
from tests.conftest import FULL_MNIST, SAMPLE
from mnist_cnn.params import FetchParams

pytestmark = pytest.mark.slow


@pytest.fixture
def full_npz():
    if FULL_MNIST is None or not FULL_MNIST.is_file():
        pytest.skip("no full MNIST where fetch looks: set MNIST_NPZ or put mnist.npz in the Keras cache")
    return FULL_MNIST


def test_full_mnist_passes_the_array_hashes_and_the_known_facts(full_npz, tmp_path):
    arrays, source = fetch.get_arrays(
        FetchParams(url="http://127.0.0.1:9/x", sha256="0" * 64, timeout_s=1.0, allow_sample=False),
        {"MNIST_NPZ": str(full_npz), "KERAS_HOME": str(tmp_path)})
    assert source == "MNIST_NPZ"
    assert np.bincount(arrays["y_train"]).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert arrays["y_train"][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert round(float(arrays["x_train"].mean()) / 255, 4) == 0.1307


def test_the_committed_sample_is_what_its_script_makes(full_npz, tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_sample", SAMPLE.with_name("make_sample.py"))
    make_sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_sample)
    make_sample.main([str(full_npz), str(tmp_path / "s.npz")])
    with np.load(tmp_path / "s.npz") as made, np.load(SAMPLE) as committed:
        for name in fetch.ARRAYS:
            assert np.array_equal(made[name], committed[name]), name
        assert np.bincount(committed["y_train"]).tolist() == [600] * 10
