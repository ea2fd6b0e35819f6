"""The fit: optimizer and learning-rate schedule, augmentation, callbacks, the divergence guard, the checks
on what was trained, the ONNX export and the run's record. train and the benchmarks call the same functions.
"""

import math
import os
import sys
import time
import typing
import warnings

import numpy as np

from mnist_cnn import N_CLASSES
from mnist_cnn.backend import (backend_version, cpu_features, cpu_model, data_parallel, device_env, import_keras,
                               import_onnxruntime, onednn_enabled, resolve_precision, set_up_device)
from mnist_cnn.errors import UserError
from mnist_cnn.files import read_json
from mnist_cnn.model import check_pixels, initial_network, standardize_table
from mnist_cnn.params import SPARSE_LOSSES
from mnist_cnn.processes import start_job


class Diverged(UserError):
    """The loss or the weights ran away: the run is a failure, not a result."""


DIVERGENCE_FACTOR = 1000  # a loss this many times the initial weights' ends the run


REFERENCE_IMAGES = 1024   # the training images the initial and final weights' losses are compared on


PROGRESS = 1e-3           # the least share of that loss a run must take off to have trained at all


class DivergenceGuard:
    """Ends a fit as a failure, on every CPU alike, when it runs away.

    A loss that is NaN or infinite, or over DIVERGENCE_FACTOR times the
    initial weights' (reference_loss), at any report (Keras reports the
    epoch's running mean once per call: after steps_per_execution batches,
    by which time a runaway rate has already run away); weights that are
    NaN or infinite, checked at each epoch's end; and, at the end, a loss
    on the reference images that is not at least PROGRESS below the initial
    weights' (check_progress). Whether a runaway rate gives NaN or a huge
    finite loss depends on the CPU's kernels (an EPYC with AVX-512 kept the
    loss at 3.7e30 where others gave NaN) and on the backend (JAX and torch
    clip probabilities in cross-entropy: a saturated run stays near 16), so
    the guard waits for neither.
    """

    def __init__(self, keras, model, learning_rate, first_loss):
        self.keras, self.model, self.learning_rate = keras, model, learning_rate
        self.first_loss, self.epoch = first_loss, 0

    def fail(self, what, batch=None, at="at"):
        where = f"{at} epoch {self.epoch}" + (f", batch {batch}" if batch else "")
        raise Diverged(f"training diverged: {what} {where}; nothing was written. Lower "
                       f"train.learning_rate (now {self.learning_rate}), or try another train.lr_schedule, "
                       f"train.optimizer or train.momentum")

    def check_loss(self, loss, batch):
        if not math.isfinite(loss):
            self.fail(f"the loss is {loss}", batch)
        if loss > DIVERGENCE_FACTOR * max(self.first_loss, 1e-3):
            self.fail(f"the loss is {loss:.3g}, over {DIVERGENCE_FACTOR} times the initial weights' "
                      f"{self.first_loss:.3g},", batch)

    def check_weights(self):
        for weight in self.model.weights:
            if not np.isfinite(self.keras.ops.convert_to_numpy(weight.value)).all():
                self.fail(f"weight {weight.path} holds NaN or infinite values", at="at the end of")

    def callback(self):
        guard = self

        class Guard(self.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                guard.epoch = epoch + 1

            def on_train_batch_end(self, batch, logs=None):
                guard.check_loss(float((logs or {}).get("loss", 0.0)), batch + 1)

            def on_epoch_end(self, epoch, logs=None):
                guard.check_weights()

        return Guard()


def learning_rate_schedule(keras, train, steps_per_epoch):
    """A float, or a Keras schedule over optimizer steps (batches), from train.lr_*.

    exponential: lr * rate ** (epochs done), smoothly; step: the same, in whole
    steps of lr_decay_epochs; cosine: from lr down to 0 over all epochs.
    """
    decay_steps = max(1, round(train.lr_decay_epochs * steps_per_epoch))
    schedules = keras.optimizers.schedules
    if train.lr_schedule == "constant":
        return train.learning_rate
    if train.lr_schedule == "cosine":
        return schedules.CosineDecay(train.learning_rate, decay_steps=train.epochs * steps_per_epoch)
    return schedules.ExponentialDecay(train.learning_rate, decay_steps=decay_steps,
                                      decay_rate=train.lr_decay_rate, staircase=train.lr_schedule == "step")


def make_optimizer(keras, train, steps_per_epoch):
    lr = learning_rate_schedule(keras, train, steps_per_epoch)
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=lr, momentum=train.momentum)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=lr, momentum=train.momentum, nesterov=train.nesterov)
    return keras.optimizers.Adam(learning_rate=lr)


