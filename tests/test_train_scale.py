"""Training at scale: global-batch negatives, precision, pretrained weights, streamed shards."""

import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from entityclip import publish, storage
from entityclip.config import ModelConfig, TrainConfig
from entityclip.data.shards import read_manifest, split_rows
from entityclip.errors import ConfigError, StorageError
from entityclip.models import build_model
from entityclip.pipeline import stage_train
from entityclip.runtime import free_port
from entityclip.models.checkpoint import load_pretrained
from entityclip.train.precision import autocast
from entityclip.train.objective import Objective
from tests.conftest import tiny_config

TINY_MODEL = ModelConfig(variant="entityclip", image_size=16, patch_size=8, width=32, embed_dim=32, layers=1,
                         context_length=16, n_vision_experts=1, n_shared_experts=1, n_text_experts=1)
# ITM hard negatives are mined per worker by design (ALBEF); the contrastive terms are global.
OBJECTIVE = TrainConfig(itm_weight=0.0)


def _global_batch(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    model = build_model(TINY_MODEL)
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 16, 16, generator=gen)
    ids = model.tokenize([f"Team {i} wins in town {i % 3}" for i in range(n)])
    expl = model.tokenize([f"team {i} wears colour {i % 5}" for i in range(n)])
    groups = torch.tensor([i % 3 for i in range(n)])  # positives in both workers' halves
    return images, ids, expl, groups


