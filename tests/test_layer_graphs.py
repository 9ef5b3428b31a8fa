"""Per-layer CUDA graphs of the offloaded checkpointing path (harness/layer_graphs.py), on CPU.

A CUDA graph cannot be captured on CPU; ``Replay`` stands in for one: capture records the body and
replay runs it again, reading and writing the same static buffers a real graph would. So these tests
check everything around the graph: which calls are captured, the static buffers (copy in, copy out,
sharing across a stack's layers), gradient accumulation into ``.grad``, the fallbacks. The real
capture runs in tests/test_gpu.py.
"""
import pytest
import torch

from harness.checkpointing import enable_checkpointing
from harness.layer_graphs import flatten, unflatten

from .kernels.test_patch import _inputs, _loss_and_grads, _tiny_model

peft = pytest.importorskip("peft")


class Replay:
    """CPU stand-in for a CUDA graph: ``capture`` records the body, ``replay`` runs it again."""

    def __init__(self, pool):
        self.body = None
        self.replays = 0

    def capture(self, body):
        self.body = body
        body()  # a real capture launches nothing; running it once more is harmless here

    def replay(self):
        self.replays += 1
        self.body()


def _graphed(model, warmup=1, compile_backend=None):
    model.train()
    if compile_backend is not None:
        from harness.kernels.compiled import compile_layers, prepare_for_compile

        prepare_for_compile(model)
        compile_layers(model, backend=compile_backend)
    label = enable_checkpointing(model, "unsloth", torch.device("cpu"), force=True, graphs=True)
    assert label == "offloaded (3 layers, CUDA graphs)"
    graphs = model.__dict__["_harness_offloader"].graphs
    graphs._factory = Replay
    graphs.warmup = warmup
    return graphs


def _assert_same(got, ref, rtol=1e-5, atol=1e-6):
    loss, grads = got
    loss_ref, grads_ref = ref
    torch.testing.assert_close(loss, loss_ref, rtol=rtol, atol=atol)
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], grads_ref[n], rtol=rtol, atol=atol, msg=lambda m: f"{n}: {m}")


def test_graphed_layers_match_plain_training_steps():
    """Warm-up step, capture step, replay steps with new data: loss and every LoRA gradient match the
    model without graphs or checkpointing, and each layer got exactly one forward and one backward graph."""
    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    graphs = _graphed(model)
    for step, seed in enumerate([21, 22, 23, 24]):
        inputs = dict(_inputs(seed), use_cache=False)
        _assert_same(_loss_and_grads(model, inputs), _loss_and_grads(ref_model, inputs))
        if step == 0:
            assert graphs.captured == 0 and graphs.replays == 0  # warm-up: the layers ran normally
    assert graphs.failures == []
    assert graphs.captured == 2 * 3  # forward + backward for 2 decoder layers and 1 vision block
    assert graphs.replays == 3 * 2 * 3  # every later step replays all six
    # the decoder layers share one set of static buffers; the vision block has its own
    assert len(graphs.statics) == 2
    assert len(graphs.flat_bufs) == 2  # and one set of flat gradient buffers per stack


def test_graphed_gradients_accumulate_like_autograd():
    """Two backward passes without zero_grad (gradient accumulation): grads add up, as with autograd."""
    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    graphs = _graphed(model, warmup=0)  # captured on the first call

    def two_micro_batches(m):
        m.zero_grad(set_to_none=True)
        for seed in (31, 32):
            m(**dict(_inputs(seed), use_cache=False)).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    got, ref = two_micro_batches(model), two_micro_batches(ref_model)
    assert graphs.replays > 0 and graphs.failures == []
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-5, atol=1e-6)
    # frozen weights stay without gradients
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_graphed_layers_with_compiled_recompute():
    """Compiled layers: the capture runs the compiled forward, also in backward (the autograd engine's
    thread, where the compiler's frame hook is not installed)."""
    torch._dynamo.reset()
    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    graphs = _graphed(model, compile_backend="aot_eager")
    from torch._dynamo.utils import counters

    counters.clear()
    try:
        for seed in (41, 42, 43):
            inputs = dict(_inputs(seed), use_cache=False)
            _assert_same(_loss_and_grads(model, inputs), _loss_and_grads(ref_model, inputs), rtol=1e-4, atol=1e-5)
        assert graphs.failures == [] and graphs.captured == 6
        # per layer stack: the no-grad forward and the recompute (with grad) are compiled, nothing per layer
        assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    finally:
        from harness.kernels.compiled import uncompile_layers

        uncompile_layers(model)


