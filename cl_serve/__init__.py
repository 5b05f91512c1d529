"""cl-serve: continual inference server for image classification (CLI, model store, Ray Serve server).

This package's store and server import neither torch nor the trainer; the CLI imports the training side lazily.
"""
__version__ = "0.1.0"
