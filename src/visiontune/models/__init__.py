"""Models: timm backbones with offline weights, the classifier head, and the model file.

The submodules are imported where they are used (`visiontune.models.backbone`, ...): the
head alone needs neither timm nor torchvision, whose imports take a second and a half.
"""
