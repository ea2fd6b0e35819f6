"""The frameworks: Keras on its backend, devices, threads, precision and data parallelism, and the CPU's units.

Every use of a framework's private API is here, each checked by a test that it is still in force
(tests/test_backend.py): Keras's array adapter (without_tf_data_autotune), the import system's
"cannot be imported" marker (unimportable) and TensorFlow's oneDNN query (onednn_enabled).
"""

import contextlib
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

from mnist_cnn.errors import UserError


def import_keras(backend, device=None):
    """Import Keras on `backend`; device "cpu" hides every GPU from it.

    The backend and visible devices can only be chosen before the first import,
    which is why no stage imports Keras at module level.
    """
    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != backend:
        raise UserError(f"Keras is already imported with another backend; cannot switch to {backend}")
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if backend == "jax":
            os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        with unimportable(*(name for name in KERAS_EXTRAS if name != backend)):
            import keras
    except ImportError as err:
        raise UserError(f"base.backend is {backend!r} but it cannot be imported ({err}); "
                        f"install it or set base.backend to tensorflow") from None
    if keras.backend.backend() != backend:
        raise UserError(f"Keras runs on {keras.backend.backend()!r}, not base.backend={backend!r}")
    if backend == "tensorflow":
        without_tf_data_autotune()
    return keras


@contextmanager
def keras_to_build():
    """Keras for a stage that builds and saves a model and never trains or predicts with it (build_init_weights):
    on its NumPy backend, which starts in about half TensorFlow's time and memory, with TensorFlow kept out for
    the whole block (Keras would import it lazily for its file paths, tf.io.gfile, where it can). The files
    written are the same to the byte on any backend (tests/test_build_init_weights.py). A process that has
    imported Keras already (a test's) keeps its backend.
    """
    if "keras" in sys.modules:
        import keras
        yield keras
        return
    os.environ["KERAS_BACKEND"] = "numpy"
    os.environ["JAX_PLATFORMS"] = "cpu"  # NumPy's backend imports JAX (its FFT); no GPU is looked for
    with unimportable("tensorflow", *(name for name in KERAS_EXTRAS if name != "jax")):
        try:
            import keras
        except ImportError as err:
            raise UserError(f"Keras's NumPy backend cannot be imported ({err}); install the pins: "
                            f"`pip install -r requirements.txt`") from None
        yield keras


# What importing Keras on TensorFlow also imports when it is installed, for parts
# no stage uses: TensorFlow Lite's JAX converter (jax), Keras's scikit-learn
# wrappers (sklearn) and its image gallery (matplotlib.pyplot), each about a
# second of the import on a small CPU (docs/results-and-speed.md). Each is imported inside a
# try/except ImportError, so each is left out by making it unimportable for the
# import's duration; a stage that needs one imports it afterwards as usual.
KERAS_EXTRAS = ("jax", "sklearn", "matplotlib")


