"""The one way a config check fails: naming the key, its value and what is allowed."""


class ConfigError(ValueError):
  """A config value is not allowed; the command lines exit with status 2 (usage) on it."""


def require(ok, key, value, allowed):
  """Raises `ConfigError("Bad config value key=value; allowed: ...")` unless `ok`."""
  if not ok:
    raise ConfigError(f"Bad config value {key}={value!r}; allowed: {allowed}.")
