"""A local TFDS corpus over user `.txt` / `.jsonl` files matched by globs.

Document model (why: keep each document's context whole; the input pipeline
splits long documents into seq_len chunks itself):
  * `.txt`   -- one document per file; `path` is the file path relative to the
               common directory of all matched files.
  * `.jsonl` -- one document per non-blank line, taken from the string field that
               `data.text_feature` names (default "text"); `path` is
               "<relative path>:<line number>".
The train/validation split hashes `path` exactly like `python_stdlib` does.
Empty (whitespace-only) documents are skipped; bad UTF-8 is replaced and counted,
but a file that is not text at all (NUL bytes, or mostly invalid UTF-8, in its
first PROBE_BYTES) is an error naming it: its "text" would only be noise.
Every file is read and checked once (`count_splits`) before anything is written.

The config name is a hash of the resolved file list (plus sizes, mtimes and the
options that shape the data: the .jsonl field and the validation fraction), so
different inputs -- edited files, another text_feature -- never reuse each
other's prepared data in a shared data_dir.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os

import tensorflow_datasets as tfds
import tqdm

from pretrain.data.corpora import python_stdlib as common

SUFFIXES = (".txt", ".jsonl")
PROBE_BYTES = 8192  # The head of each file that the binary check reads.
MAX_INVALID_FRACTION = 0.3  # Of the probed bytes; latin-1 prose stays far below.


def resolve_files(globs: str | list[str] | tuple[str, ...]) -> list[str]:
  """Expands comma-separated or listed globs to sorted, de-duplicated real paths."""
  return [f for f, _ in resolve_origins(globs)]


def resolve_origins(globs) -> list[tuple[str, str]]:
  """Sorted (real path, the glob that matched it) of every file the globs match.

  `**` recurses; `~` expands. A glob that matches no file, a directory given
  as a path, another suffix, a broken link or an unreadable file are errors
  rather than silently skipped, because a typo'd glob should not train on less.
  """
  found = {}
  for pattern in _split_globs(globs):
    expanded = os.path.expanduser(pattern)
    if not glob.has_magic(expanded) and os.path.isdir(expanded):
      raise ValueError(
          f"local_text: data.paths entry {pattern!r} is a directory; give globs of "
          f"its files, e.g. --config.data.paths='{os.path.join(pattern, '**', '*.txt')},"
          f"{os.path.join(pattern, '**', '*.jsonl')}'.")
    matches = glob.glob(expanded, recursive=True)
    files = [m for m in matches if not os.path.isdir(m)]
    if not files:
      what = "only directories" if matches else "no file"
      raise ValueError(
          f"local_text: data.paths glob {pattern!r} matches {what} (relative globs "
          f"are resolved against the working directory {os.getcwd()!r}); fix it "
          "or drop it from --config.data.paths.")
    for match in files:
      where = f"{match!r} (matched by data.paths glob {pattern!r})"
      if not match.endswith(SUFFIXES):
        raise ValueError(
            f"local_text: {where} is neither .txt nor .jsonl; narrow the glob in "
            f"--config.data.paths, e.g. "
            f"'{os.path.join(os.path.dirname(pattern) or '.', '*.txt')}'.")
      real = os.path.realpath(match)
      if not os.path.exists(real):
        raise FileNotFoundError(f"local_text: {where} is a broken symbolic link; fix "
                                "the link or remove it from data.paths.")
      if not os.access(real, os.R_OK):
        raise PermissionError(f"local_text: {where} cannot be read (permission "
                              "denied); make it readable or remove it from data.paths.")
      found.setdefault(real, pattern)
  return sorted(found.items())


def _split_globs(globs) -> list[str]:
  if isinstance(globs, str):
    globs = globs.split(",")
  patterns = [g.strip() for g in globs if g and g.strip()]
  if not patterns:
    raise ValueError("local_text: data.paths is empty; set --config.data.paths to "
                     "comma-separated globs such as 'corpus/*.txt,extra/*.jsonl'.")
  return patterns


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Config of one local corpus; build it with `local_text_config(...)`."""
  globs: tuple[str, ...] = ()
  files: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # Sorted.
  base_dir: str = ""  # Common directory of `files`; `path` is relative to it.
  jsonl_field: str = "text"  # data.text_feature: the field of a .jsonl row.
  validation_fraction: float = common.DEFAULT_VALIDATION_FRACTION
  origins: tuple[str, ...] = dataclasses.field(default=(), repr=False)  # Glob of each file.


