"""Model variants (precision / quantization) and the policy that picks one for a device."""
