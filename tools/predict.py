"""predict: classify photos, scans and drawings of digits with a trained classifier.

    python -m tools.predict digit.png photo.jpg more.npz [--model models/cpu] [--json] [--explain [FOLDER]]

A picture (PNG, JPEG, any size) is brought to MNIST's form as MNIST's own
digits were: the paper's lighting removed, the ink separated from it by a
threshold chosen from the image, specks and far marks dropped, the digit
cropped, fitted into 20x20 and centred by mass in 28x28, white on black, its
edges grey (to_mnist, digit_ink). A 28x28 image is taken as already in that
form. An .npz gives every array in it of shape (28, 28) or (N, 28, 28),
pixels 0..255. Rounded to uint8 pixels, as MNIST's are, they go to the
classifier (mnist_cnn.inference: classifier.onnx with ONNX Runtime, which starts in a
fraction of a second; classifier.keras with Keras where train wrote no ONNX
file), which standardizes them exactly as in training. --explain writes the
28x28 image the network saw beside each input. Transparency is composited
onto the paper the ink is not. A file that cannot be used (unreadable, over
the limits of mnist_cnn/vision.py, pixels outside 0..255) is a one-line error for that file,
and a blank image is "no digit found", not a guess; the others still get
answers; the exit status is 1 if any failed.
A tool beside the pipeline, using what it made; the preparation is mnist_cnn.vision's.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from mnist_cnn import SIDE
from mnist_cnn.errors import UserError
from mnist_cnn.files import atomic_path, npz_headers, to_json
from mnist_cnn.inference import TrainedClassifier
from mnist_cnn.stage import run
from mnist_cnn.vision import (MAX_FILE_MB, MAX_IMAGES, read_image, reading_failure, to_mnist_or_none,
                              to_pixels)


def read_stack(path, key, arr):
    """One .npz array -> its 28x28 images, refused unless numbers in 0..255."""
    if arr.ndim not in (2, 3) or arr.shape[-2:] != (SIDE, SIDE):
        raise UserError(f"{path}: array {key!r} has shape {arr.shape}; expected (28, 28) or (N, 28, 28)")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise UserError(f"{path}: array {key!r} is {arr.dtype}; expected numbers (pixels 0..255)")
    stack = arr[None] if arr.ndim == 2 else arr
    if len(stack) == 0:
        raise UserError(f"{path}: array {key!r} holds no image (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(stack).all():
        raise UserError(f"{path}: array {key!r} has NaN or infinite pixels; pixels must be 0..255")
    if stack.min() < 0 or stack.max() > 255:
        raise UserError(f"{path}: array {key!r} has pixels from {stack.min()} to {stack.max()}; "
                        f"they must be 0..255 (MNIST's scale)")
    return stack


def read_inputs(path):
    """[(name, 28x28 array or None, why None, the name of its --explain view)] from one file.

    A UserError if the file is unusable.
    """
    from PIL import UnidentifiedImageError


    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("is a folder" if path.is_dir() else "is not a regular file"
                                       if path.exists() else "no such file"))
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: empty file")
    if size > MAX_FILE_MB * 10**6:
        raise UserError(f"{path}: {size / 10**6:.0f} MB is over the limit of {MAX_FILE_MB} MB per file")
    if path.suffix.lower() == ".npz":
        headers = npz_headers(path)
        count = sum(int(np.prod(shape[:-2], dtype=np.int64)) for shape, _ in headers.values())
        if count > MAX_IMAGES:
            raise UserError(f"{path}: {count:,} images is over the limit of {MAX_IMAGES:,} per file")
        if not headers:
            raise UserError(f"{path}: holds no array")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {key: npz[key] for key in npz.files}
        except (OSError, ValueError, EOFError) as err:
            raise UserError(f"{path}: not a readable .npz ({err})") from None
        items = []
        for key, arr in arrays.items():
            for i, img in enumerate(read_stack(path, key, arr)):
                items.append((f"{path}:{key}[{i}]", *to_mnist_or_none(img), f"{path.stem}.{key}.{i}.28x28.png"))
        return items
    try:
        gray = read_image(path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's word for a broken PNG
        raise UserError(f"{path}: not an image PIL can read ({type(err).__name__})") from None
    return [(str(path), *to_mnist_or_none(gray), f"{path.stem}.28x28.png")]


def write_view(image, path):
    """The 28x28 image the network saw, as an 8-bit PNG (predict reads it back to the same answer)."""
    from PIL import Image

    if path.is_dir():  # never replaced: atomic_path would put the folder aside and delete it
        raise UserError(f"--explain: {path} is a folder; move it, or give --explain FOLDER")
    try:
        with atomic_path(path) as tmp:
            Image.fromarray(to_pixels(image[None])[0]).save(tmp, format="PNG")
    except OSError as err:
        raise UserError(f"--explain: cannot write {path} ({err.strerror or err}); "
                        f"give a folder you can write to: --explain FOLDER") from None
    return path


def view_paths(per_file, explain):
    """{(file, item name): where its --explain view goes}; a UserError if two inputs would write one view."""
    paths, seen = {}, {}
    for path, _, items in per_file:
        for name, image, _, view in items:
            if image is None:
                continue
            target = (Path(path).parent if explain is True else Path(explain)) / view
            if target in seen:
                raise UserError(f"--explain: {seen[target]} and {name} would both write {target}; "
                                f"rename one, or explain them in two calls")
            paths[(str(path), name)], seen[target] = target, name
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="PNG/JPEG images or .npz arrays")
    parser.add_argument("--model", type=Path, default=Path("models/cpu"),
                        help="a train output folder, holding classifier.keras and params.json")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--explain", nargs="?", const=True, metavar="FOLDER",
                        help="write the 28x28 image the network saw, as NAME.28x28.png, beside each input "
                             "(or in FOLDER)")
    args = parser.parse_args(argv)
    if isinstance(args.explain, str) and not Path(args.explain).is_dir():
        raise UserError(f"--explain {args.explain}: no such folder; create it, or give --explain alone "
                        f"to write beside each input")

    runtime = TrainedClassifier(args.model)  # checks the model's files before any image is read
    per_file = []  # in the order given: (file, error or None, read_inputs's items)
    for path in args.files:
        try:
            per_file.append((path, None, read_inputs(path)))
        except UserError as err:
            per_file.append((path, str(err), []))
        except Exception as err:  # noqa: BLE001  (a file of any kind must not take the others' answers)
            per_file.append((path, f"{path}: {reading_failure(err)}", []))
    views = view_paths(per_file, args.explain) if args.explain else {}
    inputs = [image for _, _, items in per_file for _, image, _, _ in items if image is not None]
    probs = iter([])
    if inputs:
        probs = iter(runtime.predict(to_pixels(np.stack(inputs))))
    results = []
    for path, error, items in per_file:
        if error:
            results.append({"file": str(path), "error": error})
        for name, image, no_digit, _ in items:
            if image is None:
                results.append({"file": name, "error": f"{name}: {no_digit}"})
                continue
            p = next(probs)
            results.append({"file": name, "digit": int(p.argmax()), "probability": round(float(p.max()), 6),
                            "probabilities": [round(float(v), 6) for v in p]})
            if args.explain:
                try:
                    results[-1]["seen"] = str(write_view(image, views[(str(path), name)]))
                except UserError as err:  # the answer stands; the view's failure is this file's error
                    results[-1]["explain_error"] = str(err)
    failed = [r for r in results if "error" in r or "explain_error" in r]
    if args.json:
        print(to_json(results, indent=2))
    else:
        for r in results:
            if "error" in r:
                print(f"error: {r['error']}", file=sys.stderr, flush=True)
            else:
                seen = f"  (saw {r['seen']})" if "seen" in r else ""
                print(f"{r['file']}: {r['digit']} ({r['probability']:.1%}){seen}", flush=True)
                if "explain_error" in r:
                    print(f"error: {r['explain_error']}", file=sys.stderr, flush=True)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    run(main)