def _loss_and_grads(images, ids, expl, groups, ddp: bool) -> tuple[float, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    objective = Objective(build_model(TINY_MODEL), OBJECTIVE)
    if ddp:
        objective = torch.nn.parallel.DistributedDataParallel(objective, find_unused_parameters=True)
    loss = objective(images, ids, expl, groups=groups)["loss"]
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    part = slice(rank * 4, rank * 4 + 4)
    loss, grads = _loss_and_grads(*(t[part] for t in _global_batch(8)), ddp=True)
    losses = [None] * world
    dist.all_gather_object(losses, loss)
    if rank == 0:
        torch.save({"losses": losses, "grads": {n.removeprefix("module."): g for n, g in grads.items()}}, out)
    dist.destroy_process_group()


def test_two_workers_of_batch_b_learn_what_one_process_of_batch_2b_does(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    loss, grads = _loss_and_grads(*_global_batch(8), ddp=False)

    # DDP averages gradients, so the global loss is the mean of the workers' losses.
    assert sum(ddp["losses"]) / 2 == pytest.approx(loss, rel=1e-5)
    assert set(ddp["grads"]) == set(grads) and len(grads) > 20
    for name, grad in grads.items():
        torch.testing.assert_close(ddp["grads"][name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # Each worker alone (local negatives only) would have scored a different loss.
    local = [_loss_and_grads(*(t[i * 4:i * 4 + 4] for t in _global_batch(8)), ddp=False)[0] for i in range(2)]
    assert abs(sum(local) / 2 - loss) > 1e-3


def test_bf16_autocast_runs_the_model_in_bfloat16_on_cpu():
    model = build_model(TINY_MODEL)
    images, ids, expl, _ = _global_batch(4)
    with autocast("bf16", torch.device("cpu")):
        features = model.encode_images(images)
        loss = Objective(model, OBJECTIVE)(images, ids, expl)["loss"]
    assert features.cls.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)  # the batch softmax stays fp32
    with autocast("fp32", torch.device("cpu")):
        assert model.encode_images(images).cls.dtype == torch.float32


def run_copy(trained_run, root) -> str:
    """A new run root holding the session run's data and explanations (training writes its own
    checkpoints there, leaving the session run's alone)."""
    shutil.copytree(trained_run["root"] / "data", root / "data")
    shutil.copy(trained_run["root"] / "explanations.parquet", root / "explanations.parquet")
    return str(root)


def test_training_in_bf16_with_accumulation_and_clipping_streaming_from_storage(trained_run, mlflow_server, tmp_path):
    cfg = tiny_config(run_copy(trained_run, tmp_path), f"tracking.uri={mlflow_server}", "tracking.experiment=bf16",
                      "tracking.registered_model=bf16", "train.precision=bf16", "train.grad_accum_steps=2",
                      "train.batch_size=4", "train.grad_clip_norm=0.5", "train.epochs=1", "train.cache=none")
    result = stage_train(cfg, progress=False)

    assert result.train_loss is not None and result.train_loss == result.train_loss  # finite, not NaN
    # 30 train rows: 2 workers x batch 4 x 2 micro-batches = 16 per step -> 1 step (15 rows each, 3 micro-batches).
    assert result.metrics["step"] == 1
    assert result.metrics["worker_peak_rss_mb"] > 100


@pytest.mark.parametrize("overrides, message", [
    (["train.precision=fp8"], "train.precision"),
    (["train.precision=fp16"], "needs train.use_gpu=true"),
    (["train.placement_strategy=ANYWHERE"], "placement_strategy"),
    (["train.batch_size=64"], "fewer than one optimizer step needs"),
    (["train.cache=ram"], "train.cache"),
    (["train.positives=names"], "train.positives"),
])
def test_impossible_training_configs_are_config_errors(trained_run, mlflow_server, overrides, message):
    with pytest.raises(ConfigError, match=message):  # when the config loads, or before training starts
        stage_train(tiny_config(trained_run["root"], f"tracking.uri={mlflow_server}", "tracking.experiment=bad-config",
                                *overrides), progress=False)


def test_shards_hold_every_sample_once_with_its_image_bytes(trained_run):
    shards = str(trained_run["root"] / "data" / "shards")
    samples = storage.read_parquet(str(trained_run["root"] / "data" / "samples.parquet")).to_pylist()
    manifest = read_manifest(shards)
    for split, entry in manifest["splits"].items():
        rows = [r for f in entry["files"] for r in storage.read_parquet(storage.join(shards, f)).to_pylist()]
        expected = {s["sample_id"]: s for s in samples if s["split"] == split}
        assert sorted(r["sample_id"] for r in rows) == sorted(expected) and len(rows) == entry["rows"]
        for row in rows:
            assert row["image"] == storage.read_bytes(expected[row["sample_id"]]["image_uri"])
    assert split_rows(shards, "train") == sum(s["split"] == "train" for s in samples)


# --- pretrained weights: open_clip's own checkpoint formats, local and on S3 ---------------------

REGISTRY_ARCH = "ViT-S-32-alt"  # a plain open_clip registry CLIP small enough for 2 cores


@pytest.fixture(scope="module")
def registry_weights(tmp_path_factory) -> tuple[dict, dict]:
    """A random-init registry CLIP saved as open_clip users keep it: a bare state dict (.pt, also
    the form of GeoRSCLIP's released RS5M_*.pt files), a training checkpoint with DDP's `module.`
    prefix (.pt), safetensors, and a GeoRSCLIP training checkpoint (towers under
    image_backbone. / text_backbone., which its convert_weight.py maps to open_clip's names)."""
    root = tmp_path_factory.mktemp("pretrained")
    state = build_model(ModelConfig(variant="clip_finetune", backbone=REGISTRY_ARCH)).clip.state_dict()
    files = {"state_dict": root / "open_clip_pytorch_model.bin", "training": root / "epoch_32.pt",
             "safetensors": root / "open_clip_model.safetensors", "georsclip_training": root / "epoch_2.pt"}
    torch.save(state, files["state_dict"])
    torch.save({"epoch": 32, "state_dict": {f"module.{k}": v for k, v in state.items()}}, files["training"])
    save_file({k: v.contiguous() for k, v in state.items()}, str(files["safetensors"]))
    georsclip = {(f"image_backbone.{k.removeprefix('visual.')}" if k.startswith("visual.") else f"text_backbone.{k}"): v
                 for k, v in state.items()}
    torch.save({"epoch": 2, "state_dict": georsclip}, files["georsclip_training"])
    return state, {k: str(v) for k, v in files.items()}


@pytest.mark.parametrize("form", ["state_dict", "training", "safetensors", "georsclip_training"])
def test_pretrained_open_clip_weights_load_into_the_backbone(registry_weights, form):
    state, files = registry_weights
    model = build_model(ModelConfig(variant="entityclip", backbone=REGISTRY_ARCH))
    load_pretrained(model, files[form])
    loaded = model.clip.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


MOBILE_ARCH = "MobileCLIP2-S0"  # FastViT MCi0 image tower (timm) + non-causal text transformer


def test_a_mobileclip_backbone_gives_the_token_features_every_variant_reads(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(variant="entityclip", backbone=MOBILE_ARCH)).eval()
    images = torch.randn(2, 3, model.image_size, model.image_size)
    with torch.no_grad():
        img, txt = model.encode_images(images), model.text_features(["Velmora Rovers lift the cup"] * 2, ["a red circle"] * 2)
        # token 0 is open_clip's own image embedding, and the patch tokens average to it
        assert torch.allclose(img.cls, model.clip.encode_image(images), atol=1e-4)
        assert torch.allclose(img.tokens[:, 1:].mean(dim=1), img.cls, atol=1e-4)
        assert torch.allclose(txt.eot, model.clip.encode_text(model.tokenize(["Velmora Rovers lift the cup"] * 2)),
                              atol=1e-4)
    # Its weights load from an open_clip checkpoint file like any registry architecture's.
    source = build_model(ModelConfig(variant="clip_finetune", backbone=MOBILE_ARCH)).clip.state_dict()
    save_file({k: v.contiguous() for k, v in source.items()}, str(tmp_path / "mobileclip.safetensors"))
    load_pretrained(model, str(tmp_path / "mobileclip.safetensors"))
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in source.items())
    with pytest.raises(ConfigError, match="fusion_layers is 2; this backbone gives 1"):
        build_model(ModelConfig(variant="xattn_fusion", backbone=MOBILE_ARCH, fusion_layers=2))


def test_pretrained_weights_load_from_s3(s3_bucket, tmp_path):
    state = build_model(TINY_MODEL).clip.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "clip.safetensors"))
    uri = f"s3://{s3_bucket}/pretrained/tiny/open_clip_model.safetensors"
    storage.write_bytes(uri, (tmp_path / "clip.safetensors").read_bytes())
    model = build_model(TINY_MODEL)
    load_pretrained(model, uri)
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in state.items())


