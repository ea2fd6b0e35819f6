"""What the stages share: params loading and checking, atomic writes, Keras set-up.

Kept small on purpose: anything only one stage needs lives in that stage.
"""

import json
import os
import shutil
import sys
import tempfile
import typing
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ROOT = Path(__file__).resolve().parent.parent
PARAMS_FILE = "params.yaml"
SECTIONS = ("base", "fetch", "preprocess", "model", "train", "evaluate")
BACKENDS = ("tensorflow", "jax", "torch")


class UserError(Exception):
    """A problem the user can fix (bad params, missing data): one line, no traceback."""


class Strict(BaseModel):
    """A params section: unknown keys and loosely typed values are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BaseParams(Strict):
    seed: int
    backend: Literal["tensorflow", "jax", "torch"]


def run(main):
    """Run a stage's main(); a UserError becomes one line on stderr and exit 2."""
    try:
        main()
    except UserError as err:
        sys.exit(f"error: {err}")


# --- params -----------------------------------------------------------------

def load_params(path, **schemas):
    """Read params.yaml once and check the named sections against their schemas.

    `load_params("params.yaml", base=BaseParams, train=TrainParams)` returns
    {"base": BaseParams(...), "train": TrainParams(...)}.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: run from the project root, where params.yaml is") from None
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    return {name: validate(raw.get(name), schema, name, path) for name, schema in schemas.items()}


def validate(section, schema, name, path=PARAMS_FILE):
    """Check one section; the first problem becomes a one-line UserError naming the key."""
    if section is None:
        raise UserError(f"{path}: section {name!r} is missing; see README.md for its keys")
    try:
        return schema.model_validate(section)
    except ValidationError as err:
        # A misspelt key is both unknown and missing; naming the unknown one helps more.
        first = sorted(err.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        key = ".".join([name, *map(str, first["loc"])])
        if first["type"] == "extra_forbidden":
            allowed = _allowed_keys(schema, first["loc"][:-1])
            raise UserError(f"{path}: unknown key {key}; allowed here: {allowed}") from None
        if first["type"] == "missing":
            raise UserError(f"{path}: missing key {key}; add it (see README.md)") from None
        raise UserError(f"{path}: {key} = {first['input']!r}: {first['msg']}") from None


def _allowed_keys(schema, loc):
    """The field names of the schema found at `loc` (dict keys pass through)."""
    for part in loc:
        if isinstance(schema, type) and issubclass(schema, BaseModel) and part in schema.model_fields:
            schema = schema.model_fields[part].annotation
        elif typing.get_origin(schema) is dict:
            schema = typing.get_args(schema)[1]
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        return ", ".join(schema.model_fields)
    return "none"


# --- atomic outputs ---------------------------------------------------------

@contextmanager
def atomic_path(final):
    """Yield a temporary path beside `final`; rename it into place on success.

    Works for files and folders. The temporary name keeps the final suffix
    (Keras insists on `.keras` and `.weights.h5`). On error it is removed and
    `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    tmp = tmp_dir / final.name
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def write_json(path, data):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path} not found: run `dvc repro` to make it") from None


# --- Keras --------------------------------------------------------------------

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
        import keras
    except ImportError as err:
        raise UserError(f"base.backend is {backend!r} but it cannot be imported ({err}); "
                        f"install it or set base.backend to tensorflow") from None
    if keras.backend.backend() != backend:
        raise UserError(f"Keras runs on {keras.backend.backend()!r}, not base.backend={backend!r}")
    return keras
