"""Share trained models through the Hugging Face Hub: push the three stages, pull them back by repo id, and
the model card that says what they are, what they learnt from and under which licences.

Layer: hub (imports the base layer, shards and training; never generation, audit, app or commands).

A pushed model is one commit of a model repo::

    README.md                                   the model card (:mod:`musiclm.hub.card`)
    tokenizer/...                               the tokenizer folder the stages were trained with
    STAGE/run.json                              STAGE: semantic, coarse, fine (fine may be missing)
    STAGE/metrics.jsonl                         the training and held-out losses, as logged
    STAGE/manifest.json                         the corpus manifest summary, when the run carries one
    STAGE/checkpoints/latest                    names the one checkpoint below
    STAGE/checkpoints/step-N/model.safetensors  the weights only: no optimizer, scheduler or RNG state
    STAGE/checkpoints/step-N/records.json       the weights' bytes and sha256 (musiclm.integrity)

so that a pulled snapshot is a model folder (:mod:`musiclm.hub.model_folder`) that
:meth:`MusicLM.from_pretrained` reads like a local one and ``musiclm verify`` checks.

- :mod:`musiclm.hub.model_folder`: what a model folder is, its stages and its tokenizer, found by fingerprint;
- :mod:`musiclm.hub.pull`: a local folder or a hub repo id → a model folder on disk (:func:`resolve_model`);
- :mod:`musiclm.hub.push`: a model folder → one commit of a hub repo (:func:`push`);
- :mod:`musiclm.hub.card`: the model card (:func:`model_card`) and the backbones' licences.
"""
