"""The control plane: the registry (its pure core and its stores)."""
