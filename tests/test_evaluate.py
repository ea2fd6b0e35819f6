import numpy as np
import pytest

from stages import evaluate


def test_metrics_against_a_hand_count():
    y = np.array([0, 0, 1, 1, 2])
    probs = np.full((5, 10), 0.01)
    for i, p in enumerate([0, 1, 1, 1, 2]):  # one 0 taken for a 1
        probs[i, p] = 0.91
    m = evaluate.test_metrics(probs, y)
    assert m["test"]["accuracy"] == pytest.approx(0.8) and m["test"]["errors"] == 1
    assert m["per_class"]["0"] == {"precision": 1.0, "recall": 0.5}
    assert m["per_class"]["1"] == {"precision": pytest.approx(2 / 3), "recall": 1.0}
    assert m["per_class"]["9"] == {"precision": 0.0, "recall": 0.0}  # never seen, never predicted


def test_precision_and_recall_agree_with_scikit_learn():
    from sklearn.metrics import precision_recall_fscore_support
    rng = np.random.default_rng(0)
    y = rng.integers(0, 9, 500)  # no 9 present
    pred = np.where(rng.random(500) < 0.7, y, rng.integers(0, 9, 500))  # nor predicted: both 0.0
    pred[:3] = 8  # some digit predicted more often than present
    ours = evaluate.precision_recall(y, pred)
    theirs = precision_recall_fscore_support(y, pred, labels=list(range(10)), zero_division=0)[:2]
    assert np.allclose(ours, theirs, rtol=0, atol=1e-15) and ours[0][9] == ours[1][9] == 0.0


def test_cross_entropy_matches_keras():
    from mnist_cnn.backend import import_keras
    keras = import_keras("tensorflow", device="cpu")
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(10), size=50)
    y = rng.integers(0, 10, 50)
    expected = float(np.mean(keras.losses.sparse_categorical_crossentropy(y, probs)))
    assert evaluate.cross_entropy(probs, y) == pytest.approx(expected, rel=1e-5)


def test_predictions_csv_rows():
    probs = np.eye(10)[[3, 5]] * 0.9 + 0.01
    text = evaluate.predictions_csv(probs, np.array([3, 4]))
    assert text.splitlines() == ["index,actual,predicted,confidence", "0,3,3,0.910000", "1,4,5,0.910000"]


def test_the_mistakes_picture_shows_each_image_pixel_for_pixel_in_its_cell(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 28, 28)).astype(np.float64)
    y = np.arange(12) % 10
    probs = np.full((12, 10), 0.01)
    probs[np.arange(12), (y + 1) % 10] = 0.91  # every one wrong
    path = tmp_path / "m.png"
    evaluate.mistakes_png(images, y, probs, [7, 2, 11, 0, 5, 9], path, "a title", scale=3, cols=5)
    sheet = np.asarray(Image.open(path))
    side, pad, caption, top = 28 * 3, 16, 48, 48
    assert sheet.shape == (top + 2 * (side + caption + 8) + 8, 5 * (side + 2 * pad))  # 6 images: 2 rows of 5
    for k, i in enumerate([7, 2, 11, 0, 5, 9]):
        x, yy = (k % 5) * (side + 2 * pad) + pad, top + (k // 5) * (side + caption + 8)
        cell = sheet[yy:yy + side, x:x + side]
        assert np.array_equal(cell[::3, ::3], 255 - images[i].astype(np.uint8))  # ink dark on white
        below = sheet[yy + side + 2:yy + side + caption, x:x + side]
        assert below.min() < 128  # a caption is written under each
    assert (sheet[top + side + caption + 8:, 3 * (side + 2 * pad):] == 255).all()  # no 7th cell: blank paper


@pytest.mark.parametrize("procedure, kind", [("published_split", "per_pixel"), ("pooled_resplit", "per_pixel"),
                                             ("published_split", "global")])
def test_the_test_pixels_are_recovered_exactly_from_the_standardized_images(sample_raw, procedure, kind):
    from stages import preprocess
    arrays, scaler = preprocess.preprocess(sample_raw, procedure, seed=0, kind=kind)
    pixels = evaluate.test_pixels(arrays["x_test"], scaler)
    assert pixels.dtype == np.uint8 and pixels.shape == arrays["x_test"].shape[:3]
    if procedure == "published_split":  # the published test set, in its order: the raw images themselves
        assert np.array_equal(pixels, sample_raw["x_test"])
    assert evaluate.test_pixels(arrays["x_test"][:0], scaler).shape == (0, 28, 28)  # a model with no mistake


def test_test_images_that_are_not_the_scalers_standardization_are_refused(sample_raw):
    from mnist_cnn.errors import UserError
    from stages import preprocess
    arrays, scaler = preprocess.preprocess(sample_raw, "published_split", seed=0)
    x = arrays["x_test"].copy()
    x[3, 14, 14, 0] = np.nextafter(x[3, 14, 14, 0], np.float32(np.inf))  # one value off by its last bit
    with pytest.raises(UserError, match=r"^x_test.npy is not scaler.json's standardization .* `dvc repro -f "
                                        r"preprocess`$"):
        evaluate.test_pixels(x, scaler)
