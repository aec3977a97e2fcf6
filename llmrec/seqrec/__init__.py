"""ID-based sequential recommenders with latent reasoning: SASRec, GRU4Rec, ReaRec (ERL / PRL, on either encoder)
and LARES.

* :mod:`llmrec.seqrec.data` -- prepared datasets as left-padded item-id tensors (train prefixes
  grouped into sequences for one-pass per-position training);
* :mod:`llmrec.seqrec.modules` -- post-LN Transformer with KV cache, the GRU, and the :class:`Backbone` interface;
* :mod:`llmrec.seqrec.models` -- the models and their losses;
* :mod:`llmrec.seqrec.trainer` / :mod:`llmrec.seqrec.run` -- accelerate full-ranking trainer, results;
* :mod:`llmrec.seqrec.bench` -- multi-seed benchmark and inference latency;
* ``llmrec seqrec train --config recipes/seqrec/<model>_<dataset>.yaml`` -- the command.
"""
