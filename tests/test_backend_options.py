"""The backend table and the typed backend options: one options object per backend, validated in one
place, reaching sequence_logprobs, fused_sdpo_loss, candidate_logprobs, candidate_sdpo_loss and the
trainer's configuration."""

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import sdpo_fast
from references import reference_logps
from sdpo_fast import backends
from sdpo_fast.kernels.options import OptionError, fields_for
from sdpo_fast.logprobs import backend_options


def test_every_backend_module_follows_the_contract():
    for name in backends.available("logprobs"):
        impl = backends.implementation("logprobs", name)
        assert dataclasses.is_dataclass(impl.Options) and impl.Options.__dataclass_params__.frozen, name
        assert isinstance(impl.DW_PRECISION, str) and impl.DW_PRECISION, name
        assert callable(impl.forward) and callable(impl.backward), name
        for f in dataclasses.fields(impl.Options):
            assert set(f.metadata["ops"]) <= {"logprobs", "sdpo_loss"} and f.metadata["doc"] is not None, (name, f.name)


def test_options_resolve_with_device_defaults_and_one_error_type():
    opts = backend_options("logprobs", "torch", "cpu", {"chunk_rows": 3})
    assert opts.chunk_rows == 3
    if "cublas" in backends.available("logprobs"):
        cublas = backends.implementation("logprobs", "cublas").Options
        from sdpo_fast.kernels.options import resolve

        assert resolve(cublas, "cublas", "logprobs", "cuda", None).chunk_bytes == 192 << 20
        assert resolve(cublas, "cublas", "logprobs", "cpu", None).chunk_bytes == 1 << 20
    for bad in ({"chunk_rows": 0}, {"nope": 1}):
        with pytest.raises(OptionError):
            backend_options("logprobs", "torch", "cpu", bad)
    # OptionError is both: the historical ValueError (bad value) and TypeError (unknown keyword)
    assert issubclass(OptionError, ValueError) and issubclass(OptionError, TypeError)


@pytest.mark.skipif("native" not in backends.available("sdpo_loss"), reason="no native extension")
def test_native_options_belong_to_their_op():
    native = backends.implementation("logprobs", "native").Options
    assert "tile_elements" in fields_for(native, "sdpo_loss") and "tile_elements" not in fields_for(native, "logprobs")
    assert "keep_elements" in fields_for(native, "logprobs") and "keep_elements" not in fields_for(native, "sdpo_loss")


def test_an_explicit_unavailable_backend_names_the_reason(monkeypatch):
    def broken():
        raise ImportError("no compiler here")

    monkeypatch.setitem(backends.TABLE, "logprobs", {**backends.TABLE["logprobs"], "native": broken})
    monkeypatch.setattr(backends, "_loaded", {})
    monkeypatch.setattr(backends, "_unavailable", {})
    with pytest.warns(UserWarning, match="no compiler here"):
        assert backends.resolve("logprobs", "auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="no compiler here"):
        backends.resolve("logprobs", "native", "cpu")


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float()


def test_options_reach_the_model_level_api():
    """chunk_rows=1 (one logit row per chunk) gives the same log-probs and loss as the default, and a bad
    option raises from inside candidate_logprobs / candidate_sdpo_loss: the options arrive."""
    model = tiny_model()
    groups = [([1, 2, 3], [[4, 5], [6], [7, 8, 9]]), ([10], [[11], [12, 13]])]
    batch = sdpo_fast.pack_groups(groups, vocab_size=61)
    base = sdpo_fast.candidate_logprobs(model, batch, backend="torch")
    chunked = sdpo_fast.candidate_logprobs(model, batch, backend="torch", options={"chunk_rows": 1})
    torch.testing.assert_close(chunked, base, rtol=0, atol=1e-6)
    with pytest.raises(OptionError, match="chunk_rows"):
        sdpo_fast.candidate_logprobs(model, batch, backend="torch", options={"chunk_rows": -1})
    ref = base.detach() - 0.5
    loss_a, _ = sdpo_fast.candidate_sdpo_loss(model, batch, ref, backend="torch")
    loss_b, _ = sdpo_fast.candidate_sdpo_loss(model, batch, ref, backend="torch", options={"chunk_rows": 1})
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=1e-6)
    with pytest.raises(OptionError, match="unknown torch option"):
        sdpo_fast.candidate_sdpo_loss(model, batch, ref, backend="torch", options={"tile": 1})
    # and the fp64 reference agrees with what the options produced
    hidden = model.model(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         attention_mask=batch.attention_mask()).last_hidden_state
    expected = reference_logps(hidden.reshape(-1, 32), model.lm_head.weight, groups, batch)
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-4, atol=1e-4)


def test_trainer_configuration_checks_backend_options():
    from sdpo_fast.config import DataArguments, ModelArguments, TrainArguments, validate
    from sdpo_fast.errors import UserError

    def problems(**kw):
        args = TrainArguments(**kw)
        try:
            validate(ModelArguments(), DataArguments(), args)
        except UserError as exc:
            return str(exc), args
        return "", args

    msg, args = problems(backend="torch", backend_options='{"logprobs": {"chunk_rows": 4}}')
    assert msg == "" and args.backend_options == {"logprobs": {"chunk_rows": 4}}
    msg, args = problems(backend="torch", backend_options={"sdpo_loss": {"chunk_rows": 4}})  # from a config file
    assert msg == "" and args.backend_options == {"sdpo_loss": {"chunk_rows": 4}}
    assert "explicit --backend" in problems(backend_options='{"logprobs": {}}')[0]
    assert "not valid JSON" in problems(backend="torch", backend_options="{")[0]
    assert "unknown op 'loss'" in problems(backend="torch", backend_options='{"loss": {}}')[0]
    assert "chunk_rows must be" in problems(backend="torch", backend_options='{"logprobs": {"chunk_rows": 0}}')[0]
    assert "unknown torch option" in problems(backend="torch", backend_options='{"logprobs": {"x": 1}}')[0]
