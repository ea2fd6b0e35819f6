"""train: fit the CNN from the shared initial weights, on one device.

    python -m stages.train --device cpu --data data/processed --init models/init --out models/cpu \
        --metrics metrics/train_cpu.json --details details/train_cpu.json --live dvclive/train_cpu

dvc.yaml runs it once per entry of train.devices (stages train@cpu, train@gpu).
--device gpu fails unless the backend sees a GPU, and after training the
weights' actual placement is checked, so a run is never labeled GPU that ran
on a CPU (stages/devices.py). Fits the classifier of stages/classifier.py
(uint8 pixels in, the standardization inside), behind random moves of its
images when train.augment asks for them, and writes, in --out:
classifier.keras (that classifier, to load and use anywhere),
classifier.onnx (the same for ONNX Runtime, predict's fast start; checked
against Keras to 1e-5), model.keras (the network alone, standardized images
in, as evaluate reads it) and params.json (the params it was trained with). --metrics gets the fit time (what
`dvc metrics show` shows), --details the device, timings and final metrics,
and DVCLive one line per epoch, counted from 1, of loss, accuracy (and their
validation twins when train.validation_split > 0), learning rate and epoch time.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from stages.classifier import check_pixels, classifier, standardize_table
from stages.common import (PARAMS_FILE, BaseParams, Strict, UserError, atomic_path, import_keras, import_onnxruntime,
                           check_files, load_params, read_json, run, to_json,
                           write_json, write_manifest)
from stages.devices import (cpu_features, cpu_model, device_env, has_bfloat16_units, on_gpu, onednn_enabled,
                            placement, set_up_device, thread_env)

SPARSE_LOSSES = ("sparse_categorical_crossentropy",)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # 1.1754944e-38
ONE_HOT_LOSSES = ("categorical_crossentropy", "binary_crossentropy", "mean_squared_error")


class CpuParams(Strict):
    intra_op_threads: Annotated[int, Field(ge=0, le=1024)]
    inter_op_threads: Annotated[int, Field(ge=0, le=1024)]
    onednn: bool | None  # TensorFlow's oneDNN kernels on or off; null: TensorFlow's choice for this CPU


class GpuParams(Strict):
    memory_growth: bool
    memory_limit_mb: PositiveInt | None


class AugmentParams(Strict):
    rotation: Annotated[float, Field(ge=0.0, le=180.0)]  # degrees, either way
    shift: Annotated[float, Field(ge=0.0, le=0.5)]       # a share of the side, each axis, either way
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)]        # a share of the size, in or out


class TrainParams(Strict):
    devices: Annotated[list[Literal["cpu", "gpu"]], Field(min_length=1)]
    epochs: Annotated[int, Field(gt=0, le=10_000)]
    batch_size: Annotated[int, Field(gt=0, le=60_000)]
    steps_per_execution: Annotated[int, Field(gt=0, le=10_000)]
    replicas: Annotated[int, Field(ge=1, le=64)]  # data parallelism over this many devices of the host
    optimizer: Literal["rmsprop", "sgd", "adam"]
    learning_rate: PositiveFloat
    lr_schedule: Literal["constant", "exponential", "step", "cosine"]
    lr_decay_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    lr_decay_epochs: Annotated[float, Field(gt=0.0, le=10_000)]
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    nesterov: bool
    loss: Literal[SPARSE_LOSSES + ONE_HOT_LOSSES]
    shuffle: bool
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)]
    precision: Literal["float32", "mixed_bfloat16", "auto"]
    augment: AugmentParams
    cpu: CpuParams
    gpu: GpuParams

    @model_validator(mode="after")
    def _together(self):
        """The rules between keys of this section: every stage that reads `train` sees them."""
        if self.learning_rate < FLOAT32_TINY:
            # the optimizers keep the rate in float32: below its smallest normal number it is flushed to
            # zero or loses its digits, and a run would train nothing and call it a result
            raise UserError(f"params.yaml: train.learning_rate = {self.learning_rate:g} is below float32's "
                            f"smallest normal number ({FLOAT32_TINY:g}), at which nothing trains; use at "
                            f"least 1e-7 (the seed's is 0.001)")
        if len(set(self.devices)) != len(self.devices):
            raise UserError(f"params.yaml: train.devices = {self.devices}: list each device once")
        if self.optimizer == "adam" and self.momentum:
            raise UserError("params.yaml: train.momentum applies to rmsprop and sgd; set it to 0.0 for adam")
        if self.nesterov and not (self.optimizer == "sgd" and self.momentum):
            raise UserError("params.yaml: train.nesterov applies to sgd with momentum > 0; set it to false")
        return self


def check_train(train, backend):
    """Refuse what the train section cannot do on base.backend, naming the key (train and report call it)."""
    if backend == "jax" and (train.cpu.intra_op_threads or train.cpu.inter_op_threads):
        raise UserError("params.yaml: train.cpu.*_threads are applied on tensorflow and torch only; "
                        "set them to 0 for jax")
    if backend == "torch" and train.steps_per_execution != 1:
        raise UserError(f"params.yaml: train.steps_per_execution = {train.steps_per_execution}: Keras on torch runs "
                        f"one step per call; set it to 1 for torch")
    if backend == "torch" and train.replicas > 1:
        raise UserError(f"params.yaml: train.replicas = {train.replicas}: data parallelism runs on tensorflow "
                        f"(MirroredStrategy) and jax (keras.distribution.DataParallel); set it to 1 for torch")
    if backend == "tensorflow" and train.replicas > 1 and train.steps_per_execution != 1:
        # Keras 3.15's multi-step loop under tf.distribute fails at its first call ("You must feed a value
        # for placeholder tensor"): refused here rather than mid-run
        raise UserError(f"params.yaml: train.steps_per_execution = {train.steps_per_execution} with "
                        f"train.replicas = {train.replicas}: Keras on tensorflow runs data parallelism one step "
                        f"per call; set train.steps_per_execution to 1")
    if train.batch_size % train.replicas:
        raise UserError(f"params.yaml: train.batch_size = {train.batch_size} does not split evenly over "
                        f"train.replicas = {train.replicas}; use a multiple of {train.replicas}")
    if backend == "jax" and train.gpu.memory_limit_mb:
        raise UserError("params.yaml: train.gpu.memory_limit_mb is applied on tensorflow and torch only; "
                        "set it to null for jax")


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


def resolve_precision(precision, device, features):
    """The precision a run computes in: train.precision, with `auto` decided by the hardware.

    auto is mixed_bfloat16 on a GPU and on a CPU with bfloat16 units (AVX512-BF16
    or AMX), float32 on other CPUs, where oneDNN emulates bfloat16 and a step
    is many times slower than in float32. The run records what it resolved to.
    """
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if device == "gpu" or has_bfloat16_units(features) else "float32"


def with_precision(model_json, precision):
    """The architecture with every layer but the input and output computing in `precision`.

    mixed_bfloat16 keeps the weights in float32 and computes in bfloat16: faster on
    CPUs with AVX512-BF16 and on GPUs, less exact. The output layer stays float32 so
    that the softmax and the loss keep their precision.
    """
    if precision == "float32":
        return model_json
    config = json.loads(model_json)
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": precision}, "registered_name": None}
    for layer in config["config"]["layers"]:
        if layer["class_name"] != "InputLayer" and layer["config"]["name"] != "output":
            layer["config"]["dtype"] = policy
    return json.dumps(config)


def initial_network(keras, init, precision):
    """The network build_init_weights saved in `init`, with its initial weights, computing in `precision`."""
    model = keras.models.model_from_json(with_precision((init / "model.json").read_text(), precision))
    model.load_weights(init / "initial.weights.h5")
    return model


def data_parallel(keras, backend, device, replicas):
    """(scope, device names): within `with scope():`, a model is built and fitted on `replicas` devices at once.

    Data parallelism with the frameworks' own engines, at the same global batch:
    each device takes batch_size / replicas images of every batch and the
    gradients are summed across them before the one update, so the result is
    single-device training's up to the order of the sums (tests/test_train.py
    measures how close). tensorflow: tf.distribute.MirroredStrategy; jax: the
    Keras distribution API (keras.distribution.DataParallel). Batch
    normalization's statistics are then per device, as those engines do.
    """
    if replicas == 1:
        return contextlib.nullcontext, []
    if backend == "tensorflow":
        import tensorflow as tf
        names = [d.name for d in tf.config.list_logical_devices(device.upper())][:replicas]
        return tf.distribute.MirroredStrategy(devices=names).scope, names
    devices = keras.distribution.list_devices(device)[:replicas]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return contextlib.nullcontext, [str(d) for d in devices]


def learning_rate(keras, train, steps_per_epoch):
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
    lr = learning_rate(keras, train, steps_per_epoch)
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
    return y if loss in SPARSE_LOSSES else keras.utils.to_categorical(y, 10)


def fit_size(n_images, validation_split):
    """How many images are fitted on: Keras keeps the first floor(n x (1 - split)), validates on the rest."""
    return math.floor(n_images * (1.0 - validation_split)) if validation_split else n_images


def random_move(keras, augment, seed):
    """A layer that rotates, shifts and zooms each image by its own random amounts, in training only.

    The three moves compose into one affine map per image, so the image is
    resampled once (bilinear): Keras's RandomRotation, RandomTranslation and
    RandomZoom in a row resample it three times, which blurs MNIST's thin
    strokes thrice and took 2.9 s of each 60,000-image epoch on 2 CPU cores
    against 1.2 s. Built on keras.ops (image.affine_transform, the op those
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


def reference_loss(keras, model, x, labels, loss_name):
    """The model's loss, as training reports it (penalties included), on the first REFERENCE_IMAGES images."""
    n, total = min(REFERENCE_IMAGES, len(labels)), 0.0
    loss = keras.losses.get(loss_name)
    for start in range(0, n, 256):
        stop = min(n, start + 256)
        probabilities = model(keras.ops.convert_to_tensor(np.asarray(x[start:stop])), training=False)
        per_image = loss(keras.ops.convert_to_tensor(labels[start:stop]), probabilities)
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


def fit(keras, model, x, y, train, live):
    """Compile and fit, logging each epoch to `live`.

    Returns (history dict, per-epoch seconds, fit seconds, fit CPU seconds): the
    CPU time of all the process's threads, which a busy or throttled host does
    not inflate as it does the wall time.
    """
    accuracy = (keras.metrics.SparseCategoricalAccuracy if train.loss in SPARSE_LOSSES
                else keras.metrics.CategoricalAccuracy)(name="accuracy")
    steps_per_epoch = -(-fit_size(len(x), train.validation_split) // train.batch_size)
    model.compile(optimizer=make_optimizer(keras, train, steps_per_epoch), loss=train.loss, metrics=[accuracy],
                  steps_per_execution=train.steps_per_execution)

    epoch_s = []

    class EpochLog(keras.callbacks.Callback):
        """Adds epoch time and the learning rate in force at the epoch's end to the logs."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.start)
            logs["epoch_time_s"] = epoch_s[-1]
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    labels = encode_labels(keras, y, train.loss)
    before = reference_loss(keras, model, x, labels, train.loss)
    guard = DivergenceGuard(keras, model, train.learning_rate, before)

    live.step = 1  # DVCLive counts from 0; the log's steps are epochs, counted from 1 as people do
    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(x, labels, batch_size=train.batch_size,
                        epochs=train.epochs, shuffle=train.shuffle, verbose=progress_verbosity(sys.stdout),
                        validation_split=train.validation_split,
                        callbacks=[guard.callback(), EpochLog(), live_callback(keras, live)])
    fit_s, fit_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    check_progress(before, reference_loss(keras, model, x, labels, train.loss), train.learning_rate)
    return history.history, epoch_s, fit_s, fit_cpu_s


CHECK_IMAGES = 256  # training images on which the saved classifier is checked against what was trained
# How far the float32 classifier saved from a mixed_bfloat16 run may answer from the network as trained
# (bfloat16 products: 8 bits of mantissa): the largest difference in any probability, and the share of
# the check images read as another digit. Measured on the seed's CNN: see tests/test_train.py.
BFLOAT16_TOLERANCE = {"max_probability_difference": 0.1, "other_digit_share": 0.02}


def in_float32(keras, init, network):
    """`network`'s architecture and weights, computing in float32 (a mixed-precision network keeps float32
    weights: nothing is rounded)."""
    float32 = initial_network(keras, init, "float32")
    float32.set_weights(network.get_weights())
    return float32


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
    """Write `classifier` as ONNX to `path`, for predict's fast start; refuse it unless it agrees with Keras.

    Returns None when done, or the reason it could not be made on this backend
    (Keras's exporter on jax and torch needs packages the core install lacks):
    predict then loads classifier.keras, and says so.
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


def declared(train, device):
    """The train params this device's stage reads (dvc.yaml lists them): not the device list, not the other's."""
    return train.model_dump(exclude={"devices", *({"cpu", "gpu"} - {device})})


def progress_verbosity(stream):
    """Keras's verbose: a progress bar within each epoch on a terminal, one line per epoch in a log."""
    return 1 if stream.isatty() else 2


def run_details(args, base, train, device_name, where, keras, history, epoch_s, fit_s, fit_cpu_s, n_fit, precision,
                features):
    """Everything this run recorded, for the report: the device, versions, timings, final metrics."""
    details = {
        "device": args.device, "device_name": device_name, "placement": where, "cpu_model": cpu_model(),
        "cpu_features": features, "onednn": onednn_enabled(base.backend), "precision": precision,
        "backend": base.backend, "backend_version": backend_version(base.backend),
        "keras_version": keras.__version__,
        "replicas": train.replicas,
        "train_images": n_fit, "epochs": train.epochs, "batch_size": train.batch_size,
        "fit_time_s": round(fit_s, 3), "time_per_epoch_s": round(fit_s / train.epochs, 3),
        "first_epoch_s": round(epoch_s[0], 3),
        "fit_cpu_s": round(fit_cpu_s, 3), "cores_busy": round(fit_cpu_s / fit_s, 2),
        "samples_per_s": round(n_fit * train.epochs / fit_s, 1),
        "final_loss": float(history["loss"][-1]), "final_accuracy": float(history["accuracy"][-1]),
    }
    if train.validation_split:
        details["final_val_loss"] = float(history["val_loss"][-1])
        details["final_val_accuracy"] = float(history["val_accuracy"][-1])
    return details


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocess's folder")
    parser.add_argument("--init", type=Path, required=True, help="build_init_weights's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file of the fit time")
    parser.add_argument("--details", type=Path, required=True, help="JSON file of the run's details")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder for the per-epoch log")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    check_train(train, base.backend)
    features = cpu_features()
    precision = resolve_precision(train.precision, args.device, features)

    os.environ.update(device_env(base.backend, args.device, train.gpu, train.cpu, train.replicas))
    keras = import_keras(base.backend, device=args.device)
    device_name = set_up_device(base.backend, args.device, train.cpu, train.gpu, train.replicas)
    in_parallel, replica_devices = data_parallel(keras, base.backend, args.device, train.replicas)
    keras.utils.set_random_seed(base.seed)
    data_md5 = check_files(args.data, ["pixels_train.npy", "y_train.npy", "scaler.json", "x_train.npy"])
    check_files(args.init, ["model.json", "initial.weights.h5"])
    try:
        pixels = np.load(args.data / "pixels_train.npy")
        y = np.load(args.data / "y_train.npy")
        scaler = read_json(args.data / "scaler.json")
        table = standardize_table(scaler)
        check_pixels(pixels, np.load(args.data / "x_train.npy", mmap_mode="r"), table)
        with in_parallel():  # the variables are made where the replicas are
            model = initial_network(keras, args.init, precision)
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    check_split(len(pixels), train.validation_split)
    if scaler.get("scaler", "per_pixel") == "per_pixel" and any(train.augment.model_dump().values()):
        print("warning: train.augment moves ink onto pixels MNIST almost never inks, whose per-pixel deviation "
              "is tiny: they will stand out by thousands; set preprocess.scaler=global", file=sys.stderr)
    print(f"train on {args.device} ({device_name}, {base.backend}): {len(pixels)} images, "
          f"{train.epochs} epochs of batch {train.batch_size}, {train.optimizer} lr {train.learning_rate}"
          + (f", split over {train.replicas} devices ({', '.join(replica_devices)})" if train.replicas > 1 else "")
          + (f", precision auto: {precision}" if train.precision == "auto" else ""))

    from dvclive import Live

    with atomic_path(args.live) as live_dir:  # renamed into place last, once all else is written
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        if base.backend == "tensorflow" and args.device == "cpu":
            # fit would copy the array into a tensor and keep both: make the copy now, drop the array
            # (on CPU only: TensorFlow may put an eager tensor on a GPU, and tf.data reads from the host)
            pixels = keras.ops.convert_to_tensor(pixels)
        with in_parallel():
            fitted = classifier(keras, model, table)
            history, epoch_s, fit_s, fit_cpu_s = fit(keras, augmented(keras, fitted, train.augment, base.seed),
                                                     pixels, y, train, live)
        where = placement(model.weights[0])
        if on_gpu(where) != (args.device == "gpu"):
            raise UserError(f"asked to train on {args.device} but the weights live on {where}; "
                            f"refusing to record this run as {args.device}")
        details = run_details(args, base, train, device_name, where, keras, history, epoch_s, fit_s, fit_cpu_s,
                              fit_size(len(pixels), train.validation_split), precision, features)
        details["replica_devices"] = replica_devices
        details["thread_env"] = thread_env(os.environ)
        check_images = np.asarray(pixels[:CHECK_IMAGES])
        if precision != "float32":
            # what is saved computes in float32 with the trained weights: exact on every CPU, fast where
            # bfloat16 is emulated, and exportable (ONNX Runtime's CPU kernels take no bfloat16)
            trained_fitted, model = fitted, in_float32(keras, args.init, model)
            fitted = classifier(keras, model, table)
            details["float32_vs_trained"] = check_float32(keras, trained_fitted, fitted, check_images)
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            model.save(tmp / "model.keras")
            # the same layers, uncompiled: no optimizer state or training config in the file users load
            final = keras.Model(fitted.input, fitted.output, name=fitted.name)
            final.save(tmp / "classifier.keras")
            no_onnx = export_onnx(keras, final, tmp / "classifier.onnx", check_images)
            (tmp / "params.json").write_text(to_json(
                {"base": base.model_dump(), "train": declared(train, args.device), "device": args.device,
                 "scaler_md5": data_md5["scaler.json"]},  # evaluate checks it is paired with this one
                indent=2) + "\n")
            write_manifest(tmp, f"train@{args.device}")
        write_json(args.details, details)
        write_json(args.metrics, {"fit_time_s": details["fit_time_s"]})
    print(f"fit {fit_s:.1f} s on {device_name} ({details['samples_per_s']:.0f} images/s), "
          f"final accuracy {details['final_accuracy']:.4f}")
    if no_onnx:
        print(f"no classifier.onnx ({no_onnx}): predict will load classifier.keras")
    print(f"wrote {args.out}/ (classifier.keras{'' if no_onnx else ', classifier.onnx'}, model.keras, params.json), "
          f"{args.metrics}, {args.details}, {args.live}/")


def backend_version(backend):
    return __import__(backend).__version__  # the backends' module names are their param values


if __name__ == "__main__":
    run(main)
