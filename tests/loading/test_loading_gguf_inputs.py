"""GGUF inputs the other GGUF tests do not name: tensors jkv would not read (llama.cpp reads a Llama's
``attn_output.bias``; a Phi-3 128k file holds its long-rope factors), family keys llama.cpp ignores, and files
jkv cannot read at all (big-endian)."""

import numpy as np
import pytest
from helpers_loading import TINY, write_tiny_gguf

from jkv.loading import ModelLoadError, load_gguf

H = TINY["hidden"]
UNREAD = {
    "o-bias": {f"blk.{i}.attn_output.bias": np.ones(H) for i in range(2)},
    "mlp-bias": {"blk.0.ffn_down.bias": np.ones(H)},
    "qkv-bias-layer1-only": {"blk.1.attn_q.bias": np.ones(H)},
    "longrope-factors": {"rope_factors_long.weight": np.ones(32), "rope_factors_short.weight": np.ones(32)},
}


@pytest.mark.parametrize("case", list(UNREAD))
def test_tensors_jkv_would_not_read_are_refused(case, tmp_path, rng):
    """Dropping a tensor the file holds changes the model (llama.cpp itself refuses a tensor it does not create)."""
    write_tiny_gguf(tmp_path / "m.gguf", rng, extra=UNREAD[case])
    first = sorted(UNREAD[case])[0]
    with pytest.raises(ModelLoadError, match=rf"holds tensors jkv does not read .*'{first}'"):
        load_gguf(tmp_path / "m.gguf", "f32", progress=False, with_tokenizer=False)
