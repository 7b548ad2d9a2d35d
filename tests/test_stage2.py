"""DSM stage 2: network, -pretrained_weights from stage 1, text-prompt prediction and stock nnU-Net commands.

The pipeline runs the stock commands in subprocesses on CPU, on the seen/unseen tumour benchmark built
from the real example CT merged with an organ-only dataset (partial labels): plan with DSMPlannerCPU, shrink the plans to a patch that covers the small
validation case in one tile with two kMMM levels (copy ``DSMPlansTiny``), train stage 1 briefly, train
stage 2 from its checkpoint with ``-pretrained_weights``, then predict with text prompts and with
``nnUNetv2_predict``.
"""

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from _stock_commands import run_command
from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from torch import nn

from nnunetv2_dsm.checks.inputs import InputError
from nnunetv2_dsm.cli import predict as predict_cli
from nnunetv2_dsm.data.merge import MergeSource, merge_datasets
from nnunetv2_dsm.data.synthesis import build_tumour_benchmark, example_cases
from nnunetv2_dsm.data.totalseg_example import build_example_dataset
from nnunetv2_dsm.dataset import DSMDataset
from nnunetv2_dsm.inference.predictor import DSMPredictor
from nnunetv2_dsm.inference.prompts import DSMPredictionError, check_prompts, prompt_slug
from nnunetv2_dsm.networks.dsm_stage2 import DSMStage2Network
from nnunetv2_dsm.text import EncoderMismatchError, save_embeddings
from nnunetv2_dsm.trainers.stage2 import TEXT_CHECKPOINT_KEY, DSMTrainerStage2

BIN = Path(sys.executable).parent
DATASET_ID = "993"
DATASET = "Dataset993_Stage2Test"
BENCH = "Dataset994_Stage2Bench"
ORGANS = "Dataset995_Stage2Organs"
PLANS = "DSMPlansTiny"
STAGE1 = "DSMTrainer_1epoch_NoMirroring"
STAGE2 = "DSMTrainerStage2_tiny_NoMirroring"
VAL_CASE = "tsyn_ctsm_00"
TEST_CASE = "tsyn_ctsm_test_00"


def _conv_kwargs(n_stages: int = 4) -> dict:
    return dict(
        n_stages=n_stages, features_per_stage=[8, 16, 32, 32][:n_stages], conv_op=nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * n_stages, strides=[[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]][:n_stages],
        n_blocks_per_stage=[1] * n_stages, n_conv_per_stage_decoder=[1] * (n_stages - 1), conv_bias=True,
        norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
    )


def _tiny_network(**stage2) -> DSMStage2Network:
    torch.manual_seed(0)
    kwargs = {"query_dim": 16, "ffn_dim": 32, "num_heads": 2, "num_kmmm_layers": 3, "num_tumour_queries": 3,
              "text_dim": 8, "dqr_steps": 1, "organ_channels": [0, 1], **stage2}
    return DSMStage2Network(1, 4, **_conv_kwargs(), **kwargs)


pytestmark = pytest.mark.usefixtures("one_thread")


# --- network ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("ablation", [{}, {"use_amvp": False}, {"use_dqr": False}, {"use_text": False},
                                      {"background_query": True}])
def test_gradients_reach_every_trainable_parameter(ablation: dict) -> None:
    net = _tiny_network(deep_supervision=True, **ablation)
    net.tumour_decoder.text_embeddings.copy_(torch.nn.functional.normalize(torch.randn(4, 8), dim=1))
    x = torch.randn(2, 1, 8, 16, 16)
    outputs, extras = net(x, return_extras=True)
    assert outputs[0].shape == outputs[1].shape == (2, 4, 8, 16, 16)
    assert len(outputs) == 2 + len(extras["responses"])
    loss = sum(torch.nn.functional.binary_cross_entropy_with_logits(o, torch.rand_like(o)) for o in outputs)
    (loss + extras["class_logits"].sum()).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    assert any(n.startswith("stage2.seg_layers.dqr_layers") for n, _ in net.named_parameters())
    if ablation.get("use_dqr") is False:
        assert not any(".diffusion." in n for n, _ in net.named_parameters())


