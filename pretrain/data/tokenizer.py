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
the `tokenizers` library (`_hf_backend`), i.e. the exact tokenizer that
`save_hf` exports. Why: sentencepiece's Viterbi sums scores in float32, so
segmentations that tie or nearly tie (e.g. "\\n\\n"+"\\n" vs "\\n"+"\\n\\n", or
runs of indentation pieces in another order) are decided by rounding noise,
differently from tokenizers' float64 search: with a 16k vocabulary 37 of 1,790
stdlib files differed, at 405 of 8.9M token positions. Encoding with the
exported tokenizer makes pretraining inputs and the HF export agree by
construction; the price is speed (~1.2 MB/s of text per core instead of
sentencepiece's ~10 MB/s).
Decoding, pieces and the stored model stay sentencepiece.

Known limit: a literal "▁" (U+2581) in the text decodes as a space.

Third-party tokenizers: `tokenizer.path` may also name a Hugging Face
tokenizer.json (or a directory holding one), e.g. the WordPiece vocabulary of a
BERT checkpoint to continue pretraining it; `load` then returns an `HFTokenizer`
with the same interface. Its special ids are wherever its vocabulary puts them
(BERT: [PAD]=0 [UNK]=100 [CLS]=101 [SEP]=102 [MASK]=103), so code that needs
them reads `tokenizer.cls_id` etc., not this module's constants, which describe
our sentencepiece models only.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re

import numpy as np
import sentencepiece as spm
import tqdm

log = logging.getLogger(__name__)

PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
RESERVED = (PAD, UNK, CLS, SEP, MASK)
WORD_MARKER = "\u2581"  # "▁": sentencepiece's visible space / word start.
MAX_SENTENCE_BYTES = 4096  # Chunk size fed to the trainer.
HF_FILE, SPM_FILE = "tokenizer.json", "spm.model"

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
    backend = _hf_backend(self)
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


class HFTokenizer:
  """A Hugging Face tokenizer.json behind the interface of `Tokenizer`.

  For continuing the pretraining of a checkpoint with its own vocabulary, such
  as BERT's WordPiece. The special tokens are looked up by name ([PAD] [UNK]
  [CLS] [SEP] [MASK]), never assumed to be ids 0..4. Padding and truncation
  stored in the file are switched off: the pipeline cuts and packs documents
  itself. Only WordPiece is accepted because whole-word masking needs word
  starts, and WordPiece marks them plainly: a piece without the continuing
  prefix ("##") starts a word. [UNK] starts one too (WordPiece emits it for a
  whole word); [PAD] [CLS] [SEP] [MASK] never do.
  """

  model_type = "wordpiece"

  def __init__(self, json_text: str, model_path: str = ""):
    from tokenizers import Tokenizer as Backend
    self._json, self.model_path = json_text, model_path
    where = model_path or HF_FILE
    try:
      hf = Backend.from_str(json_text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON.
      raise ValueError(f"{where}: not a Hugging Face tokenizer file ({e}).") from None
    kind = type(hf.model).__name__
    if kind != "WordPiece":
      raise ValueError(
          f"{where} is a {kind} tokenizer; only WordPiece (BERT-style) "
          "tokenizer.json files are supported, because whole-word masking "
          "reads word starts from the '##' continuation prefix.")
    hf.no_padding()
    hf.no_truncation()
    hf.encode_special_tokens = True  # Literal "[MASK]" in text stays text.
    self._hf = hf
    ids = [hf.token_to_id(t) for t in RESERVED]
    missing = [t for t, i in zip(RESERVED, ids) if i is None]
    if missing:
      raise ValueError(f"{where} has no {' '.join(missing)} token; the pipeline "
                       f"and masking need all of {' '.join(RESERVED)}.")
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = ids
    self._pieces = [hf.id_to_token(i) for i in range(self.vocab_size)]
    if None in self._pieces:
      raise ValueError(f"{where}: token ids are not contiguous (no token for id "
                       f"{self._pieces.index(None)}); the embedding rows would "
                       "not line up with the vocabulary.")
    self.first_ordinary_id = _first_ordinary_id(self._pieces, ids)

  def __getstate__(self):  # Picklable for grain worker processes.
    return {"json_text": self._json, "model_path": self.model_path}

  def __setstate__(self, state):
    self.__init__(state["json_text"], state["model_path"])

  @property
  def vocab_size(self) -> int:
    return self._hf.get_vocab_size(with_added_tokens=True)

  @property
  def special_ids(self) -> tuple[int, ...]:
    """Ids of [PAD] [UNK] [CLS] [SEP] [MASK], in that order."""
    return self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id

  def backend(self):
    """The `tokenizers.Tokenizer` used for encoding (padding, truncation off)."""
    return self._hf

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without [CLS]/[SEP] (GIL released, see Tokenizer)."""
    return self._hf.encode_batch([text], add_special_tokens=False)[0].ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self._hf.encode_batch(list(texts),
                                                  add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Text of `ids` without the special tokens (lowercased if the tokenizer is)."""
    return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)

  def id_to_piece(self, i: int) -> str:
    return self._pieces[int(i)]

  def piece_to_id(self, piece: str) -> int:
    i = self._hf.token_to_id(piece)
    return self.unk_id if i is None else i

  def word_start_table(self) -> np.ndarray:
    """bool[vocab_size]: True where a piece starts a word (no "##" prefix)."""
    prefix = self._hf.model.continuing_subword_prefix
    table = np.array([not p.startswith(prefix) for p in self._pieces], dtype=bool)
    table[[self.pad_id, self.cls_id, self.sep_id, self.mask_id]] = False
    return table


def _first_ordinary_id(pieces, special_ids) -> int:
  """The id after the leading block of special and "[unusedN]" placeholder pieces.

  Masking draws random replacement tokens from [this, vocab_size): BERT's vocabulary keeps
  [PAD] [unused0..98] [UNK] [CLS] [SEP] [MASK] [unused99..993] in ids 0..998, which must never
  be drawn. A special token outside that block (rare in WordPiece vocabularies) could be drawn;
  that only weakens one replacement.
  """
  reserved = set(int(i) for i in special_ids)
  i = 0
  while i < len(pieces) and (i in reserved or re.fullmatch(r"\[unused\d+\]", pieces[i])):
    i += 1
  if i >= len(pieces) - 1:
    raise ValueError("The tokenizer has no ordinary tokens after its special ones.")
  return i


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


def load_or_train(data_config) -> Tokenizer:
  """Loads the configured tokenizer, training it on the train split if absent."""
  from pretrain.data import sources
  tcfg = data_config.tokenizer
  path = tcfg.path or default_model_path(data_config)
  if is_hf_path(path) and not os.path.exists(path):
    raise FileNotFoundError(
        f"Tokenizer {path} does not exist; Hugging Face tokenizers are used, never "
        "trained here: point tokenizer.path at an existing tokenizer.json (or its "
        "directory), or at a .model path to train a sentencepiece tokenizer there.")
  if not os.path.exists(path):
    with sources.file_lock(f"{path}.lock"):  # One trainer per shared path.
      if not os.path.exists(path):
        return _train_from_config(data_config, path)
  tok = load(path)
  if tok.vocab_size != tcfg.vocab_size:
    raise ValueError(
        f"Tokenizer {path} has vocab size {tok.vocab_size} but "
        f"data_config.tokenizer.vocab_size is {tcfg.vocab_size}; set "
        f"vocab_size={tok.vocab_size}, or point tokenizer.path at a "
        "new file (or delete this one) to train a new tokenizer.")
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


_NEVER = -1e9  # HF score for pieces sentencepiece never matches from text.


def _hf_backend(tok: Tokenizer):
  """The `tokenizers.Tokenizer` for `tok`'s pieces (plus [CLS] $A [SEP]).

  Mirrors sentencepiece: no unicode normalisation, one "▁" prepended
  (add_dummy_prefix), spaces -> "▁", no pre-tokenisation (the model sees the
  whole text, so whitespace-only pieces and pieces ending in "\\n" work), byte
  fallback. Byte and control pieces get a score that never wins, because
  sentencepiece never produces them from literal text such as "<0x41>".
  """
  from tokenizers import AddedToken, decoders, models, normalizers, processors
  from tokenizers import Tokenizer as HFTokenizer
  proto = tok.proto()
  spec = proto.normalizer_spec
  if spec.name != "identity" or spec.remove_extra_whitespaces:
    raise ValueError(f"{tok.model_path}: only identity sentencepiece "
                     "normalisation without whitespace removal is supported; "
                     "retrain with pretrain.data.tokenizer.train.")
  sp = tok._sp  # pylint: disable=protected-access
  special = [sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i)
             or sp.is_unused(i) for i in range(tok.vocab_size)]
  if tok.model_type == "unigram":
    vocab = [(p.piece, _NEVER if s else p.score)
             for p, s in zip(proto.pieces, special)]
    model = models.Unigram(vocab, unk_id=UNK_ID, byte_fallback=True)
  else:  # bpe: merges ranked by the score of the merged piece, like spm.
    ids = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p, s in zip(proto.pieces, special) if not s}
    merges = []
    for p, s in zip(proto.pieces, special):
      if s or len(p.piece) < 2:
        continue
      splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))]
      splits = [m for m in splits if m[0] in normal and m[1] in normal]
      merges += sorted(splits, key=lambda m: (ids[m[0]], ids[m[1]]))
    model = models.BPE(ids, merges, unk_token=UNK, byte_fallback=True,
                       fuse_unk=True)
  hf = HFTokenizer(model)
  norm = [normalizers.Replace(" ", WORD_MARKER)]
  if spec.add_dummy_prefix:
    norm.insert(0, normalizers.Prepend(WORD_MARKER))
  hf.normalizer = normalizers.Sequence(norm)
  dec = [decoders.Replace(WORD_MARKER, " "), decoders.ByteFallback(), decoders.Fuse()]
  if spec.add_dummy_prefix:
    dec.append(decoders.Strip(content=" ", left=1, right=0))
  hf.decoder = decoders.Sequence(dec)
  hf.post_processor = processors.TemplateProcessing(
      single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
      special_tokens=[(CLS, CLS_ID), (SEP, SEP_ID)])
  hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                         for t in RESERVED])
  return hf