def test_compiled_recompute_without_graphs():
    """Offloaded checkpointing around compiled layers recomputes with the compiled forward."""
    torch._dynamo.reset()
    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    model.train()
    from harness.kernels.compiled import compile_layers, prepare_for_compile, uncompile_layers
    from torch._dynamo.utils import counters

    prepare_for_compile(model)
    compile_layers(model, backend="aot_eager")
    assert enable_checkpointing(model, "unsloth", torch.device("cpu"), force=True) == "offloaded (3 layers)"
    counters.clear()
    try:
        inputs = dict(_inputs(51), use_cache=False)
        _assert_same(_loss_and_grads(model, inputs), _loss_and_grads(ref_model, inputs), rtol=1e-4, atol=1e-5)
        assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])
    finally:
        uncompile_layers(model)


def test_layers_with_dropout_are_not_graphed():
    """A replay draws new random numbers: a layer with dropout keeps running normally."""
    model = _tiny_model()
    for layer in model.base_model.model.model.language_model.layers:
        layer.self_attn.attention_dropout = 0.1
    graphs = _graphed(model, warmup=0)
    for seed in (61, 62):
        _loss_and_grads(model, dict(_inputs(seed), use_cache=False))
    assert graphs.captured == 2  # the vision block (no dropout) only: forward and backward


def test_capture_failure_falls_back_once():
    """A layer that cannot be captured runs normally from then on, with one logged failure."""

    class Failing(Replay):
        def capture(self, body):
            raise RuntimeError("operation not permitted when stream is capturing")

    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    graphs = _graphed(model, warmup=0)
    graphs._factory = Failing
    for seed in (71, 72):
        inputs = dict(_inputs(seed), use_cache=False)
        _assert_same(_loss_and_grads(model, inputs), _loss_and_grads(ref_model, inputs))
    assert graphs.captured == 0 and graphs.replays == 0
    # the first failed capture may leave CUDA state behind: nothing else is captured in the run
    assert len(graphs.failures) == 1 and graphs.failures[0].endswith("(no further captures in this run)")
    assert graphs.stopped and graphs.misses["graphs stopped after a failed capture"] > 0


def test_layers_that_synchronize_are_found_before_capture(monkeypatch):
    """A layer that reads a device value on the host fails the probe (torch's sync debug mode on CUDA;
    here a stand-in guard), runs normally from then on, and nothing is captured for it."""
    import contextlib

    ref_model, model = _tiny_model(), _tiny_model()
    ref_model.train()
    graphs = _graphed(model, warmup=0)
    probing = {"on": False}

    @contextlib.contextmanager
    def guard():
        probing["on"] = True
        try:
            yield
        finally:
            probing["on"] = False

    graphs._sync_guard = guard
    mlp = model.base_model.model.model.visual.blocks[0].mlp
    original = mlp.forward

    def syncing_forward(*args, **kwargs):  # e.g. a .tolist() on a device tensor
        if probing["on"]:
            raise RuntimeError("called a synchronizing CUDA operation")
        return original(*args, **kwargs)

    monkeypatch.setattr(mlp, "forward", syncing_forward)
    for seed in (91, 92, 93):
        inputs = dict(_inputs(seed), use_cache=False)
        _assert_same(_loss_and_grads(model, inputs), _loss_and_grads(ref_model, inputs))
    assert graphs.captured == 2 * 2  # the decoder layers: forward + backward; the vision block: none
    assert not graphs.stopped
    assert sorted(f.split(":")[0] for f in graphs.failures) == ["Qwen2VLVisionBlock backward",
                                                                   "Qwen2VLVisionBlock forward"]


def test_new_shape_gets_its_own_graphs_and_the_limit_holds():
    model = _tiny_model()
    graphs = _graphed(model, warmup=0)
    graphs.max_signatures = 1
    for seed in (80, 81):  # warm-up 0: the backward graphs come at once, the forward ones need a run
        _loss_and_grads(model, dict(_inputs(seed), use_cache=False))
    assert graphs.captured == 6
    longer = _inputs(82)
    for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels"):
        longer[k] = torch.cat([longer[k], longer[k][:, -3:]], dim=1)
    ref = _tiny_model()
    ref.train()
    _assert_same(_loss_and_grads(model, dict(longer, use_cache=False)),
                 _loss_and_grads(ref, dict(longer, use_cache=False)))
    # the vision block's input did not change shape: replayed; the decoder layers hit the limit of 1
    assert graphs.captured == 6


def test_flatten_roundtrip_and_refusals():
    t = torch.randn(2, 3)
    leaves = []
    desc = flatten(((t, None), {"a": (t, t.T), "b": 3, "c": torch.float16}), leaves)
    assert len(leaves) == 3
    back = unflatten(desc, iter(leaves))
    assert back[0][0] is t and back[1]["a"][1] is leaves[2] and back[1]["b"] == 3
    hash(desc)
    with pytest.raises(Exception):
        flatten({"cache": object()}, [])


