"""The tokenizer fine-tuning encodes with: ours (spm.model) or any tokenizer.json.

`load_task_tokenizer(model_dir)` reads the tokenizer an init directory holds and returns a
`TaskTokenizer`: batch encoding without special tokens, plus the [CLS] [SEP] [PAD] [MASK] ids
the row encoders of `pretrain.finetune.tasks` need, and each token's character span (what bug
localisation labels tokens by).
"""

from __future__ import annotations

import dataclasses
import json
import os

from pretrain.data import hf_tokenizer, tokenizer as tokenizer_lib
from pretrain.finetune import code_tasks

_SPECIAL_NAMES = {  # Looked up in this order when the tokenizer files do not name them.
    "cls": ("[CLS]", "<s>"), "sep": ("[SEP]", "</s>"), "pad": ("[PAD]", "<pad>"),
    "mask": ("[MASK]", "<mask>")}


@dataclasses.dataclass
class TaskTokenizer:
  """What fine-tuning needs from any tokenizer: batch encoding and four special ids."""
  backend: object  # Has encode_batch(texts) -> list[list[int]] without special tokens, and
  #                  encode_spans(texts) -> [(ids, character spans)] for bug localisation.
  cls_id: int
  sep_id: int
  pad_id: int
  mask_id: int
  vocab_size: int

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    """Token ids; each literal code_tasks.MASK becomes the mask id (it is text otherwise)."""
    parts = [t.split(code_tasks.MASK) for t in texts]
    encoded = iter(self.backend.encode_batch([p for ps in parts for p in ps if p]))
    out = []
    for ps in parts:
      ids = []
      for i, part in enumerate(ps):
        ids += ([self.mask_id] if i else []) + (list(next(encoded)) if part else [])
      out.append(ids)
    return out

  def encode_spans(self, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(token ids, each token's [start, end) character span) of each whole text, tokenized as
    `encode_batch` does (a literal MASK stays text here)."""
    return self.backend.encode_spans(texts)


class _HFBackend:
  """A tokenizer.json of any model type (WordPiece, BPE, Unigram), padding/truncation off."""

  def __init__(self, path: str):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    self.tok = Tokenizer.from_file(path)
    self.tok.no_padding()
    self.tok.no_truncation()

  def encode_batch(self, texts):
    return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

  def encode_spans(self, texts):
    return hf_tokenizer.encode_spans(self.tok, texts)


def _named_special_tokens(model_dir: str) -> dict:
  """{"cls": "<s>", ...} from special_tokens_map.json / tokenizer_config.json when present."""
  names = {}
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    path = os.path.join(model_dir, fname)
    if os.path.isfile(path):
      try:
        with open(path, encoding="utf-8") as f:
          data = json.load(f)
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); copy the tokenizer files of "
                         f"{model_dir} again.") from None
      if not isinstance(data, dict):
        raise ValueError(f"{path}: a JSON object is needed, not {type(data).__name__}; copy the "
                         f"tokenizer files of {model_dir} again.")
      for key in _SPECIAL_NAMES:
        value = data.get(f"{key}_token")
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
          names[key] = value
  return names


def from_sentencepiece(tok) -> TaskTokenizer:
  """Our sentencepiece tokenizer (pretrain.data.tokenizer) with its reserved special ids."""
  return TaskTokenizer(tok, tokenizer_lib.CLS_ID, tokenizer_lib.SEP_ID, tokenizer_lib.PAD_ID,
                       tokenizer_lib.MASK_ID, tok.vocab_size)


def load_task_tokenizer(model_dir: str) -> TaskTokenizer:
  """The tokenizer of an init directory: spm.model (ours) first, else tokenizer.json."""
  spm_path = os.path.join(model_dir, tokenizer_lib.SPM_FILE)
  if os.path.isfile(spm_path):
    return from_sentencepiece(tokenizer_lib.load(spm_path))
  json_path = os.path.join(model_dir, tokenizer_lib.HF_FILE)
  if not os.path.isfile(json_path):
    raise FileNotFoundError(
        f"{model_dir} holds neither {tokenizer_lib.SPM_FILE} nor {tokenizer_lib.HF_FILE}; "
        "fine-tuning tokenizes with the checkpoint's own tokenizer: copy it there.")
  backend = _HFBackend(json_path)
  named = _named_special_tokens(model_dir)
  ids = {}
  for key, candidates in _SPECIAL_NAMES.items():
    for name in ([named[key]] if key in named else []) + list(candidates):
      if backend.tok.token_to_id(name) is not None:
        ids[key] = backend.tok.token_to_id(name)
        break
    else:
      raise ValueError(f"{json_path}: no {key} token (tried {candidates}); name it as "
                       f"{key}_token in special_tokens_map.json.")
  return TaskTokenizer(backend, ids["cls"], ids["sep"], ids["pad"], ids["mask"],
                       backend.tok.get_vocab_size(with_added_tokens=True))
