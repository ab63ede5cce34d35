"""End-to-end suite of re-basin incremental learning inside Avalanche.

* ``test_avalanche.py``: ``ReBasinStrategy`` on a short Rotated-MNIST stream of real images (the offline
  MNIST subset) with Avalanche's EvaluationPlugin metrics, against Naive; a multi-head (task-labelled)
  model; input errors.
* ``test_plugin.py``: ``ReBasinPlugin`` inside Avalanche's own EWC, LwF and Naive + replay strategies; the
  re-basin quantities in a custom logger and a TextLogger; plugin and strategy train identically; the
  README snippet.

The benchmark against the authors' baselines (Finetune, EWC, LwF, A-GEM, Joint) is
``benchmarks/incremental.py``.
"""
