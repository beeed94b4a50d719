"""Tests of the data layer: local corpora, sources, tokenizer, HF export, pipeline.

Small corpora are built in tmp dirs from copies of standard-library files, and
tokenizers are tiny (vocab 600), so the whole file runs in well under a minute.
"""

import collections
import json
import logging
import os
import pickle

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from pretrain.data import hf_tokenizer, pipeline, sources
from pretrain.data import tokenizer as tok_lib
from pretrain.data.corpora import local_text, python_stdlib

STDLIB = python_stdlib.stdlib_root()
# Mid-sized, stable stdlib modules: real code with docstrings, unicode, tabs.
TRAIN_FILES = ["argparse.py", "ast.py", "dataclasses.py", "inspect.py",
               "pathlib.py", "textwrap.py", "typing.py", "json/decoder.py",
               "enum.py", "functools.py", "tokenize.py"]
HELD_OUT = ["contextlib.py", "csv.py", "difflib.py", "shlex.py", "string.py",
            "calendar.py", "fractions.py", "heapq.py", "pprint.py", "glob.py",
            "email/utils.py", "unittest/case.py", "base64.py", "this.py"]
TRICKY = ["", " ", "\n", "  x", "x\n\n\n  \t y  ", "def f():\n\tpass\r\n",
          "s = 'é中😀'  # ünïcode\n", "\x0c\n# form feed\n", "a  b   c    d\n",
          "class A:\n    def m(self):\n        return [PAD] + '[MASK]'\n"]


def read_stdlib(rel):
    with open(os.path.join(STDLIB, rel), encoding="utf-8") as f:
        return f.read()


def data_config(tmp, name="local_text", paths="", vocab_size=600, **kw):
    cfg = dict(name=name, data_dir=str(tmp), paths=paths, text_feature="text",
               validation_fraction=0.2, train_split="train",
               eval_split="validation", seq_len=64, batch_size=8, seed=0,
               tokenizer=dict(path="", vocab_size=vocab_size,
                              model_type="unigram", max_train_bytes=400_000))
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A local_text corpus of ~40 stdlib modules saved as .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    rels = [r for r in python_stdlib.list_stdlib_files()
            if r.count("/") == 0 and 2_000 < os.path.getsize(os.path.join(STDLIB, r)) < 30_000]
    for rel in rels[:40]:
        (root / (rel.replace("/", "_") + ".txt")).write_text(read_stdlib(rel), encoding="utf-8")
    return data_config(tmp_path_factory.mktemp("data"), paths=str(root / "*.txt"))


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "spm.model"
    return tok_lib.train((read_stdlib(r) for r in TRAIN_FILES), str(path), 600)


# ---------------------------------------------------------------- corpora ---

def test_hash_split_deterministic_and_disjoint(corpus):
    keys = [f"pkg/mod{i}.py" for i in range(2000)]
    first = [python_stdlib.split_for_key(k, 0.1) for k in keys]
    assert first == [python_stdlib.split_for_key(k, 0.1) for k in keys]
    assert 0.07 < first.count("validation") / len(keys) < 0.13
    paths = {}
    for split in ("train", "validation"):
        src = sources.get_builder(corpus).as_data_source(split=split)
        paths[split] = {r["path"].decode() for r in src}
        assert all(python_stdlib.split_for_key(p, 0.2) == split for p in paths[split])
    assert paths["train"] and paths["validation"]
    assert not paths["train"] & paths["validation"]
    n_files = len(local_text.resolve_files(corpus.paths))
    assert len(paths["train"] | paths["validation"]) == n_files


