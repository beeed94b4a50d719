"""SentencePiece tokenizer that round-trips Python source code exactly.

Why these trainer settings (see `_TRAINER_OPTIONS`):
  * identity normalisation, no extra-whitespace removal: NFKC and whitespace
    squashing would rewrite indentation and unicode, so decode(encode(x)) != x;
  * whitespace-only pieces: indentation becomes one or two pieces ("▁▁▁▁▁▁▁▁")
    instead of one token per space;
  * byte fallback: characters outside the vocabulary become UTF-8 byte pieces
    rather than [UNK], so any text survives a round trip;
  * newlines reach the trainer inside the training "sentences": documents are
    cut into line-aligned chunks below sentencepiece's max_sentence_length
    (longer sentences would be silently dropped), keeping the "\\n" characters,
    so pieces such as "):\\n" are learnt.
Reserved ids 0..4 are [PAD] [UNK] [CLS] [SEP] [MASK]; [CLS]/[SEP] are added by
the input pipeline, never by `encode`.

Training uses sentencepiece; *encoding* runs the same pieces and scores through
the `tokenizers` library (`hf_tokenizer.hf_backend`), i.e. the exact tokenizer
that `hf_tokenizer.save_hf` exports. Why: sentencepiece's Viterbi sums scores in
float32, so segmentations that tie or nearly tie (e.g. "\\n\\n"+"\\n" vs
"\\n"+"\\n\\n", or runs of indentation pieces in another order) are decided by
rounding noise, differently from tokenizers' float64 search: with a 16k
vocabulary 37 of 1,790 stdlib files differed, at 405 of 8.9M token positions.
Encoding with the exported tokenizer makes pretraining inputs and the HF export
agree by construction; the price is speed (~1.2 MB/s of text per core instead
of sentencepiece's ~10 MB/s).
Decoding, pieces and the stored model stay sentencepiece.

Known limit: a literal "▁" (U+2581) in the text decodes as a space.

Third-party tokenizers: `tokenizer.path` may also name a Hugging Face
tokenizer.json (or a directory holding one), e.g. the WordPiece vocabulary of a
BERT checkpoint to continue pretraining it; `load` then returns an
`hf_tokenizer.HFTokenizer` with the same interface. Its special ids are wherever
its vocabulary puts them (BERT: [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102
[MASK]=103), so code that needs them reads `tokenizer.cls_id` etc., not this
module's constants, which describe our sentencepiece models only.
"""

from __future__ import annotations

import io
import logging
import os
import re

import numpy as np
import sentencepiece as spm
import tqdm

from pretrain.data.hf_tokenizer import HFTokenizer, encode_spans, hf_backend
from pretrain.data.tokenizer_common import (
    CLS, CLS_ID, HF_FILE, MASK, MASK_ID, PAD, PAD_ID, RESERVED, SEP, SEP_ID, SPM_FILE, UNK,
    UNK_ID, WORD_MARKER)

log = logging.getLogger(__name__)

MAX_SENTENCE_BYTES = 4096  # Chunk size fed to the trainer.

_TRAINER_OPTIONS = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=True,
    allow_whitespace_only_pieces=True,
    split_by_whitespace=True,
    split_digits=True,
    byte_fallback=True,
    max_sentence_length=2 * MAX_SENTENCE_BYTES,  # Headroom over the chunks.
    pad_id=PAD_ID, pad_piece=PAD, unk_id=UNK_ID, unk_piece=UNK,
    bos_id=CLS_ID, bos_piece=CLS, eos_id=SEP_ID, eos_piece=SEP,
    control_symbols=[MASK],  # Takes id 4, right after the four above.
)


