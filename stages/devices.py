"""Devices: what must be set before a backend is imported, thread and memory settings, and where a run ran.

train's --device gpu fails unless the backend sees a GPU, and after training
the weights' actual placement is checked (placement, on_gpu), so a run is
never labeled GPU that ran on a CPU.
"""

import platform
from pathlib import Path

from stages.common import UserError


def device_env(backend, device, gpu, cpu=None, replicas=1):
    """Environment variables that must be set before the backend is imported."""
    env = {}
    if backend == "jax" and device == "cpu" and replicas > 1:
        # XLA shows one CPU device unless told to split the host (the cores are shared among them)
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={replicas}"
    if backend == "tensorflow" and device == "cpu" and cpu is not None and cpu.onednn is not None:
        # TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX512-VNNI, -BF16 or
        # AMX; on a 2-core EPYC without AVX-512 they train the seed's CNN about 8 % faster than
        # Eigen's (bench/step_profile.py: conv2's weight gradient 18 -> 32 GFLOP/s)
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
