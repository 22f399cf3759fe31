"""transferlab's MLflow records: the schema (a leaf every layer may import), the tracker, the
Ray Train callback, riding out outages (retry, spool), and reading results back."""
