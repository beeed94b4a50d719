"""bench/hf_step.py's masked-head PyTorch peer does our step's work and computes BERT's loss."""
import numpy as np
import torch
import transformers

from bench import hf_step
from objectives import masking


def test_exact_labels_mark_our_slots_per_row():
  _, _, labels = hf_step.fake_batch(4, 128, 1000, exact=True)
  assert ((labels >= 0).sum(axis=1) == masking.max_predictions(128, hf_step.MASK_RATE)).all()
  _, _, loose = hf_step.fake_batch(4, 128, 1000)
  assert len(set((loose >= 0).sum(axis=1))) > 1  # The default draws each position alone.


def test_masked_head_loss_equals_the_full_heads():
  config = hf_step.hf_config("tiny", 300, 32)
  config.hidden_dropout_prob = 0.0
  torch.manual_seed(0)
  model = transformers.BertForMaskedLM(config).eval()
  ids, mask, labels = (torch.from_numpy(x).long()
                       for x in hf_step.fake_batch(2, 32, 300, exact=True))
  full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
  masked = hf_step.masked_head_loss(model, ids, mask, labels)
  np.testing.assert_allclose(masked.item(), full.item(), rtol=1e-6)
