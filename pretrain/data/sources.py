"""Opens one split of a corpus as a grain random-access source of document texts.

Why one code path: the local corpora (`python_stdlib`, `local_text`) are TFDS
builders written as array_record, exactly like a prepared TFDS catalog dataset
("wikipedia/20230601.en", "c4/en", ...), so every corpus is read through
`builder.as_data_source(split)` and only the builder construction differs.
Local corpora are built into `data.data_dir` on first use; catalog
datasets must already be prepared there (this library never downloads).
A build first reads and checks every input (`builder.plan()`), so a bad input
stops the run before anything is written, and a build that fails anyway
removes the directories it created (`tidy_on_failure`).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds

from pretrain.data import pair_files
from pretrain.data.corpora import local_text, python_stdlib

log = logging.getLogger(__name__)

LOCAL_CORPORA = ("python_stdlib", "local_text")


def _get(cfg, key: str, default):
  """Reads an optional config field (ConfigDict or any attribute holder)."""
  value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
  return default if value is None else value


def data_dir(data_config) -> str | None:
  """The TFDS data dir as an absolute path or a URL (None = TFDS's default)."""
  d = _get(data_config, "data_dir", "")
  if not d or "://" in d:  # gs://bucket/tfds stays a URL for TFDS.
    return d or None
  return os.path.abspath(os.path.expanduser(d))


def check_can_create(path: str, key: str, fix: str = "") -> None:
  """Raises unless directory `path` exists or could be made; creates nothing.

  Why: found before a corpus build or a tokenizer training rather than after
  it, and without leaving half of a directory tree behind.
  """
  if "://" in path:
    return
  fix = fix or f"set --config.{key} to a writable directory"
  existing = os.path.abspath(path)
  while not os.path.exists(existing) and os.path.dirname(existing) != existing:
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise NotADirectoryError(f"{key}: cannot create directory {path!r}: {existing!r} is "
                             f"a file; {fix}.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise PermissionError(f"{key}: cannot create or write directory {path!r}: no write "
                          f"permission in {existing!r}; {fix}.")


def _missing(path: str) -> list[str]:
  """`path` and those of its parent directories that do not exist yet."""
  out = []
  path = os.path.abspath(path)
  while not os.path.lexists(path) and os.path.dirname(path) != path:
    out.append(path)
    path = os.path.dirname(path)
  return out


@contextlib.contextmanager
def tidy_on_failure(*paths: str):
  """If the block raises, removes the `paths` (and parents) it created.

  Files among them are deleted, directories only when left empty, so nothing
  another process or an earlier run wrote is touched.
  """
  created = sorted({p for path in paths if "://" not in path for p in _missing(path)},
                   key=lambda p: p.count(os.sep), reverse=True)
  try:
    yield
  except BaseException:
    for p in created:
      with contextlib.suppress(OSError):
        if os.path.isdir(p) and not os.path.islink(p):
          os.rmdir(p)
        elif os.path.lexists(p):
          os.unlink(p)
    raise


@contextlib.contextmanager
def file_lock(path: str):
  """Holds an exclusive lock on `path` (created if needed).

  Why: several processes of one job may start together on a shared data_dir;
  the first builds (a corpus, a tokenizer) while the others wait and then
  reuse its result instead of racing to write the same files.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _local_builder(data_config) -> tfds.core.DatasetBuilder:
  fraction = float(_get(data_config, "validation_fraction",
                        python_stdlib.DEFAULT_VALIDATION_FRACTION))
  if data_config.name == "python_stdlib":
    return python_stdlib.PythonStdlib(
        config=python_stdlib.stdlib_config(fraction),
        data_dir=data_dir(data_config), file_format="array_record")
  config = local_text.local_text_config(
      _get(data_config, "paths", ""),
      jsonl_field=_get(data_config, "text_feature", "text"),
      validation_fraction=fraction)
  return local_text.LocalText(config=config, data_dir=data_dir(data_config),
                              file_format="array_record")


def check_corpus(data_config) -> None:
  """Reads (and builds, for a local corpus) the data, so that its errors come first."""
  if data_config.name == pair_files.NAME:
    open_source(data_config, data_config.get("train_split", "train") or "train")
  else:
    get_builder(data_config)


def get_builder(data_config) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `data.name` (building local corpora).

  A catalog dataset that is not prepared in data_dir is an error with the
  command that prepares it, since nothing is downloaded here.
  """
  name = data_config.name
  if name == pair_files.NAME:
    raise ValueError("data.name=pair_files is read directly from data.paths; it has no TFDS "
                     "builder to prepare.")
  if name in LOCAL_CORPORA:
    builder = _local_builder(data_config)
    if not builder.is_prepared():
      _build(builder, name)
    return builder
  where = data_dir(data_config) or "the default TFDS dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir(data_config))
  except (ValueError, AssertionError) as e:  # Not found, unparsable, unknown version.
    prepared = ", ".join(prepared_datasets(data_dir(data_config))) or "none"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(
        f"data.name={name!r} is neither a local corpus ({', '.join(LOCAL_CORPORA)}) "
        f"nor a TFDS dataset prepared in {where!r} (prepared there: {prepared}; TFDS "
        f"says: {first}); set --config.data.name to one of those, or prepare it with "
        f"`tfds build {name} --file_format=array_record --data_dir <data_dir>` on a "
        "machine with TensorFlow and copy it into data.data_dir.") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset data.name={name!r} is not prepared in {builder.data_dir!r}. "
        f"Prepare it as array_record, e.g. `tfds build {name} --data_dir "
        f"{data_dir(data_config) or '<data_dir>'} --file_format=array_record`, "
        "or point --config.data.data_dir at where it is.")
  return builder


