"""evaluate: test loss, accuracy, per-class precision/recall and predictions of one trained model.

    python -m stages.evaluate --device cpu --data data/processed --model models/cpu \
        --metrics metrics/evaluate_cpu.json --details details/evaluate_cpu.json \
        --predictions plots/predictions_cpu.csv --mistakes plots/mistakes_cpu.png

Both JSON files are keyed by name, so that `dvc metrics show` and
`dvc metrics diff` read like sentences: --metrics holds the headline
(test.accuracy, test.loss), --details adds the error count and per-digit
precision and recall (per_class.7.recall), which the report shows. The predictions
CSV (one row per test image: actual and predicted digit, confidence) is the
confusion matrix's data: DVC's confusion plot and the report's table. The
mistakes PNG shows the 25 most confident mistakes, as the digits were drawn.

It scores what predict and serve answer with (mnist_cnn.inference): classifier.onnx on ONNX Runtime, which
starts in a fraction of a second where TensorFlow takes seconds (train checked it against Keras to 1e-5), or
classifier.keras on Keras where train could write no ONNX; --details names which (computed_by). Both take the
0..255 pixels, recovered exactly from x_test.npy with scaler.json (test_pixels).
"""

import argparse
from pathlib import Path

import numpy as np
from mnist_cnn import N_CLASSES, SIDE
from mnist_cnn.errors import UserError
from mnist_cnn.files import atomic_path, check_files, read_json, write_json
from mnist_cnn.inference import TrainedClassifier
from mnist_cnn.model import lookup, standardize_table
from mnist_cnn.params import PARAMS_FILE, EvaluateParams, check_batch_memory, load_params
from mnist_cnn.stage import run

DIGITS = list(range(N_CLASSES))


def cross_entropy(probs, y):
    """Mean categorical cross-entropy, as Keras computes it (rows renormalized, clipped)."""
    probs = probs / probs.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(y)), y], 1e-7, 1.0))))


def precision_recall(y, pred):
    """Per-digit precision and recall (0.0 where a digit is never predicted / never present).

    Counted from the confusion matrix here rather than with scikit-learn, whose
    import alone costs this stage more than a second (tests check the two agree).
    """
    confusion = np.bincount(len(DIGITS) * y + pred, minlength=len(DIGITS) ** 2).reshape(len(DIGITS), len(DIGITS))
    hits = np.diag(confusion).astype(np.float64)
    predicted, present = confusion.sum(axis=0), confusion.sum(axis=1)
    return (np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0),
            np.divide(hits, present, out=np.zeros_like(hits), where=present > 0))


def test_metrics(probs, y):
    """Named metrics from predicted probabilities (N, 10) and true digits (N,)."""
    pred = probs.argmax(axis=1)
    precision, recall = precision_recall(y, pred)
    return {
        "test": {
            "loss": cross_entropy(probs, y),
            "accuracy": float(np.mean(pred == y)),
            "errors": int(np.sum(pred != y)),
            "images": int(len(y)),
        },
        "per_class": {
            str(d): {"precision": float(precision[d]), "recall": float(recall[d])}
            for d in DIGITS
        },
    }


def check_learned(accuracy, y, device):
    """Refuse a model no better than always answering the test set's most frequent digit: a failed run."""
    counts = np.bincount(y, minlength=len(DIGITS))
    baseline = counts.max() / len(y)
    if accuracy <= baseline:
        raise UserError(f"the {device} model learned nothing: test accuracy {accuracy:.4f} is no better than "
                        f"always answering {int(counts.argmax())} ({baseline:.4f}); nothing was written. "
                        f"Check train.learning_rate, train.epochs and train.optimizer")


def predictions_csv(probs, y):
    pred = probs.argmax(axis=1)
    rows = ["index,actual,predicted,confidence"]
    rows += [f"{i},{y[i]},{pred[i]},{probs[i, pred[i]]:.6f}" for i in range(len(y))]
    return "\n".join(rows) + "\n"


def most_confident_mistakes(probs, y, n=25):
    """Indices of the `n` wrong predictions made with the highest confidence, most confident first."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != y)
    return wrong[np.argsort(-probs[wrong, pred[wrong]], kind="stable")][:n]


def test_pixels(x, scaler, table=None):
    """The 0..255 pixels (N, 28, 28) uint8 that preprocess standardized into x (N, 28, 28, 1) with `scaler`.

    Each value is unstandardized in float64 and rounded to the nearest level; the result is checked to
    standardize back to x bit for bit (the lookup train's classifier does), so the classifier sees exactly the
    values the network would have been given. `table`: standardize_table(scaler), made once for many batches.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), SIDE * SIDE)  # not -1: a batch may be empty
    levels = np.rint(flat * np.asarray(scaler["scale"], np.float64) + np.asarray(scaler["mean"], np.float64))
    pixels = np.clip(np.nan_to_num(levels), 0, 255).astype(np.uint8)
    table = standardize_table(scaler) if table is None else table
    if not np.array_equal(lookup(table, pixels), np.asarray(x).reshape(len(x), SIDE * SIDE)):
        raise UserError("x_test.npy is not scaler.json's standardization of 0..255 pixels (a file changed by "
                        "hand, or another preprocess's): run `dvc repro -f preprocess`")
    return pixels.reshape(len(x), SIDE, SIDE)