def test_layer_call_reads_both_transformers_checkpoint_styles():
    """transformers >= 5.2x checkpoints partial(forward, layer, **kw); earlier 5.x partial(super().__call__, **kw)."""
    import functools

    from harness.checkpointing import layer_call

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x, scale=1.0):
            return self.lin(x) * scale

    layer, x = Layer(), torch.randn(2, 3)
    new_style = functools.partial(Layer.forward, layer, scale=2.0)
    old_style = functools.partial(torch.nn.Module.__call__.__get__(layer), scale=2.0)
    for fn in (new_style, old_style):
        got_layer, f, kwargs = layer_call(fn)
        assert got_layer is layer and kwargs == {"scale": 2.0}
        torch.testing.assert_close(f(got_layer, x, **kwargs), layer(x, scale=2.0))
    assert layer_call(lambda h: h) is None


def test_run_summary_reports_the_graphs():
    from harness.checkpointing import graphs_summary as _graphs_summary
    from harness.summary import _graphs_line

    model = _tiny_model()
    graphs = _graphed(model)
    for seed in (101, 102):
        _loss_and_grads(model, dict(_inputs(seed), use_cache=False))
    g = _graphs_summary(model)
    assert g == graphs.summary() and g["captured"] == 6
    assert g["buffer copies"] == {"made": 35, "skipped": 11}  # step 1 warms up, step 2 captures and replays
    assert _graphs_line(g) == "6 captured, 6 replays (11 of 46 input copies skipped)"
    assert "1 layer type(s) without graphs: X forward: boom" in _graphs_line(dict(g, failures=["X forward: boom"]))
    assert _graphs_summary(_tiny_model()) is None


def test_chained_layers_skip_the_copy_in():
    """A stack's next layer is called with the clone of the previous layer's output (forward) or input
    gradient (backward), which the static buffer already holds: that copy is skipped, and so are the
    rotary cos/sin every layer receives. Counted over one replayed step of the tiny model (2 decoder layers,
    1 vision block); the values stay those of the model without graphs (test above)."""
    model = _tiny_model()
    graphs = _graphed(model)
    for seed in (41, 42):  # warm-up, capture
        _loss_and_grads(model, dict(_inputs(seed), use_cache=False))
    made, skipped = graphs.copy_counts()
    _loss_and_grads(model, dict(_inputs(43), use_cache=False))
    made, skipped = graphs.copy_counts()[0] - made, graphs.copy_counts()[1] - skipped
    # made: forward, every input of the first layer of each stack (vision 4, decoder 3); backward, the
    # reloaded input of each layer (3) and the output gradient of the last layer of each stack (2)
    assert (made, skipped) == (12, 11)
    for st in graphs.statics.values():  # the buffers doing double duty
        assert st.outputs[0] is st.inputs[0] and any(st.grad_in is g[0] for g in st.grad_outs.values())


def test_a_buffer_is_reused_only_for_the_tensor_it_holds():
    from harness.layer_graphs import _Statics

    src = torch.randn(4, 6)
    st = _Statics([torch.empty(4, 6)])
    st.copy_in([src])
    st.copy_in([src.detach()])  # the same memory, layout and version: skipped
    assert (st.copies, st.skipped) == (1, 1)
    src.mul_(2)  # changed in place: the version counter moved
    st.copy_in([src])
    assert st.copies == 2 and torch.equal(st.inputs[0], src)
    st.copy_in([src.clone()])  # equal values, other memory
    st.copy_in([src.t().contiguous().t()])  # other layout
    assert st.copies == 4
    twin = src.clone()
    st.copy_in([twin])
    alias = twin.detach()  # same memory, layout and version as twin (and no reference to it)
    st.copy_in([alias])
    assert st.copies == 5
    del twin  # the tensor the buffer recorded is gone: its memory is no longer trusted, even through alias
    st.copy_in([alias])
    assert st.copies == 6
    st.handed_out(st.inputs[0], None)  # a replay overwrote the buffer and handed nothing out
    st.copy_in([alias])
    assert st.copies == 7 and torch.equal(st.inputs[0], alias)


def test_grouped_copy_copies_every_pair_whatever_its_strides():
    from harness.layer_graphs import _grouped_copy

    flat = torch.zeros(3 * 8 + 5 * 3)
    dst = [flat[:24].view(3, 8), flat[24:].view(5, 3)]
    src = [torch.randn(3, 8), torch.randn(3, 5).t()]  # the second one transposed, like a LoRA B gradient
    _grouped_copy(dst, src)
    for d, s in zip(dst, src):
        torch.testing.assert_close(d, s, rtol=0, atol=0)
    _grouped_copy([], [])  # nothing to copy: no launch, no error
