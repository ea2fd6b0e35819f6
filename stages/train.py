"""train: fit the CNN from the shared initial weights, on one device.

    python -m stages.train --device cpu --data data/processed --init models/init \
        --out models/cpu --metrics metrics/train_cpu.json --history plots/history_cpu.csv

dvc.yaml runs it once per entry of train.devices (stages train@cpu, train@gpu).
--device gpu fails unless the backend sees a GPU, and after training the
weights' actual placement is checked, so a run is never labeled GPU that ran
on a CPU. Writes the trained model (model.keras) with the params it was
trained with (params.json), timings and final metrics, and a per-epoch history.
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
                           load_params, run, write_json)

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
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)]
    loss: Literal[SPARSE_LOSSES + ONE_HOT_LOSSES]
    shuffle: bool
    cpu: CpuParams
    gpu: GpuParams


def check_train(train, backend):
    """Refuse combinations the schema cannot see, naming the key."""
    if len(set(train.devices)) != len(train.devices):
        raise UserError(f"params.yaml: train.devices = {train.devices}: list each device once")
    if train.optimizer == "adam" and train.momentum:
        raise UserError("params.yaml: train.momentum applies to rmsprop and sgd; set it to 0.0 for adam")
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


def make_optimizer(keras, train):
    if train.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=train.learning_rate, momentum=train.momentum)
    if train.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate=train.learning_rate, momentum=train.momentum)
    return keras.optimizers.Adam(learning_rate=train.learning_rate)


def encode_labels(keras, y, loss):
    """Integer digits as the loss wants them: as they are, or one-hot."""
    return y if loss in SPARSE_LOSSES else keras.utils.to_categorical(y, 10)


def fit(keras, model, x, y, train):
    """Compile and fit; return (per-epoch history dict, per-epoch seconds, fit seconds)."""
    accuracy = (keras.metrics.SparseCategoricalAccuracy if train.loss in SPARSE_LOSSES
                else keras.metrics.CategoricalAccuracy)(name="accuracy")
    model.compile(optimizer=make_optimizer(keras, train), loss=train.loss, metrics=[accuracy])

    epoch_s = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_s.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    history = model.fit(x, encode_labels(keras, y, train.loss), batch_size=train.batch_size,
                        epochs=train.epochs, shuffle=train.shuffle, verbose=2,
                        callbacks=[EpochTimer()])
    return history.history, epoch_s, time.perf_counter() - start


def history_csv(history, epoch_s):
    rows = ["epoch,loss,accuracy,epoch_time_s"]
    for i, seconds in enumerate(epoch_s):
        rows.append(f"{i + 1},{history['loss'][i]:.6f},{history['accuracy'][i]:.6f},{seconds:.3f}")
    return "\n".join(rows) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocess's folder")
    parser.add_argument("--init", type=Path, required=True, help="build_init_weights's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--history", type=Path, required=True, help="per-epoch CSV")
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
        x = np.load(args.data / "x_train.npy")
        y = np.load(args.data / "y_train.npy")
        model = keras.models.model_from_json((args.init / "model.json").read_text())
        model.load_weights(args.init / "initial.weights.h5")
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None
    print(f"train on {args.device} ({device_name}, {base.backend}): {x.shape[0]} images, "
          f"{train.epochs} epochs of batch {train.batch_size}, {train.optimizer} lr {train.learning_rate}")

    history, epoch_s, fit_s = fit(keras, model, x, y, train)
    where = placement(model.weights[0])
    if on_gpu(where) != (args.device == "gpu"):
        raise UserError(f"asked to train on {args.device} but the weights live on {where}; "
                        f"refusing to record this run as {args.device}")

    metrics = {
        "device": args.device, "device_name": device_name, "placement": where, "cpu_model": cpu_model(),
        "backend": base.backend, "backend_version": backend_version(base.backend),
        "keras_version": keras.__version__,
        "train_images": int(x.shape[0]), "epochs": train.epochs, "batch_size": train.batch_size,
        "fit_time_s": round(fit_s, 3), "time_per_epoch_s": round(fit_s / train.epochs, 3),
        "first_epoch_s": round(epoch_s[0], 3),
        "samples_per_s": round(x.shape[0] * train.epochs / fit_s, 1),
        "final_loss": float(history["loss"][-1]), "final_accuracy": float(history["accuracy"][-1]),
    }
    with atomic_path(args.out) as tmp:
        tmp.mkdir()
        model.save(tmp / "model.keras")
        (tmp / "params.json").write_text(json.dumps(
            {"base": base.model_dump(), "train": train.model_dump(), "device": args.device}, indent=2) + "\n")
    with atomic_path(args.history) as tmp:
        tmp.write_text(history_csv(history, epoch_s))
    write_json(args.metrics, metrics)
    print(f"fit {fit_s:.1f} s on {device_name} ({metrics['samples_per_s']:.0f} images/s), "
          f"final accuracy {metrics['final_accuracy']:.4f}")
    print(f"wrote {args.out}/model.keras, {args.metrics}, {args.history}")


def backend_version(backend):
    return __import__(backend).__version__  # the backends' module names are their param values


if __name__ == "__main__":
    run(main)