def live_callback(keras, live):
    """DVCLive's Keras callback; where TensorFlow is absent (JAX or PyTorch alone), the same on Keras.

    dvclive.keras subclasses tf.keras.callbacks.Callback, so it imports
    TensorFlow; the fallback logs the same names (train/loss, eval/loss, ...).
    """
    try:
        from dvclive.keras import DVCLiveCallback
        return DVCLiveCallback(live=live)
    except ImportError:
        from dvclive.utils import standardize_metric_name

        class LiveCallback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                for name, value in (logs or {}).items():
                    live.log_metric(standardize_metric_name(name, "dvclive.keras"), value)
                live.next_step()

            def on_train_end(self, logs=None):
                live.end()

        return LiveCallback()


def encode_labels(keras, y, loss):
    """Integer digits as the loss wants them: as they are, or one-hot."""
    return y if loss in SPARSE_LOSSES else keras.utils.to_categorical(y, N_CLASSES)


def fit_size(n_images, validation_split):
    """How many images are fitted on: Keras keeps the first floor(n x (1 - split)), validates on the rest."""
    return math.floor(n_images * (1.0 - validation_split)) if validation_split else n_images


def check_split(n_images, validation_split):
    """Refuse a validation_split that leaves no image on one side, as Keras splits (it would fail mid-way)."""
    if not validation_split:
        return
    n_fit = fit_size(n_images, validation_split)
    if n_fit == n_images:
        raise UserError(f"params.yaml: train.validation_split = {validation_split} holds out no image of "
                        f"{n_images}; use at least {1 / n_images:.2g}, or 0.0 for no validation")
    if n_fit == 0:
        raise UserError(f"params.yaml: train.validation_split = {validation_split} leaves no training image of "
                        f"{n_images}; use at most {1 - 1 / n_images:.6g}")


def check_replicas(n_images, train):
    """Refuse replicas that a last, partial batch would leave without an image.

    tf.distribute splits a batch of r images into ceil(r / replicas) per replica, so a short last batch may
    fill fewer replicas than there are; a replica given no image fails at its first convolution ("input depth
    must be evenly divisible by filter depth"), after every epoch but the last has run.
    """
    if train.replicas == 1:
        return
    n_fit = fit_size(n_images, train.validation_split)
    for what, n in (("training", n_fit), ("validation", n_images - n_fit)):
        last = n % train.batch_size
        per = math.ceil(last / train.replicas) if last else 0
        if last and math.ceil(last / per) < train.replicas:
            raise UserError(f"params.yaml: train.replicas = {train.replicas}: the last {what} batch holds {last} of "
                            f"{n:,} images (train.batch_size = {train.batch_size}), {per} a replica, which leaves "
                            f"{train.replicas - math.ceil(last / per)} replicas none (TensorFlow then fails); use "
                            f"fewer replicas, or a batch size that divides {n:,}")


def check_shares(n_images, train):
    """Refuse batches that several processes cannot share equally: each takes batch_size / processes images of
    every batch, the last, short ones included (JAX assembles a batch only from equal shares)."""
    count = train.processes
    if count == 1:
        return
    if train.batch_size % count:
        raise UserError(f"params.yaml: train.batch_size = {train.batch_size} does not split into "
                        f"train.processes = {count} equal shares; use a multiple of {count}")
    n_fit = fit_size(n_images, train.validation_split)
    for what, n in (("training", n_fit), ("validation", n_images - n_fit)):
        last = n % train.batch_size
        if last % count:
            raise UserError(f"params.yaml: the last {what} batch holds {last} of {n:,} images "
                            f"(train.batch_size = {train.batch_size}), which train.processes = {count} cannot "
                            f"share equally; use a batch size that leaves a multiple of {count}, or divides {n:,}")


def epoch_order(n, seed, epoch, shuffle):
    """The order of `n` training images in epoch `epoch` (from 0): a permutation drawn from (seed, epoch) alone,
    so every process of a run, and every rerun, draws the same one without talking to the others."""
    return np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)


def share(batch, rank, count):
    """Process `rank`'s part of a batch of rows: the rank-th of `count` equal consecutive slices (JAX puts the
    processes' parts together in rank order, so the batch is the one a single process would take)."""
    size = len(batch) // count
    return batch[rank * size:(rank + 1) * size]


