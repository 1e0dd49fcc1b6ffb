"""The generic chunked runner: ``etl.run_chunks`` over the rows of an ``etl.Query``."""
