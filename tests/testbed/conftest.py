"""Session fixtures: the converted testbed (default cache; the first session converts once, about 40 s)."""

from __future__ import annotations

import pytest

from masquant.testbed.model import load_base_testbed, load_smollm2_reference


@pytest.fixture(scope="session")
def testbed():
    """(model, processor) of testbed-vl with its seeded, untrained vision tower."""
    return load_base_testbed()


@pytest.fixture(scope="session")
def smollm2():
    """(LlamaForCausalLM, tokenizer) of the original SmolLM2-135M-Instruct."""
    return load_smollm2_reference()
