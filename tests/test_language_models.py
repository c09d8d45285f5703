"""Language models on other shapes than the example's, and `.train()` / `.eval()` on results.

Decoders from four families, built from tiny configs with random weights (nothing downloaded),
are optimized once at (batch 2, seq 8) and must match eager at other batch and sequence sizes;
small hand-written models cover the `dynamic=` option, the report's shape lines and the modes.
"""
from __future__ import annotations

import io
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import optimize, verify
from fxrewrite import ModeError

from conftest import ids, notes, skipped

FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "gemma": "Gemma", "mistral": "Mistral"}


def tiny_decoder(family: str) -> nn.Module:
    t = pytest.importorskip("transformers")
    prefix = FAMILIES[family]
    cfg = getattr(t, f"{prefix}Config")(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        vocab_size=128, attn_implementation="sdpa")
    torch.manual_seed(0)
    return getattr(t, f"{prefix}ForCausalLM")(cfg).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def decoder(request):
    """(eager model, its optimized form at batch 2, seq 8), built once per family."""
    model = tiny_decoder(request.param)
    return model, optimize(model, ids(2, 8))


@pytest.mark.parametrize("batch, seq", [(3, 13), (1, 5)])
def test_decoder_matches_eager_on_other_shapes(decoder, batch, seq):
    model, fast = decoder
    result = verify(model, fast, ids(batch, seq), rtol=1e-4, raise_on_fail=False)
    assert result.max_rel < 1e-4, str(result)


def test_decoder_reports_batch_and_sequence_dynamic(decoder):
    _, fast = decoder
    shapes = notes(fast, "capture")
    pattern = r"input_ids \[s\d+, s\d+\]: dynamic axes 0 \(s\d+\), 1 \(s\d+\)"
    assert any(re.fullmatch(pattern, n) for n in shapes), shapes


def test_decoder_evals_and_refuses_train(decoder):
    _, fast = decoder
    assert fast.eval() is fast and not fast.training
    for call in (lambda: fast.train(), lambda: fast.train(True)):
        with pytest.raises(ModeError, match="inference-only: torch.export traced it in eval mode.*train the original"):
            call()
    assert not fast.training
    assert any(n.startswith("fixed in eval mode: torch.export") for n in notes(fast, "capture"))


# ---------------------------------------------------------------- dynamic= on small models

class TokenModel(nn.Module):
    """Embeds token ids, masks and projects: called with keywords, so torch.export captures it."""

    def __init__(self, p=0.0):
        super().__init__()
        self.embed, self.drop, self.proj = nn.Embedding(50, 16), nn.Dropout(p), nn.Linear(16, 4)

    def forward(self, input_ids, attention_mask):
        x = self.drop(self.embed(input_ids))
        return self.proj(x * attention_mask[..., None].to(x.dtype))


def tokens(batch, seq, mask_dtype=torch.int64):
    return {"input_ids": torch.randint(0, 50, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=mask_dtype)}


def shape_lines(fast):
    return {n.split(" [")[0]: n for n in notes(fast, "capture") if n.startswith(("input_ids [", "attention_mask ["))}


def test_integer_inputs_get_batch_and_sequence_dynamic():
    model = TokenModel().eval()
    fast = optimize(model, tokens(2, 6))
    lines = shape_lines(fast)
    for name in ("input_ids", "attention_mask"):
        assert re.fullmatch(name + r" \[s\d+, s\d+\]: dynamic axes 0 \(s\d+\), 1 \(s\d+\)", lines[name]), lines
    x = tokens(3, 9)
    torch.testing.assert_close(fast(**x), model(**x))


def test_a_float_input_keeps_its_batch_only_and_the_report_says_what_that_fixed():
    fast = optimize(TokenModel().eval(), tokens(2, 6, torch.float32))
    lines = shape_lines(fast)
    assert re.fullmatch(r"attention_mask \[(s\d+), 6\]: dynamic axes 0 \(\1\); static axes 1 \(not asked for: "
                        r"dynamic= changes that\)", lines["attention_mask"]), lines
    assert lines["input_ids"].endswith("axis 1 specialised to 6: the model needs that size, or ties it to a static "
                                       "axis of another input"), lines


