"""A picture of a digit -> MNIST's form: 28x28, white on black, fitted into 20x20 and centred by mass.

A picture (PNG, JPEG, any size) is brought to MNIST's form as MNIST's own digits were: the paper's lighting
removed, the ink separated from it by a threshold chosen from the image, specks and far marks dropped, the
digit cropped, fitted into 20x20 and centred by mass in 28x28, white on black, its edges grey (to_mnist,
digit_ink). A 28x28 image is taken as already in that form. Transparency is composited onto the paper the
ink is not. predict and serve prepare every picture with these functions.
"""

import numpy as np

from mnist_cnn import SIDE
from mnist_cnn.errors import UserError


BOX = 20  # MNIST: digits fitted into BOX x BOX, centred by mass in SIDE x SIDE


# Limits on what one file may cost: the README lists them. A photo from a phone (12-48 megapixels)
# passes; a file that declares more is refused from its header, before it is decoded.
MAX_FILE_MB = 50  # 50 x 10^6 bytes


MAX_PIXELS = 50_000_000


MAX_IMAGES = 100_000  # per .npz file (MNIST's whole test set is 10,000)


# The formats a digit's photo, scan or drawing comes in; Pillow opens no other. Never PostScript, EPS or PDF,
# which Pillow hands to Ghostscript (a program run on the file, written to /tmp first), nor the rarer formats
# whose decoders are the least exercised.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


# A picture too small or too thin to hold a digit gets that answer, not the classifier's guess
MIN_SIDE = 8          # pixels, the short side
MAX_ASPECT = 8.0      # long side over short side (a "1" photographed alone is about 1:4)


WORK_SIDE = 1024      # larger images are first reduced to this long side: a digit needs no more


PREP_SIDE = 400       # the photo preparation works at this long side (a digit ends at 20 px)


MIN_CONTRAST = 32     # grey levels between paper and ink, below which there is no digit to read


MNIST_BORDER = 10     # a 28x28 image whose border is within this of black (or white) is in MNIST's form


# MNIST's strokes: 2 x area / perimeter of the ink above half strength, as a share of the digit's size (the
# long side of its box), is 0.14 for the median digit of its training set, 0.165 for the 75th percentile
STROKE, BOLD = 0.14, 0.165


MIN_SHARE = 0.1       # of the ink of the marks in the picture, the digit holds at least this (else: specks)


MAX_SOFTNESS = 0.3    # edges softer than this (edge_softness()) are shading, not ink


class NoDigit(UserError):
    """The input has no ink to read: an answer of its own, never a guess."""


def to_mnist(gray):
    """A 2-D grayscale array (0..255, any size) -> 28x28 float 0..255, white digit on black as in MNIST.

    A 28x28 image on black paper (or white: inverted) is taken to be in
    MNIST's form already; anything else is a photo or scan and goes through
    digit_ink() and fit_box(). A small digit in a large picture is found on
    the reduced picture, then read again at full size around where it is.
    Raises NoDigit when there is no ink to read.
    """
    gray = np.asarray(gray, dtype=np.float64)
    if gray.size == 0 or np.ptp(gray) < MIN_CONTRAST:
        raise NoDigit("no digit found (the image is blank)")
    if gray.shape == (SIDE, SIDE):
        border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
        mnist = 255.0 - gray if np.median(border) > 127 else gray
        if np.median(np.minimum(border, 255.0 - border)) <= MNIST_BORDER:  # black (or white) paper: MNIST's form
            return mnist
    crop, fringe, box, scale = digit_ink(gray)
    if scale < 1 and max(box[1] - box[0], box[3] - box[2]) < PREP_SIDE / 4:
        # a small digit in a large picture, found at PREP_SIDE: read it again at full size, around where it is
        top, bottom, left, right = (round(v / scale) for v in box)
        pad = max(bottom - top, right - left) // 2
        try:
            crop, fringe = digit_ink(gray[max(0, top - pad):bottom + pad, max(0, left - pad):right + pad])[:2]
        except NoDigit:
            pass  # what the whole picture showed stands
    return fit_box(crop, fringe)


def reduce(gray, side):
    """The image with its long side at most `side`, by area averaging (PIL's reducing resize)."""
    from PIL import Image

    scale = side / max(gray.shape)
    if scale >= 1:
        return gray
    size = (max(1, round(gray.shape[1] * scale)), max(1, round(gray.shape[0] * scale)))
    return np.asarray(Image.fromarray(gray.astype(np.float32)).resize(size, Image.BOX), dtype=np.float64)


