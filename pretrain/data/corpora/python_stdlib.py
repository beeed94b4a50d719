"""A local TFDS corpus: the running interpreter's standard-library `.py` files.

Why: it gives every machine a real, license-clean, offline code corpus (~1,800
files / ~31 MB on CPython 3.11) to pretrain and test on, with no download.

Also home of the helpers both local builders share (hash split, lenient UTF-8
decoding, the common feature spec), so `local_text` splits exactly the same way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import sys
import sysconfig

import tensorflow_datasets as tfds
import tqdm
from etils import epath

log = logging.getLogger(__name__)

DEFAULT_VALIDATION_FRACTION = 0.05
SPLITS = ("train", "validation")
# Third-party code and bytecode caches are not "the standard library".
_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def split_for_key(key: str, validation_fraction: float) -> str:
  """Assigns `key` to "train" or "validation" by a hash of the key.

  A content-independent hash (sha1 of the key, e.g. a relative path) keeps the
  split stable across machines, file orders and rebuilds, so a document never
  migrates between train and validation.
  """
  if not 0.0 <= validation_fraction < 1.0:
    raise ValueError(
        f"data.validation_fraction={validation_fraction!r} is not in [0, 1); "
        "set --config.data.validation_fraction to e.g. 0.05.")
  digest = hashlib.sha1(key.encode("utf-8")).digest()
  unit = int.from_bytes(digest[:8], "big") / 2.0**64
  return "validation" if unit < validation_fraction else "train"


def decode_text(data: bytes) -> tuple[str, bool]:
  """Decodes UTF-8, replacing bad bytes; returns (text, had_bad_bytes).

  Why lenient: one stray latin-1 file must not abort a corpus build; the caller
  counts the replacements so they are visible rather than silent.
  """
  try:
    return data.decode("utf-8"), False
  except UnicodeDecodeError:
    return data.decode("utf-8", errors="replace"), True


def text_features() -> tfds.features.FeaturesDict:
  """The feature spec shared by the local builders: document text + its origin."""
  return tfds.features.FeaturesDict({
      "text": tfds.features.Text(),
      "path": tfds.features.Text(),
  })


class DecodeStats:
  """Counts documents and bad-UTF-8 documents per split of one build.

  Why: the counts end up in the dataset's metadata.json and in the log, so a
  corpus with mangled files is noticed.
  """

  def __init__(self):
    self.documents = {s: 0 for s in SPLITS}
    self.replaced = {s: 0 for s in SPLITS}

  def record(self, split: str, had_bad_bytes: bool) -> None:
    self.documents[split] += 1
    self.replaced[split] += int(had_bad_bytes)

  def finish(self, split: str, info: tfds.core.DatasetInfo, name: str) -> None:
    info.metadata[f"{split}_documents"] = self.documents[split]
    info.metadata[f"{split}_utf8_replaced_documents"] = self.replaced[split]
    if self.replaced[split]:
      log.warning("%s/%s: %d document(s) were not valid UTF-8 and were "
                  "decoded with replacement characters.",
                  name, split, self.replaced[split])


def builder_code_path(cls) -> epath.Path:
  """The source file of builder class `cls` (TFDS's `code_path`).

  Why: TFDS's own lookup touches `importlib_resources`, a package TFDS only
  declares for Python < 3.9, so it crashes here; the file path is the answer
  it would reach anyway.
  """
  return epath.Path(inspect.getfile(cls))


def nonempty_splits(counts: dict, name: str) -> list[str]:
  """The splits with at least one document, warning about the others.

  Why: TFDS refuses to write an empty split, and a tiny corpus can hash every
  document to "train"; the missing split is then reported by name at read
  time (see `pretrain.data.sources.open_source`).
  """
  present = [s for s in SPLITS if counts[s]]
  for s in SPLITS:
    if not counts[s]:
      log.warning("%s: no document hashes to split %r; it will be absent. "
                  "Add documents or raise validation_fraction.", name, s)
  return present


def stdlib_root() -> str:
  """The standard-library directory of the running interpreter."""
  return sysconfig.get_paths()["stdlib"]


def list_stdlib_files(root: str | None = None,
                      max_files: int | None = None) -> list[str]:
  """Sorted relative (posix) paths of the `.py` files under `root`.

  os.walk without following symlinks keeps the listing finite and
  deterministic; sorting makes `max_files` pick the same files every time.
  """
  root = root or stdlib_root()
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_DIRS]
    rel_dir = os.path.relpath(dirpath, root)
    for fname in filenames:
      if fname.endswith(".py"):
        rel = fname if rel_dir == "." else os.path.join(rel_dir, fname)
        found.append(rel.replace(os.sep, "/"))
  found.sort()
  return found[:max_files] if max_files else found


@dataclasses.dataclass(eq=False)
class PythonStdlibConfig(tfds.core.BuilderConfig):
  """Config of one stdlib build; build it with `stdlib_config(...)`."""
  validation_fraction: float = DEFAULT_VALIDATION_FRACTION
  max_files: int | None = None  # Only for fast tests.
  root: str | None = None  # None = this interpreter's stdlib.


def stdlib_config(validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
                  max_files: int | None = None,
                  root: str | None = None) -> PythonStdlibConfig:
  """Makes a config whose name encodes everything that changes the data.

  Why: TFDS caches by <name>/<config>/<version>; two different corpora (Python
  version, split fraction, file cap, custom root) must never share a directory.
  """
  split_for_key("", validation_fraction)  # Validates the fraction early.
  if root is None:
    origin = f"py{sys.version_info.major}.{sys.version_info.minor}"
  else:
    origin = "root" + hashlib.sha1(
        os.path.abspath(root).encode()).hexdigest()[:10]
  name = f"{origin}-val{validation_fraction:g}"
  if max_files:
    name += f"-max{int(max_files)}"
  return PythonStdlibConfig(
      name=name, version=PythonStdlib.VERSION,
      description=f"stdlib .py files ({origin}), validation fraction "
                  f"{validation_fraction:g}, max_files={max_files}.",
      validation_fraction=validation_fraction, max_files=max_files, root=root)


class PythonStdlib(tfds.core.GeneratorBasedBuilder):
  """Standard-library source files, one document per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No BUILDER_CONFIGS: configs are made on the fly by `stdlib_config`, and a
  # predefined one with the same name would be rejected by TFDS.

  code_path = tfds.core.utils.classproperty(classmethod(builder_code_path))

  def __init__(self, *, config: PythonStdlibConfig | None = None, **kwargs):
    super().__init__(config=config or stdlib_config(), **kwargs)
    self._stats = DecodeStats()
    self._by_split = None

  def plan(self) -> dict[str, list[str]]:
    """The non-empty files of each split; read before anything is written."""
    if self._by_split is None:
      cfg = self.builder_config
      root = cfg.root or stdlib_root()
      by_split = {s: [] for s in SPLITS}
      for rel in list_stdlib_files(root, cfg.max_files):  # TFDS cannot write an empty split.
        if os.path.getsize(os.path.join(root, rel)) and read_file(root, rel)[0].strip():
          by_split[split_for_key(rel, cfg.validation_fraction)].append(rel)
      if not any(by_split.values()):
        raise ValueError(
            f"No non-empty .py files found under {root!r}; check that the "
            "interpreter ships its standard library as source (slim images "
            "may strip it) or use the local_text corpus instead.")
      self._by_split = by_split
    return self._by_split

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Python standard-library source files of the building "
                    "interpreter; `path` is relative to the stdlib root.",
        features=text_features(),
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    root = self.builder_config.root or stdlib_root()
    by_split = self.plan()
    return {s: self._generate_examples(root, by_split[s], s)
            for s in nonempty_splits(by_split, "python_stdlib")}

  def _generate_examples(self, root, rel_paths, split):
    for rel in tqdm.tqdm(rel_paths, desc=f"python_stdlib {split}",
                         unit="file", mininterval=1.0):
      text, bad = read_file(root, rel)
      self._stats.record(split, bad)
      yield rel, {"text": text, "path": rel}
    self._stats.finish(split, self.info, "python_stdlib")


def read_file(root: str, rel: str) -> tuple[str, bool]:
  """(text, whether undecodable bytes were replaced) of the file `rel` under `root`."""
  with open(os.path.join(root, rel), "rb") as f:
    return decode_text(f.read())
