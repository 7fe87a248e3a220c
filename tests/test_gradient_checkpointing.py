"""`--gradient_checkpointing`: Diffusers' `enable_gradient_checkpointing()` on our denoisers recomputes each UNet block
in backward and leaves every gradient as it was."""

import pytest
import torch

from conftest import tiny_edm, tiny_edm2


def tiny_edm_with_dropout():
    net = tiny_edm(label_dim=10, augment_dim=0)
    net.model.enc["8x8_block0"].dropout = 0.2
    net.model.dec["8x8_block1"].dropout = 0.2
    return net


def sida_style_gradients(net, checkpointing: bool):
    """Parameter and input gradients of an encoder-decoder pass plus an encoder pass (the fake-score step's shape),
    in train mode with dropout, from a fixed RNG state."""
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train().zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, net.img_channels, 8, 8, generator=g).requires_grad_(True)
    labels = torch.nn.functional.one_hot(torch.tensor([1, 4, 7]), 10).float()
    sigma = torch.tensor([0.3, 1.0, 4.0])
    torch.manual_seed(5)  # dropout masks
    out, logits = net(x, sigma, labels, return_flag="encoder_decoder")
    logits_real = net(0.5 * x, sigma, labels, return_flag="encoder")
    (out.square().mean() + logits.mean() + logits_real.square().mean()).backward()
    return [x.grad] + [p.grad for p in net.parameters() if p.grad is not None]


@pytest.mark.parametrize("make", [tiny_edm_with_dropout, lambda: tiny_edm2().train()], ids=["EDM SongUNet", "EDM2 UNet"])
def test_checkpointed_blocks_give_the_unchecked_gradients(make):
    plain = sida_style_gradients(make(), checkpointing=False)
    checked = sida_style_gradients(make(), checkpointing=True)
    assert len(plain) == len(checked) > 10
    for a, b in zip(plain, checked):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_checkpointing_keeps_fewer_activations_for_backward():
    # what the flag is for: less memory held between forward and backward (bytes saved by autograd)
    def saved_bytes(checkpointing):
        net = tiny_edm2()
        if checkpointing:
            net.enable_gradient_checkpointing()
        total = []
        x = torch.randn(8, 4, 8, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.nbytes) or t, lambda t: t):
            net.train()(x, 1.0, torch.zeros(8, 10))
        return sum(total)

    assert saved_bytes(True) < 0.5 * saved_bytes(False)


def test_without_the_flag_no_block_is_recomputed():
    net = tiny_edm2()
    calls = []
    for block in net.unet.enc.values():
        block.register_forward_pre_hook(lambda *args: calls.append(1))  # recomputation stops early, after the last saved tensor
    net.train()(torch.randn(2, 4, 8, 8), 1.0, torch.zeros(2, 10)).sum().backward()
    forward_only = len(calls)
    net.enable_gradient_checkpointing()
    calls.clear()
    net(torch.randn(2, 4, 8, 8), 1.0, torch.zeros(2, 10)).sum().backward()
    assert len(calls) == 2 * forward_only - 1  # every block again in backward, except the input convolution
