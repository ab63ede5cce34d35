"""End-to-end suite of ``ReBasinStrategy`` inside Avalanche.

* ``test_avalanche.py``: a short Rotated-MNIST stream on real images (the offline MNIST subset) with
  Avalanche's EvaluationPlugin metrics, against Naive; a multi-head (task-labelled) model; input errors.

The full benchmark against Naive, EWC, LwF, SI and Replay is ``benchmarks/incremental.py``.
"""
