"""N-gram lexicon of the training corpus, and maximum-matching segmentation (ERNIE-Gram).

ERNIE-Gram (Xiao et al., NAACL 2021) masks "semantically complete" n-grams that it extracts from
the corpus with a t-test and marks in text by maximum matching. Its pretraining code was never
released; what follows are our choices, in order:

- N-grams are of sentencepiece token ids (2 <= n <= max_n), never containing a reserved id
  ([PAD] [UNK] [CLS] [SEP] [MASK]) and never crossing a document. They may start or end inside a
  whitespace-delimited word: in code, "self" "." "x" or "__" "init" "__" are the collocations.
- Association score, default the paper's t-test: t = (f - mu) / sqrt(f / N), where f = c(w) / N is
  the n-gram's relative frequency among the N windows of its length and mu its expected frequency
  under the null hypothesis that the n-gram is two independent parts, at the split that explains
  it best (mu = max over splits of p(left) p(right); for bigrams the unigram product). The best
  split, rather than full independence of every token, keeps a trigram from being accepted only
  because it contains a strong bigram. `score="pmi"` ranks by log(f / mu) instead.
- Kept: n-grams seen at least `min_count` times whose score is positive (for the t-test: above
  2.576, one-sided significance 0.005, as in Manning & Schuetze's collocation test); the lexicon
  is the top `size` by score over all lengths (the paper keeps a top-k per length).
- The lexicon is extracted once, from at most `max_train_bytes` of the train split's text (the
  tokenizer's own cap by default), and saved as JSON beside the tokenizer's spm.model, in a file
  named by a hash of its settings and of the tokenizer, so any change builds a new one.
- Maximum matching: forward (left to right), at each position the longest lexicon n-gram that
  starts there; done on the host, batch by batch, by `NgramFeatures` (a grain map after packing):
  one vectorised lookup per n (sorted keys + searchsorted) and a short Python loop over the
  positions where a match starts. A device hash table would save the host work but not the
  sequential left-to-right choice, and the host has the time (about 1 ms per 8 x 128 batch here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os

import numpy as np

from pretrain.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

SCORES = ("t_test", "pmi")
FIRST_ORDINARY_ID = len(tokenizer_lib.RESERVED)  # N-grams never contain a reserved id.
T_CRITICAL = 2.576  # One-sided t (normal) quantile at significance 0.005.


@dataclasses.dataclass(frozen=True)
class Lexicon:
  """N-grams (tuples of token ids) in rank order: lexicon index g is the g-th entry."""

  ngrams: tuple
  counts: tuple
  scores: tuple
  vocab_size: int  # Of the tokenizer the ids belong to (the base of the n-gram keys).
  settings: dict = dataclasses.field(default_factory=dict)

  def __len__(self):
    return len(self.ngrams)

  @property
  def max_n(self) -> int:
    return max((len(g) for g in self.ngrams), default=0)

  def token_table(self, rows: int | None = None):
    """(tokens int32 [rows, max_n] padded with 0, lengths int32 [rows]); rows >= len."""
    rows = len(self) if rows is None else rows
    if rows < len(self):
      raise ValueError(f"token_table: {rows} rows cannot hold {len(self)} n-grams.")
    tokens = np.zeros((rows, max(self.max_n, 1)), np.int32)
    lengths = np.zeros(rows, np.int32)
    for g, ids in enumerate(self.ngrams):
      tokens[g, :len(ids)] = ids
      lengths[g] = len(ids)
    return tokens, lengths


def _keys(windows: np.ndarray, vocab_size: int) -> np.ndarray:
  """int64 key sum_i w_i V^(n-1-i) of each row of windows [N, n] (injective for ids < V)."""
  keys = np.zeros(windows.shape[0], np.int64)
  for i in range(windows.shape[1]):
    keys = keys * vocab_size + windows[:, i]
  return keys


def check_key_range(vocab_size: int, max_n: int) -> None:
  if vocab_size ** max_n >= 2 ** 63:
    raise ValueError(f"n-grams of up to {max_n} ids of a {vocab_size}-id vocabulary do not "
                     f"fit an int64 key; lower objective.ngram_max_n.")


def count_ngrams(docs, max_n: int, vocab_size: int) -> dict:
  """{n: (sorted unique int64 keys, counts, number of windows)} for n = 1..max_n."""
  check_key_range(vocab_size, max_n)
  parts = []
  for ids in docs:
    parts += [np.asarray(ids, np.int64), np.array([-1], np.int64)]  # -1: document break
  stream = np.concatenate(parts) if parts else np.zeros(0, np.int64)
  ok = stream >= FIRST_ORDINARY_ID
  out = {}
  for n in range(1, max_n + 1):
    if len(stream) < n:
      out[n] = (np.zeros(0, np.int64), np.zeros(0, np.int64), 0)
      continue
    windows = np.lib.stride_tricks.sliding_window_view(stream, n)
    valid = np.lib.stride_tricks.sliding_window_view(ok, n).all(axis=1)
    keys, counts = np.unique(_keys(windows[valid], vocab_size), return_counts=True)
    out[n] = (keys, counts, int(valid.sum()))
  return out


def _probability(table, n, keys):
  """Relative frequency of the n-grams `keys` (all present in table[n])."""
  sorted_keys, counts, total = table[n]
  return counts[np.searchsorted(sorted_keys, keys)] / max(total, 1)


def score_ngrams(table, n, vocab_size, score="t_test"):
  """(keys, counts, scores) of every n-gram of length n >= 2 in `table`."""
  keys, counts, total = table[n]
  f = counts / max(total, 1)
  mu = np.zeros_like(f)
  for split in range(1, n):
    right_base = vocab_size ** (n - split)
    p = (_probability(table, split, keys // right_base)
         * _probability(table, n - split, keys % right_base))
    mu = np.maximum(mu, p)
  if score == "t_test":
    scores = (f - mu) / np.sqrt(f / max(total, 1))
  elif score == "pmi":
    scores = np.log(f / mu)
  else:
    raise ValueError(f"Unknown n-gram score {score!r}; valid: {', '.join(SCORES)}.")
  return keys, counts, scores


def extract(docs, *, vocab_size: int, size: int, max_n: int = 3, min_count: int = 5,
            score: str = "t_test", settings: dict | None = None) -> Lexicon:
  """The `size` best-scoring n-grams (2 <= n <= max_n) of `docs` (sequences of token ids)."""
  if max_n < 2:
    raise ValueError(f"max_n={max_n}: n-grams have at least 2 tokens.")
  table = count_ngrams(docs, max_n, vocab_size)
  threshold = T_CRITICAL if score == "t_test" else 0.0
  found = []  # Per length: (scores, lengths, keys, counts) of the kept n-grams.
  for n in range(2, max_n + 1):
    keys, counts, scores = score_ngrams(table, n, vocab_size, score)
    keep = (counts >= min_count) & (scores > threshold)
    found.append((scores[keep], np.full(keep.sum(), n), keys[keep], counts[keep]))
  scores, lengths, keys, counts = (np.concatenate(column) for column in zip(*found))
  order = np.lexsort((keys, lengths, -scores))[:size]  # Best score first; ties: shorter, key.
  ngrams = tuple(_decode(int(keys[i]), int(lengths[i]), vocab_size) for i in order)
  return Lexicon(ngrams, tuple(int(c) for c in counts[order]),
                 tuple(float(s) for s in scores[order]), vocab_size, dict(settings or {}))


def _decode(key: int, n: int, vocab_size: int) -> tuple:
  ids = []
  for _ in range(n):
    key, i = divmod(key, vocab_size)
    ids.append(i)
  return tuple(reversed(ids))


# --- Maximum matching ----------------------------------------------------------------------------

class Matcher:
  """Forward maximum matching of token rows against a lexicon (numpy, host side)."""

  def __init__(self, lexicon: Lexicon):
    self.vocab_size = lexicon.vocab_size
    self.max_n = lexicon.max_n
    self._tables = {}  # n -> (sorted keys, lexicon index of each)
    for n in range(2, self.max_n + 1):
      index = np.array([g for g, ids in enumerate(lexicon.ngrams) if len(ids) == n],
                       np.int64)
      if not len(index):
        continue
      keys = _keys(np.array([lexicon.ngrams[g] for g in index], np.int64), self.vocab_size)
      order = np.argsort(keys)
      self._tables[n] = (keys[order], index[order])

  def longest(self, ids_BL: np.ndarray):
    """(n, g): the longest lexicon n-gram starting at each position (n 0 where none)."""
    ids_BL = np.asarray(ids_BL, np.int64)
    B, L = ids_BL.shape
    best_n = np.zeros((B, L), np.int32)
    best_g = np.full((B, L), -1, np.int64)
    for n, (keys, index) in sorted(self._tables.items()):
      if L < n:
        continue
      windows = np.lib.stride_tricks.sliding_window_view(ids_BL, n, axis=1)
      k = _keys(windows.reshape(-1, n), self.vocab_size).reshape(B, L - n + 1)
      pos = np.minimum(np.searchsorted(keys, k), len(keys) - 1)
      hit = keys[pos] == k
      best_n[:, :L - n + 1] = np.where(hit, n, best_n[:, :L - n + 1])
      best_g[:, :L - n + 1] = np.where(hit, index[pos], best_g[:, :L - n + 1])
    return best_n, best_g

  def segment(self, ids_BL: np.ndarray):
    """Maximum-matching segmentation: (ngram_len, ngram_index), int32 [B, L].

    ngram_len is n at the first token of a matched n-gram, 0 at its other tokens and 1 at
    every other position; ngram_index is the lexicon index at n-gram starts, -1 elsewhere.
    """
    best_n, best_g = self.longest(ids_BL)
    length = np.ones(best_n.shape, np.int32)
    index = np.full(best_n.shape, -1, np.int32)
    for b, s in zip(*np.nonzero(best_n >= 2)):
      if length[b, s] == 0:  # Inside an n-gram taken further left.
        continue
      n = best_n[b, s]
      length[b, s], length[b, s + 1:s + n] = n, 0
      index[b, s] = best_g[b, s]
    return length, index


class NgramFeatures:
  """grain map over packed batches: adds "ngram_len" and "ngram_ids" (int32 [B, L]).

  ngram_ids is the unit's id in the joint vocabulary of tokens and n-grams: vocab_size + g at
  the start of lexicon n-gram g, the token id everywhere else. Rows never hold a reserved id
  inside an n-gram, so matches stay inside one packed document.
  """

  def __init__(self, lexicon: Lexicon):
    self.lexicon = lexicon
    self._matcher = None

  def __getstate__(self):  # Picklable for grain worker processes; the matcher is rebuilt.
    return {"lexicon": self.lexicon}

  def __setstate__(self, state):
    self.__init__(state["lexicon"])

  def __call__(self, batch: dict) -> dict:
    if self._matcher is None:
      self._matcher = Matcher(self.lexicon)
    ids = batch["input_ids"]
    length, index = self._matcher.segment(ids)
    joint = np.where(index >= 0, self.lexicon.vocab_size + index, ids).astype(np.int32)
    return {**batch, "ngram_len": length, "ngram_ids": joint}


# --- Files beside the tokenizer ----------------------------------------------------------------

def save(lexicon: Lexicon, path: str, tokenizer=None) -> None:
  """JSON (written atomically): settings, n-grams as id lists, counts, scores, pieces."""
  content = dict(settings=lexicon.settings, vocab_size=lexicon.vocab_size,
                 ngrams=[list(g) for g in lexicon.ngrams], counts=list(lexicon.counts),
                 scores=list(lexicon.scores))
  if tokenizer is not None:  # For people reading the file; never read back.
    content["pieces"] = [" ".join(tokenizer.id_to_piece(i) for i in g)
                         for g in lexicon.ngrams]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(content, f)
  os.replace(tmp, path)


def load(path: str) -> Lexicon:
  try:
    with open(path, encoding="utf-8") as f:
      c = json.load(f)
    return Lexicon(tuple(tuple(g) for g in c["ngrams"]), tuple(c["counts"]),
                   tuple(c["scores"]), c["vocab_size"], c["settings"])
  except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and bad bytes are ValueErrors.
    raise ValueError(f"{path} is not an n-gram lexicon ({type(e).__name__}: {e}); delete it "
                     "to extract it again.") from None


def lexicon_path(tokenizer_path: str, settings: dict) -> str:
  """<tokenizer dir>/ngrams-n<max_n>-<size>-<score>-<hash of settings and tokenizer>.json."""
  digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  with open(tokenizer_path, "rb") as f:
    digest.update(f.read())
  name = (f"ngrams-n{settings['max_n']}-{settings['size']}-{settings['score']}-"
          f"{digest.hexdigest()[:10]}.json")
  return os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), name)


def load_or_build(data_config, tokenizer, *, size: int, max_n: int, min_count: int,
                  score: str, max_train_bytes: int) -> Lexicon:
  """The lexicon of these settings beside the tokenizer file, extracted first if absent."""
  from pretrain.data import sources  # Deferred: sources imports TFDS.
  if not tokenizer.model_path:
    raise ValueError("The n-gram lexicon is saved beside the tokenizer file, but this "
                     "tokenizer has no model_path; load it from a file.")
  split = data_config.get("train_split", "train") or "train"
  settings = dict(dataset=sources.dataset_id(data_config), split=split, size=size, max_n=max_n,
                  min_count=min_count, score=score, max_train_bytes=max_train_bytes)
  path = lexicon_path(tokenizer.model_path, settings)
  if not os.path.exists(path):
    with sources.file_lock(f"{path}.lock"):  # One extraction per shared path.
      if not os.path.exists(path):
        texts = sources.iter_texts(data_config, split, max_bytes=max_train_bytes or None)
        lexicon = extract(_encode_all(tokenizer, texts), vocab_size=tokenizer.vocab_size,
                          size=size, max_n=max_n, min_count=min_count, score=score,
                          settings=settings)
        save(lexicon, path, tokenizer)
        log.info("Saved a %d-entry n-gram lexicon to %s", len(lexicon), path)
        print(f"Extracted a {len(lexicon)}-entry n-gram lexicon -> {path}")
  lexicon = load(path)
  if lexicon.vocab_size != tokenizer.vocab_size:
    raise ValueError(f"{path} was built for a {lexicon.vocab_size}-id vocabulary, the "
                     f"tokenizer has {tokenizer.vocab_size}; delete the file to rebuild it.")
  return lexicon


def _encode_all(tokenizer, texts, batch: int = 64):
  """Token-id arrays of `texts`, encoded in batches (the tokenizer runs native threads)."""
  docs, chunk = [], []
  for text in texts:
    chunk.append(text)
    if len(chunk) == batch:
      docs += [np.asarray(d, np.int32) for d in tokenizer.encode_batch(chunk)]
      chunk = []
  if chunk:
    docs += [np.asarray(d, np.int32) for d in tokenizer.encode_batch(chunk)]
  return docs
