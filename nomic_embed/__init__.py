"""Generated protobuf code of the nomic_embed API (regenerate with `make protos`)."""
