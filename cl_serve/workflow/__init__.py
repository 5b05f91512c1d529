"""Orchestration of the layers below: `init`, `add-task` and `export` (train → merge → export → gate → publish),
version management (status, promote, rollback, policy), the release gate and the demo."""