class Tokenizer:
  """A loaded sentencepiece model with this library's reserved ids."""

  pad_id, unk_id, cls_id, sep_id, mask_id = PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID
  first_ordinary_id = len(RESERVED)  # Random replacements in masking start here.

  def __init__(self, model_proto: bytes, model_path: str = ""):
    self._proto = model_proto
    self.model_path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    found = tuple(self._sp.id_to_piece(i) for i in range(len(RESERVED)))
    if found != RESERVED:
      raise ValueError(
          f"{model_path or 'model'} has reserved pieces {found}, expected "
          f"{RESERVED}; it was not trained by pretrain.data.tokenizer.train "
          "-- retrain it (delete the file or point tokenizer.path elsewhere).")
    # Via JSON, exactly as AutoTokenizer loads it: an in-memory-built
    # Unigram breaks exact score ties differently from a deserialised one.
    backend = hf_backend(self)
    self._hf = type(backend).from_str(backend.to_str())
    # Literal "[PAD]" etc. in a document are text, never reserved ids.
    self._hf.encode_special_tokens = True

  def __getstate__(self):  # Picklable for grain worker processes.
    return {"model_proto": self._proto, "model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["model_proto"], state["model_path"])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids of [PAD] [UNK] [CLS] [SEP] [MASK], in that order."""
    return PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID

  @property
  def model_type(self) -> str:
    return self.proto().trainer_spec.ModelType.Name(
        self.proto().trainer_spec.model_type).lower()

  def proto(self):
    """The parsed sentencepiece ModelProto (pieces, scores, specs)."""
    from sentencepiece import sentencepiece_model_pb2
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(self._proto)
    return m

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP].

    (Via encode_batch because, unlike encode, it releases the GIL, so the
    pipeline's reader threads tokenize in parallel.)
    """
    return self._hf.encode_batch([text], add_special_tokens=False)[0].ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Like `encode` for many texts, in parallel native threads."""
    return [e.ids for e in self._hf.encode_batch(list(texts),
                                                  add_special_tokens=False)]

  def encode_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    return encode_spans(self._hf, texts)

  def decode(self, ids) -> str:
    """Text of `ids`; reserved control ids decode to nothing."""
    return self._sp.decode([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def word_start_table(self) -> np.ndarray:
    """bool[vocab_size]: True where a piece starts a word ("▁" prefix).

    Used on device for whole-word masking: a word is a start piece plus the
    following non-start pieces. The reserved ids are never word starts.
    """
    table = np.array([self._sp.id_to_piece(i).startswith(WORD_MARKER)
                      for i in range(self.vocab_size)], dtype=bool)
    table[:len(RESERVED)] = False
    return table


def training_sentences(text: str, max_bytes: int = MAX_SENTENCE_BYTES):
  """Cuts a document into line-aligned chunks of at most `max_bytes` bytes.

  The "\\n"s stay inside the chunks so the trainer sees real line breaks; a
  single over-long line is cut at character boundaries.
  """
  chunk, size = [], 0
  for line in text.splitlines(keepends=True):
    n = len(line.encode("utf-8"))
    if size + n > max_bytes and chunk:
      yield "".join(chunk)
      chunk, size = [], 0
    while n > max_bytes:
      head = line.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
      yield head
      line = line[len(head):]
      n = len(line.encode("utf-8"))
    chunk.append(line)
    size += n
  if chunk:
    yield "".join(chunk)


def train(texts, model_path: str, vocab_size: int, model_type: str = "unigram",
          *, character_coverage: float = 0.9999, num_threads: int | None = None,
          total_bytes: int | None = None, verbose: bool = False) -> Tokenizer:
  """Trains a sentencepiece model on an iterable of documents; saves it.

  `total_bytes` only sizes the progress bar. The file is written atomically
  so an interrupted run never leaves a half-written model behind.
  """
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}.")
  bar = tqdm.tqdm(total=total_bytes, unit="B", unit_scale=True,
                  desc=f"tokenizer training text ({os.path.basename(model_path)})")

  def sentences():
    for text in texts:
      bar.update(len(text.encode("utf-8")))
      yield from training_sentences(text)

  writer = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(), model_writer=writer,
        vocab_size=vocab_size, model_type=model_type,
        character_coverage=character_coverage,
        num_threads=num_threads or os.cpu_count() or 1,
        minloglevel=0 if verbose else 2, **_TRAINER_OPTIONS)
  except RuntimeError as e:
    raise ValueError(
        f"sentencepiece could not train a {vocab_size}-piece {model_type} "
        f"model ({e}); set tokenizer.vocab_size within the bound that message "
        "gives (5 reserved + 256 byte pieces + the characters come first) or "
        "give it more text (tokenizer.max_train_bytes).") from e
  finally:
    bar.close()
  os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
  tmp = f"{model_path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(writer.getvalue())
  os.replace(tmp, model_path)
  log.info("Saved %d-piece %s tokenizer to %s", vocab_size, model_type, model_path)
  return Tokenizer(writer.getvalue(), model_path)


def is_hf_path(path: str) -> bool:
  """Whether `path` names a Hugging Face tokenizer.json (or a directory holding one)."""
  return path.endswith(".json") or os.path.isfile(os.path.join(path, HF_FILE))


def resolve(path: str) -> str:
  """The tokenizer file of `path`: itself, or a directory's tokenizer.json or spm.model."""
  if not os.path.isdir(path):
    return path
  for name in (HF_FILE, SPM_FILE):
    if os.path.isfile(os.path.join(path, name)):
      return os.path.join(path, name)
  raise FileNotFoundError(
      f"{path} holds neither {HF_FILE} (a Hugging Face tokenizer) nor {SPM_FILE} "
      "(sentencepiece); point tokenizer.path at one of those files.")


def load(model_path: str) -> Tokenizer | HFTokenizer:
  """A sentencepiece `Tokenizer`, or an `HFTokenizer` for a tokenizer.json."""
  model_path = resolve(model_path)
  if not os.path.isfile(model_path):
    raise FileNotFoundError(
        f"Tokenizer {model_path} does not exist; restore it (training copies its "
        "tokenizer to <workdir>/tokenizer/) or point data.tokenizer.path at an "
        "existing one (`python -m pretrain.data.prepare --config=...` trains one).")
  if is_hf_path(model_path):
    # Bytes that are not UTF-8 fail as "not a tokenizer file", naming the path.
    with open(model_path, encoding="utf-8", errors="replace") as f:
      return HFTokenizer(f.read(), model_path)
  with open(model_path, "rb") as f:
    proto = f.read()
  try:
    return Tokenizer(proto, model_path)
  except RuntimeError as e:  # sentencepiece could not parse the bytes as a model.
    raise ValueError(
        f"{model_path} is not a sentencepiece model ({str(e).strip()}); delete it to "
        "train a new one, or point data.tokenizer.path at a valid spm.model.") from None


def default_model_path(data_config) -> str:
  """<data_dir>/tokenizers/<sanitised dataset id>-<vocab>-<type>/spm.model."""
  from pretrain.data import sources  # Deferred: sources imports TFDS.
  tcfg = data_config.tokenizer
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", sources.dataset_id(data_config))
  return os.path.join(sources.data_dir(data_config) or ".", "tokenizers",
                      f"{name}-{tcfg.vocab_size}-{tcfg.model_type}", SPM_FILE)


def _model_file(path: str) -> str:
  """An explicit tokenizer.path as a file: a directory (existing, or written with a
  trailing "/") stands for the tokenizer.json or else the spm.model in it."""
  if os.path.isdir(path) or path.endswith(("/", os.sep)):
    hf = os.path.join(path, HF_FILE)
    return hf if os.path.isfile(hf) else os.path.join(path, SPM_FILE)
  return path


def load_or_train(data_config) -> Tokenizer:
  """Loads the configured tokenizer, training it on the train split if absent.

  tokenizer.path="" is the default location (`default_model_path`), trained
  when missing. An explicit path must exist unless tokenizer.train is true,
  so a mistyped path stops the run (creating nothing) instead of training.
  """
  from pretrain.data import sources
  tcfg = data_config.tokenizer
  explicit = tcfg.path or ""
  path = _model_file(explicit) if explicit else default_model_path(data_config)
  named = f"data.tokenizer.path={explicit!r}" + (f" ({path})" if path != explicit else "")
  if is_hf_path(path) and not os.path.exists(path):
    raise FileNotFoundError(
        f"{named} does not exist; Hugging Face tokenizers are used, never trained here: "
        "fix the path to an existing tokenizer.json (or its directory), or give a .model "
        "path with --config.data.tokenizer.train=True to train a sentencepiece one there.")
  if not os.path.exists(path):
    if explicit and not tcfg.get("train", False):
      raise FileNotFoundError(
          f"{named} does not exist; fix the path, or set --config.data.tokenizer.train=True "
          "to train a new tokenizer there, or leave data.tokenizer.path empty for the "
          "default location.")
    sources.check_can_create(
        os.path.dirname(os.path.abspath(path)),
        *(("data.tokenizer.path", "set --config.data.tokenizer.path to a file in a "
           "writable directory") if explicit else ("data.data_dir",)))
    sources.check_corpus(data_config)  # The corpus first: its errors leave no tokenizer dir.
    with sources.tidy_on_failure(f"{path}.lock"):
      with sources.file_lock(f"{path}.lock"):  # One trainer per shared path.
        if not os.path.exists(path):
          return _train_from_config(data_config, path)
  tok = load(path)
  if tok.vocab_size != tcfg.vocab_size:
    raise ValueError(
        f"Tokenizer {path} has vocab size {tok.vocab_size} but "
        f"data.tokenizer.vocab_size is {tcfg.vocab_size}; set "
        f"--config.data.tokenizer.vocab_size={tok.vocab_size}, or train a new tokenizer "
        "(an empty data.tokenizer.path, or a new path with data.tokenizer.train=True).")
  if isinstance(tok, Tokenizer) and tok.model_type != tcfg.model_type:
    log.warning("Tokenizer %s is %s but config asks for %s; using the file.",
                path, tok.model_type, tcfg.model_type)
  return tok


def _train_from_config(data_config, path: str) -> Tokenizer:
  """Trains on the train split only, capped at tokenizer.max_train_bytes."""
  from pretrain.data import sources
  tcfg = data_config.tokenizer
  if tcfg.path:
    log.warning("Tokenizer %s does not exist; training it there.", path)
  print(f"Training a {tcfg.vocab_size}-piece {tcfg.model_type} tokenizer -> {path}")
  split = data_config.get("train_split", "train") or "train"
  max_bytes = tcfg.max_train_bytes or None
  texts = sources.iter_texts(data_config, split, max_bytes=max_bytes)
  return train(texts, path, tcfg.vocab_size, tcfg.model_type, total_bytes=max_bytes)
