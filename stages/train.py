"""train: fit the CNN from the shared initial weights, on one device.

    python -m stages.train --device cpu --data data/processed --init models/init \
        --out models/cpu --metrics metrics/train_cpu.json --live dvclive/train_cpu

dvc.yaml runs it once per entry of train.devices (stages train@cpu, train@gpu).
--device gpu fails unless the backend sees a GPU, and after training the
weights' actual placement is checked, so a run is never labeled GPU that ran
on a CPU. Writes the trained model (model.keras) with the params it was
trained with (params.json), timings and final metrics, and through DVCLive one
line per epoch of loss, accuracy (and their validation twins when
train.validation_split > 0), learning rate and epoch time.
"""

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt

from stages.common import (PARAMS_FILE, BaseParams, Strict, UserError, atomic_path, import_keras,
                           load_params, read_json, run, write_json)

SPARSE_LOSSES = ("sparse_categorical_crossentropy",)
ONE_HOT_LOSSES = ("categorical_crossentropy", "binary_crossentropy", "mean_squared_error")


class CpuParams(Strict):
    intra_op_threads: NonNegativeInt
    inter_op_threads: NonNegativeInt


class GpuParams(Strict):
    memory_growth: bool
    memory_limit_mb: PositiveInt | None


class TrainParams(Strict):
    devices: Annotated[list[Literal["cpu", "gpu"]], Field(min_length=1)]
    epochs: PositiveInt
    batch_size: PositiveInt
    optimizer: Literal["rmsprop", "sgd", "adam"]
    learning_rate: PositiveFloat
    lr_schedule: Literal["constant", "exponential", "step", "cosine"]
    lr_decay_rate: Annotated[float, Field(gt=0.0, le=1.0)]
    lr_decay_epochs: PositiveFloat
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    nesterov: bool
    loss: Literal[SPARSE_LOSSES + ONE_HOT_LOSSES]
    shuffle: bool
    validation_split: Annotated[float, Field(ge=0.0, lt=1.0)]
    precision: Literal["float32", "mixed_bfloat16"]
    cpu: CpuParams
    gpu: GpuParams


def check_train(train, backend):
    """Refuse combinations the schema cannot see, naming the key."""
    if len(set(train.devices)) != len(train.devices):
        raise UserError(f"params.yaml: train.devices = {train.devices}: list each device once")
    if train.optimizer == "adam" and train.momentum:
        raise UserError("params.yaml: train.momentum applies to rmsprop and sgd; set it to 0.0 for adam")
    if train.nesterov and not (train.optimizer == "sgd" and train.momentum):
        raise UserError("params.yaml: train.nesterov applies to sgd with momentum > 0; set it to false")
    if backend == "jax" and (train.cpu.intra_op_threads or train.cpu.inter_op_threads):
        raise UserError("params.yaml: train.cpu.*_threads are applied on tensorflow and torch only; "
                        "set them to 0 for jax")
    if backend == "jax" and train.gpu.memory_limit_mb:
        raise UserError("params.yaml: train.gpu.memory_limit_mb is applied on tensorflow and torch only; "
                        "set it to null for jax")


def device_env(backend, device, gpu):
    """Environment variables that must be set before the backend is imported."""
    env = {}
    if backend == "jax" and device == "gpu":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false" if gpu.memory_growth else "true"
        env["XLA_FLAGS"] = "--xla_gpu_deterministic_ops=true"
    if backend == "torch" and device == "gpu":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # needed for deterministic cuBLAS
    return env


def set_up_device(backend, device, cpu, gpu):
    """Apply thread/memory settings and determinism; return the framework's name for the device.

    Raises a UserError when --device gpu is asked for and the backend sees no GPU.
    """
    no_gpu = (f"train.devices includes 'gpu' but {backend} sees no GPU; remove 'gpu' from "
              f"train.devices, or install {backend} with CUDA support")
    if backend == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
        if cpu.intra_op_threads:
            tf.config.threading.set_intra_op_parallelism_threads(cpu.intra_op_threads)
        if cpu.inter_op_threads:
            tf.config.threading.set_inter_op_parallelism_threads(cpu.inter_op_threads)
        if device == "cpu":
            return tf.config.list_physical_devices("CPU")[0].name
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            raise UserError(no_gpu)
        if gpu.memory_limit_mb:
            tf.config.set_logical_device_configuration(
                gpus[0], [tf.config.LogicalDeviceConfiguration(memory_limit=gpu.memory_limit_mb)])
        elif gpu.memory_growth:
            tf.config.experimental.set_memory_growth(gpus[0], True)
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    if backend == "jax":
        import jax
        devices = jax.devices()
        if device == "gpu" and devices[0].platform != "gpu":
            raise UserError(no_gpu)
        return f"{devices[0].platform}:{devices[0].device_kind}"
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    if cpu.intra_op_threads:
        torch.set_num_threads(cpu.intra_op_threads)
    if cpu.inter_op_threads:
        torch.set_num_interop_threads(cpu.inter_op_threads)
    if device == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(no_gpu)
    if gpu.memory_limit_mb:
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu.memory_limit_mb / total_mb))
    return torch.cuda.get_device_name(0)


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


