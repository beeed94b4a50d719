"""Export a pretraining workdir for fine-tuning: a Hugging Face directory and plain Flax params.

  python -m pretrain.export --workdir=workdir/demo --out=exports/demo

The directory holds config.json + model.safetensors (BertForMaskedLM names, or
ModernBertForMaskedLM's for ModernBERT's options, loadable with `transformers.AutoModelForMaskedLM`
/ `AutoModel`; none when the options match neither), the tokenizer files `AutoTokenizer` loads,
flax_params.msgpack + encoder_config.json (our own format), the sentence-transformers module files
(`SentenceTransformer(<dir>)`: --pooling, --normalize, --max_seq_length) and a README model card.
Nothing is pickled: safetensors, msgpack and JSON only.
"""
import dataclasses
import json
import os

import flax.serialization
from absl import flags
from etils import epath

from pretrain import cli, console
from pretrain.data import hf_tokenizer
from pretrain.interop import (files, hf_bert, hf_electra, hf_modernbert, load,
                              sentence_transformers as st_export)
from pretrain.models import pooling as pooling_lib, stacking
from pretrain.training import metrics as metrics_lib


# What the export's Hugging Face files are, by hf_format's first value.
_LOADS = {
    "bert": "Load with `transformers.AutoModelForMaskedLM.from_pretrained(<this dir>)` and "
            "`AutoTokenizer`",
    "electra": "Load with `transformers.AutoModelForMaskedLM.from_pretrained(<this dir>)` and "
               "`AutoTokenizer`",
    "modernbert": "Load with `transformers.AutoModelForMaskedLM.from_pretrained(<this dir>)` "
                  "(ModernBERT) and `AutoTokenizer`",
    "modernbert_encoder": "Load the encoder with `transformers.AutoModel.from_pretrained(<this "
                          "dir>)` (ModernBertModel; the detector head is only in the Flax params) "
                          "and `AutoTokenizer`",
}


def hf_format(objective):
  """(what the Hugging Face files are: "bert", "electra", "modernbert", "modernbert_encoder",
  or None when no Hugging Face architecture holds the model's options, why not)."""
  architecture, why = hf_modernbert.hf_architecture(objective.model_config)
  if architecture == "bert":
    return ("electra" if objective.export_format == "electra" else "bert"), ""
  if architecture == "modernbert":
    return ("modernbert_encoder" if objective.export_format == "electra" else "modernbert"), ""
  return None, why


def _architecture(m):
  """The model line's options that differ from BERT's."""
  options = [f"{k} {m.get(k)}" for k, bert in (
      ("position", "learned"), ("mlp", "gelu"), ("pre_norm", False), ("norm", "layernorm"),
      ("norm_bias", True), ("use_bias", True), ("type_vocab_size", 2), ("local_window", 0),
      ("mlm_head", "bert"), ("vocab_multiple", 1)) if m.get(k, bert) != bert]
  if m.get("local_window", 0):
    options.append(f"global attention in layers i with i % {m.get('global_every')} == 0")
  return f" ({', '.join(options)})" if options else ""


def model_card(config, step, workdir_metrics, objective=None):
  last_eval = next((r for r in reversed(workdir_metrics) if any(k.startswith("eval_") for k in r)), {})
  fmt, why = hf_format(objective) if objective is not None else ("bert", "")
  if fmt is None:
    load = (f"No Hugging Face architecture holds these options ({why}): only "
            "`flax_params.msgpack` + `encoder_config.json` are written, for `pretrain.models.encoder`")
  else:
    load = (_LOADS[fmt] + "; `flax_params.msgpack` + `encoder_config.json` hold the same "
            "weights for `pretrain.models.encoder`")
  lines = [
      "# Pretrained encoder", "",
      f"- objective: `{config.objective.name}`",
      f"- data: `{config.data.name}` (sequence length {config.data.seq_len}, "
      f"vocabulary {config.data.tokenizer.vocab_size}, sentencepiece {config.data.tokenizer.model_type})",
      f"- model: {config.model.num_layers} layers, hidden {config.model.hidden_size}, "
      f"{config.model.num_heads} heads, MLP {config.model.mlp_dim}{_architecture(config.model)}",
      f"- steps: {step} (global batch {config.data.batch_size})",
      "- metrics at export: " + ", ".join(f"{k} {v:.4f}" for k, v in last_eval.items() if k != "step"),
      "", load + (". Attention dropout was not used in pretraining (0.0 in config.json)." if fmt
                  else "."),
  ]
  if config.objective.name == "ernie_gram":
    lines += ["", "The n-gram embeddings and the n-gram rows of the MLM head are pretraining-only: "
              "the Hugging Face weights hold the encoder and the head's token rows (a plain MLM "
              "head); only `flax_params.msgpack` keeps the n-gram tables."]
  return "\n".join(lines) + "\n"


