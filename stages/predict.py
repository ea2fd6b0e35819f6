"""predict: classify images of digits with a trained classifier (train's classifier.keras).

    python -m stages.predict digit.png photo.jpg more.npz [--model models/cpu] [--json]

Images (PNG, JPEG, any size) become 28x28 grayscale, white digit on black as
in MNIST: inverted when the background is light, and, unless already 28x28,
cropped to the digit, scaled to fit 20x20 and centred by its centre of mass
(MNIST's own recipe). An .npz gives every array in it of shape (28, 28) or
(N, 28, 28), pixels 0..255. Rounded to uint8 pixels, as MNIST's are, they go
to the classifier, which standardizes them exactly as in training (the
scaler is inside it). Transparency is composited onto the paper the ink is
not. A file that cannot be used (unreadable, over the limits below, pixels
outside 0..255) is a one-line error for that file, and a blank image is "no
digit found", not a guess; the others still get answers; the exit status is
1 if any failed.
Not a pipeline stage: a tool that uses what the pipeline made.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from stages.common import UserError, check_files, import_keras, read_json, run, to_json

SIDE, BOX = 28, 20  # MNIST: digits fitted into 20x20, centred in 28x28
# Limits on what one file may cost: the README lists them. A photo from a phone (12-48 megapixels)
# passes; a file that declares more is refused from its header, before it is decoded.
MAX_FILE_MB = 50  # 50 x 10^6 bytes
MAX_PIXELS = 50_000_000
MAX_IMAGES = 100_000  # per .npz file (MNIST's whole test set is 10,000)
WORK_SIDE = 1024      # larger images are first reduced to this long side: a digit needs no more
MIN_CONTRAST = 32     # grey levels between paper and ink, below which there is no digit to read


class NoDigit(UserError):
    """The input has no ink to read: an answer of its own, never a guess."""


def to_mnist(gray):
    """A 2-D grayscale array (0..255, any size) -> 28x28 float, white digit on black.

    Raises NoDigit when the image is blank (less contrast than MIN_CONTRAST).
    """
    from PIL import Image

    gray = np.asarray(gray, dtype=np.float64)
    if gray.size == 0 or np.ptp(gray) < MIN_CONTRAST:
        raise NoDigit("no digit found (the image is blank)")
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if np.median(border) > 127:  # dark digit on a light background
        gray = 255.0 - gray
    if gray.shape == (SIDE, SIDE):
        return gray
    ink = gray > 0.3 * gray.max()
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


def flatten_alpha(img):
    """A PIL image -> 2-D grayscale uint8, transparency composited onto the paper the ink is not.

    A digit drawn on a transparent background has its ink where the alpha is:
    dropping the alpha (PIL's convert("L")) would leave ink on ink. Composited
    onto white when the ink is dark, onto black when it is light.
    """
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return np.asarray(img.convert("L"))
    rgba = np.asarray(img.convert("RGBA"), dtype=np.float64)
    luminance = np.asarray(img.convert("RGBA").convert("L"), dtype=np.float64)
    alpha = rgba[..., 3] / 255.0
    opaque = alpha > 0.5
    ink_is_dark = not opaque.any() or np.median(luminance[opaque]) < 128
    paper = 255.0 if ink_is_dark else 0.0
    return np.rint(alpha * luminance + (1 - alpha) * paper).astype(np.uint8)


def read_image(path):
    """One image file -> 2-D grayscale uint8, its size checked before it is decoded."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # PIL's own guard warns, then raises, past it: ours below is one line
    with Image.open(path) as img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise UserError(f"{path}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}; "
                            f"scale it down first")
        img.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG: decode at a reduced scale where it can
        if max(img.size) > WORK_SIDE:
            img = img.copy()
            img.thumbnail((WORK_SIDE, WORK_SIDE))
        return flatten_alpha(img)


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
    """[(name, 28x28 array, or the NoDigit of that image)] from one file; a UserError if the file is unusable."""
    from PIL import UnidentifiedImageError

    from stages.common import npz_headers

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
                items.append((f"{path}:{key}[{i}]", *to_mnist_or_none(img)))
        return items
    try:
        gray = read_image(path)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:  # SyntaxError: PIL's word for a broken PNG
        raise UserError(f"{path}: not an image PIL can read ({type(err).__name__})") from None
    return [(str(path), *to_mnist_or_none(gray))]


def to_mnist_or_none(gray):
    """(image, None), or (None, the reason) for an image with no digit in it."""
    try:
        return to_mnist(gray), None
    except NoDigit as err:
        return None, str(err)


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

    check_files(args.model, ["classifier.keras", "params.json"])
    trained = read_json(args.model / "params.json")
    per_file = []  # in the order given: (file, error or None, [(name, image or None, no-digit reason)])
    for path in args.files:
        try:
            per_file.append((path, None, read_inputs(path)))
        except UserError as err:
            per_file.append((path, str(err), []))
        except Exception as err:  # noqa: BLE001  (a file of any kind must not take the others' answers)
            per_file.append((path, f"{path}: cannot be read ({type(err).__name__}: "
                                   f"{' '.join(str(err).split())[:200]})", []))
    inputs = [image for _, _, items in per_file for _, image, _ in items if image is not None]
    probs = iter([])
    if inputs:
        keras = import_keras(trained["base"]["backend"], device="cpu")
        try:
            model = keras.models.load_model(args.model / "classifier.keras")
        except ValueError as err:  # Keras's word for a missing or unreadable file
            raise UserError(f"cannot load {args.model / 'classifier.keras'} ({err}); run `dvc repro` to make it") \
                from None
        probs = iter(np.asarray(model.predict(to_pixels(np.stack(inputs)), verbose=0), dtype=np.float64))
    results = []
    for path, error, items in per_file:
        if error:
            results.append({"file": str(path), "error": error})
        for name, image, no_digit in items:
            if image is None:
                results.append({"file": name, "error": f"{name}: {no_digit}"})
                continue
            p = next(probs)
            results.append({"file": name, "digit": int(p.argmax()), "probability": round(float(p.max()), 6),
                            "probabilities": [round(float(v), 6) for v in p]})
    failed = [r for r in results if "error" in r]
    if args.json:
        print(to_json(results, indent=2))
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