def test_open_vocabulary_output_and_anomaly_channel() -> None:
    net = _tiny_network().eval()
    x = torch.randn(1, 1, 8, 16, 16)
    with torch.no_grad():
        net.set_text_embeddings(torch.randn(2, 8))
        assert net(x).shape == (1, 2, 8, 16, 16)
        net.export_anomaly = True
        out, extras = net(x, return_extras=True)
    assert out.shape == (1, 3, 8, 16, 16)
    expected = -extras["stage1_logits"][:, [0, 1]].amax(dim=1)
    assert torch.allclose(out[:, -1], expected)
    with pytest.raises(ValueError, match="text embeddings must be"):
        net.set_text_embeddings(torch.randn(2, 5))
    with pytest.raises(ValueError, match="without text alignment"):
        _tiny_network(use_text=False).set_text_embeddings(torch.randn(2, 8))
    with pytest.raises(ValueError, match="organ_channels"):
        _tiny_network(organ_channels=[7])


def test_prediction_without_gradients_equals_the_differentiable_forward() -> None:
    # Without gradients the CPU kernels (scan, diffusion) and the in-place head run; the values must not change
    # beyond float32 summation order: logits of magnitude ~10 agree to about 2e-4 relative.
    torch.manual_seed(0)
    net = _tiny_network(dqr_steps=2).eval()
    net.set_text_embeddings(torch.nn.functional.normalize(torch.randn(3, 8), dim=1))
    net.export_anomaly = True
    x = torch.randn(2, 1, 8, 16, 16)
    with torch.inference_mode():
        predicted = net(x)
    differentiable = net(x)
    assert differentiable.requires_grad
    torch.testing.assert_close(predicted, differentiable.detach(), rtol=1e-3, atol=1e-4)


def test_deep_supervision_stages_prepend_the_semantic_output() -> None:
    assert DSMStage2Network.deep_supervision_stages(5, 4) == [0, 0, 1, 2, 3, 4]


def test_prompt_checks() -> None:
    assert prompt_slug("Pancreas Tumor") == "pancreas_tumor"
    assert check_prompts(["liver tumor", "lung-tumor"]) == ["liver_tumor", "lung_tumor"]
    for bad in (["  "], [], "liver", ["liver", "Liver"], ["anomaly"], ["--"]):
        with pytest.raises(DSMPredictionError):
            check_prompts(bad)
    # letters of every script are prompts; file names stay short and distinct for long prompts
    assert check_prompts(["肝臓腫瘍", "Tumeur du foie"]) == ["肝臓腫瘍", "tumeur_du_foie"]
    long_a, long_b = "liver " * 500 + "tumor", "liver " * 500 + "cyst"
    slug_a, slug_b = check_prompts([long_a, long_b])
    assert len(slug_a) <= 64 and len(slug_b) <= 64 and slug_a != slug_b
    assert len(f"case_{slug_a}.nii.gz".encode()) < 255


# --- stock nnU-Net pipeline --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(tmp_path_factory, example_ct_dir) -> dict:
    root = tmp_path_factory.mktemp("stage2")
    env = {**os.environ, "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
           "nnUNet_results": str(root / "results"), "nnUNet_n_proc_DA": "0", "nnUNet_compile": "f",
           "OMP_NUM_THREADS": "2"}
    env.pop("nnUNet_extTrainer", None)
    env.pop("DSM_TEXT_ENCODER", None)
    # Partial labels across merged datasets, as DSM trains: the tumour benchmark (organs + seen tumours)
    # merged with an organ-only dataset whose cases annotate five organs and no tumours.
    raw = root / "raw"
    build_tumour_benchmark(raw / BENCH, example_cases(example_ct_dir), variants=1)
    build_example_dataset(raw / ORGANS, ["spleen", "kidney_right", "kidney_left", "liver", "pancreas"],
                          src=example_ct_dir)
    merge_datasets([MergeSource(raw / BENCH), MergeSource(raw / ORGANS)], raw / DATASET)
    availability = json.loads((raw / DATASET / "dataset.json").read_text())["dsm"]["class_availability"]
    assert "liver_tumor" in availability[VAL_CASE] and "liver_tumor" not in availability["tsexample_A"]
    run_command([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", DATASET_ID, "-pl", "DSMPlannerCPU", "-c", "3d_fullres",
          "-np", "2"], env)
    folder = root / "preprocessed" / DATASET
    plans = json.loads((folder / "DSMPlansCPU.json").read_text())
    plans["plans_name"] = PLANS
    config = plans["configurations"]["3d_fullres"]
    arch = config["architecture"]["arch_kwargs"]
    # One tile covers the 30x101x122 validation case; two kMMM levels keep the SSM sequences short.
    factors = np.prod(np.array(arch["strides"]), axis=0)
    config["patch_size"] = [int(np.ceil(s / f) * f) for s, f in zip((30, 101, 122), factors)]
    arch["num_kmmm_layers"] = 2
    (folder / f"{PLANS}.json").write_text(json.dumps(plans))
    cases = sorted(json.loads((root / "raw" / DATASET / "dataset.json").read_text())["dsm"]["class_availability"])
    (folder / "splits_final.json").write_text(json.dumps([{"train": cases, "val": [VAL_CASE]}] * 5))
    return env