def placement(variable):
    """Where a Keras variable's value actually lives, as the backend names it."""
    value = variable.value
    if hasattr(value, "devices"):  # jax
        return ",".join(sorted(str(d) for d in value.devices()))
    return str(value.device)


def on_gpu(where):
    return "gpu" in where.lower() or "cuda" in where.lower()


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
    """How many images are fitted on: Keras holds out the last validation_split of them."""
    return n_images - int(n_images * validation_split)


def standardize_table(scaler):
    """(784 * 256,) float32: entry p * 256 + v is pixel p of value v, standardized as preprocess did.

    The same float64 arithmetic as StandardScaler.transform, rounded to float32
    once, so a lookup gives exactly the number preprocess wrote to x_train.npy.
    """
    mean, scale = (np.asarray(scaler[key], dtype=np.float64)[:, None] for key in ("mean", "scale"))
    return ((np.arange(256, dtype=np.float64) - mean) / scale).astype(np.float32).ravel()


def lookup(table, pixels):
    """Standardize uint8 images (N, 28, 28) with standardize_table's table, in NumPy."""
    flat = pixels.reshape(len(pixels), -1).astype(np.int64) + np.arange(pixels[0].size) * 256
    return table[flat]


def check_pixels(pixels, x, table, n=1000):
    """Refuse pixels_train.npy unless its first `n` images standardize to x_train.npy's, bit for bit."""
    if pixels.dtype != np.uint8 or len(pixels) != len(x) or pixels[0].size != x[0].size:
        raise UserError(f"pixels_train.npy ({pixels.dtype}, {pixels.shape}) does not match x_train.npy "
                        f"{x.shape}: run `dvc repro -f preprocess`")
    if not np.array_equal(lookup(table, pixels[:n]), np.asarray(x[:n]).reshape(min(n, len(x)), -1)):
        raise UserError("pixels_train.npy and scaler.json do not give x_train.npy's values: "
                        "run `dvc repro -f preprocess`")


def standardizing(keras, model, table):
    """`model` behind a table lookup that standardizes uint8 pixels: what train fits.

    Fed uint8 images, fit holds a quarter of the memory that float32 images need
    (47 MB, not 188 MB, for MNIST's training set), and the network sees the very
    inputs preprocess wrote, so the training is the same. The lookup has no
    weights to learn: fitting the wrapper trains `model`'s own weights, and
    `model` alone is saved.
    """
    ops = keras.ops
    n_pixels = int(np.prod(model.input_shape[1:]))

    class Standardize(keras.layers.Layer):
        def build(self, input_shape):
            # A weight, not a constant: it is put on the training device once.
            self.table = self.add_weight(shape=table.shape, initializer="zeros", trainable=False, name="table")
            self.table.assign(table)

        def call(self, pixels):
            index = ops.cast(ops.reshape(pixels, (-1, n_pixels)), "int32") + ops.arange(n_pixels, dtype="int32") * 256
            return ops.reshape(ops.take(self.table, index), (-1, *model.input_shape[1:]))

    pixels = keras.Input(shape=model.input_shape[1:-1], dtype="uint8", name="pixels")
    return keras.Model(pixels, model(Standardize(dtype="float32", name="standardize")(pixels)))


