"""Training the three stages on cached tokens: data, the trainer, checkpoints, resume, LoRA.

Layer: training (never imports the pipeline).
"""