def ink_is_dark(gray, rounds=6):
    """Whether the ink is darker than the paper: the far tail from the paper, its lighting taken out."""
    return paper_pixels(reduce(gray, 64), rounds)[0]


def paper_pixels(small, rounds=6):
    """(whether the ink is darker than the paper, which pixels of `small` are paper), in either polarity.

    The lighting is a quadratic surface fitted to the paper of the border
    ring (ring_paper()), then refitted to every pixel near the fit (within
    2.5 robust deviations, both sides: which side the ink is on is the
    question), so that a gradient across the page weighs nothing; the ink is
    the side with more mass beyond the noise (a digit may cover 0.1 % of a
    page: no percentile would reach it; a digit filling the frame, over half).
    """
    def near(residual, keep):  # both sides: which side the ink is on is the question
        return np.abs(residual) <= 2.5 * deviation(residual[keep]) + 1.0

    _, residual, keep = fit_lighting(small, ring_paper(small, rounds), near, rounds)
    spread = deviation(residual[keep])
    beyond = 3 * spread + 1.0  # noise reaches this far either way; ink, on its side, much further
    dark = np.maximum(0, -residual - beyond).sum() >= np.maximum(0, residual - beyond).sum()
    return dark, near(residual, keep).reshape(small.shape)


def ring_paper(small, rounds=6):
    """The pixels of `small`'s border ring that are paper: the half of the ring a quadratic surface fits best.

    A digit that touches the frame puts ink on a third of the ring or more,
    and a least-squares fit to the whole ring would bend to it (a vignette
    and ink along two sides look alike to it). So the fit is least trimmed
    squares: refitted to the half of the ring nearest it, from two starts
    (the ring's median: flat paper; the least-squares fit: a gradient), and
    of the two the one whose half fits closer wins: the paper, where it holds
    most of the ring.
    """
    ring = max(2, min(small.shape) // 10)
    border = np.ones(small.shape, bool)
    border[ring:-ring, ring:-ring] = False
    terms, values, border = quadratic_terms(small.shape).reshape(-1, 6), small.ravel(), border.ravel()

    def nearer_half(residual):
        distance = np.abs(residual)
        return border & (distance <= np.median(distance[border]))

    best = None
    for start in (np.median(values[border]), terms @ np.linalg.lstsq(terms[border], values[border], rcond=None)[0]):
        residual = values - start
        for _ in range(rounds):
            keep = nearer_half(residual)
            residual = values - terms @ np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        keep = nearer_half(residual)
        cost = (residual[keep] ** 2).sum()
        if best is None or cost < best[0]:
            best = cost, keep
    return best[1].reshape(small.shape)


def deviation(values):
    """A robust standard deviation: 1.4826 times the median absolute deviation."""
    return 1.4826 * np.median(np.abs(values - np.median(values)))


def fit_lighting(small, keep, next_keep, rounds):
    """A quadratic surface fitted by least squares to `small`'s pixels `keep`, then refitted `rounds` times
    to those `next_keep(residual, keep)` picks (while at least 12 remain).

    Returns (coefficients, the last fit's residuals, the pixels it was fitted to), all flat.
    """
    terms, values, keep = quadratic_terms(small.shape).reshape(-1, 6), small.ravel(), keep.ravel()
    for _ in range(rounds):
        coef = np.linalg.lstsq(terms[keep], values[keep], rcond=None)[0]
        residual, fitted = values - terms @ coef, keep
        keep = next_keep(residual, fitted)
        if keep.sum() < 2 * terms.shape[1]:
            break  # too few pixels to fit again: this fit stands
    return coef, residual, fitted


def quadratic_terms(shape):
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]]
    ys, xs = ys / shape[0] - 0.5, xs / shape[1] - 0.5
    return np.stack([np.ones_like(xs), xs, ys, xs * xs, xs * ys, ys * ys], axis=-1)


