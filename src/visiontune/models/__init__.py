"""Models: timm backbones with offline weights, the classifier head, and the model file.
Import the submodules where used: the head alone needs neither timm nor torchvision (1.5 s)."""
