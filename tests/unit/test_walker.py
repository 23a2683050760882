"""The layer walker reproduces each model's own forward pass, layer by layer."""

from __future__ import annotations

import pytest
import torch

from masquant.adapters import get_adapter
from masquant.calibration.stats import RunningInputStats
from masquant.engine.walker import StackWalker, capture_stack_inputs
from support.tiny import MODEL_TYPES, prompts, text_prompt, tiny


def _final_norm_input(model, adapter, batch):
    seen = {}
    h = adapter.final_norm().register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach()))
    with torch.no_grad():
        model(**batch, use_cache=False)
    h.remove()
    return seen["x"]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_walk_equals_forward(model_type):
    """Walking the decoder from the captured inputs gives the model's own last hidden state (before the
    final norm), on prompts with an image (and audio) between text, and on a text-only prompt."""
    model, processor, cls = tiny(model_type)
    adapter = get_adapter(model)
    batches = prompts(processor, cls, 2, seed=3) + [text_prompt(processor, 1)]
    captured = capture_stack_inputs(model, adapter.decoder_stack(), batches, "cpu")
    walker = StackWalker(adapter.decoder_stack(), captured, "cpu")
    for _ in walker:
        pass
    for batch, h in zip(batches, walker.final_hidden()):
        ref = _final_norm_input(model, adapter, batch)
        torch.testing.assert_close(h, ref, rtol=1e-5, atol=1e-5)
        assert adapter.modality_masks(batch["input_ids"])["text"].sum() > 0


def test_gemma3_layers_get_their_own_masks_and_rotary_embeddings():
    model, processor, cls = tiny("gemma3")
    captured = capture_stack_inputs(model, get_adapter(model).decoder_stack(), prompts(processor, cls, 1), "cpu")
    kw = [call.kwargs for call in captured.samples[0].calls]
    sliding, full = kw[0], kw[1]
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    assert kw[0]["position_embeddings"][0] is kw[2]["position_embeddings"][0]  # stored once per layer type


def test_qwen3vl_deepstack_is_applied_between_layers():
    model, processor, cls = tiny("qwen3_vl")
    adapter = get_adapter(model)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 1), "cpu")
    state = captured.samples[0].between
    assert state is not None and len(state["deepstack_visual_embeds"]) == 2
    assert int(state["visual_pos_masks"].sum()) == int(captured.samples[0].masks["vision"].sum())
    # without the between-layer step the walk would differ from the forward pass
    h = captured.samples[0].hidden
    assert not torch.equal(adapter.after_layer(0, h, state), h)
    assert torch.equal(adapter.after_layer(2, h, state), h)


def test_qwen25vl_captured_positions_are_those_of_generate():
    """Layer inputs captured for calibration equal what generate's prefill passes (M-RoPE included)."""
    model, processor, cls = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    batch = prompts(processor, cls, 1)[0]
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append(dict(kwargs))

    captured = capture_stack_inputs(model, adapter.decoder_stack(), [batch], "cpu").samples[0]
    h = adapter.decoder_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    h.remove()
    torch.testing.assert_close(seen[0]["position_embeddings"][0], captured.calls[0].kwargs["position_embeddings"][0])
    # without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions: the inputs must carry it
    no_types = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
    fallback = capture_stack_inputs(model, adapter.decoder_stack(), [no_types], "cpu").samples[0]
    assert not torch.allclose(fallback.calls[0].kwargs["position_embeddings"][0],
                              captured.calls[0].kwargs["position_embeddings"][0])


def test_quantized_stream_follows_the_modified_layer_and_fp_stream_the_original():
    model, processor, cls = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 2), "cpu")
    ref = StackWalker(adapter.decoder_stack(), captured, "cpu")
    ref_out = [step.fp_outputs for step in ref]
    walker = StackWalker(adapter.decoder_stack(), captured, "cpu", quantized_stream=True)
    for i, step in enumerate(walker):
        for y, r in zip(step.fp_outputs, ref_out[i]):
            torch.testing.assert_close(y, r)  # the FP stream never sees the change
        with torch.no_grad():
            adapter.linears(step.layer)["down"].weight.mul_(0.5)  # the method changes the layer
        q = step.quant_outputs()
        assert all(not torch.allclose(a, b) for a, b in zip(q, step.fp_outputs))


def test_observers_see_each_modalitys_rows():
    model, processor, cls = tiny("qwen2_5_omni_thinker")
    adapter = get_adapter(model)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 2), "cpu")
    seen = {}

    def observers(step):
        seen[step.index] = RunningInputStats.for_block(step.stack, step.block, ("text", "vision", "audio"))
        return [seen[step.index]]

    for _ in StackWalker(adapter.decoder_stack(), captured, "cpu", fp_observers=observers):
        pass
    counts = captured.token_counts()
    for stats in seen.values():
        for group in ("qkv", "o", "gate_up", "down"):
            per = stats.stats[group]
            assert per["all"].count == sum(counts.values())
            assert all(per[m].count == counts[m] for m in ("text", "vision", "audio"))
            assert torch.equal(per["all"].absmax, torch.maximum(torch.maximum(per["text"].absmax, per["vision"].absmax),
                                                                per["audio"].absmax))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_block_calls_replay_the_attention_and_mlp_as_the_layer_calls_them(model_type):
    """step.block_calls(block) records the block's own arguments (position embeddings, masks; the post-norm
    input of the MLP); replaying them gives the block's outputs inside the layer's forward."""
    model, processor, cls = tiny(model_type)
    adapter = get_adapter(model)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 2, seed=3), "cpu")
    for step in StackWalker(adapter.decoder_stack(), captured, "cpu"):
        for block in (adapter.attention(step.layer), adapter.mlp(step.layer)):
            seen = []
            h = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
            calls = step.block_calls(block)
            h.remove()
            assert len(calls) == len(seen) == 2
            with torch.no_grad():
                for call, ref in zip(calls, seen):
                    torch.testing.assert_close(call.run(block, "cpu"), ref, rtol=1e-6, atol=1e-6)
                    assert torch.equal(call.run(block, "cpu", x=call.input), call.run(block, "cpu"))
        x = 2 * calls[0].input  # the MLP takes its input positionally: x replaces it
        torch.testing.assert_close(calls[0].run(block, "cpu", x=x), block(x))


def test_block_calls_and_outputs_are_the_block_calls_and_the_outputs_of_the_same_pass():
    model, processor, cls = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    captured = capture_stack_inputs(model, adapter.decoder_stack(), prompts(processor, cls, 2, seed=3), "cpu")
    step = next(iter(StackWalker(adapter.decoder_stack(), captured, "cpu")))
    for block in (adapter.attention(step.layer), adapter.mlp(step.layer)):
        seen = []
        h = block.register_forward_hook(lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out))
        calls, outputs = step.block_calls_and_outputs(block)
        h.remove()
        assert len(calls) == len(outputs) == len(seen) == 2
        for out, ref, call, plain in zip(outputs, seen, calls, step.block_calls(block)):
            assert torch.equal(out, ref) and out.data_ptr() != ref.data_ptr()  # a copy of what the block returned
            assert torch.equal(call.input, plain.input)