def test_weights_of_another_architecture_are_a_clear_error(registry_weights):
    _, files = registry_weights
    with pytest.raises(StorageError, match="not a checkpoint for backbone 'tiny'"):
        load_pretrained(build_model(ModelConfig(variant="clip_finetune")), files["safetensors"])
    with pytest.raises(StorageError, match="pretrained weights not found"):
        load_pretrained(build_model(ModelConfig(variant="clip_finetune")), "/nonexistent/model.pt")


def test_model_pretrained_config_initialises_a_run(trained_run, mlflow_server, tmp_path):
    clip = build_model(trained_run["cfg"].model).clip
    weights = tmp_path / "tiny-clip.pt"
    torch.save(clip.state_dict(), weights)
    cfg = tiny_config(run_copy(trained_run, tmp_path / "run"), f"tracking.uri={mlflow_server}",
                      "tracking.experiment=pretrained", "tracking.registered_model=pretrained",
                      "model.variant=clip_zeroshot", f"model.pretrained={weights}")
    # The zero-shot baseline is packaged without training: its checkpoint is the pretrained CLIP.
    result = stage_train(cfg, progress=False)
    saved = load_file(str(storage.local_path(publish.current(result.checkpoint_uri)) / "model.safetensors"))
    assert all(torch.equal(saved[f"clip.{k}"], v) for k, v in clip.state_dict().items())
