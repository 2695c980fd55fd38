"""Job configuration: the attrs schema, YAML loading with ``_base_`` and ``--set`` overrides."""
