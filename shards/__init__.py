"""Everything that turns raw face data into WebDataset shards (schema, writer, synthetic data)."""
