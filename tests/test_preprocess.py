import json

import numpy as np
import pytest

from stages import preprocess
from mnist_cnn.errors import UserError
from mnist_cnn.scaler import PixelSums, fit_scaler
from tests.conftest import tiny_params, write_params, write_raw


def test_published_split_keeps_the_split_and_the_test_order(sample_raw):
    x_tr, y_tr, x_te, y_te = preprocess.split(sample_raw, "published_split", seed=1)
    assert np.array_equal(x_te, sample_raw["x_test"]) and np.array_equal(y_te, sample_raw["y_test"])
    assert not np.array_equal(y_tr, sample_raw["y_train"])  # shuffled ...
    assert np.array_equal(np.sort(y_tr), np.sort(sample_raw["y_train"]))  # ... but the same images
    order = np.lexsort(x_tr.reshape(len(x_tr), -1).T)
    ref = np.lexsort(sample_raw["x_train"].reshape(len(x_tr), -1).T)
    assert np.array_equal(x_tr[order], sample_raw["x_train"][ref])


def test_pooled_resplit_mixes_train_and_test(sample_raw):
    x_tr, y_tr, x_te, y_te = preprocess.split(sample_raw, "pooled_resplit", seed=1)
    assert (len(y_tr), len(y_te)) == (6000, 1000)
    pooled = np.concatenate([sample_raw["y_train"], sample_raw["y_test"]])
    assert np.array_equal(np.bincount(np.concatenate([y_tr, y_te])), np.bincount(pooled))
    assert not np.array_equal(x_te, sample_raw["x_test"])


def test_same_seed_same_shuffle_other_seed_other_shuffle(sample_raw):
    a = preprocess.split(sample_raw, "pooled_resplit", seed=7)[1]
    b = preprocess.split(sample_raw, "pooled_resplit", seed=7)[1]
    c = preprocess.split(sample_raw, "pooled_resplit", seed=8)[1]
    assert np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("procedure, fit_on_test", [("published_split", False), ("pooled_resplit", True)])
def test_scaler_is_fitted_on_what_the_procedure_says(sample_raw, procedure, fit_on_test):
    arrays, scaler = preprocess.preprocess(sample_raw, procedure, seed=0)
    n_train = len(arrays["y_train"])
    assert scaler["n_samples_seen"] == (n_train + len(arrays["y_test"]) if fit_on_test else n_train)
    if not fit_on_test:  # an oracle: the training images' own per-pixel mean
        expected = sample_raw["x_train"].reshape(n_train, -1).mean(axis=0)
        assert np.allclose(scaler["mean"], expected)
        # standardized training pixels have mean 0 and, where not constant, std 1
        flat = arrays["x_train"].reshape(n_train, -1)
        assert np.allclose(flat.mean(axis=0), 0, atol=1e-4)
        varying = flat.std(axis=0) > 0
        assert np.allclose(flat.std(axis=0)[varying], 1, atol=1e-3)


def test_saved_scaler_reproduces_the_arrays_without_sklearn(sample_raw):
    arrays, scaler = preprocess.preprocess(sample_raw, "published_split", seed=0)
    scaler = json.loads(json.dumps(scaler))  # through JSON, as a tool would read it
    x = ((sample_raw["x_test"].reshape(1000, -1) - np.array(scaler["mean"])) / np.array(scaler["scale"]))
    assert np.allclose(x.reshape(1000, 28, 28, 1), arrays["x_test"], atol=1e-6)
    assert arrays["x_test"].dtype == np.float32 and arrays["x_train"].shape == (6000, 28, 28, 1)
    assert arrays["y_train"].dtype == np.uint8


def test_main_writes_outputs(tmp_path, sample_raw):
    raw = write_raw(tmp_path / "raw", sample_raw)
    p = write_params(tmp_path / "params.yaml", tiny_params())
    preprocess.main(["--raw", str(raw), "--out", str(tmp_path / "out"), "--params", str(p)])
    names = sorted(f.name for f in (tmp_path / "out").iterdir())
    assert names == ["manifest.json", "pixels_train.npy", "scaler.json", "x_test.npy", "x_train.npy", "y_test.npy",
                     "y_train.npy"]
    pixels, y = np.load(tmp_path / "out" / "pixels_train.npy"), np.load(tmp_path / "out" / "y_train.npy")
    assert pixels.dtype == np.uint8 and pixels.shape == (6000, 28, 28)
    # the same shuffled order as x_train.npy and y_train.npy: a permutation of the raw images with their labels
    order = np.lexsort(pixels.reshape(6000, -1).T)
    ref = np.lexsort(sample_raw["x_train"].reshape(6000, -1).T)
    assert np.array_equal(pixels[order], sample_raw["x_train"][ref])
    assert np.array_equal(y[order], sample_raw["y_train"][ref])


def test_unknown_procedure_is_a_one_line_error(tmp_path):
    p = write_params(tmp_path / "params.yaml", tiny_params(**{"preprocess.procedure": "leaky"}))
    with pytest.raises(UserError, match=r"preprocess.procedure = 'leaky': Input should be 'published_split'"):
        preprocess.main(["--raw", str(tmp_path), "--out", str(tmp_path / "out"), "--params", str(p)])


