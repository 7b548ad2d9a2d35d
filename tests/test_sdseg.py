"""SDSeg (architecture, trained from scratch) as a comparable method: network, loss, inference, stock commands."""

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _stock_commands import run_command

from nnunetv2_dsm.data.totalseg_example import build_example_dataset
from nnunetv2_dsm.networks.sdseg import SDSegNetwork

BIN = Path(sys.executable).parent
TINY = {"ae_channels": (8, 16), "unet_channels": (16, 32), "norm_groups": 4}


def _net(**kwargs) -> SDSegNetwork:
    torch.manual_seed(0)
    return SDSegNetwork(1, 4, **{**TINY, **kwargs})


def test_shapes_and_schedule() -> None:
    net = _net()
    x = torch.randn(2, 1, 32, 32)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    assert net.encode_masks(masks).shape == (2, 4, 16, 16), "kl-f2 for two autoencoder blocks, 4 latent channels"
    assert net.condition(x).shape == (2, 4, 16, 16)
    loss, recon = net.autoencoder_loss(masks)
    assert loss.ndim == 0 and recon.shape == masks.shape and 0 <= recon.min() <= recon.max() <= 1
    assert net.diffusion_loss(x, masks, torch.tensor([0, 2])).ndim == 0
    net.eval()
    with torch.no_grad():
        logits = net(x)
    assert logits.shape == (2, 4, 32, 32) and torch.all(logits[:, 0] == 0), "background 0, one channel per class"
    # DDPM, 1000 steps, betas linear in their square root from 0.0015 to 0.0155 (LDM's "linear").
    betas = net.scheduler.betas.double()
    assert len(betas) == 1000 and betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0155)
    steps = np.diff(betas.sqrt().numpy())
    assert np.allclose(steps, steps.mean(), rtol=1e-3), "stored in float32"