def fit(keras, model, x, y, train, live):
    """Compile and fit, logging each epoch to `live`.

    Returns (history dict, per-epoch seconds, fit seconds, fit CPU seconds): the
    CPU time of all the process's threads, which a busy or throttled host does
    not inflate as it does the wall time.
    """
    accuracy = (keras.metrics.SparseCategoricalAccuracy if train.loss in SPARSE_LOSSES
                else keras.metrics.CategoricalAccuracy)(name="accuracy")
    steps_per_epoch = -(-fit_size(len(x), train.validation_split) // train.batch_size)
    model.compile(optimizer=make_optimizer(keras, train, steps_per_epoch), loss=train.loss, metrics=[accuracy])

    epoch_s = []

    class EpochLog(keras.callbacks.Callback):
        """Adds epoch time and the learning rate in force at the epoch's end to the logs."""

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.start)
            logs["epoch_time_s"] = epoch_s[-1]
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))

    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(x, encode_labels(keras, y, train.loss), batch_size=train.batch_size,
                        epochs=train.epochs, shuffle=train.shuffle, verbose=2,
                        validation_split=train.validation_split,
                        callbacks=[EpochLog(), live_callback(keras, live)])
    return history.history, epoch_s, time.perf_counter() - start, time.process_time() - cpu_start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocess's folder")
    parser.add_argument("--init", type=Path, required=True, help="build_init_weights's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder for the per-epoch log")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    check_train(train, base.backend)

    os.environ.update(device_env(base.backend, args.device, train.gpu))
    keras = import_keras(base.backend, device=args.device)
    device_name = set_up_device(base.backend, args.device, train.cpu, train.gpu)
    keras.utils.set_random_seed(base.seed)
    try:
        pixels = np.load(args.data / "pixels_train.npy")
        y = np.load(args.data / "y_train.npy")
        table = standardize_table(read_json(args.data / "scaler.json"))
        check_pixels(pixels, np.load(args.data / "x_train.npy", mmap_mode="r"), table)
        model = keras.models.model_from_json(with_precision((args.init / "model.json").read_text(),
                                                            train.precision))
        model.load_weights(args.init / "initial.weights.h5")
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    print(f"train on {args.device} ({device_name}, {base.backend}): {len(pixels)} images, "
          f"{train.epochs} epochs of batch {train.batch_size}, {train.optimizer} lr {train.learning_rate}")

    from dvclive import Live

    with atomic_path(args.live) as live_dir:  # renamed into place last, once all else is written
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        if base.backend == "tensorflow" and args.device == "cpu":
            # fit would copy the array into a tensor and keep both: make the copy now, drop the array
            # (on CPU only: TensorFlow may put an eager tensor on a GPU, and tf.data reads from the host)
            pixels = keras.ops.convert_to_tensor(pixels)
        history, epoch_s, fit_s, fit_cpu_s = fit(keras, standardizing(keras, model, table), pixels, y, train, live)
        n_fit = fit_size(len(pixels), train.validation_split)
        where = placement(model.weights[0])
        if on_gpu(where) != (args.device == "gpu"):
            raise UserError(f"asked to train on {args.device} but the weights live on {where}; "
                            f"refusing to record this run as {args.device}")

        metrics = {
            "device": args.device, "device_name": device_name, "placement": where, "cpu_model": cpu_model(),
            "backend": base.backend, "backend_version": backend_version(base.backend),
            "keras_version": keras.__version__,
            "train_images": n_fit, "epochs": train.epochs, "batch_size": train.batch_size,
            "fit_time_s": round(fit_s, 3), "time_per_epoch_s": round(fit_s / train.epochs, 3),
            "first_epoch_s": round(epoch_s[0], 3),
            "fit_cpu_s": round(fit_cpu_s, 3), "cores_busy": round(fit_cpu_s / fit_s, 2),
            "samples_per_s": round(n_fit * train.epochs / fit_s, 1),
            "final_loss": float(history["loss"][-1]), "final_accuracy": float(history["accuracy"][-1]),
        }
        if train.validation_split:
            metrics["final_val_loss"] = float(history["val_loss"][-1])
            metrics["final_val_accuracy"] = float(history["val_accuracy"][-1])
        with atomic_path(args.out) as tmp:
            tmp.mkdir()
            model.save(tmp / "model.keras")
            (tmp / "params.json").write_text(json.dumps(
                {"base": base.model_dump(), "train": train.model_dump(), "device": args.device}, indent=2) + "\n")
        write_json(args.metrics, metrics)
    print(f"fit {fit_s:.1f} s on {device_name} ({metrics['samples_per_s']:.0f} images/s), "
          f"final accuracy {metrics['final_accuracy']:.4f}")
    print(f"wrote {args.out}/model.keras, {args.metrics}, {args.live}/")


def backend_version(backend):
    return __import__(backend).__version__  # the backends' module names are their param values


if __name__ == "__main__":
    run(main)