def _model(env: dict, trainer: str) -> Path:
    return Path(env["nnUNet_results"]) / DATASET / f"{trainer}__{PLANS}__3d_fullres"


@pytest.fixture(scope="module")
def stage1(env: dict) -> Path:
    run_command([str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", STAGE1, "-p", PLANS, "-device", "cpu"],
         env)
    return _model(env, STAGE1) / "fold_0" / "checkpoint_final.pth"


@pytest.fixture(scope="module")
def stage2(env: dict, stage1: Path) -> Path:
    out = run_command([str(BIN / "nnUNetv2_train"), DATASET_ID, "3d_fullres", "0", "-tr", STAGE2, "-p", PLANS, "-device",
                "cpu", "-pretrained_weights", str(stage1)], env)
    assert "Loading pretrained weights" in out.stdout
    return _model(env, STAGE2)


@pytest.fixture(scope="module")
def inputs(env: dict, tmp_path_factory) -> Path:
    """An unseen-tumour test case with non-identity direction and non-zero origin."""
    folder = tmp_path_factory.mktemp("inputs")
    image = sitk.ReadImage(str(Path(env["nnUNet_raw"]) / BENCH / "imagesTs" / f"{TEST_CASE}_0000.nii.gz"))
    image.SetDirection((0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    image.SetOrigin((12.5, -30.25, 7.0))
    sitk.WriteImage(image, str(folder / f"{TEST_CASE}_0000.nii.gz"))
    return folder


def _network_from(model: Path, trainer: type) -> nn.Module:
    plans = PlansManager(json.loads((model / "plans.json").read_text()))
    dataset_json = json.loads((model / "dataset.json").read_text())
    config = plans.get_configuration("3d_fullres")
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    return trainer.build_network_architecture(plans, config, 1, heads, enable_deep_supervision=True)


def test_pretrained_weights_load_stage1_and_keep_new_modules(stage1: Path, stage2: Path, capsys) -> None:
    network = _network_from(stage2, DSMTrainerStage2)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    load_pretrained_weights(network, str(stage1))
    pretrained = torch.load(stage1, map_location="cpu", weights_only=False)["network_weights"]
    state = network.state_dict()
    stage1_keys = [k for k in state if ".seg_layers." not in k]
    assert set(stage1_keys) == set(pretrained), "the stage-1 part has the stage-1 parameter names"
    assert all(torch.equal(state[k], pretrained[k]) for k in stage1_keys)
    new = [k for k in state if k.startswith("stage2.seg_layers.")]
    assert new and all(torch.equal(state[k], initial[k]) for k in new)

    checkpoint = torch.load(stage2 / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    record = checkpoint[TEXT_CHECKPOINT_KEY]
    names = json.loads((stage2 / "dataset.json").read_text())["labels"]
    assert record["class_names"] == [n for n in names if n != "background"]
    assert record["embeddings"].shape == (len(record["class_names"]), 384)
    assert torch.allclose(checkpoint["network_weights"]["stage2.seg_layers.text_embeddings"], record["embeddings"])
    stored = json.loads((stage2 / "fold_0" / "dsm_text.json").read_text())
    assert stored["encoder_id"] == record["encoder_id"] and stored["class_names"] == record["class_names"]
    assert not list((stage2 / "fold_0").glob("*.tmp-*"))


def test_pretrained_weights_from_another_network_is_a_clear_error(stage1: Path) -> None:
    other = DSMStage2Network(1, 3, **_conv_kwargs(), query_dim=16, ffn_dim=32, num_heads=2, num_kmmm_layers=2)
    with pytest.raises(AssertionError, match="not seem to be compatible"):
        load_pretrained_weights(other, str(stage1))


def _geometry(image: sitk.Image) -> tuple:
    return image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection()


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return a.GetSize() == b.GetSize() and all(
        np.allclose(x, y, atol=1e-5) for x, y in zip(_geometry(a)[1:], _geometry(b)[1:])
    )


def test_prompt_prediction_writes_maps_in_input_geometry(env: dict, stage2: Path, inputs: Path, tmp_path: Path):
    out = tmp_path / "pred"
    args = _cli().parse_args(["predict", "-i", str(inputs), "-o", str(out), "-m", str(stage2), "-f", "0",
                              "--prompts", "liver tumor", "pancreas tumor", "--device", "cpu", "--disable-tta"])
    assert args.func(args) == 0
    image = sitk.ReadImage(str(inputs / f"{TEST_CASE}_0000.nii.gz"))
    written = [out / f"{TEST_CASE}.nii.gz"] + [out / "scores" / f"{TEST_CASE}_{s}.nii.gz"
                                                for s in ("liver_tumor", "pancreas_tumor", "anomaly")]
    maps = [sitk.ReadImage(str(p)) for p in written]
    assert all(_same_geometry(m, image) for m in maps)
    labels, seen, unseen, anomaly = (sitk.GetArrayFromImage(m) for m in maps)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2}
    assert seen.dtype == unseen.dtype == np.float32
    assert 0.0 <= seen.min() and seen.max() <= 1.0 and 0.0 <= unseen.min() and unseen.max() <= 1.0
    assert not np.allclose(seen, unseen), "a seen and an unseen prompt give different maps"
    assert anomaly.min() == 0.0 and anomaly.max() == pytest.approx(1.0), "per-case min-max normalised"
    info = json.loads((out / "prompts.json").read_text())
    assert info["labels"] == {"background": 0, "liver_tumor": 1, "pancreas_tumor": 2}
    assert not list(out.rglob("*.tmp-*"))
    assert sorted(p.name for p in inputs.iterdir()) == [f"{TEST_CASE}_0000.nii.gz"], "inputs untouched"

    # A second run into the same folder with other prompts leaves no map prompts.json does not list.
    args = _cli().parse_args(["predict", "-i", str(inputs), "-o", str(out), "-m", str(stage2), "-f", "0",
                              "--prompts", "liver tumor", "--device", "cpu", "--disable-tta"])
    assert args.func(args) == 0
    assert sorted(p.name for p in (out / "scores").iterdir()) == [f"{TEST_CASE}_anomaly.nii.gz",
                                                                  f"{TEST_CASE}_liver_tumor.nii.gz"]
    assert json.loads((out / "prompts.json").read_text())["labels"] == {"background": 0, "liver_tumor": 1}


def test_case_range_prompt_is_a_second_pass_over_the_tiles(stage2: Path, inputs: Path, tmp_path: Path) -> None:
    maps = {}
    for mode in ("tile", "case"):
        predictor = DSMPredictor(["pancreas tumor"], use_mirroring=False, device=torch.device("cpu"),
                                 allow_tqdm=False, amvp_range=mode)
        predictor.initialize_from_trained_model_folder(str(stage2), (0,), "checkpoint_final.pth")
        predictor.predict_folder(inputs, tmp_path / mode)
        assert predictor._amvp().case_range is None, "the case range does not outlive its case"
        maps[mode] = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / mode / "scores" /
                                                                f"{TEST_CASE}_pancreas_tumor.nii.gz")))
    assert np.isfinite(maps["case"]).all() and 0.0 <= maps["case"].min() and maps["case"].max() <= 1.0
    assert not np.allclose(maps["tile"], maps["case"]), "the prompt, and with it the tumour queries, changed"
    with pytest.raises(DSMPredictionError, match="amvp_range"):
        DSMPredictor(["liver"], device=torch.device("cpu"), amvp_range="volume")


