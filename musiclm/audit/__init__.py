"""Memorization audit: which training clips a generated file is nearest, where in them, and whether that is a copy.

``musiclm audit GENERATED... --data DIR`` (and ``musiclm generate --audit DIR``)
tokenizes each generated file with the corpus's own tokenizer (``DIR/tokenizer``)
and looks it up in an index of the corpus kept next to its shards, in
``DIR/audit/`` (:mod:`musiclm.audit.index`). Two signals:

- **semantic tokens**: n-grams of run codes (:mod:`musiclm.audit.ngrams`) vote
  on the diagonal (corpus frame - query frame) of each clip, as audio
  fingerprinting does, so that an offset emerges and a few changed tokens do
  not matter; the query is tokenized at 4 sub-frame phases so that a copy
  shifted by a fraction of a frame still lines up with one of them. The clips
  with most votes are verified token by token: the score is the largest share
  of identical tokens over a stretch one CLAP window long
  (:mod:`musiclm.audit.search`);
- **CLAP embeddings**: the cosine of the nearest pair of CLAP windows (the
  stored ``clap_emb`` of each clip, found through SimHash codes).

Each is compared with a threshold calibrated on the corpus itself, from
excerpts of its own files scored with and without their file in the index
(:mod:`musiclm.audit.calibration`); a file is flagged when a signal that
separates copies from new music on this corpus reaches its threshold.

The report gives, per generated file, the nearest training files with the
clip, the offset (seconds into the source where the generated file's start
falls; exact to a frame), the stretch that agrees, both scores and the verdict.
``--json`` prints the same as JSON, with a boolean ``flagged`` per file.

What it does not catch: a copy at another tempo or pitch (tokens change), and
audio whose tokens are not stable under re-encoding (noise, e.g. rain, in the
``tiny`` preset); steady tones give too few runs for n-grams and are left to CLAP.

The command (:func:`~musiclm.commands.audit.audit`, :func:`~musiclm.commands.audit.run_audit`) is in
:mod:`musiclm.commands.audit`.

Layer: audit (imports the base layer, shards and the pipeline's audio reader; never commands or generation).
"""
