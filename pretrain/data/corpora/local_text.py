"""A local TFDS corpus over user `.txt` / `.jsonl` files matched by globs.

Document model (why: keep each document's context whole; the input pipeline
splits long documents into seq_len chunks itself):
  * `.txt`   -- one document per file; `path` is the file path relative to the
               common directory of all matched files.
  * `.jsonl` -- one document per non-blank line, taken from a configurable string
               field (default "text"); `path` is "<relative path>:<line number>".
The train/validation split hashes `path` exactly like `python_stdlib` does.
Empty (whitespace-only) documents are skipped; bad UTF-8 is replaced and counted.

The config name is a hash of the resolved file list (plus sizes, mtimes and the
options that shape the data), so different inputs -- or edited files -- never
reuse each other's prepared data in a shared data_dir.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os

import tensorflow_datasets as tfds
import tqdm

from pretrain.data.corpora import python_stdlib as common

SUFFIXES = (".txt", ".jsonl")


def resolve_files(globs: str | list[str] | tuple[str, ...]) -> list[str]:
  """Expands comma-separated or listed globs to sorted, de-duplicated real paths.

  `**` recurses; `~` expands; directories and other suffixes are errors rather
  than silently ignored, because a typo'd glob should not train on nothing.
  """
  patterns = _split_globs(globs)
  found = set()
  for pattern in patterns:
    for match in glob.glob(os.path.expanduser(pattern), recursive=True):
      if os.path.isdir(match):
        continue
      if not match.endswith(SUFFIXES):
        raise ValueError(
            f"local_text: {match!r} (from glob {pattern!r}) is neither .txt "
            f"nor .jsonl; narrow the glob in data_config.paths, e.g. "
            f"'{os.path.join(os.path.dirname(pattern) or '.', '*.txt')}'.")
      found.add(os.path.realpath(match))
  return sorted(found)


def _split_globs(globs) -> list[str]:
  if isinstance(globs, str):
    globs = globs.split(",")
  patterns = [g.strip() for g in globs if g and g.strip()]
  if not patterns:
    raise ValueError("local_text: no globs given; set data_config.paths to "
                     "comma-separated globs such as 'corpus/*.txt,extra/*.jsonl'.")
  return patterns


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Config of one local corpus; build it with `local_text_config(...)`."""
  globs: tuple[str, ...] = ()
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # Sorted.
  base_dir: str = ""  # Common directory of `files`; `path` is relative to it.
  jsonl_field: str = "text"
  validation_fraction: float = common.DEFAULT_VALIDATION_FRACTION


def local_text_config(globs, *, jsonl_field: str = "text",
                      validation_fraction: float = common.DEFAULT_VALIDATION_FRACTION
                      ) -> LocalTextConfig:
  """Resolves `globs` and names the config by a hash of what shapes the data."""
  patterns = _split_globs(globs)
  common.split_for_key("", validation_fraction)  # Validates the fraction early.
  files = resolve_files(patterns)
  if not files:
    raise ValueError(
        f"local_text: no .txt or .jsonl file matches {patterns} (relative globs "
        f"are resolved against the working directory {os.getcwd()!r}); fix "
        "data_config.paths or create the files.")
  base = os.path.commonpath([os.path.dirname(f) for f in files])
  fingerprint = hashlib.sha1()
  for f in files:
    st = os.stat(f)
    fingerprint.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  fingerprint.update(f"{jsonl_field}\0{validation_fraction!r}".encode())
  name = f"files{len(files)}-{fingerprint.hexdigest()[:16]}"
  return LocalTextConfig(
      name=name, version=LocalText.VERSION,
      description=f"{len(files)} local file(s) from globs {patterns}.",
      globs=tuple(patterns), files=tuple(files), base_dir=base,
      jsonl_field=jsonl_field, validation_fraction=validation_fraction)


def iter_documents(cfg: LocalTextConfig):
  """Yields (path_key, text, had_bad_bytes) for every non-empty document."""
  for fname in cfg.files:
    rel = os.path.relpath(fname, cfg.base_dir).replace(os.sep, "/")
    with open(fname, "rb") as f:
      if fname.endswith(".txt"):
        text, bad = common.decode_text(f.read())
        if text.strip():
          yield rel, text, bad
        continue
      for lineno, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        line, bad = common.decode_text(raw)
        text = _jsonl_text(line, cfg.jsonl_field, f"{fname}:{lineno}")
        if text.strip():
          yield f"{rel}:{lineno}", text, bad


def _jsonl_text(line: str, field: str, where: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"local_text: {where} is not valid JSON ({e}); fix or "
                     "remove that line.") from e
  if not isinstance(record, dict) or field not in record:
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ValueError(f"local_text: {where} has no field {field!r} (found "
                     f"{keys}); set data_config.jsonl_field to one of those.")
  if not isinstance(record[field], str):
    raise ValueError(f"local_text: {where} field {field!r} is "
                     f"{type(record[field]).__name__}, expected a string.")
  return record[field]


class LocalText(tfds.core.GeneratorBasedBuilder):
  """User text files as a TFDS dataset (config from `local_text_config`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  code_path = tfds.core.utils.classproperty(
      classmethod(common.builder_code_path))

  def __init__(self, *, config: LocalTextConfig, **kwargs):
    if not isinstance(config, LocalTextConfig):
      raise TypeError("LocalText needs config=local_text_config(globs); "
                      f"got {config!r}.")
    super().__init__(config=config, **kwargs)
    self._stats = common.DecodeStats()

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.builder_config.description,
        features=common.text_features(), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    counts = {s: 0 for s in common.SPLITS}
    for key, _, _ in iter_documents(cfg):  # TFDS cannot write empty splits.
      counts[common.split_for_key(key, cfg.validation_fraction)] += 1
    if not any(counts.values()):
      raise ValueError(
          f"local_text: every document in {list(cfg.globs)} "
          f"({len(cfg.files)} file(s)) is empty; put text in the files "
          "(or, for .jsonl, in the configured field) or fix data_config.paths.")
    total = sum(counts.values())
    return {s: self._generate_examples(s, total)
            for s in common.nonempty_splits(counts, "local_text")}

  def _generate_examples(self, split, total_documents):
    cfg = self.builder_config
    docs = iter_documents(cfg)  # Every split scans all; keeps memory flat.
    for key, text, bad in tqdm.tqdm(docs, desc=f"local_text {split}",
                                    total=total_documents, unit="doc",
                                    mininterval=1.0):
      if common.split_for_key(key, cfg.validation_fraction) == split:
        self._stats.record(split, bad)
        yield key, {"text": text, "path": key}
    self._stats.finish(split, self.info, "local_text")