def test_short_write_is_an_error_and_leaves_nothing(env: dict, stage2: Path, inputs: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch):
    """A full disk can make SimpleITK return from a short write without error: the prediction stops and
    names the file instead of reporting success over empty files."""
    from nnunetv2_dsm.inference import predictor as predictor_module

    real_write = predictor_module._write_image

    def short_write(image, path):
        real_write(image, path)
        Path(path).write_bytes(Path(path).read_bytes()[:100])

    monkeypatch.setattr(predictor_module, "_write_image", short_write)
    out = tmp_path / "full"
    args = _cli().parse_args(["predict", "-i", str(inputs), "-o", str(out), "-m", str(stage2), "-f", "0",
                              "--prompts", "liver tumor", "--device", "cpu", "--disable-tta"])
    with pytest.raises(DSMPredictionError, match=r"could not write .*anomaly.nii.gz.*free disk space"):
        args.func(args)
    assert not list(out.rglob("*.nii.gz")), "no half-written or finished-looking outputs"


def _cli() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    predict_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_missing_or_truncated_checkpoint_is_a_clear_error(stage2: Path, inputs: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = _cli().parse_args(["predict", "-i", str(inputs), "-o", str(out), "-m", str(stage2), "-f", "3",
                              "--prompts", "liver", "--device", "cpu"])
    with pytest.raises(DSMPredictionError, match=r"no checkpoint_final.pth for fold\(s\) \[3\] .*fold_3.*"
                                                 r"folds with that checkpoint: \[0\]"):
        args.func(args)
    model = tmp_path / "model"
    shutil.copytree(stage2, model)
    checkpoint = model / "fold_0" / "checkpoint_final.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    args = _cli().parse_args(["predict", "-i", str(inputs), "-o", str(out), "-m", str(model), "-f", "0",
                              "--prompts", "liver", "--device", "cpu"])
    with pytest.raises(DSMPredictionError, match=r"fold_0/checkpoint_final.pth: not a readable checkpoint .*"
                                                 r"truncated"):
        args.func(args)
    assert not out.exists(), "nothing is written"


