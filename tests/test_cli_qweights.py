"""``jkv generate --weights native`` and ``--quantize``: a quantized tiny GGUF generates through its kept blocks,
a safetensors flag on a GGUF file (and the reverse), quantized weights with --tp and a weight layout without
quantized weights are one-line errors; the dp4a layout generates."""

import re

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers_loading import write_tiny_gguf, write_tiny_safetensors

import jkv.loading
from jkv import cli

TYPES = {kind: Q.Q8_0 for kind in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "q8.gguf"
    write_tiny_gguf(path, np.random.default_rng(1), types=TYPES | {"token_embd": Q.Q8_0})
    return str(path)


def test_native_weights_generate(quantized_gguf, capsys):
    args = ["generate", "the the", "--model", quantized_gguf, "--max-new-tokens", "4", "--raw"]
    assert cli.main([*args, "--weights", "native"]) == 0
    native = capsys.readouterr()
    assert "[4 tokens, length]" in native.err
    assert cli.main(args) == 0
    assert capsys.readouterr().out == native.out  # the same greedy tokens as the dequantized float32 model
    assert cli.main([*args, "--weights", "native", "--weight-layout", "dp4a"]) == 0
    assert "[4 tokens, length]" in capsys.readouterr().err  # the layout's own arithmetic: tokens not compared


@pytest.mark.parametrize(
    "options,message",
    [
        (["--quantize", "q8_0"], r"quantize='q8_0' applies to safetensors directories; '.*q8.gguf' is a GGUF file"),
        (["--weights", "native", "--tp", "2"], "quantized weights .* run on one device"),
        (["--weight-layout", "dp4a"], "--weight-layout dp4a lays out quantized weights: add --weights native"),
    ],
)
def test_quantized_weight_errors(quantized_gguf, capsys, options, message):
    assert cli.main(["generate", "hi", "--model", quantized_gguf, "--quiet", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jkv: error: ") and err.count("\n") == 1 and re.search(message, err), err


def test_native_weights_of_a_directory_name_what_it_takes(tmp_path):
    write_tiny_safetensors(tmp_path, np.random.default_rng(0))
    takes = r"is a safetensors directory, which quantizes at load with quantize= one of \('q8_0', 'q4_k'\)$"
    with pytest.raises(ValueError, match=takes):
        jkv.loading.load(tmp_path, weights="native")
