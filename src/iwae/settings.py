"""Checks of user settings, and the error that names the setting at fault.

A setting is named in two ways: as the library's keyword argument (``checkpoint_every_s``) and as the
command line's option (``--checkpoint-every``). ``SettingError`` keeps the names apart from the message
text, so the library reports its own names and the command line reports the options as the user typed them.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sized
from typing import Any

SEED_LIMIT = 2**63  # seeds are integers in [0, 2**63): what numpy's SeedSequence and every torch generator accept


class SettingError(ValueError):
    """A bad value of one or more named settings.

    ``template`` is formatted with the settings' names as positional fields ({0}, {1}, ...) and ``values``
    as keyword fields, so a value is never read as part of the template.
    """

    def __init__(self, template: str, names: tuple[str, ...], **values: Any) -> None:
        self.template, self.names, self.values = template, names, values
        super().__init__(self.message())

    def message(self, spell: Callable[[str], str] = str) -> str:
        """The message with each setting's name written as ``spell(name)``."""
        return self.template.format(*map(spell, self.names), **self.values)


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int, if it is an integer (NumPy's too) in [0, 2**63); else SettingError."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < SEED_LIMIT:
        raise SettingError("{0} must be an integer from 0 to 2**63 - 1; got {value!r}", (name,), value=seed)
    return int(seed)


def check_integer(value: object, name: str, low: int,
                  template: str = "{0} must be an integer >= {low}; got {value!r}") -> int:
    """``value`` as an int, if it is an integer (NumPy's too) >= ``low``; else SettingError, its message
    ``template`` with the fields {0} (the name), {low} and {value}."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise SettingError(template, (name,), low=low, value=value)
    return int(value)


def check_samples(k: object, name: str = "k") -> int:
    """``k`` as an int, if it is a positive integer (NumPy's too): a number of samples; else SettingError."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise SettingError("{0} must be a positive integer number of samples; got {0}={k!r}", (name,), k=k)
    return int(k)


def plain_number(value: object) -> object:
    """A NumPy number as Python's: an integer as an int, a real as the float its text writes (np.float32(0.01) as
    0.01, not float32's nearest value); anything else as it is."""
    if isinstance(value, bool) or type(value) in (int, float):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(str(value))
    return value


def check_positive(value: float, name: str) -> None:
    """Raise SettingError unless ``value`` is a finite number > 0."""
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise SettingError("{0} must be a finite number > 0; got {value!r}", (name,), value=value)


def check_examples(x: Sized, name: str = "x") -> None:
    """Raise SettingError if ``x`` (a batch of examples along its first dimension) holds none."""
    if len(x) == 0:
        raise SettingError("{0} holds no examples; give at least one", (name,))
