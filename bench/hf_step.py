"""Baseline train-step throughput of Hugging Face BERT MLM (Flax or PyTorch) at our settings.

  python bench/hf_step.py --framework=flax|torch --size=demo --seq_len=128 --batch=32
  python bench/hf_step.py --framework=torch --recipe=modernbert --size=base --seq_len=1024 ...
  python bench/hf_step.py --framework=torch --head=masked --size=demo --seq_len=128 --batch=32

Same model shape as configs/common.MODEL_SIZES, vocabulary, batch, sequence length, fp32, hidden
dropout 0.1 (attention-probability dropout 0, as in our encoder) and AdamW as bench/train_step.py.
Each framework runs in its own process (bench/compare.py starts them one after another) so that
neither inherits the other's thread pools or allocator. Labels mark 15% of the positions, which is
the work HF does no matter how many positions are labelled: its vocabulary projection runs at every
position. Prints one JSON line: compile (first step) seconds, median step seconds, tokens/s,
peak resident memory.

Needs transformers 4.57.x (the last release with Flax models): `pip install -e .[bench]` in its own
virtualenv (`make bench` creates .venv-bench). `--recipe=modernbert` (PyTorch only) runs
``ModernBertForMaskedLM`` with the config.json our export writes for configs/modernbert.py at that
size (so the same layers, widths, window and vocabulary), under attention "sdpa".
`--head=masked` (PyTorch BERT only) runs the MLM head only at the labelled positions, gathered
from the encoder's output as our step does, instead of ``BertForMaskedLM``'s every position: our
step's FLOPs, so the two MFUs compare steps of the same arithmetic.
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from configs import common  # noqa: E402

MASK_RATE = 0.15
HEADS = ("full", "masked")  # the MLM head at every position (HF's own), or only where labelled


def peer_name(framework, head="full"):
  """The row name of a baseline in the benchmarks' tables: hf-torch, hf-torch masked head..."""
  return f"hf-{framework}" + (" masked head" if head == "masked" else "")


def hf_config(size, vocab, seq_len=512):
  import transformers  # pylint: disable=import-outside-toplevel
  layers, hidden, heads, mlp = common.MODEL_SIZES[size]
  return transformers.BertConfig(
      vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
      intermediate_size=mlp, max_position_embeddings=max(512, seq_len), hidden_dropout_prob=0.1,
      attention_probs_dropout_prob=0.0, hidden_act="gelu")


def modernbert_config(size, vocab, seq_len):
  """The ``ModernBertConfig`` of configs/modernbert.py at `size` (our export's config.json)."""
  import transformers  # pylint: disable=import-outside-toplevel
  from configs import modernbert  # pylint: disable=import-outside-toplevel
  from objectives import registry  # pylint: disable=import-outside-toplevel
  from pretrain.interop import hf_modernbert  # pylint: disable=import-outside-toplevel
  c = modernbert.get_config(f"size={size},seq_len={seq_len},vocab_size={vocab}")
  fields = hf_modernbert.hf_config(registry.encoder_config(c.model, vocab))
  return transformers.ModernBertConfig(**{k: v for k, v in fields.items()
                                          if k not in ("model_type", "architectures")})


def fake_batch(batch, seq_len, vocab, seed=0, exact=False):
  """ids, attention mask, labels (-100 where unlabelled) of 15% of the positions.

  exact: every row labels ceil(15% of seq_len) positions, the slots our step gathers per row
  (objectives.masking.max_predictions; not imported, as it would bring JAX into the PyTorch
  process), so that a masked head does our step's work.
  """
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, seq_len)).astype(np.int32)
  if exact:
    order = np.argsort(rng.random((batch, seq_len)), axis=1)  # a random permutation per row
    chosen = order < math.ceil(seq_len * MASK_RATE)
  else:
    chosen = rng.random((batch, seq_len)) < MASK_RATE
  labels = np.where(chosen, ids, -100).astype(np.int32)
  return ids, np.ones_like(ids), labels


def time_steps(step, repeats, steps_per_repeat=5):
  """(first-call seconds, median seconds per step) of `step()`, which must block until done."""
  t = time.perf_counter()
  step()
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(steps_per_repeat):
      step()
    times.append((time.perf_counter() - t) / steps_per_repeat)
  return first, statistics.median(times)


