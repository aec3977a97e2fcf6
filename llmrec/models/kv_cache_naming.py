"""The keyword under which transformers passes and returns a decoder's KV cache.

transformers 5.x renamed the ``past_key_values`` argument of every model's ``forward`` (and the field of its
outputs) to ``cache``: releases from the rename on warn on the old name on every call and 5.40 drops it, while
releases before it (5.23) know only the old name. The package supports both, so every call that
hands a cache to a model or reads one back goes through these two helpers instead of naming either spelling.

Example::

    out = model(input_ids=ids, use_cache=True, **cache_kwargs(cache))
    cache = returned_cache(out)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers.modeling_outputs import BaseModelOutputWithPast

# The output dataclass and the forward argument were renamed together; the dataclass is the one place to read it
# without building a model.
CACHE_KWARG: str = (
    "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"
)


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the installed transformers' name of a model's KV-cache argument."""
    return {CACHE_KWARG: cache}


def returned_cache(output: Any) -> Any:
    """The KV cache a transformers model output carries (``output.cache``, or ``past_key_values`` before the
    rename)."""
    return getattr(output, CACHE_KWARG)