def test_non_utf8_replaced_counted_and_stdlib_filters(tmp_path, caplog):
    root = tmp_path / "lib"
    for rel, data in {"good.py": b"x = 1\n", "bad.py": b"s = '\xff\xfe caf\xe9'\n",
                      "empty.py": b"", "blank.py": b"\n  \n",
                      "site-packages/third.py": b"y = 2\n",
                      "__pycache__/c.py": b"z = 3\n", "pkg/mod.py": b"w = 4\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    config = python_stdlib.stdlib_config(0.0, root=str(root))
    builder = python_stdlib.PythonStdlib(config=config, data_dir=str(tmp_path / "d"),
                                         file_format="array_record")
    with caplog.at_level(logging.WARNING):
        builder.download_and_prepare(file_format="array_record")
    records = {r["path"].decode(): r["text"].decode()
               for r in builder.as_data_source(split="train")}
    assert sorted(records) == ["bad.py", "good.py", "pkg/mod.py"]
    assert "\ufffd" in records["bad.py"] and records["good.py"] == "x = 1\n"
    assert builder.info.metadata["train_utf8_replaced_documents"] == 1
    assert "not valid UTF-8" in caplog.text
    assert "validation" not in builder.info.splits  # Fraction 0: split absent.


def test_local_text_empty_corpus_errors(tmp_path):
    with pytest.raises(ValueError, match="data.paths glob .*nothing.*matches no file"):
        local_text.local_text_config(str(tmp_path / "nothing*.txt"))
    (tmp_path / "a.txt").write_text("  \n")
    (tmp_path / "b.jsonl").write_text('{"text": ""}\n\n')
    cfg = data_config(tmp_path / "d", paths=f"{tmp_path}/*.txt,{tmp_path}/*.jsonl")
    with pytest.raises(ValueError, match=r"every document in .*is empty"):
        sources.open_source(cfg, "train")


def test_local_text_jsonl_and_config_names(tmp_path):
    lines = [json.dumps({"body": f"doc {i}\n  indented"}) for i in range(30)]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "b.txt").write_text("whole file\n\nis one document\n")
    cfg = data_config(tmp_path / "d", paths=f"{tmp_path}/*.jsonl, {tmp_path}/*.txt",
                      text_feature="body", validation_fraction=0.3)
    texts = list(sources.iter_texts(cfg, "train")) + list(sources.iter_texts(cfg, "validation"))
    assert sorted(texts) == sorted([f"doc {i}\n  indented" for i in range(30)]
                                   + ["whole file\n\nis one document\n"])
    name_ab = local_text.local_text_config(f"{tmp_path}/*").name
    assert name_ab != local_text.local_text_config(f"{tmp_path}/*.txt").name
    assert name_ab == local_text.local_text_config(f"{tmp_path}/b.txt,{tmp_path}/a.jsonl").name
    bad = data_config(tmp_path / "d2", paths=f"{tmp_path}/*.jsonl")  # field "text"
    with pytest.raises(ValueError, match="has no field 'text'"):
        sources.open_source(bad, "train")


def test_full_python_stdlib_build(tmp_path):
    cfg = data_config(tmp_path, name="python_stdlib", validation_fraction=0.05)
    train, valid = (sources.open_source(cfg, s) for s in ("train", "validation"))
    assert len(train) > 1000 and len(valid) > 20
    builder = sources.get_builder(cfg)
    paths = [{r["path"] for r in builder.as_data_source(split=s)}
             for s in ("train", "validation")]
    assert not paths[0] & paths[1]
    assert not any(b"site-packages" in p or b"__pycache__" in p for p in paths[0])
    assert isinstance(train[0], str) and train[0].strip()


# ---------------------------------------------------------------- sources ---

class DataTestCatalog(tfds.core.GeneratorBasedBuilder):
    """Stands in for a prepared TFDS catalog dataset (e.g. c4/en)."""
    VERSION = tfds.core.Version("1.0.0")
    code_path = tfds.core.utils.classproperty(
        classmethod(python_stdlib.builder_code_path))

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"content": tfds.features.Text(), "id": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            yield str(i), {"content": f"document {i}", "id": str(i)}


def test_catalog_path_splits_features_and_caps(tmp_path, corpus):
    DataTestCatalog(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
        file_format="array_record")
    cfg = data_config(tmp_path, name="data_test_catalog", text_feature="content")
    src = sources.open_source(cfg, "test")
    assert len(src) == 3 and sorted(src) == [f"document {i}" for i in range(3)]
    with pytest.raises(ValueError, match=r"available splits: \['test', 'train'\]"):
        sources.open_source(cfg, "validation")
    with pytest.raises(ValueError, match="features: "):
        sources.open_source(data_config(tmp_path, name="data_test_catalog"), "test")
    with pytest.raises(ValueError, match=r"data.name='no_such_dataset' is neither a local corpus "
                       r"\(python_stdlib, local_text\).*prepared there: data_test_catalog;"):
        sources.open_source(data_config(tmp_path, name="no_such_dataset"), "train")
    capped = "".join(sources.iter_texts(corpus, "train", max_bytes=5000))
    assert len(capped.encode()) <= 5000 and len(capped) > 4000


# -------------------------------------------------------------- tokenizer ---

