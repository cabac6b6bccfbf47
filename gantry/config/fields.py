"""Field types shared by the config sections (imports nothing of ours but pydantic's types).

- `StrictFloat` a float that TOML must give as a float (an integer is not silently widened)
- `Dtype`       the dtypes a section may name for weights or computation
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Strict

StrictFloat = Annotated[float, Strict()]
Dtype = Literal["float32", "bfloat16", "float16"]
