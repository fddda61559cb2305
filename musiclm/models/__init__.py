"""The models: the frozen backbones, the stage layouts, the autoregressive transformer and its sampling.

Layer: models (imports the base layer and shards; never the pipeline or training).
"""
