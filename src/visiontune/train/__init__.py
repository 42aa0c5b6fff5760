"""Training: schedules, layer groups, head training, LR finder, the resumable fine-tune loop.

Modules (import what you use; this package imports nothing on its own so that the light
ones, like `schedules`, stay light):
  schedules   SGDR / one-cycle LR multipliers as pure functions of the step
  groups      layer groups from timm's group_matcher, optimizer param groups
  head        the head trained on cached features; head file save/load
  lr_find     LR range test core and suggestion methods (min/10, steepest, valley, slide)
  checkpoint  atomic weights-only checkpoints, RNG capture, SIGTERM stop event
  trainer     what a fine-tune is built from (DDP, optimizer, schedule); save and resume
  epoch       an epoch's seeded, sharded loader; train mode; validation
  loop        the fine-tune loop (differential LRs, per-step schedule, resume)
  recipes     classifier + datasets + full-network LR finder for the stages
"""