def batches(keras, pixels, y, first, stop, batch_size, loss, *, seed, shuffle, rank=0, count=1):
    """A Keras PyDataset of images first..stop-1 of `pixels` and their digits, read batch by batch.

    `pixels` may be a memory-mapped file: a batch's rows are read sorted (the file forward), then put in the
    epoch's order, so memory holds a batch and the order, never the data. Labels are encoded per batch. With
    `count` processes, this one yields its share of each batch (`share`).

    Epoch e's batch k is `batch(e, k)`, the k-th slice of epoch_order(..., e). Keras reads the batches in order,
    batch 0 first (fit's shuffle=False), and the epoch is counted from the reads, not from Keras's epoch
    callbacks: its pipelines read ahead of the epoch they are in (tensorflow makes an epoch's iterator before it
    announces the epoch). A read of batch 0 begins a pass, and a pass that read every batch was an epoch: one
    that did not (tf.distribute reads three batches with an iterator it then drops) is read again as the same
    epoch. Every process of a job reads alike, so they count alike.
    """
    sparse = loss in SPARSE_LOSSES
    n = stop - first

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epochs_read, self.read_in_pass, self.epoch = 0, 0, 0
            self.order = first + epoch_order(n, seed, 0, shuffle)

        def __len__(self):
            return -(-n // batch_size)

        def __getitem__(self, k):
            if k == 0:
                if self.read_in_pass >= len(self):  # the last pass read every batch: it was an epoch
                    self.epochs_read += 1
                self.read_in_pass = 0
            self.read_in_pass += 1
            return self.batch(self.epochs_read, k)

        def batch(self, epoch, k):
            if epoch != self.epoch:
                self.epoch, self.order = epoch, first + epoch_order(n, seed, epoch, shuffle)
            rows = share(self.order[k * batch_size:(k + 1) * batch_size], rank, count)
            ascending = np.argsort(rows)
            images = np.empty((len(rows), *pixels.shape[1:]), pixels.dtype)
            images[ascending] = pixels[rows[ascending]]
            digits = np.asarray(y[rows])
            labels = digits.astype(np.int32) if sparse else encode_labels(keras, digits, loss).astype(np.float32)
            return images, labels

        def tensor_spec(self, tf):
            return (tf.TensorSpec((None, *pixels.shape[1:]), tf.as_dtype(pixels.dtype)),
                    tf.TensorSpec((None,) if sparse else (None, N_CLASSES), tf.int32 if sparse else tf.float32))

    return Batches()


def random_move(keras, augment, seed):
    """A layer that rotates, shifts and zooms each image by its own random amounts, in training only.

    The three moves compose into one affine map per image, so the image is
    resampled once (bilinear): Keras's RandomRotation, RandomTranslation and
    RandomZoom in a row resample it three times, which blurs MNIST's thin
    strokes thrice and takes over twice the time. Built on keras.ops (image.affine_transform, the op those
    layers use) and keras.random, so it runs in the graph on every backend.
    """
    ops = keras.ops

    class RandomMove(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.seed_generator = keras.random.SeedGenerator(seed)

        def call(self, images, training=False):
            if not training:
                return images
            n, height, width = ops.shape(images)[0], images.shape[1], images.shape[2]

            def uniform(limit):
                return keras.random.uniform((n,), -limit, limit, seed=self.seed_generator)

            angle = uniform(math.radians(augment.rotation))
            scale = 1.0 + uniform(augment.zoom)  # above 1 reads a wider area: the digit shrinks
            tx, ty = uniform(augment.shift) * width, uniform(augment.shift) * height
            cos, sin = ops.cos(angle) * scale, ops.sin(angle) * scale
            cx, cy = (width - 1) / 2, (height - 1) / 2
            # output pixel (x, y) reads the input at R(angle) * scale * (x - cx - tx, y - cy - ty) + (cx, cy)
            zero = ops.zeros_like(angle)
            transform = ops.stack([cos, -sin, cx - cos * (cx + tx) + sin * (cy + ty),
                                   sin, cos, cy - sin * (cx + tx) - cos * (cy + ty), zero, zero], axis=1)
            return ops.image.affine_transform(images, transform, interpolation="bilinear", fill_mode="constant",
                                              fill_value=0, data_format="channels_last")

    return RandomMove(name="random_move")


def augmented(keras, classifier, augment, seed):
    """`classifier` behind random shifts, rotations and zooms of its uint8 pixels, in training only.

    A layer in the graph (random_move): at inference (evaluate, predict,
    validation) it passes images through unchanged, and train saves
    `classifier` alone. It moves the pixels before the standardization, so
    the new border is black paper (0), as MNIST's is; the interpolated values
    stay in 0..255, which the standardizer's table reads (it drops fractions).
    Returns `classifier` itself when every augment key is 0.
    """
    if not any(augment.model_dump().values()):
        return classifier
    L = keras.layers
    side = classifier.input_shape[1:]
    pixels = keras.Input(shape=side, dtype="uint8", name="pixels")
    moved = keras.Sequential([L.Reshape((*side, 1)), random_move(keras, augment, seed), L.Reshape(side)],
                             name="augment")(L.Rescaling(1.0, dtype="float32")(pixels))
    return keras.Model(pixels, classifier(moved), name="augmented")


def reference_loss(keras, model, pixels, y, loss_name):
    """The model's loss, as training reports it (penalties included), on the first REFERENCE_IMAGES images."""
    n, total = min(REFERENCE_IMAGES, len(y)), 0.0
    loss = keras.losses.get(loss_name)
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        probabilities = model(keras.ops.convert_to_tensor(np.asarray(pixels[start:stop])), training=False)
        labels = encode_labels(keras, np.asarray(y[start:stop]), loss_name)
        per_image = loss(keras.ops.convert_to_tensor(labels), probabilities)
        total += float(keras.ops.convert_to_numpy(keras.ops.sum(per_image)))
    penalties = sum(float(keras.ops.convert_to_numpy(term)) for term in model.losses)
    return total / n + penalties


def check_progress(before, after, learning_rate):
    """A run whose loss on the reference images fell by less than PROGRESS of the initial weights' trained
    nothing (a rate too small to move the weights, or a run that saturated): a failure, not a result."""
    if not after < before * (1 - PROGRESS):
        raise Diverged(f"training made no progress: the loss on the first {REFERENCE_IMAGES} training images is "
                       f"{after:.4g} after it, {before:.4g} before; nothing was written. Check "
                       f"train.learning_rate (now {learning_rate}), train.epochs and train.optimizer")


class Setup(typing.NamedTuple):
    """What set_up() made ready: Keras on its backend and device, and how the run will compute."""

    keras: typing.Any
    device_name: str        # as the framework names the device
    precision: str          # train.precision, `auto` resolved for this hardware
    features: list          # the CPU's notable units (cpu_features)
    in_parallel: typing.Callable  # a context: the model is built and fitted inside it
    replica_devices: list   # the devices data parallelism splits each batch over ([] for one)


def set_up(base, train, device, job=None):
    """Everything a fit needs before the data, in the order it must happen: the backend's environment,
    the job of several processes (`job`: mnist_cnn.processes), Keras's import, the device's settings, data
    parallelism, the seed. train and bench call it alike."""
    features = cpu_features()
    precision = resolve_precision(train.precision, device, features)
    os.environ.update(device_env(base.backend, device, train.gpu, train.cpu, train.replicas))
    if job is not None:
        start_job(job)
    keras = import_keras(base.backend, device=device)
    device_name = set_up_device(base.backend, device, train.cpu, train.gpu, train.replicas)
    in_parallel, replica_devices = data_parallel(keras, base.backend, device, train.replicas, job is not None)
    keras.utils.set_random_seed(base.seed)
    return Setup(keras, device_name, precision, features, in_parallel, replica_devices)


def load_training_data(data, init, setup):
    """(uint8 training images, memory-mapped, digits, scaler record, its standardization table, the initial
    network), each checked against what its stage wrote; the network is built inside the data-parallel scope,
    where its variables must live."""
    try:
        pixels = np.load(data / "pixels_train.npy", mmap_mode="r")
        y = np.load(data / "y_train.npy", mmap_mode="r")
        scaler = read_json(data / "scaler.json")
        table = standardize_table(scaler)
        check_pixels(pixels, np.load(data / "x_train.npy", mmap_mode="r"), table)
        with setup.in_parallel():
            network = initial_network(setup.keras, init, setup.precision)
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    return pixels, y, scaler, table, network


def compile_model(keras, model, train, n_images):
    """Compile `model` with train's optimizer, schedule, loss and accuracy metric, for `n_images` images."""
    accuracy = (keras.metrics.SparseCategoricalAccuracy if train.loss in SPARSE_LOSSES
                else keras.metrics.CategoricalAccuracy)(name="accuracy")
    steps_per_epoch = -(-fit_size(n_images, train.validation_split) // train.batch_size)
    model.compile(optimizer=make_optimizer(keras, train, steps_per_epoch), loss=train.loss, metrics=[accuracy],
                  steps_per_execution=train.steps_per_execution)


class Fitted(typing.NamedTuple):
    history: dict       # Keras's per-epoch logs: {"loss": [...], "accuracy": [...], ...}
    epoch_s: list       # seconds per epoch
    fit_s: float        # wall time of the whole fit
    fit_cpu_s: float    # CPU time of all the process's threads: a busy or throttled host does not inflate it


def live_copy_callback(keras, live, folder):
    """After DVCLive has logged an epoch: its per-epoch files copied to `folder`, in place (files.copy_in_place),
    where `dvc plots show` and DVC's VS Code extension follow a running train; the log itself is written in the
    stage's temporary folder, renamed into place only at the end."""
    from mnist_cnn.files import copy_in_place

    class LiveCopy(keras.callbacks.Callback):
        failed = False

        def on_epoch_end(self, epoch, logs=None):
            if self.failed:
                return
            try:
                copy_in_place(live.dir, folder)
            except OSError as err:  # not an output: the run goes on without it, and says so once
                self.failed = True
                print(f"warning: cannot copy the curves so far to {folder} ({err.strerror or err}); training "
                      f"goes on, its record in the stage's outputs as usual", file=sys.stderr)

    return LiveCopy()


def fit(keras, model, pixels, y, train, live, seed, rank=0, after_epoch=(), live_copy=None):
    """Compile and fit on `pixels` (memory-mapped or not) read batch by batch, logging each epoch to `live`
    (None: no log, as in every process of a run but the first); a run that diverges or learns nothing raises
    Diverged. Every process of a multi-process run calls it alike: its collectives run in the same order.
    `after_epoch`: more Keras callbacks (a benchmark's), run after the epoch's time is taken. `live_copy`: a
    folder where the log's curves are copied after each epoch (live_copy_callback)."""
    compile_model(keras, model, train, len(pixels))
    n_fit = fit_size(len(pixels), train.validation_split)
    feed = dict(batch_size=train.batch_size, loss=train.loss, seed=seed, rank=rank, count=train.processes)
    data = batches(keras, pixels, y, 0, n_fit, shuffle=train.shuffle, **feed)
    # Keras's validation_split, with the same split: the last images are held out, in their order
    validation = batches(keras, pixels, y, n_fit, len(pixels), shuffle=False, **feed) if n_fit < len(pixels) else None

    epoch_s = []

    class EpochLog(keras.callbacks.Callback):
        """Adds epoch time and the learning rate in force at the epoch's end to the logs."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.start)
            logs["epoch_time_s"] = epoch_s[-1]
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    before = reference_loss(keras, model, pixels, y, train.loss)
    guard = DivergenceGuard(keras, model, train.learning_rate, before)
    callbacks = [guard.callback(), EpochLog(), *after_epoch]
    if live is not None:
        live.step = 1  # DVCLive counts from 0; the log's steps are epochs, counted from 1 as people do
        callbacks.append(live_callback(keras, live))
        if live_copy is not None:
            callbacks.append(live_copy_callback(keras, live, live_copy))  # after DVCLive's: its files are written
    start, cpu_start = time.perf_counter(), time.process_time()
    # shuffle=False: the batches' order is the feed's own (epoch_order); Keras would shuffle their order again
    history = model.fit(data, epochs=train.epochs, verbose=progress_verbosity(sys.stdout) if rank == 0 else 0,
                        validation_data=validation, callbacks=callbacks, shuffle=False)
    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    check_progress(before, reference_loss(keras, model, pixels, y, train.loss), train.learning_rate)
    return Fitted(history.history, epoch_s, fit_s, fit_cpu_s)


def local_copy(keras, network):
    """`network` built again outside any distribution, with its weights: a multi-process run's variables span
    every process's devices, so a computation on them needs all the processes; on this copy, this one alone."""
    copy = keras.models.clone_model(network)
    copy.set_weights(network.get_weights())
    return copy


CHECK_IMAGES = 256  # training images on which the saved classifier is checked against what was trained


# How far the float32 classifier saved from a mixed_bfloat16 run may answer from the network as trained
# (bfloat16 products: 8 bits of mantissa): the largest difference in any probability, and the share of
# the check images read as another digit. Measured on the seed's CNN: see tests/test_train.py.
BFLOAT16_TOLERANCE = {"max_probability_difference": 0.1, "other_digit_share": 0.02}


def check_float32(keras, trained, float32, pixels):
    """Compare the float32 classifier's answers with the mixed-precision one's as trained; refuse past
    BFLOAT16_TOLERANCE. Returns the measured differences, for the run's details."""
    expected = keras.ops.convert_to_numpy(trained(pixels, training=False)).astype(np.float64)
    got = keras.ops.convert_to_numpy(float32(pixels, training=False)).astype(np.float64)
    check_predictions(got, "the float32 classifier")
    measured = {"images": len(pixels),
                "max_probability_difference": round(float(np.abs(got - expected).max()), 6),
                "other_digit_share": round(float(np.mean(got.argmax(1) != expected.argmax(1))), 6)}
    if any(measured[key] > limit for key, limit in BFLOAT16_TOLERANCE.items()):
        raise UserError(f"the float32 classifier answers too far from the bfloat16 network as trained "
                        f"({measured}; allowed {BFLOAT16_TOLERANCE}); nothing was written. "
                        f"Set train.precision: float32")
    return measured


def check_predictions(probabilities, what):
    """Refuse probabilities that are NaN or infinite: weights that ran away, whatever the loss showed."""
    if not np.isfinite(probabilities).all():
        raise Diverged(f"training diverged: {what} gives NaN or infinite probabilities; nothing was written. "
                       f"Lower train.learning_rate, or try another train.lr_schedule, train.optimizer or "
                       f"train.momentum")


ONNX_TOLERANCE = 1e-5  # the largest difference in any probability that classifier.onnx may show from Keras


def export_onnx(keras, classifier, path, pixels):
    """Write `classifier` as ONNX to `path`, for evaluate's and predict's fast start; refuse it unless it agrees
    with Keras.

    Returns None when done, or the reason it could not be made on this backend
    (Keras's exporter on jax and torch needs packages the core install lacks):
    evaluate and predict then load classifier.keras, and say so.
    """
    expected = keras.ops.convert_to_numpy(classifier(pixels, training=False))  # also: the exporter wants a call
    check_predictions(expected, "the trained classifier")
    try:
        with warnings.catch_warnings():  # Keras's tf2onnx shim trips NumPy 2's FutureWarning on np.object
            warnings.simplefilter("ignore", FutureWarning)
            classifier.export(str(path), format="onnx", verbose=False)
    except ImportError as err:
        if keras.backend.backend() == "tensorflow":
            raise UserError(f"cannot export classifier.onnx ({err}); install the pins: "
                            f"`pip install -r requirements.txt`") from None
        return f"Keras's ONNX export on {keras.backend.backend()} needs {err.name or err}"
    session = import_onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    worst = float(np.abs(got - expected).max())
    if not worst <= ONNX_TOLERANCE:
        raise UserError(f"classifier.onnx gives probabilities up to {worst:.2g} away from Keras's "
                        f"(allowed {ONNX_TOLERANCE}); nothing was written. Report it with `pip freeze`")
    return None


def progress_verbosity(stream):
    """Keras's verbose: a progress bar within each epoch on a terminal, one line per epoch in a log."""
    return 1 if stream.isatty() else 2


def run_record(*, device, setup, placement, backend, train, fitted, n_fit):
    """Everything this run recorded, for the report: the device, versions, timings, final metrics."""
    history, fit_s, fit_cpu_s = fitted.history, fitted.fit_s, fitted.fit_cpu_s
    details = {
        "device": device, "device_name": setup.device_name, "placement": placement, "cpu_model": cpu_model(),
        "cpu_features": setup.features, "onednn": onednn_enabled(backend), "precision": setup.precision,
        "backend": backend, "backend_version": backend_version(backend),
        "keras_version": setup.keras.__version__,
        "replicas": train.replicas,
        "train_images": n_fit, "epochs": train.epochs, "batch_size": train.batch_size,
        "fit_time_s": round(fit_s, 3), "time_per_epoch_s": round(fit_s / train.epochs, 3),
        "first_epoch_s": round(fitted.epoch_s[0], 3),
        "fit_cpu_s": round(fit_cpu_s, 3), "cores_busy": round(fit_cpu_s / fit_s, 2),
        "samples_per_s": round(n_fit * train.epochs / fit_s, 1),
        "final_loss": float(history["loss"][-1]), "final_accuracy": float(history["accuracy"][-1]),
    }
    if train.validation_split:
        details["final_val_loss"] = float(history["val_loss"][-1])
        details["final_val_accuracy"] = float(history["val_accuracy"][-1])
    return details
