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
from mnist_cnn.vision import (MAX_FILE_MB, MAX_IMAGES, NoDigit, not_an_image, read_image, reading_failure,
                              to_mnist_or_none, to_pixels)


BATCH = 256  # images prepared and classified at a time: memory stays flat whatever the number of images


def npz_chunks(path, key):
    """One .npz array's images, BATCH at a time, read from the zip as a stream: never the whole array."""
    import zipfile

    with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        shape, fortran, dtype = {(1, 0): np.lib.format.read_array_header_1_0,
                                 (2, 0): np.lib.format.read_array_header_2_0}[version](member)
        if fortran and len(shape) == 3:
            raise UserError(f"{path}: array {key!r} is stored in Fortran order; save it C-ordered "
                            f"(np.ascontiguousarray) to classify it")
        stack = (1, *shape) if len(shape) == 2 else shape
        per_image = SIDE * SIDE * dtype.itemsize
        for start in range(0, stack[0], BATCH):
            n = min(BATCH, stack[0] - start)
            data = member.read(n * per_image)
            if len(data) != n * per_image:
                raise UserError(f"{path}: array {key!r} ends early; the file is damaged")
            order = "F" if fortran else "C"  # (a single 28x28 image; a Fortran-ordered stack is refused above)
            yield np.frombuffer(data, dtype=dtype).reshape((SIDE, SIDE) if len(shape) == 2 else (n, SIDE, SIDE),
                                                           order=order).reshape(n, SIDE, SIDE)


def check_stack(path, key, shape, dtype):
    """An .npz array's shape and type, from its header: (28, 28) or (N, 28, 28) numbers, else a UserError."""
    if len(shape) not in (2, 3) or shape[-2:] != (SIDE, SIDE):
        raise UserError(f"{path}: array {key!r} has shape {shape}; expected (28, 28) or (N, 28, 28)")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise UserError(f"{path}: array {key!r} is {dtype}; expected numbers (pixels 0..255)")
    if len(shape) == 3 and shape[0] == 0:
        raise UserError(f"{path}: array {key!r} holds no image (shape {shape})")


def check_pixels(path, key, chunk):
    """A UserError unless every pixel of the chunk is a number in 0..255."""
    if np.issubdtype(chunk.dtype, np.floating) and not np.isfinite(chunk).all():
        raise UserError(f"{path}: array {key!r} has NaN or infinite pixels; pixels must be 0..255")
    if chunk.min() < 0 or chunk.max() > 255:
        raise UserError(f"{path}: array {key!r} has pixels from {chunk.min()} to {chunk.max()}; "
                        f"they must be 0..255 (MNIST's scale)")


