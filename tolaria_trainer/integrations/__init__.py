"""Callbacks that put a framework's own training loop under the governor, built on ``GovernedTraining``.

``tolaria_trainer.integrations.lightning.GovernorCallback`` (Lightning 2.x, the ``lightning`` extra) and
``tolaria_trainer.integrations.transformers.GovernorCallback`` (``transformers.Trainer``, the
``transformers`` extra). Each module imports its framework; this package imports neither.
"""
