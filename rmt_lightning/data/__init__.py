"""The corpus side: texts -> token store -> entropy shards -> tier index -> curriculum sampler -> batches
(``RMTDataModule`` wires them)."""
