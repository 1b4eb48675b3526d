"""EncodePrompts: a category's prompt ensemble is encoded once per process, and a later run
in the same process reuses exactly those features (the text tower's cost is a run's largest
fixed cost on the CPU)."""
import apache_beam as beam
import pytest
import torch

from pipeline.model.backbone import get_backbone, tiny_spec
from pipeline.model.inctrl import encode_prompt_pair
from pipeline.model.prompts import prompts_for
from pipeline.model.shared import clear
from tests.beamtest import counter, mrow, offline_pipeline
from transforms.prompts import PROMPT_PAIRS, EncodePrompts, encoded_prompt_pair


@pytest.fixture
def no_prompt_pairs():
    clear(PROMPT_PAIRS)
    yield
    clear(PROMPT_PAIRS)


_GOT: dict = {}  # what the last _run's pipeline yielded (module level: its steps are pickled)


def _keep(pair) -> None:
    _GOT[pair[0]] = pair[1]


def _run(spec, categories, cache_root=None):
    """EncodePrompts over rows of ``categories``: ({category: text}, the result)."""
    _GOT.clear()
    p = offline_pipeline()
    _ = (p | beam.Create([mrow(f"i{i}", category=c) for i, c in enumerate(categories)])
         | EncodePrompts(spec, frozenset(), cache_root=cache_root)
         | beam.Map(_keep))
    result = p.run()
    result.wait_until_finish()
    return dict(_GOT), result


def test_a_later_run_reuses_the_process_encoding(no_prompt_pairs):
    spec = tiny_spec()
    first, r1 = _run(spec, ["wood", "wood", "screw"])
    second, r2 = _run(spec, ["screw", "wood"])
    assert counter(r1, "prompt_sets_encoded") == 2 and counter(r1, "prompt_sets_reused") == 0
    assert counter(r2, "prompt_sets_encoded") == 0 and counter(r2, "prompt_sets_reused") == 2
    backbone = get_backbone(spec)
    for category in ("wood", "screw"):
        fresh = encode_prompt_pair(backbone, *prompts_for(category)).cpu()
        assert torch.equal(first[category], fresh)  # fp32: bit-identical to encoding anew
        assert torch.equal(second[category], fresh)


def test_the_disk_cache_comes_first_and_is_filled_from_the_process(no_prompt_pairs, tmp_path):
    spec = tiny_spec()
    _run(spec, ["wood"])  # the process has it; the disk cache is empty
    got, result = _run(spec, ["wood"], cache_root=str(tmp_path))
    assert counter(result, "prompt_sets_reused") == 1
    again, result = _run(spec, ["wood"], cache_root=str(tmp_path))
    assert counter(result, "prompt_sets_from_cache") == 1
    assert counter(result, "prompt_sets_reused") == counter(result, "prompt_sets_encoded") == 0
    assert torch.equal(got["wood"], again["wood"])


def test_the_entry_is_keyed_by_spec_and_texts_and_cannot_be_changed(no_prompt_pairs):
    spec = tiny_spec()
    normal, anomalous = prompts_for("wood")
    a, encoded = encoded_prompt_pair(spec, normal, anomalous)
    assert encoded
    a.zero_()  # a consumer's copy: the process's entry is untouched
    b, encoded = encoded_prompt_pair(spec, normal, anomalous)
    assert not encoded and b.abs().sum() > 0
    _, encoded = encoded_prompt_pair(spec, normal[:-1], anomalous)  # other texts
    assert encoded
    _, encoded = encoded_prompt_pair(tiny_spec(precision="bf16"), normal, anomalous)
    assert encoded  # another spec (here its precision) is another entry