def paper(page, rounds=6):
    """The paper's brightness under the lighting, for a page whose ink is dark.

    The surface is a quadratic in x and y (a gradient, a vignette), fitted by
    least squares first to the pixels paper_pixels() finds to be paper, then
    to every pixel not far below the fit: ink lies only below the paper, so
    only that side is cut, and the paper's noise is measured on the side ink
    never reaches. Holds with ink on over half the page (a bold digit filling
    the frame) as long as the paper holds most of the border.
    """
    small = reduce(page, 64)

    def not_far_below(residual, keep):  # ink lies only below the paper: only that side is cut
        above = residual[keep & (residual > 0)]
        return residual > -2.5 * (1.4826 * np.median(above) if above.size else 0.0) - 1.0

    coef, _, _ = fit_lighting(small, paper_pixels(small, rounds)[1], not_far_below, rounds)
    return quadratic_terms(page.shape) @ coef


def digit_ink(gray):
    """A photo or scan -> (the digit's ink, 0 (paper) to 255 (the stroke's core), cropped to the digit and
    its fringe; the fringe's width in pixels; the digit's box (top, bottom, left, right) in the picture
    reduced to PREP_SIDE; that reduction's scale).

    Dark ink on light paper or light on dark (chalk on a board), either
    touching the frame or not; the paper's lighting is removed (paper()); a
    light blur takes the camera's noise; the threshold between paper and ink
    is Otsu's, never below 5 noise deviations; of the ink's connected
    pieces, the heaviest and those near it are the digit, specks and far
    marks are dropped (digit_pieces()). Then the digit is read again in a
    frame of its own, its box and a margin of a quarter of its size, paper
    beyond the picture's edge: how much paper surrounds it, and whether it
    touches the frame, changes nothing. Its size is that of its ink above
    the threshold; the grey fringe around it (the strokes' anti-aliased or
    blurred edges) is kept, not counted. Raises NoDigit when no ink stands
    out of the noise, when the only marks are specks scattered over the page
    (digit_pieces()), or when the edges are too soft for ink (shading, a spot
    of light: edge_softness()).
    """
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    scale = min(1.0, PREP_SIDE / max(gray.shape))
    gray = reduce(gray, PREP_SIDE)
    page = gray if ink_is_dark(gray) else 255.0 - gray
    surface = np.maximum(paper(page), 1.0)
    below = ndimage.gaussian_filter(surface - page, sigma=max(gray.shape) / PREP_SIDE)
    # the noise in grey levels, measured where no ink reaches (above the paper); the 1: a clean scan's quantization
    noise = 1.4826 * np.median(-below[below < 0]) + 1.0 if (below < 0).any() else 1.0
    # light multiplies paper and ink alike: ink is how much light it takes away, a share of the paper's; the
    # noise, the same in grey levels everywhere, is a larger share where the paper is darker
    relative = 255.0 / surface
    ink, noise = np.maximum(0.0, below) * relative, noise * relative
    if not (ink >= np.maximum(MIN_CONTRAST / 2, 10 * noise)).any():
        raise NoDigit("no digit found (no ink stands out of the paper)")
    kept, held = digit_pieces(ink, np.maximum(threshold_otsu(ink), 5 * noise))
    if held < MIN_SHARE:
        raise NoDigit("no digit found (only specks: no mark stands out of the others)")
    # read again in a frame of its own: the digit's box and a margin, the paper beyond the picture's edge
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    top, left, height, width = rows[0], cols[0], rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]
    margin = max(2, round(0.25 * max(height, width)))
    frame = np.s_[top:top + height + 2 * margin, left:left + width + 2 * margin]
    ink, first = np.pad(ink, margin)[frame], np.pad(kept, margin)[frame]
    threshold = np.maximum(threshold_otsu(ink), 5 * np.pad(noise, margin, mode="edge")[frame])
    pieces, n = ndimage.label(ink > threshold, structure=np.ones((3, 3)))
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(ink, pieces, index) * (ndimage.maximum(first, pieces, index) > 0)  # the digit's only
    kept = np.isin(pieces, index[mass >= 0.03 * mass.max()]) if mass.any() else first
    fringe = min(margin, max(1, round(2 * max(gray.shape) / PREP_SIDE)))  # the strokes' grey edges, kept
    digit = ndimage.binary_dilation(kept, iterations=fringe)
    level = np.percentile(ink[kept], 90)
    inside = np.pad(np.ones(gray.shape, bool), margin, constant_values=False)[frame]  # the window's, in the picture
    if edge_softness(ink, kept, level, inside) > MAX_SOFTNESS:
        raise NoDigit("no digit found (only shading: no ink stands out of the paper)")
    ink = np.pad(np.where(digit, np.clip(ink / level, 0, 1) * 255.0, 0.0), fringe)
    # the digit's size is its ink's above the threshold: the grey fringe around it is kept, not counted
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    crop = ink[rows[0]:rows[-1] + 1 + 2 * fringe, cols[0]:cols[-1] + 1 + 2 * fringe]
    top, left = top - margin, left - margin  # the window's corner in the picture
    return crop, fringe, (top + rows[0], top + rows[-1] + 1, left + cols[0], left + cols[-1] + 1), scale


