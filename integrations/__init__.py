"""End-to-end suites inside real frameworks and model zoos."""
