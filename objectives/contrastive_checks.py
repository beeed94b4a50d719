"""The contrastive objective's config checks (objectives/contrastive.py), one `require` each."""
import os

from objectives import checks, score_distill
from pretrain.data import pair_files, pairs
from pretrain.models import poolers

LOSSES = ("infonce", "moco")
NESTINGS = ("none", "matryoshka", "2dmse", "starbucks")
GUIDE_POOLERS = ("auto", "cls", "mean")


def validate_config(config):
  o, m = config.objective, config.model
  if o.name != "contrastive":
    return
  req = checks.require
  req(o.view in pairs.VIEWS, "objective.view", o.view, ", ".join(pairs.VIEWS))
  req(0 < o.crop_ratio_min <= o.crop_ratio_max <= 1, "objective.crop_ratio_min",
      (o.crop_ratio_min, o.crop_ratio_max), "0 < crop_ratio_min <= crop_ratio_max <= 1")
  req(0 <= o.token_deletion < 1, "objective.token_deletion", o.token_deletion, "0 <= p < 1")
  req(3 <= o.query_len <= m.max_len, "objective.query_len", o.query_len,
      f"3 <= query_len <= model.max_len={m.max_len}")
  req(0 <= o.ict_remove_rate <= 1, "objective.ict_remove_rate", o.ict_remove_rate, "0 <= p <= 1")
  req(o.ict_unit in pairs.ICT_UNITS, "objective.ict_unit", o.ict_unit, ", ".join(pairs.ICT_UNITS))
  req(o.contrastive_loss in LOSSES, "objective.contrastive_loss", o.contrastive_loss,
      ", ".join(LOSSES))
  req(o.temperature > 0, "objective.temperature", o.temperature, "> 0")
  req(o.pooler in poolers.KINDS, "objective.pooler", o.pooler, ", ".join(poolers.KINDS))
  req(o.pooler_latents >= 1, "objective.pooler_latents", o.pooler_latents, ">= 1")
  req(o.pooler not in ("latent", "multilayer") or m.hidden_size % o.pooler_heads == 0,
      "objective.pooler_heads", o.pooler_heads, f"a divisor of model.hidden_size={m.hidden_size}")
  req(o.projection_dim >= 0, "objective.projection_dim", o.projection_dim, ">= 0 (0: none)")
  dim = o.projection_dim or m.hidden_size
  if o.contrastive_loss == "moco":
    req(0 <= o.moco_momentum < 1, "objective.moco_momentum", o.moco_momentum, "0 <= m < 1")
    req(o.queue_size > 0 and o.queue_size % config.data.batch_size == 0, "objective.queue_size",
        o.queue_size, f"a positive multiple of the global batch data.batch_size="
        f"{config.data.batch_size} (each step writes one whole batch of keys into the queue)")
    req(not o.symmetric, "objective.symmetric", o.symmetric,
        "False with moco (keys carry no gradient)")
    req(o.nesting in ("none", "matryoshka"), "objective.nesting", o.nesting,
        "none or matryoshka with moco (queued keys have no per-layer embeddings)")
    req(not o.guide, "objective.guide", o.guide,
        "'' with moco (the guide cannot score queued keys); use contrastive_loss=infonce")
  req(o.nesting in NESTINGS, "objective.nesting", o.nesting, ", ".join(NESTINGS))
  req(all(0 < d <= dim for d in o.matryoshka_dims), "objective.matryoshka_dims",
      o.matryoshka_dims, f"dimensions in 1..{dim} (the embedding size)")
  if o.nesting in ("2dmse", "starbucks"):
    req(o.pooler != "multilayer", "objective.pooler", o.pooler,
        f"cls, mean, max or latent with nesting={o.nesting} (one layer's states are pooled)")
    req(m.num_layers >= 2, "model.num_layers", m.num_layers, f">= 2 for nesting={o.nesting}")
  req(len(o.starbucks_layers) == len(o.starbucks_dims)
      and all(1 <= l <= m.num_layers for l in o.starbucks_layers)
      and all(0 < d <= dim for d in o.starbucks_dims), "objective.starbucks_layers",
      (o.starbucks_layers, o.starbucks_dims),
      f"two lists of equal length: layers in 1..{m.num_layers}, dims in 1..{dim}")
  req(o.kl_weight >= 0, "objective.kl_weight", o.kl_weight, ">= 0")
  req(o.guide_pooler in GUIDE_POOLERS, "objective.guide_pooler", o.guide_pooler,
      ", ".join(GUIDE_POOLERS))
  req(not o.guide or os.path.isdir(o.guide), "objective.guide", o.guide,
      "'' or an existing model directory (an export or a Hugging Face BERT dir)")
  req(o.score_distill in score_distill.MODES, "objective.score_distill", o.score_distill,
      ", ".join(score_distill.MODES))
  req(o.score_distill == "none" or o.guide, "objective.score_distill", o.score_distill,
      "none without a teacher; set objective.guide to a model directory (the frozen guide is "
      "the teacher, same tokenizer)")
  req(o.score_distill != "margin_mse" or o.num_negatives >= 1, "objective.score_distill",
      o.score_distill, "kl, or margin_mse with hard negatives (objective.num_negatives >= 1, "
      "view=files): MarginMSE scores (query, positive, negative) triplets")
  req(o.score_distill_weight >= 0, "objective.score_distill_weight", o.score_distill_weight,
      ">= 0")
  req(o.score_distill_temperature >= 0, "objective.score_distill_temperature",
      o.score_distill_temperature, "> 0, or 0 for objective.temperature")
  req(o.guide_masking or o.score_distill != "none" or not o.guide, "objective.guide_masking",
      o.guide_masking, "True, or False with score_distill=kl or margin_mse (a guide that neither "
      "masks nor teaches does nothing)")
  req(o.ccp_window >= 1, "objective.ccp_window", o.ccp_window, ">= 1 (units on either side)")
  files = config.data.name == pair_files.NAME
  req((o.view == "files") == files, "objective.view", o.view,
      "files with data.name=pair_files (and only then)" if files or o.view == "files" else "")
  req(o.num_negatives >= 0 and (not o.num_negatives or o.view == "files"),
      "objective.num_negatives", o.num_negatives,
      "0, or hard negatives per query with view=files (pair files with negatives)")
  req(not o.num_negatives or o.contrastive_loss == "infonce", "objective.contrastive_loss",
      o.contrastive_loss, "infonce with hard negatives (num_negatives > 0)")
  # The loss sees micro-batches of batch_size / grad_accum_steps rows.
  micro = config.data.batch_size // max(1, config.optimizer.grad_accum_steps)
  req(o.grad_cache_chunk >= 0 and (not o.grad_cache_chunk or (
      micro % o.grad_cache_chunk == 0 and o.grad_cache_chunk < micro)),
      "objective.grad_cache_chunk", o.grad_cache_chunk,
      f"0 (off) or a proper divisor of the micro-batch of {micro} rows (data.batch_size / "
      "optimizer.grad_accum_steps); a multiple of the data x fsdp devices keeps each chunk spread "
      "over all of them")
