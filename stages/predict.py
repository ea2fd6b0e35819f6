"""predict: classify images of digits with a trained classifier (train's classifier.keras).

    python -m stages.predict digit.png photo.jpg more.npz [--model models/cpu] [--json]

Images (PNG, JPEG, any size) become 28x28 grayscale, white digit on black as
in MNIST: inverted when the background is light, and, unless already 28x28,
cropped to the digit, scaled to fit 20x20 and centred by its centre of mass
(MNIST's own recipe). An .npz gives every array in it of shape (28, 28) or
(N, 28, 28), pixels 0..255. Rounded to uint8 pixels, as MNIST's are, they go
to the classifier, which standardizes them exactly as in training (the
scaler is inside it). A file that cannot be read is a one-line error for
that file; the others still get answers; the exit status is 1 if any failed.
Not a pipeline stage: a tool that uses what the pipeline made.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from stages.common import UserError, import_keras, read_json, run

SIDE, BOX = 28, 20  # MNIST: digits fitted into 20x20, centred in 28x28


def to_mnist(gray):
    """A 2-D grayscale array (0..255, any size) -> 28x28 float, white digit on black."""
    from PIL import Image

    gray = np.asarray(gray, dtype=np.float64)
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:  # dark digit on a light background
        gray = 255.0 - gray
    if gray.shape == (SIDE, SIDE):
        return gray
    ink = gray > 0.3 * gray.max() if gray.max() > 0 else np.ones_like(gray, dtype=bool)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    crop = gray[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
    scale = BOX / max(crop.shape)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    small = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, Image.LANCZOS)).clip(0, 255)
    total = small.sum() or 1.0
    cy = (small.sum(axis=1) * np.arange(small.shape[0])).sum() / total
    cx = (small.sum(axis=0) * np.arange(small.shape[1])).sum() / total
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - small.shape[0]))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - small.shape[1]))
    out = np.zeros((SIDE, SIDE))
    out[top:top + small.shape[0], left:left + small.shape[1]] = small
    return out


def read_inputs(path):
    """[(name, 28x28 array)] from one file, or a UserError saying why it cannot be used."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError) as err:
            raise UserError(f"{path}: not a readable .npz ({err})") from None
        items = []
        for key, arr in arrays.items():
            if arr.shape[-2:] != (SIDE, SIDE) or arr.ndim not in (2, 3):
                raise UserError(f"{path}: array {key!r} has shape {arr.shape}; expected (28, 28) or (N, 28, 28)")
            stack = arr[None] if arr.ndim == 2 else arr
            items += [(f"{path}:{key}[{i}]", to_mnist(img)) for i, img in enumerate(stack)]
        return items
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
    except (UnidentifiedImageError, OSError) as err:
        raise UserError(f"{path}: not an image PIL can read ({type(err).__name__})") from None
    return [(str(path), to_mnist(gray))]


def to_pixels(images):
    """(N, 28, 28) values 0..255 -> uint8, what the classifier takes (MNIST's own pixels are uint8)."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="PNG/JPEG images or .npz arrays")
    parser.add_argument("--model", type=Path, default=Path("models/cpu"),
                        help="a train output folder, holding classifier.keras and params.json")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    args = parser.parse_args(argv)

    trained = read_json(args.model / "params.json")
    per_file = []  # in the order given: (file, error or None, [(name, image)])
    for path in args.files:
        try:
            per_file.append((path, None, read_inputs(path)))
        except UserError as err:
            per_file.append((path, str(err), []))
    inputs = [item for _, _, items in per_file for item in items]
    probs = iter([])
    if inputs:
        keras = import_keras(trained["base"]["backend"], device="cpu")
        try:
            model = keras.models.load_model(args.model / "classifier.keras")
        except ValueError as err:  # Keras's word for a missing or unreadable file
            raise UserError(f"cannot load {args.model / 'classifier.keras'} ({err}); run `dvc repro` to make it") \
                from None
        images = to_pixels(np.stack([img for _, img in inputs]))
        probs = iter(np.asarray(model.predict(images, verbose=0), dtype=np.float64))
    results = []
    for path, error, items in per_file:
        if error:
            results.append({"file": str(path), "error": error})
        for name, _ in items:
            p = next(probs)
            results.append({"file": name, "digit": int(p.argmax()), "probability": round(float(p.max()), 6),
                            "probabilities": [round(float(v), 6) for v in p]})
    failed = [r for r in results if "error" in r]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"error: {r['error']}", file=sys.stderr, flush=True)
            else:
                print(f"{r['file']}: {r['digit']} ({r['probability']:.1%})", flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
