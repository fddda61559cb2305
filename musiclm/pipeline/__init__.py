"""The tokenize job: audio in, backbone features, fitted quantizers, integer tokens out to shards (Ray).

Layer: pipeline.
"""
