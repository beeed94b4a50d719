"""What the entry points print: their own lines, and the libraries' records only when they fail.

absl's INFO default shows every checkpoint read and write of Orbax and every dataset lookup of
TFDS, which buries the progress and result lines; `--verbosity` (absl's flag) brings them back.
"""
import importlib.util
import logging
import os
import sys

from absl import logging as absl_logging

# Libraries whose INFO and WARNING records describe their own workings, not the run's.
LIBRARIES = ("orbax", "tensorflow_datasets", "jax", "jaxlib", "grain", "etils")


def _package_dirs(names):
  """The directories of the installed packages among `names`, found without importing them."""
  dirs = []
  for name in names:
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      continue
    if spec is not None:
      dirs.extend(os.path.join(d, "") for d in spec.submodule_search_locations or ())
  return tuple(dirs)


class _LibraryFilter(logging.Filter):
  """Drops the absl records below ERROR that the libraries log."""

  def __init__(self, dirs):
    super().__init__()
    self.dirs = dirs

  def filter(self, record):
    if record.levelno >= logging.ERROR:
      return True
    return not (self.dirs and record.pathname.startswith(self.dirs))


def quiet(verbosity_flag_present: bool):
  """Unless `--verbosity` was given: absl at WARNING, the libraries' records only from ERROR, and
  no TFDS progress bars (a dataset build here takes seconds; the corpora's own bars stay)."""
  if verbosity_flag_present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  # Libraries that use the standard logging module, under their own logger names.
  for name in LIBRARIES:
    logging.getLogger(name).setLevel(logging.ERROR)
  # Libraries that log through absl, whose records all come from the one "absl" logger.
  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _LibraryFilter) for f in absl_logger.filters):
    absl_logger.addFilter(_LibraryFilter(_package_dirs(LIBRARIES)))
  # TFDS is imported by the entry points that build datasets, before their main() runs; importing
  # it here would slow down the ones that do not.
  tfds = sys.modules.get("tensorflow_datasets")
  if tfds is not None:
    tfds.disable_progress_bar()
