"""Makes the shared test helpers (``_align_models``) importable from every test folder (pytest puts this
file's folder on ``sys.path``)."""
