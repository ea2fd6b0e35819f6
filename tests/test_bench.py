"""The benchmark's pieces that can be checked without timing anything (it asserts no timing)."""

import re
import shlex
import sys

import pytest
import yaml

from mnist_cnn.params import validate
from mnist_cnn.params import TrainParams
from tests.conftest import DOCS, ROOT


def load_speed():
    from bench import speed

    return speed


def preset(name):
    return yaml.safe_load((ROOT / f"params-{name}.yaml").read_text())


def fast_preset():
    return preset("fast")


def test_the_fast_preset_is_valid_params(tmp_path):
    speed = load_speed()
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    speed.set_params(params, fast_preset())
    train = validate(yaml.safe_load(params.read_text())["train"], TrainParams, "train")
    assert train.optimizer == "adam" and train.lr_schedule == "cosine"


@pytest.mark.parametrize("name", ["fast", "accurate"])
def test_the_readmes_preset_command_is_the_preset(name):
    line = next(line for page in DOCS for line in page.read_text().splitlines()
                if line.strip().startswith(f"dvc exp run -n {name} "))
    words = shlex.split(line.strip())
    pairs = [words[i + 1].split("=", 1) for i, w in enumerate(words) if w == "-S"]
    assert {k: yaml.safe_load(v) for k, v in pairs} == preset(name)
    assert f"#   {line.strip()}" in (ROOT / f"params-{name}.yaml").read_text()  # the file's own comment says it too


def test_the_table_says_which_targets_hold():
    speed = load_speed()
    run = {"fit_time_s": 50.0, "fit_cpu_s": 90.0, "samples_per_s": 6000.0, "test_accuracy": 0.990,
           "peak_rss_mb": 1200.0}
    result = {"machine": {"cores": 2}, "reference": run,
              "ours": dict(run, fit_time_s=25.0, test_accuracy=0.9905, peak_rss_mb=900.0),
              "fit_ratio": 0.5,
              "fast_preset": {"fit_time_s": 11.0, "test_accuracy": 0.9903, "time_to_99_s": 11.0},
              "pipeline": {"noop_repro_s": 1.0, "fresh_repro_s": 40.0, "fresh_fit_s": 25.0,
                           "fresh_overhead_s": 15.0, "evaluate_change_s": 9.0},
              "runs": {"reference": [run, dict(run, fit_time_s=60.0)], "ours": [dict(run, fit_time_s=25.0)]},
              "ceiling": speed.ceiling([{"float32_gflops": 200.0, "bfloat16_gflops": 400.0},
                                        {"float32_gflops": 160.0, "bfloat16_gflops": 410.0}],
                                       train_flops_per_image=16e6, images=60_000, epochs=5, fast_epochs=2)}
    lines = {line.split("  ")[0]: line for line in speed.table(result).splitlines()}
    assert lines["fit time, 5 epochs (s)"].rstrip().endswith("yes")
    assert lines["peak RSS of training (MB)"].rstrip().endswith("NO")  # 900 MB > 800 MB
    assert "+0.05 pt" in lines["test accuracy (%)"]
    assert lines["fast preset: fit (s) / test acc (%)"].rstrip().endswith("yes")
    rows = [re.split(r"\s{2,}", line.strip()) for line in speed.table(result).splitlines()]
    cells = {row[0]: row[1:] for row in rows}
    assert cells["CPU time in fit (s), all threads"] == ["90.0", "90.0", "1.00"]
    assert cells["cores busy in fit (of 2)"] == ["1.80", "3.60"]  # 90 CPU-s in 50 s and in 25 s
    assert cells["fit time, 5 epochs (s)"][:2] == ["50.0 (50-60)", "25.0"]  # the median, then the runs' range
    # the floor: 16 MFLOP x 60,000 x 5 at the best float32 rate measured (200 GFLOP/s) = 24 s
    assert cells["floor: its FLOPs at matmul peak (s)"] == ["24.0", "24.0", "200 GFLOP/s"]
    assert cells["share of that peak (%)"] == ["48", "96", "0.6x needs 80"]  # 24/50, 24/25; 48 % / 0.6
    assert cells["fast preset floor at bf16 peak (s)"] == ["4.7", "410 GFLOP/s"]  # 16e6 x 60,000 x 2 / 410e9



