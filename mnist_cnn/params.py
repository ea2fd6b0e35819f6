"""params.yaml: every section's schema, the rules across its keys, and load_params(), which reads it once,
as DVC reads it, and refuses anything unknown, mistyped or out of range with one line naming the key."""

import math
import re
import typing
import warnings
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, HttpUrl, model_validator

from mnist_cnn import IMAGE_SHAPE, N_CLASSES
from mnist_cnn.errors import UserError, printable, shown


PARAMS_FILE = "params.yaml"


# What reading params.yaml may cost, checked before it is parsed: the project's file is ~5 KB and 4 levels
# deep. ruamel's scanner is quadratic in the nesting (100,000 brackets: 6 minutes), and an alias may stand
# for a value of any size (a 4 KB "billion laughs" expands to gigabytes), so neither is let through.
MAX_PARAMS_BYTES = 256 * 1024
MAX_DEPTH = 16


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
    timeout_s: Annotated[float, Field(gt=0.0, le=3600.0)]  # per network read; an hour is no longer a timeout
    allow_sample: bool


# preprocess.scaler's choices, as the report describes the inputs each gives
SCALERS = {"per_pixel": "standardized per pixel (StandardScaler: each pixel's own mean and deviation)",
           "global": "standardized with one mean and one deviation over every pixel (StandardScaler)"}


class PreprocessParams(Strict):
    procedure: Literal["published_split", "pooled_resplit"]
    scaler: Literal[tuple(SCALERS)]


class EvaluateParams(Strict):
    batch_size: Annotated[int, Field(gt=0, le=100_000)]
    max_batch_mb: Annotated[int, Field(gt=0, le=1_048_576)]  # the layers' values for one batch (layer_values)


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
    conv: Annotated[float, Field(ge=0.0, le=10.0)]   # penalty on the convolution kernels
    dense: Annotated[float, Field(ge=0.0, le=10.0)]  # on the dense kernels, output layer included


class ModelLimits(Strict):
    """What the network may cost, checked from params before anything is built (layer_values); raise a limit here,
    in params.yaml, so that the run that needs it stays reproducible."""

    weights: Annotated[int, Field(gt=0, le=10**10)]
    mflops_per_image: Annotated[float, Field(gt=0.0, le=10**7)]  # one forward pass, multiply-adds counted as 2
    layers: Annotated[int, Field(gt=0, le=1000)]                 # conv blocks plus dense layers


class ModelParams(Strict):
    conv_blocks: dict[str, ConvBlock]
    dense_layers: dict[str, DenseLayer]
    limits: ModelLimits
    output_activation: Literal["softmax", "sigmoid"]
    l2: L2Params
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)]  # before each dense layer
    batch_norm: bool  # BatchNormalization after each conv (and its pooling) and hidden dense layer, before activation

    @model_validator(mode="after")
    def _together(self):
        """The architecture's own rules and its cost: every stage that reads `model` sees them."""
        check_layer_count(self)
        check_architecture(self)
        check_cost(self)
        return self


def check_layer_count(model):
    layers = len(model.conv_blocks) + len(model.dense_layers)
    if layers > model.limits.layers:
        raise UserError(f"params.yaml: model has {layers:,} layers (conv_blocks and dense_layers), over "
                        f"model.limits.layers = {model.limits.layers:,}; use fewer, or raise the limit")


def weighted_layers(model):
    """(fan_in, units, positions) of each layer with weights, in order, from the params alone.

    A conv block: fan_in = kernel^2 x input channels, units = filters, positions
    = the output map's side^2; a dense layer: positions = 1. Pooling and Flatten
    only reshape, so they appear in the sides and widths, not as layers.
    """
    side, channels, shapes = IMAGE_SHAPE[0], IMAGE_SHAPE[2], []
    for block in model.conv_blocks.values():
        side = side - block.kernel_size + 1
        shapes.append((block.kernel_size ** 2 * channels, block.filters, side * side))
        channels = block.filters
        side = side // block.pool_size if block.pool_size else side
    width = side * side * channels
    for units in [layer.units for layer in model.dense_layers.values()] + [N_CLASSES]:
        shapes.append((width, units, 1))
        width = units
    return shapes


