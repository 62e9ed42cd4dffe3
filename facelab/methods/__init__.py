"""The methods' pipelines: each `run(cfg, out) -> metrics` reads inputs, composes core pieces, writes outputs."""