def test_encoder_mismatch_is_a_clear_error(stage2: Path, tmp_path: Path) -> None:
    emb = tmp_path / "other.pt"
    save_embeddings(emb, ["a computerized tomography of a Pancreas Tumor"], torch.eye(1, 384),
                    "openclip:ViT-B-32:sha256-0123456789ab")
    predictor = DSMPredictor(["pancreas tumor"], text_encoder=f"file:{emb}", use_mirroring=False,
                             device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(EncoderMismatchError, match="trained with text encoder"):
        predictor.initialize_from_trained_model_folder(str(stage2), (0,))


def test_output_folder_equal_to_input_folder_is_refused(stage2: Path, inputs: Path) -> None:
    predictor = DSMPredictor(["liver"], use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(stage2), (0,))
    with pytest.raises(DSMPredictionError, match="is the input folder"):
        predictor.predict_folder(inputs, inputs)
    assert sorted(p.name for p in inputs.iterdir()) == [f"{TEST_CASE}_0000.nii.gz"]


def test_bad_inputs_stop_prediction_before_anything_is_written(stage2: Path, inputs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    image = sitk.ReadImage(str(inputs / f"{TEST_CASE}_0000.nii.gz"), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[0, 0, :5] = np.nan
    broken = sitk.GetImageFromArray(array)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(bad / "nan_case_0000.nii.gz"))
    sitk.WriteImage(image, str(bad / "good_case_0000.nii.gz"))
    (bad / "cut_case_0000.nii.gz").write_bytes((inputs / f"{TEST_CASE}_0000.nii.gz").read_bytes()[:5000])
    out = tmp_path / "out"
    predictor = DSMPredictor(["liver"], use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(stage2), (0,))
    with pytest.raises(InputError) as err:
        predictor.predict_folder(bad, out)
    message = str(err.value)
    assert "nan_case_0000.nii.gz" in message and "NaN" in message
    assert "cut_case_0000.nii.gz" in message
    assert "good_case" not in message
    assert not out.exists(), "nothing is written when any input is bad"


def test_killed_prediction_leaves_no_finished_looking_case(stage2: Path, inputs: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """The label map, written last, only appears once every map of the case is complete."""
    from nnunetv2_dsm.inference import predictor as predictor_module

    written = []
    real_write = predictor_module._write_atomic

    def dies_at_the_label_map(image, path):
        if path.name == f"{TEST_CASE}.nii.gz":
            raise KeyboardInterrupt("killed")
        real_write(image, path)
        written.append(path.name)

    monkeypatch.setattr(predictor_module, "_write_atomic", dies_at_the_label_map)
    out = tmp_path / "out"
    predictor = DSMPredictor(["liver", "pancreas tumor"], use_mirroring=False, device=torch.device("cpu"),
                             allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(stage2), (0,))
    with pytest.raises(KeyboardInterrupt):
        predictor.predict_folder(inputs, out)
    assert sorted(written) == sorted([f"{TEST_CASE}_anomaly.nii.gz", f"{TEST_CASE}_liver.nii.gz",
                                      f"{TEST_CASE}_pancreas_tumor.nii.gz"])
    assert not (out / f"{TEST_CASE}.nii.gz").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


def test_stock_nnunet_predict_uses_the_trained_classes(env: dict, stage2: Path, inputs: Path, tmp_path: Path):
    out = tmp_path / "stock"
    run_command([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", DATASET_ID, "-c", "3d_fullres",
          "-f", "0", "-tr", STAGE2, "-p", PLANS, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], env)
    prediction = sitk.ReadImage(str(out / f"{TEST_CASE}.nii.gz"))
    assert _same_geometry(prediction, sitk.ReadImage(str(inputs / f"{TEST_CASE}_0000.nii.gz")))
    num_classes = len(json.loads((stage2 / "dataset.json").read_text())["labels"]) - 1
    assert set(np.unique(sitk.GetArrayFromImage(prediction)).tolist()) <= set(range(num_classes + 1))


def test_prediction_does_not_depend_on_input_orientation(stage2: Path, inputs: Path, tmp_path: Path) -> None:
    """The same case stored RAS (as trained) and LPS gives the same maps, each in its input's own grid."""
    image = sitk.ReadImage(str(inputs / f"{TEST_CASE}_0000.nii.gz"))
    maps = {}
    for code in ("RAS", "LPS"):
        folder = tmp_path / code
        folder.mkdir()
        sitk.WriteImage(sitk.DICOMOrient(image, code), str(folder / f"{TEST_CASE}_0000.nii.gz"))
        out = tmp_path / f"pred_{code}"
        args = _cli().parse_args(["predict", "-i", str(folder), "-o", str(out), "-m", str(stage2), "-f", "0",
                                  "--prompts", "liver tumor", "--device", "cpu", "--disable-tta"])
        assert args.func(args) == 0
        source = sitk.ReadImage(str(folder / f"{TEST_CASE}_0000.nii.gz"))
        maps[code] = []
        for path in (out / f"{TEST_CASE}.nii.gz", out / "scores" / f"{TEST_CASE}_liver_tumor.nii.gz"):
            written = sitk.ReadImage(str(path))
            assert _geometry(written) == _geometry(source), "bit-exact input geometry"
            maps[code].append(sitk.GetArrayFromImage(sitk.DICOMOrient(written, "RAS")))
    assert np.array_equal(maps["RAS"][0], maps["LPS"][0])
    assert np.allclose(maps["RAS"][1], maps["LPS"][1], atol=1e-5)


def test_stage1_queries_organs_only_and_stage2_keeps_them(stage1: Path, stage2: Path) -> None:
    """The spec's stage 1: a query per organ class; tumour classes (seen ones included) have none, so
    stage 2 learns them through its tumour queries and the text only. A stage-1 model asked for a
    tumour class says to train stage 2."""
    model1 = stage1.parent.parent
    dataset = DSMDataset.from_json(json.loads((model1 / "dataset.json").read_text()))
    assert len(dataset.organ_channels) < len(dataset.classes), "the test dataset labels seen tumours"
    for model in (model1, stage2):
        arch = json.loads((model / "plans.json").read_text())["configurations"]["3d_fullres"]["architecture"]
        assert arch["arch_kwargs"]["query_channels"] == dataset.organ_channels
    weights = torch.load(stage1, map_location="cpu", weights_only=False)["network_weights"]
    assert weights["queries.weight"].shape[0] == len(dataset.organ_channels)
    network = _network_from(stage2, DSMTrainerStage2)
    assert network.queried.tolist() == [i in dataset.organ_channels for i in range(len(dataset.classes))]

    tumour = next(dataset.prompts[n] for n in dataset.classes if dataset.is_tumour(n))
    predictor = DSMPredictor([tumour], use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(DSMPredictionError, match="stage 2"):
        predictor.initialize_from_trained_model_folder(str(model1), (0,), "checkpoint_final.pth")
    organ = DSMPredictor([dataset.prompts[dataset.organs[0]]], use_mirroring=False, device=torch.device("cpu"),
                         allow_tqdm=False)
    organ.initialize_from_trained_model_folder(str(model1), (0,), "checkpoint_final.pth")
