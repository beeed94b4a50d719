"""Contrastive pretraining: two views -> two encodings -> pooled embeddings -> InfoNCE or MoCo.

One objective, `contrastive`, whose parts are chosen by `config.objective`:

- view (`pretrain.data.pairs`): `crop` (Contriever: two random crops of a chunk, each of ratio
  U(crop_ratio_min, crop_ratio_max) with token deletion, made on device by `objectives.views`),
  `docstring` (docstring <-> function body), `same_file` (a function <-> another function of
  its file), `ict` (ORQA's Inverse Cloze Task over lines or sentences), `files` (the rows of
  pair files, `data.name=pair_files`, with `num_negatives` hard negatives each), `ccp` (CCP,
  Wu et al. 2022: a line or sentence and one within `ccp_window` of it; ours vs the paper: one
  memory bank (MoCo's queue) instead of one per language, and the asymmetric batch norm
  (`query_batch_norm`) is a plain standardisation of the query embeddings over the global
  batch, without affine parameters or running statistics, in training and evaluation). One shared
  encoder and pooler embed both sides (ORQA trains two encoders; we share one).
- hard negatives (view=files): the B x k negatives join the B positives as candidates of every
  query (sentence-transformers' MultipleNegativesRankingLoss, FlagEmbedding); the guide masks
  them by the same rule; the symmetric direction scores documents against the queries only.
- loss: `infonce`: scores q_i . d_j / temperature over the GLOBAL batch, CE with the diagonal as
  the labels (`symmetric`: the mean of both directions). Under jit the [B, D] embeddings are global
  arrays sharded over ("data", "fsdp"); q @ d.T is the all-device computation (XLA gathers), so
  every device's rows are negatives of every query. `moco` (Contriever's MoCo): the key side uses
  an EMA encoder (key <- m key + (1 - m) query params, updated before the keys are computed, as in
  Contriever), logits [q.k+, q.queue] / temperature with label 0, then the global batch's keys
  are written into the queue at its pointer (oldest first out). Key encoder, queue (initialised to
  random unit vectors, as Contriever does) and pointer are the objective's non-gradient state, so
  they are checkpointed; the key encoder starts as a copy of the query encoder at the first
  training step (so it also copies an `init_from` warm start).
- pooler (`pretrain.models.poolers`): cls, mean, max, latent (NV-Embed), multilayer; optional projection
  (+ LayerNorm, ICT) and L2 normalisation.
- nesting: `matryoshka` (sum of the loss over the nested prefixes `matryoshka_dims` of the
  embedding; a prefix of a normalised embedding is normalised again); `2dmse` (each step draws a
  layer l in 1..n-1 and a dimension d from `matryoshka_dims` below the full one; for each of the
  full and the drawn dimension: L(last) + L(layer l) / l + kl_weight * KL(last || layer l), as in
  sentence-transformers' Matryoshka2dLoss); `starbucks` (a fixed list of (layer, dim) pairs: L(full)
  + sum over pairs of L(layer, dim) + kl_weight * KL(full || (layer, dim))). The KL is between
  the rows' softmax score distributions (teacher = the full model, as the Starbucks paper states;
  sentence-transformers' reference code compares softmaxed embedding components instead), and,
  like the reference code, the teacher side is not detached. Layer l's embedding pools the
  output of the l-th transformer layer with the same pooler.
- guide (GISTEmbed): a frozen guide encoder (a workdir, an export dir, or a Hugging Face BERT /
  ELECTRA / RoBERTa dir such as all-MiniLM-L6-v2, see `pretrain.interop.load.load_guide`,
  built by the entry point and passed in `base.Resources`) embeds both sides
  (cosine); every in-batch candidate it scores strictly above the query's own positive is masked
  out of the softmax. The guide reads the same token ids as the student: THE GUIDE AND THE STUDENT
  MUST SHARE A TOKENIZER (checked: equal vocabulary sizes). Its params live in the objective's
  state (frozen, checkpointed). `score_distill` (kl, margin_mse; objectives/score_distill.py)
  also makes it a teacher of the student's scores; `guide_masking=False` keeps it a teacher only.

Compute per step (for equal-compute comparisons; attention's L^2 term ignored): with N encoder
parameters, B rows, Lq and Ld the query and document row lengths (padded lengths: that is what
XLA computes), the trained encoder costs 6 N B (Lq + Ld) FLOPs; MoCo replaces the document side's
6 N B Ld by a forward-only 2 N B Ld; a guide of N_g parameters adds 2 N_g B (Lq + Ld). For
`crop`, Lq = Ld = views.crop_length(seq_len, crop_ratio_max) (66 for seq_len 128 and 0.5); MLM
costs 6 N B seq_len plus its head.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from objectives import base, grad_cache, score_distill, views
from objectives.contrastive_checks import validate_config
from objectives.contrastive_losses import (batch_standardize, default_dims, default_starbucks,
                                           ema, enqueue, guide_masks, info_nce, kl_rows,
                                           moco_logits, nest)
from pretrain.data import pairs
from pretrain.models import encoder as enc, poolers

CONFIG = dict(
    view="crop",                 # crop, docstring, same_file, ict
    crop_ratio_min=0.1,          # crop: each crop keeps U(min, max) of the chunk (Contriever)
    crop_ratio_max=0.5,
    token_deletion=0.1,          # crop: each token of a crop dropped with this probability
    query_len=64,                # docstring, same_file, ict: query row length (ORQA: 64)
    ict_remove_rate=0.9,         # ict: the query line is removed from its block this often
    ict_unit="line",             # ict: line (code) or sentence (prose)
    contrastive_loss="infonce",  # infonce or moco
    temperature=0.05,            # Contriever 0.05; ORQA 1.0; GISTEmbed 0.01
    symmetric=False,             # infonce: mean of query->doc and doc->query losses
    moco_momentum=0.9995,
    queue_size=131072,           # moco: a multiple of data.batch_size
    pooler="mean",               # cls, mean, max, latent, multilayer
    pooler_latents=512,
    pooler_heads=8,
    projection_dim=0,            # 0: none; ORQA: 128 with projection_layer_norm
    projection_layer_norm=False,
    normalize=False,             # L2-normalise embeddings (cosine scores)
    nesting="none",              # none, matryoshka, 2dmse, starbucks
    matryoshka_dims=(),          # (): 8, 16, 32, ... up to the embedding size
    starbucks_layers=(),         # (): layers 1..n with dims halving down from the full one
    starbucks_dims=(),
    kl_weight=1.0,               # 2dmse, starbucks
    guide="",                    # GISTEmbed guide model directory ("" = none)
    guide_pooler="auto",         # auto (pooler.json / sentence-transformers config, else mean)
    guide_masking=True,          # the guide masks candidates it scores above the positive
    score_distill="none",        # none, kl, margin_mse: the guide teaches the student's scores
    score_distill_weight=1.0,    # the distillation loss's weight next to the InfoNCE
    score_distill_temperature=0.0,  # kl: the teacher's temperature (0: objective.temperature)
    ccp_window=2,                # ccp: the context unit is within this many of the centre
    query_batch_norm=False,      # CCP's asymmetric batch norm: standardise the query side's
                                 # embeddings over the batch (keys/documents untouched)
    num_negatives=0,             # view=files: hard negatives per query, scored next to every
                                 # in-batch candidate (and every other query's negatives)
    grad_cache_chunk=0,          # > 0: GradCache, embeddings in chunks of this many rows of the
                                 # global batch (objectives/grad_cache.py); 0: all at once
)


# --- The objective ------------------------------------------------------------------------------

class Contrastive(base.EncoderObjective):
  """See the module docstring. Params {"encoder"[, "pooler"]}."""

  checks = (validate_config,)
  input_format = "pairs"

  @classmethod
  def needs(cls, objective_config):
    return frozenset({"guide"}) if objective_config.guide else frozenset()

  def __init__(self, config, model_config: enc.EncoderConfig, tokenizer, resources=base.Resources()):
    super().__init__(config, model_config, tokenizer, resources)
    self.features = pairs.features(config.view, config.num_negatives)
    self.pooler_config = poolers.PoolerConfig(
        kind=config.pooler, hidden_size=model_config.hidden_size,
        num_layers=model_config.num_layers, num_latents=config.pooler_latents,
        num_heads=config.pooler_heads, projection_dim=config.projection_dim,
        projection_layer_norm=config.projection_layer_norm, normalize=config.normalize,
        dtype=model_config.dtype)
    self.pooler_module = poolers.Pooler(self.pooler_config)
    self.dim = self.pooler_config.output_dim
    self.moco = config.contrastive_loss == "moco"
    self.shape_fields = tuple(f"objective.{key}" for key in (
        "pooler", "pooler_latents", "pooler_heads", "projection_dim", "projection_layer_norm",
        "contrastive_loss") + (("queue_size",) if self.moco else ()))
    self.dims = tuple(config.matryoshka_dims) or default_dims(self.dim)
    self.starbucks = (tuple(zip(config.starbucks_layers, config.starbucks_dims))
                      or default_starbucks(model_config.num_layers, self.dim))
    self.nests_layers = config.nesting in ("2dmse", "starbucks")
    self.all_layers = self.pooler_config.needs_all_layers or self.nests_layers
    self.guide = resources.guide
    if config.guide and self.guide is None:
      raise ValueError(f"objective.guide={config.guide!r}: the entry point builds the guide "
                       "(pretrain.interop.load.load_guide) and passes it in Resources.")
    if self.guide and self.guide.model_config.vocab_size != model_config.vocab_size:
      raise ValueError(
          f"objective.guide={config.guide!r} has a {self.guide.model_config.vocab_size}-token "
          f"vocabulary but the model has {model_config.vocab_size}: the guide reads the "
          "student's token ids, so both must use the same tokenizer.")

  # --- Data ---
  def example_batch(self, seq_len):
    lengths = pairs.lengths(self.features, seq_len, self.config.query_len,
                            self.config.num_negatives)
    return {k: jnp.ones((1, n), jnp.int32) for k, n in lengths.items()}

  def dataset_options(self):
    c = self.config
    return dict(view=c.view, query_len=c.query_len, ict_remove_rate=c.ict_remove_rate,
                ict_unit=c.ict_unit, num_negatives=c.num_negatives, ccp_window=c.ccp_window)

  def views(self, rng, batch):
    """(query rows, document rows): dicts of ids, segment ids, positions."""
    if self.config.view == "crop":
      c = self.config
      return views.two_views(rng, batch, ratio_min=c.crop_ratio_min, ratio_max=c.crop_ratio_max,
                             deletion=c.token_deletion)
    return tuple({"input_ids": batch[f"{p}_ids"], "segment_ids": batch[f"{p}_segment_ids"],
                  "positions": batch[f"{p}_positions"]} for p in ("query", "doc"))

  def negatives(self, batch):
    """The hard negatives' rows, [B * k, seq_len] each (row b * k + j: query b's j-th), or None."""
    k = self.config.num_negatives
    if not k:
      return None
    return {key: batch[f"neg_{name}"].reshape(-1, batch[f"neg_{name}"].shape[1] // k)
            for key, name in (("input_ids", "ids"), ("segment_ids", "segment_ids"),
                              ("positions", "positions"))}

  # --- Parameters and state ---
  def init(self, rng, batch):
    enc_rng, pool_rng = jax.random.split(rng)
    q, _ = self.views(jax.random.key(0), batch)
    params = {"encoder": self.encoder_module.init(enc_rng, q["input_ids"], q["segment_ids"],
                                                  q["positions"])["params"]}
    pooler = poolers.init_params(self.pooler_module, pool_rng)
    if pooler:
      params["pooler"] = pooler
    return params

  def init_state(self):
    state = {}
    if self.moco:
      boxed = jax.eval_shape(self.init, jax.random.key(0), self.example_batch(8))
      state["key_params"] = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), boxed)
      state["key_initialized"] = jnp.zeros((), bool)
      queue = jax.random.normal(jax.random.key(0), (self.config.queue_size, self.dim))
      # Rows split like a batch over the data-parallel devices (the queue is a multiple of the
      # global batch), not replicated: 131072 x 768 floats is 400 MB per device otherwise.
      state["queue"] = nn.LogicallyPartitioned(poolers.l2_normalize(queue), ("batch", None))
      state["queue_ptr"] = jnp.zeros((), jnp.int32)
    if self.guide is not None:
      state["guide"] = self._boxed_guide()
    return state

  def _boxed_guide(self):
    """The guide's arrays with the logical axis boxes of its modules (so FSDP shards them)."""
    g = self.guide
    ones = jnp.ones((1, 2), jnp.int32)
    boxed = {"encoder": jax.eval_shape(enc.Encoder(g.model_config).init, jax.random.key(0),
                                       ones, ones, ones)["params"],
             "pooler": jax.eval_shape(functools.partial(
                 poolers.init_params, poolers.Pooler(g.pooler_config)), jax.random.key(0))}
    is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda b, v: b.replace_boxed(jnp.asarray(v)) if is_box(b)
                        else jnp.asarray(v), boxed, g.params, is_leaf=is_box)

  def export_extras(self, out_dir, params):
    """pooler.json + pooler_params.msgpack, so an export embeds as it was trained."""
    poolers.save(out_dir, self.pooler_config, params.get("pooler", {}))

  def import_extras(self, model_dir, params):
    """`init_from=<export>`: its trained pooler when it is the one this config builds (a
    different pooler, or a plain BERT directory, leaves the fresh one)."""
    saved = poolers.load(model_dir)
    if saved is None or saved[0] != self.pooler_config or "pooler" not in params:
      return params
    pooler = nn.unbox(params["pooler"])
    if jax.tree.map(np.shape, pooler) != jax.tree.map(np.shape, saved[1]):
      raise ValueError(f"{model_dir}: its pooler parameters do not fit {self.pooler_config}; "
                       "the export and this config disagree.")
    return {**params, "pooler": jax.tree.map(
        lambda old, new: np.asarray(new, np.asarray(old).dtype), pooler, saved[1])}

  # --- Embeddings ---
  def hidden(self, encoder_params, rows, rng, train):
    """Every layer's states (a tuple; only the last unless needed) of a side's rows."""
    out = self.encoder_module.apply(
        {"params": encoder_params}, rows["input_ids"], rows["segment_ids"], rows["positions"],
        deterministic=not train, rngs={"dropout": rng}, return_all_layers=self.all_layers)
    return out if self.all_layers else (out,)

  def pool(self, pooler_params, layers, rows, layer=None):
    """[B, D] embeddings of the last layer, or of transformer layer `layer` (1-based, traced ok)."""
    if layer is None or isinstance(layer, int):
      states = layers[-1 if layer is None else layer]
    else:
      states = jnp.take(jnp.stack(layers), layer, axis=0)
    return self.pooler_module.apply({"params": pooler_params}, states, rows["segment_ids"], layers)

  def embeddings(self, encoder_params, pooler_params, rows, rng, train):
    """[B, K, D]: the pooled embeddings of every layer (K = layers + 1, 0 the embedding layer's)
    when the nesting reads layers, else of the last (K = 1); in GradCache chunks when set."""
    def embed(r, key):
      layers = self.hidden(encoder_params, r, key, train)
      picked = range(len(layers)) if self.nests_layers else (None,)
      return jnp.stack([self.pool(pooler_params, layers, r, layer) for layer in picked], 1)
    return grad_cache.chunked(embed, rows, rng, self.config.grad_cache_chunk)

  def guide_embed(self, guide_params, rows):
    g = self.guide
    layers = enc.Encoder(g.model_config).apply(
        {"params": guide_params["encoder"]}, rows["input_ids"], rows["segment_ids"],
        rows["positions"], return_all_layers=g.pooler_config.needs_all_layers)
    layers = layers if g.pooler_config.needs_all_layers else (layers,)
    return poolers.embed(g.pooler_config, guide_params["pooler"], layers, rows["segment_ids"])

  # --- Loss ---
  def loss(self, params, state, batch, rng, *, train):
    c = self.config
    view_rng, q_rng, d_rng, nest_rng = jax.random.split(rng, 4)
    q_rows, d_rows = self.views(view_rng, batch)
    n_rows = self.negatives(batch)
    valid = (q_rows["segment_ids"][:, 0] > 0) & (d_rows["segment_ids"][:, 0] > 0)
    q_pooler = params.get("pooler", {})
    q_emb = self.embeddings(params["encoder"], q_pooler, q_rows, q_rng, train)
    if c.query_batch_norm:
      q_emb = batch_standardize(q_emb, valid)
    new_state, metrics = state, {}
    if self.moco:
      own = jax.lax.stop_gradient({k: params[k] for k in state["key_params"]})
      key = (ema(state["key_params"], own, c.moco_momentum, state["key_initialized"]) if train
             else jax.tree.map(lambda k, p: jnp.where(state["key_initialized"], k, p),
                               state["key_params"], own))
      key = jax.lax.stop_gradient(key)
      d_emb = self.embeddings(key["encoder"], key.get("pooler", {}), d_rows, d_rng, train)
    else:
      d_emb = self.embeddings(params["encoder"], q_pooler, d_rows, d_rng, train)
    # Candidates: the B positives, then the B x k hard negatives (every query scores them all).
    cand_emb, cand_valid = d_emb, valid
    if n_rows is not None:
      n_emb = self.embeddings(params["encoder"], q_pooler, n_rows,
                              jax.random.fold_in(d_rng, 1), train)
      cand_emb = jnp.concatenate([d_emb, n_emb])
      cand_valid = jnp.concatenate([valid, n_rows["segment_ids"][:, 0] > 0])
    masks = (None, None)
    if self.guide is not None:
      guide = jax.lax.stop_gradient(state["guide"])
      embed = lambda rows, _: self.guide_embed(guide, rows)  # noqa: E731
      gq, gd, *gn = (grad_cache.chunked(embed, rows, rng, c.grad_cache_chunk, remat=False)
                     for rows in (q_rows, d_rows) + ((n_rows,) if n_rows is not None else ()))
      teacher = (gq, jnp.concatenate([gd, *gn]))
      if c.guide_masking:
        masks = guide_masks(*teacher)
        off_diagonal = ((valid[:, None] & cand_valid[None, :])
                        & ~jnp.eye(len(valid), len(cand_valid), dtype=bool))
        metrics["guide_masked_fraction"] = base.mean_metric(masks[0], off_diagonal)

    def layer_of(emb_BKD, layer):
      """The [B, D] embeddings of transformer layer `layer` (None: the last; traced ok)."""
      if layer is None or isinstance(layer, int):
        return emb_BKD[:, -1 if layer is None else layer]
      return jnp.take(emb_BKD, layer, axis=1)

    def scores(layer, dim):
      """(loss, logits, accuracy metric) of the embeddings of `layer` truncated to `dim`."""
      q = nest(layer_of(q_emb, layer), dim, c.normalize)
      candidates = nest(layer_of(cand_emb, layer), dim, c.normalize)
      d = candidates[:len(valid)]  # The positives.
      if self.moco:
        logits = moco_logits(q, d, nest(state["queue"], dim, c.normalize), c.temperature)
        ce = jax.nn.logsumexp(logits, -1) - logits[:, 0]
        weights = valid.astype(jnp.float32)
        loss = jnp.sum(ce * weights) / jnp.maximum(weights.sum(), 1.0)
        return loss, logits, base.mean_metric(jnp.argmax(logits, -1) == 0, weights)
      loss, logits, accuracy = info_nce(q, candidates, valid, c.temperature, masks[0], cand_valid)
      if c.symmetric:
        loss_t, _, _ = info_nce(d, q, valid, c.temperature, masks[1])
        loss = 0.5 * (loss + loss_t)
      return loss, logits, accuracy

    n, full = self.model_config.num_layers, self.dim
    main, main_logits, accuracy = scores(None, full)
    total = main
    if c.nesting == "matryoshka":
      total = 0.0
      for dim in self.dims:
        loss_d = main if dim == full else scores(None, dim)[0]
        metrics[f"loss_dim_{dim}"] = base.mean_metric(loss_d, jnp.ones(()))
        total = total + loss_d
    elif c.nesting == "2dmse":
      layer_rng, dim_rng = jax.random.split(nest_rng)
      layer = jax.random.randint(layer_rng, (), 1, n)
      smaller = [d for d in self.dims if d < full] or [full]
      dim = jnp.asarray(smaller)[jax.random.randint(dim_rng, (), 0, len(smaller))]
      total = 0.0
      for i, d in enumerate((full, dim)):
        last, last_logits, _ = scores(None, d) if i else (main, main_logits, None)
        sub, sub_logits, _ = scores(layer, d)
        kl = kl_rows(last_logits, sub_logits, valid)
        total = total + last + sub / layer + c.kl_weight * kl
      metrics["sampled_layer_loss"] = base.mean_metric(sub, jnp.ones(()))
    elif c.nesting == "starbucks":
      for layer, dim in self.starbucks:
        if (layer, dim) == (n, full):
          continue
        sub, sub_logits, _ = scores(layer, dim)
        metrics[f"loss_layer{layer}_dim{dim}"] = base.mean_metric(sub, jnp.ones(()))
        total = total + sub + c.kl_weight * kl_rows(main_logits, sub_logits, valid)
    if c.score_distill != "none":
      student = tuple(nest(layer_of(e, None), full, c.normalize) for e in (q_emb, cand_emb))
      distill = score_distill.loss(
          c.score_distill, teacher, student, valid, cand_valid, num_negatives=c.num_negatives,
          teacher_temperature=c.score_distill_temperature or c.temperature,
          student_temperature=c.temperature)
      metrics["score_distill_loss"] = base.mean_metric(distill, jnp.ones(()))
      total = total + c.score_distill_weight * distill

    weights = valid.astype(jnp.float32)
    if masks[0] is not None:
      # The guided loss and accuracy measure agreement with the guide (a student equal to its
      # guide scores accuracy 1 by construction), so the plain in-batch ones are reported too.
      q, cands = (jax.lax.stop_gradient(nest(layer_of(e, None), full, c.normalize))
                  for e in (q_emb, cand_emb))
      plain, _, plain_accuracy = info_nce(q, cands, valid, c.temperature, None, cand_valid)
      metrics.update(unguided_loss=(plain * weights.sum(), weights.sum()),
                     unguided_accuracy=plain_accuracy)
    metrics.update(contrastive_loss=(main * weights.sum(), weights.sum()),
                   contrastive_accuracy=accuracy, total_loss=base.mean_metric(total, jnp.ones(())))
    if self.moco and train:
      k_full = jax.lax.stop_gradient(layer_of(d_emb, None))
      queue, ptr = enqueue(state["queue"], state["queue_ptr"], k_full)
      new_state = {**state, "key_params": key, "key_initialized": jnp.ones((), bool),
                   "queue": queue, "queue_ptr": ptr}
    return total, (metrics, new_state)
