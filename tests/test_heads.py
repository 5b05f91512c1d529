"""Heads on a tiny ViT: every method x head merges exactly and exports with ONNX parity; the analytic head equals
the ridge fitted on all tasks at once and picks lambda from training data only; the aligned head's class
statistics survive a fresh process; statistics heads forget less than task-local; SD-LoRA per-task magnitudes."""
import pytest
import torch
from safetensors.torch import load_file

from cl_serve.workflow import pipeline
from cl_serve.workflow.plain_weights import save_merged
from cl_serve.store.model_store import Store
from tests.conftest import TINY, TINY_MODEL, fast_train, init_tiny_store, run_cli
from cl_serve.trainer.data import load_task_data, scan_image_folder
from cl_serve.trainer.heads import head_config_from_dict
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.merge import build_plain_model, merged_state_dict
from cl_serve.trainer.methods import method_config_from_dict
from cl_serve.trainer.train import eval_batches, train_task

METHODS = ["inflora", "sdlora", "sdlora-rr", "sdlora-kd", "seq-lora", "none"]
HEADS = {"task-local": {"name": "task-local"}, "aligned": {"name": "aligned", "epochs": 2, "samples_per_class": 32},
         "analytic": {"name": "analytic", "projection": 64}}


@pytest.fixture(scope="module")
def tests_data(tasks, backbone):
    return [load_task_data(scan_image_folder(t["test"]), backbone[2], train_view=False) for t in tasks]


def learner_for(backbone, method, head, **kw):
    spec, weights, _ = backbone
    extra = {} if method == "none" else {"rank": 4}
    return Learner(spec, weights, method_config_from_dict({"name": method, **extra, **kw}), head_config_from_dict(head))


