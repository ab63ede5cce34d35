"""End-to-end suites inside the real frameworks (a package, so that ``integrations.lightning`` never
shadows the ``lightning`` distribution on ``sys.path``)."""