def mistakes_png(images, y, probs, indices, path, title, scale=5, cols=5):
    """A grid of the given test images, each captioned below: 'true 4, read 9' and '#index, confidence'.

    Drawn with Pillow, not matplotlib, whose import and layout alone took
    seconds; each image is shown at `scale`
    times its size, pixel for pixel, ink dark on white as in the report.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=15)  # Pillow's own scalable font: the same on every machine
    side, pad, caption, top = SIDE * scale, 16, 48, 48
    width, height = side + 2 * pad, side + caption + 8
    rows = max(1, -(-len(indices) // cols))
    sheet = Image.new("L", (cols * width, top + rows * height + 8), 255)
    draw = ImageDraw.Draw(sheet)
    draw.text((sheet.width / 2, top / 2), title, fill=0, font=font, anchor="mm")
    for k, i in enumerate(indices):
        x, yy = (k % cols) * width + pad, top + (k // cols) * height
        ink = 255 - np.rint(np.clip(images[i], 0, 255)).astype(np.uint8)
        sheet.paste(Image.fromarray(ink).resize((side, side), Image.Resampling.NEAREST), (x, yy))
        draw.rectangle([x - 1, yy - 1, x + side, yy + side], outline=187)
        pred = int(probs[i].argmax())
        draw.multiline_text((x + side / 2, yy + side + 7), f"true {y[i]}, read {pred}\n#{i}, {probs[i, pred]:.0%} sure",
                            fill=0, font=font, anchor="ma", align="center", spacing=5)
    sheet.save(path, format="PNG")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True, help="whose model to evaluate")
    parser.add_argument("--data", type=Path, required=True, help="preprocess's folder")
    parser.add_argument("--model", type=Path, required=True, help="train's folder")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file of test accuracy and loss")
    parser.add_argument("--details", type=Path, required=True, help="JSON file adding errors, per-digit figures")
    parser.add_argument("--predictions", type=Path, required=True)
    parser.add_argument("--mistakes", type=Path, required=True, help="PNG of the most confident mistakes")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, evaluate=EvaluateParams)

    data_md5 = check_files(args.data, ["x_test.npy", "y_test.npy", "scaler.json"])
    check_files(args.model, ["params.json"])
    trained = read_json(args.model / "params.json")
    if trained.get("scaler_md5") != data_md5["scaler.json"]:
        raise UserError(f"{args.model} was trained on images standardized by another scaler than "
                        f"{args.data / 'scaler.json'}; run `dvc repro` to train it on these")
    if "values_per_image" not in trained:
        raise UserError(f"{args.model} was written by an older train stage, without the figure evaluate checks its "
                        f"batch's memory by; train it again (`dvc repro` where it was trained)")
    evaluate = params["evaluate"]
    check_batch_memory(trained["values_per_image"], evaluate.batch_size, evaluate.max_batch_mb,
                       ("evaluate.batch_size", "evaluate.max_batch_mb"), training=False)
    try:
        x = np.load(args.data / "x_test.npy", mmap_mode="r")  # read a batch at a time
        y = np.load(args.data / "y_test.npy").astype(np.int64)
        scaler = read_json(args.data / "scaler.json")
    except (FileNotFoundError, ValueError) as err:
        raise UserError(f"cannot load the test data ({err}); run `dvc repro` to make them") from None
    model = TrainedClassifier(args.model)
    table = standardize_table(scaler)
    probs = np.concatenate([model.predict(test_pixels(x[start:start + evaluate.batch_size], scaler, table))
                            for start in range(0, len(x), evaluate.batch_size)])

    if not np.isfinite(probs).all():
        raise UserError(f"the {args.device} model gives NaN or infinite probabilities on the test set; nothing "
                        f"was written. Its weights ran away in training: lower train.learning_rate")
    metrics = test_metrics(probs, y)
    metrics["computed_by"] = model.name
    check_learned(metrics["test"]["accuracy"], y, args.device)
    wrong = most_confident_mistakes(probs, y)
    with atomic_path(args.predictions) as tmp, atomic_path(args.mistakes) as png:
        tmp.write_text(predictions_csv(probs, y))
        mistakes_png(dict(zip(wrong, test_pixels(x[wrong], scaler, table), strict=True)), y, probs, wrong, png,
                     f"{args.device} model: its {len(wrong)} most confident mistakes on the test set")
    write_json(args.details, metrics)
    write_json(args.metrics, {"test": {key: metrics["test"][key] for key in ("accuracy", "loss")}})
    t = metrics["test"]
    print(f"{args.device} model on {t['images']} test images ({model.name}): accuracy {t['accuracy']:.4f}, "
          f"loss {t['loss']:.4f}, {t['errors']} errors")
    print(f"wrote {args.metrics}, {args.details}, {args.predictions} and {args.mistakes}")


if __name__ == "__main__":
    run(main)