def digit_pieces(ink, threshold):
    """(The digit's pixels of `ink` above `threshold`: its heaviest connected piece and those near it;
    their share of the ink of all the pieces the frame does not cut).

    A piece cut by the frame weighs less (a page's edge, a shadow: rarely the
    digit, though a digit filling the picture is cut too); specks (under 3 %
    of the heaviest's ink) and far marks are dropped. A digit holds nearly
    all the ink (a few specks of dust beside it); one speck among a page of
    them (salt-and-pepper noise) holds next to none.
    """
    from scipy import ndimage

    pieces, n = ndimage.label(ink > threshold, structure=np.ones((3, 3)))
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(ink, pieces, index)
    boxes = ndimage.find_objects(pieces)
    touches = np.array([b[0].start == 0 or b[1].start == 0 or b[0].stop == ink.shape[0] or b[1].stop == ink.shape[1]
                        for b in boxes])
    main = int(np.argmax(mass * np.where(touches, 0.3, 1.0)))  # a mark cut by the frame is rarely the digit
    (top, bottom), (left, right) = ((s.start, s.stop) for s in boxes[main])
    reach = 0.35 * max(bottom - top, right - left)
    keep = [i for i, b in enumerate(boxes)
            if mass[i] >= 0.03 * mass[main] and b[0].start < bottom + reach and b[0].stop > top - reach
            and b[1].start < right + reach and b[1].stop > left - reach]
    kept = np.isin(pieces, index[keep])
    return kept, mass[keep].sum() / (mass[~touches].sum() + mass[keep][touches[keep]].sum())


def edge_softness(ink, kept, level, inside):
    """How soft the digit's edges are: the ink's strength over its steepest slope (99th percentile), as a share
    of the digit's size (the long side of its box).

    A stroke's edge is a few pixels of blur: 0.05 for a sharp scan, 0.13 for
    an 8x8 scan enlarged, 0.2 for one blurred as much again; light or shade
    the paper's surface does not follow (a spot of light, a soft shadow)
    rises over a third of its size or more. The slope is taken after a blur of
    2 % of the size (noise has steep slopes too), away from the picture's
    edge (where the window's paper begins). NaN when too little of the digit
    is away from it to tell.
    """
    from scipy import ndimage

    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    size = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0])
    sigma = max(1.0, 0.02 * size)
    slope = np.hypot(*np.gradient(ndimage.gaussian_filter(ink, sigma, mode="nearest")))
    where = kept & ndimage.binary_erosion(inside, iterations=int(3 * sigma) + 1)
    return level / max(np.percentile(slope[where], 99), 1e-9) / size if where.any() else np.nan


def fit_box(crop, fringe=0):
    """A cropped digit (white on black) -> 28x28: fitted into 20x20 keeping its aspect, centred by mass.

    `fringe`: pixels of grey edge around the crop's digit, kept but not counted in its size. Strokes bolder
    than most of MNIST's are first thinned to MNIST's usual width (thin()).
    """
    from PIL import Image

    crop, fringe = thin(crop, fringe)
    scale = min(BOX / max(max(crop.shape) - 2 * fringe, 1), (SIDE - 2) / max(crop.shape))  # the fringe fits too
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


def stroke_width(crop, fringe=0):
    """The strokes' width as a share of the digit's size: 2 x area / perimeter of the ink above half strength."""
    from scipy import ndimage

    ink = crop > 127.5
    edge = ink & ~ndimage.binary_erosion(ink)
    return 2 * ink.sum() / max(edge.sum(), 1) / max(max(crop.shape) - 2 * fringe, 1)