def learn(learner, datasets, prep, n, **cfg):
    return [train_task(learner, datasets[i], prep, fast_train(**cfg), progress=False) for i in range(n)]


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_head_merges_into_one_plain_model(backbone, datasets, method, head):
    spec, _, prep = backbone
    learner = learner_for(backbone, method, HEADS[head])
    learn(learner, datasets, prep, 3)
    merged = build_plain_model(spec, merged_state_dict(learner))
    x = torch.randn(16, 3, 32, 32) * 2
    with torch.no_grad():
        ref, got = learner(x), merged(x)
    assert ref.shape == (16, 9) and (got - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("head", [HEADS["aligned"], HEADS["analytic"], {"name": "analytic", "projection": 0}])
def test_heads_export_to_onnx_with_parity(tmp_path, backbone, datasets, head):
    from cl_serve.export.onnx_export import export_onnx
    from cl_serve.export.parity import check_parity

    spec, _, prep = backbone
    learner = learner_for(backbone, "inflora", head)
    learn(learner, datasets, prep, 2)
    state = merged_state_dict(learner)
    assert ("head.weight" in state) == (head.get("projection", 0) == 0 or head["name"] != "analytic")
    model = build_plain_model(spec, state)
    export_onnx(model, tmp_path / "m.onnx", preprocessing=prep, labels=list(learner.labels))
    assert check_parity(model, tmp_path / "m.onnx", prep.input_size).max_abs_diff <= 1e-4


@pytest.mark.parametrize("projection", [0, 64])
def test_analytic_head_after_three_tasks_equals_ridge_on_all_tasks_at_once(backbone, datasets, projection):
    _, _, prep = backbone
    learner = learner_for(backbone, "none", {"name": "analytic", "projection": projection})
    seen_by_search = []
    original = learner.head._sums
    learner.head._sums = lambda f, y, rows, n: seen_by_search.append(f.clone()) or original(f, y, rows, n)
    learn(learner, datasets, prep, 3)
    head = learner.head
    feats = [learner.feature_pass(eval_batches(d.eval_u8, prep, 64, "cpu"))[0].double() for d in datasets[:3]]
    h = torch.cat([head.expand(f) for f in feats])
    y = torch.zeros(h.shape[0], 9, dtype=torch.float64)
    offsets = [0, 3, 6]
    rows = torch.cat([d.labels + o for d, o in zip(datasets[:3], offsets)])
    y[torch.arange(h.shape[0]), rows] = 1
    joint = torch.linalg.solve(h.T @ h + head.ridge * torch.eye(h.shape[1], dtype=torch.float64), h.T @ y).T
    assert (joint.float() - head.weight).abs().max().item() <= 1e-4
    # lambda was chosen on each task's own training features (its fit and held-out parts), nothing else (never
    # test data)
    assert len(seen_by_search) == 6
    for got, f in zip(seen_by_search, [f for f in feats for _ in range(2)]):
        assert got.shape == f.shape and torch.allclose(got.double(), f, atol=1e-6)


@pytest.mark.parametrize("projection", [0, 48])
def test_analytic_lambda_from_sums_equals_lambda_from_rows(projection):
    """The streaming search (the split's sums only, used from M fit images up) scores every lambda as the search on
    the expanded rows does, and picks the same one."""
    from cl_serve.contract.head_settings import AnalyticConfig
    from cl_serve.trainer.heads.analytic import AnalyticHead

    gen = torch.Generator().manual_seed(3)
    head = AnalyticHead(AnalyticConfig(projection=projection), 24)
    f = torch.randn(400, 24, generator=gen)
    y = torch.randint(0, 6, (400,), generator=gen)
    f = f + 2 * torch.nn.functional.one_hot(y, 24).float()  # classes a ridge can separate
    fit, held = head._split(400, 1)
    small = head._losses_small(f, y, fit, held, 6)
    sums = head._losses_from_sums(*head._sums(f, y, fit, 6), *head._sums(f, y, held, 6), len(held), head._lambdas())
    assert [lam for lam, _ in small] == [lam for lam, _ in sums]
    for (lam, a), (_, b) in zip(small, sums):
        assert abs(a - b) <= 1e-6 + 1e-3 * abs(a), (lam, a, b)
    assert min(small, key=lambda r: r[1])[0] == min(sums, key=lambda r: r[1])[0]


def test_analytic_head_fits_thousands_of_classes_without_a_dense_target_matrix(monkeypatch):
    """3,000 classes of 2 images: the fit never builds an images x classes matrix (one_hot is not called on the
    streaming path) and the head classifies its own training features."""
    import torch.nn.functional as F

    from cl_serve.contract.head_settings import AnalyticConfig
    from cl_serve.trainer.heads import analytic

    classes, dim = 3000, 64
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(classes, dim, generator=gen)
    y = torch.arange(classes).repeat_interleave(2)
    f = centres[y] + 0.05 * torch.randn(len(y), dim, generator=gen)
    monkeypatch.setattr(analytic.F, "one_hot", lambda *a, **k: (_ for _ in ()).throw(AssertionError("dense one-hot")))
    head = analytic.AnalyticHead(AnalyticConfig(projection=32), dim)
    head.end_task(f, y, torch.nn.Linear(dim, classes))
    assert head.weight.shape == (classes, 32)
    monkeypatch.setattr(analytic.F, "one_hot", F.one_hot)
    assert float((head(f).argmax(1) == y).float().mean()) > 0.5


@pytest.mark.parametrize("method", ["none", "inflora"])
def test_statistics_heads_keep_old_tasks_better_than_task_local(backbone, datasets, tests_data, method):
    """Three tasks; mean accuracy on tasks 0 and 1 afterwards (argmax over all 9 classes). The heads do not change
    the adapter's training, so each (method, seed) trains once and every head (default settings) is fitted on it."""
    from cl_serve.trainer.heads import build_head
    from cl_serve.trainer.train import train_adapter

    _, _, prep = backbone
    scores = {}
    for seed in (0, 1):
        learner = learner_for(backbone, method, None)
        heads = {"task-local": learner.head,
                 **{n: build_head(head_config_from_dict({"name": n, "seed": seed}), 32) for n in ("aligned", "analytic")}}
        for i in range(3):
            _, feats = train_adapter(learner, datasets[i], prep, fast_train(seed=seed, epochs=4), progress=False)
            for name, head in heads.items():
                if name != "task-local":
                    head.end_task(feats, datasets[i].labels, learner.block)
            learner.finish_head(feats, datasets[i].labels)
        for name, head in heads.items():
            accs = []
            for j in range(2):
                f = learner.feature_pass(eval_batches(tests_data[j].eval_u8, prep, 64, "cpu"))[0]
                accs.append(float((head(f).argmax(1) == tests_data[j].labels + 3 * j).float().mean()))
            scores.setdefault(name, []).append(sum(accs) / 2)
    mean = {k: sum(v) / len(v) for k, v in scores.items()}
    assert mean["aligned"] >= mean["task-local"] + 0.1, scores
    assert mean["analytic"] >= mean["task-local"] + 0.1, scores


def test_aligned_head_statistics_survive_a_fresh_process(tmp_path, tasks):
    store = tmp_path / "store"
    r = run_cli("init", "--store", str(store), "--backbone", TINY_MODEL, "--timm-kwargs", __import__("json").dumps(TINY),
                "--method", "sdlora", "--rank", "4", "--head", "aligned", "--cov", "full")
    assert r.returncode == 0, r.stderr
    train = ["--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"]
    for t in range(3):
        r = run_cli("add-task", "--store", str(store), "--data", str(tasks[t]["train"]), *train, process=True)
        assert r.returncode == 0, r.stderr
    s = Store(store)
    st = run_cli("status", "--store", str(store))
    assert "head aligned: covariance=full" in st.stdout, st.stdout
    spec, weights = pipeline._backbone(s)
    learner = Learner(spec, weights, method_config_from_dict(s.config().method), head_config_from_dict(s.config().head))
    prep = s.config().preprocessing
    for t in range(3):
        train_task(learner, load_task_data(scan_image_folder(tasks[t]["train"]), prep), prep, fast_train(),
                   progress=False)
    stored = load_file(str(s.version_dir(3) / "learner.safetensors"))
    for k in ("head.means", "head.covs", "head.weight"):
        assert stored[k].shape[0] == 9 and (stored[k] - learner.head.state_tensors()[k]).abs().max().item() <= 1e-5, k
    merged = pipeline.merged_weights(s, 3)
    one = merged_state_dict(learner)
    assert max((merged[k] - one[k]).abs().max().item() for k in merged) <= 1e-5


def test_head_settings_are_validated_and_recorded(tmp_path, tasks):
    r = run_cli("init", "--store", str(tmp_path / "s"), "--backbone", TINY_MODEL, "--timm-kwargs",
                __import__("json").dumps(TINY), "--method", "none", "--head", "analytic", "--projection", "-3")
    assert r.returncode == 2 and "invalid head settings: analytic.projection" in r.stderr
    assert not (tmp_path / "s").exists()
    store = init_tiny_store(tmp_path / "ok", "none")
    assert Store(store).config().head.model_dump() == {"name": "task-local"}
    out = pipeline.add_task(store, tasks[0]["train"], fast_train(optimizer="sgd", schedule="constant"), progress=False)
    m = Store(store).manifest(out.version)
    assert m.training.optimizer == "sgd" and m.training.schedule == "constant" and m.head.name == "task-local"
    assert m.training.head_state_bytes["per_class"] == (32 + 1) * 4


def second_task_started(backbone, datasets, method):
    """A per-task-magnitude SD-LoRA learner after one task, with task 1's branch and block created."""
    learner = learner_for(backbone, method, None, magnitudes="per-task")
    learn(learner, datasets, backbone[2], 1)
    learner.method.begin_task(1, lambda: {})
    learner.add_block(["a", "b", "c"])
    return learner, learner.method


def test_sdlora_per_task_magnitudes_share_one_alpha_and_keep_the_function(backbone, datasets):
    learner, m = second_task_started(backbone, datasets, "sdlora")
    assert m.shared.current is not None and set(m.shared.alpha) == {"t0"}
    train = torch.optim.SGD(m.trainable_parameters(), lr=0.05)
    for _ in range(3):  # alpha_t's gradient is zero while B_t is still zero: check after the last step
        loss = learner(torch.randn(4, 3, 32, 32)).pow(2).mean()
        train.zero_grad()
        loss.backward()
        train.step()
    assert m.shared.alpha["t0"].grad.abs() > 0 and m.shared.current.grad.abs() > 0
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = learner(x)
        m.end_task(1, lambda: {})
        after = learner(x)
    assert (after - before).abs().max().item() <= 1e-4  # the exact split: unit directions, frozen scales, alpha_t
    assert set(m.shared.alpha) == {"t0", "t1"}
    for ds in m.directions().values():
        for d in ds:
            assert abs(d.unit().norm().item() - 1.0) < 1e-5


def test_sdlora_kd_per_task_folds_a_task_inside_the_old_span(backbone, datasets):
    learner, m = second_task_started(backbone, datasets, "sdlora-kd")
    with torch.no_grad():
        for layer in m.layers.values():
            for t, br in layer.current.items():
                old = layer.directions[t][0]  # task 0's
                br.A.copy_(old.A)
                br.B.copy_(old.B * float(old.scale) * 0.5)  # the whole task's update = 0.5 x task 0's
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        before = learner(x)
        summary = m.end_task(1, lambda: {})
        after = learner(x)
    assert summary["directions_folded"] == len(m.directions()) and summary["kd_residual_max"] <= 1e-6
    assert set(m.shared.alpha) == {"t0"} and (after - before).abs().max().item() <= 1e-4


def test_cli_default_head_is_analytic_and_its_two_layer_model_is_published(tmp_path, tasks):
    from safetensors import safe_open

    store = tmp_path / "store"
    r = run_cli("init", "--store", str(store), "--backbone", TINY_MODEL, "--timm-kwargs", __import__("json").dumps(TINY),
                "--method", "none", "--projection", "64")
    assert r.returncode == 0 and "method none, head analytic" in r.stdout, r.stderr
    for t in range(2):
        r = run_cli("add-task", "--store", str(store), "--data", str(tasks[t]["train"]), "--epochs", "1",
                    "--device", "cpu")
        assert r.returncode == 0, r.stderr
    s = Store(store)
    m = s.manifest(2)
    assert m.head.name == "analytic" and m.head.projection == 64 and m.onnx.parity_max_abs_diff <= 1e-4
    assert m.training.head_summary["ridge"] > 0
    path = tmp_path / "plain.safetensors"
    save_merged(store, 2, path)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["head"] == "random-projection"
    state = load_file(str(path))
    assert state["head.0.weight"].shape == (64, 32) and state["head.2.weight"].shape == (6, 64)
    model = pipeline.load_merged_model(s, 2)
    assert isinstance(model.head, torch.nn.Sequential)
