"""The JSON records line_jax writes into its folders, read back with one set of errors."""

from __future__ import annotations

import json
import os
from typing import Any


def read_object(file: str | os.PathLike, *, missing: str, format: str | None = None
                ) -> dict[str, Any]:
  """The JSON object in `file`, whose `"format"` is `format` where given.

  Raises:
    ValueError: naming `file`: absent (`missing` says what the folder then is
      not), not JSON, not an object, or of another format.
  """
  file = os.fspath(file)
  if not os.path.isfile(file):
    raise ValueError(f"{file} not found: {missing}")
  try:
    with open(file) as f:
      value = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{file} is not valid JSON: {e}") from e
  if not isinstance(value, dict):
    raise ValueError(f"{file} must hold a JSON object")
  if format is not None and value.get("format") != format:
    raise ValueError(f"{file} is not a {format} record")
  return value