def flax_step(config, ids, mask, labels, dtype, device, lr=1e-4):
  import jax  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  del device  # JAX picks the accelerator itself.
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  model = transformers.FlaxBertForMaskedLM(config, seed=0, dtype=jnp.dtype(dtype))
  tx = optax.adamw(lr, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.01)
  state = {"params": model.params, "opt": tx.init(model.params)}

  def loss_fn(params, rng):
    logits = model(ids, attention_mask=mask, params=params, dropout_rng=rng, train=True).logits
    logits = logits.astype(np.float32)
    valid = labels >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, np.maximum(labels, 0))
    return (ce * valid).sum() / valid.sum()

  @jax.jit
  def update(params, opt, rng):
    loss, grads = jax.value_and_grad(loss_fn)(params, rng)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  rng = jax.random.PRNGKey(0)

  def step():
    nonlocal rng
    rng, sub = jax.random.split(rng)
    state["params"], state["opt"], loss = update(state["params"], state["opt"], sub)
    loss.block_until_ready()

  return step


def masked_head_loss(model, ids, mask, labels):
  """BertForMaskedLM's loss with its MLM head run only at the labelled positions (our work)."""
  import torch  # pylint: disable=import-outside-toplevel
  hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
  labelled = labels >= 0
  logits = model.cls(hidden[labelled])  # [labelled positions, vocab]
  return torch.nn.functional.cross_entropy(logits.float(), labels[labelled])


def torch_step(config, ids, mask, labels, dtype, device, lr=1e-4, head="full"):
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  config._attn_implementation = "sdpa"  # pylint: disable=protected-access  # its fastest CPU path
  modern = isinstance(config, transformers.ModernBertConfig)
  if modern and head == "masked":
    raise ValueError("head='masked' runs BertForMaskedLM's parts; give a BertConfig.")
  model_class = transformers.ModernBertForMaskedLM if modern else transformers.BertForMaskedLM
  model = model_class(config).train().to(device)
  opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
  ids_t, mask_t, labels_t = (torch.from_numpy(x).long().to(device) for x in (ids, mask, labels))
  # bf16 as mixed precision (float32 master weights), like our model.dtype=bfloat16.
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

  def step():
    with autocast:
      loss = (masked_head_loss(model, ids_t, mask_t, labels_t) if head == "masked"
              else model(input_ids=ids_t, attention_mask=mask_t, labels=labels_t).loss)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()

  return step


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--framework", choices=("flax", "torch"), required=True)
  parser.add_argument("--recipe", default="bert", choices=("bert", "modernbert"))
  parser.add_argument("--size", default="demo", choices=tuple(common.MODEL_SIZES))
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="PyTorch only.")
  parser.add_argument("--head", default="full", choices=HEADS,
                      help="masked: the MLM head only at the labelled positions (PyTorch BERT).")
  args = parser.parse_args()
  if args.recipe == "modernbert" and args.framework != "torch":
    parser.error("--recipe=modernbert needs --framework=torch (transformers has no Flax ModernBERT)")
  if args.head == "masked" and (args.framework, args.recipe) != ("torch", "bert"):
    parser.error("--head=masked needs --framework=torch --recipe=bert")
  config = (modernbert_config(args.size, args.vocab, args.seq_len) if args.recipe == "modernbert"
            else hf_config(args.size, args.vocab, args.seq_len))
  ids, mask, labels = fake_batch(args.batch, args.seq_len, args.vocab,
                                 exact=args.head == "masked")
  if args.framework == "torch":
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(os.cpu_count())
    step = torch_step(config, ids, mask, labels, args.dtype, args.device, head=args.head)
  else:
    step = flax_step(config, ids, mask, labels, args.dtype, args.device)
  first, step_s = time_steps(step, args.repeats)
  print(json.dumps(dict(
      framework=peer_name(args.framework, args.head),
      head=args.head, recipe=args.recipe, attention="sdpa", size=args.size, seq_len=args.seq_len,
      batch=args.batch,
      vocab=args.vocab, dtype=args.dtype, device=args.device, compile_s=first, step_s=step_s,
      tokens_per_s=args.batch * args.seq_len / step_s,
      peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      peak_memory_mib=peak_device_mib(args.framework, args.device))))


def peak_device_mib(framework, device):
  """The accelerator's peak allocated memory (PyTorch CUDA), else the process's peak RSS."""
  if framework == "torch" and device == "cuda":
    import torch  # pylint: disable=import-outside-toplevel
    return torch.cuda.max_memory_allocated() / 2**20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
  main()
