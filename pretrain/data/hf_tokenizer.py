"""Hugging Face `tokenizers` for this library's tokenizers, both ways.

`HFTokenizer` wraps a third-party tokenizer.json (e.g. the WordPiece vocabulary
of a BERT checkpoint, to continue pretraining it) behind the interface of
`tokenizer.Tokenizer`; `tokenizer.load` returns one for a .json path.
`hf_backend` builds the `tokenizers.Tokenizer` of one of our sentencepiece
models, which `Tokenizer` encodes with (see the `tokenizer` module docstring),
and `save_hf` writes either kind out for AutoTokenizer.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from pretrain.data.tokenizer_common import (
    CLS, CLS_ID, HF_FILE, MASK, PAD, RESERVED, SEP, SEP_ID, SPM_FILE, UNK, UNK_ID, WORD_MARKER)


def encode_spans(backend, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
  """(ids, each token's [start, end) character span) of each text, as a `tokenizers.Tokenizer`
  encodes it without special tokens: the ids of the wrappers' `encode_batch`."""
  return [(e.ids, e.offsets) for e in backend.encode_batch(list(texts), add_special_tokens=False)]


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

  def encode_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    return encode_spans(self._hf, texts)

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


_NEVER = -1e9  # HF score for pieces sentencepiece never matches from text.


def hf_backend(tok):
  """The `tokenizers.Tokenizer` for the pieces of `tok`, a sentencepiece `tokenizer.Tokenizer`
  (plus [CLS] $A [SEP]).

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


def save_hf(tok, out_dir: str, model_max_length: int = 512) -> None:
  """Writes tokenizer.json (+ configs, spm.model) for AutoTokenizer; `tok` is a
  `tokenizer.Tokenizer` or an `HFTokenizer`.

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
    hf_backend(tok).save(json_path)
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
