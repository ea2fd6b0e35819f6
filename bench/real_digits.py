"""Digits that are not MNIST's: how well predict reads them, per group of images.

    python -m bench.real_digits [--model models/cpu] [--model other/cpu ...] [--out bench/results/real_digits.json]
        [--examples data/examples]

Makes its images itself, the same ones every run (seeded), and puts each
through predict's whole path: encoded as a file (PNG, or JPEG for the
photos), read back, prepared (to_mnist), classified. The groups:

  photo: fonts      typed digits photographed on paper: a tint, uneven light,
                    a vignette, rotation, blur, camera noise, JPEG
  photo: pen        the same, with pen-drawn digits (pen_digit below)
  fonts             typed digits, clean, black on white, 12 fonts
  pen               pen-drawn digits, clean: ten stroke skeletons drawn with a
                    random slant, size, jitter and pen width
  UCI handwriting   scikit-learn's 1,797 handwritten digits (the UCI set, 43
                    writers, 8x8 at 17 grey levels), enlarged to 64x64, black
                    on white with a margin
  UCI handwriting, light on dark
                    the same digits white on black (MNIST's polarity), filling
                    the frame as they come: the ink touches it, and covers up
                    to half the picture
  MNIST as PNG      MNIST's test images written as PNG files (MNIST_NPZ, or
                    Keras's cache; else the committed sample): no regression

Prints a table per model (accuracy per group) and writes it to --out.
--examples writes a few photos, named by their digit, for the README.
Needs the fonts of Debian's fonts-dejavu-core and fonts-liberation.
"""

import argparse
import io
import json
import time
from pathlib import Path

import numpy as np
from mnist_cnn.inference import TrainedClassifier
from mnist_cnn.vision import read_image, to_mnist_or_none, to_pixels

ROOT = Path(__file__).resolve().parent.parent

FONT_DIR = Path("/usr/share/fonts/truetype")
FONTS = {  # 12 faces: sans, serif, mono; regular, bold, italic
    "DejaVu Sans": "dejavu/DejaVuSans.ttf", "DejaVu Sans Bold": "dejavu/DejaVuSans-Bold.ttf",
    "DejaVu Sans Oblique": "dejavu/DejaVuSansCondensed-Oblique.ttf", "DejaVu Serif": "dejavu/DejaVuSerif.ttf",
    "DejaVu Serif Bold": "dejavu/DejaVuSerif-Bold.ttf", "DejaVu Sans Mono": "dejavu/DejaVuSansMono.ttf",
    "Liberation Sans": "liberation/LiberationSans-Regular.ttf",
    "Liberation Sans Bold": "liberation/LiberationSans-Bold.ttf",
    "Liberation Serif": "liberation/LiberationSerif-Regular.ttf",
    "Liberation Serif Italic": "liberation/LiberationSerif-Italic.ttf",
    "Liberation Mono": "liberation/LiberationMono-Regular.ttf",
    "Liberation Sans Narrow": "liberation/LiberationSansNarrow-Regular.ttf",
}
MISSING_FONTS = [path for path in FONTS.values() if not (FONT_DIR / path).is_file()]
FONT_PACKAGES = "fonts-dejavu-core fonts-dejavu-extra fonts-liberation"  # Debian's, holding FONTS