@contextmanager
def unimportable(*names):
    """Within this block, `import name` raises ImportError for each name not yet imported; after it, imports work."""
    blocked = [name for name in names if name not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # the import system's own marker for "cannot be imported"
    try:
        yield
    finally:
        for name in blocked:
            if sys.modules.get(name, False) is None:
                del sys.modules[name]


def without_tf_data_autotune():
    """Make the tf.data pipelines Keras builds from arrays (fit, evaluate, predict) run without autotuning, and
    those it builds from the project's own batches (training.batches) without reading ahead.

    With autotuning on, each pipeline runs a tuning thread that sleeps for a
    period doubling up to a minute, and Keras's end of epoch (which drops the
    epoch's iterator) waits for it to wake: the same epoch's time could
    double by chance, the difference spent with every core idle.
    Tuning buffer sizes changes no number: the same batches in the same order,
    the same weights to the bit. Keras has no public switch for the options of
    the datasets it builds, so this wraps its array adapter, once; the version
    is pinned and tests/test_train.py checks that the wrapper is in force.

    A PyDataset's pipeline (its other adapter) autotunes its prefetch too, and reads a few batches first to
    learn their shapes. For a dataset that declares its `tensor_spec` (training.batches, which counts its
    reads to know each read's epoch), this builds the pipeline from that spec, without autotuning and without
    those extra reads (tests/test_processes.py checks every epoch's batches).
    """
    import tensorflow as tf
    from keras.src.trainers.data_adapters import array_data_adapter, py_dataset_adapter

    adapter = array_data_adapter.ArrayDataAdapter
    if not getattr(adapter.get_tf_dataset, "without_autotune", False):
        keras_own = adapter.get_tf_dataset

        def get_tf_dataset(self):
            options = tf.data.Options()
            options.autotune.enabled = False
            return keras_own(self).with_options(options)

        get_tf_dataset.without_autotune, get_tf_dataset.keras_own = True, keras_own
        adapter.get_tf_dataset = get_tf_dataset

    batches = py_dataset_adapter.PyDatasetAdapter
    if not getattr(batches.get_tf_dataset, "without_autotune", False):
        keras_batches = batches.get_tf_dataset

        def get_batches_dataset(self):
            spec = getattr(self.py_dataset, "tensor_spec", None)
            if spec is None or self.enqueuer is not None:
                return keras_batches(self)
            options = tf.data.Options()
            options.autotune.enabled = False
            # no prefetch: a batch is read when the step asks for it, in the step's own thread
            return tf.data.Dataset.from_generator(self._get_iterator, output_signature=spec(tf)).with_options(options)

        get_batches_dataset.without_autotune, get_batches_dataset.keras_own = True, keras_batches
        batches.get_tf_dataset = get_batches_dataset


def import_onnxruntime():
    """ONNX Runtime, its telemetry off: otherwise importing it writes a device id under ~/.cache/Microsoft."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime


def device_env(backend, device, gpu, cpu=None, replicas=1):
    """Environment variables that must be set before the backend is imported."""
    env = {}
    if backend == "jax" and device == "cpu" and replicas > 1:
        # XLA shows one CPU device unless told to split the host (the cores are shared among them)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={replicas}"
    if backend == "tensorflow" and device == "cpu" and cpu is not None and cpu.onednn is not None:
        # TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512-VNNI, -BF16 or
        # AMX; on an EPYC without AVX-512 they train the seed's CNN faster than Eigen's too
        # (python -m bench.step_profile measures it, op by op)
        env["TF_ENABLE_ONEDNN_OPTS"] = "1" if cpu.onednn else "0"
    if device == "gpu":
        # float32 means float32: since Ampere, cuBLAS and cuDNN run float32 products and
        # convolutions in TF32 (a 10-bit mantissa) where the framework allows it, and TensorFlow,
        # JAX and PyTorch's convolutions allow it by default. This turns it off in the libraries.
        env["NVIDIA_TF32_OVERRIDE"] = "0"
    if backend == "jax" and device == "gpu":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false" if gpu.memory_growth else "true"
        env["XLA_FLAGS"] = "--xla_gpu_deterministic_ops=true"
        env["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"  # XLA's own kernels: full float32 too
    if backend == "torch" and device == "gpu":
        env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"  # needed for deterministic cuBLAS
    return env


def set_up_device(backend, device, cpu, gpu, replicas=1):
    """Apply thread/memory settings and determinism; return the framework's name for the device.

    Raises a UserError when --device gpu is asked for and the backend sees no GPU,
    or fewer GPUs than `replicas`. On a CPU, `replicas` > 1 splits it into that
    many logical devices (TensorFlow; jax: device_env's XLA flag).
    """
    too_few = (f"train.replicas = {replicas} but {backend} sees {{}} {device.upper()} device(s); set "
               f"train.replicas to at most that")
    no_gpu = (f"train.devices includes 'gpu' but {backend} sees no GPU; remove 'gpu' from "
              f"train.devices, or install {backend} with CUDA support")
    if backend == "tensorflow":
        import tensorflow as tf
        tf.config.experimental.enable_op_determinism()
        if device == "cpu":  # train.cpu.* are the CPU run's settings (train@gpu does not declare them)
            if cpu.intra_op_threads:
                tf.config.threading.set_intra_op_parallelism_threads(cpu.intra_op_threads)
            if cpu.inter_op_threads:
                tf.config.threading.set_inter_op_parallelism_threads(cpu.inter_op_threads)
            cpus = tf.config.list_physical_devices("CPU")
            if replicas > 1:  # before anything starts TensorFlow's runtime
                tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * replicas)
            return cpus[0].name
        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            raise UserError(no_gpu)
        if len(gpus) < replicas:
            raise UserError(too_few.format(len(gpus)))
        tf.config.experimental.enable_tensor_float_32_execution(False)  # float32 as float32 (see device_env)
        for each in gpus[:replicas]:
            if gpu.memory_limit_mb:
                tf.config.set_logical_device_configuration(
                    each, [tf.config.LogicalDeviceConfiguration(memory_limit=gpu.memory_limit_mb)])
            elif gpu.memory_growth:
                tf.config.experimental.set_memory_growth(each, True)
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    if backend == "jax":
        import jax
        devices = jax.devices()
        if device == "gpu" and devices[0].platform != "gpu":
            raise UserError(no_gpu)
        if len(devices) < replicas:
            raise UserError(too_few.format(len(devices)))
        return f"{devices[0].platform}:{devices[0].device_kind}"
    import torch
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device == "cpu":
        if cpu.intra_op_threads:
            torch.set_num_threads(cpu.intra_op_threads)
        if cpu.inter_op_threads:
            torch.set_num_interop_threads(cpu.inter_op_threads)
        return "cpu"
    if not torch.cuda.is_available():
        raise UserError(no_gpu)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 as float32 (see device_env)
    torch.backends.cudnn.allow_tf32 = False
    if gpu.memory_limit_mb:
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu.memory_limit_mb / total_mb))
    return torch.cuda.get_device_name(0)


# Thread counts the frameworks read from the environment: how `dvc queue start -j N` gives each of its
# N workers a share of the cores (the workers inherit its environment); each run records those set.
THREAD_VARS = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")


def thread_env(environ):
    return {name: environ[name] for name in THREAD_VARS if name in environ}


def placement(variable):
    """Where a Keras variable's value actually lives, as the backend names it."""
    value = variable.value
    if hasattr(value, "devices"):  # jax
        return ",".join(sorted(str(d) for d in value.devices()))
    return str(value.device)


def on_gpu(where):
    return "gpu" in where.lower() or "cuda" in where.lower()


NOTABLE_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpuinfo_field(name, cpuinfo=None):
    """The value of the first `name` line of /proc/cpuinfo (or of the text given); None where there is none."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        if line.startswith(name):
            return line.split(":", 1)[1].strip()
    return None


def cpu_features(cpuinfo=None):
    """The vector and matrix units this CPU has, of those that decide which kernels oneDNN runs.

    From the flags line of /proc/cpuinfo (or the text given); [] where there is none.
    """
    flags = set((cpuinfo_field("flags", cpuinfo) or "").split())
    return [flag for flag in NOTABLE_CPU_FLAGS if flag in flags]


def has_bfloat16_units(features):
    """AVX512-BF16 or AMX: bfloat16 arithmetic in hardware; elsewhere oneDNN emulates it, slower than float32."""
    return "avx512_bf16" in features or "amx_bf16" in features


def onednn_enabled(backend):
    """Whether TensorFlow runs its oneDNN kernels in this process (None on other backends)."""
    if backend != "tensorflow":
        return None
    from tensorflow.python.util import _pywrap_util_port
    return bool(_pywrap_util_port.IsMklEnabled())


def cpu_model():
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def resolve_precision(precision, device, features):
    """The precision a run computes in: train.precision, with `auto` decided by the hardware.

    auto is mixed_bfloat16 on a GPU and on a CPU with bfloat16 units (AVX512-BF16
    or AMX), float32 on other CPUs, where oneDNN emulates bfloat16 and a step
    is many times slower than in float32. The run records what it resolved to.
    """
    if precision != "auto":
        return precision
    return "mixed_bfloat16" if device == "gpu" or has_bfloat16_units(features) else "float32"


def data_parallel(keras, backend, device, replicas, processes=False):
    """(scope, device names): within `with scope():`, a model is built and fitted on `replicas` devices at once,
    or (`processes`) on every device of every process of a job (mnist_cnn.processes).

    Data parallelism with the frameworks' own engines, at the same global batch:
    each device takes batch_size / replicas images of every batch and the
    gradients are summed across them before the one update, so the result is
    single-device training's up to the order of the sums (tests/test_train.py
    measures how close). tensorflow: tf.distribute.MirroredStrategy; jax: the
    Keras distribution API (keras.distribution.DataParallel). Batch
    normalization's statistics are then per device, as those engines do.
    Across processes each one feeds its own share of each batch (training.batches): Keras must not split
    the data again (auto_shard_dataset, which only knows tf.data).
    """
    if processes:
        devices = keras.distribution.list_devices(device)  # every process's
        distribution = keras.distribution.DataParallel(devices=devices, auto_shard_dataset=False)
        return distribution.scope, [str(d) for d in devices]
    if replicas == 1:
        return contextlib.nullcontext, []
    if backend == "tensorflow":
        import tensorflow as tf
        names = [d.name for d in tf.config.list_logical_devices(device.upper())][:replicas]
        return tf.distribute.MirroredStrategy(devices=names).scope, names
    devices = keras.distribution.list_devices(device)[:replicas]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return contextlib.nullcontext, [str(d) for d in devices]


def backend_version(backend):
    return __import__(backend).__version__  # the backends' module names are their param values
