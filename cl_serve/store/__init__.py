"""The model store: immutable versions and CURRENT on a local directory or a bucket (one `Store` over a backend),
opened by path or URL, with sha256 verification and the writer's lock. Imports the contract and base only, never
torch: trainers publish into it and servers read from it."""
