"""The pure policy core: sHype model, decisions, formats and analysis. No I/O."""
