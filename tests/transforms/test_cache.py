"""CachedSuiteFeatures fills the feature cache and gives back only the images' keys: the
features stay in the cache (issue 22: the FnApiRunner materialises every Flatten, so merging
cached and fresh *features* held every reference image's features of a run at once).
Checked on a cold cache (every image extracted), a warm one (none), and a damaged entry
(extracted and written again, as ``FeatureCache.get`` promises)."""
from __future__ import annotations

import hashlib

import apache_beam as beam
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from pipeline.core.feature_cache import FeatureCache
from pipeline.model.backbone import tiny_spec
from tests.beamtest import counter, mrow, offline_pipeline
from transforms.cache import CachedSuiteFeatures, cache_identities, clip_suite
from transforms.images import LoadImages


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("images")
    out = []
    for i in range(3):
        path = folder / f"r{i}.png"
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(path)
        out.append(mrow(f"r{i}", uri=str(path)))
    return out


def _sha(row) -> str:
    with open(row.image_uri, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _fill(rows: list, root: str):
    """Run CachedSuiteFeatures over ``rows``; its result and what came out of it."""
    suite = clip_suite(tiny_spec())
    p = offline_pipeline()
    images = p | beam.Create(rows) | LoadImages(suite)
    out = images["images"] | CachedSuiteFeatures(root, suite, batch_size=2, references=True)
    # Only the (row, sha256) keys come out: no tensor, whatever the cache held.
    assert_that(out["stored"], equal_to([(r, _sha(r)) for r in rows]), label="Keys")
    assert_that(out["errors"], equal_to([]), label="NoErrors")
    result = p.run()
    result.wait_until_finish()
    return result


def _cache(root: str) -> FeatureCache:
    (identity,) = cache_identities(clip_suite(tiny_spec()), references=True).values()
    return FeatureCache(root, identity)


def test_a_cold_cache_is_filled_and_a_warm_one_is_not_extracted_again(rows, tmp_path):
    root = str(tmp_path / "cache")
    cold = _fill(rows, root)
    assert (counter(cold, "feature_cache_misses"), counter(cold, "feature_cache_hits")) == (3, 0)
    assert all(_cache(root).get(_sha(r)) for r in rows)
    warm = _fill(rows, root)
    assert (counter(warm, "feature_cache_misses"), counter(warm, "feature_cache_hits")) == (0, 3)
    assert counter(warm, "num_inferences") == 0


def test_a_damaged_entry_is_extracted_and_written_again(rows, tmp_path):
    root = str(tmp_path / "cache")
    _fill(rows, root)
    cache = _cache(root)
    with open(cache._local(_sha(rows[1])), "wb") as f:
        f.write(b"not safetensors")
    again = _fill(rows, root)
    assert (counter(again, "feature_cache_misses"), counter(again, "feature_cache_hits")) == (1, 2)
    assert cache.get(_sha(rows[1])) is not None
