"""The numpy tail of the views' transforms gives torchvision's ``ToTensor`` + ``Normalize``
bit for bit (torchvision's own steps are the reference: fp32 scores must not move)."""
import copy
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.model.backbone import describe, tiny_spec
from pipeline.model.pixels import NormalizedTensor, host_normalizing
from pipeline.model.scorers.cnn import CnnSpec, cnn_preprocess
from pipeline.model.scorers.dino import dino_preprocess

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def _images(n=12, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(40, 300, 2))
        yield Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    yield Image.new("RGB", (64, 48), (0, 0, 0))  # the extremes of the uint8 range
    yield Image.new("RGB", (64, 48), (255, 255, 255))


def _torchvision(mean, std):
    return T.Compose([T.Resize(64, antialias=True), T.CenterCrop(64), T.ToTensor(),
                      T.Normalize(mean, std)])


@pytest.mark.parametrize("mean,std", [(CLIP_MEAN, CLIP_STD),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
def test_equals_torchvision_bit_for_bit(mean, std):
    reference = _torchvision(mean, std)
    ours = host_normalizing(_torchvision(mean, std))
    assert any(isinstance(t, NormalizedTensor) for t in ours.transforms)
    for image in _images():
        want, got = reference(image), ours(image)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, want)


@pytest.mark.parametrize("mean,std", [(CLIP_MEAN, CLIP_STD),
                                      ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                      ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
def test_every_uint8_value_of_every_channel(mean, std):
    """The pixels come from a per-channel table of the 256 values: an image holding every
    value in every channel, in a different order per channel, checks the whole table against
    torchvision's ToTensor + Normalize."""
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rgb = np.stack([ramp, ramp.T, ramp[::-1]], axis=-1)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    want = T.Normalize(mean, std)(T.ToTensor()(image))
    got = NormalizedTensor(T.ToTensor(), T.Normalize(mean, std))(image)
    assert got.shape == (3, 16, 16) and got.dtype == torch.float32 and got.is_contiguous()
    assert torch.equal(got, want)


def test_the_jobs_views_take_it_and_keep_their_pixels():
    """CLIP (open_clip's own transform), the CNN and DINO views: each against the same
    transform with torchvision's steps put back."""
    views = [describe(tiny_spec()).preprocess,
             cnn_preprocess(CnnSpec("resnet18", "random:0", (4, 8, 16))),
             dino_preprocess(56, True, (14, 14), CLIP_MEAN, CLIP_STD)]
    for view in views:
        steps = view.transforms
        (i,) = [j for j, t in enumerate(steps) if isinstance(t, NormalizedTensor)]
        reference = copy.deepcopy(view)
        reference.transforms[i:i + 1] = [steps[i].to_tensor, steps[i].normalize]
        for image in _images(4):
            assert torch.equal(view(image), reference(image))


def test_other_inputs_go_through_torchvision():
    grey = Image.fromarray(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64) % 251)
    one = NormalizedTensor(T.ToTensor(), T.Normalize((0.5,), (0.25,)))
    assert torch.equal(one(grey), T.Normalize((0.5,), (0.25,))(T.ToTensor()(grey)))
    tail = NormalizedTensor(T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD))
    with pytest.raises(RuntimeError):  # one channel, three means: torchvision refuses it
        tail(grey)
    with pytest.raises(TypeError):  # torchvision's ToTensor refuses a tensor, and so do we
        tail(torch.zeros(3, 4, 4))


def test_pickles_and_leaves_other_transforms_alone():
    tail = pickle.loads(pickle.dumps(NormalizedTensor(T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD))))
    image = next(_images(1))
    assert torch.equal(tail(image), T.Normalize(CLIP_MEAN, CLIP_STD)(T.ToTensor()(image)))
    no_pair = T.Compose([T.ToTensor(), T.CenterCrop(8), T.Normalize(CLIP_MEAN, CLIP_STD)])
    assert not any(isinstance(t, NormalizedTensor) for t in host_normalizing(no_pair).transforms)
    plain = lambda image: image  # noqa: E731 - not a Compose
    assert host_normalizing(plain) is plain
