"""The deployment commands behind scripts/*.sh: model servers as managed processes, and the msrun launch."""
