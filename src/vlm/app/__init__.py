"""The application layer: what the commands run (train.py, eval.py, read.py, the catalog), on top of
every other layer (docs/architecture.md, "Layers")."""
