"""The configuration's errors and the "did you mean" hint they share."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import NoReturn


class ConfigError(ValueError):
    """A configuration problem; the message names where it is and how to fix it."""


class ConfigAttributeError(ConfigError, AttributeError):
    """An unknown or ambiguous flat attribute of HybridConfig (an AttributeError, so hasattr() works)."""


Fail = Callable[[str, str, str], NoReturn]
"""``fail(section, key, message)``: raise a ConfigError naming where section.key was set."""


def _did_you_mean(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
