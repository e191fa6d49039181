"""VMamba and Vim backbones (one file per architecture) and the model registry."""
