"""The on-disk token format: records, shard tars, the writer, repairs, the tokenizer folder, statistics, the manifest.

Layer: shards (imports the base layer only).
"""