def test_latent_estimation_loss_equals_its_definition() -> None:
    net = _net()
    x = torch.randn(3, 1, 32, 32)
    masks = (torch.rand(3, 1, 32, 32) > 0.7).float()
    classes = torch.tensor([0, 1, 2])
    torch.manual_seed(5)
    loss = net.diffusion_loss(x, masks, classes, generator=torch.Generator().manual_seed(7))

    torch.manual_seed(5)  # the autoencoder's posterior sample draws from the global generator
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z0 = net.encode_masks(masks)
    c = net.condition(x)
    t = torch.randint(0, 1000, (3,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    abar = net.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    eps = net.unet(torch.cat([z_t, c], 1), t, class_labels=classes).sample
    z0_hat = (z_t - (1 - abar).sqrt() * eps) / abar.sqrt()
    expected = (eps - noise).abs().mean() + (z0_hat - z0).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_final_step_fraction_trains_the_inference_step() -> None:
    net = _net()
    x, masks, classes = torch.randn(2, 1, 32, 32), (torch.rand(2, 1, 32, 32) > 0.7).float(), torch.tensor([0, 1])
    torch.manual_seed(5)
    loss = net.diffusion_loss(x, masks, classes, generator=torch.Generator().manual_seed(7), final_step_fraction=1.0)
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z0 = net.encode_masks(masks)
    torch.randint(0, 1000, (2,), generator=generator)
    torch.rand((2,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    t = torch.full((2,), 999)
    z_t = net.scheduler.add_noise(z0, noise, t)
    eps = net.denoise(z_t, net.condition(x), t, classes)
    expected = (eps - noise).abs().mean() + (net.predict_z0(z_t, eps, t) - z0).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_volumetric_network_from_monai() -> None:
    torch.manual_seed(0)
    net = SDSegNetwork(1, 3, **TINY, mask_channels=1, spatial_dims=3)
    assert type(net.autoencoder).__module__.startswith("monai") and type(net.unet).__module__.startswith("monai")
    x, masks = torch.randn(2, 1, 16, 16, 16), (torch.rand(2, 1, 16, 16, 16) > 0.6).float()
    assert net.encode_masks(masks).shape == net.condition(x).shape == (2, 4, 8, 8, 8)
    loss, recon = net.autoencoder_loss(masks)
    assert loss.ndim == 0 and recon.shape == masks.shape
    classes = torch.tensor([1, 0])
    torch.manual_seed(5)
    loss = net.diffusion_loss(x, masks, classes, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(5)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        z0 = net.encode_masks(masks)
    t = torch.randint(0, 1000, (2,), generator=generator)
    noise = torch.randn(z0.shape, generator=generator)
    abar = net.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    z_t = abar.sqrt() * z0 + (1 - abar).sqrt() * noise
    eps = net.unet(torch.cat([z_t, net.condition(x)], 1), t, class_labels=classes)
    expected = (eps - noise).abs().mean() + ((z_t - (1 - abar).sqrt() * eps) / abar.sqrt() - z0).abs().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    net.eval()
    with torch.no_grad():
        logits, again = net(x), net(x)
    assert logits.shape == (2, 3, 16, 16, 16) and torch.equal(logits, again)
    with pytest.raises(ValueError, match="2D SDSeg's only"):
        net.load_autoencoder("/nonexistent")


def test_kl_term_equals_diffusers_posterior_kl() -> None:
    from nnunetv2_dsm.networks.sdseg_blocks import MaskAutoencoder

    posterior = _net().autoencoder.encode(torch.randn(2, 3, 16, 16)).latent_dist
    assert torch.allclose(MaskAutoencoder.kl(posterior.mean, posterior.std), posterior.kl(), rtol=1e-4)


def test_single_step_inference_is_deterministic_for_a_seed() -> None:
    net = _net().eval()
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        a, b = net.sample_probabilities(x), net.sample_probabilities(x)
        other = net.sample_probabilities(x, seed=1)
        ddim = net.sample_probabilities(x, steps=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, other), "the seed sets the starting noise"
    assert ddim.shape == a.shape == (1, 3, 32, 32)


def test_one_ddim_step_is_the_single_step() -> None:
    """DDIM from t = T-1 to t = 0 in one step returns the single-step z0_hat (no clipping of latents)."""
    net = _net().eval()
    c = net.condition(torch.randn(2, 1, 32, 32)).detach()
    z = 3 * torch.randn_like(c)  # latents well outside [-1, 1]
    labels, t = torch.tensor([0, 2]), torch.full((2,), 999)
    with torch.no_grad():
        expected = net.predict_z0(z, net.denoise(z, c, t, labels), t)
        assert torch.allclose(net.ddim(z, c, labels, 1), expected, atol=1e-4)


def test_autoencoder_learns_masks() -> None:
    net = _net()
    optimizer = torch.optim.AdamW(net.autoencoder.parameters(), lr=3e-3)
    masks = torch.zeros(4, 1, 32, 32)
    for i in range(4):
        masks[i, :, 4 + 3 * i: 20 + 2 * i, 6:26 - 3 * i] = 1
    for _ in range(60):
        optimizer.zero_grad()
        loss, _ = net.autoencoder_loss(masks)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        _, recon = net.autoencoder_loss(masks)
    dice = 2 * ((recon > 0.5) & (masks > 0.5)).sum() / ((recon > 0.5).sum() + masks.sum())
    assert dice > 0.8, f"reconstruction Dice {dice:.2f}"


def test_hook_finds_method_classes_by_name() -> None:
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    root = Path(nnunetv2.__file__).parent
    trainer = recursive_find_python_class(str(root / "training" / "nnUNetTrainer"), "SDSegTrainer",
                                          "nnunetv2.training.nnUNetTrainer")
    planner = recursive_find_python_class(str(root / "experiment_planning"), "SDSegPlannerCPU",
                                          "nnunetv2.experiment_planning")
    assert trainer.__module__ == "nnunetv2_dsm.trainers.sdseg_trainer"
    assert planner.__module__ == "nnunetv2_dsm.planners.sdseg_planner"


@pytest.fixture(scope="module")
def sdseg_env(tmp_path_factory, example_ct_dir) -> dict:
    root = tmp_path_factory.mktemp("sdseg")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f", "DSM_SEED": "0"}
    build_example_dataset(root / "raw" / "Dataset990_TSExample", ["liver", "spleen"], src=example_ct_dir)
    return env


def test_stock_commands_plan_train_predict(sdseg_env: dict, tmp_path: Path) -> None:
    raw = Path(sdseg_env["nnUNet_raw"]) / "Dataset990_TSExample"
    run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-pl", "DSMPlannerCPU", "-c", "2d",
                 "-np", "1"], sdseg_env)
    run_command([str(BIN / "nnUNetv2_plan_experiment"), "-d", "990", "-pl", "SDSegPlannerCPU"], sdseg_env)
    pre = Path(sdseg_env["nnUNet_preprocessed"]) / "Dataset990_TSExample"
    sdseg, dsm = (json.loads((pre / f"{p}.json").read_text())["configurations"]["2d"]
                  for p in ("SDSegPlansCPU", "DSMPlansCPU"))
    assert sdseg["architecture"]["network_class_name"] == "nnunetv2_dsm.networks.sdseg.SDSegNetwork"
    for key in ("patch_size", "batch_size", "spacing", "data_identifier"):
        assert sdseg[key] == dsm[key], key  # the same preprocessed data, patches and batches as DSM

    trainer = "SDSegTrainer_2epochs_NoMirroring"
    run_command([str(BIN / "nnUNetv2_train"), "990", "2d", "0", "-tr", trainer, "-p", "SDSegPlansCPU",
                 "-device", "cpu"], sdseg_env)
    fold = Path(sdseg_env["nnUNet_results"]) / "Dataset990_TSExample" / f"{trainer}__SDSegPlansCPU__2d" / "fold_0"
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "autoencoder reconstruction Dice per class" in log and "latent scale" in log
    assert (fold / "checkpoint_final.pth").is_file()

    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "tsexample_B_0000.nii.gz").symlink_to(raw / "imagesTr" / "tsexample_B_0000.nii.gz")
    out = tmp_path / "out"
    # step size 1: one tile per patch position, enough to check the stock export path quickly
    run_command([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", "2d",
                 "-f", "0", "-tr", trainer, "-p", "SDSegPlansCPU", "-device", "cpu", "-npp", "1", "-nps", "1",
                 "-step_size", "1"], sdseg_env)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tsexample_B.nii.gz")))
    reference = sitk.ReadImage(str(raw / "labelsTr" / "tsexample_B.nii.gz"))
    assert predicted.shape == sitk.GetArrayFromImage(reference).shape
    assert set(np.unique(predicted)) <= {0, 1, 2}


def test_stock_commands_3d(sdseg_env: dict, tmp_path: Path) -> None:
    """The volumetric SDSeg on 3d_fullres: plans from the stock commands, then narrowed to a tiny
    network and patch in the plans file (as a user may edit plans) so the run takes seconds."""
    env = {**sdseg_env, "DSM_SDSEG_INFERENCE_STEPS": "2"}  # DDIM through the stock predictor
    raw = Path(env["nnUNet_raw"]) / "Dataset990_TSExample"
    spacing = ["8", "8", "8"]
    run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", "990", "-pl", "DSMPlannerCPU", "-c", "3d_fullres",
                 "-np", "1", "-overwrite_target_spacing", *spacing], env)
    run_command([str(BIN / "nnUNetv2_plan_experiment"), "-d", "990", "-pl", "SDSegPlannerCPU",
                 "-overwrite_target_spacing", *spacing], env)
    plans_file = Path(env["nnUNet_preprocessed"]) / "Dataset990_TSExample" / "SDSegPlansCPU.json"
    plans = json.loads(plans_file.read_text())
    conf = plans["configurations"]["3d_fullres"]
    assert conf["architecture"]["network_class_name"] == "nnunetv2_dsm.networks.sdseg.SDSegNetwork"
    assert conf["architecture"]["arch_kwargs"]["spatial_dims"] == 3
    assert all(s % 32 == 0 for s in conf["patch_size"]), "kl-f8 autoencoder and a 3-resolution UNet divide 32"
    conf["architecture"]["arch_kwargs"].update({"ae_channels": [8, 8], "unet_channels": [8, 16], "norm_groups": 4})
    conf["patch_size"], conf["batch_size"] = [16, 32, 32], 2
    plans_file.write_text(json.dumps(plans))

    trainer = "SDSegTrainer3d_2epochs_NoMirroring"
    run_command([str(BIN / "nnUNetv2_train"), "990", "3d_fullres", "0", "-tr", trainer, "-p", "SDSegPlansCPU",
                 "-device", "cpu"], env)
    fold = Path(env["nnUNet_results"]) / "Dataset990_TSExample" / f"{trainer}__SDSegPlansCPU__3d_fullres" / "fold_0"
    assert "latent scale" in next(fold.glob("training_log_*.txt")).read_text()
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "tsexample_B_0000.nii.gz").symlink_to(raw / "imagesTr" / "tsexample_B_0000.nii.gz")
    out = tmp_path / "out"
    run_command([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", "990", "-c", "3d_fullres",
                 "-f", "0", "-tr", trainer, "-p", "SDSegPlansCPU", "-device", "cpu", "-npp", "1", "-nps", "1",
                 "-step_size", "1"], env)
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "tsexample_B.nii.gz")))
    assert predicted.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "tsexample_B.nii.gz"))).shape
    assert set(np.unique(predicted)) <= {0, 1, 2}