def local_text_config(globs, *, jsonl_field: str = "text",
                      validation_fraction: float = common.DEFAULT_VALIDATION_FRACTION
                      ) -> LocalTextConfig:
  """Resolves `globs` and names the config by a hash of what shapes the data."""
  patterns = _split_globs(globs)
  common.split_for_key("", validation_fraction)  # Validates the fraction early.
  files, origins = zip(*resolve_origins(patterns))
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
      globs=tuple(patterns), files=files, base_dir=base, jsonl_field=jsonl_field,
      validation_fraction=validation_fraction, origins=origins)


def iter_documents(cfg: LocalTextConfig):
  """Yields (path_key, text, had_bad_bytes) for every non-empty document."""
  origins = dict(zip(cfg.files, cfg.origins))
  for fname in cfg.files:
    rel = os.path.relpath(fname, cfg.base_dir).replace(os.sep, "/")
    with _open(fname) as f:
      head = f.read(PROBE_BYTES)
      check_text(head, fname, origins.get(fname, ""))
      if fname.endswith(".txt"):
        text, bad = common.decode_text(head + f.read())
        if text.strip():
          yield rel, text, bad
        continue
      f.seek(0)
      for lineno, raw in enumerate(f, start=1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
          raw = raw[len(codecs.BOM_UTF8):]  # Editors on Windows write one; JSON has none.
        if not raw.strip():
          continue
        line, bad = common.decode_text(raw)
        text = _jsonl_text(line, cfg.jsonl_field, f"{fname}:{lineno}")
        if text.strip():
          yield f"{rel}:{lineno}", text, bad


def _open(fname: str):
  try:
    return open(fname, "rb")
  except OSError as e:
    raise type(e)(f"local_text: cannot read {fname} ({e.strerror}); make it readable "
                  "or remove it from data.paths.") from None


def check_text(head: bytes, fname: str, pattern: str = "") -> None:
  """Raises unless the first bytes of a file look like UTF-8 text.

  Why: a zip, image or executable among the corpus files would be decoded with
  replacement characters into noise and fail far later (as a tokenizer that
  cannot reach its vocabulary size); a few bad bytes in real text still pass.
  """
  nul = head.find(b"\0")
  if nul >= 0:
    reason = f"a NUL byte at offset {nul}"
  else:
    decoder = codecs.getincrementaldecoder("utf-8")("ignore")
    valid = len(decoder.decode(head, final=False).encode("utf-8"))
    invalid = len(head) - valid - len(decoder.getstate()[0])  # A cut character is fine.
    if invalid <= MAX_INVALID_FRACTION * len(head):
      return
    reason = f"{invalid / len(head):.0%} of its first {len(head)} bytes are not UTF-8"
  origin = f" (matched by data.paths glob {pattern!r})" if pattern else ""
  raise ValueError(
      f"local_text: {fname}{origin} is not UTF-8 text ({reason}: a binary file, or "
      "text in another encoding such as UTF-16); remove it from data.paths or narrow "
      "the glob (or convert the file to UTF-8).")


def _jsonl_text(line: str, field: str, where: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"local_text: {where} is not valid JSON ({e}); fix or "
                     "remove that line.") from None
  if not isinstance(record, dict):
    kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(record), "a number")
    raise ValueError(f"local_text: {where} is {kind}, not a JSON object with a {field!r} "
                     f"field; make each line an object such as {{\"{field}\": \"...\"}}.")
  keys = sorted(record)
  shown = ", ".join(map(repr, keys[:20])) + (", ..." if len(keys) > 20 else "")
  if field not in record:
    raise ValueError(f"local_text: {where} has no field {field!r} (the row has fields "
                     f"[{shown}]); set --config.data.text_feature=<one of them>.")
  if not isinstance(record[field], str):
    value = json.dumps(record[field])
    value = value if len(value) <= 40 else value[:37] + "..."
    raise ValueError(f"local_text: {where} field {field!r} holds {value}, not a string; "
                     "fix that line or set --config.data.text_feature to a string field "
                     f"(the row has fields [{shown}]).")
  return record[field]


def count_splits(cfg: LocalTextConfig) -> dict[str, int]:
  """Documents per split, reading (and so checking) every file once."""
  counts = {s: 0 for s in common.SPLITS}
  for key, _, _ in iter_documents(cfg):
    counts[common.split_for_key(key, cfg.validation_fraction)] += 1
  if not any(counts.values()):
    raise ValueError(
        f"local_text: every document in {list(cfg.globs)} ({len(cfg.files)} file(s)) "
        "is empty; put text in the files (for .jsonl: in the field "
        f"data.text_feature={cfg.jsonl_field!r}) or fix data.paths.")
  return counts


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
    self._counts = None

  def plan(self) -> dict[str, int]:
    """Documents per split; reads and checks every file, before anything is written."""
    if self._counts is None:
      self._counts = count_splits(self.builder_config)
    return self._counts

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.builder_config.description,
        features=common.text_features(), metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    counts = self.plan()  # TFDS cannot write empty splits.
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