def test_tokenizer_round_trip_on_python_code(tok):
    for text in [read_stdlib(r) for r in HELD_OUT] + TRICKY:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(i >= len(tok_lib.RESERVED) for i in ids)  # Reserved never from text.
    assert tok.vocab_size == 600 and tok.model_type == "unigram"
    indent = tok.encode("x\n        return 1\n")
    assert any(set(tok.id_to_piece(i)) == {"▁"} and len(tok.id_to_piece(i)) >= 4
               for i in indent), "indentation should be whitespace-only pieces"
    assert any("\n" in tok.id_to_piece(i) for i in range(tok.vocab_size))
    assert pickle.loads(pickle.dumps(tok)).encode(TRICKY[-1]) == tok.encode(TRICKY[-1])


def test_reserved_ids_and_word_start_table(tok):
    assert (tok_lib.PAD_ID, tok_lib.UNK_ID, tok_lib.CLS_ID, tok_lib.SEP_ID,
            tok_lib.MASK_ID) == (0, 1, 2, 3, 4)
    assert [tok.id_to_piece(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    table = tok.word_start_table()
    assert table.shape == (tok.vocab_size,) and table.dtype == np.bool_
    assert not table[:5].any()
    for i in range(5, tok.vocab_size):
        assert table[i] == tok.id_to_piece(i).startswith("▁")
    ids = tok.encode("def foo(x):\n    return x")
    assert table[ids[0]]  # The first word gets sentencepiece's dummy "▁" prefix.


def test_load_or_train_default_path_train_split_and_vocab_mismatch(corpus, monkeypatch):
    seen = []
    original = tok_lib.train

    def spy(texts, *args, **kwargs):
        texts = list(texts)
        seen.extend(texts)
        return original(iter(texts), *args, **kwargs)

    monkeypatch.setattr(tok_lib, "train", spy)
    trained = tok_lib.load_or_train(corpus)
    expected = os.path.join(corpus.data_dir, "tokenizers")
    assert trained.model_path.startswith(expected) and trained.model_path.endswith(
        "-600-unigram/spm.model")
    assert "local_text_files" in trained.model_path
    train_texts = set(sources.open_source(corpus, "train"))
    assert seen and all(t in train_texts for t in seen[:-1])  # Last one may be capped.
    assert sum(len(t.encode()) for t in seen) <= corpus.tokenizer.max_train_bytes
    seen.clear()
    again = tok_lib.load_or_train(corpus)  # Loads, does not retrain.
    assert not seen and again.encode("x = 1") == trained.encode("x = 1")
    wrong = ml_collections.ConfigDict(corpus.to_dict())
    wrong.tokenizer.vocab_size = 700
    wrong.tokenizer.path = trained.model_path
    with pytest.raises(ValueError, match=r"vocab size 600 .*vocab_size is 700"):
        tok_lib.load_or_train(wrong)


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_save_hf_autotokenizer_parity(tok, tmp_path, model_type):
    import transformers
    if model_type == "bpe":
        tok = tok_lib.train((read_stdlib(r) for r in TRAIN_FILES[:6]),
                            str(tmp_path / "bpe.model"), 600, "bpe")
    hf_tokenizer.save_hf(tok, str(tmp_path / "hf"), model_max_length=128)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert (hf.pad_token_id, hf.unk_token_id, hf.cls_token_id, hf.sep_token_id,
            hf.mask_token_id) == (0, 1, 2, 3, 4)
    texts = [read_stdlib(r) for r in HELD_OUT] + TRICKY[:-1]
    for text in texts:
        ids = hf(text)["input_ids"]
        assert ids == [tok_lib.CLS_ID] + tok.encode(text) + [tok_lib.SEP_ID]
        assert hf.decode(ids, skip_special_tokens=True) == text


# --------------------------------------------------------------- pipeline ---

def chunks_of(batch):
    """The "[CLS] ... [SEP]" chunks of every row, checking packing invariants."""
    out = []
    for ids, seg, pos in zip(batch["input_ids"], batch["segment_ids"], batch["positions"]):
        n = int((seg > 0).sum())
        assert (seg[:n] > 0).all() and not seg[n:].any()  # Padding only at the end.
        assert not ids[n:].any() and not pos[n:].any()
        assert (np.diff(seg[:n]) >= 0).all() and set(np.diff(seg[:n])) <= {0, 1}
        for s in range(1, int(seg.max(initial=0)) + 1):
            where = np.flatnonzero(seg == s)
            assert (pos[where] == np.arange(len(where))).all()
            chunk = ids[where]
            assert chunk[0] == tok_lib.CLS_ID and chunk[-1] == tok_lib.SEP_ID
            assert not np.isin(chunk[1:-1], [0, 2, 3]).any()
            out.append(tuple(chunk))
    return out


def expected_chunks(docs, tok, seq_len):
    return collections.Counter(tuple(c) for d in docs
                               for c in pipeline.chunk_document(tok.encode(d), seq_len))


def test_eval_pipeline_shapes_invariants_and_no_document_lost(corpus, tok):
    src = sources.open_source(corpus, "train")
    ds = pipeline.make_dataset(src, tok, seq_len=64, batch_size=8, seed=0,
                               shuffle=False, num_epochs=1)
    batches = list(ds)
    for b in batches:
        assert set(b) == {"input_ids", "segment_ids", "positions"}
        assert all(v.shape == (8, 64) and v.dtype == np.int32 for v in b.values())
    got = collections.Counter(c for b in batches for c in chunks_of(b))
    assert got == expected_chunks(list(src), tok, 64)
    rows = [r for b in batches for r in b["segment_ids"]]
    n_rows = sum(1 for r in rows if r.any())
    assert len(batches) == -(-n_rows // 8)  # Last partial batch kept...
    assert all(r.any() for r in rows[:n_rows])  # ...padded with empty rows at the end.
    n_tokens = sum(int((b["segment_ids"] > 0).sum()) for b in batches)
    assert n_tokens == sum(len(tok.encode(d)) + 2 * len(pipeline.chunk_document(
        tok.encode(d), 64)) for d in src)


def test_long_document_is_split_into_chunks(tok):
    doc = read_stdlib("textwrap.py")
    ids = tok.encode(doc)
    assert len(ids) > 10 * 32
    batches = list(pipeline.make_dataset([doc, "x = 1\n"], tok, seq_len=32, batch_size=4,
                                         seed=0, shuffle=False, num_epochs=1))
    chunks = [c for b in batches for c in chunks_of(b)]
    long_chunks = [c for c in chunks if c != (2, *tok.encode("x = 1\n"), 3)]
    assert all(len(c) <= 32 for c in chunks)
    assert [t for c in long_chunks for t in c[1:-1]] == ids  # In order, nothing lost.


def test_training_epochs_reshuffled_and_complete(corpus, tok):
    src = sources.open_source(corpus, "validation")
    docs = list(src)
    one = list(pipeline.make_dataset(src, tok, seq_len=64, batch_size=8, seed=3,
                                     shuffle=True, num_epochs=1))
    assert collections.Counter(c for b in one for c in chunks_of(b)) == expected_chunks(docs, tok, 64)
    two = list(pipeline.make_dataset(src, tok, seq_len=64, batch_size=8, seed=3,
                                     shuffle=True, num_epochs=2))
    got = collections.Counter(c for b in two for c in chunks_of(b))
    assert got == collections.Counter({k: 2 * v for k, v in expected_chunks(docs, tok, 64).items()})
    order = [src[i] for i in range(len(src))]
    shuffled = grain_order(src, seed=3, epochs=2)
    assert sorted(shuffled[:len(src)]) == sorted(order)
    assert shuffled[:len(src)] != shuffled[len(src):]  # A new permutation per epoch.


def grain_order(src, seed, epochs):
    import grain
    return list(grain.MapDataset.source(src).shuffle(seed=seed).repeat(epochs))


@pytest.mark.parametrize("shuffle,num_epochs", [(True, None), (False, 1)])
def test_iterator_state_round_trip(corpus, tok, shuffle, num_epochs):
    src = sources.open_source(corpus, "validation")
    ds = pipeline.make_dataset(src, tok, seq_len=64, batch_size=8, seed=1,
                               shuffle=shuffle, num_epochs=num_epochs)
    it = iter(ds)
    for skip in (0, 3, 7):  # Points at and inside packing segments.
        for _ in range(skip):
            next(it)
        state = json.loads(json.dumps(it.get_state()))
        following = [next(it) for _ in range(5)]
        fresh = iter(pipeline.make_dataset(src, tok, seq_len=64, batch_size=8, seed=1,
                                           shuffle=shuffle, num_epochs=num_epochs))
        fresh.set_state(state)
        for a in following:
            b = next(fresh)
            assert all(np.array_equal(a[k], b[k]) for k in a)


def test_two_processes_read_disjoint_records(tok):
    docs = [f"def f{i}():\n    return {i}\n" for i in range(50)]
    seen = []
    for index in (0, 1):
        ds = pipeline.make_dataset(docs, tok, seq_len=64, batch_size=8, seed=0,
                                   shuffle=True, num_epochs=1, process_index=index,
                                   process_count=2)
        batches = list(ds)
        assert all(b["input_ids"].shape == (4, 64) for b in batches)
        seen.append({tok.decode(c[1:-1]) for b in batches for c in chunks_of(b)})
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(docs)
    with pytest.raises(ValueError, match="batch_size 9 is not divisible by process_count 2"):
        pipeline.make_dataset(docs, tok, seq_len=64, batch_size=9, seed=0, process_count=2)


def test_state_restore_at_every_batch_of_a_finite_dataset(tok):
    docs = [f"x{i} = {i}\n" * (i % 7 + 1) for i in range(40)]
    ds = pipeline.make_dataset(docs, tok, seq_len=16, batch_size=4, seed=0,
                               shuffle=False, num_epochs=1)
    reference = list(ds)
    for k in range(len(reference) + 1):
        it = iter(ds)
        for _ in range(k):
            next(it)
        fresh = iter(ds)
        fresh.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(fresh)
        assert len(rest) == len(reference) - k
        assert all(np.array_equal(a["input_ids"], b["input_ids"])
                   for a, b in zip(rest, reference[k:]))


# ------------------------------------------------------------- bad inputs ---

def tree(root):
    """Every path under `root` (to show that a failed call created nothing)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_jsonl_text_feature_names_the_field_and_keys_the_build(tmp_path):
    rows = [json.dumps({"content": f"document {i}", "id": i}) for i in range(20)]
    (tmp_path / "a.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode())  # With a BOM.
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "a.jsonl"), text_feature="content",
                      validation_fraction=0.0)
    assert sorted(sources.open_source(cfg, "train")) == sorted(f"document {i}" for i in range(20))
    other = data_config(tmp_path / "d", paths=str(tmp_path / "a.jsonl"), text_feature="id")
    assert sources.dataset_id(other) != sources.dataset_id(cfg)  # Another field: another build.
    assert tok_lib.default_model_path(other) != tok_lib.default_model_path(cfg)
    (tmp_path / "b.jsonl").write_text('{"content": "x"}\n{"body": "y", "id": 2}\n')
    bad = data_config(tmp_path / "e", paths=str(tmp_path / "b.jsonl"), text_feature="content")
    with pytest.raises(ValueError) as e:
        sources.get_builder(bad)
    assert str(e.value) == (f"local_text: {tmp_path / 'b.jsonl'}:2 has no field 'content' (the row "
                            "has fields ['body', 'id']); set --config.data.text_feature=<one of "
                            "them>.")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("name,head", [
    ("a.txt", b"PK\x03\x04\x14\x00\x00\x00\x08\x00"),  # zip
    ("a.jsonl", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
    ("a.txt", b"\x7fELF\x02\x01\x01\x00"),
    ("a.txt", b"text" + b"\x00" * 64),
    ("a.jsonl", bytes(range(128, 256)) * 8),  # No NUL, but not UTF-8 either.
])
def test_binary_file_in_corpus_is_named(tmp_path, name, head):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "good.txt").write_text("some text\n")
    (tmp_path / "c" / name).write_bytes(head + b"\xff" * 300)
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "c" / "*"))
    with pytest.raises(ValueError, match=rf"local_text: {tmp_path / 'c' / name} \(matched by "
                       r"data.paths glob .*\) is not UTF-8 text .*; remove it from data.paths "
                       r"or narrow the glob"):
        sources.get_builder(cfg)
    assert not (tmp_path / "d").exists()


def test_text_with_a_few_bad_bytes_is_replaced_and_counted(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait, " * 40)
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "a.txt"), validation_fraction=0.0)
    builder = sources.get_builder(cfg)
    assert builder.info.metadata["train_utf8_replaced_documents"] == 1
    assert "\ufffd" in sources.open_source(cfg, "train")[0]


@pytest.mark.parametrize("path", ["tok/spm.model", "tok/", "tok/tokenizer.json"])
def test_explicit_tokenizer_path_that_is_missing_stops_and_creates_nothing(tmp_path, path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "a.txt"))
    cfg.tokenizer.path = f"{tmp_path}/{path}"  # pathlib would drop the trailing "/".
    before = tree(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^data.tokenizer.path='.*tok/.*' .*does not "
                       r"exist; .*--config.data.tokenizer.train=True"):
        tok_lib.load_or_train(cfg)
    assert tree(tmp_path) == before


def test_explicit_tokenizer_path_trains_there_with_train_true(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x = 1\n")
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "a.txt"), validation_fraction=0.0)
    cfg.tokenizer.path = str(tmp_path / "tok") + "/"
    cfg.tokenizer.train = True
    monkeypatch.setattr(tok_lib, "_train_from_config", lambda d, path: path)
    assert tok_lib.load_or_train(cfg) == str(tmp_path / "tok" / "spm.model")


def test_tokenizer_that_cannot_be_written_stops_before_training(tmp_path):
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "file").write_text("")
    cfg = data_config(tmp_path / "d", paths=str(tmp_path / "a.txt"))
    cfg.tokenizer.update(path=str(tmp_path / "file" / "spm.model"), train=True)
    with pytest.raises(NotADirectoryError, match=r"data.tokenizer.path: cannot create directory .*: .*file' is a "
                       "file; set --config.data.tokenizer.path to a file in a writable"):
        tok_lib.load_or_train(cfg)
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("paths,error,message", [
    ("{t}/a.txt,{t}/typo*.txt", ValueError, "data.paths glob '{t}/typo\\*.txt' matches no file"),
    ("{t}", ValueError, "data.paths entry '{t}' is a directory; give globs of its files"),
    ("{t}/sub/*", ValueError, "data.paths glob '{t}/sub/\\*' matches only directories"),
    ("{t}/*.txt", FileNotFoundError, "'{t}/link.txt' .* is a broken symbolic link"),
    (" , ", ValueError, "data.paths is empty"),
])
def test_bad_corpus_paths_name_the_glob_and_create_nothing(tmp_path, paths, error, message):
    (tmp_path / "a.txt").write_text("x = 1\n")
    (tmp_path / "sub" / "dir").mkdir(parents=True)
    if "link" in message:
        (tmp_path / "link.txt").symlink_to(tmp_path / "gone.txt")
    before = tree(tmp_path)
    cfg = data_config(tmp_path / "d", paths=paths.format(t=tmp_path))
    with pytest.raises(error, match=message.format(t=tmp_path)):
        sources.get_builder(cfg)
    assert tree(tmp_path) == before


def test_unreadable_corpus_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x = 1\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).endswith("a.txt")
                        and real_access(p, mode))  # chmod does not stop root.
    with pytest.raises(PermissionError, match=r"'.*a.txt' \(matched by data.paths glob .*\) "
                       "cannot be read"):
        sources.get_builder(data_config(tmp_path / "d", paths=str(tmp_path / "*.txt")))


@pytest.mark.parametrize("line,message", [
    ('{"text": "a", }', r"b.jsonl:2 is not valid JSON \(Expecting property name"),
    ('["a", "b"]', r"b.jsonl:2 is an array, not a JSON object with a 'text' field"),
    ('{"text": 3}', r"b.jsonl:2 field 'text' holds 3, not a string"),
])
def test_malformed_jsonl_row_names_file_and_line(tmp_path, line, message):
    (tmp_path / "b.jsonl").write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        sources.get_builder(data_config(tmp_path / "d", paths=str(tmp_path / "b.jsonl")))
    assert not (tmp_path / "d").exists()


def test_unknown_dataset_name_and_bad_data_dir(tmp_path):
    with pytest.raises(ValueError, match=r"^data.name='wikipdia' is neither a local corpus .*"
                       r"prepared there: none; .*set --config.data.name"):
        sources.get_builder(data_config(tmp_path / "d", name="wikipdia"))
    (tmp_path / "file").write_text("")
    (tmp_path / "a.txt").write_text("x = 1\n")
    with pytest.raises(NotADirectoryError, match=r"data.data_dir: cannot create directory .*file/tfds"):
        sources.get_builder(data_config(tmp_path / "file" / "tfds", paths=str(tmp_path / "a.txt")))
    assert tree(tmp_path) == ["a.txt", "file"]


def test_failed_build_removes_what_it_created(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("x = 1\n")

    def fail(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(local_text.LocalText, "_generate_examples", fail)
    with pytest.raises(OSError, match="disk full"):
        sources.get_builder(data_config(tmp_path / "d", paths=str(tmp_path / "a.txt")))
    assert tree(tmp_path) == ["a.txt"]


def test_corrupt_ngram_lexicon_is_named(tmp_path):
    from pretrain.data import ngrams
    (tmp_path / "lexicon.json").write_text('{"ngrams": [')
    with pytest.raises(ValueError, match=r"lexicon.json is not an n-gram lexicon .*delete it"):
        ngrams.load(str(tmp_path / "lexicon.json"))
