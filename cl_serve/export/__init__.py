"""Export: a merged plain model to ONNX (`onnx_export`) and the parity gate that must pass before publishing
(`parity`). Imports torch and onnx; imported only by the publishing side (commands), never by the server."""
