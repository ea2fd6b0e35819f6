"""The base of every params section's schema (pydantic), apart from stages/common.py.

predict and serve need common's files and errors but no params: keeping
pydantic out of common's imports saves them about 0.2 s of every cold start.
`from stages.common import Strict, BaseParams` still works (common passes them on).
"""

import typing
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    """A params section: unknown keys, loosely typed values and non-finite floats are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)


class BaseParams(Strict):
    seed: typing.Annotated[int, Field(ge=0, lt=2**32)]  # NumPy's seeds are 32-bit
    backend: Literal["tensorflow", "jax", "torch"]