def test_dynamic_false_specialises_every_axis():
    fast = optimize(TokenModel().eval(), tokens(2, 6), dynamic=False)
    assert shape_lines(fast)["input_ids"] == "input_ids [2, 6]: no dynamic axis; static axes 0, 1 (not asked for: " \
                                            "dynamic=False)"
    with pytest.raises(Exception, match="Guard failed|Expected input"):
        fast(**tokens(2, 7))


def test_declared_axes_share_one_symbol_per_name():
    model = TokenModel().eval()
    fast = optimize(model, tokens(2, 6, torch.float32), dynamic={"input_ids": {1: "seq"}, "attention_mask": {1: "seq"}})
    lines = shape_lines(fast)
    symbol = re.fullmatch(r"input_ids \[2, (s\d+)\]: dynamic axes 1 \(\1\); static axes 0 \(not asked for: "
                          r"dynamic= changes that\)", lines["input_ids"])
    assert symbol, lines
    assert lines["attention_mask"].startswith(f"attention_mask [2, {symbol[1]}]: dynamic axes 1 ({symbol[1]})")
    x = tokens(2, 11, torch.float32)
    torch.testing.assert_close(fast(**x), model(**x))
    with pytest.raises(Exception, match="Guard failed|Expected input"):
        fast(**tokens(3, 6, torch.float32))


def test_dynamic_mistakes_fail_before_capture():
    with pytest.raises(ValueError, match="not among the example inputs"):
        optimize(TokenModel(), tokens(2, 6), dynamic={"ids": [1]})
    with pytest.raises(ValueError, match="out of range"):
        optimize(TokenModel(), tokens(2, 6), dynamic={"input_ids": [2]})
    with pytest.raises(TypeError, match="dynamic must be"):
        optimize(TokenModel(), tokens(2, 6), dynamic="batch")