def _build(builder, name: str) -> None:
  """Builds a local corpus once: every input is checked before anything is written."""
  # data_dir/<name>/<config>/<version>: lock outside TFDS's tree.
  root = os.path.dirname(os.path.dirname(os.path.dirname(builder.data_dir)))
  check_can_create(root, "data.data_dir")
  builder.plan()  # Reads every input; a bad one raises here.
  lock = os.path.join(root, ".locks", f"{name}-{builder.builder_config.name}")
  with tidy_on_failure(lock, os.path.join(root, "downloads", "extracted"),
                       builder.data_dir):
    with file_lock(lock):
      if not builder.is_prepared():  # Another process may have built it meanwhile.
        log.info("Building %s into %s (first use).", name, builder.data_dir)
        builder.download_and_prepare(file_format="array_record")


def prepared_datasets(root: str | None, limit: int = 20) -> list[str]:
  """Names ("c4/en", "wikipedia/20230601.en") of the datasets prepared under `root`."""
  if not root or "://" in root or not os.path.isdir(root):
    return []
  found = set()
  for dirpath, dirnames, filenames in os.walk(root):
    rel = os.path.relpath(dirpath, root).split(os.sep)
    if "dataset_info.json" in filenames and len(rel) >= 2:
      if rel[0] not in LOCAL_CORPORA:
        found.add("/".join(rel[:-1]))  # The last part is the version.
      dirnames[:] = []
    elif len(rel) >= 3 or rel[0] in ("downloads", "tokenizers", ".locks"):
      dirnames[:] = []
  return sorted(found)[:limit]


def dataset_id(data_config) -> str:
  """A stable identifier of the exact data (builder name/config/version).

  Why: it names derived artefacts (the default tokenizer path), and two
  local_text corpora with different files must not share them.
  """
  name = data_config.name
  if name == pair_files.NAME:
    return pair_files.dataset_id(data_config)
  if name in LOCAL_CORPORA:
    config = _local_builder(data_config).builder_config
    return f"{name}/{config.name}"
  return name


class TextSource(Sequence):
  """grain-compatible random-access source of document texts (str).

  Wraps a TFDS data source (records are dicts of bytes) and decodes one feature.
  """

  def __init__(self, records, feature: str, description: str):
    self._records = records
    self._feature = feature
    self._description = description

  def __len__(self) -> int:
    return len(self._records)

  def _text(self, record) -> str:
    value = record[self._feature]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  def __getitem__(self, index: int) -> str:
    return self._text(self._records[index])

  def __iter__(self) -> Iterator[str]:
    for start in range(0, len(self), 256):  # Batched reads are faster.
      yield from self.__getitems__(list(range(start, min(start + 256, len(self)))))

  def __getitems__(self, indices: Sequence[int]) -> list[str]:
    getitems = getattr(self._records, "__getitems__", None)
    records = getitems(indices) if getitems else [self._records[i] for i in indices]
    return [self._text(r) for r in records]

  def __repr__(self) -> str:
    return f"TextSource({self._description}, {len(self)} documents)"


def open_source(data_config, split: str) -> TextSource:
  """Opens `split` ("train", "validation", TFDS slices like "train[:10%]").

  Raises a ValueError naming the available splits / features when the
  requested one does not exist.
  """
  if data_config.name == pair_files.NAME:
    return pair_files.open_split(data_config, split)
  builder = get_builder(data_config)
  splits = sorted(builder.info.splits.keys())
  if split.split("[", 1)[0] not in splits:
    raise ValueError(
        f"Split {split!r} does not exist in {data_config.name!r}; available "
        f"splits: {splits}. Set --config.data.train_split / data.eval_split to "
        "one of them (a tiny local corpus may hash no document to 'validation'; "
        "add documents or raise data.validation_fraction).")
  # local_text reads data.text_feature from each .jsonl row and stores it as "text".
  feature = ("text" if data_config.name == "local_text"
             else _get(data_config, "text_feature", "text"))
  features = list(builder.info.features.keys())
  if feature not in features:
    raise ValueError(
        f"data.text_feature={feature!r} is not a feature of {data_config.name!r} "
        f"(features: {features}); set --config.data.text_feature to one of them.")
  try:
    records = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise ValueError(
        f"{data_config.name!r} in {builder.data_dir!r} is not stored as "
        "array_record, which random access needs; re-prepare it with "
        "--file_format=array_record.") from e
  return TextSource(records, feature,
                    f"{data_config.name}:{split}:{feature}")


def iter_texts(data_config, split: str,
               max_bytes: int | None = None) -> Iterator[str]:
  """Yields the documents of `split` in stored order, up to `max_bytes` UTF-8.

  Stored order is already shuffled by TFDS at write time, so a byte-capped
  prefix is a fair sample (used for tokenizer training). The document that
  crosses the cap is cut at the cap.
  """
  budget = max_bytes if max_bytes and max_bytes > 0 else None
  source = open_source(data_config, split)
  for text in (source.texts() if isinstance(source, pair_files.PairSource) else source):
    if budget is not None:
      data = text.encode("utf-8")
      if len(data) >= budget:
        yield data[:budget].decode("utf-8", errors="ignore")
        return
      budget -= len(data)
    yield text