def test_the_fresh_repro_is_split_by_stage_from_dvcs_own_lines():
    speed = load_speed()
    lines = [(0.2, "Verifying data sources in stage: 'fetch'"), (1.5, "Running stage 'fetch':"),
             (1.6, "> python -m stages.fetch --out data/raw"), (3.4, "Running stage 'preprocess':"),
             (10.4, "Running stage 'train@cpu':"), (120.0, "fit 100.0 s on cpu"), (130.25, "Running stage 'report':"),
             (132.0, "Use `dvc push` to send your updates to remote storage.")]
    assert speed.stage_times(lines, end=133.0) == {"dvc": 1.5, "fetch": 1.9, "preprocess": 7.0, "train@cpu": 119.8,
                                                   "report": 2.8}
    assert speed.stage_times([], end=2.0) == {"dvc": 2.0}  # nothing ran: all of it is DVC's


def test_the_profile_summary_names_the_step_and_its_largest_ops():
    speed = load_speed()
    profile = {"batch_size": 64, "onednn": True, "step_untraced_ms": 24.819, "no_op_running_ms": 3.177,
               "input_pipeline_ms": 0.187,
               "ops": [{"layer": "conv2", "pass": "backward", "op": "Conv2DBackpropFilter", "ms_per_step": 9.07,
                        "gflops": 31.5},
                       {"layer": "optimizer", "pass": "update", "op": "ApplyRMSProp", "ms_per_step": 1.2,
                        "gflops": None},
                       {"layer": "conv1", "pass": "forward", "op": "Conv2D", "ms_per_step": 0.5, "gflops": 20.0}]}
    lines = speed.profile_summary(profile, top=2).splitlines()
    assert "batch 64, oneDNN on): 24.8 ms; no op running 3.2 ms, input pipeline 0.2 ms" in lines[0]
    assert lines[1:] == ["  conv2 backward Conv2DBackpropFilter: 9.1 ms, 32 GFLOP/s",
                         "  optimizer update ApplyRMSProp: 1.2 ms"]  # no FLOPs counted, no rate; top 2 only


def test_the_accurate_preset_is_valid_params_for_every_stage_that_reads_them(tmp_path):
    from mnist_cnn.params import ModelParams
    from mnist_cnn.params import count_weights
    from mnist_cnn.params import PreprocessParams

    speed = load_speed()
    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    speed.set_params(params, preset("accurate"))
    loaded = yaml.safe_load(params.read_text())
    train = validate(loaded["train"], TrainParams, "train")
    model = validate(loaded["model"], ModelParams, "model")
    assert train.augment.rotation > 0 and model.batch_norm and count_weights(model) == 242_602
    assert validate(loaded["preprocess"], PreprocessParams, "preprocess").scaler == "global"  # see train's warning



def load_profile():
    from bench import step_profile

    return step_profile


def test_the_profile_reads_ops_to_layers_and_flops():
    """The trace's op names map to the layer and pass they belong to; only convolutions and matrix
    products of known layers carry FLOPs; backward ops count the forward's FLOPs each."""
    profile = load_profile()
    layers = {"conv1", "conv1_pool", "conv2", "dense1", "output"}
    assert profile.where("StatefulPartitionedCall/gradient_tape/mnist_classifier_1/mnist_cnn_1/conv2_1/"
                         "convolution/Conv2DBackpropFilter", layers) == ("conv2", True)
    assert profile.where("StatefulPartitionedCall/mnist_classifier_1/mnist_cnn_1/conv1_pool_1/MaxPool2d",
                         layers) == ("conv1_pool", False)
    assert profile.where("StatefulPartitionedCall/mnist_classifier_1/standardize_1/table_1/GatherV2",
                         layers) == ("standardize (table lookup)", False)
    flops = {"conv2": 100, "dense1": 7}
    assert profile.op_flops("_FusedConv2D", "conv2", False, flops) == 100
    assert profile.op_flops("_MklNativeConv2DBackpropFilterWithBias", "conv2", True, flops) == 100
    assert profile.op_flops("MatMul", "dense1", True, flops) == 7
    assert profile.op_flops("MaxPoolGrad", "conv2", True, flops) == 0
    assert profile.op_flops("MatMul", "loss gradient", True, flops) == 0


def test_the_profile_counts_overlapping_ops_once():
    profile = load_profile()
    assert profile.busy_union([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert profile.busy_union([]) == 0


def test_no_script_shadows_a_standard_module():
    # Run as a script, a file's folder comes first on sys.path: a bench/profile.py once made torch's
    # `import cProfile` load it instead of the standard library's profile (seen on the GPU host).
    scripts = {path.stem for folder in ("bench", "stages", "tools", "mnist_cnn")
               for path in (ROOT / folder).glob("*.py")}
    assert not scripts & set(sys.stdlib_module_names)
