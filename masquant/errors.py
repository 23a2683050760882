"""The errors masquant raises for bad input, each caught and reported by the app with its message.

- :class:`ConfigError`: a bad key, value or path of the run configuration (raised before any expensive work);
- :class:`MethodConfigError`: a method asked for something it cannot do (a scheme, a model family, a modality);
- :class:`CalibrationDataError`: calibration rows that cannot give what the run needs.
"""


class ConfigError(ValueError):
    """A bad key, value or path in the run configuration (raised before any expensive work)."""


class MethodConfigError(ValueError):
    """A method was asked for something it cannot do (raised before calibration)."""


class CalibrationDataError(ValueError):
    """Calibration rows that cannot give what the run needs (no answers, no tokens of a modality, ...)."""
