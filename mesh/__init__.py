"""The control plane: traffic policy and xDS."""