def save_hf(tok: Tokenizer | HFTokenizer, out_dir: str,
            model_max_length: int = 512) -> None:
  """Writes tokenizer.json (+ configs, spm.model) for AutoTokenizer.

  `AutoTokenizer.from_pretrained(out_dir)(text)["input_ids"]` equals
  [tok.cls_id] + tok.encode(text) + [tok.sep_id]. One deliberate difference:
  text that literally contains "[MASK]" etc. gets the special id in HF (so
  fill-mask prompts work) but is plain text to `tok.encode`. An `HFTokenizer`
  writes its own tokenizer.json back (padding and truncation off).
  """
  import shutil
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, HF_FILE)
  if isinstance(tok, HFTokenizer):
    tok.backend().save(json_path)
  else:
    _hf_backend(tok).save(json_path)
  names = dict(pad_token=PAD, unk_token=UNK, cls_token=CLS, sep_token=SEP,
               mask_token=MASK)
  config = dict(tokenizer_class="PreTrainedTokenizerFast",
                model_max_length=model_max_length, padding_side="right",
                clean_up_tokenization_spaces=False,
                model_input_names=["input_ids", "token_type_ids", "attention_mask"],
                **names)
  for fname, content in (("tokenizer_config.json", config),
                         ("special_tokens_map.json", names)):
    with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
      json.dump(content, f, indent=2)
  if isinstance(tok, HFTokenizer):
    return
  if tok.model_path and os.path.exists(tok.model_path):
    shutil.copyfile(tok.model_path, os.path.join(out_dir, SPM_FILE))
  else:
    with open(os.path.join(out_dir, SPM_FILE), "wb") as f:
      f.write(tok._proto)  # pylint: disable=protected-access
