"""DiffuGTS (method re-implemented, diffusion model trained here): attention maps, inpainting, training, prediction."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _stock_commands import failed_save_script, run_command

from nnunetv2_dsm.cli.main import main
from nnunetv2_dsm.data.synthesis import build_tumour_benchmark, example_cases
from nnunetv2_dsm.networks.diffugts import DiffuGTSNetwork
from nnunetv2_dsm.networks.diffugts_grounding import grounding_losses
from nnunetv2_dsm.networks.diffugts_inpaint import candidate_region, inpaint, refine
from nnunetv2_dsm.text.anomaly_prompts import HEALTHY_TISSUE, prompt_pair

BIN = Path(sys.executable).parent
DATASET_ID = "989"
DATASET = "Dataset989_DiffuGTSTest"
PLANS = "DSMPlansTiny"
TRAINER = "DiffuGTSTrainer_tiny_NoMirroring"
TEST_CASE = "tsyn_ctsm_test_00"

pytestmark = pytest.mark.usefixtures("one_thread")


def _net() -> DiffuGTSNetwork:
    torch.manual_seed(0)
    return DiffuGTSNetwork(1, 3, ae_channels=(8, 16), unet_channels=(16, 32), text_dim=12, max_tokens=4,
                           norm_groups=4, attention_heads=2).eval()


def test_attention_maps_sum_to_one_over_tokens_and_follow_the_prompt() -> None:
    net = _net()
    x = torch.randn(2, 1, 32, 48)
    pairs = torch.randn(3, 2, 12)
    with torch.no_grad():
        maps = net.attention_maps(x, net.pair_tokens(pairs))
        assert maps.shape == (2, 7, 32, 48), "a map per token (healthy, abnormal per prompt, then null), input size"
        torch.testing.assert_close(maps.sum(1), torch.ones(2, 32, 48))
        assert bool((maps >= 0).all())
        first = net.anomaly_logits(x, pairs)
        assert first.shape == (2, 3, 32, 48)
        again = net.anomaly_logits(x, pairs)
        other = pairs.clone()
        other[0, 1] = torch.randn(12)
        changed = net.anomaly_logits(x, other)
    torch.testing.assert_close(first, again, msg="fixed noise: the maps are deterministic")
    assert not torch.allclose(first[:, 0], changed[:, 0]), "another abnormal prompt, another map"


def test_adapter_and_map_calibration_train_through_the_attention() -> None:
    net = _net()
    x = torch.randn(2, 1, 32, 32)
    net.requires_grad_(False)
    for p in [*net.adapter.parameters(), net.map_scale, net.map_bias]:
        p.requires_grad_(True)
    net.anomaly_logits(x, torch.randn(2, 2, 12)).square().mean().backward()
    assert float(net.adapter.mlp[2].weight.grad.abs().sum()) > 0 and net.map_scale.grad is not None
    assert all(p.grad is None for p in net.unet.parameters()), "the frozen denoiser takes no gradient"


def test_grounding_losses_vanish_for_attention_on_the_named_masks_and_train_the_denoiser() -> None:
    masks = torch.zeros(1, 3, 8, 8)
    masks[0, 0, :4] = 1  # token 0 names the top half, token 1 the bottom half, token 2 is padding
    masks[0, 1, 4:] = 1
    weight = torch.tensor([[1.0, 1.0, 0.0]])
    grounded = masks.clone()  # every pixel attends to the token that names it
    token, pixel = grounding_losses([grounded, grounded], masks, weight)
    assert float(token) == 0 and float(pixel) < 1e-4
    assert float(grounding_losses([grounded[:, :, ::2, ::2]], masks, weight)[0]) == 0, "masks follow each layer's size"
    token, pixel = grounding_losses([torch.full((1, 3, 8, 8), 1 / 3)], masks, weight)
    assert float(token) == pytest.approx(0.25) and float(pixel) > 0.5, "uniform attention: half the mass outside"
    assert float(grounding_losses([grounded], masks, torch.zeros(1, 3))[0]) == 0, "no weighted token, no loss"

    net = _net().train()
    x = torch.randn(2, 1, 32, 32)
    tokens = torch.randn(2, 4, 12)
    token_masks = torch.zeros(2, 4, 32, 32)
    token_masks[:, 0, :16] = 1
    losses = net.diffusion_loss(x, tokens, token_masks=token_masks, grounding_max_timestep=1000,
                                generator=torch.Generator().manual_seed(0))
    assert float(losses.token.detach()) > 0 and float(losses.pixel.detach()) > 0 and not net.store.recording
    (losses.token + losses.pixel).backward()
    attention = [p.grad for n, p in net.unet.named_parameters() if "attn2.to_k" in n]
    assert attention and all(g is not None and float(g.abs().sum()) > 0 for g in attention), \
        "the grounding losses train the cross-attention"
    plain = net.diffusion_loss(x, tokens)
    assert float(plain.token) == 0 and float(plain.pixel) == 0


def test_inpainting_keeps_the_known_region_and_changes_the_unknown_one() -> None:
    net = _net()
    x = torch.randn(2, 1, 48, 48)
    region = torch.zeros(2, 1, 48, 48, dtype=torch.bool)
    region[:, :, 8:16, 8:16] = True
    image, z = inpaint(net, x, region, torch.randn(3, 12), steps=3)
    with torch.no_grad():
        z0 = net.encode(x)
        reconstruction = net.decode(z0)
    known = torch.ones(48, 48, dtype=torch.bool)
    known[8:16, 8:16] = False
    torch.testing.assert_close(z[:, :, 8:, 8:], z0[:, :, 8:, 8:], msg="known latents are the image's own")
    torch.testing.assert_close(image[:, :, known], reconstruction[:, :, known], msg="up to the decoder's error")
    assert float((image - reconstruction)[:, :, 8:16, 8:16].abs().mean()) > 1e-3
    _, partial = inpaint(net, x, region, torch.randn(3, 12), steps=4, strength=0.25)
    torch.testing.assert_close(partial[:, :, 8:, 8:], z0[:, :, 8:, 8:])
    unknown = torch.nn.functional.adaptive_max_pool2d(region.float(), z0.shape[2:]).expand_as(z0) > 0
    assert float((partial - z0)[unknown].abs().mean()) < float((z - z0)[unknown].abs().mean()), \
        "starting from the image noised to a quarter of the schedule stays nearer the image than pure noise"


def test_refinement_outputs_and_empty_region() -> None:
    net = _net()
    x = torch.randn(1, 1, 32, 32)
    p = torch.full((1, 1, 32, 32), 0.1)
    p[:, :, 10:14, 10:14] = 0.9
    result = refine(net, x, p, torch.randn(2, 12), threshold=0.5, steps=2)
    assert torch.equal(result.region, candidate_region(p, 0.5)) and int(result.region.sum()) == 64
    assert 0 <= float(result.residual.min()) and float(result.residual.max()) < 1
    assert 0 <= float(result.refined.min()) and float(result.refined.max()) <= 1
    torch.testing.assert_close(result.refined[~result.region], p[~result.region] / 2)
    empty = refine(net, x, torch.full_like(p, 0.1), torch.randn(2, 12), threshold=0.5, steps=2)
    assert not empty.region.any() and torch.equal(empty.residual, torch.zeros_like(p))


def test_prompt_pairs_name_the_host_organ() -> None:
    assert prompt_pair("spleen tumor") == ("a computerized tomography of a healthy spleen",
                                           "a computerized tomography of a spleen tumor")
    assert prompt_pair("kidney_tumor")[0] == "a computerized tomography of a healthy kidney"
    assert prompt_pair("aortic tumor")[0] == "a computerized tomography of a healthy aorta"
    assert prompt_pair("liver") == ("a computerized tomography of a healthy liver",
                                    "a computerized tomography of a liver tumor")
    assert prompt_pair("odd lesion")[0] == HEALTHY_TISSUE


# --- stock commands on tiny data ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def env(tmp_path_factory, example_ct_dir) -> dict:
    root = tmp_path_factory.mktemp("diffugts")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "2"}
    env.pop("nnUNet_extTrainer", None)
    env.pop("DSM_TEXT_ENCODER", None)
    build_tumour_benchmark(root / "raw" / DATASET, example_cases(example_ct_dir), variants=1)
    run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-pl", "DSMPlannerCPU", "-c", "2d",
                 "-np", "2"], env)
    folder = root / "preprocessed" / DATASET
    plans = json.loads((folder / "DSMPlansCPU.json").read_text())
    plans["plans_name"] = PLANS
    plans["configurations"]["2d"]["batch_size"] = 2
    (folder / f"{PLANS}.json").write_text(json.dumps(plans))
    cases = sorted(json.loads((root / "raw" / DATASET / "dataset.json").read_text())["dsm"]["class_availability"])
    (folder / "splits_final.json").write_text(json.dumps([{"train": cases, "val": cases[:1]}] * 5))
    return env


@pytest.fixture(scope="module")
def model(env: dict) -> Path:
    run_command([str(BIN / "nnUNetv2_train"), DATASET_ID, "2d", "0", "-tr", TRAINER, "-p", PLANS, "-device", "cpu"],
                env)
    return Path(env["nnUNet_results"]) / DATASET / f"{TRAINER}__{PLANS}__2d"


def test_training_runs_three_phases_and_records_the_model(model: Path) -> None:
    log = next((model / "fold_0").glob("training_log_*.txt")).read_text()
    for phase in ("autoencoder", "denoiser", "adapter"):
        assert f"DiffuGTS phase: {phase}" in log
    assert "token grounding" in log, "the denoiser phase logs its grounding losses"
    assert "latent scale" in log
    plans = json.loads((model / "plans.json").read_text())
    arch = plans["configurations"]["2d"]["architecture"]
    assert arch["network_class_name"].endswith("DiffuGTSNetwork") and arch["arch_kwargs"]["text_dim"] == 384
    checkpoint = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["dsm_text"]["encoder_id"] and float(checkpoint["network_weights"]["latent_scale"]) != 1.0


def test_prediction_writes_every_map_in_input_geometry(env: dict, model: Path, tmp_path: Path) -> None:
    image = Path(env["nnUNet_raw"]) / DATASET / "imagesTs" / f"{TEST_CASE}_0000.nii.gz"
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / image.name).write_bytes(image.read_bytes())
    reference = sitk.ReadImage(str(image))
    maps = {}
    for prompt in ("pancreas tumor", "spleen tumor"):
        out = tmp_path / prompt.replace(" ", "_")
        assert main(["diffugts-predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0",
                     "--device", "cpu", "--prompts", prompt, "--threshold", "0.01", "--threshold-mode", "absolute", "--inpaint-steps", "2"]) == 0
        slug = prompt.replace(" ", "_")
        written = [out / f"{TEST_CASE}.nii.gz", out / "scores" / f"{TEST_CASE}_{slug}.nii.gz",
                   *[out / "diffugts" / f"{TEST_CASE}_{slug}_{m}.nii.gz" for m in ("attention", "residual",
                                                                                    "pseudo_healthy")]]
        for path in written:
            result = sitk.ReadImage(str(path))
            assert result.GetSize() == reference.GetSize() and result.GetSpacing() == pytest.approx(reference.GetSpacing())
            assert np.isfinite(sitk.GetArrayFromImage(result)).all()
        maps[prompt] = sitk.GetArrayFromImage(sitk.ReadImage(str(written[2])))
        healthy = sitk.GetArrayFromImage(sitk.ReadImage(str(written[4])))
        # nnU-Net's normalised intensities lie within a few units of 0; Hounsfield units spread over tens to
        # thousands (an autoencoder trained for two iterations reconstructs a narrow band of them)
        assert np.percentile(np.abs(healthy), 99) > 20, "the pseudo-healthy image is in Hounsfield units again"
        info = json.loads((out / "prompts.json").read_text())
        assert "trained here" in info["method"] and info["prompts"][0]["healthy_text"].endswith(prompt.split()[0])
    assert not np.allclose(maps["pancreas tumor"], maps["spleen tumor"]), "the prompt changes the map"


def test_refinement_runs_by_default_and_known_regions_are_inpainted(env: dict, model: Path, tmp_path: Path,
                                                                   capsys) -> None:
    """Relative threshold: every case gets a candidate region; ``--regions``: exactly the given mask is inpainted."""
    image = Path(env["nnUNet_raw"]) / DATASET / "imagesTs" / f"{TEST_CASE}_0000.nii.gz"
    inputs, regions = tmp_path / "in", tmp_path / "regions"
    inputs.mkdir()
    regions.mkdir()
    (inputs / image.name).write_bytes(image.read_bytes())
    args = ["diffugts-predict", "-i", str(inputs), "-m", str(model), "-f", "0", "--device", "cpu",
            "--prompts", "spleen tumor", "--inpaint-steps", "2"]
    residual = tmp_path / "{}" / "diffugts" / f"{TEST_CASE}_spleen_tumor_residual.nii.gz"
    assert main([*args, "-o", str(tmp_path / "relative")]) == 0
    info = json.loads((tmp_path / "relative" / "prompts.json").read_text())
    assert info["threshold_mode"] == "relative" and info["regions"] is None
    read = lambda p: sitk.GetArrayFromImage(sitk.ReadImage(str(p)))  # noqa: E731
    assert read(str(residual).format("relative")).max() > 0, "the region at half the case's peak was inpainted"

    assert main([*args, "-o", str(tmp_path / "missing"), "--regions", str(regions)]) == 2
    assert f"{TEST_CASE}.nii.gz" in capsys.readouterr().err, "the missing mask is named"
    assert not (tmp_path / "missing" / f"{TEST_CASE}.nii.gz").exists(), "nothing predicted before the check"

    reference = sitk.ReadImage(str(image))
    mask = np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8)
    z = mask.shape[0] // 2
    mask[z - 1:z + 2, 20:40, 30:50] = 1
    region = sitk.GetImageFromArray(mask)
    region.CopyInformation(reference)
    sitk.WriteImage(region, str(regions / f"{TEST_CASE}.nii.gz"))
    assert main([*args, "-o", str(tmp_path / "given"), "--regions", str(regions)]) == 0
    given = read(str(residual).format("given"))
    outside = np.ones(mask.shape[0], dtype=bool)
    outside[z - 1:z + 2] = False
    assert given[outside].max() == 0, "slices without a region are not inpainted (the residual is kept inside it)"
    assert (given[z - 1:z + 2, 22:38, 32:48] > 0).mean() > 0.9, "the given region is"


def test_dsm_plans_for_3d_are_refused(env: dict) -> None:
    out = subprocess.run([str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", TRAINER, "-p", PLANS,
                          "-device", "cpu"], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0 and "2D slices" in out.stdout + out.stderr


def test_checkpoints_are_written_atomically(env: dict, tmp_path: Path) -> None:
    """A save that fails half-way (a full disk) leaves the previous checkpoint as it was and no temporary."""
    target = tmp_path / "checkpoint_latest.pth"
    script = failed_save_script(DATASET_ID, "2d", TRAINER, PLANS, target) + textwrap.dedent("""
        print('ATOMIC OK')
    """)
    assert "ATOMIC OK" in run_command([sys.executable, "-c", script], env).stdout
