"""Training: LR schedules, layer groups, the head on cached features, the LR finder, and the
resumable fine-tune. This package imports nothing itself, so the light modules stay light."""