def count_weights(model):
    """The number of weights Keras holds, computed from the params alone (a check on Keras).

    With batch_norm, each conv and hidden dense layer has no bias (the
    normalization's shift replaces it) and its normalization 4 per unit: a
    scale and a shift that train, a mean and a variance that track the batches.
    """
    layers = weighted_layers(model)
    if not model.batch_norm:
        return sum((fan_in + 1) * units for fan_in, units, _ in layers)
    *hidden, (fan_in, units, _) = layers
    return sum((f + 4) * u for f, u, _ in hidden) + (fan_in + 1) * units


def train_flops(model):
    """Floating-point operations to train on one image, from the params alone: 3x the forward pass.

    Forward: 2 per multiply-add of the convolutions and dense layers (biases,
    activations and pooling are left out: under 1 %). The backward pass costs
    about twice the forward (gradients for the inputs and for the weights),
    the usual convention; the seed's CNN: 3 x 5.6 M = 16.8 MFLOP.
    """
    return 3 * forward_flops(model)


def forward_flops(model):
    """One image's forward pass: 2 per multiply-add of the convolutions and dense layers."""
    return sum(2 * fan_in * units * positions for fan_in, units, positions in weighted_layers(model))


def layer_values(model):
    """Every layer's outputs for one image, from the params alone (values_per_image reads the same off a built
    network): a batch holds batch_size times as many, and training as many gradients again."""
    side, values = IMAGE_SHAPE[0], 0
    per_layer = 3 if model.batch_norm else 1  # the layer's, its normalization's and its activation's outputs
    for block in model.conv_blocks.values():
        side = side - block.kernel_size + 1
        values += side * side * block.filters
        if block.pool_size:
            side //= block.pool_size
            values += side * side * block.filters
        values += (per_layer - 1) * side * side * block.filters
        channels = block.filters
    width = side * side * channels
    values += width  # Flatten
    for units in [layer.units for layer in model.dense_layers.values()]:
        values += units * per_layer + (width if model.dropout else 0)
        width = units
    return values + N_CLASSES + (width if model.dropout else 0)


def values_per_image(network):
    """layer_values read off a built Keras network: for the stages that have the network and not the
    model params (train, evaluate). Tests check that the two agree."""
    return sum(math.prod(layer.output.shape[1:]) for layer in network.layers)


def check_cost(model):
    """Refuse a network over model.limits, with its figure and the key that would allow it."""
    weights, flops, limits = count_weights(model), forward_flops(model), model.limits
    if weights > limits.weights:
        raise UserError(f"params.yaml: this model has {weights:,} weights, over model.limits.weights = "
                        f"{limits.weights:,}; use fewer filters or units, pool sooner, or raise the limit")
    if flops / 1e6 > limits.mflops_per_image:
        raise UserError(f"params.yaml: this model costs {flops / 1e6:,.0f} MFLOP per image, over "
                        f"model.limits.mflops_per_image = {limits.mflops_per_image:,g} (the seed's: 5.6); use "
                        f"fewer filters, pool sooner, or raise the limit")


def batch_megabytes(values_per_image, batch_size, training):
    """The layers' values for one batch, in MB of float32: in training each has its gradient beside it."""
    return values_per_image * batch_size * 4 * (2 if training else 1) / 1e6


def check_batch_memory(values_per_image, batch_size, limit_mb, keys, training):
    """Refuse a batch whose layer values would pass limit_mb; keys: (the batch size's key, the limit's key)."""
    need = batch_megabytes(values_per_image, batch_size, training)
    if need > limit_mb:
        raise UserError(f"params.yaml: a batch of {batch_size:,} needs about {need:,.0f} MB for this model's "
                        f"layer values, over {keys[1]} = {limit_mb:,}; lower {keys[0]}, or raise the limit")


