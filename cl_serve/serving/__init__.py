"""Serving: the Ray Serve application behind `POST /classify` and the page, request parsing and bounds, the ONNX
Runtime model and the watcher that hot-swaps versions, settings, metrics, the launcher and an HTTP client. Reads the
store; never imports torch, the trainer or the exporter."""
