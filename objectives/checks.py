"""The one way an objective's config check fails: naming the key, its value and what is allowed."""


def require(ok, key, value, allowed):
  """Raises `ValueError("Bad config value key=value; allowed: ...")` unless `ok`."""
  if not ok:
    raise ValueError(f"Bad config value {key}={value!r}; allowed: {allowed}.")