def test_trainer_refuses_other_plans(sdseg_env: dict) -> None:
    script = ("from nnunetv2_dsm.trainers.sdseg_trainer import SDSegTrainer, SDSegPlansError\n"
              "plans = {'configurations': {'2d': {'architecture': {'network_class_name': 'x.UNet'}}}}\n"
              "try:\n    SDSegTrainer(plans, '2d', 0, {})\nexcept SDSegPlansError as e:\n    print(e)\n")
    out = run_command([sys.executable, "-c", script], sdseg_env)
    assert "SDSegPlanner" in out.stdout and "-p SDSegPlans" in out.stdout


def test_trainers_refuse_the_other_dimensionality(sdseg_env: dict) -> None:
    script = ("from nnunetv2_dsm.trainers.sdseg_trainer import SDSegTrainer, SDSegTrainer3d, SDSegPlansError\n"
              "arch = {'network_class_name': 'nnunetv2_dsm.networks.sdseg.SDSegNetwork'}\n"
              "plans = {'configurations': {'2d': {'architecture': arch}, '3d_fullres': {'architecture': "
              "{**arch, 'arch_kwargs': {'spatial_dims': 3}}}}}\n"
              "for cls, conf in ((SDSegTrainer, '3d_fullres'), (SDSegTrainer3d, '2d')):\n"
              "    try:\n        cls(plans, conf, 0, {})\n    except SDSegPlansError as e:\n        print(e)\n")
    out = run_command([sys.executable, "-c", script], sdseg_env)
    assert "use -tr SDSegTrainer3d for '3d_fullres'" in out.stdout
    assert "use -tr SDSegTrainer for '2d'" in out.stdout