class Untraceable(nn.Module):
    """Branches on a size (symbolic_trace cannot), and flattens to a fixed width: torch.export
    captures it, with the last axes fixed by the reshape."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        if x.shape[0] > 0:
            x = x * 2
        return self.fc(x.reshape(x.shape[0], 12))


def test_positional_axes_and_the_reason_for_a_specialised_one():
    fast = optimize(Untraceable().eval(), (torch.randn(2, 3, 4),), dynamic={0: [0, 1]})
    line = next(n for n in notes(fast, "capture") if n.startswith("x ["))
    assert re.fullmatch(r"x \[s\d+, 3, 4\]: dynamic axes 0 \(s\d+\); axis 1 specialised to 3: the model needs that "
                        r"size, or ties it to a static axis of another input; static axes 2 \(not asked for: "
                        r"dynamic= changes that\)", line), line
    # an example batch of 1 is traced at batch 2 (export would fix a size of 1): the batch stays dynamic
    model = Untraceable().eval()
    single = optimize(model, (torch.randn(1, 3, 4),))
    assert "traced at size 2 on input 0 axis 0 (the example's size 1 repeated): export would fix a size of 1" \
        in notes(single, "capture")
    assert re.match(r"x \[s\d+, 3, 4\]: dynamic axes 0", next(n for n in notes(single, "capture") if n.startswith("x [")))
    for batch in (1, 5):
        x = torch.randn(batch, 3, 4)
        torch.testing.assert_close(single(x), model(x), rtol=0, atol=0)


def test_a_decoder_captured_on_a_single_token_runs_at_any_batch_and_length():
    """A decode-step example, batch 1 and one token: both axes would be fixed at 1 by export;
    traced at size 2 on both (checked at 1), the result serves prompts and batches too."""
    from conftest import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama()
    fast = optimize(model, {"input_ids": torch.randint(0, 100, (1, 1))})
    assert "traced at size 2 on input_ids axes 0, 1 (the example's size 1 repeated): export would fix a size " \
           "of 1" in notes(fast, "capture"), notes(fast, "capture")
    for batch, seq in ((1, 1), (1, 5), (3, 13)):
        ids = torch.randint(0, 100, (batch, seq))
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)


def test_a_decoder_captured_at_batch_1_runs_at_other_batches():
    """transformers' mask code compares the batch with position ids' batch, which at an example
    batch of 1 fixed the batch at 1; traced at batch 2, the result runs at any batch."""
    from conftest import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama()
    fast = optimize(model, {"input_ids": torch.randint(0, 100, (1, 8))})
    for batch, seq in ((1, 5), (3, 13)):
        ids = torch.randint(0, 100, (batch, seq))
        with torch.no_grad():
            torch.testing.assert_close(fast(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                       rtol=1e-4, atol=1e-5)


def test_symbolic_trace_is_reported_shape_generic():
    fast = optimize(nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4))
    assert any(re.fullmatch(r"symbolic_trace: \d+ nodes, shape-generic .*", n) for n in notes(fast, "capture"))
    assert fast(torch.randn(5, 3, 4)).shape == (5, 3, 4)


# ---------------------------------------------------------------- train / eval

class DropBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.drop(self.relu(self.bn(self.conv(x))).mean((2, 3))))


def test_swaps_on_a_training_mode_trace_keep_dropout_and_batchnorm_following_the_mode():
    model, x = DropBlock().train(), torch.randn(4, 3, 8, 8)
    fast = optimize(model, x, passes=["swap_smelu"])
    assert fast.report.count("relu_to_smelu") == 1
    assert {r.node for r in skipped(fast, "canonicalize")} == {"bn", "drop"}
    assert "captured in training mode; .train()/.eval() switch the modules that follow the mode: bn, drop" in \
        notes(fast, "capture")
    assert fast.eval() is fast and not fast.drop.training and not fast.bn.training
    torch.testing.assert_close(fast(x), fast(x))  # no dropout, running statistics
    fast.train()
    assert fast.drop.training and not torch.equal(fast(x), fast(x))
    torch.save(fast, io.BytesIO())  # the mode guard lives on the result's class, not in its __dict__


def test_exact_folds_make_a_traced_result_inference_only():
    fast = optimize(DropBlock().eval(), torch.randn(2, 3, 8, 8))
    assert fast.eval() is fast
    with pytest.raises(ModeError, match=r"inference-only: fold_batchnorm, remove_identity rewrote it in eval mode"
                                        r".*train the original model.*swap passes only"):
        fast.train()
    assert "fixed in eval mode: fold_batchnorm, remove_identity rewrote it in eval mode (BatchNorm folded, dropout " \
           "removed, branches merged); .train() raises" in notes(fast, "capture")


def test_swaps_on_an_eval_mode_trace_still_train_and_say_what_stays_in_eval_mode():
    class FunctionalDropout(DropBlock):
        def forward(self, x):
            return F.dropout(super().forward(x), 0.5, self.training)

    model, x = FunctionalDropout().eval(), torch.randn(2, 3, 8, 8)
    fast = optimize(model, x, passes=["swap_smelu"])
    assert "captured in eval mode; .train()/.eval() switch no module; these keep eval-mode behaviour whatever the " \
           "mode: bn (became ops), drop (became ops), FunctionalDropout (its forward reads self.training, traced " \
           "once)" in notes(fast, "capture")
    assert fast.train() is fast and fast.training  # fine-tuning the swapped activations stays possible
    torch.testing.assert_close(fast(x), fast(x))


def test_training_mode_export_says_what_it_kept_and_refuses_eval():
    fast = optimize(TokenModel(p=0.3).train(), tokens(2, 6))
    assert "fixed in training mode: torch.export traced that mode; kept as training ops: 1 dropout; .eval() raises" \
        in notes(fast, "capture")
    assert fast.train() is fast
    with pytest.raises(ModeError, match="fixed in training mode.*optimize model.eval\\(\\)"):
        fast.eval()


def test_bfloat16_decoder_lowered_matches_eager_within_its_rounding():
    """A bfloat16 decoder through optimize with the lowering, at another sequence length: within
    bfloat16 rounding as `verify` judges it (the dtype's own tolerance)."""
    from conftest import tiny_llama
    torch.manual_seed(0)
    model = tiny_llama().to(torch.bfloat16)
    fast = optimize(model, {"input_ids": torch.randint(0, 100, (2, 8))}, lower="triton")
    assert fast.report.count("lower_triton") == 7, fast.report  # 5 norm regions, one GLU per layer
    verify(model, fast, {"input_ids": torch.randint(0, 100, (3, 13))})
