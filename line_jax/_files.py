"""Files a run writes whole or not at all."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(path: str | os.PathLike, value: Any, *, sort_keys: bool = True,
               default=None) -> None:
  """Writes `value` as JSON atomically: a reader sees the old file or the whole new one.

  `default` turns what JSON cannot hold into what it can (`json.dump`'s).
  """
  path = os.fspath(path)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, sort_keys=sort_keys, default=default)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