# Each digit as pen strokes through points of a unit box (x right, y down), as a person writes it.
STROKES = {
    0: [[(.5, .05), (.22, .2), (.15, .5), (.25, .85), (.5, .95), (.75, .85), (.85, .5), (.78, .2), (.5, .05),
         (.42, .09)]],
    1: [[(.38, .2), (.55, .05), (.5, .95)]],
    2: [[(.2, .25), (.35, .08), (.6, .05), (.78, .2), (.72, .45), (.2, .92), (.85, .92)]],
    3: [[(.2, .12), (.5, .04), (.75, .15), (.72, .35), (.42, .47), (.75, .58), (.8, .8), (.55, .95), (.2, .88)]],
    4: [[(.6, .05), (.15, .65), (.85, .65)], [(.65, .3), (.63, .95)]],
    5: [[(.8, .06), (.32, .06), (.27, .45), (.55, .38), (.78, .55), (.75, .85), (.45, .95), (.2, .85)]],
    6: [[(.72, .05), (.4, .3), (.25, .65), (.35, .92), (.62, .93), (.75, .72), (.6, .52), (.35, .58), (.27, .7)]],
    7: [[(.15, .07), (.85, .07), (.6, .45), (.42, .95)]],
    8: [[(.72, .2), (.5, .05), (.27, .18), (.32, .38), (.68, .6), (.72, .85), (.5, .95), (.28, .85), (.32, .6),
         (.68, .38), (.72, .2)]],
    9: [[(.75, .3), (.5, .45), (.25, .3), (.35, .08), (.65, .07), (.75, .3), (.7, .6), (.62, .95)]],
}


def font_digit(digit, font, size=160):
    """A typed digit: ink 0..1 (white on black), cropped to the glyph."""
    from PIL import Image, ImageDraw, ImageFont

    face = ImageFont.truetype(str(FONT_DIR / FONTS[font]), size)
    img = Image.new("L", (2 * size, 2 * size), 0)
    ImageDraw.Draw(img).text((size // 2, size // 4), str(digit), fill=255, font=face)
    return crop(np.asarray(img, dtype=np.float64) / 255.0)


def smooth(points, per_segment=12):
    """A smooth curve through the points (Catmull-Rom), as a pen moves."""
    p = np.asarray(points, dtype=np.float64)
    p = np.vstack([p[:1], p, p[-1:]])
    t = np.linspace(0, 1, per_segment, endpoint=False)[:, None]
    out = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        out.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t ** 2
                          + (3 * p1 - p0 - 3 * p2 + p3) * t ** 3))
    return np.vstack(out + [p[-2:-1]])


