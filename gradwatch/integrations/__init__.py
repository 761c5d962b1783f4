"""Thin adapters from training frameworks to the `Watcher`. Core gradwatch never imports these modules.

`gradwatch.integrations.lightning` (needs `pip install "gradwatch[lightning]"`) and
`gradwatch.integrations.transformers` (needs `pip install "gradwatch[hf]"`) each hold a `GradWatchCallback`.
"""
