"""The contract between training and serving, free of torch and Ray: how an image becomes the model's input
(`preprocessing`) and how an untrusted file is decoded within bounds (`image_decode`). The trainer, the export and
the server all import it; it imports nothing of theirs (tests/test_layers.py)."""
