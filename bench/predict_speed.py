"""predict's speed from a cold start, and the ONNX classifier against the Keras one.

    python -m bench.predict_speed [--model models/cpu] [--image data/examples/photo_3.jpg] [--repeats 7]
        [--out bench/results/predict.json]

1. Wall time of `python -m tools.predict IMAGE --model MODEL`, each run a new
   process (nothing imported yet: the start a user sees), with the model's
   classifier.onnx (ONNX Runtime), then with the same folder made to lack it
   (Keras and its backend load instead); the median and the worst of
   --repeats runs each, alternating the two. The operating system's file cache
   is warm after the first run, as it is for a user's second call.
2. The largest difference between the two runtimes' probabilities on MNIST's
   test images (MNIST_NPZ, Keras's cache, else the committed sample).
Prints a table and writes --out. Not a test: it asserts nothing, it measures.
"""

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench.real_digits import mnist_test
from mnist_cnn.files import write_manifest
from mnist_cnn.backend import cpu_model
from mnist_cnn.inference import TrainedClassifier

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 1.5


def keras_only(model, folder):
    """A copy of the model folder as train leaves it where it cannot export ONNX: predict loads Keras."""
    shutil.copytree(model, folder)
    (folder / "classifier.onnx").unlink()
    write_manifest(folder, json.loads((model / "manifest.json").read_text())["stage"])
    return folder


def cold_start(model, image):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "tools.predict", str(image), "--model", str(model)],
                         cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"predict failed: {out.stderr.strip()}")
    return seconds, out.stdout.strip(), out.stderr.strip()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models/cpu")
    parser.add_argument("--image", type=Path, default=ROOT / "data/examples/photo_3.jpg")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/predict.json")
    args = parser.parse_args(argv)


    with tempfile.TemporaryDirectory() as tmp:
        fallback = keras_only(args.model.resolve(), Path(tmp) / "cpu")
        times = {"onnx": [], "keras": []}
        answers = {}
        for i in range(args.repeats):
            for name, model in (("onnx", args.model), ("keras", fallback))[:: 1 if i % 2 == 0 else -1]:
                seconds, answer, stderr = cold_start(model, args.image)
                times[name].append(seconds)
                answers[name] = (answer.split(": ", 1)[1], len(stderr.splitlines()))
        x_test, _, source = mnist_test()
        onnx, keras = TrainedClassifier(args.model), TrainedClassifier(fallback)
        worst = float(np.abs(onnx.predict(x_test) - keras.predict(x_test)).max())
        same = bool((onnx.predict(x_test).argmax(1) == keras.predict(x_test).argmax(1)).all())
        runtimes = {"onnx": onnx.name, "keras": keras.name}

    result = {
        "machine": {"cpu": cpu_model(), "python": platform.python_version()},
        "image": str(args.image.relative_to(ROOT) if args.image.is_relative_to(ROOT) else args.image),
        "repeats": args.repeats,
        **{name: {"runtime": runtimes[name], "median_s": round(statistics.median(t), 3),
                  "worst_s": round(max(t), 3), "answer": answers[name][0], "stderr_lines": answers[name][1]}
           for name, t in times.items()},
        "max_probability_difference": worst, "same_digits": same, "compared_on": f"{len(x_test)} test images "
                                                                                 f"from {source}",
    }
    print(f"predict, one image, cold start, {args.repeats} runs each, on {result['machine']['cpu']}:")
    print(f"{'runtime':<36}{'median s':>10}{'worst s':>10}  answer         stderr lines")
    for name in ("onnx", "keras"):
        r = result[name]
        print(f"{r['runtime']:<36}{r['median_s']:>10.2f}{r['worst_s']:>10.2f}  {r['answer']:<15}{r['stderr_lines']}")
    print(f"target: <= {TARGET_S} s with ONNX: {'met' if result['onnx']['worst_s'] <= TARGET_S else 'NOT met'}; "
          f"probabilities differ by at most {worst:.2g} on {result['compared_on']} (same digits: {same})")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
