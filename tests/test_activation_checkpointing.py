"""``train.activation_checkpointing: attention`` really checkpoints the band attention layers:
OLMo-core wraps every attention module in a checkpoint wrapper, each band layer's forward runs
again during backward (recomputation), and the gradients equal the unwrapped model's."""

from __future__ import annotations

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from olmoe_spattn.olmo.attention import BandAttention
from olmoe_spattn.olmo.moe_cpu import use_torch_moe
from olmoe_spattn.olmo.recipe import load_recipe
from olmoe_spattn.olmo.train import _train_module_config

CPU = torch.device("cpu")


def _model(mode: str | None) -> torch.nn.Module:
    recipe = load_recipe("tiny", [f"train.activation_checkpointing={mode or 'null'}"])
    torch.manual_seed(0)
    model = recipe.model_config().build(init_device="meta")
    use_torch_moe(model)
    return _train_module_config(recipe, CPU).build(model, device=CPU).model


def _attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [block.attention for block in model.blocks.values()]


def _forward_backward_counts(model: torch.nn.Module, ids: torch.Tensor) -> tuple[list[int], dict[str, torch.Tensor]]:
    """Calls of each band attention layer's forward (pre-hooks: checkpoint recomputation may stop
    early, before a forward hook would fire) during one forward + backward, and the grads."""
    layers = [m for m in model.modules() if isinstance(m, BandAttention)]
    counts = [0] * len(layers)
    hooks = [
        layer.register_forward_pre_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        logits = model(ids)  # [B, T, V]
        logits.float().logsumexp(-1).mean().backward()
    finally:
        for h in hooks:
            h.remove()
    grads = {n.replace("._checkpoint_wrapped_module", ""): p.grad.clone() for n, p in model.named_parameters()}
    return counts, grads


def test_attention_layers_are_wrapped_and_recomputed():
    ids = torch.randint(2, 512, (2, 64), generator=torch.Generator().manual_seed(1))
    plain, ac = _model(None), _model("attention")
    ac.load_state_dict(plain.state_dict())
    assert not any(isinstance(layer, CheckpointWrapper) for layer in _attention_layers(plain))
    wrapped = _attention_layers(ac)
    assert wrapped and all(isinstance(layer, CheckpointWrapper) for layer in wrapped)
    assert all(isinstance(layer._checkpoint_wrapped_module, BandAttention) for layer in wrapped)

    plain_counts, plain_grads = _forward_backward_counts(plain, ids)
    ac_counts, ac_grads = _forward_backward_counts(ac, ids)
    assert plain_counts == [1] * len(wrapped)  # no recomputation without checkpointing
    assert ac_counts == [2] * len(wrapped)  # forward, then recomputed once during backward
    assert set(ac_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ac_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)