def check_architecture(model):
    """Refuse layer names Keras would reject and feature maps that shrink below 1x1.

    Returns the side of the last feature map.
    """
    names = list(model.conv_blocks) + list(model.dense_layers)
    for group, layers in (("conv_blocks", model.conv_blocks), ("dense_layers", model.dense_layers)):
        for name in layers:
            if not LAYER_NAME.match(name) or name in ("flatten", "output") or names.count(name) > 1:
                raise UserError(f"params.yaml: model.{group}.{key_text(name)}: layer names must be unique, "
                                f"start with a letter, use letters, digits and _, and not be flatten/output")
    if not model.conv_blocks:
        raise UserError("params.yaml: model.conv_blocks is empty; this is a convolutional network, "
                        "give at least one block")
    side = IMAGE_SHAPE[0]
    for name, block in model.conv_blocks.items():
        if block.kernel_size > side:
            raise UserError(f"params.yaml: model.conv_blocks.{key_text(name)}.kernel_size = {block.kernel_size}: "
                            f"the feature map is only {side}x{side} here; use a smaller kernel or fewer blocks")
        side = side - block.kernel_size + 1
        if block.pool_size:
            if block.pool_size > side:
                raise UserError(f"params.yaml: model.conv_blocks.{key_text(name)}.pool_size = {block.pool_size}: "
                                f"the feature map is only {side}x{side} here; pool less or set it to null")
            side //= block.pool_size
    return side


# --- train ---


SPARSE_LOSSES = ("sparse_categorical_crossentropy",)


FLOAT32_MAX = 3.4028234663852886e38  # np.finfo(np.float32).max: past it a rate is infinite in the optimizer


FLOAT32_TINY = 2.0**-126  # float32's smallest normal number, 1.1754944e-38 (np.finfo(np.float32).tiny)


ONE_HOT_LOSSES = ("categorical_crossentropy", "binary_crossentropy", "mean_squared_error")


class CpuParams(Strict):
    intra_op_threads: Annotated[int, Field(ge=0, le=1024)]
    inter_op_threads: Annotated[int, Field(ge=0, le=1024)]
    onednn: bool | None  # TensorFlow's oneDNN kernels on or off; null: TensorFlow's choice for this CPU


class GpuParams(Strict):
    memory_growth: bool
    memory_limit_mb: Annotated[int, Field(gt=0, le=1_048_576)] | None


class AugmentParams(Strict):
    rotation: Annotated[float, Field(ge=0.0, le=180.0)]  # degrees, either way
    shift: Annotated[float, Field(ge=0.0, le=0.5)]       # a share of the side, each axis, either way
    zoom: Annotated[float, Field(ge=0.0, lt=1.0)]        # a share of the size, in or out


class TrainParams(Strict):
    devices: Annotated[list[Literal["cpu", "gpu"]], Field(min_length=1, max_length=2)]
    epochs: Annotated[int, Field(gt=0, le=10_000)]
    batch_size: Annotated[int, Field(gt=0, le=60_000)]
    steps_per_execution: Annotated[int, Field(gt=0, le=10_000)]
    replicas: Annotated[int, Field(ge=1, le=64)]  # data parallelism over this many devices of the host
    processes: Annotated[int, Field(ge=1, le=1024)]  # one model trained by this many processes (jax)
    optimizer: Literal["rmsprop", "sgd", "adam"]
    learning_rate: Annotated[float, Field(gt=0.0, le=FLOAT32_MAX)]  # the optimizers keep it in float32
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
    max_batch_mb: Annotated[int, Field(gt=0, le=1_048_576)]  # one batch's layer values and gradients
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
    if train.processes > 1 and backend != "jax":
        # Keras 3's fit fails under TensorFlow's MultiWorkerMirroredStrategy (keras#20585, tensorflow#72388), and
        # Keras on torch has no multi-process API: Keras's distribution API on JAX is the engine that does it
        raise UserError(f"params.yaml: train.processes = {train.processes} runs on jax only (Keras's distribution "
                        f"API; on {backend}, Keras 3 cannot train one model in several processes); set "
                        f"base.backend: jax, or train.processes: 1")
    if train.processes > 1 and train.replicas > 1:
        raise UserError(f"params.yaml: train.processes = {train.processes} with train.replicas = {train.replicas}: "
                        f"each process uses its devices itself (every GPU it sees; a CPU is one device); set "
                        f"train.replicas: 1")


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
    unknown = sorted(set(raw) - set(SECTIONS), key=str)
    if unknown:
        raise UserError(f"{path}: unknown section {shown(unknown[0])}; allowed: {', '.join(SECTIONS)}")
    return {name: validate(raw.get(name), schema, name, path) for name, schema in schemas.items()}


SCHEMAS = {"base": BaseParams, "fetch": FetchParams, "preprocess": PreprocessParams, "model": ModelParams,
           "train": TrainParams, "evaluate": EvaluateParams}


