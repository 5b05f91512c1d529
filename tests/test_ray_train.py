"""`add-task --workers 2` on Ray Train (2 CPU workers, gloo): the workers reduce what one process computes, so the
result equals a one-process run within float tolerance (frozen backbone), and InfLoRA designs the same subspace
from the reduced second moments."""
import pytest
import torch

from cl_serve.workflow import pipeline
from cl_serve.store.model_store import Store
from tests.conftest import fast_train
from cl_serve.trainer.ray_train import train_task_on_ray


@pytest.fixture(scope="module", autouse=True)
def _ray_down_after():
    yield
    import ray

    ray.shutdown()


def _subspace_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    qa, _ = torch.linalg.qr(a.T.double())
    qb, _ = torch.linalg.qr(b.T.double())
    return float(torch.linalg.svdvals(qa.T @ qb).min())


@pytest.mark.parametrize("method,head", [("none", "task-local"), ("none", "analytic"), ("inflora", "analytic")])
def test_two_workers_learn_what_one_process_learns(tmp_path, tasks, method, head):
    from tests.conftest import TINY, TINY_MODEL, method_dict
    from cl_serve.trainer.data import load_task_data, scan_image_folder
    from cl_serve.trainer.train import train_task

    store = tmp_path / "store"
    pipeline.init_store(store, method=method_dict(method), head={"name": head, "projection": 64}
                        if head == "analytic" else {"name": head}, backbone=TINY_MODEL, timm_kwargs=TINY)
    s = Store(store)
    prep = s.config().preprocessing
    pipeline.add_task(store, tasks[0]["train"], fast_train(), progress=False)
    data = load_task_data(scan_image_folder(tasks[1]["train"]), prep)
    factory = pipeline.learner_factory(s, 1)  # both runs start from version 1
    one = factory()
    train_task(one, data, prep, fast_train(), progress=False)
    two, summary = train_task_on_ray(factory, data, prep, fast_train(), workers=2)
    a, b = one.method.state_tensors(), two.method.state_tensors()
    assert a.keys() == b.keys() and two.labels == one.labels
    if method == "none":
        from cl_serve.trainer.merge import merged_state_dict

        ma, mb = merged_state_dict(one), merged_state_dict(two)
        worst = max(float((ma[k] - mb[k]).abs().max()) for k in ma)
        print(f"\n{method}+{head}: 2 workers vs 1 process, merged weights max |diff| {worst:.2e}")
        assert worst < 1e-4, worst
    else:  # augmentation differs per worker; the subspace designed from the reduced moments does not
        sims = [_subspace_similarity(a[k], b[k]) for k in a if k.endswith(".B")]
        print(f"\ninflora: B subspace similarity (min singular value) over {len(sims)} sites: {min(sims):.4f}")
        assert sims and min(sims) > 0.99
    assert summary["train_images"] == len(data)
    if (method, head) == ("none", "analytic"):  # the CLI's path: add-task --workers 2 publishes that learner
        r = pipeline.add_task(store, tasks[1]["train"], fast_train(), progress=False, workers=2)
        m = s.manifest(r.version)
        assert m.training.workers == 2 and m.parent == 1
        from cl_serve.trainer.merge import merged_state_dict

        published, expected = pipeline.merged_weights(s, r.version), merged_state_dict(one)
        assert max(float((published[k] - expected[k]).abs().max()) for k in expected) < 1e-4
