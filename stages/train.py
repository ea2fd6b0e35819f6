"""train: fit the CNN from the shared initial weights, on one device.

    python -m stages.train --device cpu --data data/processed --init models/init --out models/cpu \
        --metrics metrics/train_cpu.json --details details/train_cpu.json --live dvclive/train_cpu

dvc.yaml runs it once per entry of train.devices (stages train@cpu, train@gpu).
--device gpu fails unless the backend sees a GPU, and after training the
weights' actual placement is checked, so a run is never labeled GPU that ran
on a CPU. Fits the classifier (mnist_cnn.model: uint8 pixels in, the
standardization inside), behind random moves of its images when
train.augment asks for them, and writes, in --out:
classifier.keras (that classifier, to load and use anywhere),
classifier.onnx (the same for ONNX Runtime, which evaluate, predict and serve
answer with; checked against Keras to 1e-5), model.keras (the network alone,
standardized images in) and params.json (the params it was trained with, and
the network's values per image, which evaluate checks its batch's memory by).
--metrics gets the fit time (what `dvc metrics show` shows), --details the
device, timings and final metrics, and DVCLive one line per epoch, counted
from 1, of loss, accuracy (and their validation twins when
train.validation_split > 0), learning rate and epoch time; with
--live-copy, that log's curves are also copied there after each epoch, for
`dvc plots show` and DVC's VS Code extension to follow a running train (not
an output: emptied when the run starts and once it has written its outputs).
A run that diverges, learns nothing, or whose saved classifier answers
otherwise than the network as trained is a failure: nothing is written.

The images are read from preprocess's files batch by batch (memory-mapped),
in an order drawn from base.seed and the epoch. With train.processes: N > 1
(jax), one model is trained by N processes at the same global batch: started
here on this host, or by a cluster's scheduler, whose variables name each
process (mnist_cnn.processes); only the first writes.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from mnist_cnn.backend import on_gpu, placement, thread_env
from mnist_cnn.errors import UserError
from mnist_cnn.files import (atomic_path, check_files, clear_copies, release_pages, to_json, write_json,
                              write_manifest)
from mnist_cnn.model import classifier, in_float32
from mnist_cnn.params import (PARAMS_FILE, BaseParams, TrainParams, check_batch_memory, check_train, load_params,
                              train_params_for, values_per_image)
from mnist_cnn.processes import check_job, finish_job, job_from_env, run_here, watch_launcher
from mnist_cnn.stage import exit_at_once_on_failure, run
from mnist_cnn.training import (CHECK_IMAGES, augmented, check_float32, check_replicas, check_shares, check_split,
                                export_onnx, fit, fit_size, load_training_data, local_copy, run_record,
                                set_up)


def count_images(data):
    """How many training images preprocess wrote (the file's header alone)."""
    try:
        return len(np.load(data / "pixels_train.npy", mmap_mode="r"))
    except FileNotFoundError as err:
        raise UserError(f"{err.filename} not found: run `dvc repro` to make it") from None


def save_model(out, stage, keras, network, fitted, check_images, trained_with):
    """Write --out: model.keras, classifier.keras, classifier.onnx (unless this backend cannot export it:
    the reason is returned) and params.json, with their manifest."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        network.save(tmp / "model.keras")
        # the same layers, uncompiled: no optimizer state or training config in the file users load
        final = keras.Model(fitted.input, fitted.output, name=fitted.name)
        final.save(tmp / "classifier.keras")
        no_onnx = export_onnx(keras, final, tmp / "classifier.onnx", check_images)
        (tmp / "params.json").write_text(to_json(trained_with, indent=2) + "\n")
        write_manifest(tmp, stage)
    return no_onnx


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "gpu"], required=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocess's folder")
    parser.add_argument("--init", type=Path, required=True, help="build_init_weights's folder")
    parser.add_argument("--out", type=Path, required=True, help="folder for the trained model")
    parser.add_argument("--metrics", type=Path, required=True, help="JSON file of the fit time")
    parser.add_argument("--details", type=Path, required=True, help="JSON file of the run's details")
    parser.add_argument("--live", type=Path, required=True, help="DVCLive folder for the per-epoch log")
    parser.add_argument("--live-copy", type=Path, help="folder for the curves so far, while the fit runs")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args(argv)
    params = load_params(args.params, base=BaseParams, train=TrainParams)
    base, train = params["base"], params["train"]
    check_train(train, base.backend)
    job = job_from_env(os.environ, train.processes)
    check_job(job, train.processes)
    if train.processes > 1 and job is None:  # this host's job: check what its processes would refuse, start it
        n_images = count_images(args.data)
        check_split(n_images, train.validation_split)
        check_shares(n_images, train)
        return run_here("stages.train", sys.argv[1:] if argv is None else argv, train.processes)
    if job is not None:
        exit_at_once_on_failure()  # JAX's exit would wait for the others, who may be gone
        watch_launcher(os.environ)
    first = job is None or job.rank == 0  # the one process that writes

    setup = set_up(base, train, args.device, job)
    keras = setup.keras
    data_md5 = check_files(args.data, ["pixels_train.npy", "y_train.npy", "scaler.json", "x_train.npy"])
    check_files(args.init, ["model.json", "initial.weights.h5"])
    pixels, y, scaler, table, network = load_training_data(args.data, args.init, setup)
    check_batch_memory(values_per_image(network), train.batch_size, train.max_batch_mb,
                       ("train.batch_size", "train.max_batch_mb"), training=True)
    check_split(len(pixels), train.validation_split)
    check_replicas(len(pixels), train)
    check_shares(len(pixels), train)
    if first and scaler.get("scaler", "per_pixel") == "per_pixel" and any(train.augment.model_dump().values()):
        print("warning: train.augment moves ink onto pixels MNIST almost never inks, whose per-pixel deviation "
              "is tiny: they will stand out by thousands; set preprocess.scaler=global", file=sys.stderr)
    if first:
        print(f"train on {args.device} ({setup.device_name}, {base.backend}): {len(pixels)} images, "
              f"{train.epochs} epochs of batch {train.batch_size}, {train.optimizer} lr {train.learning_rate}"
              + (f", split over {train.replicas} devices ({', '.join(setup.replica_devices)})" if train.replicas > 1
                 else "")
              + (f", {job.count} processes ({job.source}, {len(setup.replica_devices)} devices)" if job else "")
              + (f", precision auto: {setup.precision}" if train.precision == "auto" else ""))
    if not first:
        with setup.in_parallel():
            fit(keras, augmented(keras, classifier(keras, network, table), train.augment, base.seed), pixels, y,
                train, None, base.seed, job.rank)
        return finish_job()

    from dvclive import Live

    if args.live_copy:
        clear_copies(args.live_copy)  # an earlier run's curves: this run's start with its first epoch
    with atomic_path(args.live) as live_dir:  # renamed into place last, once all else is written
        live = Live(str(live_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        with setup.in_parallel():
            fitted = classifier(keras, network, table)
            result = fit(keras, augmented(keras, fitted, train.augment, base.seed), pixels, y, train, live, base.seed,
                         live_copy=args.live_copy)
        where = placement(network.weights[0])
        if on_gpu(where) != (args.device == "gpu"):
            raise UserError(f"asked to train on {args.device} but the weights live on {where}; "
                            f"refusing to record this run as {args.device}")
        if job is not None:  # from here on this process alone: its own copy of the weights, on its own device
            network = local_copy(keras, network)
            fitted = classifier(keras, network, table)
        details = run_record(device=args.device, setup=setup, placement=where, backend=base.backend, train=train,
                             fitted=result, n_fit=fit_size(len(pixels), train.validation_split))
        details["replica_devices"] = setup.replica_devices
        details["processes"] = train.processes
        details["job"] = job.source if job else None
        details["thread_env"] = thread_env(os.environ)
        # the training images' mapped pages leave this process before the export, its peak of resident memory
        release_pages(pixels)
        check_images = np.asarray(pixels[:CHECK_IMAGES])
        if setup.precision != "float32":
            # what is saved computes in float32 with the trained weights: exact on every CPU, fast where
            # bfloat16 is emulated, and exportable (ONNX Runtime's CPU kernels take no bfloat16)
            trained_fitted, network = fitted, in_float32(keras, args.init, network)
            fitted = classifier(keras, network, table)
            details["float32_vs_trained"] = check_float32(keras, trained_fitted, fitted, check_images)
        # scaler_md5: evaluate checks that the model is paired with the scaler it reads
        # values_per_image: evaluate checks its batch's memory with it, without loading Keras
        trained_with = {"base": base.model_dump(), "train": train_params_for(train, args.device),
                        "device": args.device, "scaler_md5": data_md5["scaler.json"],
                        "values_per_image": values_per_image(network)}
        no_onnx = save_model(args.out, f"train@{args.device}", keras, network, fitted, check_images,
                             trained_with)
        write_json(args.details, details)
        write_json(args.metrics, {"fit_time_s": details["fit_time_s"]})
    if args.live_copy:
        clear_copies(args.live_copy)  # done: the run's record is --live, and report's curves
    if job is not None:
        finish_job()
    print(f"fit {result.fit_s:.1f} s on {setup.device_name} ({details['samples_per_s']:.0f} images/s), "
          f"final accuracy {details['final_accuracy']:.4f}")
    if no_onnx:
        print(f"no classifier.onnx ({no_onnx}): evaluate and predict will load classifier.keras")
    print(f"wrote {args.out}/ (classifier.keras{'' if no_onnx else ', classifier.onnx'}, model.keras, params.json), "
          f"{args.metrics}, {args.details}, {args.live}/")


if __name__ == "__main__":
    run(main)