def check_sections(params, path=PARAMS_FILE):
    """Every section of a params tree against its schema, as the stages will read them (a UserError naming the
    first wrong key); for a tree made from params.yaml by a preset or a search before anything runs."""
    for name, schema in SCHEMAS.items():
        validate(params.get(name), schema, name, path=path)


# --- dotted keys, as `dvc exp run -S train.epochs=3` names them ---


def dotted_get(params, dotted):
    """params["train"]["epochs"] for "train.epochs"; a KeyError where the key is not there."""
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict):
            raise KeyError(dotted)
        node = node[part]
    return node


def with_settings(params, settings, source):
    """A copy of params (params.yaml's tree) with each dotted key of `settings` set. A key that is not there is
    refused, naming `source`: tools set the keys params.yaml has, never add one (the stages would refuse it
    later, after a run had started)."""
    import copy

    params = copy.deepcopy(params)
    for dotted, value in settings.items():
        *parents, last = dotted.split(".")
        node = params
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or last not in node:
            raise UserError(f"{source}: {printable(dotted)} is not a key of {PARAMS_FILE}; set only keys that are "
                            f"there (fix the key, or add it to {PARAMS_FILE})")
        node[last] = value
    return params


def read_yaml(path):
    """params.yaml as DVC reads it: YAML 1.2 (ruamel.yaml's safe loader, DVC's own parser).

    PyYAML is YAML 1.1, where `1e-3` is a string and `on` is true: the stages
    would then see other values than `dvc params diff` and `-S` do. Duplicate
    keys and bytes that are not UTF-8 are refused rather than guessed at.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.constructor import DuplicateKeyError
    from ruamel.yaml.error import MarkedYAMLError, ReusedAnchorWarning, YAMLError

    try:
        size = path.stat().st_size
        if size > MAX_PARAMS_BYTES:
            raise UserError(f"{path} is {size:,} bytes, over the limit of {MAX_PARAMS_BYTES:,}; params.yaml "
                            f"holds settings, not data (the project's is about 5 KB)")
        data = path.read_bytes()[:MAX_PARAMS_BYTES + 1]
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root, where params.yaml is") from None
    except UnicodeDecodeError as err:
        line = err.object[:err.start].count(b"\n") + 1
        raise UserError(f"{path}: line {line} is not UTF-8 text (byte {err.object[err.start]:#04x}); "
                        f"save the file as UTF-8") from None
    try:
        check_structure(text, path)
        with warnings.catch_warnings():
            # an anchor given twice is harmless once aliases are refused; ruamel's warning would be many lines
            warnings.simplefilter("ignore", ReusedAnchorWarning)
            return YAML(typ="safe").load(text)
    except DuplicateKeyError as err:
        raise UserError(f"{path}: line {err.problem_mark.line + 1}: {clip(err.problem)}; "
                        f"keep one of the two") from None
    except MarkedYAMLError as err:
        where = f"line {err.problem_mark.line + 1}: " if err.problem_mark else ""
        raise UserError(f"{path} is not valid YAML: {where}{clip(err.problem or err.context)}") from None
    except YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {clip(err)}") from None


def clip(text, limit=160):
    """A parser's own words, which may quote a value of any size, cut to one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else f"{text[:limit - 4]} ..."


def check_structure(text, path):
    """Refuse aliases and deep nesting from the parser's events, before anything is built from them (the
    events come one at a time: the scan stops at the first problem)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent

    depth = 0
    for event in YAML(typ="safe").parse(text):
        if isinstance(event, AliasEvent):
            raise UserError(f"{path}: line {event.start_mark.line + 1}: a YAML alias (*{event.anchor[:40]}); "
                            f"write the value out (an alias can stand for a value of any size)")
        if isinstance(event, CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                raise UserError(f"{path}: line {event.start_mark.line + 1}: nested over {MAX_DEPTH} levels deep; "
                                f"params.yaml's sections are 4 levels deep")
        elif isinstance(event, CollectionEndEvent):
            depth -= 1


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
        raise UserError(f"{path}: {key} = {shown(first['input'])}: {first['msg']}") from None


def key_text(part):
    """A key as the message shows it: plain names as they are, anything else quoted (no line breaks)."""
    part = str(part)
    return part if part.replace("_", "").isalnum() and part.isascii() and len(part) <= 80 else shown(part)


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
