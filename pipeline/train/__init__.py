"""Training InCTRL's adapter and heads from cached features, with the CLIP towers frozen.

Core layer (no Beam): the configuration (``config``), training examples read from the feature
index (``data``), the forward pass, loss and loop (``forward``, ``loss``, ``loop``), held-out
validation (``validate``) and the training log (``log``). The job that extracts the features
and runs all this is ``pipeline.train_job``.
"""
