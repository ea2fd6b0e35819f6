"""params.yaml: every section's schema, the rules across its keys, and load_params(), which reads it once,
as DVC reads it, and refuses anything unknown, mistyped or out of range with one line naming the key."""

import re
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (BaseModel, ConfigDict, Field, HttpUrl, NonNegativeFloat, PositiveFloat, PositiveInt,
                      model_validator)

from mnist_cnn import IMAGE_SHAPE
from mnist_cnn.errors import UserError


PARAMS_FILE = "params.yaml"


SECTIONS = ("base", "fetch", "preprocess", "model", "train", "evaluate")


class Strict(BaseModel):
    """A params section: unknown keys, loosely typed values and non-finite floats are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class BaseParams(Strict):
    seed: typing.Annotated[int, Field(ge=0, lt=2**32)]  # NumPy's seeds are 32-bit
    backend: Literal["tensorflow", "jax", "torch"]


# --- fetch, preprocess, evaluate ---


class FetchParams(Strict):
    url: HttpUrl
    sha256: str
    timeout_s: float
    allow_sample: bool


# preprocess.scaler's choices, as the report describes the inputs each gives
SCALERS = {"per_pixel": "standardized per pixel (StandardScaler: each pixel's own mean and deviation)",
           "global": "standardized with one mean and one deviation over every pixel (StandardScaler)"}


class PreprocessParams(Strict):
    procedure: Literal["published_split", "pooled_resplit"]
    scaler: Literal[tuple(SCALERS)]


class EvaluateParams(Strict):
    batch_size: PositiveInt


# --- model ---


Activation = Literal["relu", "sigmoid", "elu", "tanh"]


LAYER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


Side = Annotated[int, Field(gt=0, le=IMAGE_SHAPE[0])]  # a square window on a 28x28 image


class ConvBlock(Strict):
    filters: Annotated[int, Field(gt=0, le=4096)]
    kernel_size: Side  # square kernel, "valid" padding, as in the seed
    activation: Activation
    pool_size: Side | None  # square max pooling after the convolution; null: none


class DenseLayer(Strict):
    units: Annotated[int, Field(gt=0, le=65536)]
    activation: Activation


class L2Params(Strict):
    conv: NonNegativeFloat   # penalty on the convolution kernels
    dense: NonNegativeFloat  # on the dense kernels, output layer included


class ModelParams(Strict):
    conv_blocks: dict[str, ConvBlock]
    dense_layers: dict[str, DenseLayer]
    output_activation: Literal["softmax", "sigmoid"]
    l2: L2Params
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]  # before each dense layer
    batch_norm: bool  # BatchNormalization after each conv (and its pooling) and hidden dense layer, before activation

    @model_validator(mode="after")
    def _together(self):
        """The architecture's own rules: every stage that reads `model` sees them."""
        check_architecture(self)
        return self


def check_architecture(model):
    """Refuse layer names Keras would reject and feature maps that shrink below 1x1.

    Returns the side of the last feature map.
    """
    names = list(model.conv_blocks) + list(model.dense_layers)
    for group, layers in (("conv_blocks", model.conv_blocks), ("dense_layers", model.dense_layers)):
        for name in layers:
            if not LAYER_NAME.match(name) or name in ("flatten", "output") or names.count(name) > 1:
                raise UserError(f"params.yaml: model.{group}.{name}: layer names must be unique, "
                                f"start with a letter, use letters, digits and _, and not be flatten/output")
    if not model.conv_blocks:
        raise UserError("params.yaml: model.conv_blocks is empty; this is a convolutional network, "
                        "give at least one block")
    side = IMAGE_SHAPE[0]
    for name, block in model.conv_blocks.items():
        if block.kernel_size > side:
            raise UserError(f"params.yaml: model.conv_blocks.{name}.kernel_size = {block.kernel_size}: "
                            f"the feature map is only {side}x{side} here; use a smaller kernel or fewer blocks")
        side = side - block.kernel_size + 1
        if block.pool_size:
            if block.pool_size > side:
                raise UserError(f"params.yaml: model.conv_blocks.{name}.pool_size = {block.pool_size}: "
                                f"the feature map is only {side}x{side} here; pool less or set it to null")
            side //= block.pool_size
    return side


# --- train ---


SPARSE_LOSSES = ("sparse_categorical_crossentropy",)


FLOAT32_TINY = 2.0**-126  # float32's smallest normal number, 1.1754944e-38 (np.finfo(np.float32).tiny)


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


def train_params_for(train, device):
    """The train params this device's stage reads (dvc.yaml lists them): not the device list, not the other's."""
    return train.model_dump(exclude={"devices", *({"cpu", "gpu"} - {device})})


# --- reading params.yaml ---


def load_params(path, **schemas):
    """Read params.yaml once and check the named sections against their schemas.

    `load_params("params.yaml", base=BaseParams, train=TrainParams)` returns
    {"base": BaseParams(...), "train": TrainParams(...)}.
    """
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    return {name: validate(raw.get(name), schema, name, path) for name, schema in schemas.items()}


def read_yaml(path):
    """params.yaml as DVC reads it: YAML 1.2 (ruamel.yaml's safe loader, DVC's own parser).

    PyYAML is YAML 1.1, where `1e-3` is a string and `on` is true: the stages
    would then see other values than `dvc params diff` and `-S` do. Duplicate
    keys and bytes that are not UTF-8 are refused rather than guessed at.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError, YAMLError

    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root, where params.yaml is") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte {err.object[err.start]:#04x}); "
                        f"save the file as UTF-8") from None
    try:
        return YAML(typ="safe").load(text)
    except DuplicateKeyError as err:
        raise UserError(f"{path}: line {err.problem_mark.line + 1}: {err.problem}; "
                        f"keep one of the two") from None
    except MarkedYAMLError as err:
        where = f"line {err.problem_mark.line + 1}: " if err.problem_mark else ""
        raise UserError(f"{path} is not valid YAML: {where}{err.problem or err.context}") from None
    except YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None


def validate(section, schema, name, path=PARAMS_FILE):
    """Check one section; the first problem becomes a one-line UserError naming the key."""
    from pydantic import ValidationError

    if section is None:
        raise UserError(f"{path}: section {name!r} is missing; see README.md for its keys")
    try:
        return schema.model_validate(section)
    except ValidationError as err:
        # A misspelt key is both unknown and missing; naming the unknown one helps more.
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = ".".join([name, *map(key_text, first["loc"])])
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, first["loc"][:-1])
            raise UserError(f"{path}: unknown key {key}; allowed here: {allowed}") from None
        if first["type"] == "missing":
            raise UserError(f"{path}: missing key {key}; add it (see README.md)") from None
        raise UserError(f"{path}: {key} = {first['input']!r}: {first['msg']}") from None


def key_text(part):
    """A key as the message shows it: plain names as they are, anything else quoted (no line breaks)."""
    part = str(part)
    return part if part.replace("_", "").isalnum() and part.isascii() else repr(part)


def _allowed_keys(schema, loc):
    """The field names of the schema found at `loc` (dict keys pass through)."""
    from pydantic import BaseModel

    for part in loc:
        if isinstance(schema, type) and issubclass(schema, BaseModel) and part in schema.model_fields:
            schema = schema.model_fields[part].annotation
        elif typing.get_origin(schema) is dict:
            schema = typing.get_args(schema)[1]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return ", ".join(schema.model_fields)
    return "none"
