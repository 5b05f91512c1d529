"""Exports: turn a merged model into deployable artefacts (ONNX) and define the preprocessing contract.

Importing this package pulls in neither torch nor ray: `exports.preprocessing` is what a serving image needs,
`exports.onnx_export` and `exports.parity` (torch + onnx) are imported explicitly by the publishing side.
"""