def thin(crop, fringe=0):
    """(crop, fringe) with strokes bolder than BOLD thinned to STROKE, the width of MNIST's (else as given).

    A marker, a bold font, a low-resolution scan enlarged (its strokes spread
    over whole pixels): MNIST's network has seen few so bold. The ink is
    eroded (a grey erosion by a disk, its radius the width to take off each
    side), at 4 times the box's size.
    """
    from PIL import Image
    from scipy import ndimage

    width = stroke_width(crop, fringe)
    if width <= BOLD:
        return crop, fringe
    scale = 4 * BOX / max(max(crop.shape) - 2 * fringe, 1)
    size = (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale)))
    work = np.asarray(Image.fromarray(crop.astype(np.float32)).resize(size, Image.LANCZOS), dtype=np.float64)
    work = work.clip(0, 255)  # no ringing below the paper for the erosion to spread
    radius = (width - STROKE) * 4 * BOX / 2
    lower = int(radius)
    eroded = [ndimage.grey_erosion(work, footprint=disk(r)) for r in (lower, lower + 1)]
    return eroded[0] + (radius - lower) * (eroded[1] - eroded[0]), fringe * scale


def disk(radius):
    """A disk of whole-pixel radius, as a boolean footprint (radius 0: one pixel)."""
    ys, xs = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return ys * ys + xs * xs <= radius * radius


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


def read_image(source, name=None):
    """One image (a path or a binary file object) -> 2-D grayscale uint8, its size checked before it is decoded."""
    from PIL import Image, ImageOps

    name = source if name is None else name
    Image.MAX_IMAGE_PIXELS = None  # PIL's own guard warns, then raises, past it: ours below is one line
    with Image.open(source, formats=FORMATS) as img:
        width, height = img.size
        if width * height > MAX_PIXELS:
            raise UserError(f"{name}: {width}x{height} pixels is over the limit of {MAX_PIXELS:,}; "
                            f"scale it down first")
        if min(width, height) < MIN_SIDE:
            raise NoDigit(f"{name}: {width}x{height} pixels is too small to hold a digit (at least {MIN_SIDE} "
                          f"pixels a side)")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise NoDigit(f"{name}: {width}x{height} pixels is too thin to hold a digit (at most "
                          f"{MAX_ASPECT:g} to 1); crop the picture around the digit")
        img.draft("L", (WORK_SIDE, WORK_SIDE))  # JPEG: decode at a reduced scale where it can
        if max(img.size) > WORK_SIDE:
            img = img.copy()
            img.thumbnail((WORK_SIDE, WORK_SIDE))
        img = ImageOps.exif_transpose(img)  # a phone's portrait photo is stored sideways, with a tag to turn it
        if img.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
            return to_8_bits(np.asarray(img, dtype=np.float64))
        return flatten_alpha(img)


def declared_pixels(data):
    """The pixel count a picture's header declares (nothing is decoded), or None if it is not one of FORMATS."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as img:
            return img.size[0] * img.size[1]
    except Exception:  # noqa: BLE001  (any failure here is read_upload's to report, in one line)
        return None


def to_8_bits(values):
    """16-bit or 32-bit grey levels (PNG, TIFF) -> uint8 0..255: 0..65535 scaled, 0..1 floats stretched."""
    top = values.max(initial=0.0)
    scale = 255.0 / 65535.0 if top > 255 else 255.0 if top <= 1.0 else 1.0
    return np.clip(np.rint(np.nan_to_num(values) * scale), 0, 255).astype(np.uint8)


def reading_failure(err, detail=True):
    """Any exception reading or preparing one picture, as one line. detail=False (the page, whose client is
    anyone): its kind alone, never its text, which may hold paths, commands or a library's internals."""
    if isinstance(err, PermissionError):
        return "permission denied; make the file readable (chmod u+r)"
    if detail:
        return f"cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
    return f"cannot be read ({type(err).__name__}); {UNREADABLE}"


UNREADABLE = f"give a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} picture of a digit"


def not_an_image(err):
    """A file Pillow cannot open as one of FORMATS, in one line."""
    return f"not a picture this tool reads ({type(err).__name__}); {UNREADABLE}"


def to_mnist_or_none(gray):
    """(image, None), or (None, the reason) for an image with no digit in it."""
    try:
        return to_mnist(gray), None
    except NoDigit as err:
        return None, str(err)


def to_pixels(images):
    """(N, 28, 28) values 0..255 -> uint8, what the classifier takes (MNIST's own pixels are uint8)."""
    return np.clip(np.rint(images), 0, 255).astype(np.uint8)
