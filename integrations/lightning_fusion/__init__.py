"""End-to-end test of ``ReBasinFusion``: successive ``trainer.fit`` calls, one per episode."""
