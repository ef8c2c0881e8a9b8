"""The engine: tokenizing on admission, batching, the Matryoshka steps; the Backend seam to the model.

Imports neither grpc nor torch.
"""
