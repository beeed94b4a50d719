"""Pretraining objectives. The registry is `objectives.registry`; this file imports nothing, so that
importing one objective module never imports all of them."""