def pen_digit(digit, rng, size=160):
    """A pen-drawn digit: the strokes with a random slant, width, jitter and pen; ink 0..1, cropped."""
    from PIL import Image, ImageDraw

    slant, squeeze = rng.uniform(-0.35, 0.2), rng.uniform(0.65, 1.15)
    pen = max(2, round(size * rng.uniform(0.06, 0.14)))
    img = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(img)
    for stroke in STROKES[digit]:
        points = np.asarray(stroke) + rng.normal(0, 0.025, (len(stroke), 2))
        curve = smooth(points)
        x = (curve[:, 0] - 0.5) * squeeze + slant * (0.5 - curve[:, 1])
        xy = np.stack([size + x * size, size // 2 + curve[:, 1] * size], axis=1)
        draw.line([tuple(v) for v in xy], fill=255, width=pen, joint="curve")
        for end in (xy[0], xy[-1]):
            draw.ellipse([end[0] - pen / 2, end[1] - pen / 2, end[0] + pen / 2, end[1] + pen / 2], fill=255)
    return crop(np.asarray(img, dtype=np.float64) / 255.0)


def crop(ink):
    rows, cols = np.flatnonzero(ink.max(axis=1) > 0.05), np.flatnonzero(ink.max(axis=0) > 0.05)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def on_white(ink, margin=0.25):
    """Ink 0..1 -> a clean grayscale scan: black digit on white paper with a margin."""
    pad = round(margin * max(ink.shape))
    return np.rint(255 * (1 - np.pad(ink, pad))).astype(np.uint8)


def photo(ink, rng):
    """Ink 0..1 -> an RGB 'photo' of it written on paper, uint8 (H, W, 3).

    Paper of a random tint and brightness under uneven light (a gradient in a
    random direction and a vignette), ink of a dark random colour, the digit
    rotated, placed off centre at 35-70 % of the frame's height, a few specks
    of dust, then blurred (focus) and noised (sensor), as a phone camera would give it.
    """
    from PIL import Image
    from scipy import ndimage

    height = int(rng.integers(240, 640))
    width = int(height * rng.uniform(0.75, 1.35))
    digit = Image.fromarray((ink * 255).astype(np.uint8)).rotate(rng.uniform(-12, 12), Image.BICUBIC, expand=True)
    scale = rng.uniform(0.35, 0.7) * height / digit.height
    digit = digit.resize((max(1, round(digit.width * scale)), max(1, round(digit.height * scale))), Image.LANCZOS)
    layer = np.zeros((height, width))
    top = int(np.clip((height - digit.height) / 2 + rng.uniform(-0.12, 0.12) * height, 0, height - digit.height))
    left = int(np.clip((width - digit.width) / 2 + rng.uniform(-0.12, 0.12) * width, 0, width - digit.width))
    layer[top:top + digit.height, left:left + digit.width] = np.asarray(digit) / 255.0
    for _ in range(int(rng.integers(0, 6))):  # specks of dust or pencil, away from the digit or on it
        y, x, r = rng.integers(0, height), rng.integers(0, width), rng.uniform(0.5, 2.5) * height / 400
        layer[max(0, int(y - r)):int(y + r) + 1, max(0, int(x - r)):int(x + r) + 1] = rng.uniform(0.3, 1.0)

    ys, xs = np.mgrid[0:height, 0:width]
    ys, xs = ys / height - 0.5, xs / width - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    light = (1 - rng.uniform(0, 0.45) * (0.5 + np.cos(angle) * xs + np.sin(angle) * ys)
             - rng.uniform(0, 0.35) * (xs ** 2 + ys ** 2))
    paper = rng.uniform(150, 245) * (1 + rng.uniform(-0.1, 0.1, 3))
    ink_colour = rng.uniform(10, 90) * (1 + rng.uniform(-0.3, 0.3, 3))
    opacity = rng.uniform(0.75, 1.0) * layer[..., None]
    rgb = light[..., None] * (paper * (1 - opacity) + ink_colour * opacity)
    rgb = ndimage.gaussian_filter(rgb, sigma=(rng.uniform(0.3, 2.0) * height / 400,) * 2 + (0,))
    rgb = rgb + rng.normal(0, rng.uniform(2, 10), rgb.shape)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def encoded(pixels, fmt, rng=None):
    """Image bytes as a file holds them: PNG, or JPEG at a random quality as a camera writes."""
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "JPEG":
        Image.fromarray(pixels).save(buf, "JPEG", quality=int(rng.integers(60, 92)))
    else:
        Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def uci_digits():
    """scikit-learn's UCI handwritten digits (0..16, 8x8) enlarged to 64x64, white on black as they come
    (the digit fills the frame), and their labels."""
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    return [np.asarray(Image.fromarray((img * 255 / 16).astype(np.uint8)).resize((64, 64), Image.BICUBIC))
            for img in data.images], data.target


def mnist_test():
    """MNIST's test images and labels: the full set if at hand, else the committed sample's."""
    import os

    for path in (os.environ.get("MNIST_NPZ"), Path.home() / ".keras/datasets/mnist.npz",
                 ROOT / "data/sample/mnist_sample.npz"):
        if path and Path(path).is_file():
            with np.load(path) as npz:
                return npz["x_test"], npz["y_test"], str(path)
    raise SystemExit("no MNIST test images found: set MNIST_NPZ")


def groups(seed=0, per_digit=20):
    """{group: [(file bytes, label)]}: every image as a file, the same each run."""
    rng = np.random.default_rng(seed)
    out = {"photo: fonts": [], "photo: pen": [], "fonts": [], "pen": []}
    fonts = list(FONTS)
    for digit in range(10):
        for i in range(per_digit):
            out["photo: fonts"].append((encoded(photo(font_digit(digit, fonts[i % len(fonts)]), rng), "JPEG", rng),
                                        digit))
            out["photo: pen"].append((encoded(photo(pen_digit(digit, rng), rng), "JPEG", rng), digit))
            out["pen"].append((encoded(on_white(pen_digit(digit, rng)), "PNG"), digit))
        for font in fonts:
            out["fonts"].append((encoded(on_white(font_digit(digit, font)), "PNG"), digit))
    digits, labels = uci_digits()
    out["UCI handwriting"] = [(encoded(np.pad(255 - d, 16, constant_values=255), "PNG"), int(y))  # on white
                              for d, y in zip(digits, labels, strict=True)]
    out["UCI handwriting, light on dark"] = [(encoded(d, "PNG"), int(y)) for d, y in zip(digits, labels, strict=True)]
    return out


def prepared(files):
    """Each file through predict's reading and preparation: (N, 28, 28) uint8, and how many had no digit."""

    images, none = [], 0
    for data, _ in files:
        image, no_digit = to_mnist_or_none(read_image(io.BytesIO(data)))
        none += image is None
        images.append(np.zeros((28, 28)) if image is None else image)
    return to_pixels(np.stack(images)), none


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, action="append", help="a train output folder (repeatable); "
                        "default models/cpu")
    parser.add_argument("--label", action="append", help="a column title per --model, in order (default: the folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/real_digits.json")
    parser.add_argument("--examples", type=Path, help="write a few example photos here")
    parser.add_argument("--per-digit", type=int, default=20, help="images per digit in the generated groups")
    args = parser.parse_args(argv)
    models = args.model or [ROOT / "models/cpu"]
    labels_given = args.label or [str(m) for m in models]
    if len(labels_given) != len(models):
        raise SystemExit("give one --label per --model, or none")
    if MISSING_FONTS:
        raise SystemExit(f"fonts missing: {', '.join(MISSING_FONTS)}; install them: apt-get install {FONT_PACKAGES}")

    from mnist_cnn.backend import cpu_model

    start = time.perf_counter()
    files = groups(per_digit=args.per_digit)
    x_test, y_test, source = mnist_test()
    files["MNIST as PNG"] = [(encoded(img, "PNG"), int(y)) for img, y in zip(x_test, y_test, strict=False)]
    if args.examples:
        args.examples.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(7)
        for digit, kind in [(3, "pen"), (7, "font"), (4, "pen"), (0, "font"), (9, "pen"), (2, "font")]:
            ink = pen_digit(digit, rng) if kind == "pen" else font_digit(digit, list(FONTS)[digit])
            (args.examples / f"photo_{digit}.jpg").write_bytes(encoded(photo(ink, rng), "JPEG", rng))
    inputs = {group: prepared(items) for group, items in files.items()}
    labels = {group: np.array([y for _, y in items]) for group, items in files.items()}
    print(f"{sum(map(len, files.values())):,} images made and prepared in {time.perf_counter() - start:.0f} s "
          f"(MNIST from {source})")

    results = {"mnist_source": source, "cpu": cpu_model(), "models": {}}
    for folder, label in zip(models, labels_given, strict=True):
        runtime = TrainedClassifier(folder)
        row = {}
        for group, (pixels, none) in inputs.items():
            answers = runtime.predict(pixels).argmax(axis=1)
            row[group] = {"images": len(pixels), "correct": int((answers == labels[group]).sum()),
                          "no_digit": none, "accuracy": round(float((answers == labels[group]).mean()), 4)}
        results["models"][label] = dict(row, folder=str(folder), runtime=runtime.name)
    write_table(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


def write_table(results):
    names = list(results["models"])
    print("| group | images | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    first = results["models"][names[0]]
    for group in [g for g in first if isinstance(first[g], dict)]:
        cells = [f"{results['models'][n][group]['accuracy']:.2%}" for n in names]
        print(f"| {group} | {first[group]['images']:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