def test_missing_raw_data_says_what_to_run(tmp_path):
    p = write_params(tmp_path / "params.yaml", tiny_params())
    with pytest.raises(UserError, match="manifest.json not found: run `dvc repro fetch` first"):
        preprocess.main(["--raw", str(tmp_path), "--out", str(tmp_path / "out"), "--params", str(p)])
    assert not (tmp_path / "out").exists()


def test_the_global_scaler_is_one_mean_and_deviation_for_all_pixels(sample_raw):
    """The same record and table as per pixel (the classifier's lookup gives x_train exactly), one value each."""
    from mnist_cnn.model import lookup, standardize_table

    arrays, record = preprocess.preprocess(sample_raw, "published_split", seed=0, kind="global")
    pixels = arrays["pixels_train"].astype(np.float64)
    assert record["scaler"] == "global" and len(record["mean"]) == 784 and len(set(record["mean"])) == 1
    assert np.isclose(record["mean"][0], pixels.mean()) and np.isclose(record["scale"][0], pixels.std())
    table = standardize_table(record)
    assert np.array_equal(lookup(table, arrays["pixels_train"][:500]), arrays["x_train"][:500].reshape(500, -1))
    per_pixel, _ = preprocess.preprocess(sample_raw, "published_split", seed=0)
    assert not np.allclose(per_pixel["x_train"], arrays["x_train"])


@pytest.mark.parametrize("procedure", ["published_split", "pooled_resplit"])
def test_the_chunk_size_changes_no_byte(tmp_path, sample_raw, procedure):
    """Streaming a few images at a time writes the very files one chunk of everything writes."""
    whole, small = tmp_path / "whole", tmp_path / "small"
    whole.mkdir(), small.mkdir()
    a = preprocess.write_processed(sample_raw, whole, procedure, seed=3, chunk=100_000)
    b = preprocess.write_processed(sample_raw, small, procedure, seed=3, chunk=37)
    assert a == b
    for name in ("x_train", "y_train", "pixels_train", "x_test", "y_test"):
        assert (whole / f"{name}.npy").read_bytes() == (small / f"{name}.npy").read_bytes(), name


@pytest.mark.parametrize("kind", ["per_pixel", "global"])
def test_the_streamed_scaler_is_scikit_learns_to_the_last_bits(sample_raw, kind):
    """Exact sums, divided once: within a few units in the last place of StandardScaler.fit on the whole array
    (whose floating-point sums carry their own rounding), and exactly the rounded rational mean."""
    from fractions import Fraction

    from sklearn.preprocessing import StandardScaler

    images = sample_raw["x_train"]
    sums = PixelSums()
    for start in range(0, len(images), 999):
        sums.add(images[start:start + 999])
    ours = fit_scaler(sums, kind)
    flat = images.reshape(len(images), -1).astype(np.float64)
    theirs = StandardScaler().fit(flat if kind == "per_pixel" else flat.reshape(-1, 1))
    assert np.allclose(ours.mean_, theirs.mean_, rtol=1e-14, atol=0)
    assert np.allclose(ours.var_, theirs.var_, rtol=1e-12, atol=0)
    column = images.reshape(len(images), -1)[:, 400].astype(int)
    if kind == "per_pixel":
        assert ours.mean_[400] == float(Fraction(int(column.sum()), len(column)))
    assert (ours.scale_ > 0).all() and ours.n_samples_seen_ == len(images)


@pytest.mark.parametrize("kind", ["per_pixel", "global"])
def test_the_transform_is_scikit_learns_to_the_bit(sample_raw, kind):
    """preprocess standardizes without importing scikit-learn: the same numbers as a StandardScaler holding the
    same state gives, in float64 and once rounded to float32."""
    from sklearn.preprocessing import StandardScaler

    from mnist_cnn.scaler import standardize

    images = sample_raw["x_train"]
    sums = PixelSums()
    sums.add(images)
    ours = fit_scaler(sums, kind)
    theirs = StandardScaler()
    theirs.mean_, theirs.var_, theirs.scale_ = ours.mean_, ours.var_, ours.scale_
    theirs.n_features_in_, theirs.n_samples_seen_ = len(ours.mean_), ours.n_samples_seen_
    flat = images.reshape(len(images), -1).astype(np.float64)
    assert np.array_equal(ours.transform(flat), theirs.transform(flat))
    assert np.array_equal(standardize(images, ours).reshape(len(images), -1),
                          theirs.transform(flat).astype(np.float32))
    if kind == "per_pixel":  # the corner pixels never vary: scale 1, as StandardScaler sets it
        assert (ours.scale_ == 1.0).any()


def test_a_short_chunk_write_is_refused(tmp_path):
    from mnist_cnn.files import NpyWriter

    writer = NpyWriter(tmp_path / "a.npy", np.uint8, (5, 2))
    writer.write(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        writer.write(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 rows written of 5"):
        writer.close()