def export(workdir, out, step=None, overwrite=False, *, pooling=None, normalize=None,
           max_seq_length=None):
  out_path = epath.Path(out)
  if out_path.exists() and not out_path.is_dir():
    raise FileExistsError(f"--out={out} is a file; give a directory to write the export into.")
  if out_path.exists() and any(out_path.iterdir()) and not overwrite:
    raise FileExistsError(f"Export directory {out} is not empty; choose another --out or pass "
                          f"--overwrite.")
  config, tokenizer, objective, params, step = load.load_workdir(workdir, step)
  try:
    rows = metrics_lib.read_jsonl(workdir)
  except FileNotFoundError:
    rows = []
  return write_export(out, config, tokenizer, objective, params, step, rows, pooling=pooling,
                      normalize=normalize, max_seq_length=max_seq_length)


def write_export(out, config, tokenizer, objective, params, step, rows, *, pooling=None,
                 normalize=None, max_seq_length=None):
  """Writes the export of in-memory `params` of `objective` (any registered one) into `out`; a
  scanned run's stacked layers are written unstacked (the canonical layer_{i} layout)."""
  params = stacking.unstack_all(params)
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  _write_hf(out, objective, params)
  hf_tokenizer.save_hf(tokenizer, out)
  st_pooling = st_export.pooling_for(objective, pooling, normalize)
  # None: a trained pooler sentence-transformers cannot express, or no Hugging Face model.
  if st_pooling is not None and hf_format(objective)[0] is not None:
    st_export.write_module_files(out, objective.model_config.hidden_size, pooling=st_pooling[0],
                                 normalize=st_pooling[1],
                                 max_seq_length=max_seq_length or config.data.seq_len)
  (out_path / files.MSGPACK_FILE).write_bytes(flax.serialization.msgpack_serialize(params))
  objective.export_extras(out, params)  # e.g. RetroMAE's decoder, to continue pretraining
  (out_path / files.ENCODER_CONFIG_FILE).write_text(
      json.dumps(dataclasses.asdict(dataclasses.replace(
          objective.model_config, scan_layers=False, remat="none")), indent=2))
  (out_path / files.README_FILE).write_text(model_card(config, step, rows, objective))
  return out


def _write_hf(out, objective, params):
  """The Hugging Face files of `hf_format(objective)`; a padded vocabulary is written padded
  (its padded rows never predicted: `hf_modernbert.padded_head`)."""
  fmt, _ = hf_format(objective)
  cfg, view = objective.model_config, hf_modernbert.unpadded_view(objective.model_config)
  # ERNIE-Gram's head predicts tokens and n-grams: only its token rows (`token_head`) export.
  head = hf_modernbert.padded_head(objective.token_head(params), cfg)
  if fmt == "electra":  # Replaced-token detection: an ELECTRA directory.
    params = dict(hf_bert.plain(params))
    gen = objective.generator_config
    if "generator_head" in params:
      params["generator_head"] = hf_modernbert.padded_head(params["generator_head"], gen)
    hf_electra.write_hf_electra(out, params, view, gen and hf_modernbert.unpadded_view(gen))
  elif fmt == "bert":
    hf_bert.write_hf_model(out, objective.encoder(params), head, view)
  elif fmt in ("modernbert", "modernbert_encoder"):
    hf_modernbert.write_hf_model(out, objective.encoder(params),
                                 head if fmt == "modernbert" else None, cfg)


def define_flags():
  """The command line's flags; defined on demand, not at import, so that importing this module
  (pretrain.finetune does) never collides with the importer's own flags."""
  flags.DEFINE_string("workdir", None, "A pretraining workdir (with checkpoints/).")
  flags.DEFINE_string("out", None, "Directory to write; must be empty or not exist.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_bool("overwrite", False, "Allow writing into a non-empty --out.")
  flags.DEFINE_enum(
      "pooling", None, pooling_lib.MODES, "sentence-transformers pooling: mean or max over tokens "
      "or the [CLS] state (default: the objective's pooler, else mean).")
  flags.DEFINE_bool("normalize", None, "L2-normalise sentence-transformers embeddings "
                    "(default: as the objective's pooler did, else true).")
  flags.DEFINE_integer(
      "max_seq_length", None, "sentence-transformers truncation (default: the training "
      "data.seq_len, the longest inputs pretraining showed the model).")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  f = flags.FLAGS
  console.quiet(f["verbosity"].present)
  out = export(f.workdir, f.out, f.step, f.overwrite, pooling=f.pooling, normalize=f.normalize,
               max_seq_length=f.max_seq_length)
  with open(os.path.join(out, files.CONFIG_FILE if os.path.isfile(
      os.path.join(out, files.CONFIG_FILE)) else files.ENCODER_CONFIG_FILE), encoding="utf-8") as c:
    written = json.load(c).get("architectures", ["no Hugging Face model: Flax params only"])
  print(f"Exported {f.workdir} to {out} ({', '.join(written)} + tokenizer, Flax msgpack).")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