def open_input(path):
    """Check one file before any of its images is prepared: {"npz": {key: count}} or {"picture": None}, or a
    UserError. An .npz is checked whole (headers, then every pixel, a chunk at a time) so that a bad array
    fails its file before any answer from it is given."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    try:
        if not path.is_file():
            raise UserError(f"{path}: " + ("is a folder" if path.is_dir() else "is not a regular file"
                                           if path.exists() else "no such file"))
        size = path.stat().st_size
        if size == 0:
            raise UserError(f"{path}: empty file")
        if size > MAX_FILE_MB * 10**6:
            raise UserError(f"{path}: {size / 10**6:.0f} MB is over the limit of {MAX_FILE_MB} MB per file")
        if path.suffix.lower() != ".npz":
            with open(path, "rb"):  # unreadable: said as such, not as "not a picture"
                return {"picture": None}
        headers = npz_headers(path)
        if not headers:
            raise UserError(f"{path}: holds no array")
        counts = {}
        for key, (shape, dtype) in headers.items():
            check_stack(path, key, shape, dtype)
            counts[key] = 1 if len(shape) == 2 else shape[0]
        if sum(counts.values()) > MAX_IMAGES:
            raise UserError(f"{path}: {sum(counts.values()):,} images is over the limit of {MAX_IMAGES:,} per file")
        for key in counts:
            for chunk in npz_chunks(path, key):
                check_pixels(path, key, chunk)
        return {"npz": counts}
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable (chmod u+r)") from None
    except (OSError, ValueError, EOFError, UnidentifiedImageError) as err:
        raise UserError(f"{path}: not a readable .npz ({type(err).__name__})") from None


def items(path, kind):
    """(name, 28x28 array or None, why None, the name of its --explain view) for each image of one checked file,
    prepared one at a time. A UserError if a picture cannot be read."""
    from PIL import UnidentifiedImageError

    path = Path(path)
    if "npz" in kind:
        for key in kind["npz"]:
            i = 0
            for chunk in npz_chunks(path, key):
                for img in chunk:
                    yield (f"{path}:{key}[{i}]", *to_mnist_or_none(img), f"{path.stem}.{key}.{i}.28x28.png")
                    i += 1
        return
    try:
        gray = read_image(path)
    except NoDigit as err:
        yield str(path), None, str(err).removeprefix(f"{path}: "), f"{path.stem}.28x28.png"
        return
    except PermissionError:
        raise UserError(f"{path}: permission denied; make it readable (chmod u+r)") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's word for a broken PNG
        raise UserError(f"{path}: {not_an_image(err)}") from None
    yield (str(path), *to_mnist_or_none(gray), f"{path.stem}.28x28.png")


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


def view_paths(checked, explain):
    """{(file, item name): where its --explain view goes}, from the names alone (no image is read); a
    UserError if two inputs would write one view."""
    paths, seen = {}, {}
    for path, kind in checked:
        names = ([(f"{path}:{key}[{i}]", f"{path.stem}.{key}.{i}.28x28.png")
                  for key, count in kind["npz"].items() for i in range(count)] if "npz" in kind
                 else [(str(path), f"{path.stem}.28x28.png")])
        for name, view in names:
            target = (path.parent if explain is True else Path(explain)) / view
            if target in seen:
                raise UserError(f"--explain: {seen[target]} and {name} would both write {target}; "
                                f"rename one, or explain them in two calls")
            paths[(str(path), name)], seen[target] = target, name
    return paths


def batches(answerable):
    """Lists of up to BATCH items from an iterator."""
    batch, size = [], BATCH
    for item in answerable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


class Output:
    """Results as they come: a line each, or one JSON array written element by element (nothing is kept)."""

    def __init__(self, as_json):
        self.as_json, self.count, self.failed = as_json, 0, False

    def __enter__(self):
        if self.as_json:
            print("[", end="", flush=True)
        return self

    def __exit__(self, *exc):
        if self.as_json:
            print("\n]" if self.count else "]", flush=True)

    def add(self, result):
        self.failed |= "error" in result or "explain_error" in result
        if self.as_json:
            print(("," if self.count else "") + "\n" + to_json(result), end="", flush=True)
        elif "error" in result:
            print(f"error: {result['error']}", file=sys.stderr, flush=True)
        else:
            seen = f"  (saw {result['seen']})" if "seen" in result else ""
            print(f"{result['file']}: {result['digit']} ({result['probability']:.1%}){seen}", flush=True)
            if "explain_error" in result:
                print(f"error: {result['explain_error']}", file=sys.stderr, flush=True)
        self.count += 1


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
    checked, errors = [], {}  # every file checked before any answer: a bad one is its own error line
    for path in args.files:
        try:
            checked.append((path, open_input(path)))
        except UserError as err:
            errors[path] = str(err)
    views = view_paths(checked, args.explain) if args.explain else {}
    kinds = dict(checked)
    with Output(args.json) as out:
        for path in args.files:
            if path in errors:
                out.add({"file": str(path), "error": errors[path]})
                continue
            try:
                for batch in batches(items(path, kinds[path])):
                    answer(runtime, path, batch, views, args.explain, out)
            except UserError as err:
                out.add({"file": str(path), "error": str(err)})
            except Exception as err:  # noqa: BLE001  (a file of any kind must not take the others' answers)
                out.add({"file": str(path), "error": f"{path}: {reading_failure(err)}"})
    if out.failed:
        sys.exit(1)


def answer(runtime, path, batch, views, explain, out):
    """Classify one batch of prepared images and hand each result to `out`."""
    ready = [image for _, image, _, _ in batch if image is not None]
    probs = iter(runtime.predict(to_pixels(np.stack(ready))) if ready else [])
    for name, image, no_digit, _ in batch:
        if image is None:
            out.add({"file": name, "error": f"{name}: {no_digit}"})
            continue
        p = next(probs)
        result = {"file": name, "digit": int(p.argmax()), "probability": round(float(p.max()), 6),
                  "probabilities": [round(float(v), 6) for v in p]}
        if explain:
            try:
                result["seen"] = str(write_view(image, views[(str(path), name)]))
            except UserError as err:  # the answer stands; the view's failure is this file's error
                result["explain_error"] = str(err)
        out.add(result)


if __name__ == "__main__":
    run(main)
